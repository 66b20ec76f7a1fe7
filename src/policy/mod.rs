//! The Postfix policy server (`[policy]`): relay permission from the committed grants at
//! RCPT, "check your mail first" for a client whose grant just ended, sending caps per
//! grant and per user, and a receipt naming the login behind each relayed message.

pub mod caps;
pub mod metrics;
pub mod protocol;
pub mod receipts;
pub mod server;
pub mod shared;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::policy::{CapLimits, PolicySection, PolicySettings, MAX_REQUEST_TIME};
use crate::engine::{Blocks, GrantsView, LoginsView};
use crate::net::{Listen, Server};
use crate::telemetry::ratelimit::RateLimit;
pub use caps::Caps;
use receipts::ReceiptLog;
pub use server::{PolicyStats, State};

/// How often the logins behind the grants are written for `dovegate why` (when changed).
const GRANTS_FILE_EVERY: Duration = Duration::from_secs(2);

/// What the policy server keeps across its restarts (a reload that changes `[policy]`):
/// the grants and the logins behind them, what the caps counted, the counters, the
/// receipts file and the blocked users.
#[derive(Clone)]
pub struct Context {
    pub view: GrantsView,
    pub logins: LoginsView,
    pub stats: Arc<PolicyStats>,
    pub caps: Arc<Caps>,
    pub receipts: Arc<ReceiptLog>,
    /// Where the receipts and the logins behind the grants (`dovegate why`) are written;
    /// None: nowhere (tests, benchmarks).
    pub state_dir: Option<PathBuf>,
    /// The blocked users (`policy.block_on_cap`), shared with the engine; None: nobody is
    /// blocked.
    pub blocks: Option<Blocks>,
}

impl Context {
    pub fn new(
        view: GrantsView,
        logins: LoginsView,
        state_dir: Option<&Path>,
        blocks: Option<Blocks>,
    ) -> Context {
        Context {
            view,
            logins,
            stats: Arc::default(),
            caps: Arc::default(),
            receipts: Arc::new(ReceiptLog::new(state_dir)),
            state_dir: state_dir.map(Path::to_path_buf),
            blocks,
        }
    }

    /// Takes back the logins behind grants that outlived a restart (from the state
    /// directory, for addresses that keep their grant): receipts, user caps and `why`
    /// keep naming them. What the engine learnt since wins.
    pub fn restore_logins(&self) {
        let Some(dir) = &self.state_dir else { return };
        let now = crate::timefmt::now();
        let saved: Vec<_> = receipts::read_grants(dir)
            .into_iter()
            .filter(|(ip, _)| self.view.lookup(*ip, now).is_some())
            .collect();
        if !saved.is_empty() {
            tracing::info!(grants = saved.len(), "logins behind live grants restored");
            self.logins.restore(saved);
        }
    }
}

/// A running policy server and the writer of its state file.
pub struct PolicyServer {
    server: Server,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl PolicyServer {
    /// Where it listens (for port 0, the port chosen).
    pub fn listen(&self) -> &Listen {
        self.server.listen()
    }

    /// Stops accepting (removing the unix socket if still ours) and stops the writer.
    /// Connections already open are served until they end.
    pub async fn shutdown(self) {
        if let Some(w) = self.writer {
            w.abort();
        }
        self.server.shutdown().await;
    }
}

/// Starts the policy server (on the current tokio runtime) and, with a state directory,
/// the writer of the logins behind the grants.
pub async fn start(cfg: PolicySettings, ctx: &Context) -> std::io::Result<PolicyServer> {
    let reporter = crate::telemetry::ServerReporter::standalone(server::NAME);
    start_under(
        &tokio_util::sync::CancellationToken::new(),
        cfg,
        ctx,
        reporter,
    )
    .await
}

/// `start`, the server stopped also when `parent` is cancelled, reporting to `reporter`.
pub async fn start_under(
    parent: &tokio_util::sync::CancellationToken,
    cfg: PolicySettings,
    ctx: &Context,
    reporter: crate::telemetry::ServerReporter,
) -> std::io::Result<PolicyServer> {
    let state = Arc::new(State::new(cfg, ctx.clone()));
    let server = server::start_under(parent, state, reporter).await?;
    let writer = ctx.state_dir.clone().map(|dir| {
        let (logins, stats) = (ctx.logins.clone(), Arc::clone(&ctx.stats));
        tokio::spawn(write_grants(dir, logins, stats))
    });
    Ok(PolicyServer { server, writer })
}

/// Writes the logins behind the grants (when changed) and counts the shared addresses,
/// every GRANTS_FILE_EVERY, until aborted.
async fn write_grants(dir: PathBuf, logins: LoginsView, stats: Arc<PolicyStats>) {
    let mut written = u64::MAX;
    let mut failed = RateLimit::new(crate::telemetry::ratelimit::REMIND_EVERY);
    loop {
        tokio::time::sleep(GRANTS_FILE_EVERY).await;
        stats
            .shared_addresses
            .store(logins.shared() as u64, std::sync::atomic::Ordering::Relaxed);
        let (d, l) = (dir.clone(), logins.clone());
        match tokio::task::spawn_blocking(move || receipts::write_grants(&d, &l, written)).await {
            Ok(Ok(v)) => {
                written = v;
                failed.take_pending();
            }
            Ok(Err(e)) => {
                if let Some(n) = failed.hit() {
                    tracing::warn!(dir = %dir.display(), error = %e, failures = n, "cannot write the logins behind the grants (dovegate why)");
                }
            }
            Err(_) => {}
        }
    }
}
