//! `dovegate status` on a first day: sources that are missing or not files, the journal
//! without a cursor, the fleet status files (fresh and stale), open sessions; text and JSON.

mod common;

use common::*;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn shows_sources_fleet_and_sessions() {
    let d = tempdir();
    let missing = d.path().join("no-such.log");
    let dir_log = d.path().join("a-directory");
    std::fs::create_dir(&dir_log).unwrap();
    let state = d.path().join("state");
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}, {:?}]\njournal = true\n[grant]\nsession_hold = \"1h\"\n[map]\npath = {:?}\n[state]\ndir = {:?}\n",
            missing.display().to_string(),
            dir_log.display().to_string(),
            d.path().join("relay").display().to_string(),
            state.display().to_string()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let out = dovegate(&["init", "--config", &conf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = now();
    std::fs::write(
        state.join("fleet.json"),
        serde_json::json!({
            "database": "postgresql://db.example:5432/mail",
            "connected": false,
            "disconnected_since": t - 300,
            "last_error": "connection refused",
            "last_commit": t - 400,
            "queue_len": 3,
            "queue_max": 100000,
            "queue_file": "",
            "spilled_total": 3,
            "replayed_total": 0,
            "updated": t - 120,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        state.join("replica.json"),
        serde_json::json!({
            "database": "postgresql://db.example:5432/mail",
            "map": "",
            "connected": true,
            "disconnected_since": null,
            "last_error": null,
            "last_snapshot": t - 60,
            "last_snapshot_grants": 7,
            "snapshots": 1,
            "last_change": t - 1,
            "lag_secs": 0.25,
            "changes_applied": 4,
            "grants": 7,
            "updated": t,
        })
        .to_string(),
    )
    .unwrap();
    // Where the daemon saves its sessions: beside the checkpoints (status once looked in
    // the state directory itself and never showed any).
    std::fs::create_dir_all(state.join("checkpoints")).unwrap();
    std::fs::write(
        state.join("checkpoints/sessions.json"),
        serde_json::json!([{
            "id": "abcdEFGH1234", "ip": "192.0.2.44", "pid": 4242, "login": t - 30, "renewed": t - 30,
            "user": "alice", "source": "/var/log/mail.log", "trusted": false, "evidence": "process", "checked": t - 5
        }])
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        state.join("checkpoints/session-stats.json"),
        serde_json::json!({
            "open_by_evidence": {"none": 0, "process": 1, "doveadm-who": 0, "end-lines": 0, "pushed": 0},
            "released_no_evidence": 3, "released_hold": 1, "dropped": 2
        })
        .to_string(),
    )
    .unwrap();

    let out = dovegate(&["status", "--config", &conf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "daemon: none holds the map".to_string(),
        format!(
            "file {}: log file {} does not exist (yet)",
            missing.display(),
            missing.display()
        ),
        format!("file {}: ", dir_log.display()),
        "journal system: no cursor saved yet".to_string(),
        "database postgresql://db.example:5432/mail: UNREACHABLE since ".to_string(),
        "(connection refused); spill queue 3/100000".to_string(),
        "replica of postgresql://db.example:5432/mail: current, last snapshot ".to_string(),
        "sessions: 1 open".to_string(),
        "192.0.2.44 session abcdEFGH1234 user=alice since ".to_string(),
        ", evidence process, held at most until ".to_string(),
        "by evidence: 1 process; released for lack of evidence: 3, at the hold: 1, dropped: 2"
            .to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains("not a regular file") || text.contains("directory"),
        "{text}"
    );
    assert!(err.contains("fleet.json was last updated"), "{err}");
    assert!(!err.contains("replica.json was last updated"), "{err}");

    let out = dovegate(&["status", "--config", &conf, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["running"], false);
    assert_eq!(v["files"][0]["state"], "missing");
    assert_eq!(v["files"][0]["configured"], true);
    assert!(v["files"][0]["generations"].as_array().unwrap().is_empty());
    assert_eq!(v["files"][1]["state"], "not-regular");
    assert_eq!(v["journals"][0]["journal"], "system");
    assert!(v["journals"][0]["cursor"].is_null());
    assert_eq!(v["database"]["connected"], false);
    assert_eq!(v["database"]["queue_len"], 3);
    assert_eq!(v["database"]["stale_file"], true);
    assert_eq!(v["replica"]["connected"], true);
    assert_eq!(v["replica"]["stale_file"], false);
    assert_eq!(v["sessions"][0]["ip"], "192.0.2.44");
    assert_eq!(v["sessions"][0]["evidence"], "process");
    assert_eq!(v["sessions"][0]["user"], "alice");
    // The hold: the session's login + grant.session_hold (1h here).
    let hold = v["sessions"][0]["hold_until"].as_str().unwrap();
    let at = |f: &str| {
        chrono::DateTime::parse_from_rfc3339(v["sessions"][0][f].as_str().unwrap())
            .unwrap()
            .timestamp()
    };
    assert_eq!(at("hold_until") - at("login"), 3600);
    assert!(
        text.contains(&format!("held at most until {hold}")),
        "{text}"
    );
    assert_eq!(v["session_stats"]["released_no_evidence"], 3);
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1);
}

/// A followed file's checkpoint is shown as named generations (`{inode, offset}`).
#[test]
fn checkpoint_generations_are_named() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let mut daemon = Daemon::follow(d.path(), &log, &[]);
    append(&log, &login_line("192.0.2.61", "dora"));
    let map = d.path().join("relay");
    wait_for("grant", PATIENCE, || {
        postmap_q(&map, "192.0.2.61").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    let (map, state, logp) = (
        map.display().to_string(),
        d.path().join("state").display().to_string(),
        log.display().to_string(),
    );
    let out = dovegate(&["status", "--map", &map, "--state-dir", &state, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // No --log on status: the file is known from its checkpoint only.
    let f = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == logp.as_str())
        .expect("checkpointed file listed");
    let size = std::fs::metadata(&log).unwrap().len();
    assert_eq!(f["generations"][0]["offset"], size);
    assert!(f["generations"][0]["inode"].as_u64().unwrap() > 0);
    assert_eq!(f["behind_bytes"], 0);
    assert_eq!(f["state"], "readable");
}

/// Issue 26: a log this process (root) can read but the daemon's user cannot is
/// `unreadable` in status, with the fix, as check-config says it.
#[test]
fn readability_is_checked_as_the_service_user() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    append(&log, "x\n");
    set_mode(&log, 0o600);
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\njournal = false\n[map]\npath = {:?}\n[state]\ndir = {:?}\n",
            log.display().to_string(),
            d.path().join("relay").display().to_string(),
            d.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    assert!(dovegate(&["init", "--config", &conf]).status.success());
    let out = dovegate(&["status", "--config", &conf, "--user", "nobody", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["user"], "nobody");
    assert_eq!(v["files"][0]["state"], "unreadable", "{v}");
    let problem = v["files"][0]["problem"].as_str().unwrap();
    assert!(
        problem.contains("is not readable by user nobody"),
        "{problem}"
    );
    set_mode(&log, 0o644);
    let out = dovegate(&["status", "--config", &conf, "--user", "nobody"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("file {}: readable, 2 bytes", log.display())),
        "{text}"
    );
    let out = dovegate(&["status", "--config", &conf, "--user", "no-such-user-dg"]);
    assert_eq!(out.status.code(), Some(2));
}
