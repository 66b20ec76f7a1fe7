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
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use crate::blocks::Blocks;
pub use crate::config::push::{ApiHeader, PushSection, PushSettings};
use crate::model::{Batch, SeenLogin};
use crate::net::background::{Background, Setup};
use crate::net::{Listen, StartError};
use crate::telemetry::{Count, Level, Report, Reporter, StatsRegistry};

/// The `Batch::source` of pushed logins; they carry no position, so the index only has to
/// differ from the log sources' ones.
pub const PUSH_SOURCE: usize = usize::MAX;

/// What both servers need: where logins go, and where they report what they decline
/// (each kind rate-limited on its own by the log: a flood of forged requests or proxied
/// logins cannot hide a misconfiguration, nor blocked users an unreadable block list).
#[derive(Clone)]
pub(crate) struct Sink {
    tx: Sender<Batch>,
    reporter: Reporter,
}

/// How long a pushed login may wait for room in the engine's queue before it is dropped
/// (and counted): the pusher is waiting too.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

impl Sink {
    /// Queues one login seen now. False: the engine is gone or did not take it in time.
    pub(crate) async fn push(&self, ip: IpAddr) -> bool {
        self.reporter.stats().logins.fetch_add(1, Ordering::Relaxed);
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

    /// A push refused for its origin (peer user, secret): counted as forged.
    pub(crate) fn refuse(&self, what: &str) {
        self.reporter.decline(Count::Forged, "refused", what);
    }

    /// A genuine report that grants nothing (`reason` in the near misses).
    pub(crate) fn skip(&self, reason: &'static str, what: &str) {
        self.reporter
            .decline(Count::NearMiss(reason), "skipped", what);
    }

    /// A report Dovecot's configuration made useless (`reason` in the near misses): `what`
    /// says what to fix.
    pub(crate) fn misconfigured(&self, reason: &'static str, what: &str) {
        self.reporter
            .decline(Count::NearMiss(reason), "misconfigured", what);
    }

    /// A login refused because its user is blocked (near miss `blocked-user`).
    pub(crate) fn blocked_login(&self, what: &str) {
        self.reporter
            .decline(Count::NearMiss("blocked-user"), "blocked", what);
    }

    /// The blocked users cannot be read (so nobody is refused): asked again at every
    /// login, said at a bounded rate.
    pub(crate) fn blocks_unreadable(&self, what: &str) {
        self.reporter.report(Report::Fault {
            kind: "blocks-unreadable",
            what: what.to_string(),
            level: Level::Error,
        });
    }

    /// A request whose client address is not an address.
    pub(crate) fn invalid(&self, what: &str) {
        self.reporter
            .decline(Count::InvalidAddress, "refused", what);
    }
}

/// The running push servers; dropping it stops them (and removes the unix sockets).
pub type Push = Background;

/// Starts the configured push servers (none: returns an idle `Push`). Binding happens
/// before this returns, so an error names the socket or address at fault.
/// `blocks`: the users `policy.block_on_cap` blocked, whose logins the auth-policy
/// endpoint refuses (None: it refuses nobody). `stop`: cancelled, it stops them too.
pub fn spawn(
    settings: &PushSettings,
    tx: Sender<Batch>,
    stats: &StatsRegistry,
    blocks: Option<Blocks>,
    stop: &CancellationToken,
) -> Result<Push, StartError> {
    if !settings.enabled() {
        return Ok(Background::idle());
    }
    let mut setup = Setup::new(stop).map_err(StartError::runtime("push"))?;
    if let Some(path) = &settings.socket {
        let sink = Sink {
            tx: tx.clone(),
            reporter: stats.reporter("push"),
        };
        setup
            .bind(socket::bind(path, settings.uids.clone(), sink))
            .map_err(|error| StartError::Listen {
                key: "push.socket",
                listen: Listen::Unix(path.clone()),
                error,
            })?;
    }
    if let Some(listen) = &settings.auth_policy {
        let sink = Sink {
            tx,
            reporter: stats.reporter("auth-policy"),
        };
        let cfg = policy::PolicyConfig {
            secret: settings.secret.clone(),
            protocols: settings.protocols.clone(),
            blocks,
        };
        setup
            .bind(policy::bind(listen, cfg, sink))
            .map_err(|error| StartError::Listen {
                key: "push.auth_policy",
                listen: listen.clone(),
                error,
            })?;
    }
    setup.run("push").map_err(StartError::thread("push"))
}
