//! The auth-policy endpoint's request: the query string and Dovecot's JSON body.
//! Input: the query, a NUL, the body.

use dovegate::push::policy::{judge, Verdict};

pub fn check(data: &[u8]) {
    let (query, body) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let query = std::str::from_utf8(query).ok();
    let protocols = ["imap".to_string(), "pop3".to_string()];
    let verdict = judge(query, body, &protocols);
    if let Verdict::Grant(ip) = verdict {
        // Only a successful report of an enabled protocol, neither proxied nor nologin,
        // whose `remote` is this address, grants.
        let v: serde_json::Value = serde_json::from_slice(body).expect("granted a non-JSON body");
        assert_eq!(v.get("success"), Some(&serde_json::Value::Bool(true)));
        let protocol = v.get("protocol").and_then(|p| p.as_str()).unwrap();
        assert!(protocols.iter().any(|p| p == protocol));
        assert_eq!(v.get("proxy").and_then(|p| p.as_str()), Some("-"));
        assert_eq!(v.get("nologin").and_then(|p| p.as_str()), Some("-"));
        let remote = v.get("remote").and_then(|r| r.as_str()).unwrap();
        assert_eq!(dovegate::grant::parse_any_ip(remote), Some(ip));
        assert!(query.unwrap().split('&').any(|kv| kv == "command=report"));
    }
}
