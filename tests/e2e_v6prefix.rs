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
