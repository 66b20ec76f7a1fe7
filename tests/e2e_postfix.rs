//! End to end with a real Postfix: dovegate follows a log file, `postmap -q` sees the
//! grants, a real loopback smtpd relays for granted clients only, inside one SMTP session
//! while grants come and go.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

#[test]
fn grants_reach_postfix_smtpd_and_expire() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    append(
        &log,
        &format!(
            "{} mail postfix/smtpd[1]: connect from unknown[192.0.2.50]\n",
            bsd_now()
        ),
    );
    // The map exists (empty) before Postfix ever looks (`follow` waits for it): a missing
    // map makes smtpd answer 451 until a reload.
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "5s"]);
    let file = d.path().join("relay.lmdb");
    let pf = Postfix::start(&d.path().join("pf"), &map);
    assert_eq!(postmap_s(&map), vec![]);

    let mut session = Smtp::connect(pf.port);
    let r = session.cmd("XCLIENT ADDR=203.0.113.7 NAME=[UNAVAILABLE]");
    assert!(r.starts_with("220"), "{r}");
    let try_relay = |s: &mut Smtp| {
        assert!(s.cmd("EHLO client.example").starts_with("250"));
        assert!(s.cmd("MAIL FROM:<u@example.com>").starts_with("250"));
        let rcpt = s.cmd("RCPT TO:<x@elsewhere.example>");
        assert!(s.cmd("RSET").starts_with("250"));
        rcpt
    };
    let before = try_relay(&mut session);
    assert!(before.starts_with("554"), "not granted yet: {before}");

    // Sessionless: an open IMAP session would hold its grant past the ttl.
    append(&log, &sessionless_login_line("203.0.113.7", "alice"));
    append(&log, &sessionless_login_line("2001:DB8:1:2::7", "bob"));
    append(
        &log,
        &sessionless_login_line("::ffff:198.51.100.4", "carol"),
    );
    append(&log, &sessionless_login_line("127.0.0.1", "webmail"));
    for key in ["203.0.113.7", "2001:db8:1:2::7", "198.51.100.4"] {
        wait_for(&format!("postmap -q {key}"), PATIENCE, || {
            postmap_q(&map, key).is_some()
        });
        let v = postmap_q(&map, key).unwrap();
        assert!(v.starts_with("OK expires=20"), "{key}: {v}");
    }
    assert_eq!(
        postmap_q(&map, "127.0.0.1"),
        None,
        "loopback is never granted"
    );
    assert_eq!(
        postmap_q(&map, "::ffff:198.51.100.4"),
        None,
        "only canonical keys"
    );

    // Same session, now granted.
    let granted = try_relay(&mut session);
    assert!(
        granted.starts_with("250"),
        "granted client relays: {granted}"
    );
    // Another client is still refused, IPv6 granted client relays.
    let mut other = Smtp::connect(pf.port);
    assert!(other.relay_as("192.0.2.99").starts_with("554"));
    let mut v6 = Smtp::connect(pf.port);
    assert!(v6.relay_as("2001:db8:1:2::7").starts_with("250"));

    // dovegate's own view agrees.
    let out = dovegate(&[
        "lookup",
        "--map",
        &map.display().to_string(),
        "2001:DB8:1:2:0:0:0:7",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK expires="));

    // After the ttl the grants are gone, and the open session is refused again.
    for key in ["203.0.113.7", "2001:db8:1:2::7", "198.51.100.4"] {
        wait_for(&format!("{key} expired"), PATIENCE, || {
            postmap_q(&map, key).is_none()
        });
    }
    let after = try_relay(&mut session);
    assert!(after.starts_with("554"), "expired grant refused: {after}");
    drop(session);

    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    let meta = std::fs::metadata(&file).unwrap();
    // Closed to other users (a reader can stall every write), open to Postfix's group.
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert!(
        !d.path().join("relay.lmdb-lock").exists(),
        "no LMDB lock file"
    );
    assert!(
        !d.path().join("relay").exists(),
        "no file named like the map without .lmdb"
    );
    let maillog = std::fs::read_to_string(pf.dir.join("maillog")).unwrap_or_default();
    assert!(
        !maillog.contains("has changed -- restarting"),
        "map replaced under smtpd:\n{maillog}"
    );
    // The reply code, not a process id that happens to be 451.
    assert!(
        !maillog.lines().any(|l| l.contains(": 451 ")),
        "smtpd saw the map missing:\n{maillog}"
    );
}

#[test]
fn binary_links_the_system_liblmdb() {
    let out = Command::new("ldd").arg(bin()).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("liblmdb"))
        .unwrap_or_else(|| panic!("not linked to liblmdb:\n{text}"));
    assert!(
        line.contains("/lib/x86_64-linux-gnu/liblmdb.so") || line.contains("/usr/lib/"),
        "{line}"
    );
}
