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
    let server = server::start(Arc::new(State::new(cfg, ctx.clone()))).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn section(listen: &str) -> PolicySection {
        crate::config::FileConfig::embedded()
            .policy
            .clone()
            .with_listen(listen)
    }

    impl PolicySection {
        fn with_listen(mut self, listen: &str) -> PolicySection {
            self.listen = listen.into();
            self
        }
    }

    #[test]
    fn listen_forms_and_refusals() {
        assert_eq!(PolicySettings::from_section(&section("")).unwrap(), None);
        let s = PolicySettings::from_section(&section("127.0.0.1:10040"))
            .unwrap()
            .unwrap();
        assert_eq!(s.listen, Listen::Inet("127.0.0.1:10040".parse().unwrap()));
        assert_eq!(s.peers, None);
        assert!(s.caps.user_recipients_per_hour > 0, "caps on by default");
        let mut unix = section("/run/dovegate/policy");
        unix.users = vec![crate::net::peers::UserSpec::Uid(107)];
        let s = PolicySettings::from_section(&unix).unwrap().unwrap();
        assert_eq!(s.peers, Some(vec![107]));
        let e = PolicySettings::from_section(&section("192.0.2.1:10040")).unwrap_err();
        assert!(
            e.0.starts_with("policy.listen:") && e.0.contains("loopback"),
            "{}",
            e.0
        );
        let mut inet_block = section("127.0.0.1:10040");
        inet_block.block_on_cap = true;
        let e = PolicySettings::from_section(&inet_block).unwrap_err();
        assert!(e.0.starts_with("policy.block_on_cap:"), "{}", e.0);
        unix.users = vec![crate::net::peers::UserSpec::Name(
            "no-such-user-here".into(),
        )];
        let e = PolicySettings::from_section(&unix).unwrap_err();
        assert!(e.0.starts_with("policy.users[0]:"), "{}", e.0);
        let e = PolicySettings::from_section(&section("relative/path")).unwrap_err();
        assert!(e.0.starts_with("policy.listen:"), "{}", e.0);
    }
}
