//! Proxy success lines: the user name comes twice, and once before the success text.
//!
//! Dovecot's login proxy logs (`src/login-common/client-common-auth.c`, `login-proxy.c`)
//! `proxy(USER[,DEST]): <success text>: user=<USER'>, method=..., rip=..., ...`. USER in
//! the prefix is the raw login name (any bytes but NUL; with a widened
//! `auth_username_chars` also spaces, `)`, `:`, `<`, `=`, `,`, `/`), and USER' is the same
//! name as `str_sanitize(USER, 80)` leaves it. A failed proxied login logs
//! `proxy(USER[,DEST]): Login failed: ...: user=<USER'>, ...` the same way, so a name such
//! as `x): started proxying to h:1/: user=<x` puts a success wording right after a short
//! `proxy(x` and its own `user=<x` where an element list may start (issue 20).
//!
//! So the success wording counts only where Dovecot writes it: right after the WHOLE name.
//! A proxy match counts only when
//! (1) the message holds `user=<` exactly once, so the element list is the one Dovecot
//!     wrote (a name forging an element list brings a second `user=<`, or, where the
//!     administrator logs no user element, brings the only one and then has Dovecot's own
//!     `): ...` text after it, which (2) refuses);
//! (2) that list is strict (one user element, no free text elsewhere, no flag holding
//!     `: `: `elements::strict_user`), and
//! (3) its user element is exactly the prefix user, which Dovecot did not have to cut or
//!     rewrite: the prefix user then has the name's full length, so the success text the
//!     pattern matched after it is Dovecot's, not the name's.
//! Were a cut name (over 80 bytes, shown as 77 bytes and `...`) accepted, the forged text
//! could sit past the cut, where the element no longer shows it: so a cut name never
//! agrees. The patterns also end the prefix user at the first `,` (2.3+) or `)` (2.2).
//! The tests below try the known shapes and a property over generated hostile names.

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

/// Whether `elements` is a strict element list whose user element is `prefix_user`, whole,
/// and the only `user=<` of the message `msg` (see the module rules).
///
/// A truncated user element (`str_sanitize` cut a name longer than 80 bytes to 77 and
/// `...`) proves nothing about the bytes after the cut: a failed login whose name holds
/// `zzzz,h:1): Started proxying to ...` past byte 77 sanitizes to the same element as the
/// greedy prefix candidate. So a name Dovecot cut, or an element that looks cut, never
/// agrees (a real user of more than 77 bytes behind a proxy gets no grant), nor does a
/// prefix user holding a log prefix's end or the success wording.
pub fn prefix_user_agrees(prefix_user: &[u8], elements: &[u8], msg: &[u8]) -> bool {
    if memchr::memmem::find_iter(msg, b"user=<").nth(1).is_some() {
        return false;
    }
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
        assert!(prefix_user_agrees(b"a b", el, el));
        assert!(!prefix_user_agrees(b"a", el, el));
        let long = "l".repeat(100);
        let el = format!("user=<{}...>, rip=192.0.2.7", &long[..77]);
        // A name Dovecot cut: what followed the cut is unknown, so no agreement.
        assert!(!prefix_user_agrees(
            long.as_bytes(),
            el.as_bytes(),
            el.as_bytes()
        ));
        let el = b"user=<lll...>, rip=192.0.2.7";
        assert!(!prefix_user_agrees(&long.as_bytes()[..90], el, el));
        let eighty = "e".repeat(80);
        let el = format!("user=<{eighty}>, rip=192.0.2.7");
        assert!(prefix_user_agrees(
            eighty.as_bytes(),
            el.as_bytes(),
            el.as_bytes()
        ));
    }

    #[test]
    fn truncation_forgery() {
        // The reviewer's repro: 77 bytes, then the forged end of a prefix and success.
        let a = "a".repeat(77);
        let prefix = format!("{a}zzzz");
        let el = format!("user=<{a}...>, method=PLAIN, rip=203.0.113.9");
        assert!(!prefix_user_agrees(
            prefix.as_bytes(),
            el.as_bytes(),
            el.as_bytes()
        ));
        // Even were the element uncut, the prefix user holds Dovecot's own wording.
        for forged in [
            "x,h:1): Started proxying to y",
            "x): started proxying to h:1",
        ] {
            let el = format!("user=<{forged}>, rip=203.0.113.9");
            assert!(!prefix_user_agrees(
                forged.as_bytes(),
                el.as_bytes(),
                el.as_bytes()
            ));
        }
        // A real 77-byte name ending in `...` is indistinguishable from a cut: refused.
        let dots = format!("{}...", "d".repeat(74));
        let el = format!("user=<{dots}>, rip=203.0.113.9");
        assert!(!prefix_user_agrees(
            dots.as_bytes(),
            el.as_bytes(),
            el.as_bytes()
        ));
    }

    /// A site logging no user element: the name brings the only `user=<` and a forged
    /// list whose next "flag" would be Dovecot's failure text.
    #[test]
    fn forged_list_where_no_user_element_is_logged() {
        for line in [
            "imap-login: proxy(x): started proxying to h:1: user=<x>, zz): Login failed to 10.0.0.2:143: Authentication failed: secured, rip=203.0.113.66",
            "pop3-login: Info: proxy(x,h:1): Started proxying to remote host: user=<x>, zz,10.0.0.2:110): Login failed: [AUTH] Authentication failed.: secured, rip=203.0.113.66",
        ] {
            let mut slots = library().captures();
            let got = library().match_message(line.as_bytes(), &mut slots);
            assert!(
                !matches!(got.as_ref().map(|l| &l.ip), Some(IpVerdict::Valid(_))),
                "{line}"
            );
        }
    }

    use proptest::prelude::*;

    use super::super::tests::library;
    use crate::pattern::IpVerdict;

    /// Pieces of a hostile user name, within what a widened `auth_username_chars` admits
    /// (2.2: `) : < / space`; 2.3/2.4: `, ) : < = space`; both sets together here).
    fn name_piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "x",
            "a",
            " ",
            ")",
            ":",
            "<",
            ">",
            "=",
            ",",
            "/",
            "user=<",
            "): ",
            ": ",
            ", ",
            ">, ",
            "started proxying to ",
            "Started proxying to ",
            "h:1",
            "h",
            ":1",
            "remote host",
            "<h>",
            " (<h>)",
            " (0.001 secs)",
            " as user ",
            "q",
            " (master m)",
            " from 10.0.0.1",
            "rip=6.6.6.6",
            "method=PLAIN",
            "TLS",
            "proxy(",
            "Info: ",
            "Login failed",
            "...",
            "10.0.0.2:143",
        ])
    }

    /// What Dovecot writes between `proxy(USER` and the element list, for the success
    /// of each form (forged into names) and for failures (the line's real text).
    fn forged_success() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "): started proxying to h:1",
            "): started proxying to h:1/",
            "): started proxying to h:1/q (master m)",
            ",h:1): Started proxying to <h> (0.001 secs)",
            ",h:1): Started proxying to 10.0.0.2 as user q",
            ",h:1): Started proxying to remote host",
            ",h:1): Started proxying to remote host as user q",
            ",h:1): Started proxying to remote host from 10.0.0.1 as user q (master m) (0.001 secs)",
        ])
    }

    fn failure() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "Login failed to 10.0.0.2:143: Authentication failed",
            "Login failed: [AUTHENTICATIONFAILED] Authentication failed.",
            "Login failed: NO [AUTHENTICATIONFAILED] Authentication failed.",
            "Disconnected by server: Connection closed (state=LOGIN, duration=0s)",
            "connect(127.0.0.1, 9) failed: Connection refused (after 3 secs, 3 reconnects, local=127.0.0.1:56930)",
            "Remote server sent invalid input: Invalid banner: * OK ready.",
        ])
    }

    /// A hostile name: loose pieces, or the known shape `W` + forged success +
    /// `: user=<` + `W` (+ more pieces), which makes the name's tail a user element.
    fn hostile_name() -> impl Strategy<Value = String> {
        let loose = prop::collection::vec(name_piece(), 1..16).prop_map(|p| p.concat());
        let shaped = (
            prop::collection::vec(name_piece(), 1..3),
            forged_success(),
            prop::sample::select(vec![": ", "/: ", " as user : ", " (master : "]),
            prop::collection::vec(name_piece(), 0..3),
        )
            .prop_map(|(w, mid, sep, tail)| {
                let w = w.concat();
                format!("{w}{mid}{sep}user=<{w}{}", tail.concat())
            });
        prop_oneof![loose, shaped]
    }

    /// A failed proxied login as Dovecot writes it for `name`, in one of the forms.
    fn failed_line() -> impl Strategy<Value = String> {
        (
            hostile_name(),
            prop::sample::select(vec!["imap", "pop3"]),
            prop::sample::select(vec!["", "Info: ", "Error: "]),
            prop::sample::select(vec!["", ",10.0.0.2:143", ",[2001:db8::2]:143"]),
            failure(),
            prop::sample::select(vec![
                "method=PLAIN, rip=203.0.113.66, lip=127.0.0.1, secured, session=<k>",
                "method=PLAIN, rip=203.0.113.66, lip=127.0.0.1, TLS",
                "secured, rip=203.0.113.66",
            ]),
            // A site may log no user element at all (login_log_format_elements).
            any::<bool>(),
        )
            .prop_map(|(name, svc, level, dest, fail, rest, with_user)| {
                let shown = sanitized(name.as_bytes()).expect("printable name");
                let user = match with_user {
                    true => format!("user=<{}>, ", String::from_utf8(shown).unwrap()),
                    false => String::new(),
                };
                format!("{svc}-login: {level}proxy({name}{dest}): {fail}: {user}{rest}")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20000))]
        /// Issue 20 item 2: no failed proxied login grants, whatever the user name.
        #[test]
        fn no_failed_proxied_login_grants(line in failed_line()) {
            let mut slots = library().captures();
            let got = library().match_message(line.as_bytes(), &mut slots);
            prop_assert!(
                !matches!(got.as_ref().map(|l| &l.ip), Some(IpVerdict::Valid(_))),
                "granted {:?}: {line}", got.map(|l| l.ip)
            );
        }
    }
}
