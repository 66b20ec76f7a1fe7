//! The socketmap server against real clients: Postfix's `postmap -q KEY
//! socketmap:unix:PATH:NAME`, and sendmail 8.17's `Ksocket` map queried with `sendmail -bt`
//! (`/map`). Malformed and hostile clients never take the daemon down.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SENDMAIL: &str = "/var/cache/dovegate-test/sendmail/usr/libexec/sendmail/sendmail";

/// The socket lives under /run: sendmail refuses a socket in a world-writable directory.
struct RunDir(PathBuf);
impl RunDir {
    fn new() -> RunDir {
        let p = PathBuf::from(format!(
            "/run/dovegate-test-{}-{:x}",
            std::process::id(),
            rand_u64() & 0xffff
        ));
        std::fs::create_dir_all(&p).unwrap();
        set_mode(&p, 0o755);
        RunDir(p)
    }
}
impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon's configuration: the map and state in `d`, following `log`, socketmap at
/// `sock` with `limits` (`socketmap_max_connections` and `socketmap_idle_timeout` lines).
fn config(d: &Path, sock: &Path, log: &Path, limits: &str) -> PathBuf {
    let conf = d.join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[map]\npath = {:?}\n[state]\ndir = {:?}\n\
             [serve]\nsocketmap = \"unix:{}\"\nsocketmap_values = {{ access = \"RELAY\" }}\n{limits}\n",
            log.display().to_string(),
            d.join("relay").display().to_string(),
            d.join("state").display().to_string(),
            sock.display()
        ),
    )
    .unwrap();
    if !log.exists() {
        std::fs::write(log, "").unwrap();
    }
    conf
}

const LIMITS: &str = "socketmap_max_connections = 4\nsocketmap_idle_timeout = \"2s\"";

fn start(d: &Path, sock: &Path, log: &Path) -> Daemon {
    start_with(d, sock, log, LIMITS)
}

fn start_with(d: &Path, sock: &Path, log: &Path, limits: &str) -> Daemon {
    let conf = config(d, sock, log, limits);
    let daemon = Daemon::start(d, &["--config", &conf.display().to_string()]);
    wait_for("socketmap socket", PATIENCE, || sock.exists());
    daemon
}

fn postmap_socketmap(sock: &Path, name: &str, key: &str) -> Option<String> {
    postmap_table(&format!("socketmap:unix:{}:{name}", sock.display()), key)
}

/// `postmap -q` on the socketmap: Some(value) when answered, None when not found or when
/// the lookup failed (e.g. the server refused the connection).
fn postmap_answer(sock: &Path, name: &str, key: &str) -> Option<String> {
    let out = postmap_query(&format!("socketmap:unix:{}:{name}", sock.display()), key);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// One request on a fresh connection; "" when the server closed it (e.g. all connection
/// slots busy for a moment).
fn query(sock: &Path, payload: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    if s.write_all(format!("{}:{payload},", payload.len()).as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits for the reply: clients that just closed may still hold a slot for a moment.
fn expect_reply(sock: &Path, payload: &str, want: &str) {
    wait_for(&format!("{payload} -> {want}"), PATIENCE, || {
        query(sock, payload) == want
    });
}

#[test]
fn postfix_and_sendmail_query_the_live_grants() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.7", "a"));
    append(&log, &login_line("2001:db8::7", "b"));
    wait_for("grants", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "2001:db8::7").is_some()
    });

    // Postfix: check_client_access socketmap:unix:PATH:relay
    assert_eq!(
        postmap_socketmap(&sock, "relay", "203.0.113.7").as_deref(),
        Some("OK")
    );
    assert_eq!(postmap_socketmap(&sock, "relay", "192.0.2.99"), None);
    assert_eq!(
        postmap_socketmap(&sock, "access", "203.0.113.7").as_deref(),
        Some("RELAY")
    );

    // sendmail: Kaccess socket unix:PATH, access-map keys, /map in address test mode.
    assert!(
        Path::new(SENDMAIL).exists(),
        "sendmail not unpacked: run scripts/deps test"
    );
    let cf = d.path().join("sendmail.cf");
    std::fs::write(
        &cf,
        format!(
            "V10/Berkeley\nDjmail.dovegate.test\nO QueueDirectory={q}\nO HelpFile=/dev/null\n\
             Mlocal, P=/bin/true, F=lsDFM, A=true\nKaccess socket -T<TMPF> unix:{sock}\n",
            q = d.path().display(),
            sock = sock.display()
        ),
    )
    .unwrap();
    let keys = [
        "connect:203.0.113.7",
        "connect:ipv6:2001:db8:0:0:0:0:0:7",
        "connect:192.0.2.99",
    ];
    let input: String = keys.iter().map(|k| format!("/map access {k}\n")).collect();
    // sendmail insists on a qualified host name: give it one in a private UTS namespace.
    let mut child = Command::new("unshare")
        .args([
            "--uts",
            "sh",
            "-c",
            &format!(
                "hostname mail.dovegate.test && exec {SENDMAIL} -bt -C {}",
                cf.display()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("map_lookup: access (connect:203.0.113.7) returns RELAY"),
        "{text}"
    );
    assert!(
        text.contains("map_lookup: access (connect:ipv6:2001:db8:0:0:0:0:0:7) returns RELAY"),
        "{text}"
    );
    assert!(
        text.contains("map_lookup: access (connect:192.0.2.99) no match"),
        "{text}"
    );
    assert!(!text.contains("unsafe"), "{text}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn hostile_clients_never_take_it_down() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.8", "a"));
    expect_reply(&sock, "relay 203.0.113.8", "5:OK OK,");
    // Malformed netstrings close the connection; the server keeps answering others.
    let mut rng = rand_u64() | 1;
    for i in 0..300 {
        let mut s = UnixStream::connect(&sock).unwrap();
        let garbage: Vec<u8> = (0..(i % 64 + 1))
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                b"0123456789:, xrelay\xff\x00"[(rng % 20) as usize]
            })
            .collect();
        let _ = s.write_all(&garbage);
    }
    for payload in ["99999999999:x,", "5:abc", "1025:"] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(payload.as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            s.read(&mut buf).unwrap_or(0),
            0,
            "{payload}: connection closed without a reply"
        );
    }
    // Requests without a key get a PERM reply, unknown keys NOTFOUND.
    expect_reply(&sock, "relay", "30:PERM expected: <mapname> <key>,");
    expect_reply(&sock, "relay unknown", "9:NOTFOUND ,");
    // Every slot busy (4): a newcomer is served, and the stalest connection is closed to
    // make room for it.
    let mut idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    assert_eq!(query(&sock, "relay 203.0.113.8"), "5:OK OK,");
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        idle[0].read(&mut buf).ok(),
        Some(0),
        "the stalest connection was closed"
    );
    drop(idle);
    expect_reply(&sock, "relay 203.0.113.8", "5:OK OK,");
    assert_eq!(daemon.stop(), Some(0));
}

/// Keeps writing one byte per 300 ms of a request that never completes (each byte well
/// inside the idle timeout); true once the server has closed the connection.
fn slowloris(sock: &Path) -> std::thread::JoinHandle<bool> {
    let mut s = UnixStream::connect(sock).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        if s.write_all(b"900:").is_err() {
            return true;
        }
        while start.elapsed() < PATIENCE {
            if s.write_all(b"x").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    })
}

/// Pipelines requests and never reads a reply; true once the server has closed the
/// connection (a write fails with something else than the client's own timeout).
fn deaf_pipeliner(sock: &Path) -> std::thread::JoinHandle<bool> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        let req = b"15:relay 192.0.2.1,".repeat(64);
        while start.elapsed() < PATIENCE {
            match s.write(&req) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    })
}

/// Defect 14: a client trickling a request byte by byte, or pipelining without reading its
/// replies, held its connection slot forever; with every slot taken, Postfix got no answer.
#[test]
fn slow_and_deaf_clients_do_not_lock_out_postfix() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.9", "a"));
    wait_for("grant", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "203.0.113.9").is_some()
    });

    // All four slots (socketmap_max_connections = 4) taken by hostile clients.
    let attackers = vec![
        slowloris(&sock),
        slowloris(&sock),
        deaf_pipeliner(&sock),
        deaf_pipeliner(&sock),
    ];
    // No newcomer evicts them: the request and write timeouts (2 s) alone close them all,
    // while they are still at it.
    for a in attackers {
        assert!(
            a.join().unwrap(),
            "the server closed the hostile connection"
        );
    }
    wait_for("postmap answered", PATIENCE, || {
        postmap_answer(&sock, "relay", "203.0.113.9").as_deref() == Some("OK")
    });
    let text = daemon.log();
    assert!(
        text.contains("socketmap connections closed: a request arrived too slowly"),
        "{text}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// Crowding (every slot busy) is counted and logged at most once per 10 s per kind
/// (409,462 WARN lines in 5 s were seen).
#[test]
fn crowding_is_logged_rate_limited() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    expect_reply(&sock, "relay 192.0.2.1", "9:NOTFOUND ,");
    let started = Instant::now();
    let lines = |t: &str, kind: &str| {
        t.lines()
            .filter(|l| l.contains("socketmap") && l.contains(kind))
            .count()
    };
    // Connections that are opened and dropped at once, far more than the 4 slots.
    let mut open: Vec<UnixStream> = Vec::new();
    for i in 0..3000 {
        if let Ok(s) = UnixStream::connect(&sock) {
            open.push(s);
        }
        if i % 16 == 0 {
            open.clear();
        }
    }
    drop(open);
    wait_for("a crowding WARN", PATIENCE, || {
        lines(&daemon.log(), "stalest") > 0
    });
    let elapsed = started.elapsed().as_secs() as usize;
    let text = daemon.log();
    for kind in ["stalest", "refused"] {
        let n = lines(&text, kind);
        assert!(
            n <= elapsed / 10 + 2,
            "{n} `{kind}` lines in {elapsed}s:\n{text}"
        );
    }
    assert!(text.contains("evicted="), "the WARN carries a count");
    expect_reply(&sock, "relay 192.0.2.1", "9:NOTFOUND ,");
    assert_eq!(daemon.stop(), Some(0));
}

/// Attackers that reconnect as soon as they are cut off, trickling a request each time,
/// until `stop`.
fn reconnecting_slowloris(
    sock: &Path,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (sock, stop) = (sock.to_path_buf(), std::sync::Arc::clone(stop));
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering;
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut s) = UnixStream::connect(&sock) else {
                continue;
            };
            let _ = s.write_all(b"900:");
            while !stop.load(Ordering::Relaxed) && s.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}

/// Timeouts alone do not help when hostile clients reconnect at once: they would win the
/// race for every freed slot. A newcomer evicts the stalest connection instead.
#[test]
fn reconnecting_attackers_do_not_lock_out_postfix() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.13", "a"));
    wait_for("grant", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "203.0.113.13").is_some()
    });
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..8)
        .map(|_| reconnecting_slowloris(&sock, &stop))
        .collect();
    wait_for("the attackers crowd the slots", PATIENCE, || {
        daemon.log().contains("closed the stalest connections")
    });
    for _ in 0..3 {
        wait_for("postmap answered among the attackers", PATIENCE, || {
            postmap_answer(&sock, "relay", "203.0.113.13").as_deref() == Some("OK")
        });
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    assert_eq!(daemon.stop(), Some(0));
}

/// User plus system CPU time of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Defect 14: out of file descriptors (EMFILE), the accept loop retried at once and spun a
/// core at 100%. The daemon runs with RLIMIT_NOFILE = 64 and a flood holds more
/// connections than that: it must back off while the flood lasts, and answer after.
#[test]
fn out_of_file_descriptors_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt;
    const NOFILE: u64 = 64;
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let conf = config(
        d.path(),
        &sock,
        &log,
        "socketmap_max_connections = 500\nsocketmap_idle_timeout = \"60s\"",
    );
    let stderr = d.path().join("dovegate.stderr");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--config", &conf.display().to_string()])
        .env("DOVEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut daemon = Daemon {
        child: cmd.spawn().unwrap(),
        stderr,
    };
    let pid = daemon.child.id();
    wait_for("socketmap socket", PATIENCE, || sock.exists());
    append(&log, &login_line("203.0.113.10", "a"));
    wait_for("grant", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "203.0.113.10").is_some()
    });
    assert!(
        daemon.log().contains("LimitNOFILE"),
        "warned at start that the limit cannot fit max_connections:\n{}",
        daemon.log()
    );
    let base = open_fds(pid);
    assert!(
        base + 10 < NOFILE as usize,
        "{base} descriptors open at rest"
    );

    // More connections than descriptors; the surplus waits in the listen backlog.
    let flood: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(flood.len() > NOFILE as usize, "{} connected", flood.len());
    wait_for("the daemon out of descriptors", PATIENCE, || {
        open_fds(pid) >= NOFILE as usize
    });
    // While accepts keep failing, the daemon must mostly sleep. A spinning accept loop
    // takes all the CPU it is given (measured: 68 ticks in 3 s on a 2-core machine at load
    // 15); backing off, the daemon used 1 tick. The bound is 5% of a core.
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    while t0.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (secs, used) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0);
    assert!(
        (used as f64) < 0.05 * tck * secs,
        "{used} CPU ticks in {secs:.1}s while out of descriptors: the accept loop spins"
    );
    assert!(
        daemon.log().contains("out of file descriptors"),
        "EMFILE reported with its fix:\n{}",
        daemon.log()
    );
    let warns = daemon
        .log()
        .lines()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    let since_start = started.elapsed().as_secs() as usize;
    assert!(
        warns <= since_start / 10 + 1,
        "{warns} WARN lines in {since_start}s, at most one per 10 s expected:\n{}",
        daemon.log()
    );

    drop(flood);
    wait_for("answered after the flood", PATIENCE, || {
        postmap_answer(&sock, "relay", "203.0.113.10").as_deref() == Some("OK")
    });
    let recovered = Instant::now();
    while !daemon
        .log()
        .contains("socketmap: accepting connections again")
    {
        assert!(
            recovered.elapsed() < PATIENCE,
            "recovery not logged:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(daemon.stop(), Some(0));
}

/// Waits for `daemon` to exit by itself; its exit code.
fn exits(daemon: &mut Daemon) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = daemon.child.try_wait() {
            return st.code();
        }
        assert!(start.elapsed() < PATIENCE, "the daemon kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Identity of a file: inode and change time (tmpfs reuses inode numbers).
fn inode(p: &Path) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.ino(), m.ctime(), m.ctime_nsec())
}

/// Defect 16: a second `run` on the same socket path unlinked the first one's live socket
/// (Postfix then got 451 for every client). It must refuse and leave the first alone; the
/// first removes its socket on a clean stop; a socket left by a killed daemon is reused.
#[test]
fn a_second_daemon_never_takes_over_a_live_socket() {
    let (d1, d2) = (tempdir(), tempdir());
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d1.path().join("mail.log");
    let mut first = start(d1.path(), &sock, &log);
    append(&log, &login_line("203.0.113.11", "a"));
    wait_for("grant", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "203.0.113.11").is_some()
    });
    let ino = inode(&sock);

    // Its own map and state: only the socket is shared.
    let conf2 = config(d2.path(), &sock, &d2.path().join("mail.log"), LIMITS);
    let mut second = Daemon::start(d2.path(), &["--config", &conf2.display().to_string()]);
    assert_ne!(exits(&mut second), Some(0));
    let text = second.log();
    assert!(
        text.contains(&format!(
            "another dovegate is serving {}; stop it first",
            sock.display()
        )),
        "{text}"
    );
    assert_eq!(inode(&sock), ino, "the live socket was not replaced");
    assert_eq!(
        postmap_socketmap(&sock, "relay", "203.0.113.11").as_deref(),
        Some("OK"),
        "the first daemon still answers Postfix"
    );

    // A clean stop removes the socket it bound.
    assert_eq!(first.stop(), Some(0));
    assert!(!sock.exists(), "socket removed on a clean stop");

    // After kill -9 the socket stays, stale: the next daemon replaces it.
    let mut third = start(d1.path(), &sock, &log);
    wait_for("grant", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "203.0.113.11").is_some()
    });
    third.kill9();
    assert!(sock.exists());
    let log2 = d2.path().join("mail.log");
    append(&log2, &login_line("203.0.113.12", "b"));
    let mut fourth = start_with(d2.path(), &sock, &log2, LIMITS);
    // (The new socket may get the stale one's inode number back: tmpfs reuses them.)
    wait_for("the new daemon answers", PATIENCE, || {
        postmap_answer(&sock, "relay", "203.0.113.12").is_some()
    });
    assert!(fourth.log().contains("removing a stale socketmap socket"));
    assert_eq!(fourth.stop(), Some(0));
}
