//! Fleet benchmark (not a test). Run with `scripts/bench-fleet`.
//!
//! A private PostgreSQL 15, one writer (`dovegate run` with `[store] postgres_url_file`)
//! and one replica (`dovegate replica`). Phase 1 appends login lines at 1,000 per second
//! (distinct addresses, `DOVEGATE_FLEET_SECS` seconds, default 10) and measures, for each
//! login, the time from the line appended to its grant readable in the replica's LMDB map
//! (end-to-end propagation: tailer, writer commit, PostgreSQL, NOTIFY, replica commit).
//! Phase 2 appends 20,000 lines at once and measures how fast the writer puts them into
//! PostgreSQL (writer throughput) and the replica into its map.
//!
//! `DOVEGATE_FLEET_DB=mariadb`: the same through a private MariaDB (`[store]
//! mysql_url_file`; the replica polls the change sequence instead of LISTEN).

#[path = "../tests/support/mariadb.rs"]
mod mariadb;
#[path = "../tests/support/pg.rs"]
mod pg;
#[path = "../tests/support/tls.rs"]
mod tls;

/// The database under the fleet.
enum Db {
    Pg(pg::Pg),
    Maria(mariadb::Maria),
}

impl Db {
    fn name(&self) -> &'static str {
        match self {
            Db::Pg(_) => "PostgreSQL",
            Db::Maria(_) => "MariaDB",
        }
    }

    /// The `[store]` line naming the URL file.
    fn store_line(&self, dir: &Path) -> String {
        match self {
            Db::Pg(pg) => format!(
                "postgres_url_file = \"{}\"",
                pg.url_file(&dir.join("db.url")).display()
            ),
            Db::Maria(m) => format!(
                "mysql_url_file = \"{}\"",
                m.url_file(&dir.join("db.url")).display()
            ),
        }
    }

    fn count(&self) -> Option<String> {
        let sql = "SELECT count(*) FROM dovegate_grants";
        match self {
            Db::Pg(pg) => pg.try_psql(sql).ok(),
            Db::Maria(m) => m.sql_as(mariadb::USER, mariadb::PASSWORD, sql).ok(),
        }
    }
}

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dovegate::store::{AdminStore, LmdbMap, OpenMode};

fn spawn(args: &[&str], stderr: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dovegate"))
        .args(args)
        .env("DOVEGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("spawn dovegate")
}

fn stop(mut c: Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let _ = c.wait();
}

/// The n-th benchmark address (198.18.0.0/15, the benchmarking range).
fn addr(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + n,
    ))
}

fn line(ip: IpAddr) -> String {
    format!(
        "{} mail dovecot: imap-login: Login: user=<bench>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=4242, TLS, session=<abcdEFGH1234>\n",
        chrono::Local::now().format("%b %e %H:%M:%S")
    )
}

/// Polls the replica map and records when each address first appears.
fn watch(map: PathBuf, seen: Arc<Mutex<HashMap<IpAddr, Instant>>>, stop: Arc<AtomicBool>) {
    while !map.with_extension("lmdb").exists() && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut m = LmdbMap::open(&map, "OK", OpenMode::ReadOnly).expect("open replica map");
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if let Ok(list) = m.list() {
            let mut s = seen.lock().unwrap();
            for g in list {
                s.entry(g.ip).or_insert(now);
            }
        }
        // Leave the cores to what is measured: pause at least as long as the scan took.
        std::thread::sleep(now.elapsed().max(Duration::from_millis(5)));
    }
}

/// Polls `f` every `every` until it holds; returns when it did.
fn wait_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> bool,
) -> Instant {
    let start = Instant::now();
    loop {
        if f() {
            return Instant::now();
        }
        assert!(start.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(every);
    }
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode: a benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: run with `scripts/bench-fleet` (cargo bench --bench fleet)");
        return;
    }
    let secs: u32 = std::env::var("DOVEGATE_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::Builder::new()
        .prefix("dgfleet")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = tmp.path();
    let db = match std::env::var("DOVEGATE_FLEET_DB").as_deref() {
        Ok("mariadb") | Ok("mysql") => Db::Maria(mariadb::Maria::start(dir)),
        _ => Db::Pg(pg::Pg::start(dir)),
    };
    let cfg = dir.join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\npoll_interval = \"100ms\"\n[store]\n{}\n",
            db.store_line(dir)
        ),
    )
    .unwrap();
    println!("fleet through {}", db.name());
    let log = dir.join("mail.log");
    std::fs::write(&log, "").unwrap();
    let p = |x: &str| dir.join(x).display().to_string();
    let writer = spawn(
        &[
            "run",
            "--config",
            &p("dovegate.toml"),
            "--log",
            &p("mail.log"),
            "--map",
            &p("w/relay"),
            "--state-dir",
            &p("w/state"),
        ],
        &dir.join("writer.stderr"),
    );
    let replica = spawn(
        &[
            "replica",
            "--config",
            &p("dovegate.toml"),
            "--map",
            &p("r/relay"),
            "--state-dir",
            &p("r/state"),
        ],
        &dir.join("replica.stderr"),
    );
    wait_until(
        "replica connected",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            std::fs::read_to_string(dir.join("r/state/replica.json"))
                .is_ok_and(|t| t.contains("\"connected\": true"))
        },
    );
    wait_until(
        "writer connected",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            std::fs::read_to_string(dir.join("w/state/fleet.json"))
                .is_ok_and(|t| t.contains("\"connected\": true"))
        },
    );
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (map, seen, stop) = (
            dir.join("r/relay"),
            Arc::clone(&seen),
            Arc::clone(&stop_watch),
        );
        std::thread::spawn(move || watch(map, seen, stop))
    };
    let mut out = std::fs::OpenOptions::new().append(true).open(&log).unwrap();

    // Phase 1: 1,000 logins per second, one line per millisecond.
    let n = secs * 1000;
    let mut appended = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for i in 0..n {
        let at = t0 + Duration::from_millis(i as u64);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let ip = addr(i);
        out.write_all(line(ip).as_bytes()).unwrap();
        appended.push((ip, Instant::now()));
    }
    let wrote = t0.elapsed();
    wait_until(
        "phase 1 on the replica",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || seen.lock().unwrap().len() >= n as usize,
    );
    let mut lat: Vec<f64> = {
        let s = seen.lock().unwrap();
        appended
            .iter()
            .map(|(ip, t)| s[ip].saturating_duration_since(*t).as_secs_f64() * 1000.0)
            .collect()
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f) as usize];
    println!(
        "phase 1: {n} logins appended in {:.2}s ({:.0}/s)",
        wrote.as_secs_f64(),
        n as f64 / wrote.as_secs_f64()
    );
    println!(
        "  end-to-end propagation (line appended -> replica LMDB map), ms: median {:.0}, p90 {:.0}, p99 {:.0}, worst {:.0}",
        q(0.5), q(0.9), q(0.99), lat[lat.len() - 1]
    );

    // Phase 2: a burst of 20,000 lines; writer throughput into PostgreSQL.
    let burst = 20_000u32;
    let mut text = String::new();
    for i in n..n + burst {
        text.push_str(&line(addr(i)));
    }
    let t1 = Instant::now();
    out.write_all(text.as_bytes()).unwrap();
    let total = (n + burst).to_string();
    // psql is a process per poll: poll slowly (the figure is accurate to ~0.1 s).
    let in_db = wait_until(
        "burst in the database",
        Duration::from_secs(300),
        Duration::from_millis(100),
        || db.count().is_some_and(|c| c == total),
    );
    let in_replica = wait_until(
        "burst on the replica",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || seen.lock().unwrap().len() >= (n + burst) as usize,
    );
    let db_secs = in_db.duration_since(t1).as_secs_f64();
    let rep_secs = in_replica.duration_since(t1).as_secs_f64();
    println!("phase 2: burst of {burst} lines");
    println!(
        "  writer throughput into {}: {:.0} logins/s (all in {:.2}s)",
        db.name(),
        burst as f64 / db_secs,
        db_secs
    );
    println!(
        "  on the replica map: {:.0} logins/s (all in {:.2}s)",
        burst as f64 / rep_secs,
        rep_secs
    );

    stop_watch.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    stop(replica);
    stop(writer);
    for f in ["writer.stderr", "replica.stderr"] {
        let t = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        if !t.trim().is_empty() {
            println!(
                "--- {f} (warnings)\n{}",
                t.lines().take(20).collect::<Vec<_>>().join("\n")
            );
        }
    }
    drop(db);
}
