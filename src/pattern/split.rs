//! Cheap captures for element-list patterns (`^HEAD(?P<elements>BODY)$`).
//!
//! Finding the capture groups of a matched login line with the whole regex is the costly
//! part of a scan (a backtracking search through the element grammar: 2.5 µs a line, ten
//! times the DFA that tells whether it matches). The groups that matter are in HEAD; the
//! `elements` group is the rest of the line. So, once the DFA has matched the whole line:
//! HEAD alone gives its groups and where it ends, and BODY is checked (by a DFA, no
//! captures) to match from there to the end.
//!
//! Why this gives the whole regex's captures: under leftmost-first semantics the whole
//! regex takes the first path, in priority order, through HEAD from which BODY reaches
//! the end. HEAD alone takes the first path through HEAD at all. When BODY reaches the
//! end from where that path stops, the two are the same path. Otherwise the caller falls
//! back to the whole regex. `tests::split_captures_equal_whole_captures` checks this
//! against the corpus and random lines.

use regex_automata::meta::Regex;
use regex_automata::util::captures::Captures;
use regex_automata::{Anchored, Input};
use regex_syntax::ast::{self, Ast};

/// A pattern's HEAD and BODY, compiled.
#[derive(Debug)]
pub(super) struct Split {
    head: Regex,
    body: Regex,
}

/// The texts of HEAD and BODY, when `regex` is `HEAD(?P<elements>BODY)$` with no named
/// group inside BODY; None for any other shape (those use the whole regex).
pub(super) fn texts(regex: &str) -> Option<(&str, &str)> {
    let parsed = ast::parse::Parser::new().parse(regex).ok()?;
    let Ast::Concat(concat) = &parsed else {
        return None;
    };
    let [head_asts @ .., Ast::Group(group), Ast::Assertion(end)] = concat.asts.as_slice() else {
        return None;
    };
    // A bare `(?flags)` in HEAD also governs BODY and the final `$` in the whole regex
    // (`(?m)`, `(?u)`, `(?R)`, `(?x)`), not in BODY compiled alone.
    if head_asts.iter().any(|a| matches!(a, Ast::Flags(_))) {
        return None;
    }
    let ast::GroupKind::CaptureName { name, .. } = &group.kind else {
        return None;
    };
    if name.name != "elements"
        || !matches!(
            end.kind,
            ast::AssertionKind::EndLine | ast::AssertionKind::EndText
        )
        || end.span.end.offset != regex.len()
    {
        return None;
    }
    let head = &regex[..group.span.start.offset];
    let inner = group.ast.span();
    let body = &regex[inner.start.offset..inner.end.offset];
    if body.contains("(?P<") || body.contains("(?<") || !head.starts_with('^') {
        return None;
    }
    Some((head, body))
}

impl Split {
    /// `build`: the same regex builder as the whole set's.
    pub(super) fn new(regex: &str, build: impl Fn(&str) -> Result<Regex, String>) -> Option<Split> {
        let (head, body) = texts(regex)?;
        Some(Split {
            head: build(head).ok()?,
            body: build(&format!("(?:{body})$")).ok()?,
        })
    }

    /// Fresh capture slots for `groups`.
    pub(super) fn captures(&self) -> Captures {
        self.head.create_captures()
    }

    /// HEAD's groups in `caps` and the `elements` range, for a message the whole pattern
    /// matched from its start; None: use the whole regex.
    pub(super) fn groups(&self, msg: &[u8], caps: &mut Captures) -> Option<std::ops::Range<usize>> {
        self.head
            .captures(Input::new(msg).anchored(Anchored::Yes), caps);
        let end = caps.get_match()?.end();
        self.body
            .is_match(Input::new(msg).range(end..).anchored(Anchored::Yes))
            .then_some(end..msg.len())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::PatternSet;
    use super::*;

    use super::super::tests::library;

    /// Both ways must give the same login (pattern, service, user, address, session).
    fn same(set: &PatternSet, msg: &[u8]) {
        let mut slots = set.captures();
        let mut caps = set.regex.create_captures();
        assert_eq!(
            set.match_message(msg, &mut slots),
            set.match_message_whole(msg, &mut caps),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }

    #[test]
    fn every_element_list_pattern_has_a_split_form() {
        let set = library();
        for (def, split) in set.defs.iter().zip(&set.splits) {
            let elements = !def.regex.contains("(?P<ip>");
            assert_eq!(split.is_some(), elements, "{}", def.id);
        }
        assert_eq!(texts("^a(?P<elements>b)$"), Some(("^a", "b")));
        for other in [
            "^a(?P<elements>b)",
            "^a(?P<elements>b)c$",
            "^a(?P<x>b)$",
            "a(?P<elements>b)$",
            "^a(?P<elements>(?P<user>b))$",
            "^a(?P<elements>b)$|^c",
        ] {
            assert_eq!(texts(other), None, "{other}");
        }
    }

    fn unescape(s: &str) -> Vec<u8> {
        let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
        while i < b.len() {
            match (b[i], b.get(i + 1)) {
                (b'\\', Some(b'x')) if i + 3 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap_or(b'?'));
                    i += 4;
                }
                (b'\\', Some(&c)) => {
                    out.push(match c {
                        b't' => b'\t',
                        b'0' => 0,
                        c => c,
                    });
                    i += 2;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    }

    #[test]
    fn split_captures_equal_whole_captures_on_the_corpus() {
        let set = library();
        let frames = crate::frame::FrameParser::new(&["dovecot"]);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let Some(raw) = line.splitn(7, '\t').nth(6) else {
                    continue;
                };
                let bytes = unescape(raw);
                if let Some(frame) = frames.parse(&bytes, 0) {
                    same(set, frame.message);
                    seen += 1;
                }
            }
        }
        assert!(seen > 100, "{seen}");
    }

    fn custom(regex: &str) -> PatternSet {
        let text = format!(
            "id='c'\ndovecot='x'\ndescription=''\nservices=['imap']\ndefault=true\npriority=1\nliterals=['imap']\nregex='''{regex}'''\n"
        );
        PatternSet::from_files(&[("c.toml".into(), text)], &["imap".into()], &[]).unwrap()
    }

    /// Found by review: a bare flag group in HEAD also governs BODY and the final `$` in the
    /// whole regex, not in BODY compiled alone (each read 6.6.6.6 where the whole regex
    /// reads no address); and a pattern without `^` fell back to a search anchored at 0.
    #[test]
    fn administrators_patterns_that_broke_the_split_form() {
        for (regex, msg) in [
            (
                r"^(?R)(?P<service>imap)-login: (?:x)?(?P<elements>x.*\r.*|.*)$",
                &b"imap-login: xrip=6.6.6.6, \r"[..],
            ),
            (
                r"^(?u)(?P<service>imap)-login: (?:x)?(?P<elements>x(?-u:.)*|.*)$",
                b"imap-login: xrip=6.6.6.6, \xff",
            ),
            (
                r"^(?m)(?P<service>imap)-login: (?P<elements>[^\x00]*?)$",
                b"imap-login: x\n, rip=6.6.6.6",
            ),
            (
                "^(?x)(?P<service>imap)-login:\\ (?:x)?(?P<elements>x(?s:.)*|[^\\r]*#|.*\n?)$",
                b"imap-login: xrip=6.6.6.6, \r",
            ),
            (
                r"(?P<service>imap)-login: Login: (?P<elements>.*)$",
                b"x imap-login: Login: user=<u>, rip=192.0.2.7",
            ),
        ] {
            same(&custom(regex), msg);
        }
        let set = custom(r"(?P<service>imap)-login: Login: (?P<elements>.*)$");
        let mut slots = set.captures();
        let line = b"x imap-login: Login: user=<u>, rip=192.0.2.7";
        assert!(set.match_message(line, &mut slots).is_some());
    }

    /// Pieces of login lines, forged ones included: user names that hold `>, `, `rip=`,
    /// a second `Login: `, proxy wording.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "user=<",
            ">",
            ", ",
            "rip=",
            "192.0.2.7",
            "6.6.6.6",
            "::1",
            "lip=10.0.0.1",
            "session=<",
            "AbC+/",
            "mpid=",
            "1",
            "TLS",
            " ",
            "=",
            ",",
            "x",
            "Login: ",
            "Info: ",
            "Logged in: ",
            "proxy(",
            "u,",
            "192.0.2.9",
            "): ",
            "Started proxying to ",
            "started proxying to ",
            "remote host",
            "<host>",
            " (master ",
            ")",
            "0.012 secs",
            "as user ",
            "[",
            "]",
            "imap-login: ",
            "method=PLAIN",
            ":143",
        ])
    }

    fn message() -> impl Strategy<Value = Vec<u8>> {
        let head = prop::sample::select(vec![
            "imap-login: Login: ",
            "imap-login: Info: Login: ",
            "pop3-login: Logged in: ",
            "imap-login: Info: Logged in: ",
            "imap-login: proxy(u): started proxying to 192.0.2.1:143: ",
            "imap-login: Info: proxy(u,192.0.2.7): Started proxying to remote host: ",
            "imap-login: proxy(u,192.0.2.7): Started proxying to <h> (<h>) (0.012 secs): ",
        ]);
        // Whole elements joined by `, ` (most make a login line), or loose pieces.
        let element = prop::sample::select(vec![
            "user=<x>",
            "user=<x, rip=6.6.6.6>",
            "user=<a>, rip=6.6.6.6, b>",
            "user=<>",
            "method=PLAIN",
            "rip=192.0.2.7",
            "rip=6.6.6.6",
            "rip=",
            "rip=::ffff:192.0.2.7",
            "lip=10.0.0.1",
            "mpid=1",
            "session=<AbC+/>",
            "session=<>",
            "TLS",
            "secured",
            "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
            "x=y",
            "Login: user=<z>, rip=6.6.6.6",
            "user=<u> [192.0.2.9]",
        ]);
        let list = prop::collection::vec(element, 1..8).prop_map(|e| e.join(", "));
        let loose = prop::collection::vec(piece(), 0..24).prop_map(|p| p.concat());
        (head, prop_oneof![list, loose]).prop_map(|(h, tail)| format!("{h}{tail}").into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn split_captures_equal_whole_captures(msg in message()) {
            same(library(), &msg);
        }
    }
}
