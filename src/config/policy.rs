//! `[policy]`: the Postfix policy server's settings as written and validated (the server
//! is `policy`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::listen::Listen;
use super::users::UserSpec;
use super::{parse_duration, ConfigError};

/// The `[policy]` section as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub listen: String,
    pub recent: String,
    pub receipt_header: bool,
    pub block_on_cap: bool,
    pub users: Vec<UserSpec>,
    pub max_connections: usize,
    pub idle_timeout: String,
    pub grant_messages_per_hour: u32,
    pub grant_messages_per_day: u32,
    pub grant_recipients_per_hour: u32,
    pub grant_recipients_per_day: u32,
    pub user_messages_per_hour: u32,
    pub user_messages_per_day: u32,
    pub user_recipients_per_hour: u32,
    pub user_recipients_per_day: u32,
}

/// The validated `[policy]` section; None in `Settings` when `listen` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    pub listen: Listen,
    /// How long after a grant ends its client is told to check its mail first.
    pub recent: Duration,
    pub receipt_header: bool,
    /// A user who trips a cap loses every grant until `dovegate unblock USER`.
    pub block_on_cap: bool,
    /// Uids allowed to connect to the unix socket (SO_PEERCRED); None: anyone.
    pub peers: Option<Vec<u32>>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub caps: CapLimits,
}

/// The longest one request may take from its first byte, and a reply to be written.
pub const MAX_REQUEST_TIME: Duration = Duration::from_secs(5);

impl PolicySettings {
    pub fn request_timeout(&self) -> Duration {
        self.idle_timeout.min(MAX_REQUEST_TIME)
    }

    /// Settings for tests: `listen`, every cap off, `recent` 12 h.
    pub fn for_listen(listen: Listen) -> PolicySettings {
        PolicySettings {
            listen,
            recent: Duration::from_secs(12 * 3600),
            receipt_header: false,
            block_on_cap: false,
            peers: None,
            max_connections: 100,
            idle_timeout: Duration::from_secs(300),
            caps: CapLimits::default(),
        }
    }

    pub fn from_section(s: &PolicySection) -> Result<Option<PolicySettings>, ConfigError> {
        let err = |key: &str, m: String| ConfigError(format!("policy.{key}: {m}"));
        let text = s.listen.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let listen = if text.starts_with('/') {
            Listen::Unix(PathBuf::from(text))
        } else if let Ok(a) = text.parse::<SocketAddr>() {
            Listen::Inet(a)
        } else {
            Listen::parse(text).map_err(|m| {
                err(
                    "listen",
                    format!("{m}; give a socket path such as /var/spool/postfix/dovegate/policy or 127.0.0.1:PORT"),
                )
            })?
        };
        if let Listen::Inet(a) = &listen {
            // The protocol has no authentication: whoever can connect chooses the client
            // address it asks about.
            if !a.ip().is_loopback() {
                return Err(err(
                    "listen",
                    format!("`{text}` is not a loopback address; the policy protocol has no authentication (use 127.0.0.1:PORT or a unix socket)"),
                ));
            }
        }
        let peers = match &listen {
            Listen::Unix(_) if !s.users.is_empty() => {
                let uids = super::users::uids_of(&s.users)
                    .map_err(|e| ConfigError(format!("policy.users{e}")))?;
                Some(uids)
            }
            _ => None,
        };
        if s.block_on_cap && peers.is_none() {
            return Err(err(
                "block_on_cap",
                "needs a unix socket in policy.listen and policy.users: otherwise any local process could send requests that block any user".into(),
            ));
        }
        let recent = parse_duration("policy.recent", &s.recent)?;
        if recent > Duration::from_secs(7 * 86_400) {
            return Err(err("recent", "must be at most 7d".into()));
        }
        if !(1..=10_000).contains(&s.max_connections) {
            return Err(err("max_connections", "must be between 1 and 10000".into()));
        }
        let idle_timeout = parse_duration("policy.idle_timeout", &s.idle_timeout)?;
        if idle_timeout < Duration::from_millis(100) {
            return Err(err("idle_timeout", "must be at least 100ms".into()));
        }
        Ok(Some(PolicySettings {
            listen,
            recent,
            receipt_header: s.receipt_header,
            block_on_cap: s.block_on_cap,
            peers,
            max_connections: s.max_connections,
            idle_timeout,
            caps: CapLimits {
                grant_messages_per_hour: s.grant_messages_per_hour,
                grant_messages_per_day: s.grant_messages_per_day,
                grant_recipients_per_hour: s.grant_recipients_per_hour,
                grant_recipients_per_day: s.grant_recipients_per_day,
                user_messages_per_hour: s.user_messages_per_hour,
                user_messages_per_day: s.user_messages_per_day,
                user_recipients_per_hour: s.user_recipients_per_hour,
                user_recipients_per_day: s.user_recipients_per_day,
            },
        }))
    }
}

/// Cap values; 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapLimits {
    pub grant_messages_per_hour: u32,
    pub grant_messages_per_day: u32,
    pub grant_recipients_per_hour: u32,
    pub grant_recipients_per_day: u32,
    pub user_messages_per_hour: u32,
    pub user_messages_per_day: u32,
    pub user_recipients_per_hour: u32,
    pub user_recipients_per_day: u32,
}
