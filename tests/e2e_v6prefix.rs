//! IPv6 prefix grants against a real Postfix smtpd: the key `grant::ipv6_prefix_key` writes
//! for a /64 is found by check_client_access for every address of the prefix (Postfix
//! shortens the client address at `:`), and for no address outside it; a /128 key only for
//! the address itself.

mod common;

use std::net::Ipv6Addr;

use common::*;
use dovegate::grant::ipv6_prefix_key;

#[test]
fn postfix_finds_prefix_keys_for_the_whole_prefix_only() {
    let d = tempdir();
    let map = d.path().join("keys");
    let login: Ipv6Addr = "2001:db8:1:2::7".parse().unwrap();
    let prefix = ipv6_prefix_key(login, 64).unwrap();
    assert_eq!(prefix, "2001:db8:1:2");
    let exact = ipv6_prefix_key("2001:db8:5:6::7".parse().unwrap(), 128).unwrap();
    // postmap builds the map from a source file (keys.lmdb), as Postfix's own tools would.
    std::fs::write(&map, format!("{prefix} OK\n{exact} OK\n")).unwrap();
    let out = postmap(&[&format!("lmdb:{}", map.display())]);
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_file(&map).unwrap();
    let pf = Postfix::start(&d.path().join("pf"), &map);
    // XCLIENT changes the session's client for good: one connection per address.
    let relay = |addr: &str| Smtp::connect(pf.port).relay_as(addr);
    // Hosts of every shape inet_ntop gives: compressed at the start, middle or end of the
    // host part, or not at all.
    for inside in [
        "2001:db8:1:2::99",
        "2001:db8:1:2::7",
        "2001:db8:1:2::",
        "2001:db8:1:2:1::",
        "2001:db8:1:2:1:0:0:1",
        "2001:db8:1:2:ffff:ffff:ffff:ffff",
    ] {
        let r = relay(inside);
        assert!(r.starts_with("250"), "{inside}: {r}");
    }
    for outside in [
        "2001:db8:1:3::1",
        "2001:db8:1::2",
        "2001:db8:1:20::1",
        "2001:db8::",
    ] {
        let r = relay(outside);
        assert!(r.starts_with("554"), "{outside}: {r}");
    }
    // /128: the address only.
    assert!(relay("2001:db8:5:6::7").starts_with("250"));
    let r = relay("2001:db8:5:6::8");
    assert!(r.starts_with("554"), "{r}");
}

/// `dovegate lookup ARGS`: (exit code, stdout).
fn lookup(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin())
        .arg("lookup")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The daemon with `grant.ipv6_prefix = bits`: a login from 2001:db8:1:2::7 lets its /64
/// relay (or only itself at 128), through a real smtpd; `dovegate lookup` agrees.
fn login_then_relay(bits: u8) {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let config = d.path().join("dovegate.toml");
    let sock = d.path().join("socketmap.sock");
    std::fs::write(
        &config,
        format!(
            "[grant]\nipv6_prefix = {bits}\n[serve]\nsocketmap = \"unix:{}\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();
    append(&log, "");
    let _daemon = Daemon::follow(d.path(), &log, &["--config", &cfg]);
    wait_for("socketmap socket", PATIENCE, || sock.exists());
    let pf = Postfix::start(&d.path().join("pf"), &map);
    append(&log, &sessionless_login_line("2001:DB8:1:2::7", "bob"));
    let key = if bits == 64 {
        "2001:db8:1:2"
    } else {
        "2001:db8:1:2::7"
    };
    wait_for(&format!("postmap -q {key}"), PATIENCE, || {
        postmap_q(&map, key).is_some()
    });
    let keys: Vec<String> = postmap_s(&map).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![key.to_string()]);
    let relay = |addr: &str| Smtp::connect(pf.port).relay_as(addr);
    let r = relay("2001:db8:1:2::7");
    assert!(r.starts_with("250"), "{r}");
    let neighbour = relay("2001:db8:1:2::99");
    if bits == 64 {
        assert!(neighbour.starts_with("250"), "{neighbour}");
    } else {
        assert!(neighbour.starts_with("554"), "{neighbour}");
    }
    let r = relay("2001:db8:1:3::1");
    assert!(r.starts_with("554"), "{r}");
    // The socketmap server answers for the address Postfix asks about.
    let socketmap =
        |addr: &str| postmap_table(&format!("socketmap:unix:{}:access", sock.display()), addr);
    assert!(socketmap("2001:db8:1:2::7").is_some());
    assert_eq!(socketmap("2001:db8:1:2::99").is_some(), bits == 64);
    assert_eq!(socketmap("2001:db8:1:3::1"), None);
    let m = map.display().to_string();
    let (code, out) = lookup(&["--config", &cfg, "--map", &m, "2001:db8:1:2::99"]);
    if bits == 64 {
        assert_eq!(code, Some(0));
        assert!(out.starts_with("OK expires="), "{out}");
    } else {
        assert_eq!(code, Some(1), "{out}");
    }
    let (code, _) = lookup(&["--config", &cfg, "--map", &m, "2001:db8:1:3::1"]);
    assert_eq!(code, Some(1));
    let list = std::process::Command::new(bin())
        .args(["list", "--config", &cfg, "--map", &m])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.starts_with(&format!("{key}\t")), "{list}");
    if bits == 64 {
        // Revoking an address inside the prefix revokes the grant it relays by.
        let out = std::process::Command::new(bin())
            .args(["revoke", "--config", &cfg, "--map", &m, "2001:db8:1:2::99"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(postmap_s(&map), vec![]);
        let r = relay("2001:db8:1:2::7");
        assert!(r.starts_with("554"), "{r}");
    }
}

#[test]
fn a_login_grants_its_64_prefix() {
    login_then_relay(64);
}

#[test]
fn by_default_only_the_address_relays() {
    login_then_relay(128);
}
