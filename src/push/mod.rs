//! Logins pushed by Dovecot itself: the post-login hook's unix socket (`socket`) and the
//! auth-policy endpoint (`policy`). Both turn a login Dovecot hands over into the same
//! `Batch` the log sources send, so the same policy and engine decide (and the same
//! address from a log and a push is one grant).
//!
//! Both servers run on one thread with its own small runtime (`net::background`): they
//! share nothing with the engine but the channel, and stopping them (a reload, shutdown)
//! is dropping `Push`.

pub mod policy;
pub mod socket;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;

use crate::blocks::Blocks;
use crate::config::ConfigError;
use crate::model::{Batch, SeenLogin};
use crate::net::background::{Background, Setup};
use crate::net::Listen;
use crate::telemetry::ratelimit::SharedLimit;
use crate::telemetry::{SourceStats, StatsRegistry};

/// The `Batch::source` of pushed logins; they carry no position, so the index only has to
/// differ from the log sources' ones.
pub const PUSH_SOURCE: usize = usize::MAX;

/// The `[push]` section as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushSection {
    pub socket: String,
    pub users: Vec<UserSpec>,
    pub auth_policy: String,
    pub auth_policy_secret_file: String,
    pub auth_policy_protocols: Vec<String>,
}

pub use crate::net::peers::UserSpec;

/// The `auth_policy_server_api_header` Dovecot sends: `Name: value`, or a bare value sent
/// as `X-API-Key`.
#[derive(Clone)]
pub struct ApiHeader {
    pub name: hyper::header::HeaderName,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for ApiHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiHeader({}: <secret>)", self.name)
    }
}

impl ApiHeader {
    /// Parses the header exactly as Dovecot splits `auth_policy_server_api_header`.
    pub fn parse(text: &str) -> Result<ApiHeader, String> {
        let text = text.trim();
        let (name, value) = match text.split_once(':') {
            Some((n, v)) => (n.trim(), v.trim()),
            None => ("X-API-Key", text),
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not an HTTP header name"))?;
        Ok(ApiHeader {
            name,
            value: value.as_bytes().to_vec(),
        })
    }
}

/// Validated push settings.
#[derive(Debug, Clone, Default)]
pub struct PushSettings {
    pub socket: Option<PathBuf>,
    /// Uids allowed to write to the socket.
    pub uids: Vec<u32>,
    pub auth_policy: Option<Listen>,
    pub secret: Option<ApiHeader>,
    pub protocols: Vec<String>,
}

impl PushSettings {
    pub fn enabled(&self) -> bool {
        self.socket.is_some() || self.auth_policy.is_some()
    }

    pub fn from_section(s: &PushSection) -> Result<PushSettings, ConfigError> {
        let err = |key: &str, m: String| ConfigError(format!("push.{key}: {m}"));
        let socket = match s.socket.trim() {
            "" => None,
            p if p.starts_with('/') => Some(PathBuf::from(p)),
            p => return Err(err("socket", format!("`{p}` must be an absolute path"))),
        };
        let mut uids = Vec::new();
        if socket.is_some() {
            if s.users.is_empty() {
                return Err(err(
                    "users",
                    "needs at least one user (Dovecot's internal user, usually dovecot)".into(),
                ));
            }
            uids = uids_of("push.users", &s.users)?;
        }
        let auth_policy = match s.auth_policy.trim() {
            "" => None,
            t => Some(Listen::parse(t).map_err(|m| err("auth_policy", m.to_string()))?),
        };
        let secret = match (s.auth_policy_secret_file.trim(), &auth_policy) {
            ("", _) | (_, None) => None,
            (path, Some(_)) => {
                let text = crate::fsread::read_text(
                    Path::new(path),
                    crate::fsread::SECRET_MAX,
                    crate::fsread::Links::Follow,
                )
                .map_err(|e| err("auth_policy_secret_file", e.to_string()))?;
                Some(ApiHeader::parse(&text).map_err(|m| {
                    err(
                        "auth_policy_secret_file",
                        format!("{path}: {m} (write the auth_policy_server_api_header value, e.g. `X-API-Key: SECRET`)"),
                    )
                })?)
            }
        };
        // Every local user can reach a TCP port, loopback too: without the secret anyone
        // could report a login and open the relay.
        if matches!(auth_policy, Some(Listen::Inet(_))) && secret.is_none() {
            return Err(err(
                "auth_policy_secret_file",
                "an inet: policy endpoint needs a secret (any local user can reach it); set auth_policy_server_api_header in Dovecot and its value in this file".into(),
            ));
        }
        for (i, p) in s.auth_policy_protocols.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(err(
                    &format!("auth_policy_protocols[{i}]"),
                    format!("`{p}` is not a Dovecot service name such as imap or pop3"),
                ));
            }
        }
        Ok(PushSettings {
            socket,
            uids,
            auth_policy,
            secret,
            protocols: s.auth_policy_protocols.clone(),
        })
    }
}

/// The uids of configured users (`key`: the setting, for errors), names resolved now.
pub(crate) fn uids_of(key: &str, users: &[UserSpec]) -> Result<Vec<u32>, ConfigError> {
    crate::net::peers::uids_of(users).map_err(|e| ConfigError(format!("{key}{e}")))
}

/// What both servers need: where logins go and what to count.
#[derive(Clone)]
pub(crate) struct Sink {
    tx: Sender<Batch>,
    stats: Arc<SourceStats>,
    refused: Arc<SharedLimit>,
    /// Their own limiters, so a flood of forged requests or proxied logins cannot hide a
    /// misconfiguration.
    skipped: Arc<SharedLimit>,
    misconfigured: Arc<SharedLimit>,
    /// Logins of blocked users refused, and the blocked users' file unreadable: each its
    /// own, so neither hides the other nor a misconfiguration.
    blocked: Arc<SharedLimit>,
    unreadable: Arc<SharedLimit>,
}

/// How long a pushed login may wait for room in the engine's queue before it is dropped
/// (and counted): the pusher is waiting too.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

impl Sink {
    /// Queues one login seen now. False: the engine is gone or did not take it in time.
    pub(crate) async fn push(&self, ip: IpAddr) -> bool {
        self.stats.logins.fetch_add(1, Ordering::Relaxed);
        let batch = Batch {
            source: PUSH_SOURCE,
            logins: vec![SeenLogin {
                ip,
                time: Some(crate::timefmt::now()),
                session: None,
                detail: None,
            }],
            ends: Vec::new(),
            position: None,
        };
        match tokio::time::timeout(QUEUE_WAIT, self.tx.send(batch)).await {
            Ok(Ok(())) => true,
            _ => {
                tracing::warn!(%ip, "pushed login dropped: the engine did not take it within 1s");
                false
            }
        }
    }

    /// Counts a push refused for its origin (peer user, secret) and logs it, rate-limited.
    pub(crate) fn refuse(&self, what: &str) {
        self.stats.forged.fetch_add(1, Ordering::Relaxed);
        self.refused.warn(what);
    }

    /// Counts a genuine report that grants nothing (`reason` in the near misses) and logs
    /// it, rate-limited.
    pub(crate) fn skip(&self, reason: &'static str, what: &str) {
        self.stats.count_near_miss(reason);
        self.skipped.warn(what);
    }

    /// Counts a report Dovecot's configuration made useless (`reason` in the near misses)
    /// and says what to fix, rate-limited on its own.
    pub(crate) fn misconfigured(&self, reason: &'static str, what: &str) {
        self.stats.count_near_miss(reason);
        self.misconfigured.warn(what);
    }

    /// Counts a login refused because its user is blocked (near miss `blocked-user`) and
    /// logs it, rate-limited.
    pub(crate) fn blocked_login(&self, what: &str) {
        self.stats.count_near_miss("blocked-user");
        self.blocked.warn(what);
    }

    /// Says the blocked users cannot be read (so nobody is refused), rate-limited: it is
    /// asked again at every login.
    pub(crate) fn blocks_unreadable(&self, what: &str) {
        if let Some(n) = self.unreadable.hit() {
            tracing::error!(events_since_last = n, "{what}");
        }
    }

    pub(crate) fn invalid(&self, what: &str) {
        self.stats.invalid_ip.fetch_add(1, Ordering::Relaxed);
        self.refused.warn(what);
    }
}

/// The running push servers; dropping it stops them (and removes the unix sockets).
pub type Push = Background;

/// Starts the configured push servers (none: returns an idle `Push`). Binding happens
/// before this returns, so an error names the socket or address at fault.
/// `blocks`: the users `policy.block_on_cap` blocked, whose logins the auth-policy
/// endpoint refuses (None: it refuses nobody).
pub fn spawn(
    settings: &PushSettings,
    tx: Sender<Batch>,
    stats: &StatsRegistry,
    blocks: Option<Blocks>,
) -> Result<Push, String> {
    if !settings.enabled() {
        return Ok(Background::idle());
    }
    let mut setup = Setup::new().map_err(|e| format!("push: cannot start runtime: {e}"))?;
    let refused = Arc::new(SharedLimit::default());
    if let Some(path) = &settings.socket {
        let sink = Sink {
            tx: tx.clone(),
            stats: stats.for_source("push"),
            refused: Arc::clone(&refused),
            skipped: Arc::default(),
            misconfigured: Arc::default(),
            blocked: Arc::default(),
            unreadable: Arc::default(),
        };
        setup
            .bind(socket::bind(path, settings.uids.clone(), sink))
            .map_err(|e| format!("push.socket: cannot listen on {}: {e}", path.display()))?;
    }
    if let Some(listen) = &settings.auth_policy {
        let sink = Sink {
            tx,
            stats: stats.for_source("auth-policy"),
            refused,
            skipped: Arc::default(),
            misconfigured: Arc::default(),
            blocked: Arc::default(),
            unreadable: Arc::default(),
        };
        let cfg = policy::PolicyConfig {
            secret: settings.secret.clone(),
            protocols: settings.protocols.clone(),
            blocks,
        };
        setup
            .bind(policy::bind(listen, cfg, sink))
            .map_err(|e| format!("push.auth_policy: cannot listen on {listen}: {e}"))?;
    }
    setup
        .run("push")
        .map_err(|e| format!("push: cannot start thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> PushSection {
        PushSection {
            socket: String::new(),
            users: vec![UserSpec::Name("root".into())],
            auth_policy: String::new(),
            auth_policy_secret_file: String::new(),
            auth_policy_protocols: vec!["imap".into(), "pop3".into()],
        }
    }

    #[test]
    fn api_header_as_dovecot_splits_it() {
        let h = ApiHeader::parse("X-API-Key: s3cret\n").unwrap();
        assert_eq!(h.name.as_str(), "x-api-key");
        assert_eq!(h.value, b"s3cret");
        let h = ApiHeader::parse("bare").unwrap();
        assert_eq!(h.name.as_str(), "x-api-key");
        assert_eq!(h.value, b"bare");
        assert!(ApiHeader::parse("X-Key:").is_err());
        assert!(ApiHeader::parse("Bad Name: x").is_err());
    }

    #[test]
    fn settings_name_their_key() {
        let s = PushSettings::from_section(&section()).unwrap();
        assert!(!s.enabled());
        let mut c = section();
        c.socket = "/run/dovegate/push".into();
        c.users = vec![
            UserSpec::Name("root".into()),
            UserSpec::Uid(65534),
            UserSpec::Name("101".into()),
        ];
        let s = PushSettings::from_section(&c).unwrap();
        assert_eq!(s.uids, vec![0, 65534, 101]);
        c.users = vec![UserSpec::Name("no-such-user-here".into())];
        let e = PushSettings::from_section(&c).unwrap_err().0;
        assert!(e.starts_with("push.users[0]: "), "{e}");
        c.users = vec![];
        assert!(PushSettings::from_section(&c).is_err());
        let mut c = section();
        c.auth_policy = "inet:127.0.0.1:8430".into();
        let e = PushSettings::from_section(&c).unwrap_err().0;
        assert!(e.starts_with("push.auth_policy_secret_file"), "{e}");
        c.auth_policy = "unix:/run/dovegate/auth-policy".into();
        assert!(PushSettings::from_section(&c).unwrap().secret.is_none());
        c.auth_policy = "tcp:1".into();
        assert!(PushSettings::from_section(&c)
            .unwrap_err()
            .0
            .starts_with("push.auth_policy:"));
        c.auth_policy = "inet:127.0.0.1:8430".into();
        c.auth_policy_secret_file = "/nonexistent/secret".into();
        assert!(PushSettings::from_section(&c)
            .unwrap_err()
            .0
            .contains("/nonexistent/secret"));
    }
}
