//! Grants shared through a real PostgreSQL 15 server: writer dovegates (`dovegate run`
//! with `[store] postgres_url_file`), replicas (`dovegate replica`) judged by Postfix's
//! `postmap -q lmdb:`, the direct `pgsql:` query judged by `postmap -q pgsql:`.

mod common;
#[path = "support/pg.rs"]
mod pg;
#[path = "support/tls.rs"]
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::*;
use common::{append, bin, login_line, postmap_q, postmap_s, scrape, wait_for, Daemon, PATIENCE};
use pg::Pg;

/// A config sharing grants through PostgreSQL at `url`; `extra` is appended.
fn config(dir: &Path, url: &Path, extra: &str) -> PathBuf {
    common::fleet::config_with(dir, "postgres_url_file", url, extra)
}

/// A writer in `ROOT/w` following `ROOT/w/mail.log`, whose clock is 10 minutes slow
/// (`DOVEGATE_TEST_CLOCK_OFFSET_SECS`); the daemon, its directory and its log.
fn slow_writer(root: &Path, cfg: &Path) -> (Daemon, PathBuf, PathBuf) {
    let wdir = root.join("w");
    std::fs::create_dir_all(&wdir).unwrap();
    let log = wdir.join("mail.log");
    std::fs::write(&log, "").unwrap();
    let stderr = wdir.join("writer.stderr");
    let child = Command::new(bin())
        .arg("run")
        .args(["--map", &wdir.join("relay").display().to_string()])
        .args(["--state-dir", &wdir.join("state").display().to_string()])
        .args(["--log", &log.display().to_string()])
        .args(["--config", &cfg.display().to_string(), "--ttl", "10m"])
        .env("DOVEGATE_TEST_CLOCK_OFFSET_SECS", "-600")
        .env("DOVEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    (common::Daemon { child, stderr }, wdir, log)
}

#[test]
fn two_writers_two_replicas_snapshot_kill_and_revoke() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w1, log1) = writer(&tmp.path().join("w1"), &cfg, "10m");
    let (_w2, log2) = writer(&tmp.path().join("w2"), &cfg, "10m");
    let mut r1 = Replica::start(&tmp.path().join("r1"), &cfg, &url);

    // Every login on either writer reaches the replica.
    let mut ips = Vec::new();
    for i in 1..=10 {
        let (a, b) = (format!("192.0.2.{i}"), format!("2001:db8:2::{i:x}"));
        append(&log1, &login_line(&a, "alice"));
        append(&log2, &login_line(&b, "bob"));
        ips.extend([a, b]);
    }
    wait_visible("logins of both writers on replica 1", &r1.map(), &ips);
    let v = postmap_q(&r1.map(), "192.0.2.3").unwrap();
    assert!(v.starts_with("OK expires="), "{v}");

    // A replica started late catches up by snapshot.
    let r2 = Replica::start(&tmp.path().join("r2"), &cfg, &url);
    wait_visible("snapshot on replica 2", &r2.map(), &ips);
    assert_eq!(r2.status()["last_snapshot_grants"], serde_json::json!(20));

    // kill -9 a replica, log in meanwhile, restart it: it converges.
    r1.kill9();
    let late: Vec<String> = (101..=105).map(|i| format!("192.0.2.{i}")).collect();
    for ip in &late {
        append(&log1, &login_line(ip, "carol"));
    }
    wait_visible("logins during the outage on replica 2", &r2.map(), &late);
    let r1 = Replica::start(&tmp.path().join("r1"), &cfg, &url);
    ips.extend(late.iter().cloned());
    wait_visible("restarted replica 1 converged", &r1.map(), &ips);

    // Revoked in the database: gone everywhere.
    pg.psql("DELETE FROM dovegate_grants WHERE address = '192.0.2.1'");
    for r in [&r1, &r2] {
        wait_for("revocation reached the replica", FLEET_PATIENCE, || {
            postmap_q(&r.map(), "192.0.2.1").is_none()
        });
    }

    // Rows dovegate would never write are refused by the table (schema 3); a canonical
    // row it would not grant (loopback) grants nothing; a long expiry is capped at now + ttl.
    for row in [
        "('1.2.3', now() + interval '1 hour', 'x', 'x')",
        "('unknown', now() + interval '1 hour', 'x', 'x')",
        "('2001:DB8::99', now() + interval '1 hour', 'x', 'x')",
        "('203.0.113.8', '2099-01-01', 'x', 'x')",
    ] {
        assert!(
            pg.try_psql(&format!(
                "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES {row}"
            ))
            .is_err(),
            "{row} accepted"
        );
    }
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('127.0.0.1', now() + interval '1 hour', 'x', 'x'),
         ('203.0.113.9', now() + interval '20 days', 'x', 'x')",
    );
    for r in [&r1, &r2] {
        wait_for("capped grant on the replica", FLEET_PATIENCE, || {
            postmap_q(&r.map(), "203.0.113.9").is_some()
        });
        let e = expiry_of(&postmap_q(&r.map(), "203.0.113.9").unwrap());
        assert!(e <= now() + 1800 + 5, "expiry {e} not capped at now + ttl");
        for k in ["1.2.3", "unknown", "127.0.0.1", "2001:db8::99"] {
            assert_eq!(postmap_q(&r.map(), k), None, "{k}");
        }
    }

    // Audit columns and schema version.
    assert_eq!(
        pg.psql("SELECT source FROM dovegate_grants WHERE address = '192.0.2.2'"),
        "dovecot"
    );
    assert!(!pg
        .psql("SELECT granted_by FROM dovegate_grants WHERE address = '192.0.2.2'")
        .is_empty());
    assert_eq!(pg.psql("SELECT version FROM dovegate_schema"), "5");
    let fleet: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("w1/state/fleet.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(fleet["connected"], serde_json::json!(true), "{fleet}");
    assert_eq!(fleet["queue_len"], serde_json::json!(0));
    // The writer keeps its own local map too.
    assert!(postmap_q(&tmp.path().join("w1/relay"), "192.0.2.3").is_some());
    assert!(!r1.log().contains("STALE"), "{}", r1.log());
}

/// The direct `pgsql:` alternative documented in README: the exact query, judged by
/// Postfix's own pgsql client, including the shortened keys smtpd also looks up.
#[test]
fn postfix_pgsql_direct_query() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    // A replica creates the schema (as any dovegate does).
    let _r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('192.0.2.7', now() + interval '10 minutes', 'h', 'dovecot'),
         ('2001:db8::7', now() + interval '10 minutes', 'h', 'dovecot'),
         ('192.0.2.8', now() - interval '1 second', 'h', 'dovecot')",
    );
    // Postfix (and replicas) may use a role that can only read.
    pg.psql(
        "CREATE ROLE reader LOGIN PASSWORD 'ro-pass';
         GRANT SELECT ON dovegate_grants, dovegate_revocations, dovegate_schema TO reader",
    );
    let ro_url = tmp.path().join("ro.url");
    std::fs::write(
        &ro_url,
        format!("postgresql://reader:ro-pass@127.0.0.1:{}/postgres", pg.port),
    )
    .unwrap();
    common::set_mode(&ro_url, 0o600);
    let ro = Replica::start(&tmp.path().join("ro"), &cfg, &ro_url);
    wait_visible(
        "read-only replica",
        &ro.map(),
        &["192.0.2.7".into(), "2001:db8::7".into()],
    );
    assert_eq!(postmap_q(&ro.map(), "192.0.2.8"), None);
    // A replica that may only SELECT still reports itself (schema 5's SECURITY DEFINER).
    wait_for("both replicas reported", FLEET_PATIENCE, || {
        pg.psql("SELECT count(*) FROM dovegate_hosts WHERE role = 'replica'") == "2"
    });
    let cf = tmp.path().join("pgsql-relay.cf");
    std::fs::write(
        &cf,
        format!(
            "hosts = inet:127.0.0.1:{port}\nuser = reader\npassword = ro-pass\ndbname = postgres\n\
             query = SELECT 'OK' FROM public.dovegate_grants WHERE address = '%s' AND expires > now()\n",
            port = pg.port,
        ),
    )
    .unwrap();
    let table = format!("pgsql:{}", cf.display());
    assert_eq!(
        common::postmap_table(&table, "192.0.2.7").as_deref(),
        Some("OK")
    );
    assert_eq!(
        common::postmap_table(&table, "2001:db8::7").as_deref(),
        Some("OK")
    );
    // Expired, shortened keys, hostnames, quoting: not found, and no error (exit 1).
    for key in [
        "192.0.2.8",
        "192.0.2",
        "192.0",
        "192",
        "2001:db8:",
        "mail.example.com",
        "example.com",
        "unknown",
        "x' OR '1'='1",
    ] {
        let out = common::postmap_query(&table, key);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// PostgreSQL restarts in the middle of a stream of logins: none is lost (every one
/// reaches the database and the replica), and no grant outlives its expiry anywhere.
#[test]
fn database_restart_mid_stream() {
    let tmp = common::tempdir();
    let mut pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    // Every login line names the same mail session, whose grant is renewed while it is
    // open: off here, where no grant may outlive its login + ttl.
    let cfg = config(tmp.path(), &url, "[grant]\nsession_hold = \"0s\"\n");
    let ttl = 30i64;
    let (w, log) = writer(&tmp.path().join("w"), &cfg, &format!("{ttl}s"));
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let mut logged: Vec<(String, i64)> = Vec::new();
    for i in 1..=60u32 {
        let ip = format!("198.51.100.{i}");
        // The login line has second precision: its grant expires at that second + ttl.
        logged.push((ip.clone(), now()));
        append(&log, &login_line(&ip, "dave"));
        if i == 20 {
            pg.down();
        }
        if i == 40 {
            pg.up();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ips: Vec<String> = logged.iter().map(|(ip, _)| ip.clone()).collect();
    wait_for("every login in the database", FLEET_PATIENCE, || {
        let n =
            pg.try_psql("SELECT count(*) FROM dovegate_grants WHERE address LIKE '198.51.100.%'");
        n.as_deref() == Ok("60")
    });
    wait_visible("every login on the replica", &r.map(), &ips);
    assert!(w.log().contains("database unreachable"), "{}", w.log());
    // Until everything has expired: nothing present past its expiry (1s timer slack).
    let deadline = logged.iter().map(|(_, t)| t + ttl).max().unwrap();
    common::fleet::watch_expiries(&[r.map(), tmp.path().join("w/relay")], &logged, ttl);
    assert!(now() >= deadline - 2);
}

/// The database is down from the start: commits spill to the state dir (and the local
/// map); a full queue never holds back the local map (issue 20, item 6: 53 of 101 logins
/// did not reach it): it merges, drops the grants that expire first, and says that the
/// database copy is behind; the rest reaches the database when it comes up.
#[test]
fn spill_queue_is_bounded_and_replayed() {
    let tmp = common::tempdir();
    let mut pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "spill_max_grants = 100\n");
    pg.down();
    let (w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    let first: Vec<String> = (1..=50).map(|i| format!("203.0.113.{i}")).collect();
    for ip in &first {
        append(&log, &common::sessionless_login_line(ip, "erin"));
    }
    // Spilled grants are committed locally.
    wait_visible(
        "spilled grants in the local map",
        &tmp.path().join("w/relay"),
        &first,
    );
    let queue = std::fs::read_to_string(tmp.path().join("w/state/spill/queue")).unwrap();
    assert_eq!(queue.lines().count(), 50);
    // 150 more do not fit in the queue: every one still reaches the local map.
    let more: Vec<String> = (1..=150).map(|i| format!("2001:db8:5::{i:x}")).collect();
    for ip in &more {
        append(&log, &common::sessionless_login_line(ip, "erin"));
    }
    wait_visible(
        "every login in the local map though the queue is full",
        &tmp.path().join("w/relay"),
        &more,
    );
    wait_for("database copy behind reported", PATIENCE, || {
        w.log().contains("database copy behind")
            && fleet_status(&tmp.path().join("w"))["behind"] == serde_json::json!(true)
    });
    let queue = std::fs::read_to_string(tmp.path().join("w/state/spill/queue")).unwrap();
    assert!(
        queue.lines().count() <= 100,
        "{} spilled",
        queue.lines().count()
    );
    assert!(
        fleet_status(&tmp.path().join("w"))["dropped_total"]
            .as_u64()
            .unwrap()
            > 0
    );
    pg.up();
    wait_for("spill queue emptied", FLEET_PATIENCE, || {
        std::fs::metadata(tmp.path().join("w/state/spill/queue")).is_ok_and(|m| m.len() == 0)
    });
    // The database holds what the queue kept: 100 grants at least.
    let n: usize = pg
        .psql("SELECT count(*) FROM dovegate_grants")
        .parse()
        .unwrap();
    assert!((100..=200).contains(&n), "{n} grants in the database");
    // Of equal expiries (logins in the same second) the queue keeps the later-queued;
    // the engine batches in no particular order, so which ones is not asserted.
}

#[test]
fn world_readable_url_file_is_refused() {
    let tmp = common::tempdir();
    let url = tmp.path().join("pg.url");
    std::fs::write(&url, "postgresql://u:topsecret@127.0.0.1:1/db\n").unwrap();
    common::set_mode(&url, 0o644);
    let cfg = config(tmp.path(), &url, "");
    let (map, state) = (tmp.path().join("relay"), tmp.path().join("state"));
    let common_args = [
        "--config".to_string(),
        cfg.display().to_string(),
        "--map".into(),
        map.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let out = Command::new(bin())
        .args(["check-config", "--config", &cfg.display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "check-config: {err}");
    assert!(err.contains("readable by every user"), "{err}");
    // A regular file: run refuses a special file as its log before anything else.
    let log = tmp.path().join("empty.log");
    std::fs::write(&log, "").unwrap();
    let log = log.display().to_string();
    for extra in [&["replica"][..], &["run", "--log", log.as_str()][..]] {
        let out = Command::new(bin())
            .args(extra)
            .args(&common_args)
            .output()
            .unwrap();
        let cmd = extra[0];
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("pg.url") && err.contains("readable by every user"),
            "{err}"
        );
        assert!(!err.contains("topsecret"), "{err}");
    }
}

/// `sslmode=require`: TLS through rustls, the server certificate checked against the CA in
/// `sslrootcert=FILE`; a server whose certificate that CA did not sign is refused.
#[test]
fn tls_with_verified_server_certificate() {
    let tmp = common::tempdir();
    let (pg, ca) = pg::Pg::start_tls(tmp.path());
    let url = tmp.path().join("tls.url");
    std::fs::write(
        &url,
        format!("{}?sslmode=require&sslrootcert={}", pg.url(), ca.display()),
    )
    .unwrap();
    common::set_mode(&url, 0o600);
    let cfg = config(tmp.path(), &url, "");
    let (_w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    append(&log, &login_line("192.0.2.77", "frank"));
    wait_visible("grant over TLS", &r.map(), &["192.0.2.77".into()]);
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_stat_ssl WHERE ssl AND pid <> pg_backend_pid()"),
        "3",
        "writer (grants and the policy state) and replica all on TLS"
    );
    // A CA that did not sign the server's certificate: no connection, said loudly.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-keyout",
            "k",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=other",
        ])
        .current_dir(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bad = tmp.path().join("bad.url");
    std::fs::write(
        &bad,
        format!(
            "{}?sslmode=require&sslrootcert={}",
            pg.url(),
            other.join("ca.pem").display()
        ),
    )
    .unwrap();
    common::set_mode(&bad, 0o600);
    let dir = tmp.path().join("r-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(bin())
        .args(["replica", "--config", &cfg.display().to_string()])
        .args(["--url-file", &bad.display().to_string()])
        .args(["--map", &dir.join("relay").display().to_string()])
        .args(["--state-dir", &dir.join("state").display().to_string()])
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_for("untrusted certificate refused", PATIENCE, || {
        let log = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        log.contains("STALE") && log.contains("cannot connect")
    });
    common::signal(child.id(), libc::SIGTERM);
    let _ = child.wait();
}

/// libpq's recommended `sslmode=verify-full` and `verify-ca` (issue 26): the server's
/// certificate is issued for IP 127.0.0.1 only, so through the name `localhost`
/// verify-full refuses it (wrong host) and verify-ca takes it (the chain is trusted);
/// verify-ca still refuses a certificate no trusted CA signed.
#[test]
fn tls_verify_full_checks_the_name_and_verify_ca_the_chain() {
    use dovegate::store::postgres::Target;
    let tmp = common::tempdir();
    let (pg, ca) = pg::Pg::start_tls(tmp.path());
    let other = tmp.path().join("other.pem");
    // A CA certificate that did not sign the server's (the server's own is not a CA).
    std::fs::copy(pg.dir.join("server.pem"), &other).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect = |host: &str, mode: &str, roots: &Path| -> Result<(), String> {
        let file = tmp.path().join("verify.url");
        std::fs::write(
            &file,
            format!(
                "postgresql://{}:{}@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
                pg::USER,
                pg::PASSWORD,
                pg.port,
                roots.display()
            ),
        )
        .unwrap();
        common::set_mode(&file, 0o600);
        let t = Target::load(&file, "public").map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = t.connect(None).await.map_err(|e| e.to_string())?;
            let ssl: bool = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            assert!(ssl, "{host} {mode}: connected without TLS");
            Ok(())
        })
    };
    connect("127.0.0.1", "verify-full", &ca).expect("verify-full, right name");
    let e = connect("localhost", "verify-full", &ca).unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
    connect("localhost", "verify-ca", &ca).expect("verify-ca, other name");
    let e = connect("localhost", "verify-ca", &other).unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
}

/// A database whose schema a newer dovegate migrated (issue 26): writer and replica say
/// "schema N is newer ...; upgrade dovegate" in their logs, status files and `status`, not
/// "unreachable"; the writer still commits (spill queue), the replica still serves.
#[test]
fn newer_schema_says_upgrade_not_unreachable() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    pg.psql("CREATE TABLE dovegate_schema (version integer NOT NULL); INSERT INTO dovegate_schema VALUES (99)");
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let wdir = tmp.path().join("w");
    let (w, log) = writer(&wdir, &cfg, "10m");
    let r = Replica::spawn(&tmp.path().join("r"), &cfg, &url);
    let newer = serde_json::json!({"found": 99, "known": 5});
    wait_for("writer says newer schema", FLEET_PATIENCE, || {
        fleet_status(&wdir)["newer_schema"] == newer
    });
    wait_for("replica says newer schema", FLEET_PATIENCE, || {
        r.status()["newer_schema"] == newer
    });
    let want = "the database's schema 99 is newer than this dovegate knows (5); upgrade dovegate";
    wait_for("both logs say so", FLEET_PATIENCE, || {
        w.log().contains(want) && r.log().contains(want)
    });
    assert!(!w.log().contains("database unreachable"), "{}", w.log());
    assert!(!r.log().contains("database is unreachable"), "{}", r.log());
    append(&log, &login_line("192.0.2.66", "hugo"));
    wait_visible(
        "writer commits",
        &wdir.join("relay"),
        &["192.0.2.66".into()],
    );
    let out = Command::new(bin())
        .args(["status", "--config", &cfg.display().to_string()])
        .args(["--map", &wdir.join("relay").display().to_string()])
        .args(["--state-dir", &wdir.join("state").display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(want), "{text}");
    assert!(!text.contains("UNREACHABLE"), "{text}");
}

/// A manual grant reaches the replica's log with the host that wrote it (the audit
/// columns), and a revoke is logged there too (issue 26: "another host"; the same test on
/// MariaDB: tests/mysql.rs).
#[test]
fn replica_logs_who_granted_by_hand() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    common::fleet::replica_logs_who_granted_by_hand(tmp.path(), "postgres_url_file", &url);
}

/// `dovegate status` for the map a replica keeps (an MTA host): the replica, its database
/// and lag, not a Dovecot host's sources; during a partition longer than the 30 s after
/// which a status file counts as stale it still says the replica runs and serves (issue
/// 26); the replica's own metrics (`--metrics`).
#[test]
fn replica_host_status_and_metrics_through_a_partition() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    let rdir = tmp.path().join("r");
    let port = pg::free_port();
    let metrics = format!("inet:127.0.0.1:{port}");
    let r = Replica::spawn_with(&rdir, &cfg, &url, &["--metrics", &metrics]);
    wait_for("replica connected", FLEET_PATIENCE, || {
        r.status()["connected"] == serde_json::Value::Bool(true)
    });
    append(&log, &login_line("192.0.2.120", "ivy"));
    wait_visible("grant on the replica", &r.map(), &["192.0.2.120".into()]);
    let status = |json: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["status", "--config", &cfg.display().to_string()])
            .args(["--map", &r.map().display().to_string()])
            .args(["--state-dir", &rdir.join("state").display().to_string()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The replica owns its map: a daemon on it is refused.
    let other = tmp.path().join("other-state");
    let out = common::dovegate(&[
        "run",
        "--map",
        &r.map().display().to_string(),
        "--state-dir",
        &other.display().to_string(),
        "--log",
        &log.display().to_string(),
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("already runs on this map"),
        "{e}"
    );
    let (text, err) = status(false);
    assert!(text.contains("grant(s)"), "{text}");
    assert!(text.contains("replica: running (pid "), "{text}");
    assert!(
        text.contains("database: reachable, the map is current"),
        "{text}"
    );
    assert!(
        !text.contains("daemon:") && !text.contains("file "),
        "{text}"
    );
    assert!(err.is_empty(), "{err}");
    // The grant count reaches the status file at the replica's next beat.
    wait_for("the replica's metrics", PATIENCE, || {
        let m = scrape(port);
        m.contains("dovegate_replica_connected 1") && m.contains("dovegate_replica_grants 1")
    });
    // The partition: a database that answers nothing (connects hang until their timeout),
    // for longer than a status file may be silent. The replica says it serves all along.
    pg.signal_all(libc::SIGSTOP);
    wait_for("replica disconnected", FLEET_PATIENCE, || {
        r.status()["connected"] == serde_json::Value::Bool(false)
    });
    let mut oldest = 0;
    wait_for("partition longer than 32 s", FLEET_PATIENCE * 2, || {
        let st = r.status();
        oldest = oldest.max(now() - st["updated"].as_i64().unwrap_or(0));
        let since = st["disconnected_since"].as_i64().unwrap_or(i64::MAX);
        let ok = now() - since > 32;
        if !ok {
            std::thread::sleep(Duration::from_millis(500));
        }
        ok
    });
    assert!(oldest <= 6, "the status file went {oldest} s unwritten");
    let (text, err) = status(false);
    assert!(text.contains("replica: running (pid "), "{text}");
    assert!(text.contains("database: UNREACHABLE since "), "{text}");
    assert!(
        text.contains("the map is STALE: it serves its grants"),
        "{text}"
    );
    assert!(!err.contains("not running or is stuck"), "{err}");
    assert!(!err.contains("stuck"), "{err}");
    let (json, _) = status(true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["role"], "replica");
    assert_eq!(v["replica"]["running"], true);
    assert_eq!(v["replica"]["pid"], r.child.id(), "{v}");
    assert_eq!(v["replica"]["database_state"], "unreachable");
    assert!(
        v["replica"]["status_age_secs"].as_i64().unwrap() < 10,
        "{v}"
    );
    assert!(postmap_q(&r.map(), "192.0.2.120").is_some(), "still served");
    let m = scrape(port);
    assert!(m.contains("dovegate_replica_connected 0"), "{m}");
    pg.signal_all(libc::SIGCONT);
    wait_for("replica current again", FLEET_PATIENCE, || {
        r.status()["connected"] == serde_json::Value::Bool(true)
    });
    let (text, _) = status(false);
    assert!(
        text.contains("database: reachable, the map is current"),
        "{text}"
    );
}

/// `dovegate status --fleet` (any host with the URL file): every writer and replica as the
/// database sees them, with spill queue, lag and clock skew measured by the database
/// (schema 5, issue 26); a writer whose clock is 10 minutes slow is flagged.
#[test]
fn status_fleet_lists_writers_and_replicas() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w, wdir, _log) = slow_writer(tmp.path(), &cfg);
    wait_writer_connected(&wdir);
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let fleet = |json: bool| {
        let mut cmd = Command::new(bin());
        cmd.args(["status", "--fleet", "--config", &cfg.display().to_string()]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut v = serde_json::Value::Null;
    wait_for("both reported", FLEET_PATIENCE, || {
        v = serde_json::from_str(&fleet(true)).unwrap();
        v["hosts"].as_array().map_or(0, Vec::len) == 2
    });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (w, rep) = (&v["hosts"][0], &v["hosts"][1]);
    assert_eq!(
        (w["role"].as_str(), rep["role"].as_str()),
        (Some("writer"), Some("replica")),
        "{v}"
    );
    for h in [w, rep] {
        assert_eq!(h["host"], host.trim(), "{v}");
        assert_eq!(h["silent"], false, "{v}");
    }
    assert_eq!(
        w["instance"],
        wdir.join("relay.lmdb").display().to_string(),
        "{v}"
    );
    assert_eq!(
        rep["instance"],
        r.map().with_extension("lmdb").display().to_string(),
        "{v}"
    );
    assert_eq!(w["spill_queue"], 0, "{v}");
    let skew = w["clock_skew_secs"].as_f64().unwrap();
    assert!((skew + 600.0).abs() < 5.0, "{v}");
    assert!(rep["clock_skew_secs"].as_f64().unwrap().abs() < 5.0, "{v}");
    assert!(rep["grants"].is_i64(), "{v}");
    let text = fleet(false);
    assert!(
        text.contains(&format!(
            "fleet of postgresql://127.0.0.1:{}/postgres: 1 writer(s), 1 replica(s)",
            pg.port
        )),
        "{text}"
    );
    assert!(text.contains("OFF the database's: run NTP"), "{text}");
    assert!(text.contains("spill queue 0"), "{text}");
    assert!(text.contains(&format!("replica {}", host.trim())), "{text}");
}

/// A hung database (processes stopped, TCP still accepted): the writer keeps committing
/// (locally and to the spill queue) after a bounded wait, the replica keeps serving and
/// says it is stale; when the database wakes up, everything arrives.
#[test]
fn hung_database_bounds_the_wait() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let (w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    append(&log, &login_line("192.0.2.50", "gina"));
    wait_visible("first grant", &r.map(), &["192.0.2.50".into()]);
    pg.signal_all(libc::SIGSTOP);
    let during: Vec<String> = (51..=55).map(|i| format!("192.0.2.{i}")).collect();
    for ip in &during {
        append(&log, &login_line(ip, "gina"));
    }
    wait_visible(
        "writer commits while the database hangs",
        &tmp.path().join("w/relay"),
        &during,
    );
    wait_for("replica says it is stale", FLEET_PATIENCE, || {
        r.log().contains("STALE")
    });
    assert!(
        postmap_q(&r.map(), "192.0.2.50").is_some(),
        "stale map still serves"
    );
    assert!(w.log().contains("database unreachable"), "{}", w.log());
    pg.signal_all(libc::SIGCONT);
    wait_visible("grants from the hang on the replica", &r.map(), &during);
    wait_for("replica current again", FLEET_PATIENCE, || {
        r.log().contains("database reachable again")
    });
}

/// Several dovegates meeting a fresh database at once: the migration runs once, under the
/// advisory lock, and none of them fails.
#[test]
fn concurrent_start_migrates_once() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let replicas: Vec<Replica> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (dir, cfg, url) = (tmp.path().join(format!("r{i}")), &cfg, &url);
                s.spawn(move || Replica::start(&dir, cfg, url))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        pg.psql("SELECT count(*) || ':' || max(version) FROM dovegate_schema"),
        "1:5"
    );
    for r in &replicas {
        assert!(!r.log().contains("migration failed"), "{}", r.log());
        assert!(!r.log().contains("STALE"), "{}", r.log());
    }
}

/// The payloads `user` hears on the channel during `how_long`.
fn listen_as(pg: &Pg, user: &str, password: &str, how_long: Duration) -> Vec<String> {
    let url = format!(
        "postgresql://{user}:{password}@127.0.0.1:{}/postgres",
        pg.port
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client
            .batch_execute("LISTEN dovegate_grants")
            .await
            .unwrap();
        tokio::time::sleep(how_long).await;
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(p);
        }
        out
    })
}

/// NOTIFY and LISTEN need no table privilege. Notifications carry no address (a role that
/// may only connect learns nothing by listening), forged ones grant and revoke nothing, and
/// a flood costs one read of the changes per commit interval however many arrive
/// (issue 20, item 9).
#[test]
fn notifications_carry_no_addresses_and_a_flood_is_coalesced() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    pg.psql("CREATE ROLE mallory LOGIN PASSWORD 'm-pass'");
    // Mallory listens while a grant is written: she hears that something changed, not what.
    let heard = std::thread::scope(|s| {
        let h = s.spawn(|| listen_as(&pg, "mallory", "m-pass", Duration::from_secs(4)));
        // Listening once her session's last statement is the LISTEN itself.
        wait_for("mallory listening", PATIENCE, || {
            pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'mallory' AND query ILIKE 'LISTEN%' AND state = 'idle'") == "1"
        });
        pg.psql(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
             ('192.0.2.60', now() + interval '10 minutes', 'h', 'dovecot')",
        );
        h.join().unwrap()
    });
    wait_visible("a real grant", &r.map(), &["192.0.2.60".into()]);
    assert!(!heard.is_empty(), "no notification heard");
    for p in &heard {
        assert!(!p.contains("192.0.2"), "a payload names an address: {p}");
    }
    let before = r.status()["change_reads"].as_u64().unwrap();
    let forge = |sql: &str| pg.psql_as("mallory", "m-pass", sql).unwrap();
    forge(r#"NOTIFY dovegate_grants, '{"a":"203.0.113.200","e":4102444800}'"#);
    forge(r#"NOTIFY dovegate_grants, '{"a":"192.0.2.60","e":null}'"#);
    // A flood: 20,000 distinct notifications in a few seconds.
    let start = Instant::now();
    for _ in 0..4 {
        forge("SELECT pg_notify('dovegate_grants', g::text) FROM generate_series(1, 5000) g");
    }
    // A real change after the forged ones: once it is seen, they were handled.
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('192.0.2.61', now() + interval '10 minutes', 'h', 'dovecot')",
    );
    wait_visible("a real insert", &r.map(), &["192.0.2.61".into()]);
    let elapsed = start.elapsed();
    let reads = r.status()["change_reads"].as_u64().unwrap() - before;
    // Default commit interval 250 ms: four reads per second at most, plus the first.
    assert!(
        reads as f64 <= elapsed.as_secs_f64() * 4.0 + 4.0,
        "{reads} reads in {elapsed:?} for a flood of 20,000"
    );
    assert_eq!(postmap_q(&r.map(), "203.0.113.200"), None);
    assert!(postmap_q(&r.map(), "192.0.2.60").is_some());
    assert!(!r.log().contains("STALE"), "{}", r.log());
}

/// Rows with expiries chrono cannot print, or far in the future, or infinite, and a row the
/// database refuses: the writer's map gets an expiry within its ttl that reads back, the
/// replica too, and nothing is left in the spill queue.
#[test]
fn odd_rows_neither_grant_forever_nor_wedge() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let wdir = tmp.path().join("w");
    let (w, log) = writer(&wdir, &cfg, "10m");
    wait_writer_connected(&wdir);
    // Rows written by hand (a role that may alter the table drops schema 3's bound
    // first) before the logins.
    pg.psql(
        "ALTER TABLE dovegate_grants DROP CONSTRAINT dovegate_grants_bounded;
         INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('198.51.100.120', '294000-01-01', 'x', 'x'),
         ('198.51.100.121', '10000-01-01', 'x', 'x')",
    );
    // An infinite expiry the constraint of schema 2 refuses; one written before it.
    assert!(pg
        .try_psql(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
             ('198.51.100.122', 'infinity', 'x', 'x')"
        )
        .is_err());
    pg.psql(
        "ALTER TABLE dovegate_grants DROP CONSTRAINT dovegate_grants_finite;
         INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('198.51.100.122', 'infinity', 'x', 'x')",
    );
    // A row the database refuses (class 23): dropped with an error, the rest committed.
    pg.psql(
        "ALTER TABLE dovegate_grants ADD CONSTRAINT test_refuse CHECK (address <> '198.51.100.123')",
    );
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let ips: Vec<String> = (120..=124).map(|i| format!("198.51.100.{i}")).collect();
    let mut lines = String::new();
    for ip in &ips {
        lines.push_str(&login_line(ip, "erin"));
    }
    append(&log, &lines);
    wait_visible("logins in the writer's map", &wdir.join("relay"), &ips);
    let shared = [&ips[0], &ips[1], &ips[2], &ips[4]].map(|s| s.to_string());
    wait_visible("logins on the replica", &r.map(), &shared);
    for ip in &ips {
        let v = postmap_q(&wdir.join("relay"), ip).unwrap();
        let e = expiry_of(&v);
        assert!(e <= now() + 600 + 5 && e > now(), "writer {ip}: {v}");
    }
    for ip in &shared {
        let v = postmap_q(&r.map(), ip).unwrap();
        let e = expiry_of(&v);
        assert!(e <= now() + 1800 + 5 && e > now(), "replica {ip}: {v}");
    }
    assert_eq!(postmap_q(&r.map(), "198.51.100.123"), None);
    let list = common::dovegate(&[
        "list",
        "--config",
        &cfg.display().to_string(),
        "--map",
        &wdir.join("relay").display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        text.contains("198.51.100.120") && !text.contains("never"),
        "{text}"
    );
    assert_eq!(fleet_status(&wdir)["queue_len"], serde_json::json!(0));
    assert!(
        w.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("refused") && l.contains("198.51.100.123")),
        "{}",
        w.log()
    );
    assert!(!r.log().contains("STALE"), "{}", r.log());
    assert!(!r.log().contains("infinity"), "{}", r.log());
}

/// A row far in the future grants no longer than its own `updated_at` + ttl (it is not
/// re-extended at every resync); one claiming a future `updated_at` grants nothing.
#[test]
fn far_future_row_is_bounded_by_its_own_update() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source, updated_at) VALUES
         ('203.0.113.30', now() + interval '20 days', 'x', 'x', now() - interval '25 minutes'),
         ('203.0.113.32', now() + interval '10 minutes', 'x', 'x', now())",
    );
    // A future updated_at (or an expiry past updated_at + 31 days) is refused by the table.
    for row in [
        "('203.0.113.31', now() + interval '1 hour', 'x', 'x', now() + interval '1 year')",
        "('203.0.113.33', '2099-01-01', 'x', 'x', now())",
    ] {
        assert!(pg
            .try_psql(&format!(
                "INSERT INTO dovegate_grants (address, expires, granted_by, source, updated_at) VALUES {row}"
            ))
            .is_err());
    }
    wait_visible(
        "the rows",
        &r.map(),
        &["203.0.113.30".into(), "203.0.113.32".into()],
    );
    let e = expiry_of(&postmap_q(&r.map(), "203.0.113.30").unwrap());
    // Default ttl 30 minutes: 5 minutes left.
    assert!(e <= now() + 300 + 5, "expiry {e} beyond updated_at + ttl");
    assert_eq!(postmap_q(&r.map(), "203.0.113.31"), None);
    // A restarted replica (a fresh snapshot) does not extend it either.
    drop(r);
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    wait_for("snapshot", FLEET_PATIENCE, || {
        r.status()["snapshots"].as_u64() >= Some(1)
    });
    let e2 = expiry_of(&postmap_q(&r.map(), "203.0.113.30").unwrap());
    assert!(e2 <= e + 1, "re-extended from {e} to {e2}");
    assert_eq!(postmap_q(&r.map(), "203.0.113.31"), None);
}

/// `dovegate revoke IP` on a writer host (issue 18; issue 20, item 7): it reaches the
/// database, so IP leaves a replica's map and the writer's own, and stays out across the
/// replica's resync (a restart snapshots) and a replay of a login from before the revoke;
/// a login after the revoke grants again.
#[test]
fn revoke_on_a_writer_holds_across_the_fleet() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let wdir = tmp.path().join("w");
    let (_w, log) = writer(&wdir, &cfg, "10m");
    wait_writer_connected(&wdir);
    let rdir = tmp.path().join("r");
    let r = Replica::start(&rdir, &cfg, &url);
    let old_login = common::sessionless_login_line("192.0.2.90", "hank");
    append(&log, &old_login);
    append(&log, &common::sessionless_login_line("192.0.2.91", "hank"));
    wait_visible(
        "grants on the replica",
        &r.map(),
        &["192.0.2.90".into(), "192.0.2.91".into()],
    );
    let said = common::fleet::revoke(&cfg, &wdir.join("relay"), "192.0.2.90");
    wait_for("revoke reached the replica", FLEET_PATIENCE, || {
        postmap_q(&r.map(), "192.0.2.90").is_none()
    });
    assert!(said.contains("every host"), "{said}");
    assert_eq!(postmap_q(&wdir.join("relay"), "192.0.2.90"), None);
    assert!(postmap_q(&r.map(), "192.0.2.91").is_some());
    // The replica restarts (a full snapshot): still revoked.
    drop(r);
    let r = Replica::start(&rdir, &cfg, &url);
    assert!(r.status()["snapshots"].as_u64() >= Some(1));
    assert!(postmap_q(&r.map(), "192.0.2.91").is_some());
    assert_eq!(postmap_q(&r.map(), "192.0.2.90"), None);
    // The login line from before the revoke read again (a replay, a writer that had not
    // seen the revoke): the database refuses it, and the writer's map does not take it.
    append(&log, &old_login);
    append(&log, &common::sessionless_login_line("192.0.2.92", "hank"));
    wait_visible("a later grant", &r.map(), &["192.0.2.92".into()]);
    assert!(postmap_q(&wdir.join("relay"), "192.0.2.92").is_some());
    assert_eq!(postmap_q(&r.map(), "192.0.2.90"), None);
    assert_eq!(postmap_q(&wdir.join("relay"), "192.0.2.90"), None);
    // A new login after the revoke grants again, everywhere (one within 2 s of the revoke
    // is taken for a session renewal racing it).
    let revoked: i64 = pg
        .psql("SELECT floor(extract(epoch FROM revoked_at))::int8 FROM dovegate_revocations WHERE address = '192.0.2.90'")
        .parse()
        .unwrap();
    wait_for("3 s past the revoke", PATIENCE, || {
        std::thread::sleep(Duration::from_millis(100));
        now() > revoked + 3
    });
    append(&log, &common::sessionless_login_line("192.0.2.90", "hank"));
    wait_visible(
        "a later login grants again",
        &r.map(),
        &["192.0.2.90".into()],
    );
    assert!(postmap_q(&wdir.join("relay"), "192.0.2.90").is_some());
    // `dovegate grant` on the writer host reaches the replica too.
    let out = common::dovegate(&[
        "grant",
        "--config",
        &cfg.display().to_string(),
        "--map",
        &wdir.join("relay").display().to_string(),
        "192.0.2.93",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_visible(
        "a manual grant on the replica",
        &r.map(),
        &["192.0.2.93".into()],
    );
}

/// The administrator's DELETE and TRUNCATE in the database (issue 20, item 7): they reach
/// every replica and the writers' own maps.
#[test]
fn delete_and_truncate_reach_every_map() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let wdir = tmp.path().join("w");
    let (_w, log) = writer(&wdir, &cfg, "10m");
    wait_writer_connected(&wdir);
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let ips: Vec<String> = (1..=3).map(|i| format!("198.51.100.{i}")).collect();
    for ip in &ips {
        append(&log, &common::sessionless_login_line(ip, "ivy"));
    }
    wait_visible("grants on the replica", &r.map(), &ips);
    pg.psql("DELETE FROM dovegate_grants WHERE address = '198.51.100.1'");
    for map in [r.map(), wdir.join("relay")] {
        wait_for("DELETE reached the map", FLEET_PATIENCE, || {
            postmap_q(&map, "198.51.100.1").is_none()
        });
        assert!(postmap_q(&map, "198.51.100.2").is_some());
    }
    pg.psql("TRUNCATE dovegate_grants");
    for map in [r.map(), wdir.join("relay")] {
        wait_for("TRUNCATE reached the map", FLEET_PATIENCE, || {
            postmap_s(&map).is_empty()
        });
    }
    assert_eq!(pg.psql("SELECT count(*) FROM dovegate_revocations"), "3");
}

/// A replica whose map is replaced under it refills it at once, not at the next 5-minute
/// resync (issue 18: the cause of the store error was dropped).
#[test]
fn replica_refills_a_replaced_map_at_once() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('192.0.2.70', now() + interval '10 minutes', 'h', 'dovecot')",
    );
    wait_visible("a grant", &r.map(), &["192.0.2.70".into()]);
    let file = tmp.path().join("r/relay.lmdb");
    std::fs::remove_file(&file).unwrap();
    // Well within the 5-minute resync.
    wait_for("map refilled", Duration::from_secs(30), || {
        file.exists() && postmap_q(&r.map(), "192.0.2.70").is_some()
    });
    // With the database down the resync cannot come: the replica writes the live grants
    // it knows into the new map itself.
    let mut pg = pg;
    pg.down();
    wait_for("replica disconnected", PATIENCE, || {
        r.status()["connected"] == serde_json::json!(false)
    });
    std::fs::remove_file(&file).unwrap();
    wait_for(
        "map refilled while the database is down",
        Duration::from_secs(30),
        || file.exists() && postmap_q(&r.map(), "192.0.2.70").is_some(),
    );
    assert!(
        r.log().contains("while the database is unreachable"),
        "{}",
        r.log()
    );
}

/// The schema-1 (or 2) table of an earlier release, with rows the direct `pgsql:` query
/// obeyed (issue 20, item 8): migrating to schema 3 deletes them and the table refuses them
/// from then on; the README's query, run by Postfix's own pgsql client, grants nothing for
/// them and keeps granting a real row.
#[test]
fn forged_rows_grant_nothing_through_postfix_pgsql() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    // Schema 1 as dovegate 1 created it (its first migration).
    pg.psql(
        "CREATE TABLE dovegate_schema (version integer NOT NULL);
         INSERT INTO dovegate_schema VALUES (1);
         CREATE TABLE dovegate_grants (
             address text PRIMARY KEY CHECK (length(address) BETWEEN 1 AND 64),
             expires timestamptz NOT NULL,
             granted_by text NOT NULL,
             source text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now(),
             updated_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX dovegate_grants_expires ON dovegate_grants (expires);
         CREATE FUNCTION dovegate_grants_notify() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RETURN NULL; END $$;
         CREATE TRIGGER dovegate_grants_notify AFTER INSERT OR UPDATE OR DELETE ON dovegate_grants
             FOR EACH ROW EXECUTE FUNCTION dovegate_grants_notify();",
    );
    let forged = [
        ("unknown", "now() + interval '10 minutes'", "now()"),
        ("1.2.3", "now() + interval '10 minutes'", "now()"),
        ("192.0.2.0/24", "now() + interval '10 minutes'", "now()"),
        ("2001:DB8::9", "now() + interval '10 minutes'", "now()"),
        ("198.51.100.8", "'2100-01-01'", "now()"),
        (
            "198.51.100.9",
            "now() + interval '10 minutes'",
            "now() + interval '1 year'",
        ),
        ("198.51.100.10", "'infinity'", "now()"),
    ];
    for (a, e, u) in forged {
        pg.psql(&format!(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source, updated_at)
             VALUES ('{a}', {e}, 'x', 'x', {u})"
        ));
    }
    pg.psql(
        "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
         ('192.0.2.7', now() + interval '10 minutes', 'h', 'dovecot')",
    );
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    assert_eq!(pg.psql("SELECT version FROM dovegate_schema"), "5");
    assert_eq!(
        pg.psql("SELECT string_agg(address, ',') FROM dovegate_grants"),
        "192.0.2.7"
    );
    for (a, e, u) in forged {
        assert!(
            pg.try_psql(&format!(
                "INSERT INTO dovegate_grants (address, expires, granted_by, source, updated_at)
                 VALUES ('{a}', {e}, 'x', 'x', {u})"
            ))
            .is_err(),
            "{a} accepted after the migration"
        );
    }
    wait_visible("the real row", &r.map(), &["192.0.2.7".into()]);
    // Postfix's own pgsql client, with the README's query.
    let cf = tmp.path().join("pgsql-relay.cf");
    std::fs::write(
        &cf,
        format!(
            "hosts = inet:127.0.0.1:{}\nuser = {}\npassword = {}\ndbname = postgres\n{}\n",
            pg.port,
            pg::USER,
            pg::PASSWORD,
            README_QUERY
        ),
    )
    .unwrap();
    let table = format!("pgsql:{}", cf.display());
    assert_eq!(
        common::postmap_table(&table, "192.0.2.7").as_deref(),
        Some("OK")
    );
    // Even with schema 3's constraints dropped (a role that may alter the table), the
    // query obeys no forged row.
    pg.psql(
        "ALTER TABLE dovegate_grants DROP CONSTRAINT dovegate_grants_canonical,
             DROP CONSTRAINT dovegate_grants_bounded, DROP CONSTRAINT dovegate_grants_not_future,
             DROP CONSTRAINT dovegate_grants_finite",
    );
    for (a, e, u) in forged {
        pg.psql(&format!(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source, updated_at)
             VALUES ('{a}', {e}, 'x', 'x', {u})"
        ));
    }
    for key in [
        "unknown",
        "1.2.3",
        "192.0.2",
        "198.51.100.8",
        "198.51.100.9",
        "198.51.100.10",
        "2001:db8::9",
        "mail.example.com",
    ] {
        let out = common::postmap_query(&table, key);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{key}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        common::postmap_table(&table, "192.0.2.7").as_deref(),
        Some("OK")
    );
}

/// The README's `pgsql:` query (section "Several hosts"), for a ttl of 10 minutes.
const README_QUERY: &str = "query = SELECT 'OK' FROM public.dovegate_grants WHERE address = '%s'
    AND public.dovegate_canonical_address(address) AND expires > now()
    AND updated_at <= now() AND expires <= updated_at + interval '10 minutes'";

/// A Dovecot host whose clock is 10 minutes slow (issue 20, item 10): its logins reach the
/// replicas with a full ttl (the database's clock decides), the skew is in `fleet.json`
/// and warned about.
#[test]
fn slow_writer_clock_loses_no_login() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let (w, wdir, log) = slow_writer(tmp.path(), &cfg);
    wait_writer_connected(&wdir);
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    // Its syslog stamps lines by its own (slow) clock.
    let slow = (chrono::Local::now() - chrono::Duration::seconds(600))
        .format("%b %e %H:%M:%S")
        .to_string();
    append(
        &log,
        &format!("{slow} mail dovecot: imap-login: Login: user=<jo>, method=PLAIN, rip=192.0.2.95, lip=192.0.2.1, mpid=4242, TLS\n"),
    );
    wait_visible(
        "the slow host's login on the replica",
        &r.map(),
        &["192.0.2.95".into()],
    );
    let e = expiry_of(&postmap_q(&r.map(), "192.0.2.95").unwrap());
    assert!(
        e >= now() + 600 - 30,
        "expiry {e}, now {}: not a full ttl",
        now()
    );
    let skew = fleet_status(&wdir)["clock_skew_secs"].as_f64().unwrap();
    assert!((skew + 600.0).abs() < 30.0, "skew {skew}");
    assert!(w.log().contains("clock differs"), "{}", w.log());
}

/// A grant committed by a transaction that began before later, already seen changes (a
/// slow writer, an administrator's open transaction) reaches the replica when it commits,
/// not at the next 5-minute resync: notifications carry no address, so the replica must
/// not skip rows of transactions still running at its last read.
#[test]
fn a_long_transaction_is_seen_when_it_commits() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "");
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            pg.psql(
                "BEGIN;
                 INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
                 ('192.0.2.80', now() + interval '10 minutes', 'h', 'dovecot');
                 SELECT pg_sleep(4);
                 COMMIT;",
            )
        });
        wait_for("the slow transaction running", PATIENCE, || {
            pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(4)%' AND pid <> pg_backend_pid()") == "1"
        });
        pg.psql(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source) VALUES
             ('192.0.2.81', now() + interval '10 minutes', 'h', 'dovecot')",
        );
        wait_visible("the quick grant", &r.map(), &["192.0.2.81".into()]);
        slow.join().unwrap();
    });
    wait_for("the slow grant", Duration::from_secs(30), || {
        postmap_q(&r.map(), "192.0.2.80").is_some()
    });
}

/// Issue 22: a user's caps count on every host, and a user who trips one loses the
/// grants every host gave it and is let in again everywhere by one `dovegate unblock`
/// (the same test on MariaDB: tests/mysql.rs).
#[test]
fn caps_and_blocks_hold_across_hosts() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    common::fleet::caps_and_blocks_hold_across_hosts(
        tmp.path(),
        "postgres_url_file",
        &url,
        &|sql| pg.psql(sql).trim().to_string(),
        "SELECT now() > revoked_at + interval '4 seconds' FROM dovegate_revocations WHERE address = '203.0.113.40'",
    );
}

/// A reload that lengthens grant.ttl reaches the database's writer too: the row a login
/// writes after it lasts the new ttl (it was capped at the old one, and the revoke checks
/// took the login for hours younger than it was).
#[test]
fn a_reloaded_ttl_bounds_the_database_rows() {
    let tmp = common::tempdir();
    let pg = Pg::start(tmp.path());
    let url = pg.url_file(&tmp.path().join("pg.url"));
    let cfg = config(tmp.path(), &url, "[grant]\nttl = \"10m\"\n");
    let wdir = tmp.path().join("w");
    std::fs::create_dir_all(&wdir).unwrap();
    let log = wdir.join("mail.log");
    std::fs::write(&log, "").unwrap();
    let cfg_arg = cfg.display().to_string();
    let w = Daemon::follow(&wdir, &log, &["--config", &cfg_arg]);
    wait_writer_connected(&wdir);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("ttl = \"10m\"", "ttl = \"4h\"")).unwrap();
    common::signal(w.child.id(), libc::SIGHUP);
    wait_for("the reload", PATIENCE, || {
        w.log().contains("configuration reloaded")
    });
    append(&log, &common::sessionless_login_line("192.0.2.95", "ivy"));
    let row = || {
        pg.psql("SELECT floor(extract(epoch FROM expires))::int8 FROM dovegate_grants WHERE address = '192.0.2.95'")
    };
    wait_for("the row", FLEET_PATIENCE, || !row().is_empty());
    let left = row().parse::<i64>().unwrap() - common::fleet::now();
    assert!(
        left > 3 * 3600,
        "the row lasts {left}s, not the reloaded 4h"
    );
}
