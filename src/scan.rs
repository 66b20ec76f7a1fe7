//! The searcher: finds login lines in a buffer of complete lines.
//!
//! Like ripgrep, it searches the whole buffer for the patterns' literal and only then looks
//! for the boundaries of the line around each hit; lines without the literal are never
//! visited one by one. Each candidate line is framed and matched (`LineMatcher`); the
//! caller's sink decides what to do with a login.

use std::sync::Arc;

use aho_corasick::Input;
use regex_automata::util::captures::Captures;

use crate::frame::{Frame, FrameParser};
use crate::pattern::{LoginMatch, PatternSet};

/// Calls `sink(line_start, line)` for every line of `buf` that contains a prefilter
/// literal. `buf` holds whole lines; a last line without newline is included.
pub fn candidate_lines<'a>(
    patterns: &PatternSet,
    buf: &'a [u8],
    mut sink: impl FnMut(usize, &'a [u8]),
) {
    let pre = patterns.prefilter();
    let mut pos = 0;
    while pos < buf.len() {
        let Some(m) = pre.find(Input::new(buf).span(pos..buf.len())) else {
            break;
        };
        let start = memchr::memrchr(b'\n', &buf[pos..m.start()]).map_or(pos, |i| pos + i + 1);
        let end = memchr::memchr(b'\n', &buf[m.end()..]).map_or(buf.len(), |i| m.end() + i);
        sink(start, &buf[start..end]);
        pos = end + 1;
    }
}

/// Frames and matches single lines; holds the per-thread capture slots.
pub struct LineMatcher {
    frames: FrameParser,
    patterns: Arc<PatternSet>,
    caps: Captures,
}

impl LineMatcher {
    pub fn new(frames: FrameParser, patterns: Arc<PatternSet>) -> LineMatcher {
        let caps = patterns.captures();
        LineMatcher {
            frames,
            patterns,
            caps,
        }
    }

    pub fn patterns(&self) -> &PatternSet {
        &self.patterns
    }

    pub fn patterns_arc(&self) -> &Arc<PatternSet> {
        &self.patterns
    }

    /// The login on this line, if it is a trusted Dovecot success line.
    pub fn match_line<'a>(
        &mut self,
        line: &'a [u8],
        now: i64,
    ) -> Option<(Frame<'a>, LoginMatch<'a>)> {
        let frame = self.frames.parse(line, now)?;
        let login = self.patterns.match_message(frame.message, &mut self.caps)?;
        Some((frame, login))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_lines_with_the_literal() {
        let p = PatternSet::load(None, &["imap".into()], &[]).unwrap();
        let buf = b"a\nb imap-login: Login: x\nc\nd pop3-login: Disconnected\ne imap-login: Info: Login: z";
        let mut seen = Vec::new();
        candidate_lines(&p, buf, |s, l| {
            seen.push((s, String::from_utf8_lossy(l).into_owned()))
        });
        assert_eq!(
            seen,
            vec![
                (2, "b imap-login: Login: x".to_string()),
                (54, "e imap-login: Info: Login: z".to_string())
            ]
        );
    }
}
