//! The servers `[serve]` and `[policy]` configure (socketmap, metrics, policy server),
//! started with the daemon and restarted by a reload that changes their settings. Each
//! runs under a child token of the one `Servers` is started with: a reload stops one alone,
//! cancelling that token stops them all.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::metrics::{self, MetricsSource};
use super::socketmap::{self, SocketmapConfig};
use crate::engine::GrantsView;
use crate::net::{Listen, Server};
use crate::policy::{self, PolicyServer, PolicySettings};
use crate::telemetry::ServerReporter;

/// A running server of any kind: it can be stopped.
trait Stop {
    fn shutdown(self) -> impl Future<Output = ()>;
}

impl Stop for Server {
    fn shutdown(self) -> impl Future<Output = ()> {
        Server::shutdown(self)
    }
}

impl Stop for PolicyServer {
    fn shutdown(self) -> impl Future<Output = ()> {
        PolicyServer::shutdown(self)
    }
}

/// One configured server and the settings it runs with.
struct Running<C, S = Server> {
    cfg: Option<C>,
    server: Option<S>,
}

impl<C, S> Running<C, S> {
    fn off() -> Running<C, S> {
        Running {
            cfg: None,
            server: None,
        }
    }
}

/// What the servers are to run: `[serve]` and `[policy]` as validated (None: off).
#[derive(Debug, Clone, Default)]
pub struct ServeSettings {
    pub socketmap: Option<SocketmapConfig>,
    pub metrics: Option<Listen>,
    pub policy: Option<PolicySettings>,
}

/// The running `[serve]` and `[policy]` servers.
pub struct Servers {
    socketmap: Running<SocketmapConfig>,
    metrics: Running<Listen>,
    policy: Running<PolicySettings, PolicyServer>,
    view: GrantsView,
    source: Arc<MetricsSource>,
    /// What the policy server keeps across its restarts.
    policy_ctx: policy::Context,
    /// The parent of every server's token.
    stop: CancellationToken,
}

pub use crate::net::StartError;

/// How long a server may take to stop at shutdown before it is named and left.
const STOP_WITHIN: Duration = Duration::from_secs(5);

async fn socketmap_server(
    stop: CancellationToken,
    cfg: SocketmapConfig,
    view: GrantsView,
    reporter: ServerReporter,
) -> Result<Server, StartError> {
    let listen = cfg.listen.clone();
    socketmap::start_under(&stop, cfg, view, reporter)
        .await
        .map_err(|error| StartError::Listen {
            key: "serve.socketmap",
            listen,
            error,
        })
}

async fn metrics_server(
    stop: CancellationToken,
    listen: Listen,
    src: Arc<MetricsSource>,
) -> Result<Server, StartError> {
    metrics::start(&stop, &listen, src)
        .await
        .map_err(|error| StartError::Listen {
            key: "serve.metrics",
            listen,
            error,
        })
}

async fn policy_server(
    stop: CancellationToken,
    cfg: PolicySettings,
    ctx: policy::Context,
    reporter: ServerReporter,
) -> Result<PolicyServer, StartError> {
    let listen = cfg.listen.clone();
    policy::start_under(&stop, cfg, &ctx, reporter)
        .await
        .map_err(|error| StartError::Listen {
            key: "policy.listen",
            listen,
            error,
        })
}

/// Moves `running` to `new`. A new address is bound before the old one is released, so
/// that a refused one leaves the old server running; the same address is released first
/// (it cannot be bound twice), and taken back with the old settings if the new ones fail.
async fn restart<C, S, F, Fut>(
    running: &mut Running<C, S>,
    new: Option<C>,
    listen: fn(&C) -> &Listen,
    start: F,
) where
    C: Clone + PartialEq,
    S: Stop,
    F: Fn(C) -> Fut,
    Fut: Future<Output = Result<S, StartError>>,
{
    if running.cfg == new {
        return;
    }
    let same_address = match (&running.cfg, &new) {
        (Some(a), Some(b)) => listen(a) == listen(b),
        _ => false,
    };
    if same_address {
        if let Some(s) = running.server.take() {
            s.shutdown().await;
        }
    }
    let started = match new.clone() {
        Some(c) => start(c).await.map(Some),
        None => Ok(None),
    };
    match started {
        Ok(server) => {
            if let Some(s) = running.server.take() {
                s.shutdown().await;
            }
            running.server = server;
            running.cfg = new;
        }
        Err(e) => {
            tracing::error!("reload: {e}; the previous settings stay");
            if same_address {
                if let Some(old) = running.cfg.clone() {
                    match start(old).await {
                        Ok(s) => running.server = Some(s),
                        Err(e) => {
                            tracing::error!("{e}: not serving until the next reload or restart");
                            running.cfg = None;
                        }
                    }
                }
            }
        }
    }
}

impl Servers {
    /// Starts the configured servers, each under a child of `stop`; an error names the key
    /// and address at fault.
    pub async fn start(
        settings: ServeSettings,
        source: Arc<MetricsSource>,
        mut policy_ctx: policy::Context,
        stop: &CancellationToken,
    ) -> Result<Servers, StartError> {
        // Their own: `shutdown` cancels it, not the caller's.
        let stop = &stop.child_token();
        // The policy server counts where the metrics read.
        policy_ctx.stats = Arc::clone(&source.policy);
        let mut servers = Servers {
            socketmap: Running::off(),
            metrics: Running::off(),
            policy: Running::off(),
            view: source.view.clone(),
            source,
            policy_ctx,
            stop: stop.clone(),
        };
        if let Some(c) = settings.socketmap {
            servers.socketmap.server = Some(
                socketmap_server(
                    stop.clone(),
                    c.clone(),
                    servers.view.clone(),
                    servers.reporter(socketmap::NAME),
                )
                .await?,
            );
            servers.socketmap.cfg = Some(c);
        }
        if let Some(c) = settings.policy {
            servers.policy_ctx.restore_logins();
            servers.policy.server = Some(
                policy_server(
                    stop.clone(),
                    c.clone(),
                    servers.policy_ctx.clone(),
                    servers.reporter(crate::policy::server::NAME),
                )
                .await?,
            );
            servers.policy.cfg = Some(c);
        }
        servers.policy_serving();
        if let Some(l) = settings.metrics {
            servers.metrics.server =
                Some(metrics_server(stop.clone(), l.clone(), Arc::clone(&servers.source)).await?);
            servers.metrics.cfg = Some(l);
        }
        Ok(servers)
    }

    /// Applies reloaded settings: a server whose settings changed is restarted with them
    /// (started, stopped); one that cannot be keeps its previous settings, said in an ERROR.
    /// Connections open to a restarted server are served to their end under the previous
    /// settings (Postfix reopens its policy and socketmap connections within minutes).
    pub async fn reload(&mut self, settings: ServeSettings) {
        let view = self.view.clone();
        let stop = self.stop.clone();
        // Reporters are made when a server starts: one never configured has no series.
        let reports = Arc::clone(&self.source);
        if self.socketmap.cfg != settings.socketmap {
            tracing::info!(
                from = %describe(self.socketmap.cfg.as_ref().map(|c| &c.listen)),
                to = %describe(settings.socketmap.as_ref().map(|c| &c.listen)),
                "reload: [serve] socketmap settings changed; restarting the socketmap server"
            );
        }
        restart(
            &mut self.socketmap,
            settings.socketmap,
            |c| &c.listen,
            |c| {
                let reporter = reports.stats.server_reporter(socketmap::NAME);
                socketmap_server(stop.clone(), c, view.clone(), reporter)
            },
        )
        .await;
        if self.policy.cfg != settings.policy {
            tracing::info!(
                from = %describe(self.policy.cfg.as_ref().map(|c| &c.listen)),
                to = %describe(settings.policy.as_ref().map(|c| &c.listen)),
                "reload: [policy] settings changed; restarting the policy server (what the caps counted stays)"
            );
        }
        let ctx = self.policy_ctx.clone();
        restart(
            &mut self.policy,
            settings.policy,
            |c| &c.listen,
            |c| {
                let reporter = reports.stats.server_reporter(crate::policy::server::NAME);
                policy_server(stop.clone(), c, ctx.clone(), reporter)
            },
        )
        .await;
        self.policy_serving();
        let source = Arc::clone(&self.source);
        if self.metrics.cfg != settings.metrics {
            tracing::info!(
                from = %describe(self.metrics.cfg.as_ref()),
                to = %describe(settings.metrics.as_ref()),
                "reload: serve.metrics changed; restarting the metrics server"
            );
        }
        restart(
            &mut self.metrics,
            settings.metrics,
            |l| l,
            |l| metrics_server(stop.clone(), l, Arc::clone(&source)),
        )
        .await;
    }

    /// How the server `name` reports: to the daemon's counters and observers.
    fn reporter(&self, name: &'static str) -> ServerReporter {
        self.source.stats.server_reporter(name)
    }

    /// The policy metrics are shown while the policy server runs.
    fn policy_serving(&self) {
        self.policy_ctx
            .stats
            .serving
            .store(self.policy.server.is_some(), Ordering::Relaxed);
    }

    /// Where the policy server listens (for port 0, the port chosen), if it runs.
    pub fn policy_listen(&self) -> Option<&Listen> {
        self.policy.server.as_ref().map(PolicyServer::listen)
    }

    /// Stops every server (removing their unix sockets); the metrics server last. Each
    /// may take STOP_WITHIN: one that does not stop by then is named and left.
    pub async fn shutdown(self) {
        if let Some(s) = self.socketmap.server {
            bounded("the socketmap server", s.shutdown()).await;
        }
        if let Some(p) = self.policy.server {
            bounded("the policy server", p.shutdown()).await;
        }
        if let Some(m) = self.metrics.server {
            bounded("the metrics server", m.shutdown()).await;
        }
        self.stop.cancel();
    }
}

async fn bounded(name: &str, stopping: impl Future<Output = ()>) {
    if tokio::time::timeout(STOP_WITHIN, stopping).await.is_err() {
        tracing::warn!(
            "shutdown: {name} did not stop within {}s; left to the process's end",
            STOP_WITHIN.as_secs()
        );
    }
}

fn describe(listen: Option<&Listen>) -> String {
    listen.map_or_else(|| "off".to_string(), Listen::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LoginsView;
    use crate::state::CheckpointDir;
    use crate::telemetry::StatsRegistry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn source(dir: &std::path::Path, view: &GrantsView) -> Arc<MetricsSource> {
        Arc::new(MetricsSource {
            stats: Arc::new(StatsRegistry::default()),
            engine: Arc::default(),
            view: view.clone(),
            checkpoints: CheckpointDir::read_only(dir),
            state_dir: dir.to_path_buf(),
            policy: Arc::default(),
        })
    }

    fn policy_ctx(view: &GrantsView) -> policy::Context {
        policy::Context::new(view.clone(), LoginsView::default(), None, None)
    }

    fn bound(s: &Servers) -> Option<Listen> {
        s.metrics.server.as_ref().map(|s| s.listen().clone())
    }

    fn metrics_only(listen: Option<Listen>) -> ServeSettings {
        ServeSettings {
            metrics: listen,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_reload_onto_a_taken_address_keeps_the_running_server() {
        let dir = tempfile::tempdir().unwrap();
        let view = GrantsView::default();
        let any = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let mut servers = Servers::start(
            metrics_only(Some(any)),
            source(dir.path(), &view),
            policy_ctx(&view),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let Some(Listen::Inet(running)) = bound(&servers) else {
            panic!("metrics not started");
        };
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = Listen::Inet(taken.local_addr().unwrap());
        servers.reload(metrics_only(Some(busy))).await;
        assert_eq!(bound(&servers), Some(Listen::Inet(running)));
        assert!(tokio::net::TcpStream::connect(running).await.is_ok());
        // Turned off: released.
        servers.reload(metrics_only(None)).await;
        assert_eq!(bound(&servers), None);
        assert!(tokio::net::TcpStream::connect(running).await.is_err());
        servers.shutdown().await;
    }

    /// The daemon's shutdown token stops every server, a restarted one too, with no call
    /// to `shutdown`.
    #[tokio::test]
    async fn cancelling_the_parent_stops_every_server() {
        let dir = tempfile::tempdir().unwrap();
        let view = GrantsView::default();
        let any = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let parent = CancellationToken::new();
        let mut servers = Servers::start(
            metrics_only(Some(any.clone())),
            source(dir.path(), &view),
            policy_ctx(&view),
            &parent,
        )
        .await
        .unwrap();
        // Restarted by a reload: under the same parent.
        servers
            .reload(ServeSettings {
                metrics: Some(any),
                socketmap: Some(SocketmapConfig {
                    listen: Listen::Inet("127.0.0.1:0".parse().unwrap()),
                    values: Default::default(),
                    default_value: "OK".into(),
                    max_connections: 4,
                    idle_timeout: std::time::Duration::from_secs(1),
                }),
                ..Default::default()
            })
            .await;
        let Some(Listen::Inet(metrics)) = bound(&servers) else {
            panic!("metrics not started");
        };
        let Some(Listen::Inet(socketmap)) = servers
            .socketmap
            .server
            .as_ref()
            .map(|s| s.listen().clone())
        else {
            panic!("socketmap not started");
        };
        parent.cancel();
        for addr in [metrics, socketmap] {
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while tokio::net::TcpStream::connect(addr).await.is_ok() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("stopped by the parent token");
        }
        drop(servers);
    }

    /// One RCPT request for `ip` on a new connection to `addr`: the action.
    async fn ask(addr: std::net::SocketAddr, ip: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={ip}\ninstance=1\n\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        while !got.ends_with(b"\n\n") {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed: {got:?}");
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// A reload restarts the policy server with its new settings, keeps what the caps
    /// counted, and turns it (and its metrics) off.
    #[tokio::test]
    async fn a_reload_restarts_the_policy_server_and_keeps_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let view = GrantsView::default();
        view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
        // A free port, released for the server (port 0 would move at each restart).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cfg = PolicySettings::for_listen(Listen::Inet(addr));
        cfg.caps.grant_recipients_per_hour = 100;
        let src = source(dir.path(), &view);
        let settings = |cfg: &PolicySettings| ServeSettings {
            policy: Some(cfg.clone()),
            ..Default::default()
        };
        let mut servers = Servers::start(
            settings(&cfg),
            Arc::clone(&src),
            policy_ctx(&view),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(servers.policy_listen(), Some(&Listen::Inet(addr)));
        assert!(src.policy.serving.load(Ordering::Relaxed));
        for _ in 0..2 {
            assert_eq!(ask(addr, "192.0.2.1").await, "action=OK\n\n");
        }
        // The cap lowered under what was counted: the next recipient is over it.
        cfg.caps.grant_recipients_per_hour = 2;
        servers.reload(settings(&cfg)).await;
        assert_eq!(servers.policy_listen(), Some(&Listen::Inet(addr)));
        let r = ask(addr, "192.0.2.1").await;
        assert!(
            r.contains("DEFER 4.7.1 sending cap grant_recipients_per_hour"),
            "{r}"
        );
        assert!(metrics::render(&src).contains("dovegate_policy_answers_total{action=\"ok\"} 2"));
        servers.reload(ServeSettings::default()).await;
        assert_eq!(servers.policy_listen(), None);
        assert!(!src.policy.serving.load(Ordering::Relaxed));
        assert!(!metrics::render(&src).contains("dovegate_policy"));
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        servers.shutdown().await;
    }
}
