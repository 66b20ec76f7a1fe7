//! What the database tests share (tests/postgres.rs, tests/mysql.rs): a `dovegate
//! replica` under test, writers, and waits on their status files and maps.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{append, bin, postmap_q, postmap_s, wait_for, Daemon, PATIENCE};

/// A config sharing grants through the database whose URL is in `url` (`key`:
/// `postgres_url_file` or `mysql_url_file`); `extra` is appended.
pub fn config_with(dir: &Path, key: &str, url: &Path, extra: &str) -> PathBuf {
    let path = dir.join("dovegate.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\npoll_interval = \"100ms\"\n[store]\n{key} = \"{}\"\n{extra}",
            url.display()
        ),
    )
    .unwrap();
    path
}

/// Propagation through the database may take a reconnect backoff on top of the usual.
pub const FLEET_PATIENCE: Duration = Duration::from_secs(60);

/// A running `dovegate replica` with map `DIR/relay` and state `DIR/state`; SIGTERM on drop.
pub struct Replica {
    pub child: Child,
    pub dir: PathBuf,
}

impl Replica {
    pub fn start(dir: &Path, cfg: &Path, url: &Path) -> Replica {
        let r = Replica::spawn(dir, cfg, url);
        wait_for("replica connected", FLEET_PATIENCE, || {
            r.status()["connected"] == serde_json::Value::Bool(true)
        });
        r
    }

    /// Started, not waited for.
    pub fn spawn(dir: &Path, cfg: &Path, url: &Path) -> Replica {
        Replica::spawn_with(dir, cfg, url, &[])
    }

    /// Started with `extra` arguments, not waited for.
    pub fn spawn_with(dir: &Path, cfg: &Path, url: &Path, extra: &[&str]) -> Replica {
        std::fs::create_dir_all(dir).unwrap();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("replica.stderr"))
            .unwrap();
        let child = Command::new(bin())
            .arg("replica")
            .args(["--config", &cfg.display().to_string()])
            .args(["--url-file", &url.display().to_string()])
            .args(["--map", &dir.join("relay").display().to_string()])
            .args(["--state-dir", &dir.join("state").display().to_string()])
            .args(extra)
            .env(
                "DOVEGATE_LOG",
                std::env::var("DG_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn dovegate replica");
        Replica {
            child,
            dir: dir.to_path_buf(),
        }
    }

    pub fn map(&self) -> PathBuf {
        self.dir.join("relay")
    }

    pub fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(self.dir.join("state/replica.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("replica.stderr")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            super::signal(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// A writer `dovegate run` following `DIR/mail.log`.
pub fn writer(dir: &Path, cfg: &Path, ttl: &str) -> (Daemon, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join("mail.log");
    std::fs::write(&log, "").unwrap();
    let cfg = cfg.display().to_string();
    let d = Daemon::follow(dir, &log, &["--config", &cfg, "--ttl", ttl]);
    (d, log)
}

pub fn expiry_of(value: &str) -> i64 {
    let t = value
        .split_once("expires=")
        .map(|(_, t)| t.trim())
        .unwrap_or_else(|| panic!("no expiry in `{value}`"));
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap_or_else(|e| panic!("bad expiry `{t}`: {e}"))
        .timestamp()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn visible(map: &Path, ips: &[String]) -> bool {
    let keys: std::collections::HashSet<String> =
        postmap_s(map).into_iter().map(|(k, _)| k).collect();
    ips.iter().all(|ip| keys.contains(ip))
}

pub fn wait_visible(what: &str, map: &Path, ips: &[String]) {
    wait_for(what, FLEET_PATIENCE, || {
        let ok = visible(map, ips);
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
}

/// A writer's `fleet.json` (Null until there is one).
pub fn fleet_status(dir: &Path) -> serde_json::Value {
    std::fs::read_to_string(dir.join("state/fleet.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null)
}

pub fn wait_writer_connected(dir: &Path) {
    wait_for("writer connected", FLEET_PATIENCE, || {
        fleet_status(dir)["connected"] == serde_json::Value::Bool(true)
    });
}

/// One host of the policy test: `dovegate run` as host `name`, with its own log, map,
/// state and policy socket, sharing the database (tests/postgres.rs and tests/mysql.rs).
pub struct PolicyHost {
    pub daemon: Daemon,
    pub dir: PathBuf,
    pub cfg: PathBuf,
    pub log: PathBuf,
}

impl PolicyHost {
    /// `key`: `postgres_url_file` or `mysql_url_file`, the URL file `url`.
    pub fn start(root: &Path, name: &str, key: &str, url: &Path, caps: &str) -> PolicyHost {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("mail.log");
        std::fs::write(&log, "").unwrap();
        let cfg = dir.join("dovegate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[source]\nlogs = [\"{}\"]\npoll_interval = \"100ms\"\n[map]\npath = \"{}\"\n\
                 [state]\ndir = \"{}\"\n[store]\n{key} = \"{}\"\n\
                 [policy]\nlisten = \"{}\"\nusers = [\"root\"]\n{caps}\n",
                log.display(),
                dir.join("relay").display(),
                dir.join("state").display(),
                url.display(),
                dir.join("policy").display(),
            ),
        )
        .unwrap();
        let daemon = Daemon::start_as_host(&dir, name, &["--config", &cfg.display().to_string()]);
        wait_for("map and policy socket", PATIENCE, || {
            dir.join("relay.lmdb").exists() && dir.join("policy").exists()
        });
        daemon.wait_following(&log);
        PolicyHost {
            daemon,
            dir,
            cfg,
            log,
        }
    }

    pub fn map(&self) -> PathBuf {
        self.dir.join("relay")
    }

    pub fn login(&self, ip: &str, user: &str) {
        append(&self.log, &super::sessionless_login_line(ip, user));
    }

    /// Policy requests for client `ip` on one connection (Postfix keeps one per SMTP
    /// session: a message's end is counted where its recipients were); the answers'
    /// actions.
    pub fn ask(&self, stages: &[&str], ip: &str, instance: &str) -> Vec<String> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.join("policy")).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut answers = Vec::new();
        for stage in stages {
            write!(
                s,
                "request=smtpd_access_policy\nprotocol_state={stage}\nprotocol_name=ESMTP\n\
                 client_address={ip}\nclient_name=unknown\ninstance={instance}\nqueue_id=4Xq{instance}\n\
                 sender=a@here.example\nrecipient=b@elsewhere.example\nrecipient_count=1\n\n"
            )
            .unwrap();
            let mut line = String::new();
            if let Err(e) = r.read_line(&mut line) {
                panic!("policy answer: {e}\n{}", self.daemon.log());
            }
            let mut blank = String::new();
            r.read_line(&mut blank).unwrap();
            answers.push(line.trim().trim_start_matches("action=").to_string());
        }
        answers
    }

    /// A relayed message: one recipient, then its end.
    pub fn send(&self, ip: &str, instance: &str) {
        let answers = self.ask(&["RCPT", "END-OF-MESSAGE"], ip, instance);
        assert_eq!(answers, ["OK", "DUNNO"], "{}", self.daemon.log());
    }
}

/// Issue 22, on either database: a user's caps count on every host (two daemons as two
/// hosts sharing one database through `key` = `url`), and a user who trips one loses the
/// grants every host gave it and is let in again everywhere by one `dovegate unblock`.
/// `sql` answers a query as `psql -At` prints it (columns joined by '|', true as `t`);
/// `race_over_sql` says `t` once the database's clock is 4 s past the revoke of
/// 203.0.113.40.
pub fn caps_and_blocks_hold_across_hosts(
    root: &Path,
    key: &str,
    url: &Path,
    sql: &dyn Fn(&str) -> String,
    race_over_sql: &str,
) {
    let caps = "block_on_cap = true\nuser_messages_per_hour = 3\nuser_messages_per_day = 0\n\
                user_recipients_per_hour = 0\nuser_recipients_per_day = 0\n\
                grant_messages_per_hour = 0\ngrant_messages_per_day = 0\n\
                grant_recipients_per_hour = 0\ngrant_recipients_per_day = 0";
    let a = PolicyHost::start(root, "mx-a", key, url, caps);
    let b = PolicyHost::start(root, "mx-b", key, url, caps);
    a.login("203.0.113.40", "alice");
    b.login("203.0.113.41", "alice");
    b.login("203.0.113.43", "bob");
    for (h, ip) in [
        (&a, "203.0.113.40"),
        (&b, "203.0.113.41"),
        (&b, "203.0.113.43"),
    ] {
        wait_for(&format!("{ip} granted"), PATIENCE, || {
            postmap_q(&h.map(), ip).is_some()
        });
    }
    // Two messages on A, one on B: three, alice's cap, counted across the hosts.
    a.send("203.0.113.40", "A1");
    a.send("203.0.113.40", "A2");
    b.send("203.0.113.41", "B1");
    wait_for("every count in the database", FLEET_PATIENCE, || {
        sql("SELECT coalesce(sum(count), 0) FROM dovegate_policy_counts WHERE user_name = 'alice' AND kind = 'messages'") == "3"
    });
    assert_eq!(
        sql("SELECT host, sum(count) FROM dovegate_policy_counts WHERE user_name = 'alice' AND kind = 'messages' GROUP BY host ORDER BY host"),
        "mx-a|2\nmx-b|1"
    );
    // A learns of B's message within a round or two: its next recipient for alice is
    // deferred (the message cap is reached), and alice is blocked.
    let mut answers = Vec::new();
    wait_for("A defers alice", FLEET_PATIENCE, || {
        let r = a.ask(&["RCPT"], "203.0.113.40", "A3").remove(0);
        let done = r.starts_with("DEFER 4.7.1 sending cap user_messages_per_hour");
        answers.push(r);
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        answers.iter().all(|r| r == "OK" || r.starts_with("DEFER")),
        "{answers:?}"
    );
    // Bob is somebody else.
    b.send("203.0.113.43", "B2");
    // Alice's grants go from both hosts' maps: B revokes the one it gave.
    wait_for("A's grant revoked", FLEET_PATIENCE, || {
        postmap_q(&a.map(), "203.0.113.40").is_none()
    });
    wait_for("B's grant revoked", FLEET_PATIENCE, || {
        postmap_q(&b.map(), "203.0.113.41").is_none()
    });
    assert!(postmap_q(&b.map(), "203.0.113.43").is_some());
    assert!(
        b.daemon.log().contains("user blocked on another host"),
        "{}",
        b.daemon.log()
    );
    assert_eq!(
        sql("SELECT user_name, cap, blocked_by FROM dovegate_blocked_users"),
        "alice|user_messages_per_hour|mx-a"
    );
    // A new login of alice on B grants nothing.
    b.login("203.0.113.42", "alice");
    wait_for("the login refused on B", FLEET_PATIENCE, || {
        b.daemon
            .log()
            .contains("login of a blocked user not granted")
    });
    assert_eq!(postmap_q(&b.map(), "203.0.113.42"), None);

    // One unblock, on B: A lets alice in again too.
    let out = super::dovegate(&["unblock", "--config", &b.cfg.display().to_string(), "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("every host"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_for("A sees the unblock", FLEET_PATIENCE, || {
        a.daemon.log().contains("user unblocked on another host")
    });
    assert_eq!(sql("SELECT count(*) FROM dovegate_blocked_users"), "0");
    // A login racing the revoke is refused (a revoke wins over a renewal in flight): log
    // in again once the database's clock is past that window (in whole seconds).
    wait_for("the revoke's race window over", FLEET_PATIENCE, || {
        let past = sql(race_over_sql);
        if past != "t" {
            std::thread::sleep(Duration::from_millis(200));
        }
        past == "t"
    });
    a.login("203.0.113.40", "alice");
    wait_for("alice granted on A again", FLEET_PATIENCE, || {
        postmap_q(&a.map(), "203.0.113.40").is_some()
    });
    assert_eq!(sql("SELECT count(*) FROM dovegate_blocked_users"), "0");
}

/// A manual grant reaches the replica's log with the host that wrote it (the audit
/// columns), and a revoke is logged there too (issue 26: "another host"), on either
/// database (`key` = `url`).
pub fn replica_logs_who_granted_by_hand(root: &Path, key: &str, url: &Path) {
    let cfg = config_with(root, key, url, "");
    let wdir = root.join("w");
    let (_w, _log) = writer(&wdir, &cfg, "10m");
    wait_writer_connected(&wdir);
    let r = Replica::start(&root.join("r"), &cfg, url);
    let admin = |cmd: &str| {
        let out = super::dovegate(&[
            cmd,
            "--config",
            &cfg.display().to_string(),
            "--map",
            &wdir.join("relay").display().to_string(),
            "192.0.2.88",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    admin("grant");
    wait_visible(
        "manual grant on the replica",
        &r.map(),
        &["192.0.2.88".into()],
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let said = format!(
        "grant written by hand on host {} (dovegate grant)",
        host.trim()
    );
    wait_for("the replica names the host", FLEET_PATIENCE, || {
        r.log()
            .lines()
            .any(|l| l.contains(&said) && l.contains("192.0.2.88"))
    });
    admin("revoke");
    wait_for("the replica logs the revoke", FLEET_PATIENCE, || {
        r.log().lines().any(|l| {
            l.contains("grant removed: revoked in the database") && l.contains("192.0.2.88")
        })
    });
}

/// Watches `maps` until every grant is gone: no key but a logged address (address, login
/// time), no expiry beyond its login + `ttl`, nothing present past that (1 s of timer
/// slack), and all gone within `ttl` + PATIENCE.
pub fn watch_expiries(maps: &[PathBuf], logged: &[(String, i64)], ttl: i64) {
    let start = std::time::Instant::now();
    loop {
        let t = now();
        let mut present = 0;
        for map in maps {
            for (k, v) in postmap_s(map) {
                present += 1;
                let login = logged.iter().find(|(ip, _)| *ip == k).map(|(_, t)| *t);
                let login = login.unwrap_or_else(|| panic!("unexpected key {k}"));
                assert!(
                    expiry_of(&v) <= login + ttl + 1,
                    "{k}: {v} beyond login + ttl"
                );
                assert!(
                    t <= login + ttl + 2,
                    "{k} still present at {t}, expired at {}",
                    login + ttl
                );
            }
        }
        if present == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(ttl as u64) + PATIENCE,
            "grants never expired"
        );
        // Polling a map the daemons write: the state waited for is its emptiness.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `dovegate revoke IP` with the writer's configuration and map; it must succeed. Its
/// standard output.
pub fn revoke(cfg: &Path, map: &Path, ip: &str) -> String {
    let out = super::dovegate(&[
        "revoke",
        "--config",
        &cfg.display().to_string(),
        "--map",
        &map.display().to_string(),
        ip,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
