//! The daemon never grants nothing in silence: a log it cannot read is reported while it
//! lasts (naming the fix), and when it clears.

mod common;

use common::*;

#[test]
fn a_missing_log_is_said_until_it_appears() {
    let d = tempdir();
    let log = d.path().join("later.log");
    let mut daemon = Daemon::follow(d.path(), &log, &[]);
    wait_for("missing log reported", PATIENCE, || {
        daemon.log().contains("no logins can be read") && daemon.log().contains("later.log")
    });
    append(&log, &login_line("198.51.100.31", "u"));
    let map = d.path().join("relay");
    wait_for("grant once the log exists", PATIENCE, || {
        postmap_q(&map, "198.51.100.31").is_some()
    });
    assert!(daemon.log().contains("readable again"), "{}", daemon.log());
    assert_eq!(daemon.stop(), Some(0));
}

/// As an unprivileged user (the service's), a log it may not read is named with its owner,
/// mode and the fix; once readable, logins grant.
#[test]
fn an_unreadable_log_names_the_fix_for_an_unprivileged_daemon() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    append(&log, "");
    set_mode(&log, 0o600);
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let chown = |p: &std::path::Path| {
        assert!(std::process::Command::new("chown")
            .args(["nobody", &p.display().to_string()])
            .status()
            .unwrap()
            .success());
    };
    chown(&state);
    chown(d.path());
    let map = d.path().join("relay");
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(bin())
        .uid(65534)
        .gid(65534)
        .args(["run", "--log"])
        .arg(&log)
        .arg("--map")
        .arg(&map)
        .arg("--state-dir")
        .arg(&state)
        .env("DOVEGATE_LOG", "info")
        .stderr(std::fs::File::create(d.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            signal(self.0, libc::SIGTERM);
        }
    }
    let _stop = Stop(child.id());
    let err = || std::fs::read_to_string(d.path().join("err")).unwrap_or_default();
    wait_for("unreadable log reported", PATIENCE, || {
        err().contains("no logins can be read") && err().contains("0600")
    });
    assert!(err().contains("journal"), "{}", err());
    set_mode(&log, 0o644);
    append(&log, &login_line("198.51.100.32", "u"));
    wait_for("grant once readable", PATIENCE, || {
        postmap_q(&map, "198.51.100.32").is_some()
    });
    signal(child.id(), libc::SIGTERM);
    let st = child.wait().unwrap();
    assert!(st.success(), "{}", err());
}

/// The audit trail: one INFO line per new grant (with who logged in, how, from which
/// source), per expiry, and per change another writer made (`dovegate grant`, `revoke`);
/// the text itself names the address (and user, protocol, expiry): `journalctl -u
/// dovegate` shows the message, not the fields.
#[test]
fn grants_expiries_and_manual_changes_are_in_the_log() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let map = d.path().join("relay");
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "2s"]);
    append(&log, &sessionless_login_line("198.51.100.50", "audit-user"));
    wait_for("the grant in the log", PATIENCE, || {
        let l = daemon.log();
        l.contains("grant 198.51.100.50 user=audit-user imap until 20")
            && l.contains("address=198.51.100.50 user=audit-user protocol=imap")
            && l.contains(&format!("source={}", log.display()))
    });
    wait_for("the expiry in the log", PATIENCE, || {
        daemon.log().contains("grant expired 198.51.100.50")
    });
    let m = map.display().to_string();
    assert!(
        dovegate(&["grant", "--map", &m, "--ttl", "2s", "198.51.100.51"])
            .status
            .success()
    );
    wait_for("a manual grant in the daemon's log", PATIENCE, || {
        let l = daemon.log();
        l.contains("grant 198.51.100.51 until 20")
            && l.contains("written by hand on this host (dovegate grant)")
    });
    assert!(dovegate(&["revoke", "--map", &m, "198.51.100.51"])
        .status
        .success());
    wait_for("a manual revoke in the daemon's log", PATIENCE, || {
        daemon
            .log()
            .contains("grant 198.51.100.51 removed outside the daemon")
    });
    assert_eq!(daemon.stop(), Some(0));
}

/// A log path that turns into a FIFO while the file it named (renamed away) and another
/// configured log still deliver logins: the warning names the path and what still works,
/// never "no logins can be read" (issue 26).
#[test]
fn an_unusable_path_says_what_still_delivers_logins() {
    let d = tempdir();
    let (a, b) = (d.path().join("a.log"), d.path().join("b.log"));
    append(&a, "");
    append(&b, "");
    let (sa, sb) = (a.display().to_string(), b.display().to_string());
    let mut daemon = Daemon::with_map(d.path(), &["--log", &sa, "--log", &sb]);
    let map = d.path().join("relay");
    append(&a, &login_line("198.51.100.40", "u"));
    wait_for("first grant", PATIENCE, || {
        postmap_q(&map, "198.51.100.40").is_some()
    });
    let rotated = d.path().join("a.log.1");
    std::fs::rename(&a, &rotated).unwrap();
    let fifo = std::ffi::CString::new(sa.clone()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    wait_for("the FIFO reported", PATIENCE, || {
        daemon.log().contains("is a FIFO")
    });
    // A writer that has not reopened still appends to the renamed file; b.log works.
    append(&rotated, &login_line("198.51.100.41", "u"));
    append(&b, &login_line("198.51.100.42", "u"));
    wait_for("both still granted", PATIENCE, || {
        postmap_q(&map, "198.51.100.41").is_some() && postmap_q(&map, "198.51.100.42").is_some()
    });
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("is a FIFO"))
        .expect("the warning");
    assert!(!log.contains("no logins can be read"), "{log}");
    assert!(
        line.contains(&format!("new logins cannot be read from {sa}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("the file {sa} named before")),
        "{line}"
    );
    assert!(line.contains(&format!("log file {sb}")), "{line}");
    assert_eq!(daemon.stop(), Some(0));
}

/// The metrics say which log cannot be read (0) and when it can (1); a reload while it
/// cannot says it again, and leaves no stale alarm once the file exists.
#[test]
fn the_metrics_show_a_log_that_cannot_be_read_across_a_reload() {
    let d = tempdir();
    let log = d.path().join("later.log");
    let port = free_port();
    let cfg = d.path().join("dovegate.toml");
    std::fs::write(&cfg, format!("[serve]\nmetrics = \"127.0.0.1:{port}\"\n")).unwrap();
    let cfg = cfg.display().to_string();
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &cfg]);
    let gauge = |v: u8| {
        format!(
            "dovegate_source_reading{{source=\"{}\"}} {v}\n",
            log.display()
        )
    };
    wait_for("the unreadable log in the metrics", PATIENCE, || {
        metrics(port).contains(&gauge(0))
    });
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("the reload", PATIENCE, || {
        daemon.log().contains("configuration reloaded")
    });
    wait_for(
        "the unreadable log said again after the reload",
        PATIENCE,
        || {
            daemon.log().matches("no logins can be read").count() >= 2
                && metrics(port).contains(&gauge(0))
        },
    );
    append(&log, "");
    wait_for("the log readable in the metrics", PATIENCE, || {
        metrics(port).contains(&gauge(1))
    });
    assert_eq!(daemon.stop(), Some(0));
}
