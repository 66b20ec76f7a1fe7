//! Issue 19: a session holds its grant past ttl only with evidence that it is open. Lines
//! written here (not by a real Dovecot: tests/e2e_sessions.rs has those) for what is about
//! the source: forged syslog lines, a Dovecot log file that ties end lines, proxy ends,
//! sources no longer configured, `dovegate sessions` and `dovegate test`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::dovecot::{expiry, now};
use common::*;

fn config(dir: &Path, ttl: &str) -> String {
    let conf = dir.join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[grant]\nttl = \"{ttl}\"\nsession_hold = \"2m\"\nsession_recheck = \"1s\"\nsession_who = []\n[state]\ndir = \"{}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    conf.display().to_string()
}

/// Dovecot's own log file (log_path): only Dovecot writes it.
fn logpath_login(ip: &str, user: &str, pid: u32, id: &str) -> String {
    format!(
        "{} imap-login: Info: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid={pid}, TLS, session=<{id}>\n",
        bsd_now()
    )
}

fn logpath_end(user: &str, pid: u32, id: &str) -> String {
    format!(
        "{} imap({user})<{pid}><{id}>: Info: Disconnected: Logged out in=1 out=2\n",
        bsd_now()
    )
}

/// The same through syslog: any local user can write it (`logger -t dovecot`).
fn syslog_login(ip: &str, user: &str, pid: u32, id: &str) -> String {
    format!(
        "{} mail dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid={pid}, secured, session=<{id}>\n",
        bsd_now()
    )
}

fn syslog_end(user: &str, pid: u32, id: &str) -> String {
    format!(
        "{} mail dovecot: imap({user})<{pid}><{id}>: Disconnected: Logged out in=1 out=2\n",
        bsd_now()
    )
}

/// A pid no process has (above the kernel's pid_max).
const NO_PID: u32 = 4_999_999;

/// Waits until `ip` has no grant; returns the latest expiry seen on the way.
fn gone(map: &Path, ip: &str, limit: Duration) -> i64 {
    let mut last = 0;
    wait_for(&format!("{ip}'s grant gone"), limit, || {
        match expiry(map, ip) {
            Some(e) => {
                last = last.max(e);
                false
            }
            None => true,
        }
    });
    last
}

/// Defect 2: a forged syslog login naming a session (and a forged end before it, so the
/// source even "ties" ends) holds nothing past ttl: syslog lines prove nothing about
/// sessions, and no process shows it open.
#[test]
fn a_forged_syslog_session_expires_after_ttl() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    std::fs::write(&log, "").unwrap();
    let map = d.path().join("relay");
    let conf = config(d.path(), "3s");
    let _daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    let ip = "198.51.100.71";
    append(
        &log,
        &syslog_login("198.51.100.70", "x", NO_PID, "ForgedA1"),
    );
    append(&log, &syslog_end("x", NO_PID, "ForgedA1"));
    append(&log, &syslog_login(ip, "x", 1, "ForgedB1"));
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, ip).is_some()
    });
    let last = gone(&map, ip, PATIENCE);
    assert!(
        last <= login + 3 + 1,
        "held until {last}, past login {login} + ttl 3 s"
    );
}

/// A lone login in Dovecot's own log, its process nowhere to be seen, and no end line yet
/// from this source: ttl after the login.
#[test]
fn a_lone_login_line_expires_after_ttl() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    std::fs::write(&log, "").unwrap();
    let map = d.path().join("relay");
    let conf = config(d.path(), "3s");
    let _daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    let ip = "198.51.100.72";
    append(&log, &logpath_login(ip, "alice", NO_PID, "LoneLogin1"));
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, ip).is_some()
    });
    let last = gone(&map, ip, PATIENCE);
    assert!(
        last <= login + 3 + 1,
        "held until {last}, past login {login} + ttl 3 s"
    );
}

/// A followed Dovecot log with no process to see (another host's): a session is held
/// only once the source has tied an end line to its session; then past 3 x ttl, until its
/// own end, and `dovegate sessions` lists it and drops it on request.
#[test]
fn a_source_that_ties_end_lines_holds_its_sessions_and_sessions_drop_ends_one() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    std::fs::write(&log, "").unwrap();
    let map = d.path().join("relay");
    let conf = config(d.path(), "4s");
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    append(
        &log,
        &logpath_login("198.51.100.73", "bob", NO_PID, "TiedFirst1"),
    );
    append(&log, &logpath_end("bob", NO_PID, "TiedFirst1"));
    let ip = "198.51.100.74";
    append(&log, &logpath_login(ip, "alice", NO_PID - 1, "HeldSess1"));
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, ip).is_some()
    });
    while now() < login + 13 {
        let e = expiry(&map, ip);
        assert!(
            e.is_some_and(|e| e > now()),
            "relay lapsed while the session is held: {e:?}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = dovegate(&["sessions", "--config", &conf, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], "HeldSess1", "{v}");
    assert_eq!(v[0]["address"], ip);
    assert_eq!(v[0]["evidence"], "end-lines");
    let out = dovegate(&["sessions", "--config", &conf, "drop", "HeldSess1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dropped session HeldSess1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dropped = now();
    let last = gone(&map, ip, PATIENCE);
    assert!(last <= dropped + 4 + 1, "held until {last} after the drop");
    assert!(daemon.log().contains("dropped by the administrator"));
    let out = dovegate(&["sessions", "--config", &conf, "drop", "HeldSess1"]);
    assert_eq!(out.status.code(), Some(1), "no such session any more");
    assert_eq!(daemon.stop(), Some(0));
}

/// Defect 2: sessions saved for a source that is no longer configured are dropped at
/// start (they could never be ended by their source).
#[test]
fn sessions_of_a_source_no_longer_configured_are_dropped_at_start() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    std::fs::write(&log, "").unwrap();
    let other = d.path().join("other.log");
    std::fs::write(&other, "").unwrap();
    let conf = config(d.path(), "1h");
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    append(
        &log,
        &logpath_login("198.51.100.75", "alice", NO_PID, "Switched1"),
    );
    let sessions = d.path().join("state/checkpoints/sessions.json");
    wait_for("the session saved", PATIENCE, || {
        std::fs::read_to_string(&sessions).is_ok_and(|t| t.contains("Switched1"))
    });
    assert_eq!(daemon.stop(), Some(0));
    let mut daemon = Daemon::follow(d.path(), &other, &["--config", &conf]);
    wait_for("the dropped session logged", PATIENCE, || {
        daemon
            .log()
            .contains("sources no longer configured were dropped")
    });
    wait_for("the sessions file without it", PATIENCE, || {
        std::fs::read_to_string(&sessions).is_ok_and(|t| !t.contains("Switched1"))
    });
    assert_eq!(daemon.stop(), Some(0));
}

fn test_json(dir: &Path, lines: &str) -> Vec<serde_json::Value> {
    let f = dir.join("input.log");
    std::fs::write(&f, lines).unwrap();
    let out = dovegate(&["test", "--json", &f.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Defect 3: a proxy's own end line closes the proxied session; `dovegate test --json`
/// says which. Defect 4: an IMAP ID string naming another session's end closes nothing.
#[test]
fn test_json_tells_session_ends_and_what_they_closed() {
    let d = tempdir();
    let lines = "\
Nov 21 09:30:01 mx1 dovecot: imap-login: proxy(alice@example.org): started proxying to 10.0.0.2:143: user=<alice@example.org>, method=PLAIN, rip=203.0.113.45, lip=192.0.2.10, TLS, session=<Hc2nR7ZLbKjAAQAB>
Nov 21 09:30:02 mx1 dovecot: imap-login: proxy(alice@example.org,10.0.0.2:143): Disconnected by client: EOF (0s idle, in=10, out=20): user=<alice@example.org>, method=PLAIN, rip=203.0.113.45, lip=192.0.2.10, TLS, session=<Hc2nR7ZLbKjAAQAB>
Nov 21 09:30:03 imap-login: Info: Login: user=<bob>, method=PLAIN, rip=203.0.113.46, lip=192.0.2.10, mpid=7429, TLS, session=<VictimR7ZLbKjAAQ>
Nov 21 09:30:04 imap(mallory)<5123><MaLLoryR7ZLbKjAA>: Info: ID sent: name=x)<7429><VictimR7ZLbKjAAQ>: Info: Disconnected: Logged out
Nov 21 09:30:05 imap(bob)<7429><VictimR7ZLbKjAAQ>: Info: Disconnected: Logged out in=1 out=2
";
    let v = test_json(d.path(), lines);
    assert_eq!(v.len(), 5, "{v:?}");
    assert_eq!(v[1]["session_end"], true, "{}", v[1]);
    assert_eq!(v[1]["closed_session"], "Hc2nR7ZLbKjAAQAB");
    assert!(v[3].get("session_end").is_none(), "forged end: {}", v[3]);
    assert_eq!(v[4]["session_end"], true);
    assert_eq!(v[4]["closed_session"], "VictimR7ZLbKjAAQ");
}

/// `dovegate test --grants` follows the daemon's evidence rules: a syslog session whose
/// end is never seen is held ttl (not grant.session_hold); in Dovecot's own log that has
/// tied an end, to the hold.
#[test]
fn test_grants_uses_the_evidence_rules() {
    let d = tempdir();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, "[grant]\nttl = \"30m\"\nsession_hold = \"12h\"\n").unwrap();
    let conf = conf.display().to_string();
    let run = |name: &str, lines: &str| {
        let f = d.path().join(name);
        std::fs::write(&f, lines).unwrap();
        let out = dovegate(&[
            "test",
            "--config",
            &conf,
            "--grants",
            &f.display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let syslog = run(
        "syslog.log",
        "2026-11-21T09:30:00+00:00 mail dovecot: imap-login: Login: user=<a>, method=PLAIN, rip=203.0.113.60, lip=192.0.2.1, mpid=1, TLS, session=<SysA1>\n\
2026-11-21T09:30:01+00:00 mail dovecot: imap(a)<1><SysA1>: Disconnected: Logged out in=1 out=2\n\
2026-11-21T09:30:02+00:00 mail dovecot: imap-login: Login: user=<b>, method=PLAIN, rip=203.0.113.61, lip=192.0.2.1, mpid=2, TLS, session=<SysB1>\n",
    );
    assert!(
        syslog.contains("203.0.113.61\t1\t2026-11-21T10:00:02Z"),
        "ttl after the login:\n{syslog}"
    );
    let own = run(
        "dovecot.log",
        "2026-11-21 09:30:00 imap-login: Info: Login: user=<a>, method=PLAIN, rip=203.0.113.60, lip=192.0.2.1, mpid=1, TLS, session=<OwnA1>\n\
2026-11-21 09:30:01 imap(a)<1><OwnA1>: Info: Disconnected: Logged out in=1 out=2\n\
2026-11-21 09:30:02 imap-login: Info: Login: user=<b>, method=PLAIN, rip=203.0.113.61, lip=192.0.2.1, mpid=2, TLS, session=<OwnB1>\n",
    );
    assert!(
        own.contains("203.0.113.61\t1\t") && !own.contains("203.0.113.61\t1\t2026-11-21T10:00:02Z"),
        "held to the hold:\n{own}"
    );
}
