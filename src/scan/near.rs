//! Why a line that reads like a login granted nothing: for `dovegate test`'s near misses
//! and the daemon's counters. Searchers are built once, never per line.

use aho_corasick::AhoCorasick;
use serde::Serialize;

use crate::frame::FrameParser;

/// The reason a login-looking line is not a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NearMiss {
    /// No trusted syslog tag (another program's line), or a line format dovegate does not
    /// know.
    UntrustedFrame,
    /// A login of a service not in `patterns.services` (e.g. `submission-login`).
    ServiceNotEnabled,
    /// A login line without a client address element (`rip=`).
    NoAddress,
    /// Login wording no enabled pattern knows (another Dovecot version, an opt-in pattern).
    UnknownWording,
    /// A login by a SASL mechanism that proves nothing about the user
    /// (grant.never_mechanisms, ANONYMOUS by default).
    NeverMechanism,
}

impl NearMiss {
    pub fn name(self) -> &'static str {
        match self {
            NearMiss::UntrustedFrame => "untrusted-frame",
            NearMiss::ServiceNotEnabled => "service-not-enabled",
            NearMiss::NoAddress => "no-address",
            NearMiss::UnknownWording => "unknown-wording",
            NearMiss::NeverMechanism => "never-mechanism",
        }
    }
}

/// Words of a successful login in any Dovecot version: a line without one is no near miss.
pub(super) const WORDING: [&str; 4] = [
    "Login: ",
    "Logged in: ",
    "started proxying",
    "Started proxying",
];

/// Tells near misses apart.
pub(super) struct Classifier {
    /// [`WORDING`].
    wording: AhoCorasick,
    services: Vec<Vec<u8>>,
    rip: memchr::memmem::Finder<'static>,
    /// Only a login process's line (`imap-login: `) is a near miss; `lmtp: Login:` is not.
    login_process: memchr::memmem::Finder<'static>,
}

impl Classifier {
    pub(super) fn new(services: &[String]) -> Classifier {
        Classifier {
            wording: AhoCorasick::new(WORDING).expect("fixed literals build"),
            services: services.iter().map(|s| s.as_bytes().to_vec()).collect(),
            rip: memchr::memmem::Finder::new(b"rip=").into_owned(),
            login_process: memchr::memmem::Finder::new(b"-login: ").into_owned(),
        }
    }

    /// None: not login-looking at all. `message`: the framed message, when known.
    pub(super) fn classify(
        &self,
        line: &[u8],
        message: Option<&[u8]>,
        frames: &FrameParser,
    ) -> Option<NearMiss> {
        if !self.wording.is_match(line) || self.login_process.find(line).is_none() {
            return None;
        }
        // Framing needs a time only to date the line, not to find its message.
        let message = match message {
            Some(m) => m,
            None => match frames.parse(line, 0) {
                Some(f) => f.message,
                None => return Some(NearMiss::UntrustedFrame),
            },
        };
        let service = message
            .strip_prefix(b"Info: ".as_slice())
            .unwrap_or(message)
            .split(|&b| b == b':')
            .next()
            .and_then(|s| s.strip_suffix(b"-login".as_slice()));
        match service {
            Some(s) if !self.services.iter().any(|x| x == s) => Some(NearMiss::ServiceNotEnabled),
            // 0.99's `[ip]` form is matched by its pattern: only `rip=` is looked for here.
            _ if self.rip.find(message).is_none() => Some(NearMiss::NoAddress),
            _ => Some(NearMiss::UnknownWording),
        }
    }
}
