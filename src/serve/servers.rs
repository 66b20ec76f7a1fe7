//! The servers `[serve]` configures (socketmap, metrics), started with the daemon and
//! restarted by a reload that changes their settings.

use std::future::Future;
use std::io;
use std::sync::Arc;

use super::metrics::{self, MetricsSource};
use super::socketmap::{self, SocketmapConfig};
use crate::engine::GrantsView;
use crate::net::{Listen, Server};

/// One configured server and the settings it runs with.
struct Running<C> {
    cfg: Option<C>,
    server: Option<Server>,
}

/// The running `[serve]` servers.
pub struct Servers {
    socketmap: Running<SocketmapConfig>,
    metrics: Running<Listen>,
    view: GrantsView,
    source: Arc<MetricsSource>,
}

/// A server that could not be started: the key at fault and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {listen}: {error}")]
pub struct StartError {
    pub key: &'static str,
    pub listen: Listen,
    pub error: io::Error,
}

async fn socketmap_server(cfg: SocketmapConfig, view: GrantsView) -> Result<Server, StartError> {
    let listen = cfg.listen.clone();
    socketmap::start(cfg, view)
        .await
        .map_err(|error| StartError {
            key: "serve.socketmap",
            listen,
            error,
        })
}

async fn metrics_server(listen: Listen, src: Arc<MetricsSource>) -> Result<Server, StartError> {
    metrics::start(&listen, src)
        .await
        .map_err(|error| StartError {
            key: "serve.metrics",
            listen,
            error,
        })
}

/// Moves `running` to `new`. A new address is bound before the old one is released, so
/// that a refused one leaves the old server running; the same address is released first
/// (it cannot be bound twice), and taken back with the old settings if the new ones fail.
async fn restart<C, F, Fut>(
    running: &mut Running<C>,
    new: Option<C>,
    listen: fn(&C) -> &Listen,
    start: F,
) where
    C: Clone + PartialEq,
    F: Fn(C) -> Fut,
    Fut: Future<Output = Result<Server, StartError>>,
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
    /// Starts the configured servers; an error names the key and address at fault.
    pub async fn start(
        socketmap: Option<SocketmapConfig>,
        metrics: Option<Listen>,
        view: GrantsView,
        source: Arc<MetricsSource>,
    ) -> Result<Servers, StartError> {
        let mut servers = Servers {
            socketmap: Running {
                cfg: None,
                server: None,
            },
            metrics: Running {
                cfg: None,
                server: None,
            },
            view,
            source,
        };
        if let Some(c) = socketmap {
            servers.socketmap.server =
                Some(socketmap_server(c.clone(), servers.view.clone()).await?);
            servers.socketmap.cfg = Some(c);
        }
        if let Some(l) = metrics {
            servers.metrics.server =
                Some(metrics_server(l.clone(), Arc::clone(&servers.source)).await?);
            servers.metrics.cfg = Some(l);
        }
        Ok(servers)
    }

    /// Applies reloaded settings: a server whose settings changed is restarted with them
    /// (started, stopped); one that cannot be keeps its previous settings, said in an ERROR.
    pub async fn reload(&mut self, socketmap: Option<SocketmapConfig>, metrics: Option<Listen>) {
        let view = self.view.clone();
        if self.socketmap.cfg != socketmap {
            tracing::info!(
                from = %describe(self.socketmap.cfg.as_ref().map(|c| &c.listen)),
                to = %describe(socketmap.as_ref().map(|c| &c.listen)),
                "reload: [serve] socketmap settings changed; restarting the socketmap server"
            );
        }
        restart(
            &mut self.socketmap,
            socketmap,
            |c| &c.listen,
            |c| socketmap_server(c, view.clone()),
        )
        .await;
        let source = Arc::clone(&self.source);
        if self.metrics.cfg != metrics {
            tracing::info!(
                from = %describe(self.metrics.cfg.as_ref()),
                to = %describe(metrics.as_ref()),
                "reload: serve.metrics changed; restarting the metrics server"
            );
        }
        restart(
            &mut self.metrics,
            metrics,
            |l| l,
            |l| metrics_server(l, Arc::clone(&source)),
        )
        .await;
    }

    /// Stops every server (removing their unix sockets).
    pub async fn shutdown(self) {
        for s in [self.socketmap.server, self.metrics.server]
            .into_iter()
            .flatten()
        {
            s.shutdown().await;
        }
    }
}

fn describe(listen: Option<&Listen>) -> String {
    listen.map_or_else(|| "off".to_string(), Listen::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::checkpoint::CheckpointDir;
    use crate::telemetry::StatsRegistry;

    fn source(dir: &std::path::Path) -> Arc<MetricsSource> {
        Arc::new(MetricsSource {
            stats: Arc::new(StatsRegistry::default()),
            engine: Arc::default(),
            view: GrantsView::default(),
            checkpoints: CheckpointDir::read_only(dir),
            state_dir: dir.to_path_buf(),
        })
    }

    fn bound(s: &Servers) -> Option<Listen> {
        s.metrics.server.as_ref().map(|s| s.listen().clone())
    }

    #[tokio::test]
    async fn a_reload_onto_a_taken_address_keeps_the_running_server() {
        let dir = tempfile::tempdir().unwrap();
        let any = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let mut servers =
            Servers::start(None, Some(any), GrantsView::default(), source(dir.path()))
                .await
                .unwrap();
        let Some(Listen::Inet(running)) = bound(&servers) else {
            panic!("metrics not started");
        };
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = Listen::Inet(taken.local_addr().unwrap());
        servers.reload(None, Some(busy)).await;
        assert_eq!(bound(&servers), Some(Listen::Inet(running)));
        assert!(tokio::net::TcpStream::connect(running).await.is_ok());
        // Turned off: released.
        servers.reload(None, None).await;
        assert_eq!(bound(&servers), None);
        assert!(tokio::net::TcpStream::connect(running).await.is_err());
        servers.shutdown().await;
    }
}
