//! The pipeline's messages: what crosses a stage boundary. Sources produce them, the engine
//! consumes them; every stage imports this module and none owns it (see ARCHITECTURE.md).

use std::net::IpAddr;

pub mod address;
pub mod position;
pub mod saved;

pub use position::Position;

/// Longest session id kept (Dovecot's are 16-32 base64 characters).
const MAX_ID: usize = 64;

/// A login seen in a log, before policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenLogin {
    pub ip: IpAddr,
    /// The line's own timestamp (unix seconds), when it has one.
    pub time: Option<i64>,
    /// The mail session it opened, when the line names one.
    pub session: Option<SessionStart>,
    /// Who logged in and how, for `run --dry-run`'s report (None: pushed logins, tests).
    pub detail: Option<Box<LoginDetail>>,
}

/// What a dry run prints about the login behind a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginDetail {
    pub user: Option<String>,
    /// `imap`, `pop3`, ... (the login service without `-login`).
    pub protocol: String,
    /// Dovecot's session id (`session=<...>`), when the line names one.
    pub session: Option<String>,
    pub pattern: String,
    pub source: String,
}

/// What one chunk of a source produced: its logins, and the position that becomes true
/// once they are committed (None: a source with nothing to checkpoint, such as pushed
/// logins).
#[derive(Debug)]
pub struct Batch {
    pub source: usize,
    pub logins: Vec<SeenLogin>,
    /// Mail sessions that ended (in the order read, after the logins of the same chunk).
    pub ends: Vec<SessionEnd>,
    pub position: Option<Position>,
}

/// The session a login line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStart {
    pub id: String,
    /// `mpid=`: the mail process that will log the end.
    pub pid: Option<u32>,
    /// The user the login line names (the process title and `doveadm who` must agree).
    pub user: Option<String>,
    /// The source that read it (sessions of a source no longer configured are dropped).
    pub source: String,
    /// Whether the line came framed as only Dovecot writes it (its own log_path, or a
    /// journal entry from a trusted sender): a syslog line can be written by any local
    /// user (`logger -t dovecot`), so its end lines prove nothing.
    pub trusted: bool,
    /// Its source also reports the session's end exactly (Dovecot's events, `[events]`):
    /// while that source is seen delivering ends, a missing end means open.
    pub exact: bool,
}

/// Session ids are base64 (`+`, `/`) of bounded length; anything else is not one.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

impl SessionStart {
    pub fn new(id: &str, pid: Option<u32>) -> Option<SessionStart> {
        valid_id(id).then(|| SessionStart {
            id: id.to_string(),
            pid,
            user: None,
            source: String::new(),
            trusted: false,
            exact: false,
        })
    }
}

/// A session end line: `imap(user)<PID><ID>: Disconnected: ...`, or an older form without
/// pid or session (`imap(user): Disconnected: ...`), or a proxy's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// `imap`, `pop3`, `imap-hibernate` or `imap-login` (a proxy).
    pub service: String,
    pub id: Option<String>,
    pub pid: Option<u32>,
    pub user: Option<String>,
    /// The line's own time (None: now).
    pub time: Option<i64>,
    /// The source that read it.
    pub source: String,
    /// Framed as only Dovecot writes it (see `SessionStart::trusted`).
    pub trusted: bool,
    /// Reported by Dovecot itself (`mail_user_session_finished` from `[events]`), not read
    /// from a log: it names the session exactly and carries no pid.
    pub exact: bool,
}

/// Only IMAP clients stay connected for hours; POP3 sessions grant as plain logins.
pub fn holds(login_service: &[u8]) -> bool {
    login_service == b"imap"
}

/// The end lines that can close a held session (imap-hibernate ends hibernated ones; a
/// proxy's `imap-login: proxy(...)` ends proxied ones).
pub fn ends_held(service: &str) -> bool {
    service == "imap" || service == "imap-hibernate" || service == "imap-login"
}

/// What one host counted towards one user's sending caps (`policy.user_*`) in one
/// five-minute bucket (Unix time / 300): the policy server hands it to the database and
/// takes the other hosts' back, so a user's caps hold across hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCount {
    pub user: String,
    /// Recipients (true) or messages.
    pub recipients: bool,
    pub bucket: i64,
    pub count: i64,
}
