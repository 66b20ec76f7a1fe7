//! Reading the client address out of Dovecot's element list
//! (`user=<u>, method=PLAIN, rip=192.0.2.7, lip=..., ...`).
//!
//! The user name is logged as is and may contain `, rip=6.6.6.6` (Dovecot's default
//! `auth_username_chars` forbids that, but an administrator may widen it). The element
//! order is admin-configurable, so "the rip after the user" is not a safe rule. Two rules:
//! - a `rip=` inside the user element (from `user=<` to its first `>` that ends an
//!   element) is never a candidate;
//! - every other `rip=` that starts an element is a candidate, and they must all agree.
//!
//! A user name that closes its own element early (`x>, rip=6.6.6.6, y`) then yields two
//! disagreeing candidates beside the real one: a forgery can cancel a grant, never choose
//! its address.

use std::net::IpAddr;

use memchr::memmem;
use serde::Serialize;

/// What the line says about the client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum IpVerdict {
    /// One address, canonical (`::ffff:a.b.c.d` is `a.b.c.d`).
    Valid(IpAddr),
    /// A single `rip=` whose text is not an address (`198.423.11.235`).
    Invalid(String),
    /// Several `rip=` elements that disagree: someone forged one. Grant nothing.
    Ambiguous,
    /// No `rip=` element at all.
    Missing,
}

fn at_element_start(elements: &[u8], pos: usize) -> bool {
    pos == 0 || elements[..pos].ends_with(b", ")
}

/// Parses an address from a log value; only plain textual forms, no brackets or zones.
pub fn parse_ip(text: &[u8]) -> Option<IpAddr> {
    if text.is_empty() || text.len() > 45 {
        return None;
    }
    let s = std::str::from_utf8(text).ok()?;
    if !s
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':')
    {
        return None;
    }
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b'-'
}

/// ` key=` at the start of `rest` (a custom format that separates the user element from
/// the next one by a space: `user=<u> method=LOGIN, rip=...`).
fn space_then_key(rest: &[u8]) -> bool {
    let Some(rest) = rest.strip_prefix(b" ") else {
        return false;
    };
    let key = rest.iter().take_while(|&&b| is_key_byte(b)).count();
    key > 0 && rest.get(key) == Some(&b'=')
}

/// Byte range of the user element's value: from after `user=<` to the first `>` that is
/// followed by `, `, the end, or ` key=`.
fn user_span(elements: &[u8]) -> Option<std::ops::Range<usize>> {
    let start =
        memmem::find_iter(elements, b"user=<").find(|&p| at_element_start(elements, p))? + 6;
    let rest = &elements[start..];
    let end = memchr::memchr_iter(b'>', rest)
        .find(|&i| {
            i + 1 == rest.len()
                || rest[i + 1..].starts_with(b", ")
                || space_then_key(&rest[i + 1..])
        })
        .unwrap_or(rest.len());
    Some(start..start + end)
}

/// Byte ranges of the quoted values (`key="..."`, as a custom `login_log_format_elements`
/// may write them, holding spaces and commas) that start an element outside the user
/// element: to the first `"` followed by `, ` or the end, else to the end (a quote that
/// never closes covers the rest, which only ever makes a line ambiguous).
fn quoted_spans(
    elements: &[u8],
    user: Option<&std::ops::Range<usize>>,
) -> Vec<std::ops::Range<usize>> {
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for eq in memmem::find_iter(elements, b"=\"") {
        if spans.last().is_some_and(|s| s.contains(&eq)) || user.is_some_and(|u| u.contains(&eq)) {
            continue;
        }
        let key = elements[..eq]
            .iter()
            .rev()
            .take_while(|&&b| is_key_byte(b))
            .count();
        if key == 0 || !at_element_start(elements, eq - key) {
            continue;
        }
        let start = eq + 2;
        let rest = &elements[start..];
        let end = memchr::memchr_iter(b'"', rest)
            .find(|&i| i + 1 == rest.len() || rest[i + 1..].starts_with(b", "))
            .unwrap_or(rest.len());
        spans.push(start..start + end);
    }
    spans
}

/// The client address of an element list (see the module rules).
pub fn client_ip(elements: &[u8]) -> IpVerdict {
    client_ip_in(elements, b"rip")
}

/// `client_ip` for a site whose `login_log_format_elements` names the client address
/// element differently (`key` without `=`, e.g. `rip`).
pub fn client_ip_in(elements: &[u8], key: &[u8]) -> IpVerdict {
    let mut found: Option<Result<IpAddr, &[u8]>> = None;
    let mut count = 0usize;
    // An address element inside a quoted value is never used, nor may a quote hide the
    // real one (a user name can open a quote that only a later element closes): either
    // makes the line ambiguous.
    let quoted = quoted_spans(elements, user_span(elements).as_ref());
    if candidates(elements, key).any(|pos| quoted.iter().any(|q| q.contains(&pos))) {
        return IpVerdict::Ambiguous;
    }
    for text in values(elements, key) {
        let this = parse_ip(text).ok_or(text);
        count += 1;
        match (&found, &this) {
            (None, _) => found = Some(this),
            (Some(Ok(a)), Ok(b)) if a == b => {}
            _ => return IpVerdict::Ambiguous,
        }
    }
    match found {
        None => IpVerdict::Missing,
        Some(Ok(ip)) => IpVerdict::Valid(ip),
        Some(Err(text)) if count == 1 => {
            IpVerdict::Invalid(String::from_utf8_lossy(text).into_owned())
        }
        Some(Err(_)) => IpVerdict::Ambiguous,
    }
}

/// Where each `key=` element outside the user element starts.
fn candidates<'a>(elements: &'a [u8], key: &[u8]) -> impl Iterator<Item = usize> + 'a {
    let mut needle = key.to_vec();
    needle.push(b'=');
    let user = user_span(elements);
    memmem::find_iter(elements, &needle)
        .collect::<Vec<_>>()
        .into_iter()
        .filter(move |&pos| {
            at_element_start(elements, pos) && !user.as_ref().is_some_and(|u| u.contains(&pos))
        })
}

/// The values of every `key=` element outside the user element, in order (the same rules
/// as for `rip=`: a forged user name never supplies one).
pub fn values<'a>(elements: &'a [u8], key: &[u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let skip = key.len() + 1;
    candidates(elements, key).map(move |pos| {
        let start = pos + skip;
        let end = memchr::memchr(b',', &elements[start..]).map_or(elements.len(), |e| start + e);
        &elements[start..end]
    })
}

/// The value of the `key=` element when every such element agrees (None: absent or
/// disagreeing).
pub fn single_value<'a>(elements: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut it = values(elements, key);
    let first = it.next()?;
    it.all(|v| v == first).then_some(first)
}

/// The user element's value when `elements` is a strict element list: exactly one
/// `user=<...>` element (ended, as above, by its first `>` followed by `, ` or the end), and
/// every other element either `key=value` (no space or comma in the value) or a flag
/// without `=` (nor `,` or `: `). Free text can then only sit inside the user element: the proxy patterns
/// need this, since there the user name also comes before the success text.
pub fn strict_user(elements: &[u8]) -> Option<&[u8]> {
    let mut user = None;
    let mut pos = 0;
    while pos < elements.len() {
        let rest = &elements[pos..];
        let end = if rest.starts_with(b"user=<") {
            if user.is_some() {
                return None;
            }
            let close = memchr::memchr_iter(b'>', rest)
                .find(|&i| i + 1 == rest.len() || rest[i + 1..].starts_with(b", "))?;
            user = Some(&rest[6..close]);
            close + 1
        } else {
            let end = memmem::find(rest, b", ").unwrap_or(rest.len());
            let el = &rest[..end];
            let plain = match memchr::memchr(b'=', el) {
                Some(eq) => {
                    eq > 0
                        && el[..eq]
                            .iter()
                            .all(|&b| b.is_ascii_alphabetic() || b == b'_' || b == b'-')
                        && !el[eq + 1..]
                            .iter()
                            .any(|&b| b.is_ascii_whitespace() || b == b',')
                }
                // A flag holding `: ` is free text (a failure's `): Login failed...`).
                None => {
                    el.first().is_some_and(|b| !b.is_ascii_whitespace())
                        && !el.contains(&b',')
                        && memmem::find(el, b": ").is_none()
                }
            };
            if !plain {
                return None;
            }
            end
        };
        pos += end;
        if pos < elements.len() {
            if !elements[pos..].starts_with(b", ") {
                return None;
            }
            pos += 2;
            if pos == elements.len() {
                return None;
            }
        }
    }
    user
}

/// The `user=<...>` element's value, for reports only (never for decisions).
pub fn user(elements: &[u8]) -> Option<&[u8]> {
    let start =
        memmem::find_iter(elements, b"user=<").find(|&p| at_element_start(elements, p))? + 6;
    let rest = &elements[start..];
    let end = memmem::find(rest, b">, ").unwrap_or_else(|| {
        if rest.ends_with(b">") {
            rest.len() - 1
        } else {
            rest.len()
        }
    });
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> IpVerdict {
        client_ip(s.as_bytes())
    }

    #[test]
    fn plain_and_mapped() {
        assert_eq!(
            v("user=<a>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, mpid=1"),
            IpVerdict::Valid("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            v("user=<a>, rip=::ffff:1.2.3.4, lip=::ffff:1.2.3.5"),
            IpVerdict::Valid("1.2.3.4".parse().unwrap())
        );
        assert_eq!(
            v("rip=2001:DB8::4, user=<a>"),
            IpVerdict::Valid("2001:db8::4".parse().unwrap())
        );
    }

    #[test]
    fn forged_rip_in_user_never_chooses() {
        let real = IpVerdict::Valid("192.0.2.7".parse().unwrap());
        // Inside the user element: ignored, the real rip wins.
        for s in [
            "user=<x, rip=6.6.6.6>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1",
            "user=<x, rip=6.6.6.6, y>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1",
            "rip=192.0.2.7, user=<x, rip=6.6.6.6, lip=1.1.1.1>, method=PLAIN",
        ] {
            assert_eq!(v(s), real, "{s}");
        }
        // Only a forged rip, inside the user: nothing.
        assert_eq!(
            v("user=<x, rip=6.6.6.6, y>, method=PLAIN, lip=10.0.0.1"),
            IpVerdict::Missing
        );
        // A user name that closes its element early: the candidates disagree.
        assert_eq!(
            v("user=<x>, method=PLAIN, rip=6.6.6.6, lip=1.1.1.1>, rip=192.0.2.7, lip=10.0.0.1"),
            IpVerdict::Ambiguous
        );
        assert_eq!(
            v("rip=192.0.2.7, user=<x>, rip=6.6.6.6, y>, method=PLAIN"),
            IpVerdict::Ambiguous
        );
        // Agreeing candidates are harmless.
        assert_eq!(v("user=<x>, rip=192.0.2.7, y>, rip=192.0.2.7"), real);
        // `rip=` not at an element start is not a candidate.
        assert_eq!(
            v("user=<rip=6.6.6.6>, lip=1.1.1.1, xrip=6.6.6.6"),
            IpVerdict::Missing
        );
    }

    #[test]
    fn invalid_addresses() {
        assert_eq!(
            v("user=<a>, rip=198.423.11.235, lip=1.1.1.1"),
            IpVerdict::Invalid("198.423.11.235".into())
        );
        assert_eq!(
            v("user=<a>, rip=192.168.123"),
            IpVerdict::Invalid("192.168.123".into())
        );
        assert_eq!(v("user=<a>, rip="), IpVerdict::Invalid(String::new()));
        assert_eq!(
            v("user=<a>, rip=fe80::1%eth0"),
            IpVerdict::Invalid("fe80::1%eth0".into())
        );
    }

    #[test]
    fn other_address_element() {
        assert_eq!(
            client_ip_in(b"user=<a>, ip=192.0.2.7, rip=10.0.0.1", b"ip"),
            IpVerdict::Valid("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            client_ip_in(b"user=<a, ip=6.6.6.6>, ip=192.0.2.7", b"ip"),
            IpVerdict::Valid("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            client_ip_in(b"user=<a>, rip=192.0.2.7", b"ip"),
            IpVerdict::Missing
        );
    }

    #[test]
    fn strict_lists() {
        let ok =
            |s: &str| strict_user(s.as_bytes()).map(|u| String::from_utf8_lossy(u).into_owned());
        assert_eq!(
            ok("user=<a b=c>, method=PLAIN, rip=1.2.3.4, TLS, TLSv1.3 with cipher X (256/256 bits), session=<x>"),
            Some("a b=c".into())
        );
        assert_eq!(ok("rip=1.2.3.4, user=<a>b>"), Some("a>b".into()));
        for bad in [
            "user=<a>, rip=1.2.3.4, x): Login failed: user=<a>, rip=1.2.3.4",
            "user=<a>, rip=1.2.3.4, user=<b>",
            "user=<a>, rip=1.2.3.4 Authentication Failure:",
            "rip=1.2.3.4",
            "user=<a>, ",
            "user=<a>,, rip=1",
            "user=<a",
            "user=<a>, =x",
            "user=<x>, zz): Login failed to h:1: Authentication failed: secured, rip=1.2.3.4",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn user_for_reports() {
        assert_eq!(user(b"user=<a, b>, rip=1.2.3.4"), Some(&b"a, b"[..]));
        assert_eq!(user(b"user=<a>b>, rip=1.2.3.4"), Some(&b"a>b"[..]));
        assert_eq!(user(b"rip=1.2.3.4, user=<bob>"), Some(&b"bob"[..]));
        assert_eq!(user(b"rip=1.2.3.4"), None);
    }
}
