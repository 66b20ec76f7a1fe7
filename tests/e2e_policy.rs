//! The policy server with a real Postfix smtpd on loopback (XCLIENT sets the client
//! address), configured as the README says: relay for granted clients, 450 "check your
//! mail first" after a grant ends, 554 for others and whenever dovegate is down, caps per
//! user across addresses, receipts (log, header, `dovegate trace`, `dovegate why`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The README's restriction list, with `extra` before reject_unauth_destination.
/// The restriction asking dovegate's policy server at `DIR/policy`.
fn policy_check(dir: &Path) -> String {
    format!(
        "check_policy_service {{ unix:{}, default_action=DUNNO }}",
        dir.join("policy").display()
    )
}

fn relay_restrictions(socket: &Path, extra: &str) -> String {
    format!(
        "permit_mynetworks, permit_sasl_authenticated, permit_auth_destination, \
         check_policy_service {{ unix:{}, default_action=DUNNO }}, {extra}reject_unauth_destination",
        socket.display()
    )
}

/// A configuration following `log`, with `[policy]` listening on DIR/policy plus `policy`
/// lines.
fn config(dir: &Path, log: &Path, policy: &str) -> PathBuf {
    let cfg = dir.join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nlogs = [\"{}\"]\n[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n\
             [policy]\nlisten = \"{}\"\n{policy}\n",
            log.display(),
            dir.join("relay").display(),
            dir.join("state").display(),
            dir.join("policy").display(),
        ),
    )
    .unwrap();
    cfg
}

fn start(dir: &Path, cfg: &Path, extra: &[&str]) -> Daemon {
    let cfg = cfg.display().to_string();
    let mut args = vec!["--config", cfg.as_str()];
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, &args);
    wait_for("map and policy socket", PATIENCE, || {
        dir.join("relay.lmdb").exists() && dir.join("policy").exists()
    });
    d
}

/// main.cf lines: any local recipient exists (no alias or passwd lookups in a private
/// instance); nothing leaves the machine (messages wait in the queue for postcat).
const LOCAL: &str = "local_recipient_maps =\nalias_maps =\ndefer_transports = local, smtp\n";

/// XCLIENT as `addr`, EHLO, MAIL; the replies to each RCPT.
fn begin(s: &mut Smtp, addr: &str, rcpts: &[&str]) -> Vec<String> {
    let r = s.cmd(&format!("XCLIENT ADDR={addr} NAME=[UNAVAILABLE]"));
    assert!(r.starts_with("220"), "XCLIENT: {r}");
    assert!(s.cmd("EHLO client.example").starts_with("250"));
    let r = s.cmd("MAIL FROM:<user@example.com>");
    assert!(r.starts_with("250"), "MAIL: {r}");
    rcpts
        .iter()
        .map(|r| s.cmd(&format!("RCPT TO:<{r}>")))
        .collect()
}

/// DATA and a short message; the reply to its end.
fn data(s: &mut Smtp) -> String {
    let r = s.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    s.cmd("Subject: test\r\n\r\nhello\r\n.")
}

fn queue_id(reply: &str) -> String {
    reply
        .split("queued as ")
        .nth(1)
        .unwrap_or_else(|| panic!("no queue id in {reply}"))
        .trim()
        .to_string()
}

/// A relay attempt as `addr` in a new SMTP session (XCLIENT works once per session).
fn relay(port: u16, addr: &str) -> String {
    Smtp::connect(port).relay_as(addr)
}

fn wait_granted(dir: &Path, ip: &str) {
    let map = dir.join("relay");
    wait_for(&format!("{ip} granted"), PATIENCE, || {
        postmap_q(&map, ip).is_some()
    });
}

#[test]
fn granted_relays_ended_defers_others_and_a_stopped_dovegate_keep_the_relay_closed() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let cfg = config(d.path(), &log, "recent = \"1h\"");
    let mut daemon = start(d.path(), &cfg, &["--ttl", "3s"]);
    // What DEFER_IF_PERMIT would do here: a later reject_unauth_destination still rejects
    // (554), so the client would bounce the message: the server answers DEFER.
    let dip = d.path().join("dip");
    std::fs::write(&dip, "198.51.100.9 DEFER_IF_PERMIT test\n").unwrap();
    let pf = Postfix::start_with(
        &d.path().join("pf"),
        &relay_restrictions(
            &d.path().join("policy"),
            &format!("check_client_access texthash:{}, ", dip.display()),
        ),
        LOCAL,
    );
    let never = relay(pf.port, "192.0.2.99");
    assert!(never.starts_with("554"), "never granted: {never}");
    let dip_reply = relay(pf.port, "198.51.100.9");
    assert!(
        dip_reply.starts_with("554"),
        "DEFER_IF_PERMIT before reject_unauth_destination: {dip_reply}"
    );
    // Local recipients never reach the policy server.
    let local = begin(
        &mut Smtp::connect(pf.port),
        "192.0.2.99",
        &["root@localhost"],
    );
    assert!(local[0].starts_with("250"), "local: {}", local[0]);

    append(&log, &sessionless_login_line("203.0.113.7", "alice"));
    wait_granted(d.path(), "203.0.113.7");
    let granted = relay(pf.port, "203.0.113.7");
    assert!(granted.starts_with("250"), "granted: {granted}");

    // The grant ends (ttl 3s): 450, the client keeps its message.
    wait_for("203.0.113.7 expired", PATIENCE, || {
        postmap_q(&d.path().join("relay"), "203.0.113.7").is_none()
    });
    wait_for("the engine saw the expiry", PATIENCE, || {
        daemon.log().contains("grant expired")
    });
    let ended = relay(pf.port, "203.0.113.7");
    assert!(
        ended.starts_with("450 4.7.1") && ended.contains("check your mail first"),
        "recently ended: {ended}"
    );

    // A granted client, then dovegate stops: relaying is refused, local mail still flows.
    append(&log, &login_line("203.0.113.8", "bob"));
    wait_granted(d.path(), "203.0.113.8");
    assert!(relay(pf.port, "203.0.113.8").starts_with("250"));
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    assert!(!d.path().join("policy").exists(), "socket removed");
    let down = relay(pf.port, "203.0.113.8");
    assert!(down.starts_with("554"), "dovegate down: {down}");
    let local = begin(
        &mut Smtp::connect(pf.port),
        "203.0.113.8",
        &["root@localhost"],
    );
    assert!(
        local[0].starts_with("250"),
        "local while down: {}",
        local[0]
    );
}

/// `dovegate ARGS --config CFG`: (exit code, stdout, stderr).
fn cli(args: &[&str], cfg: &Path) -> (Option<i32>, String, String) {
    let mut all = args.to_vec();
    let cfg = cfg.display().to_string();
    all.extend(["--config", cfg.as_str()]);
    let out = dovegate(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn caps_are_per_user_across_addresses_and_receipts_name_the_login() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let metrics = free_port();
    let cfg = config(
        d.path(),
        &log,
        &format!(
            "receipt_header = true\nuser_messages_per_hour = 2\nuser_recipients_per_hour = 3\n\
         user_messages_per_day = 0\nuser_recipients_per_day = 0\ngrant_messages_per_hour = 0\n\
         grant_messages_per_day = 0\ngrant_recipients_per_hour = 0\ngrant_recipients_per_day = 0\n\
         [serve]\nmetrics = \"127.0.0.1:{metrics}\""
        ),
    );
    let daemon = start(d.path(), &cfg, &[]);
    let policy = policy_check(d.path());
    let pf = Postfix::start_with(
        &d.path().join("pf"),
        &relay_restrictions(&d.path().join("policy"), ""),
        &format!(
            "{LOCAL}smtpd_data_restrictions = {policy}\nsmtpd_end_of_data_restrictions = {policy}\n"
        ),
    );
    // alice from two addresses (session=<abcdEFGH1234>), bob from a third.
    append(&log, &login_line("203.0.113.20", "alice"));
    append(&log, &login_line("203.0.113.21", "alice"));
    append(&log, &login_line("203.0.113.22", "bob"));
    for ip in ["203.0.113.20", "203.0.113.21", "203.0.113.22"] {
        wait_granted(d.path(), ip);
    }

    // Message 1 from the first address: relayed, with a receipt.
    let mut s = Smtp::connect(pf.port);
    let r = begin(&mut s, "203.0.113.20", &["a@elsewhere.example"]);
    assert!(r[0].starts_with("250"), "{r:?}");
    let q1 = queue_id(&data(&mut s));
    let out = Command::new("postcat")
        .args(["-c", &pf.dir.join("conf").display().to_string(), "-q", &q1])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "X-Dovegate-Relay: client=203.0.113.20 user=alice protocol=imap session=abcdEFGH1234"
        ),
        "postcat -q {q1}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the receipt in the log", PATIENCE, || {
        daemon.log().lines().any(|l| {
            l.contains("relayed")
                && l.contains(&format!("queue_id={q1}"))
                && l.contains("user=alice")
                && l.contains("session=abcdEFGH1234")
        })
    });
    let (code, out, err) = cli(&["trace", &q1], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("queue_id={q1} client=203.0.113.20 user=alice protocol=imap session=abcdEFGH1234 granted_at=20")),
        "{out}"
    );
    let (code, _, err) = cli(&["trace", "NOSUCHID"], &cfg);
    assert_eq!(code, Some(1), "{err}");
    wait_for("dovegate why", PATIENCE, || {
        let (code, out, _) = cli(&["why", "203.0.113.20"], &cfg);
        code == Some(0) && out.contains("user=alice protocol=imap session=abcdEFGH1234")
    });

    // Message 2 from alice's second address: the user's recipient cap (3) is shared; the
    // recipient over it is the one deferred, the message goes with the others.
    let mut s = Smtp::connect(pf.port);
    let r = begin(
        &mut s,
        "203.0.113.21",
        &[
            "b@elsewhere.example",
            "c@elsewhere.example",
            "d@elsewhere.example",
        ],
    );
    assert!(r[0].starts_with("250") && r[1].starts_with("250"), "{r:?}");
    assert!(
        r[2].starts_with("450 4.7.1") && r[2].contains("cap user_recipients_per_hour reached"),
        "{r:?}"
    );
    assert!(data(&mut s).starts_with("250"));
    // The user's message cap (2) is reached: the next message is deferred at once.
    let r = begin(
        &mut Smtp::connect(pf.port),
        "203.0.113.20",
        &["e@elsewhere.example"],
    );
    assert!(
        r[0].starts_with("450 4.7.1") && r[0].contains("cap user_messages_per_hour reached"),
        "{r:?}"
    );

    // bob: three messages under way at once; the one that ends over the message cap is
    // deferred at its end.
    let mut sessions: Vec<Smtp> = (0..3)
        .map(|i| {
            let mut s = Smtp::connect(pf.port);
            let r = begin(
                &mut s,
                "203.0.113.22",
                &[&format!("x{i}@elsewhere.example")],
            );
            assert!(r[0].starts_with("250"), "{r:?}");
            s
        })
        .collect();
    assert!(data(&mut sessions[0]).starts_with("250"));
    assert!(data(&mut sessions[1]).starts_with("250"));
    let third = data(&mut sessions[2]);
    assert!(
        third.starts_with("450 4.7.1") && third.contains("cap user_messages_per_hour reached"),
        "{third}"
    );
    // Counted where the daemon's metrics are: the caps by name, the receipts (alice's two
    // messages, bob's two), the headers (bob's third message got one at DATA before its
    // end was deferred), in a scrape Prometheus accepts.
    let m = scrape(metrics);
    for want in [
        "dovegate_policy_caps_tripped_total{cap=\"user_recipients_per_hour\"} 1",
        "dovegate_policy_caps_tripped_total{cap=\"user_messages_per_hour\"} 2",
        "dovegate_policy_answers_total{action=\"defer_cap\"} 3",
        "dovegate_policy_answers_total{action=\"prepend\"} 5",
        "dovegate_policy_receipts_total 4",
    ] {
        assert!(m.contains(want), "missing {want}:\n{m}");
    }
    promtool_accepts(d.path(), &m);
    // Restarted, it still knows who logged in behind the grants: receipts, the user's
    // caps (counted afresh) and `why` keep naming alice.
    drop(sessions);
    let mut daemon = daemon;
    assert_eq!(daemon.stop(), Some(0));
    let grants_file = d.path().join("state/policy-grants.json");
    let before = std::fs::metadata(&grants_file).unwrap().modified().unwrap();
    let daemon = start(d.path(), &cfg, &[]);
    wait_for("the grants file rewritten", PATIENCE, || {
        std::fs::metadata(&grants_file)
            .and_then(|m| m.modified())
            .ok()
            != Some(before)
    });
    assert!(daemon.log().contains("logins behind live grants restored"));
    let (code, out, err) = cli(&["why", "203.0.113.21"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("user=alice protocol=imap session=abcdEFGH1234"),
        "{out}"
    );
    let mut s = Smtp::connect(pf.port);
    let r = begin(&mut s, "203.0.113.21", &["f@elsewhere.example"]);
    assert!(r[0].starts_with("250"), "{r:?}");
    let q = queue_id(&data(&mut s));
    wait_for("a receipt naming alice after the restart", PATIENCE, || {
        let (code, out, _) = cli(&["trace", &q], &cfg);
        code == Some(0) && out.contains("user=alice")
    });
}

#[test]
fn a_user_who_trips_a_cap_loses_every_grant_until_unblocked() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let cfg = config(
        d.path(),
        &log,
        "block_on_cap = true\nuser_recipients_per_hour = 1\nuser_messages_per_hour = 0\n\
         user_messages_per_day = 0\nuser_recipients_per_day = 0\ngrant_messages_per_hour = 0\n\
         grant_messages_per_day = 0\ngrant_recipients_per_hour = 0\ngrant_recipients_per_day = 0",
    );
    let daemon = start(d.path(), &cfg, &[]);
    let pf = Postfix::start_with(
        &d.path().join("pf"),
        &relay_restrictions(&d.path().join("policy"), ""),
        LOCAL,
    );
    let map = d.path().join("relay");
    append(&log, &sessionless_login_line("203.0.113.30", "mallory"));
    append(&log, &sessionless_login_line("203.0.113.31", "mallory"));
    append(&log, &sessionless_login_line("203.0.113.32", "carol"));
    for ip in ["203.0.113.30", "203.0.113.31", "203.0.113.32"] {
        wait_granted(d.path(), ip);
    }
    let r = begin(
        &mut Smtp::connect(pf.port),
        "203.0.113.30",
        &["a@elsewhere.example", "b@elsewhere.example"],
    );
    assert!(r[0].starts_with("250"), "{r:?}");
    assert!(r[1].starts_with("450 4.7.1"), "{r:?}");
    // Every grant of the user goes from the map; others stay.
    for ip in ["203.0.113.30", "203.0.113.31"] {
        wait_for(&format!("{ip} revoked"), PATIENCE, || {
            postmap_q(&map, ip).is_none()
        });
    }
    assert!(postmap_q(&map, "203.0.113.32").is_some());
    assert!(relay(pf.port, "203.0.113.31").starts_with("554"));
    assert!(relay(pf.port, "203.0.113.32").starts_with("250"));
    assert!(daemon.log().contains("user blocked (policy.block_on_cap)"));

    // A second user behind carol's address: marked shared (log, why).
    append(&log, &sessionless_login_line("203.0.113.32", "dave"));
    wait_for("address shared", PATIENCE, || {
        daemon.log().contains("address shared")
    });
    wait_for("why says shared", PATIENCE, || {
        let (code, out, _) = cli(&["why", "203.0.113.32"], &cfg);
        code == Some(0) && out.contains("shared users=carol,dave")
    });

    // Logging in again grants nothing until unblocked.
    append(&log, &sessionless_login_line("203.0.113.30", "mallory"));
    wait_for("the login refused", PATIENCE, || {
        daemon.log().contains("login of a blocked user not granted")
    });
    assert_eq!(postmap_q(&map, "203.0.113.30"), None);
    let (code, out, err) = cli(&["unblock", "mallory"], &cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("unblocked mallory"), "{out}");
    let (code, _, _) = cli(&["unblock", "mallory"], &cfg);
    assert_eq!(code, Some(1), "not blocked any more");
    // The daemon sees the unblock within its next probe; a login then grants again.
    wait_for("the unblock seen", PATIENCE, || {
        daemon.log().contains("blocked users re-read blocked=0")
    });
    append(&log, &sessionless_login_line("203.0.113.30", "mallory"));
    wait_granted(d.path(), "203.0.113.30");
}

/// `grant.ipv6_prefix = 64` with the policy server (issue 22): a login from one address of
/// a /64 lets every address of it relay through the real smtpd (OK, with a receipt naming
/// the login), and no address outside it (554).
#[test]
fn a_prefix_grant_answers_for_the_whole_prefix() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    let cfg = config(d.path(), &log, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("[grant]\nipv6_prefix = 64\n{text}")).unwrap();
    let _daemon = start(d.path(), &cfg, &[]);
    let pf = Postfix::start_with(
        &d.path().join("pf"),
        &relay_restrictions(&d.path().join("policy"), ""),
        &format!(
            "{LOCAL}smtpd_end_of_data_restrictions = {}\n",
            policy_check(d.path())
        ),
    );
    append(&log, &sessionless_login_line("2001:db8:1:2::7", "erin"));
    wait_granted(d.path(), "2001:db8:1:2");
    for inside in [
        "2001:db8:1:2::7",
        "2001:db8:1:2::99",
        "2001:db8:1:2:ffff::1",
    ] {
        let r = relay(pf.port, inside);
        assert!(r.starts_with("250"), "{inside}: {r}");
    }
    for outside in ["2001:db8:1:3::7", "2001:db8::7"] {
        let r = relay(pf.port, outside);
        assert!(r.starts_with("554"), "{outside}: {r}");
    }
    let mut s = Smtp::connect(pf.port);
    let r = begin(&mut s, "IPV6:2001:db8:1:2::99", &["f@elsewhere.example"]);
    assert!(r[0].starts_with("250"), "{r:?}");
    let q = queue_id(&data(&mut s));
    wait_for("a receipt naming erin", PATIENCE, || {
        let (code, out, _) = cli(&["trace", &q], &cfg);
        code == Some(0) && out.contains("user=erin")
    });
}
