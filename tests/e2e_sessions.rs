//! Relay stays open while a mail client's IMAP session stays open (IDLE), with a real
//! Dovecot 2.3 (the Debian 12 packages) and 2.4 (a Debian 13 root): renewed past three
//! times the ttl, a real smtpd relaying for the client near the end, held across a kill -9
//! of dovegate, lost ttl after LOGOUT; a session killed without its end line is held no
//! longer than grant.session_hold. Short ttl and hold; nothing asserts timing tighter than
//! a second.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::*;

fn support(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

fn harness(args: &[&str]) -> String {
    let out = Command::new(support("dovecot.sh"))
        .args(args)
        .output()
        .expect("dovecot.sh");
    assert!(
        out.status.success(),
        "dovecot.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stops the harness's Dovecot whatever happens (`down` or `down24`).
struct Down(&'static str, String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(support("dovecot.sh"))
            .args([self.0, &self.1])
            .output();
    }
}

/// tests/support/idle.py: logged in and in IDLE until `logout`.
struct Idle {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Idle {
    fn start(port: u16, addr: &str) -> Idle {
        let mut child = Command::new("python3")
            .arg(support("idle.py"))
            .args([&port.to_string(), addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("idle.py");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "idling", "idle.py did not reach IDLE");
        Idle { child, stdin }
    }

    fn logout(mut self) {
        let mut stdin = self.stdin.take().unwrap();
        writeln!(stdin, "logout").unwrap();
        drop(stdin);
        assert!(self.child.wait().unwrap().success(), "idle.py logout");
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The expiry Postfix sees for `ip` (unix seconds), if it has a grant.
fn expiry(map: &Path, ip: &str) -> Option<i64> {
    let v = postmap_q(map, ip)?;
    let at = v
        .split_whitespace()
        .find_map(|w| w.strip_prefix("expires="))?;
    dovegate::timefmt::parse_rfc3339(at)
}

fn now() -> i64 {
    dovegate::timefmt::now()
}

fn config(dir: &Path, ttl: &str, hold: &str) -> String {
    let conf = dir.join("dovegate.toml");
    std::fs::write(
        &conf,
        format!("[grant]\nttl = \"{ttl}\"\nsession_hold = \"{hold}\"\n"),
    )
    .unwrap();
    conf.display().to_string()
}

/// A short traversable directory (Dovecot's socket paths are limited) and its `dv`.
fn rig() -> (tempfile::TempDir, PathBuf, String) {
    let d = tempfile::Builder::new()
        .prefix("dgs")
        .tempdir_in("/tmp")
        .unwrap();
    set_mode(d.path(), 0o755);
    let dv = d.path().join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    let dvs = dv.display().to_string();
    (d, dv, dvs)
}

/// The IDLE scenario against a Dovecot already listening on `port` and logging to `log`.
fn idle_keeps_relay(d: &Path, log: &Path, port: u16, addr: &str, restart: bool) {
    let map = d.join("relay");
    let conf = config(d, "4s", "2m");
    let mut daemon = Daemon::follow(d, log, &["--config", &conf]);
    let postfix = Postfix::start(d, &map);
    let idle = Idle::start(port, addr);
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, addr).is_some()
    });
    let sessions = d.join("state/checkpoints/sessions.json");
    wait_for("the open session saved", PATIENCE, || {
        std::fs::read_to_string(&sessions).is_ok_and(|t| t.contains(addr))
    });
    if restart {
        // kill -9: the login line is behind the checkpoint; only the saved session keeps
        // the relay open.
        daemon.kill9();
        daemon = Daemon::follow(d, log, &["--config", &conf]);
    }
    // Three times the ttl in IDLE: the grant never lapses.
    while now() < login + 13 {
        let e = expiry(&map, addr);
        assert!(
            e.is_some_and(|e| e > now()),
            "relay lapsed while the session is open: {e:?}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut smtp = Smtp::connect(postfix.port);
    let r = smtp.relay_as(addr);
    assert!(
        r.starts_with("250"),
        "a real smtpd relays near the end: {r}"
    );
    idle.logout();
    let out = now();
    // ttl after the end: the grant is extended to LOGOUT + ttl, then removed.
    wait_for("grant extended past the logout", PATIENCE, || {
        expiry(&map, addr).is_some_and(|e| e >= out + 3)
    });
    wait_for("grant gone ttl after the logout", PATIENCE, || {
        expiry(&map, addr).is_none()
    });
    assert!(now() >= out + 3, "removed before ttl after the logout");
    // XCLIENT once per connection: a new one.
    let r = Smtp::connect(postfix.port).relay_as(addr);
    assert!(r.starts_with("554"), "relay refused after expiry: {r}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn dovecot_23_idle_session_keeps_relay_across_kill9_then_expires() {
    let (d, dv, dvs) = rig();
    let _down = Down("down", dvs.clone());
    harness(&["up", &dvs, "file", "13143"]);
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        13143,
        "198.51.100.41",
        true,
    );
}

#[test]
fn dovecot_24_idle_session_keeps_relay_then_expires() {
    let (d, dv, dvs) = rig();
    let root = harness(&["trixie-root", &dvs]);
    let _down = Down("down24", dvs.clone());
    harness(&["up24", &dvs, &root, "13243"]);
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        13243,
        "198.51.100.42",
        false,
    );
}

/// The imap process killed: Dovecot writes no `Disconnected:` line, so the session falls
/// back to the hold (here 10 s after the login).
#[test]
fn a_session_killed_without_its_end_is_held_no_longer_than_the_hold() {
    let (d, dv, dvs) = rig();
    let _down = Down("down", dvs.clone());
    harness(&["up", &dvs, "file", "13343"]);
    let log = dv.join("dovecot.log");
    let map = d.path().join("relay");
    let conf = config(d.path(), "3s", "10s");
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    let addr = "198.51.100.43";
    let idle = Idle::start(13343, addr);
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, addr).is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let mpid: i32 = text
        .lines()
        .find(|l| l.contains("Login: user=<alice>") && l.contains(addr))
        .and_then(|l| l.split("mpid=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .expect("mpid of the login");
    signal(mpid as u32, libc::SIGKILL);
    let mut last = login;
    wait_for(
        "grant gone after the hold",
        Duration::from_secs(40),
        || match expiry(&map, addr) {
            Some(e) => {
                last = last.max(e);
                false
            }
            None => true,
        },
    );
    assert!(
        last <= login + 10 + 1,
        "held until {last}, past login {login} + hold 10 s"
    );
    assert!(now() >= login + 5, "released before the session's hold ran");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.lines().any(|l| l.contains("Disconnected: Logged out")),
        "no end line was written"
    );
    drop(idle);
    assert_eq!(daemon.stop(), Some(0));
}
