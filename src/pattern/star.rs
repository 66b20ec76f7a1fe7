//! Cheap captures for patterns of the shape `^HEAD(?P<g>.*)TAIL` (the session-end line
//! `imap(USER)<PID><SESSION>: Disconnected`), the sibling of `split`.
//!
//! Under leftmost-first semantics the whole regex takes HEAD's first path, then the
//! longest `.*` from which TAIL matches, then TAIL's first path there. So: HEAD alone
//! gives its groups and where it ends (h); TAIL, tried anchored at each place its first
//! byte occurs, from the right, gives its groups at the first place it matches (u); the
//! group is h..u. A `.` stops at a newline, so a message holding one uses the whole
//! regex, as does any place this reasoning does not cover (the caller falls back when
//! this returns None). `tests` check it against the whole regex's captures.

use regex_automata::meta::Regex;
use regex_automata::util::captures::Captures;
use regex_automata::{Anchored, Input};
use regex_syntax::ast::{self, Ast};

/// A pattern's HEAD and TAIL around its greedy `.*` group, compiled.
#[derive(Debug)]
pub(super) struct Star {
    head: Regex,
    tail: Regex,
    /// The byte every TAIL match starts with.
    first: u8,
    /// The `.*` group's name.
    name: String,
}

/// HEAD, the group's name, TAIL and TAIL's first byte, for `^HEAD(?P<g>.*)TAIL` where
/// TAIL starts with a literal byte and no flag changes what `.` matches.
pub(super) fn texts(regex: &str) -> Option<(&str, String, &str, u8)> {
    // `(?s)` and friends would change `.`: only plain groups are allowed anywhere.
    let mut rest = regex;
    while let Some(i) = rest.find("(?") {
        let after = &rest[i + 2..];
        if !(after.starts_with("P<") || after.starts_with('<') || after.starts_with(':')) {
            return None;
        }
        rest = after;
    }
    let parsed = ast::parse::Parser::new().parse(regex).ok()?;
    let Ast::Concat(concat) = &parsed else {
        return None;
    };
    let asts = concat.asts.as_slice();
    let at = asts.iter().position(|a| match a {
        Ast::Group(g) => {
            matches!(g.kind, ast::GroupKind::CaptureName { .. })
                && matches!(&*g.ast, Ast::Repetition(r)
                    if r.greedy
                        && matches!(r.op.kind, ast::RepetitionKind::ZeroOrMore)
                        && matches!(&*r.ast, Ast::Dot(_)))
        }
        _ => false,
    })?;
    let (Ast::Group(group), Some(Ast::Literal(lit))) = (&asts[at], asts.get(at + 1)) else {
        return None;
    };
    let ast::GroupKind::CaptureName { name, .. } = &group.kind else {
        return None;
    };
    let first = u8::try_from(u32::from(lit.c)).ok().filter(u8::is_ascii)?;
    let head = &regex[..group.span.start.offset];
    let tail = &regex[group.span.end.offset..];
    head.starts_with('^')
        .then(|| (head, name.name.clone(), tail, first))
}

impl Star {
    /// `build`: the same regex builder as the whole set's.
    pub(super) fn new(regex: &str, build: impl Fn(&str) -> Result<Regex, String>) -> Option<Star> {
        let (head, name, tail, first) = texts(regex)?;
        Some(Star {
            head: build(head).ok()?,
            tail: build(tail).ok()?,
            first,
            name,
        })
    }

    /// Fresh capture slots for HEAD and TAIL.
    pub(super) fn captures(&self) -> (Captures, Captures) {
        (self.head.create_captures(), self.tail.create_captures())
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// HEAD's and TAIL's groups in `head` and `tail` and the `.*` group's range, for a
    /// message the whole pattern matched from its start; None: use the whole regex.
    pub(super) fn groups(
        &self,
        msg: &[u8],
        head: &mut Captures,
        tail: &mut Captures,
    ) -> Option<std::ops::Range<usize>> {
        if memchr::memchr(b'\n', msg).is_some() {
            return None;
        }
        self.head
            .captures(Input::new(msg).anchored(Anchored::Yes), head);
        let h = head.get_match()?.end();
        for u in memchr::memrchr_iter(self.first, &msg[h..]).map(|i| h + i) {
            self.tail
                .captures(Input::new(msg).range(u..).anchored(Anchored::Yes), tail);
            if tail.is_match() {
                return Some(h..u);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::PatternSet;
    use super::*;

    use super::super::tests::library;

    fn same(set: &PatternSet, msg: &[u8]) {
        let mut slots = set.end_captures().unwrap();
        let mut caps = set.ends.as_ref().unwrap().create_captures();
        assert_eq!(
            set.match_session_end(msg, &mut slots),
            set.match_session_end_whole(msg, &mut caps),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }

    #[test]
    fn star_forms() {
        // The library's user groups are bounded classes, not `.*` (a greedy user group let
        // client text forge another session's end): its patterns use the whole regex.
        assert!(library().end_stars.iter().all(Option::is_none));
        let (head, name, tail, first) = texts(r"^a\((?P<user>.*)\)<(?P<pid>[0-9]+)>").unwrap();
        assert_eq!(
            (head, name.as_str(), tail, first),
            (r"^a\(", "user", r"\)<(?P<pid>[0-9]+)>", b')')
        );
        for other in [
            r"^a(?P<user>.*?)\)",
            r"^a(?P<user>.+)\)",
            r"^a(?P<user>.*)[)]",
            r"a(?P<user>.*)\)",
            r"(?s)^a(?P<user>.*)\)",
            r"^a(?P<user>(?s:.*))\)",
            r"^a(.*)\)",
        ] {
            assert_eq!(texts(other), None, "{other}");
        }
    }

    /// Pieces of session-end lines, forged ones included: user names holding
    /// `)<1><X>: Disconnected`, messages holding `)<`, newlines.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "u",
            "@example.com",
            ")",
            "<",
            ">",
            ")<",
            "><",
            ">: ",
            "123",
            "99999999999",
            "AbC+/=",
            "Disconnected",
            "Disconnected: Logged out in=1",
            "Info: ",
            ": ",
            " ",
            "(",
            "\n",
            ")<12><x>: Disconnected",
            "imap(",
            "Disconnectedx",
            "é",
        ])
    }

    fn message() -> impl Strategy<Value = Vec<u8>> {
        let service = prop::sample::select(vec!["imap(", "pop3(", "imap-hibernate(", "lmtp("]);
        let pieces = || prop::collection::vec(piece(), 0..12).prop_map(|p| p.concat());
        let end = prop::sample::select(vec![
            ")<123><AbC+/=>: Disconnected: Logged out",
            ")<1><x>: Info: Disconnected",
            ")<1><x>: Disconnectedx",
            ")<><x>: Disconnected",
            "",
        ]);
        (service, pieces(), end, pieces())
            .prop_map(|(s, user, end, more)| format!("{s}{user}{end}{more}").into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn star_captures_equal_whole_captures(msg in message()) {
            same(library(), &msg);
        }
    }

    #[test]
    fn star_captures_equal_whole_captures_on_known_lines() {
        for msg in [
            "imap(u)<123><AbC>: Disconnected: Logged out",
            "imap(u)<1><x>: Disconnected)<2><y>: Disconnected",
            "imap(x)<1><evil>: Disconnected)<999><real>: Disconnected: Logged out",
            "imap(a\n)<1><x>: Disconnected",
            "imap-hibernate(u)<5><s>: Info: Disconnected (UID FETCH finished)",
            "pop3(u)<12345678901><s>: Disconnected",
        ] {
            same(library(), msg.as_bytes());
        }
    }
}
