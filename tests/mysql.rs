//! dovegate with grants shared through MariaDB (issue 23): a private `mariadbd` on
//! loopback per test (tests/support/mariadb.rs), real writers and replicas.

mod common;
#[path = "support/mariadb.rs"]
mod mariadb;
#[path = "support/tls.rs"]
mod tls;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::{append, bin, login_line, postmap_q, postmap_s, wait_for, Daemon};
use mariadb::Maria;

/// A config sharing grants through MariaDB at `url`; `extra` is appended.
fn config(dir: &Path, url: &Path, extra: &str) -> PathBuf {
    common::fleet::config_with(dir, "mysql_url_file", url, extra)
}

#[test]
fn private_server_starts_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Maria::start(tmp.path());
    assert_eq!(m.sql("SELECT 1+1"), "2");
    // Only loopback, and the socket in the temp dir: no system instance involved.
    assert!(m.root("SELECT @@bind_address").contains("127.0.0.1"));
    m.down();
    assert!(m
        .sql_as(mariadb::USER, mariadb::PASSWORD, "SELECT 1")
        .is_err());
    m.up();
    assert_eq!(m.sql("SELECT 2"), "2");
}

#[test]
fn two_writers_two_replicas_kill_and_revoke() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w1, log1) = writer(&tmp.path().join("w1"), &cfg, "10m");
    let (mut w2, log2) = writer(&tmp.path().join("w2"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w1"));
    let mut r1 = Replica::start(&tmp.path().join("r1"), &cfg, &url);
    assert_eq!(m.sql("SELECT MAX(version) FROM dovegate_schema"), "2");

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
    // Audit columns: who wrote it, from what.
    let row = m.sql(
        "SELECT granted_by <> '', source, seq > 0 FROM dovegate_grants WHERE address = '192.0.2.3'",
    );
    assert_eq!(row, "1\tdovecot\t1", "{row}");

    // A replica started late catches up by snapshot.
    let r2 = Replica::start(&tmp.path().join("r2"), &cfg, &url);
    wait_visible("snapshot on replica 2", &r2.map(), &ips);
    assert_eq!(r2.status()["last_snapshot_grants"], serde_json::json!(20));

    // kill -9 a replica and a writer, log in meanwhile, restart the replica: it converges.
    r1.kill9();
    w2.kill9();
    let late: Vec<String> = (101..=105).map(|i| format!("192.0.2.{i}")).collect();
    for ip in &late {
        append(&log1, &login_line(ip, "carol"));
    }
    wait_visible("logins during the outage on replica 2", &r2.map(), &late);
    let r1 = Replica::start(&tmp.path().join("r1"), &cfg, &url);
    ips.extend(late.iter().cloned());
    wait_visible("restarted replica 1 converged", &r1.map(), &ips);
    // The killed writer restarted: its next login is shared too.
    let (_w2, log2b) = writer(&tmp.path().join("w2"), &cfg, "10m");
    assert_eq!(log2b, log2);
    append(&log2, &login_line("192.0.2.150", "bob"));
    wait_visible(
        "the restarted writer's login",
        &r1.map(),
        &["192.0.2.150".into()],
    );

    // A revoke leaves a tombstone with a sequence value: gone from every replica.
    let revoked = Command::new(bin())
        .args(["revoke", "--config", &cfg.display().to_string()])
        .args(["--map", &tmp.path().join("w1/relay").display().to_string()])
        .arg("192.0.2.1")
        .output()
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("every host"));
    assert_eq!(
        m.sql("SELECT count(*) FROM dovegate_revocations WHERE address = '192.0.2.1' AND seq > 0"),
        "1"
    );
    for r in [&r1, &r2] {
        wait_for("revocation reached the replica", FLEET_PATIENCE, || {
            postmap_q(&r.map(), "192.0.2.1").is_none()
        });
    }
    assert!(postmap_q(&r1.map(), "192.0.2.2").is_some());
    // Revoked on w1's host, granted by w2: w2's own map drops it too (its worker polls the
    // tombstones).
    assert!(postmap_q(&tmp.path().join("w2/relay"), "2001:db8:2::1").is_some());
    common::fleet::revoke(&cfg, &tmp.path().join("w1/relay"), "2001:db8:2::1");
    wait_for(
        "the revoke reached the other writer's map",
        FLEET_PATIENCE,
        || postmap_q(&tmp.path().join("w2/relay"), "2001:db8:2::1").is_none(),
    );
    for r in [&r1, &r2] {
        wait_for("the revoke reached the replica", FLEET_PATIENCE, || {
            postmap_q(&r.map(), "2001:db8:2::1").is_none()
        });
    }
    assert!(
        r1.log().contains("dovegate replica started"),
        "{}",
        r1.log()
    );
}

/// MariaDB stopped and started again while logins come: nothing lost (the spill queue is
/// replayed), nothing granted past its login + ttl in any map.
#[test]
fn database_restart_mid_stream() {
    let tmp = common::tempdir();
    let mut m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "[grant]\nsession_hold = \"0s\"\n");
    let ttl = 30i64;
    let (w, log) = writer(&tmp.path().join("w"), &cfg, &format!("{ttl}s"));
    wait_writer_connected(&tmp.path().join("w"));
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let mut logged: Vec<(String, i64)> = Vec::new();
    for i in 1..=60u32 {
        let ip = format!("198.51.100.{i}");
        logged.push((ip.clone(), now()));
        append(&log, &login_line(&ip, "dave"));
        if i == 20 {
            m.down();
        }
        if i == 40 {
            m.up();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ips: Vec<String> = logged.iter().map(|(ip, _)| ip.clone()).collect();
    wait_for("every login in the database", FLEET_PATIENCE, || {
        let n = m.sql_as(
            mariadb::USER,
            mariadb::PASSWORD,
            "SELECT count(*) FROM dovegate_grants WHERE address LIKE '198.51.100.%'",
        );
        if n.as_deref() != Ok("60") {
            std::thread::sleep(Duration::from_millis(100));
        }
        n.as_deref() == Ok("60")
    });
    wait_visible("every login on the replica", &r.map(), &ips);
    assert!(w.log().contains("database unreachable"), "{}", w.log());
    assert!(r.log().contains("replica is STALE"), "{}", r.log());
    common::fleet::watch_expiries(&[r.map(), tmp.path().join("w/relay")], &logged, ttl);
}

/// Another database user with write access forges rows: the table refuses what dovegate
/// never writes, and what it cannot refuse (a future `updated_at`, an excluded address, a
/// long expiry) grants nothing, or no longer than now + ttl, on a replica.
#[test]
fn forged_rows_grant_nothing() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "[grant]\nttl = \"10m\"\n");
    let (_w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w"));
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    m.root(&format!(
        "CREATE USER 'forger'@'127.0.0.1' IDENTIFIED BY 'f0rge';
         GRANT SELECT, INSERT, UPDATE, DELETE ON {}.* TO 'forger'@'127.0.0.1';",
        mariadb::DB
    ));
    let forge = |values: &str| {
        m.sql_as(
            "forger",
            "f0rge",
            &format!(
                "INSERT INTO dovegate_grants (address, expires, granted_by, source, created_at, updated_at, seq)
                 VALUES {values}"
            ),
        )
    };
    // Refused by the table: not canonical, or an expiry beyond updated_at + 31 days.
    for bad in [
        "1.2.3",
        "unknown",
        "2001:DB8::99",
        "::ffff:192.0.2.77",
        "192.0.2.0/24",
        "2001:0db8::5",
    ] {
        let e = forge(&format!(
            "('{bad}', UTC_TIMESTAMP() + INTERVAL 1 HOUR, 'x', 'x', UTC_TIMESTAMP(), UTC_TIMESTAMP(), (SELECT seq FROM dovegate_seq))"
        ));
        assert!(e.is_err(), "{bad} was accepted");
    }
    assert!(
        forge("('203.0.113.8', '2099-01-01', 'x', 'x', UTC_TIMESTAMP(), UTC_TIMESTAMP(), 1)")
            .is_err()
    );
    // Accepted by the table, granting nothing: a future updated_at (so a far-future expiry
    // passes the CHECK), a loopback address; a month-long expiry is capped at now + ttl.
    forge("('203.0.113.9', '2099-01-01', 'x', 'x', UTC_TIMESTAMP(), '2099-01-01', 1)").unwrap();
    forge("('127.0.0.1', UTC_TIMESTAMP() + INTERVAL 1 HOUR, 'x', 'x', UTC_TIMESTAMP(), UTC_TIMESTAMP(), 1)").unwrap();
    forge("('203.0.113.10', UTC_TIMESTAMP() + INTERVAL 30 DAY, 'x', 'x', UTC_TIMESTAMP(), UTC_TIMESTAMP(), 1)").unwrap();
    // Make the replica look at them now: a real login moves the sequence past them, and a
    // replica started afterwards reads them in its snapshot.
    m.sql_as("forger", "f0rge", "UPDATE dovegate_grants SET seq = (SELECT seq + 1 FROM dovegate_seq) WHERE granted_by = 'x'").unwrap();
    append(&log, &login_line("192.0.2.60", "erin"));
    wait_visible("a real login", &r.map(), &["192.0.2.60".into()]);
    let r2 = Replica::start(&tmp.path().join("r2"), &cfg, &url);
    wait_visible(
        "a real login on replica 2",
        &r2.map(),
        &["192.0.2.60".into()],
    );
    for map in [r.map(), r2.map()] {
        assert_eq!(postmap_q(&map, "203.0.113.9"), None);
        assert_eq!(postmap_q(&map, "127.0.0.1"), None);
    }
    let capped = postmap_q(&r2.map(), "203.0.113.10").expect("a bounded forged grant");
    assert!(expiry_of(&capped) <= now() + 600 + 1, "{capped}");
}

/// Writers starting together on an empty database migrate once (GET_LOCK); a replica
/// whose database user may only SELECT follows a current schema.
#[test]
fn concurrent_start_migrates_once_and_replicas_only_select() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "");
    let writers: Vec<(Daemon, PathBuf)> = (1..=3)
        .map(|i| writer(&tmp.path().join(format!("w{i}")), &cfg, "10m"))
        .collect();
    for i in 1..=3 {
        wait_writer_connected(&tmp.path().join(format!("w{i}")));
    }
    assert_eq!(
        m.sql("SELECT count(*), MAX(version) FROM dovegate_schema"),
        "2\t2"
    );
    m.root(&format!(
        "CREATE USER 'reader'@'127.0.0.1' IDENTIFIED BY 'r3ad';
         GRANT SELECT ON {}.* TO 'reader'@'127.0.0.1';",
        mariadb::DB
    ));
    let ro = tmp.path().join("ro.url");
    std::fs::write(
        &ro,
        format!("mysql://reader:r3ad@127.0.0.1:{}/{}\n", m.port, mariadb::DB),
    )
    .unwrap();
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = Replica::start(&tmp.path().join("r"), &cfg, &ro);
    for (i, (_, log)) in writers.iter().enumerate() {
        append(log, &login_line(&format!("192.0.2.{}", 70 + i), "frank"));
    }
    wait_visible(
        "every writer's login on the read-only replica",
        &r.map(),
        &[
            "192.0.2.70".into(),
            "192.0.2.71".into(),
            "192.0.2.72".into(),
        ],
    );
}

/// `dovegate check-config` and the daemon refuse a world-readable URL file (it holds the
/// password) without printing the password; both URL files at once are refused.
#[test]
fn url_file_checks() {
    let tmp = common::tempdir();
    let url = tmp.path().join("my.url");
    std::fs::write(&url, "mysql://dovegate:pa55word@127.0.0.1:3306/mail\n").unwrap();
    std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cfg = config(tmp.path(), &url, "");
    let out = common::dovegate(&["check-config", "--config", &cfg.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("readable by every user"), "{err}");
    assert!(!err.contains("pa55word"), "{err}");
    std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let both = config(
        tmp.path(),
        &url,
        &format!("postgres_url_file = \"{}\"\n", url.display()),
    );
    let out = common::dovegate(&["check-config", "--config", &both.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not both"), "{err}");
}

/// The Dovecot wiki's setup as a migration path: the site's `popbsmtp` table and its
/// Postfix `mysql:` map with the wiki's query keep working while dovegate writes the table
/// (instead of the post-login script and the cron job); the direct `mysql:` query on
/// dovegate's own table answers as the replica's map does; a revoke empties all three.
#[test]
fn popbsmtp_table_and_postfix_mysql_maps() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    // The site's table as the wiki creates it, with a row from the script's days.
    m.sql(
        "CREATE TABLE popbsmtp (address varchar(39) NOT NULL PRIMARY KEY, last_seen datetime NOT NULL);
         INSERT INTO popbsmtp VALUES ('192.0.2.200', NOW() - INTERVAL 2 HOUR)",
    );
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(
        tmp.path(),
        &url,
        "mysql_popbsmtp_table = \"popbsmtp\"\n[grant]\nttl = \"30m\"\n",
    );
    let wdir = tmp.path().join("w");
    let (_w, log) = writer(&wdir, &cfg, "30m");
    wait_writer_connected(&wdir);
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    let cf = |name: &str, query: &str| {
        let path = tmp.path().join(name);
        std::fs::write(
            &path,
            format!(
                "hosts = inet:127.0.0.1:{}\nuser = {}\npassword = {}\ndbname = {}\nquery = {query}\n",
                m.port,
                mariadb::USER,
                mariadb::PASSWORD,
                mariadb::DB
            ),
        )
        .unwrap();
        format!("mysql:{}", path.display())
    };
    let wiki = cf(
        "wiki.cf",
        "SELECT 'OK' FROM popbsmtp WHERE last_seen >= DATE_SUB(NOW(), INTERVAL 30 MINUTE) AND address = '%s'",
    );
    let direct = cf(
        "direct.cf",
        "SELECT 'OK' FROM dovegate_grants WHERE address = '%s' AND expires > UTC_TIMESTAMP() AND updated_at <= UTC_TIMESTAMP() + INTERVAL 60 SECOND AND expires <= updated_at + INTERVAL 30 MINUTE",
    );
    append(&log, &login_line("192.0.2.50", "gina"));
    append(&log, &login_line("2001:db8::50", "gina"));
    wait_visible(
        "logins on the replica",
        &r.map(),
        &["192.0.2.50".into(), "2001:db8::50".into()],
    );
    for key in ["192.0.2.50", "2001:db8::50"] {
        assert_eq!(
            common::postmap_table(&wiki, key).as_deref(),
            Some("OK"),
            "{key}"
        );
        assert_eq!(
            common::postmap_table(&direct, key).as_deref(),
            Some("OK"),
            "{key}"
        );
    }
    // What smtpd also asks (shortened forms, no reverse DNS), and the script's old row
    // (the wiki's query keeps its own 30 minutes), grant nothing; the answers agree with
    // the replica's map.
    for key in ["192.0.2", "192.0", "unknown", "192.0.2.200", "192.0.2.51"] {
        assert_eq!(common::postmap_table(&wiki, key), None, "{key}");
        assert_eq!(common::postmap_table(&direct, key), None, "{key}");
        assert_eq!(postmap_q(&r.map(), key), None, "{key}");
    }
    // A revoke removes the row from the wiki's table too: every answer is no.
    common::fleet::revoke(&cfg, &wdir.join("relay"), "192.0.2.50");
    assert_eq!(common::postmap_table(&wiki, "192.0.2.50"), None);
    assert_eq!(common::postmap_table(&direct, "192.0.2.50"), None);
    wait_for("revoke on the replica", FLEET_PATIENCE, || {
        postmap_q(&r.map(), "192.0.2.50").is_none()
    });
    assert_eq!(
        common::postmap_table(&wiki, "2001:db8::50").as_deref(),
        Some("OK")
    );
}

/// A hung MariaDB (stopped, its kernel still accepting connections) never holds a writer's
/// local map for long, also for a writer started while it hangs; what was committed
/// meanwhile reaches the database and the replica when it answers again.
#[test]
fn hung_database_bounds_the_wait() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w1, log1) = writer(&tmp.path().join("w1"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w1"));
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    m.signal(libc::SIGSTOP);
    let started = Instant::now();
    let (_w2, log2) = writer(&tmp.path().join("w2"), &cfg, "10m");
    append(&log1, &login_line("192.0.2.31", "ivan"));
    append(&log2, &login_line("192.0.2.32", "ivan"));
    wait_visible(
        "w1's own map",
        &tmp.path().join("w1/relay"),
        &["192.0.2.31".into()],
    );
    wait_visible(
        "w2's own map",
        &tmp.path().join("w2/relay"),
        &["192.0.2.32".into()],
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "local maps waited {took:?}");
    m.signal(libc::SIGCONT);
    wait_visible(
        "both logins on the replica after the hang",
        &r.map(),
        &["192.0.2.31".into(), "192.0.2.32".into()],
    );
}

/// A replica host reading from a MariaDB replica of the primary the writers write (real
/// binary-log replication between two servers): the change sequence arrives in commit
/// order through replication, so grants and revokes reach the map as from the primary.
#[test]
fn replica_follows_a_mariadb_replica() {
    let tmp = common::tempdir();
    let primary = Maria::start_with(
        &tmp.path().join("primary"),
        &["--log-bin=binlog", "--server-id=1", "--binlog-format=ROW"],
    );
    primary.root(
        "CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY 'r3pl';
         GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';
         RESET MASTER;",
    );
    // The same database and user exist on both (made by start_with): replicate from now on.
    let second = Maria::start_with(
        &tmp.path().join("second"),
        &["--server-id=2", "--read-only"],
    );
    second.root(&format!(
        "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='repl',
             MASTER_PASSWORD='r3pl', MASTER_USE_GTID=slave_pos;
         START SLAVE;",
        primary.port
    ));
    let url = primary.url_file(&tmp.path().join("primary.url"));
    let second_url = second.url_file(&tmp.path().join("second.url"));
    let cfg = config(tmp.path(), &url, "");
    let wdir = tmp.path().join("w");
    let (_w, log) = writer(&wdir, &cfg, "10m");
    wait_writer_connected(&wdir);
    wait_for("the schema replicated", FLEET_PATIENCE, || {
        let v = second.sql_as(
            mariadb::USER,
            mariadb::PASSWORD,
            "SELECT MAX(version) FROM dovegate_schema",
        );
        if v.as_deref() != Ok("2") {
            std::thread::sleep(Duration::from_millis(100));
        }
        v.as_deref() == Ok("2")
    });
    let r = Replica::start(&tmp.path().join("r"), &cfg, &second_url);
    let ips: Vec<String> = (1..=20).map(|i| format!("198.51.100.{i}")).collect();
    for ip in &ips {
        append(&log, &login_line(ip, "judy"));
    }
    wait_visible("logins through replication", &r.map(), &ips);
    common::fleet::revoke(&cfg, &wdir.join("relay"), "198.51.100.7");
    wait_for("the revoke through replication", FLEET_PATIENCE, || {
        postmap_q(&r.map(), "198.51.100.7").is_none()
    });
    assert!(postmap_q(&r.map(), "198.51.100.8").is_some());
    // The read-only server refuses the replica's writes; it needs none.
    assert!(second
        .sql_as(
            mariadb::USER,
            mariadb::PASSWORD,
            "DELETE FROM dovegate_grants"
        )
        .is_err());
}

/// `require_ssl=true` with `sslrootcert=FILE`: TLS with the server's certificate checked;
/// a user that must use TLS gets its grants through; a CA that did not sign the server's
/// certificate is refused (the writer spills and says the database is unreachable).
#[test]
fn tls_with_verified_server_certificate() {
    let tmp = common::tempdir();
    let (m, ca) = Maria::start_tls(tmp.path());
    let url = tmp.path().join("tls.url");
    let write_url = |ca: &Path| {
        std::fs::write(
            &url,
            format!(
                "mysql://{}:{}@127.0.0.1:{}/{}?require_ssl=true&sslrootcert={}\n",
                mariadb::USER,
                mariadb::PASSWORD,
                m.port,
                mariadb::DB,
                ca.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    };
    write_url(&ca);
    let cfg = config(tmp.path(), &url, "");
    let (_w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w"));
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    append(&log, &login_line("192.0.2.41", "kim"));
    wait_visible("a login through TLS", &r.map(), &["192.0.2.41".into()]);
    assert!(r.status()["database"].as_str().unwrap().ends_with("(TLS)"));
    // Plain connections are refused for this user: TLS was in use.
    let plain = Command::new("mariadb")
        .args(["--no-defaults", "--skip-ssl", "-h127.0.0.1"])
        .arg(format!("-P{}", m.port))
        .arg(format!("-u{}", mariadb::USER))
        .arg(format!("-p{}", mariadb::PASSWORD))
        .args(["-e", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        !plain.status.success() && String::from_utf8_lossy(&plain.stderr).contains("Access denied"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    // Another CA: the certificate is not trusted, nothing connects.
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
            "o.key",
            "-out",
            "o.pem",
            "-days",
            "2",
            "-subj",
            "/CN=other",
        ])
        .current_dir(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    write_url(&other.join("o.pem"));
    let (w2, _) = writer(&tmp.path().join("w2"), &cfg, "10m");
    wait_for("the untrusted server refused", FLEET_PATIENCE, || {
        fleet_status(&tmp.path().join("w2"))["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    });
    let st = fleet_status(&tmp.path().join("w2"));
    assert_ne!(st["connected"], serde_json::Value::Bool(true));
    let e = st["last_error"].as_str().unwrap_or_default();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    assert!(!e.contains(mariadb::PASSWORD), "{e}");
    drop(w2);
}

/// The policy state between hosts through MariaDB: a user's caps count on every host,
/// and a user who trips one loses the grants every host gave it and is let in again
/// everywhere by one `dovegate unblock` (the same test on PostgreSQL: tests/postgres.rs).
#[test]
fn caps_and_blocks_hold_across_hosts() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    common::fleet::caps_and_blocks_hold_across_hosts(
        tmp.path(),
        "mysql_url_file",
        &url,
        // Rows as psql -At prints them: columns joined by '|', true as 't'.
        &|sql| m.sql(sql).replace('\t', "|"),
        "SELECT IF(UTC_TIMESTAMP(6) > revoked_at + INTERVAL 4 SECOND, 't', 'f') FROM dovegate_revocations WHERE address = '203.0.113.40'",
    );
}

/// A DELETE or TRUNCATE by hand leaves no change sequence value: the replica counts the
/// rows it knows the table holds every few seconds and resyncs when the count differs, so
/// the grant leaves its map within seconds, not at the 5-minute resync. Rows written
/// before the replica's snapshot and after it alike.
#[test]
fn delete_by_hand_reaches_the_replica_within_seconds() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w, log) = writer(&tmp.path().join("w"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w"));
    let before: Vec<String> = (1..=3).map(|i| format!("192.0.2.{}", 110 + i)).collect();
    for ip in &before {
        append(&log, &login_line(ip, "erin"));
    }
    wait_for("the first grants in the database", FLEET_PATIENCE, || {
        let n = m.sql("SELECT count(*) FROM dovegate_grants WHERE address LIKE '192.0.2.11_'");
        if n != "3" {
            std::thread::sleep(Duration::from_millis(100));
        }
        n == "3"
    });
    let r = Replica::start(&tmp.path().join("r"), &cfg, &url);
    wait_visible("the grants on the replica", &r.map(), &before);
    let after: Vec<String> = (1..=2).map(|i| format!("192.0.2.{}", 120 + i)).collect();
    for ip in &after {
        append(&log, &login_line(ip, "erin"));
    }
    wait_visible("the later grants on the replica", &r.map(), &after);
    let noticed = |r: &Replica| r.log().matches("without a change sequence value").count();
    let reads = |r: &Replica| r.status()["change_reads"].as_u64().unwrap_or(0);

    // One row from the snapshot, one written after it; both well before the resync.
    let bound = Duration::from_secs(30);
    m.sql("DELETE FROM dovegate_grants WHERE address IN ('192.0.2.111', '192.0.2.121')");
    wait_for("the deleted grants gone from the replica", bound, || {
        postmap_q(&r.map(), "192.0.2.111").is_none() && postmap_q(&r.map(), "192.0.2.121").is_none()
    });
    for ip in ["192.0.2.112", "192.0.2.113", "192.0.2.122"] {
        assert!(postmap_q(&r.map(), ip).is_some(), "{ip} removed too");
    }
    assert_eq!(noticed(&r), 1, "{}", r.log());

    // Sequenced changes only: no more resyncs, however many counts pass (one every ten
    // reads of changes).
    append(&log, &login_line("192.0.2.131", "erin"));
    wait_visible("a later login", &r.map(), &["192.0.2.131".into()]);
    let from = reads(&r);
    wait_for("three counts", bound, || {
        let done = reads(&r) >= from + 30;
        if !done {
            std::thread::sleep(Duration::from_millis(200));
        }
        done
    });
    assert_eq!(noticed(&r), 1, "{}", r.log());

    // TRUNCATE: every grant goes.
    m.sql("TRUNCATE TABLE dovegate_grants");
    wait_for("the truncated grants gone", bound, || {
        postmap_s(&r.map()).is_empty()
    });
    assert_eq!(noticed(&r), 2, "{}", r.log());
}

/// As on PostgreSQL: a manual grant reaches the replica's log with the host that wrote it
/// (the audit columns, read with the change), and a revoke is logged there too.
#[test]
fn replica_logs_who_granted_by_hand() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    common::fleet::replica_logs_who_granted_by_hand(tmp.path(), "mysql_url_file", &url);
}

/// User names in the policy tables compare byte for byte, as PostgreSQL's text does:
/// `bob` and `bob ` are two users (a padding collation would make a block of one absorb
/// or unblock the other).
#[test]
fn policy_tables_compare_user_names_byte_for_byte() {
    let tmp = common::tempdir();
    let m = Maria::start(tmp.path());
    let url = m.url_file(&tmp.path().join("my.url"));
    let cfg = config(tmp.path(), &url, "");
    let (_w, _log) = writer(&tmp.path().join("w"), &cfg, "10m");
    wait_writer_connected(&tmp.path().join("w"));
    m.sql(
        "INSERT INTO dovegate_blocked_users (user_name, cap, blocked_at, blocked_by)
         VALUES ('bob', 'user-messages-per-hour', NOW(6), 'h'),
                ('bob ', 'user-messages-per-hour', NOW(6), 'h')",
    );
    assert_eq!(
        m.sql("SELECT COUNT(*) FROM dovegate_blocked_users WHERE user_name = 'bob'"),
        "1"
    );
}
