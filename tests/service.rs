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

/// A loopback address with a port nobody listens on right now.
fn free_local_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_and_status() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let addr = free_local_addr();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[map]\npath = {:?}\n[state]\ndir = {:?}\n[serve]\nmetrics = {addr:?}\n",
            log.display().to_string(),
            d.path().join("relay").display().to_string(),
            d.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(&log, "").unwrap();
    let mut daemon = Daemon::start(d.path(), &["--config", &conf.display().to_string()]);
    append(&log, &login_line("203.0.113.9", "a"));
    append(&log, &login_line("127.0.0.1", "webmail"));
    let map = d.path().join("relay");
    wait_for("grant", PATIENCE, || {
        postmap_q(&map, "203.0.113.9").is_some()
    });
    // The engine's counters reach the endpoint at its next heartbeat.
    wait_for("metrics", PATIENCE, || {
        http_get(&addr, "/metrics").contains("dovegate_map_commits_total 1")
    });
    // The fleet gauges come from the status files a PostgreSQL writer and a replica leave.
    let state = d.path().join("state");
    std::fs::write(
        state.join("fleet.json"),
        r#"{"database":"postgresql://db:5432/mail","connected":false,"disconnected_since":1,"last_error":"refused","last_commit":null,"queue_len":5,"queue_max":9,"queue_file":"","spilled_total":5,"replayed_total":0,"updated":2}"#,
    )
    .unwrap();
    std::fs::write(
        state.join("replica.json"),
        r#"{"database":"postgresql://db:5432/mail","map":"","connected":true,"disconnected_since":null,"last_error":null,"last_snapshot":1795000000,"last_snapshot_grants":1,"snapshots":1,"last_change":null,"lag_secs":0.5,"changes_applied":0,"grants":1,"updated":2}"#,
    )
    .unwrap();
    let m = http_get(&addr, "/metrics");
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
    for want in [
        "dovegate_fleet_connected 0",
        "dovegate_fleet_spill_queue_grants 5",
        "dovegate_replica_connected 1",
        "dovegate_replica_lag_seconds 0.5",
        "dovegate_replica_last_snapshot_timestamp_seconds 1795000000",
    ] {
        assert!(m.contains(want), "missing {want}:\n{m}");
    }
    let src = log.display().to_string();
    for want in [
        format!("dovegate_lines_read_total{{source=\"{src}\"}} 2"),
        format!("dovegate_logins_matched_total{{source=\"{src}\",pattern=\"dovecot-2.2\"}} 2"),
        "dovegate_grants_active 1".to_string(),
        "dovegate_logins_excluded_total 1".to_string(),
        "dovegate_map_commit_seconds_count 1".to_string(),
        // The granted login names an IMAP session (session=<...>): it holds the grant.
        "dovegate_sessions_open 1".to_string(),
        // A syslog line with nothing to show the session open (issue 19): held ttl only.
        "dovegate_sessions_open_by_evidence{evidence=\"none\"} 1".to_string(),
        "dovegate_sessions_released_no_evidence_total 0".to_string(),
        format!("dovegate_checkpoint_lag_bytes{{path=\"{src}\"}} 0"),
    ] {
        assert!(m.contains(&want), "missing {want}:\n{m}");
    }
    assert!(http_get(&addr, "/").starts_with("HTTP/1.0 404"));
    promtool_accepts(d.path(), &m);

    let out = dovegate(&["status", "--config", &conf.display().to_string(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["map"]["grants"], 1);
    assert_eq!(v["files"][0]["path"], src);
    assert_eq!(v["files"][0]["behind_bytes"], 0);
    let out = dovegate(&["status", "--config", &conf.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 grant(s)") && text.contains("0 bytes behind"),
        "{text}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// When accept fails (EMFILE: out of file descriptors) the metrics listener backs off and
/// says so, instead of spinning on the error, and says when it accepts again.
#[test]
fn metrics_accept_backs_off_when_out_of_descriptors() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    std::fs::write(&log, "").unwrap();
    let addr = free_local_addr();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, format!("[serve]\nmetrics = {addr:?}\n")).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf.display().to_string()]);
    wait_for("metrics", PATIENCE, || {
        http_get(&addr, "/metrics").contains("dovegate_grants_active")
    });
    // Leave the daemon two descriptors to spare, then hold more connections than that.
    let pid = daemon.child.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:", open + 2);
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .unwrap();
    assert!(st.success());
    let held: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    wait_for("the accept error reported", PATIENCE, || {
        daemon
            .log()
            .contains("cannot accept connections; backing off")
    });
    drop(held);
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:"])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for("accepting again", PATIENCE, || {
        http_get(&addr, "/metrics");
        daemon
            .log()
            .contains("metrics: accepting connections again")
    });
    assert!(http_get(&addr, "/metrics").contains("dovegate_grants_active"));
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

/// The whole scrape must parse with Prometheus's own parser (`promtool check metrics`,
/// Debian package `prometheus`, installed by `scripts/deps test`): one bad line and
/// Prometheus rejects every sample of the scrape.
fn promtool_accepts(dir: &Path, response: &str) {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .expect("HTTP body");
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(
            std::fs::File::open({
                let f = dir.join("scrape.txt");
                std::fs::write(&f, body).unwrap();
                f
            })
            .unwrap(),
        )
        .output()
        .expect("promtool (Debian package prometheus; run scripts/deps test)");
    assert!(
        out.status.success(),
        "promtool rejects the scrape: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// systemd's side of `Type=notify`, played by a datagram socket.
#[test]
fn speaks_sd_notify() {
    use std::os::unix::net::UnixDatagram;
    let d = tempdir();
    let sock_path = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let log = d.path().join("mail.log");
    std::fs::write(&log, "").unwrap();
    let child = std::process::Command::new(bin())
        .args([
            "run",
            "--log",
            &log.display().to_string(),
            "--map",
            &d.path().join("relay").display().to_string(),
            "--state-dir",
            &d.path().join("state").display().to_string(),
        ])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child,
        stderr: d.path().join("none"),
    };
    let mut seen = String::new();
    let recv_until = |what: &str, seen: &mut String| {
        let start = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        while !seen.contains(what) {
            assert!(start.elapsed() < PATIENCE, "no {what} in: {seen}");
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
        }
    };
    recv_until("READY=1", &mut seen);
    assert!(
        seen.contains("STATUS=0 grants active, 0 lines read"),
        "{seen}"
    );
    append(&log, &login_line("203.0.113.40", "n"));
    // Heartbeats: WATCHDOG=1 and a STATUS with the lines read.
    recv_until("WATCHDOG=1", &mut seen);
    recv_until("STATUS=1 grants active, 1 lines read", &mut seen);
    signal(daemon.child.id(), libc::SIGHUP);
    recv_until("RELOADING=1", &mut seen);
    assert!(seen.contains("MONOTONIC_USEC="), "{seen}");
    signal(daemon.child.id(), libc::SIGTERM);
    recv_until("STOPPING=1", &mut seen);
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
