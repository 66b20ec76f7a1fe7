//! End to end with a real Dovecot: real IMAP and POP3 logins (loopback, and public IPv4
//! and IPv6 clients forwarded through login_trusted_networks), failed and aborted ones,
//! while `dovegate run` follows Dovecot's own log file, or rsyslog's traditional and
//! RFC 3339 files. The map must hold exactly the successful public clients, and
//! `dovegate test` on the same log must report the same logins.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::dovecot::*;
use common::*;

/// Stops what the test started, whatever happens.
struct Cleanup(Vec<Vec<String>>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in self.0.iter().rev() {
            let _ = Command::new(support("dovecot.sh")).args(args).output();
        }
    }
}

fn wait_for_all_lines(log: &Path) {
    wait_for("Dovecot logged the failures", PATIENCE, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.matches("auth failed").count() >= 3 && text.matches("no auth attempts").count() >= 2
    });
}

fn test_cmd_grants(log: &Path) -> (BTreeSet<String>, usize) {
    let out = dovegate(&["test", "--json", &log.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut grants = BTreeSet::new();
    let mut matched = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        if v["matched"] == true {
            matched += 1;
            if v["excluded"].is_null() {
                grants.insert(v["ip"].as_str().unwrap().to_string());
            }
        }
    }
    (grants, matched)
}

fn check(map: &Path, log: &Path, want: &Expected, daemon: &mut Daemon) {
    for ip in &want.granted {
        wait_for(
            &format!("grant for {ip} from {}", log.display()),
            PATIENCE,
            || postmap_q(map, ip).is_some(),
        );
    }
    wait_for_all_lines(log);
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        map_keys(map),
        want.granted,
        "map holds exactly the successful public clients ({})",
        log.display()
    );
    for ip in &want.refused {
        assert_eq!(postmap_q(map, ip), None, "{ip} must not be granted");
    }
    let (grants, matched) = test_cmd_grants(log);
    assert_eq!(
        grants, want.granted,
        "dovegate test reports the same logins"
    );
    assert_eq!(
        matched,
        want.granted.len() + 4,
        "4 loopback logins matched but excluded"
    );
}

/// A short traversable directory (Dovecot's socket paths are limited), its `dv`
/// subdirectory for the harness, and that path as text.
fn rig() -> (tempfile::TempDir, PathBuf, String) {
    let d = tempfile::Builder::new()
        .prefix("dgd")
        .tempdir_in("/tmp")
        .unwrap();
    set_mode(d.path(), 0o755);
    let dv = d.path().join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    let dvs = dv.display().to_string();
    (d, dv, dvs)
}

#[test]
fn dovecot_log_path_file() {
    let (d, dv, dvs) = rig();
    let log = dv.join("dovecot.log");
    let map = d.path().join("relay");
    // dovegate starts first: the log does not exist yet.
    let mut daemon = Daemon::follow(d.path(), &log, &[]);
    let _cleanup = Cleanup(vec![vec!["down".into(), dvs.clone()]]);
    harness(
        &["up", &dvs, "file", &dovecot_ports(11143).to_string()],
        &[],
    );
    let want = run_logins(dovecot_ports(11143));
    assert_eq!(want.granted.len(), 5);
    check(&map, &log, &want, &mut daemon);
}

#[test]
fn rsyslog_traditional_and_rfc3339() {
    let (d, dv, dvs) = rig();
    let _cleanup = Cleanup(vec![
        vec!["rsyslog-down".into(), dvs.clone()],
        vec!["down".into(), dvs.clone()],
    ]);
    harness(&["rsyslog-up", &dvs], &[]);
    let mut daemons = Vec::new();
    for (name, file) in [("trad", "traditional.log"), ("rfc", "rfc3339.log")] {
        let log = dv.join("syslog").join(file);
        let map = d.path().join(format!("relay-{name}"));
        let daemon = Daemon::start(
            d.path(),
            &[
                "--log",
                &log.display().to_string(),
                "--map",
                &map.display().to_string(),
                "--state-dir",
                &d.path().join(format!("state-{name}")).display().to_string(),
            ],
        );
        daemon.wait_following(&log);
        daemons.push((log, map, daemon));
    }
    harness(
        &["up", &dvs, "syslog", &dovecot_ports(12143).to_string()],
        &[],
    );
    let want = run_logins(dovecot_ports(12143));
    for (log, map, daemon) in &mut daemons {
        check(map, log, &want, daemon);
    }
    let trad = std::fs::read_to_string(&daemons[0].0).unwrap();
    let rfc = std::fs::read_to_string(&daemons[1].0).unwrap();
    assert!(
        trad.lines()
            .any(|l| l.contains(" dovecot: imap-login: Login: ")),
        "{trad}"
    );
    assert!(rfc.starts_with("20") && rfc.contains("T"), "{rfc}");
}

#[test]
fn real_journald_trusts_only_dovecot_service() {
    let (d, dv, dvs) = rig();
    let _cleanup = Cleanup(vec![
        vec!["journald-down".into(), dvs.clone()],
        vec!["cgroup-down".into(), dvs.clone()],
        vec!["down".into(), dvs.clone()],
    ]);
    harness(&["journald-up", &dvs], &[]);
    let cg = Command::new(support("dovecot.sh"))
        .args(["cgroup-up", &dvs])
        .output()
        .unwrap();
    let cgroup = String::from_utf8_lossy(&cg.stdout).trim().to_string();
    if !cg.status.success() || cgroup.is_empty() {
        eprintln!("no writable cgroup2 on this machine: journald cannot stamp _SYSTEMD_UNIT; real-journald check skipped (journal files cover provenance)");
        return;
    }
    let sock = dv.join("journal/sock/dev-log").display().to_string();
    let jdir = dv.join("journal/runlog/journal");
    let map = d.path().join("relay");
    let mut daemon = Daemon::with_map(d.path(), &["--journal-dir", &jdir.display().to_string()]);
    harness(
        &["up", &dvs, "syslog", &dovecot_ports(13143).to_string()],
        &[("DG_SYSLOG_SOCK", &sock), ("DG_CGROUP", &cgroup)],
    );
    let want = run_logins(dovecot_ports(13143));
    // A local user forges a Dovecot line through syslog, as `logger -t dovecot` does.
    let forged = Command::new("logger")
        .args(["--socket-errors=on", "-u", &sock, "-t", "dovecot"])
        .arg("imap-login: Login: user=<mallory>, method=PLAIN, rip=203.0.113.250, lip=127.0.0.1, mpid=1, secured, session=<forged>")
        .status()
        .unwrap();
    assert!(forged.success());
    for ip in &want.granted {
        wait_for(&format!("journal grant for {ip}"), PATIENCE, || {
            postmap_q(&map, ip).is_some()
        });
    }
    wait_for("Dovecot logged the failures", PATIENCE, || {
        let out = Command::new("journalctl")
            .args(["-D", &jdir.display().to_string(), "-o", "cat", "--no-pager"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.matches("auth failed").count() >= 3
            && text.matches("no auth attempts").count() >= 2
            && text.contains("session=<forged>")
    });
    // The forged entry came last: once the daemon has judged it, it has read the rest.
    wait_for("the forged entry judged", PATIENCE, || {
        daemon.log().contains("forged Dovecot login entries")
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        map_keys(&map),
        want.granted,
        "exactly the real public logins"
    );
    assert_eq!(
        postmap_q(&map, "203.0.113.250"),
        None,
        "the forged entry grants nothing"
    );
    assert!(
        daemon.summary("forged").unwrap_or(0) >= 1,
        "{}",
        daemon.log()
    );
}
