//! Journal mode: journal files built with systemd-journal-remote from export data holding
//! real Dovecot login messages from `dovecot.service`, and forged ones (same MESSAGE from
//! another unit, or only SYSLOG_IDENTIFIER=dovecot). Exactly the real ones are granted;
//! following, restart at the cursor, and the now - ttl start are checked too.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .replace('-', "")
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Who sent an entry, as journald would record it.
#[derive(Clone, Copy)]
enum Sender {
    /// Dovecot's log process in dovecot.service (as captured from a real journald).
    Dovecot,
    /// `logger -t dovecot` from a user session.
    LoggerInUserUnit,
    /// A sender with no unit at all, claiming Dovecot in the fields it controls.
    NoUnitClaimingDovecot,
    Postfix,
}

fn entry(sender: Sender, message: &str, at_us: u128, seq: u64) -> String {
    let mut f = vec![
        format!("__REALTIME_TIMESTAMP={at_us}"),
        format!("__MONOTONIC_TIMESTAMP={}", 1_000_000 + seq),
        format!("_BOOT_ID={}", boot_id()),
        "_HOSTNAME=vm".into(),
        "_TRANSPORT=syslog".into(),
        "PRIORITY=6".into(),
        "SYSLOG_FACILITY=2".into(),
    ];
    let fields: &[&str] = match sender {
        Sender::Dovecot => &[
            "SYSLOG_IDENTIFIER=dovecot",
            "_PID=19851",
            "_UID=0",
            "_GID=0",
            "_COMM=log",
            "_EXE=/usr/lib/dovecot/log",
            "_SYSTEMD_CGROUP=/system.slice/dovecot.service",
            "_SYSTEMD_UNIT=dovecot.service",
            "_SYSTEMD_SLICE=system.slice",
        ],
        Sender::LoggerInUserUnit => &[
            "SYSLOG_IDENTIFIER=dovecot",
            "_PID=4242",
            "_UID=1000",
            "_GID=1000",
            "_COMM=logger",
            "_EXE=/usr/bin/logger",
            "_SYSTEMD_CGROUP=/user.slice/user-1000.slice/user@1000.service/app.slice",
            "_SYSTEMD_UNIT=user@1000.service",
            "_SYSTEMD_SLICE=user-1000.slice",
        ],
        Sender::NoUnitClaimingDovecot => &[
            "SYSLOG_IDENTIFIER=dovecot",
            "UNIT=dovecot.service",
            "_PID=4343",
            "_UID=1000",
            "_GID=1000",
            "_COMM=python3",
        ],
        Sender::Postfix => &[
            "SYSLOG_IDENTIFIER=postfix/smtpd",
            "_PID=777",
            "_UID=101",
            "_GID=101",
            "_COMM=smtpd",
            "_SYSTEMD_UNIT=postfix@-.service",
        ],
    };
    f.extend(fields.iter().map(|s| s.to_string()));
    f.push(format!("MESSAGE={message}"));
    f.join("\n") + "\n\n"
}

fn login(ip: &str) -> String {
    format!("imap-login: Login: user=<alice>, method=PLAIN, rip={ip}, lip=192.0.2.10, mpid=19963, TLS, session=<8NI0YsZgbLV/AAAB>")
}

/// Appends entries to the journal file (systemd-journal-remote appends to an existing one).
fn append_journal(file: &Path, export: &str) {
    let mut child = Command::new(JOURNAL_REMOTE)
        .arg(format!("--output={}", file.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-journal-remote (package systemd-journal-remote)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(export.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "journal-remote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn first_journal(file: &Path) -> BTreeSet<String> {
    let t = now_us();
    let mut x = String::new();
    x += &entry(Sender::Postfix, "connect from unknown[192.0.2.50]", t, 1);
    x += &entry(Sender::Dovecot, &login("203.0.113.10"), t, 2);
    x += &entry(Sender::Dovecot, &login("2001:db8::10"), t, 3);
    x += &entry(Sender::LoggerInUserUnit, &login("6.6.6.1"), t, 4);
    x += &entry(Sender::NoUnitClaimingDovecot, &login("6.6.6.2"), t, 5);
    x += &entry(Sender::Dovecot, &login("127.0.0.1"), t, 6);
    x += &entry(Sender::Dovecot, &login("::ffff:198.51.100.10"), t, 7);
    x += &entry(Sender::Dovecot, "imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<x>, method=PLAIN, rip=203.0.113.99, lip=192.0.2.10, TLS", t, 8);
    append_journal(file, &x);
    ["203.0.113.10", "2001:db8::10", "198.51.100.10"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn keys(map: &Path) -> BTreeSet<String> {
    postmap_s(map).into_iter().map(|(k, _)| k).collect()
}

#[test]
fn test_command_flags_forged_entries() {
    let d = tempdir();
    let file = d.path().join("x.journal");
    let want = first_journal(&file);
    let out = dovegate(&[
        "test",
        "--json",
        "--journal-file",
        &file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut grants = BTreeSet::new();
    let mut forged = BTreeSet::new();
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        n += 1;
        assert_eq!(
            v["line"].as_u64(),
            Some(n),
            "one object per entry, in order"
        );
        if v["forged"] == true {
            forged.insert(v["ip"].as_str().unwrap().to_string());
            assert_eq!(v["matched"], true);
        } else if v["matched"] == true && v["excluded"].is_null() {
            grants.insert(v["ip"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(n, 8);
    assert_eq!(grants, want);
    assert_eq!(
        forged,
        ["6.6.6.1", "6.6.6.2"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    // The summary reports the forged entries separately.
    let out = dovegate(&["test", "--journal-file", &file.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Forged (untrusted sender): 2"), "{text}");
}

#[test]
fn run_follows_grants_only_trusted_entries_and_resumes_at_the_cursor() {
    let d = tempdir();
    let file = d.path().join("x.journal");
    let map = d.path().join("relay");
    let state = d.path().join("state");
    // An old login (two hours ago) is before now - ttl: not even read on a first start.
    let old = now_us() - 2 * 3600 * 1_000_000;
    append_journal(
        &file,
        &entry(Sender::Dovecot, &login("203.0.113.200"), old, 0),
    );
    let mut want = first_journal(&file);
    let args = [
        "--journal-file",
        &file.display().to_string(),
        "--map",
        &map.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
    ];
    let mut daemon = Daemon::start(d.path(), &args);
    wait_for("journal grants", PATIENCE, || {
        want.iter().all(|ip| postmap_q(&map, ip).is_some())
    });
    // Following: entries appended while dovegate runs.
    let t = now_us();
    append_journal(
        &file,
        &(entry(Sender::Dovecot, &login("203.0.113.11"), t, 20)
            + &entry(Sender::LoggerInUserUnit, &login("6.6.6.3"), t, 21)),
    );
    want.insert("203.0.113.11".into());
    wait_for("followed entry granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.11").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(keys(&map), want, "exactly the trusted entries");
    assert_eq!(daemon.summary("forged"), Some(3), "{}", daemon.log());
    assert_eq!(
        daemon.summary("logins"),
        Some(5),
        "the old entry was not read: {}",
        daemon.log()
    );

    // Entries written while dovegate is down are read after the restart, and only they.
    let t = now_us();
    append_journal(
        &file,
        &entry(Sender::Dovecot, &login("203.0.113.12"), t, 30),
    );
    want.insert("203.0.113.12".into());
    let mut daemon = Daemon::start(d.path(), &args);
    wait_for("entry from the downtime granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.12").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        daemon.summary("logins"),
        Some(1),
        "resumed at the cursor: {}",
        daemon.log()
    );
    assert_eq!(keys(&map), want);
    assert!(state.join("checkpoints").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("journal-")));
}

#[test]
fn unreadable_journal_is_reported() {
    let d = tempdir();
    let map = d.path().join("relay");
    let missing = d.path().join("none.journal");
    let port = free_port();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, format!("[serve]\nmetrics = \"127.0.0.1:{port}\"\n")).unwrap();
    let mut daemon = Daemon::start(
        d.path(),
        &[
            "--config",
            &conf.display().to_string(),
            "--journal-file",
            &missing.display().to_string(),
            "--map",
            &map.display().to_string(),
            "--state-dir",
            &d.path().join("s").display().to_string(),
        ],
    );
    wait_for("journalctl failure reported", PATIENCE, || {
        let log = daemon.log();
        log.contains("cannot be read") && log.contains("journalctl exited")
    });
    // The metrics show it too (the daemon's STATUS= line says "cannot read").
    let gauge = format!(
        "dovegate_source_reading{{source=\"file:{}\"}} 0\n",
        missing.display()
    );
    wait_for("journal not reading, in the metrics", PATIENCE, || {
        metrics(port).contains(&gauge)
    });
    assert_eq!(daemon.stop(), Some(0));
}

/// A source that cannot go on (here: no journalctl to run) ends the daemon with a non-zero
/// status and says why, so that systemd's `Restart=on-failure` acts; grants already read
/// are committed first, as on SIGTERM.
#[test]
fn a_dead_source_ends_the_daemon_with_failure() {
    let d = tempdir();
    let map = d.path().join("relay");
    let child = Command::new(bin())
        .args([
            "run",
            "--journal-dir",
            &d.path().display().to_string(),
            "--map",
            &map.display().to_string(),
            "--state-dir",
            &d.path().join("s").display().to_string(),
        ])
        // No journalctl on this PATH.
        .env("PATH", d.path().join("empty-bin"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child,
        stderr: d.path().join("unused"),
    };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = daemon.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "dovegate kept running without its source"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut daemon.child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("died") && err.contains("journalctl"), "{err}");
}

/// journalctl that keeps exiting (here: a journal file that does not exist) is never
/// reported healthy: after `source.journal_give_up` the daemon exits 1, naming it, so that
/// systemd restarts it and `systemctl status` shows why.
#[test]
fn a_journal_that_keeps_failing_ends_the_daemon_with_failure() {
    let d = tempdir();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, "[source]\njournal_give_up = \"2s\"\n").unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--config",
            &conf.display().to_string(),
            "--journal-file",
            &d.path().join("missing.journal").display().to_string(),
            "--map",
            &d.path().join("relay").display().to_string(),
            "--state-dir",
            &d.path().join("s").display().to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("journalctl has kept exiting"), "{err}");
}
