//! The literal search run over whole buffers before any framing or regex.
//!
//! Most log bytes are not Dovecot logins: the speed of a scan is the speed of this search.
//! aho-corasick's own choice is poor here: with the standard semantics it steps its
//! automaton through every prefilter candidate, and for three literals it picks a
//! start-byte prefilter (`L`, `p`) that stops on most lines. The packed (Teddy, SIMD)
//! searcher runs the whole search instead; the automaton is the fallback on CPUs without
//! SSSE3/AVX2.

use aho_corasick::packed;
use aho_corasick::{AhoCorasick, MatchKind};

/// Finds the first of a few literals in a buffer.
#[derive(Debug, Clone)]
pub struct Literals {
    packed: Option<packed::Searcher>,
    automaton: AhoCorasick,
}

impl Literals {
    pub fn new<S: AsRef<str>>(literals: &[S]) -> Result<Literals, String> {
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(literals.iter().map(|l| l.as_ref()))
            .map_err(|e| e.to_string())?;
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(literals.iter().map(|l| l.as_ref()))
            .build();
        Ok(Literals { packed, automaton })
    }

    /// The start of the first literal at or after `from`.
    pub fn find_from(&self, buf: &[u8], from: usize) -> Option<usize> {
        self.find_literal(buf, from).map(|(start, _)| start)
    }

    /// The start of the first literal at or after `from`, and which literal (its index
    /// in the list given to `new`).
    pub fn find_literal(&self, buf: &[u8], from: usize) -> Option<(usize, usize)> {
        if from >= buf.len() {
            return None;
        }
        let m = match &self.packed {
            // Teddy needs a minimum haystack; shorter ones go to the automaton.
            Some(p) if buf.len() - from >= p.minimum_len() => {
                p.find_in(buf, aho_corasick::Span::from(from..buf.len()))
            }
            _ => self
                .automaton
                .find(aho_corasick::Input::new(buf).span(from..buf.len())),
        }?;
        Some((m.start(), m.pattern().as_usize()))
    }

    pub fn is_match(&self, text: &[u8]) -> bool {
        self.find_from(text, 0).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_literal_in_long_and_short_texts() {
        let l = Literals::new(&["Login: ", "Logged in: ", "proxying to "]).unwrap();
        for lit in ["Login: ", "Logged in: ", "proxying to "] {
            let short = format!("x{lit}");
            assert_eq!(l.find_from(short.as_bytes(), 0), Some(1));
            let long = format!("{}{lit}{}", "a".repeat(300), "b".repeat(300));
            assert_eq!(l.find_from(long.as_bytes(), 0), Some(300));
            assert_eq!(l.find_from(long.as_bytes(), 301), None);
            let which = ["Login: ", "Logged in: ", "proxying to "]
                .iter()
                .position(|x| *x == lit);
            assert_eq!(l.find_literal(short.as_bytes(), 0).map(|m| m.1), which);
            assert_eq!(l.find_literal(long.as_bytes(), 0).map(|m| m.1), which);
        }
        assert!(!l.is_match(b"Login aborted: Logged out proxying"));
        assert_eq!(l.find_from(b"", 0), None);
        assert_eq!(l.find_from(b"Login: ", 7), None);
    }
}
