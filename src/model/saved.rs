//! The saved form of the open mail sessions (`state_dir/checkpoints/sessions.json`) and
//! their statistics: written by the session stage through `state`, read by `status`.
//! Here so that `state` and `status` need not import the stage that keeps them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What showed, at the last check, that a session is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evidence {
    /// Nothing: the grant lasts ttl from the login (or the last evidence).
    #[default]
    None,
    /// Its imap process is alive and its title names the session's user and address.
    Process,
    /// `doveadm who` lists the session's process with its user and address.
    DoveadmWho,
    /// Its source has shown, within the hold, end lines tied to their sessions (so a
    /// missing end means open).
    EndLines,
    /// Reported by a pushed source that also reports exact session ends (Dovecot's
    /// events), which has delivered such ends within the hold (its end metric works), so a
    /// missing end means open.
    Pushed,
}

impl Evidence {
    pub const ALL: [Evidence; 5] = [
        Evidence::None,
        Evidence::Process,
        Evidence::DoveadmWho,
        Evidence::EndLines,
        Evidence::Pushed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Evidence::None => "none",
            Evidence::Process => "process",
            Evidence::DoveadmWho => "doveadm-who",
            Evidence::EndLines => "end-lines",
            Evidence::Pushed => "pushed",
        }
    }
}

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    pub id: String,
    pub ip: IpAddr,
    pub pid: Option<u32>,
    /// When the login happened (unix seconds).
    pub login: i64,
    /// The time of the last grant written for it (login or renewal).
    pub renewed: i64,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub trusted: bool,
    /// What the last check found.
    #[serde(default)]
    pub evidence: Evidence,
    /// When it was last checked for evidence.
    #[serde(default)]
    pub checked: i64,
    /// A source that reports exact ends (Dovecot's events) reported its start.
    #[serde(default)]
    pub exact: bool,
}

/// What the session checks did, saved for `dovegate status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {
    /// Open sessions by what their last check found (`Evidence::name`).
    pub open_by_evidence: BTreeMap<String, u64>,
    /// Since the daemon started: sessions that stopped holding because nothing showed
    /// them open, those held until grant.session_hold, and those ended by a revoke or
    /// `dovegate sessions drop`.
    pub released_no_evidence: u64,
    pub released_hold: u64,
    pub dropped: u64,
}
