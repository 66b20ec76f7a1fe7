//! The signals the daemon obeys: SIGTERM and SIGINT stop it, SIGHUP reloads. One task
//! reads them for the daemon's whole life and turns them into the shutdown's `requested`
//! token and a reload wake-up; it ends with the root token.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::shutdown::Shutdown;
use crate::engine::Exit;

/// SIGTERM, SIGINT and SIGHUP, registered before anything else starts.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Reads the signals on `runtime` until the shutdown's root token is cancelled: SIGTERM
    /// and SIGINT request the shutdown, SIGHUP wakes `reload` (a wake-up while the engine
    /// is busy is kept for its next wait; several become one reload, as signals do).
    pub(super) fn spawn(
        mut self,
        runtime: &tokio::runtime::Runtime,
        shutdown: &Shutdown,
        reload: Arc<Notify>,
    ) -> JoinHandle<()> {
        let requested = shutdown.requested().clone();
        let root = shutdown.root().clone();
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    () = root.cancelled() => return,
                    exit = self.next() => match exit {
                        Exit::Reload => reload.notify_one(),
                        _ => requested.cancel(),
                    },
                }
            }
        })
    }

    async fn next(&mut self) -> Exit {
        let exit = tokio::select! {
            _ = self.term.recv() => Exit::Shutdown,
            _ = self.int.recv() => Exit::Shutdown,
            _ = self.hup.recv() => Exit::Reload,
        };
        match exit {
            Exit::Reload => tracing::info!("SIGHUP: reloading the configuration"),
            _ => tracing::info!("shutting down: committing pending grants"),
        }
        exit
    }
}
