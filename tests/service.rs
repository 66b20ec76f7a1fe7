//! Running as a service: SIGHUP reloads the configuration (sources, exclusions, ttl)
//! without losing grants or position, and refuses a bad one while the old one keeps
//! running; SIGTERM commits what was read and exits 0.

mod common;

use std::path::Path;

use common::*;

fn config(dir: &Path, logs: &[&Path], exclude: &[&str]) -> String {
    let logs: Vec<String> = logs
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let exclude: Vec<String> = exclude.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "[source]\nlogs = [{}]\nsyslog_idents = [\"dovecot\"]\nmax_line_bytes = 16384\npoll_interval = \"1s\"\n\
         journal = false\njournal_units = [\"dovecot.service\"]\njournal_comms = []\njournal_exes = []\njournal_uids = []\n\
         [patterns]\ndir = \"\"\nservices = [\"imap\", \"pop3\"]\nenable = []\n\
         [grant]\nttl = \"1h\"\nexclude = [{}]\nexclude_mynetworks = false\n\
         [map]\npath = {:?}\naction = \"OK\"\ncommit_interval = \"250ms\"\n\
         [state]\ndir = {:?}\n",
        logs.join(", "),
        exclude.join(", "),
        dir.join("relay").display().to_string(),
        dir.join("state").display().to_string()
    )
}

#[test]
fn sighup_reloads_and_refuses_a_bad_config() {
    let d = tempdir();
    let (a, b) = (d.path().join("a.log"), d.path().join("b.log"));
    let map = d.path().join("relay");
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, config(d.path(), &[&a], &[])).unwrap();
    let out = dovegate(&["check-config", "--config", &conf.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut daemon = Daemon::start(d.path(), &["--config", &conf.display().to_string()]);
    append(&a, &login_line("203.0.113.1", "a"));
    wait_for("grant from a.log", PATIENCE, || {
        postmap_q(&map, "203.0.113.1").is_some()
    });

    // New sources and exclusions.
    std::fs::write(&conf, config(d.path(), &[&a, &b], &["198.51.100.0/24"])).unwrap();
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("reloaded", PATIENCE, || {
        daemon.log().contains("configuration reloaded")
    });
    append(&b, &login_line("203.0.113.2", "b"));
    append(&b, &login_line("198.51.100.2", "b"));
    append(&a, &login_line("203.0.113.3", "a"));
    wait_for("grants after reload", PATIENCE, || {
        postmap_q(&map, "203.0.113.2").is_some() && postmap_q(&map, "203.0.113.3").is_some()
    });
    assert_eq!(
        postmap_q(&map, "198.51.100.2"),
        None,
        "newly excluded network"
    );
    assert!(
        postmap_q(&map, "203.0.113.1").is_some(),
        "grants survive a reload"
    );

    // A bad configuration is refused; the running one keeps working.
    std::fs::write(&conf, "[grant]\nttl = \"soon\"\n").unwrap();
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("refused", PATIENCE, || {
        daemon.log().contains("reload refused")
    });
    append(&b, &login_line("203.0.113.4", "b"));
    wait_for("still running", PATIENCE, || {
        postmap_q(&map, "203.0.113.4").is_some()
    });

    assert_eq!(daemon.stop(), Some(0));
    // Each login line was read once: a.log was not read again from its start after the
    // reload (the new sources resumed at the committed checkpoints).
    assert_eq!(daemon.summary("logins"), Some(5), "{}", daemon.log());
}
