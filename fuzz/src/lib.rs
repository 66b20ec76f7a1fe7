//! What the fuzz targets share: the daemon's own scanner with every embedded pattern
//! enabled, and a sink that asserts the grant invariants on every event.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dovegate::frame::{FrameParser, LocalZone};
use dovegate::grant::{Decision, Policy};
use dovegate::pattern::{IpVerdict, PatternSet};
use dovegate::scan::{Line, Login, NearMiss, Scanner, Sink, Visit};
use dovegate::session::evidence::{Claim, Evidence, Probe};
use dovegate::session::{SessionEnd, Sessions};

pub mod checks;

/// A fixed "now" (2026-11-21T10:00:00Z), close to the seeds' timestamps.
pub const NOW: i64 = 1_795_255_200;
pub const TTL: i64 = 3600;
pub const HOLD: i64 = 12 * 3600;
pub const SERVICES: [&str; 4] = ["imap", "pop3", "submission", "managesieve"];
/// Longest line the scanner reads (the daemon's default is larger; a smaller one reaches
/// the skip path with small inputs).
pub const MAX_LINE: usize = 4096;

fn services() -> Vec<String> {
    SERVICES.iter().map(|s| s.to_string()).collect()
}

/// The embedded library with every pattern enabled (sessions on), or the defaults when
/// the optional ones cannot be enabled together.
pub fn patterns() -> Arc<PatternSet> {
    let base = PatternSet::load(None, &services(), &[]).expect("embedded patterns");
    // The ids of the library the daemon embeds (the repository's patterns/ directory).
    // (fuzz/ when built as the fuzz crate, the repository when tests/fuzz_corpus.rs
    // includes this file).
    let manifest = env!("CARGO_MANIFEST_DIR");
    let dir = [
        format!("{manifest}/patterns"),
        format!("{manifest}/../patterns"),
    ]
    .into_iter()
    .find(|d| std::path::Path::new(d).is_dir())
    .expect("patterns directory");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("patterns directory") {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("id = \"")) {
            ids.push(id.trim_end_matches('"').to_string());
        }
    }
    Arc::new(PatternSet::load(None, &services(), &ids).unwrap_or(base))
}

pub fn scanner(patterns: &Arc<PatternSet>, visit: Visit) -> Scanner {
    Scanner::new(
        FrameParser::new(&["dovecot"]).with_zone(LocalZone::utc()),
        Arc::clone(patterns),
        &services(),
        MAX_LINE,
        visit,
    )
}

pub fn visit_of(b: u8) -> Visit {
    match b % 3 {
        0 => Visit::Logins,
        1 => Visit::NearMisses,
        _ => Visit::EveryLine,
    }
}

/// The value after each `=` (or `[`, Dovecot 0.99's `Login: user [ip]`) in `text` that
/// reads as `ip`, by position of the `=`.
fn address_positions(text: &[u8], ip: IpAddr) -> Vec<usize> {
    let mut out = Vec::new();
    for (eq, _) in text
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'=' || b == b'[')
    {
        let rest = &text[eq + 1..];
        let end = rest
            .iter()
            .position(|b| !(b.is_ascii_hexdigit() || *b == b'.' || *b == b':'))
            .unwrap_or(rest.len());
        let parsed = std::str::from_utf8(&rest[..end])
            .ok()
            .and_then(|s| s.parse::<IpAddr>().ok());
        if parsed.map(|p| p.to_canonical()) == Some(ip) {
            out.push(eq);
        }
    }
    out
}

/// Asserts that `ip` is the line's own client element: it is written after some `key=` (or
/// `[`) of the line, and that place is not inside the user element (a `user=<` before it must be
/// closed by a `>` first). An oracle independent of the parser's own rules, weaker than
/// them, so that any disagreement is a finding.
pub fn assert_client_element(text: &[u8], ip: IpAddr) {
    let at = address_positions(text, ip);
    assert!(
        !at.is_empty(),
        "granted {ip} is not written after any `key=` of {:?}",
        String::from_utf8_lossy(text)
    );
    let user = memfind(text, b"user=<");
    let outside = at.iter().any(|&eq| match user {
        Some(u) if u < eq => text[u + 6..eq].contains(&b'>'),
        _ => true,
    });
    assert!(
        outside,
        "granted {ip} only appears inside the user element of {:?}",
        String::from_utf8_lossy(text)
    );
}

pub fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Records grants and asserts the invariants on every event.
pub struct Checked {
    pub policy: Policy,
    pub sessions: Sessions,
    pub now: i64,
    /// (address, expiry) of every grant decided.
    pub grants: Vec<(IpAddr, i64)>,
    pub lines: Vec<Vec<u8>>,
}

/// A host where every session's process is alive: the most a probe can ever claim.
pub struct AllAlive;

impl Probe for AllAlive {
    fn check(&mut self, _: &Claim<'_>, _: i64) -> Evidence {
        Evidence::Process
    }
}

impl Default for Checked {
    fn default() -> Self {
        Checked {
            policy: Policy::new(vec![], Duration::from_secs(TTL as u64)),
            sessions: Sessions::new(TTL, HOLD),
            now: NOW,
            grants: Vec::new(),
            lines: Vec::new(),
        }
    }
}

impl Checked {
    fn grant(&mut self, ip: IpAddr, time: Option<i64>) {
        match self.policy.decide(ip, time, self.now) {
            Decision::Grant { ip: g, expires } => {
                assert_eq!(g, ip.to_canonical());
                assert!(
                    expires > self.now && expires <= self.now + TTL,
                    "grant of {ip} until {expires} outlives now {} + ttl {TTL}",
                    self.now
                );
                self.grants.push((g, expires));
            }
            Decision::Excluded(_) | Decision::Expired => {}
        }
    }

    /// Session renewals over the hold, each bounded like a login, on a host where
    /// every session's process is alive.
    pub fn renew_all(&mut self) {
        let start = self.now;
        for step in 0..8 {
            let now = start + step * (HOLD / 4);
            for r in self.sessions.renewals(now, &mut AllAlive) {
                assert!(r.time <= now, "renewal in the future");
                self.now = now;
                self.grant(r.ip, Some(r.time));
            }
        }
        self.now = start;
    }
}

impl Sink for Checked {
    fn login(&mut self, line: Line<'_>, login: &Login<'_>) {
        let IpVerdict::Valid(ip) = login.ip else {
            panic!("a login event without a valid address: {:?}", login.ip);
        };
        assert!(login.time.is_some(), "a login event without a time");
        assert_client_element(line.text, ip);
        self.lines.push(line.text.to_vec());
        if let Some(s) = &login.session {
            assert!(dovegate::model::valid_id(&s.id), "session id {:?}", s.id);
            if dovegate::model::holds(login.service) {
                let time = login.time.unwrap_or(self.now).min(self.now);
                self.sessions.opened(ip, time, s, self.now);
            }
        }
        self.grant(ip, login.time);
    }
    fn untimed(&mut self, line: Line<'_>, login: &Login<'_>) {
        let IpVerdict::Valid(ip) = login.ip else {
            panic!("an untimed login without a valid address: {:?}", login.ip);
        };
        assert_client_element(line.text, ip);
    }
    fn bad_address(&mut self, _line: Line<'_>, login: &Login<'_>) {
        assert!(!matches!(login.ip, IpVerdict::Valid(_)));
    }
    fn forged(&mut self, _line: Line<'_>, _login: &Login<'_>, _why: &str) {}
    fn too_long(&mut self, line: Line<'_>) {
        assert!(line.text.len() > MAX_LINE);
    }
    fn near_miss(&mut self, _line: Line<'_>, why: NearMiss) {
        assert!(!why.name().is_empty());
    }
    fn session_end(&mut self, _line: Line<'_>, end: &SessionEnd) {
        let _ = self.sessions.closed(end, self.now);
    }
}
