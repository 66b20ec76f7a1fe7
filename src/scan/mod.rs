//! The one scanning pipeline: prefilter, max-line skip, framing and matching, reported as
//! typed events to a [`Sink`].
//!
//! Like ripgrep's searcher/sink split: the [`Scanner`] knows how to find and judge lines,
//! the sink decides what an event means (the daemon batches logins for the engine,
//! `dovegate test` prints a report, the journal adapter adds provenance). Every command
//! that reads logs goes through here, so they cannot drift apart.
//!
//! Like ripgrep, the buffer is searched as a whole for the prefilter literal and only the
//! lines around each hit are visited; the others are only counted.

mod near;

use std::sync::Arc;

use crate::frame::{Frame, FrameParser, Framing};
use crate::pattern::{EndSlots, IpVerdict, Literals, LoginMatch, PatternDef, PatternSet, Slots};
pub use near::NearMiss;

/// Frames and matches single lines; holds the per-thread capture slots. The building
/// block of [`Scanner`] (and of the corpus test, which judges lines one by one).
pub struct LineMatcher {
    frames: FrameParser,
    patterns: Arc<PatternSet>,
    caps: Slots,
    /// For the session-end patterns (None: none enabled).
    end_caps: Option<EndSlots>,
}

impl LineMatcher {
    pub fn new(frames: FrameParser, patterns: Arc<PatternSet>) -> LineMatcher {
        let caps = patterns.captures();
        let end_caps = patterns.end_captures();
        LineMatcher {
            frames,
            patterns,
            caps,
            end_caps,
        }
    }

    pub fn patterns(&self) -> &PatternSet {
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
        (!self.patterns.refuses(&login)).then_some((frame, login))
    }

    /// The session end on this line, if it is a Dovecot session-end line.
    pub fn match_end(&mut self, line: &[u8], now: i64) -> Option<crate::model::SessionEnd> {
        let frame = self.frames.parse(line, now)?;
        self.end_of(&frame)
    }

    /// The session end a framed message reports, if a session-end pattern matches.
    fn end_of(&mut self, frame: &Frame<'_>) -> Option<crate::model::SessionEnd> {
        let caps = self.end_caps.as_mut()?;
        let m = self.patterns.match_session_end(frame.message, caps)?;
        let id = match m.session {
            Some(id) => {
                let id = std::str::from_utf8(id).ok()?;
                crate::model::valid_id(id).then_some(())?;
                Some(id.to_string())
            }
            None => None,
        };
        Some(crate::model::SessionEnd {
            service: String::from_utf8_lossy(m.service).to_ascii_lowercase(),
            id,
            pid: m.pid,
            user: m.user.map(|u| String::from_utf8_lossy(u).into_owned()),
            time: frame.time,
            source: String::new(),
            trusted: frame.framing.only_dovecot(),
            exact: false,
        })
    }
}

/// Where an event happened: the line's index within the scanned buffer (0-based; journal
/// entries count as lines) and its bytes (for a journal entry: the MESSAGE).
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub index: u64,
    pub text: &'a [u8],
}

/// A recognised Dovecot login line.
#[derive(Debug, Clone)]
pub struct Login<'a> {
    pub pattern: &'a PatternDef,
    pub service: &'a [u8],
    pub user: Option<&'a [u8]>,
    pub framing: Framing,
    /// Valid for `Sink::login`; Invalid or Ambiguous for `Sink::bad_address`.
    pub ip: IpVerdict,
    /// Unix seconds: the line's timestamp, or the journal entry's trusted time.
    pub time: Option<i64>,
    /// The mail session the login opened (`session=<ID>`, `mpid=`), when the line says.
    pub session: Option<crate::model::SessionStart>,
}

/// Receives the scanner's events. Every method but `login` has a default, so that a new
/// event (a session end, a pushed login) is one new method that old sinks need not know.
pub trait Sink {
    /// A trusted login with a valid client address and a time.
    fn login(&mut self, line: Line<'_>, login: &Login<'_>);
    /// A trusted login line with no timestamp (framing `message-only`). Whether it may
    /// grant is the sink's decision: by default it is ignored, since re-reading such a
    /// file would revive its whole history as fresh logins.
    fn untimed(&mut self, _line: Line<'_>, _login: &Login<'_>) {}
    /// A login line whose client address is invalid or ambiguous: never grants.
    fn bad_address(&mut self, _line: Line<'_>, _login: &Login<'_>) {}
    /// A journal login entry from an untrusted sender (`why`: the field that failed).
    fn forged(&mut self, _line: Line<'_>, _login: &Login<'_>, _why: &str) {}
    /// A line longer than the configured maximum, skipped unread.
    fn too_long(&mut self, _line: Line<'_>) {}
    /// A line that looks like a login but grants nothing, and why.
    fn near_miss(&mut self, _line: Line<'_>, _why: NearMiss) {}
    /// A trusted line saying a mail session ended (`imap(u)<PID><ID>: Disconnected: ...`).
    fn session_end(&mut self, _line: Line<'_>, _end: &crate::model::SessionEnd) {}
    /// Any other line; only reported when the scanner visits every line.
    fn other(&mut self, _line: Line<'_>) {}
}

/// How much the scanner looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Visit {
    /// Only lines with a pattern literal (the daemon).
    #[default]
    Logins,
    /// Also every `-login: ` line, to tell near misses (`dovegate test`'s summary).
    NearMisses,
    /// Every line gets an event, `other` included (`dovegate test --json`, `--print-*`).
    EveryLine,
}

/// What one `scan` read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scanned {
    pub lines: u64,
    pub bytes: u64,
}

/// The scanning pipeline over buffers of whole lines (see the module documentation).
pub struct Scanner {
    matcher: LineMatcher,
    max_line: usize,
    visit: Visit,
    near: near::Classifier,
    /// The candidates of the near-miss modes: the patterns' literals and the words every
    /// login line of any Dovecot version holds (a line without them is never a near miss,
    /// so the failed-login lines of a brute-force attack are only counted).
    login_process: Literals,
    /// Per `login_process` literal: whether it is a pattern literal (a line whose first
    /// hit is one needs no second search to know it holds one).
    pattern_literal: Vec<bool>,
}

impl Scanner {
    /// `services`: the login services that may grant (to tell "service not enabled").
    pub fn new(
        frames: FrameParser,
        patterns: Arc<PatternSet>,
        services: &[String],
        max_line: usize,
        visit: Visit,
    ) -> Scanner {
        let mut words: Vec<&str> = near::WORDING.to_vec();
        words.extend(patterns.literals().iter().map(String::as_str));
        words.sort_unstable();
        words.dedup();
        // A handful of short literals: building the searcher cannot fail.
        let login_process = Literals::new(&words).expect("literal searcher");
        let pattern_literal = words
            .iter()
            .map(|w| patterns.literals().iter().any(|l| l == w))
            .collect();
        Scanner {
            matcher: LineMatcher::new(frames, patterns),
            max_line,
            visit,
            near: near::Classifier::new(services),
            login_process,
            pattern_literal,
        }
    }

    pub fn patterns(&self) -> &PatternSet {
        self.matcher.patterns()
    }

    pub fn visit(&self) -> Visit {
        self.visit
    }

    /// Could this text (a line, or a raw journal entry) hold anything the scanner reports?
    pub fn may_match(&self, text: &[u8]) -> bool {
        match self.visit {
            Visit::Logins => self.matcher.patterns().prefilter().is_match(text),
            _ => self.login_process.is_match(text),
        }
    }

    /// Scans a buffer of whole lines (a last line without newline counts too).
    pub fn scan(&mut self, buf: &[u8], now: i64, sink: &mut impl Sink) -> Scanned {
        let mut index = 0u64;
        let mut pos = 0;
        while pos < buf.len() {
            let Some((hit, known)) = self.next_candidate(buf, pos) else {
                break;
            };
            let start = memchr::memrchr(b'\n', &buf[pos..hit]).map_or(pos, |i| pos + i + 1);
            let end = memchr::memchr(b'\n', &buf[hit..]).map_or(buf.len(), |i| hit + i);
            index += self.skip_lines(&buf[pos..start], index, sink);
            let line = Line {
                index,
                text: &buf[start..end],
            };
            if !self.line(line, known, now, sink) && self.visit == Visit::EveryLine {
                sink.other(line);
            }
            index += 1;
            pos = end + 1;
        }
        if pos < buf.len() {
            index += self.skip_lines(&buf[pos..], index, sink);
        }
        Scanned {
            lines: index,
            bytes: buf.len() as u64,
        }
    }

    /// The next candidate's position, and whether the line is known to hold a pattern
    /// literal.
    fn next_candidate(&self, buf: &[u8], pos: usize) -> Option<(usize, bool)> {
        match self.visit {
            Visit::Logins => Some((
                self.matcher.patterns().prefilter().find_from(buf, pos)?,
                true,
            )),
            _ => {
                let (at, literal) = self.login_process.find_literal(buf, pos)?;
                Some((at, self.pattern_literal[literal]))
            }
        }
    }

    /// Counts the lines of a stretch without candidates (reporting each in `EveryLine`).
    fn skip_lines(&self, stretch: &[u8], first: u64, sink: &mut impl Sink) -> u64 {
        if stretch.is_empty() {
            return 0;
        }
        if self.visit != Visit::EveryLine {
            let newlines = memchr::memchr_iter(b'\n', stretch).count() as u64;
            return newlines + u64::from(!stretch.ends_with(b"\n"));
        }
        let mut n = 0;
        let body = stretch.strip_suffix(b"\n").unwrap_or(stretch);
        for text in body.split(|&b| b == b'\n') {
            sink.other(Line {
                index: first + n,
                text,
            });
            n += 1;
        }
        n
    }

    /// One candidate line; false when it produced no event.
    /// `known`: the line is known to hold a pattern literal.
    fn line(&mut self, line: Line<'_>, known: bool, now: i64, sink: &mut impl Sink) -> bool {
        if line.text.len() > self.max_line {
            sink.too_long(line);
            return true;
        }
        // Lines without a pattern literal (near-miss modes) skip framing and regex.
        let has_literal = known || self.matcher.patterns().prefilter().is_match(line.text);
        let framed = if has_literal {
            self.matcher.frames.parse(line.text, now)
        } else {
            None
        };
        match framed {
            Some(frame) => self.framed(line, frame, Ok(()), sink),
            None if !has_literal => self.near_miss(line, None, sink),
            // A pattern literal in a line no trusted tag frames: another program's text.
            None => {
                sink.near_miss(line, NearMiss::UntrustedFrame);
                true
            }
        }
    }

    /// A journal entry's MESSAGE, with its trusted time and the provenance check's
    /// verdict (`Err(why)`: an untrusted sender).
    pub fn scan_message(
        &mut self,
        index: u64,
        message: &[u8],
        time: Option<i64>,
        provenance: Result<(), &str>,
        now: i64,
        sink: &mut impl Sink,
    ) {
        let line = Line {
            index,
            text: message,
        };
        let handled = if message.len() > self.max_line {
            sink.too_long(line);
            true
        } else {
            match self.matcher.frames.parse(message, now) {
                Some(frame) => {
                    let frame = Frame {
                        framing: Framing::Journal,
                        time: time.or(frame.time),
                        message: frame.message,
                    };
                    self.framed(line, frame, provenance, sink)
                }
                None => self.near_miss(line, None, sink),
            }
        };
        if !handled && self.visit == Visit::EveryLine {
            sink.other(line);
        }
    }

    /// Reports a journal entry the caller skipped (no literal, or not an entry at all).
    pub fn skip_entry(&self, index: u64, text: &[u8], sink: &mut impl Sink) {
        if self.visit == Visit::EveryLine {
            sink.other(Line { index, text });
        }
    }

    fn framed(
        &mut self,
        line: Line<'_>,
        frame: Frame<'_>,
        provenance: Result<(), &str>,
        sink: &mut impl Sink,
    ) -> bool {
        let patterns = Arc::clone(&self.matcher.patterns);
        let m = patterns.match_message(frame.message, &mut self.matcher.caps);
        if m.as_ref().is_some_and(|m| patterns.refuses(m)) {
            sink.near_miss(line, NearMiss::NeverMechanism);
            return true;
        }
        let Some(m) = m else {
            if let Some(end) = self.matcher.end_of(&frame) {
                // An untrusted sender's end line is ignored: it could only shorten a hold.
                if provenance.is_ok() {
                    sink.session_end(line, &end);
                }
                return true;
            }
            return self.near_miss(line, Some(frame.message), sink);
        };
        let login = Login {
            pattern: &patterns.defs()[m.pattern],
            service: m.service,
            user: m.user,
            framing: frame.framing,
            ip: m.ip,
            time: frame.time,
            session: m.session,
        };
        match (&login.ip, provenance) {
            (IpVerdict::Missing, _) => sink.near_miss(line, NearMiss::NoAddress),
            (_, Err(why)) => sink.forged(line, &login, why),
            (IpVerdict::Valid(_), Ok(())) if login.time.is_none() => sink.untimed(line, &login),
            (IpVerdict::Valid(_), Ok(())) => sink.login(line, &login),
            (_, Ok(())) => sink.bad_address(line, &login),
        }
        true
    }

    /// A line that produced no login: a near miss when it reads like one. (In `Logins`
    /// mode only lines with a pattern literal get here: telling why costs little.)
    fn near_miss(&self, line: Line<'_>, message: Option<&[u8]>, sink: &mut impl Sink) -> bool {
        match self.near.classify(line.text, message, &self.matcher.frames) {
            Some(why) => {
                sink.near_miss(line, why);
                true
            }
            None => false,
        }
    }
}

/// The default library for imap and pop3 with the `dovecot` tag: what unit tests scan with.
#[cfg(test)]
pub(crate) fn test_scanner(visit: Visit, max_line: usize) -> Scanner {
    let services = ["imap".to_string(), "pop3".to_string()];
    let p = PatternSet::load(None, &services, &[]).expect("embedded patterns");
    Scanner::new(
        FrameParser::new(&["dovecot"]),
        Arc::new(p),
        &services,
        max_line,
        visit,
    )
}

#[cfg(test)]
mod tests;
