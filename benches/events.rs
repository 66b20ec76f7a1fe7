//! Login-to-grant latency by source (not a test; `cargo bench --bench events`, about a
//! minute; needs root, Dovecot 2.3, systemd-journald, as tests/support/dovecot.sh does).
//!
//! Two private Dovecot 2.3: the first logs to a file and exports events as the README
//! says; the second logs to a private journald (its mail logins stamped
//! `_SYSTEMD_UNIT=dovecot.service` through a cgroup). Three daemons follow them: `[events]`
//! only, the file, the journal. For each of DOVEGATE_BENCH_LOGINS (default 100) forwarded
//! IMAP logins per Dovecot, the time from Dovecot's `OK` to the address readable in each
//! daemon's LMDB map (what `postmap -q` reads). Prints p50, p95 and max per source.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dovegate::store::{AdminStore, LmdbMap, OpenMode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn support(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

fn harness(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(support("dovecot.sh"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("dovecot.sh");
    assert!(
        out.status.success(),
        "dovecot.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Harness commands run at the end whatever happens.
struct Cleanup(Vec<Vec<String>>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in &self.0 {
            let _ = Command::new(support("dovecot.sh")).args(args).output();
        }
    }
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// `dovegate run` with its map and state in `dir`, the configuration `toml` and `args`.
fn daemon(dir: &Path, toml: &str, args: &[&str]) -> (Daemon, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let map = dir.join("relay");
    let cfg = dir.join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n{toml}",
            map.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dovegate"))
        .args(["run", "--config", &cfg.display().to_string()])
        .args(args)
        .env("DOVEGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .expect("dovegate run");
    (Daemon(child), map)
}

fn open_map(map: &Path) -> LmdbMap {
    let start = Instant::now();
    loop {
        if map.with_extension("lmdb").exists() {
            if let Ok(m) = LmdbMap::open(map, "OK", OpenMode::ReadOnly) {
                return m;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no map {}",
            map.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads up to the line starting with `tag`, which must say OK.
async fn until_ok<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, tag: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).await.unwrap() > 0, "Dovecot closed");
        if let Some(rest) = line.strip_prefix(tag) {
            assert!(rest.starts_with("OK"), "{line}");
            return;
        }
    }
}

/// One forwarded IMAP login (from the trusted 127.0.0.9, for `addr`); returns when
/// Dovecot said OK (the logout goes on after).
async fn login(port: u16, addr: IpAddr) -> Instant {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let stream = sock
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect to Dovecot");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    until_ok(&mut r, "* ").await;
    w.write_all(format!("a ID (\"x-originating-ip\" \"{addr}\")\r\n").as_bytes())
        .await
        .unwrap();
    until_ok(&mut r, "a ").await;
    w.write_all(b"b LOGIN alice alice-pass\r\n").await.unwrap();
    until_ok(&mut r, "b ").await;
    let ok = Instant::now();
    w.write_all(b"c LOGOUT\r\n").await.unwrap();
    ok
}

/// Polls each map until `ip` is in all of them; the delay after `ok` for each.
fn seen(maps: &mut [&mut LmdbMap], ip: IpAddr, ok: Instant) -> Vec<Option<Duration>> {
    let mut out = vec![None; maps.len()];
    while out.iter().any(Option::is_none) && ok.elapsed() < Duration::from_secs(10) {
        for (m, o) in maps.iter_mut().zip(out.iter_mut()) {
            if o.is_none() && m.get(ip).ok().flatten().is_some() {
                *o = Some(ok.elapsed());
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    out
}

fn summary(name: &str, mut v: Vec<Option<Duration>>, n: usize) {
    let missed = v.iter().filter(|d| d.is_none()).count();
    let mut ms: Vec<f64> = v
        .drain(..)
        .flatten()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if ms.is_empty() {
        println!("{name:<8} no grant seen in {n} logins");
        return;
    }
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name:<8} p50 {:>7.1} ms  p95 {:>7.1} ms  max {:>7.1} ms  ({} logins, {missed} not granted within 10 s)",
        pct(0.5),
        pct(0.95),
        ms[ms.len() - 1],
        n
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test
    // with a few logins per mode (it must work; its figures mean little then).
    let measuring = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("DOVEGATE_BENCH_LOGINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 100 } else { 10 });
    let tmp = tempfile::Builder::new()
        .prefix("dgb")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (d1, d2) = (dir.join("d1"), dir.join("d2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let (d1s, d2s) = (d1.display().to_string(), d2.display().to_string());
    let _cleanup = Cleanup(vec![
        vec!["down".into(), d1s.clone()],
        vec!["down".into(), d2s.clone()],
        vec!["journald-down".into(), d2s.clone()],
        vec!["cgroup-down".into(), d2s.clone()],
    ]);

    // The README's Dovecot 2.3 exporter, on a free port with a secret.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "bench-secret-0123456789abcdef";
    std::fs::write(dir.join("secret"), secret).unwrap();
    let readme = include_str!("../README.md");
    let at = readme
        .find("Dovecot 2.3 (`/etc/dovecot/conf.d/95-dovegate-events.conf`")
        .expect("the README's 2.3 snippet");
    let start = at + readme[at..].find("```\n").unwrap() + 4;
    let snippet = &readme[start..start + readme[start..].find("```\n").unwrap()];
    let exporter = snippet
        .replace("8431", &port.to_string())
        .replace("/SECRET", &format!("/{secret}"));
    harness(
        &["up", &d1s, "file", "29143"],
        &[("DG_EXTRA_CONF", &exporter)],
    );
    harness(&["journald-up", &d2s], &[]);
    let cgroup = Command::new(support("dovecot.sh"))
        .args(["cgroup-up", &d2s])
        .output()
        .unwrap();
    let cgroup = String::from_utf8_lossy(&cgroup.stdout).trim().to_string();
    assert!(
        !cgroup.is_empty(),
        "no writable cgroup2: journald cannot stamp the unit"
    );
    let sock = d2.join("journal/sock/dev-log").display().to_string();
    harness(
        &["up", &d2s, "syslog", "29243"],
        &[("DG_SYSLOG_SOCK", &sock), ("DG_CGROUP", &cgroup)],
    );

    let (_e, emap) = daemon(
        &dir.join("events"),
        &format!(
            "[source]\nlogs = []\njournal = false\n[events]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
            dir.join("secret").display()
        ),
        &[],
    );
    let (_f, fmap) = daemon(
        &dir.join("file"),
        &format!(
            "[source]\nlogs = [\"{}\"]\njournal = false\n",
            d1.join("dovecot.log").display()
        ),
        &[],
    );
    let jdir = d2.join("journal/runlog/journal").display().to_string();
    let (_j, jmap) = daemon(
        &dir.join("journal"),
        "[source]\nlogs = []\n",
        &["--journal-dir", &jdir],
    );
    let (mut em, mut fm, mut jm) = (open_map(&emap), open_map(&fmap), open_map(&jmap));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A first login each, not measured: every path warmed up and following.
    let warm1: IpAddr = "198.18.0.1".parse().unwrap();
    let ok = rt.block_on(login(29143, warm1));
    seen(&mut [&mut em, &mut fm], warm1, ok);
    let warm2: IpAddr = "198.18.0.2".parse().unwrap();
    let ok = rt.block_on(login(29243, warm2));
    seen(&mut [&mut jm], warm2, ok);

    let (mut ev, mut fv, mut jv) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let a: IpAddr = format!("198.18.{}.{}", 1 + i / 250, 1 + i % 250)
            .parse()
            .unwrap();
        let ok = rt.block_on(login(29143, a));
        let r = seen(&mut [&mut em, &mut fm], a, ok);
        ev.push(r[0]);
        fv.push(r[1]);
        let b: IpAddr = format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250)
            .parse()
            .unwrap();
        let ok = rt.block_on(login(29243, b));
        jv.push(seen(&mut [&mut jm], b, ok)[0]);
    }
    println!("login (Dovecot's OK) to the grant in the map, {n} forwarded IMAP logins each:");
    summary("events", ev, n);
    summary("file", fv, n);
    summary("journal", jv, n);
}
