//! The map's key and value bytes.
//!
//! Postfix's postmap writes key and value with one trailing NUL, and a reader that found
//! one style keeps it; every key and value here therefore ends with exactly one NUL. Keys
//! are the canonical lower-case address text. Values are `<action> expires=<RFC 3339 UTC>`,
//! which Postfix reads as the action (trailing text ignored) and which makes the map the one
//! source of truth for expiry across restarts.

use std::net::IpAddr;

use crate::grant::key_text;
use crate::timefmt;

pub fn key_bytes(ip: IpAddr) -> Vec<u8> {
    key_bytes_with(ip, 128)
}

/// The key of a grant kept under `ip` when IPv6 logins grant /`bits` (`grant::map_key`).
pub fn key_bytes_with(ip: IpAddr, bits: u8) -> Vec<u8> {
    let mut k = crate::grant::map_key(ip, bits).into_bytes();
    k.push(0);
    k
}

/// The value for a grant until `expires`, clamped to what reads back (a value that did not
/// parse would have no expiry, and an entry without expiry is never removed).
pub fn value_bytes(action: &str, expires: i64) -> Vec<u8> {
    let expires = timefmt::representable(expires);
    let mut v = format!("{action} expires={}", timefmt::rfc3339(expires)).into_bytes();
    v.push(0);
    v
}

fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

/// The address a stored key names, if it is a canonical address key.
pub fn parse_key(key: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(strip_nul(key)).ok()?;
    let ip: IpAddr = text.parse().ok()?;
    (key_text(ip) == text).then_some(ip)
}

/// The grant a stored key names when IPv6 logins grant /`bits` (`grant::parse_map_key`).
pub fn parse_key_with(key: &[u8], bits: u8) -> Option<IpAddr> {
    crate::grant::parse_map_key(std::str::from_utf8(strip_nul(key)).ok()?, bits)
}

/// The value as text (NUL stripped).
pub fn value_text(value: &[u8]) -> String {
    String::from_utf8_lossy(strip_nul(value)).into_owned()
}

/// The expiry in a stored value, if it has one. A value without `expires=` (an
/// administrator's own postmap entry) has none and is left alone; an `expires=` that does
/// not read (`+10000-01-01T00:00:00Z`, a bare number an older dovegate wrote for a year it
/// could not print) counts as long expired, so it is removed rather than kept forever.
pub fn parse_expiry(value: &[u8]) -> Option<i64> {
    let text = String::from_utf8_lossy(strip_nul(value));
    let rest = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("expires="))?;
    Some(timefmt::parse_rfc3339(rest).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ip: IpAddr = "2001:DB8::7".parse().unwrap();
        assert_eq!(key_bytes(ip), b"2001:db8::7\0");
        assert_eq!(parse_key(b"2001:db8::7\0"), Some(ip));
        assert_eq!(parse_key(b"2001:DB8::7\0"), None);
        assert_eq!(parse_key(b"unknown\0"), None);
        let v = value_bytes("OK", 1_795_257_000);
        assert_eq!(v, b"OK expires=2026-11-21T10:30:00Z\0");
        assert_eq!(parse_expiry(&v), Some(1_795_257_000));
        assert_eq!(parse_expiry(b"OK\0"), None);
        assert_eq!(parse_expiry(b"REJECT no relay\0"), None);
        // Unreadable expiries are expired, never permanent.
        assert_eq!(parse_expiry(b"OK expires=9215576668800\0"), Some(0));
        assert_eq!(
            parse_expiry(b"OK expires=+10000-01-01T00:00:00Z\0"),
            Some(0)
        );
        assert_eq!(parse_expiry(b"OK expires=\xff\0"), Some(0));
        // Expiries that would not read back are clamped when written.
        let far = value_bytes("OK", 9_215_576_668_800);
        assert_eq!(far, b"OK expires=9999-12-31T23:59:59Z\0");
        assert_eq!(parse_expiry(&far), Some(timefmt::MAX_SECS));
        assert_eq!(parse_expiry(&value_bytes("OK", -5)), Some(0));
    }
}
