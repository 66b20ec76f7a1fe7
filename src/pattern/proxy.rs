//! Proxy success lines: the user name comes twice, and once before the success text.
//!
//! Dovecot's login proxy logs (`src/login-common/client-common-auth.c`, `login-proxy.c`)
//! `proxy(USER[,DEST]): <success text>: user=<USER'>, method=..., rip=..., ...`. USER in
//! the prefix is the raw login name (any bytes but NUL; with a widened
//! `auth_username_chars` also spaces, `)`, `:`, `<`, `=`), and USER' is the same name as
//! `str_sanitize(USER, 80)` leaves it. A failed proxied login whose name contains
//! `): started proxying to h:1: user=<x` would otherwise look like a success, the real
//! failure text then sitting inside a user element.
//!
//! So a proxy match counts only when (1) its element list is strict (one user element, no
//! free text elsewhere: `elements::strict_user`) and (2) that user element is exactly the
//! prefix user, which Dovecot did not have to cut or rewrite. In a forged line the real
//! Dovecot text after the name must then lie inside the user element, which makes that
//! element longer than the prefix candidate: (2) fails. Were a cut name (over 80 bytes,
//! shown as 77 bytes and `...`) accepted, the forged text could sit past the cut, where
//! the element no longer shows it: so a cut name never agrees. The patterns also end the
//! prefix user at the first `,` (2.3+) or `)` (2.2), as Dovecot prints it.
//! The tests below try the known shapes.

use super::elements;

/// Dovecot's `str_sanitize(text, 80)` for valid UTF-8 without control characters: the
/// text itself up to 80 bytes, else its longest whole-character prefix of at most 77
/// bytes and `...`. None for text Dovecot would rewrite (control bytes, invalid UTF-8).
fn sanitized(text: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(text).ok()?;
    if s.chars().any(char::is_control) {
        return None;
    }
    if s.len() <= 80 {
        return Some(text.to_vec());
    }
    let mut keep = 77;
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    let mut out = text[..keep].to_vec();
    out.extend_from_slice(b"...");
    Some(out)
}

/// Whether `elements` is a strict element list whose user element is `prefix_user`, whole.
///
/// A truncated user element (`str_sanitize` cut a name longer than 80 bytes to 77 and
/// `...`) proves nothing about the bytes after the cut: a failed login whose name holds
/// `zzzz,h:1): Started proxying to ...` past byte 77 sanitizes to the same element as the
/// greedy prefix candidate. So a name Dovecot cut, or an element that looks cut, never
/// agrees (a real user of more than 77 bytes behind a proxy gets no grant), nor does a
/// prefix user holding a log prefix's end or the success wording.
pub fn prefix_user_agrees(prefix_user: &[u8], elements: &[u8]) -> bool {
    let Some(user) = elements::strict_user(elements) else {
        return false;
    };
    if looks_cut(user) || forged_prefix(prefix_user) {
        return false;
    }
    sanitized(prefix_user).is_some_and(|want| want == prefix_user && user == prefix_user)
}

/// An element user that may be `str_sanitize`'s cut: `...` ending 77 to 80 bytes (the
/// cut keeps at most 77 bytes, fewer at a character boundary).
fn looks_cut(user: &[u8]) -> bool {
    user.ends_with(b"...") && user.len() >= 77
}

/// A prefix user holding what only Dovecot writes after the name: the end of the
/// `proxy(...)` prefix or the success text.
fn forged_prefix(user: &[u8]) -> bool {
    let lower = user.to_ascii_lowercase();
    [&b"): "[..], b"proxying to"]
        .iter()
        .any(|needle| memchr::memmem::find(&lower, needle).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_like_dovecot() {
        assert_eq!(sanitized(b"a b=<c>"), Some(b"a b=<c>".to_vec()));
        let long = "x".repeat(81);
        assert_eq!(
            sanitized(long.as_bytes()),
            Some(format!("{}...", &long[..77]).into_bytes())
        );
        let exact = "y".repeat(80);
        assert_eq!(
            sanitized(exact.as_bytes()),
            Some(exact.clone().into_bytes())
        );
        // A two-byte character across byte 77 is dropped whole.
        let utf = format!("{}é{}", "z".repeat(76), "z".repeat(10));
        assert_eq!(
            sanitized(utf.as_bytes()),
            Some(format!("{}...", "z".repeat(76)).into_bytes())
        );
        assert_eq!(sanitized(b"a\tb"), None);
        assert_eq!(sanitized(b"a\xffb"), None);
    }

    #[test]
    fn agreement() {
        let el = b"user=<a b>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, TLS, session=<x>";
        assert!(prefix_user_agrees(b"a b", el));
        assert!(!prefix_user_agrees(b"a", el));
        let long = "l".repeat(100);
        let el = format!("user=<{}...>, rip=192.0.2.7", &long[..77]);
        // A name Dovecot cut: what followed the cut is unknown, so no agreement.
        assert!(!prefix_user_agrees(long.as_bytes(), el.as_bytes()));
        assert!(!prefix_user_agrees(
            &long.as_bytes()[..90],
            b"user=<lll...>, rip=192.0.2.7"
        ));
        let eighty = "e".repeat(80);
        let el = format!("user=<{eighty}>, rip=192.0.2.7");
        assert!(prefix_user_agrees(eighty.as_bytes(), el.as_bytes()));
    }

    #[test]
    fn truncation_forgery() {
        // The reviewer's repro: 77 bytes, then the forged end of a prefix and success.
        let a = "a".repeat(77);
        let prefix = format!("{a}zzzz");
        let el = format!("user=<{a}...>, method=PLAIN, rip=203.0.113.9");
        assert!(!prefix_user_agrees(prefix.as_bytes(), el.as_bytes()));
        // Even were the element uncut, the prefix user holds Dovecot's own wording.
        for forged in [
            "x,h:1): Started proxying to y",
            "x): started proxying to h:1",
        ] {
            let el = format!("user=<{forged}>, rip=203.0.113.9");
            assert!(!prefix_user_agrees(forged.as_bytes(), el.as_bytes()));
        }
        // A real 77-byte name ending in `...` is indistinguishable from a cut: refused.
        let dots = format!("{}...", "d".repeat(74));
        let el = format!("user=<{dots}>, rip=203.0.113.9");
        assert!(!prefix_user_agrees(dots.as_bytes(), el.as_bytes()));
    }
}
