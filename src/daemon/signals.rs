//! The signals the daemon obeys: SIGTERM and SIGINT stop it, SIGHUP reloads.

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

    pub(super) async fn next(&mut self) -> Exit {
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
