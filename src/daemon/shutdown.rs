//! The daemon's shutdown, in the order that loses nothing: the pushed servers first (what
//! they answered OK is forwarded and committed), then the sources (their batches
//! committed), the engine's last commit, and the socketmap, policy and metrics servers last
//! (they answer until the end).

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Daemon, DaemonStore};
use crate::config::Settings;
use crate::engine::Engine;
use crate::setup::Failure;
use crate::telemetry::StatsRegistry;
use crate::timefmt;

/// How long the pushed servers' relay may take to forward what they answered OK.
const RELAY_WITHIN: Duration = Duration::from_secs(2);
/// How long the tracked tasks may take to end once the root token is cancelled.
const TASKS_WITHIN: Duration = Duration::from_secs(5);

/// The daemon's one shutdown, as mini-redis's `shutdown.rs` has it: a root token that every
/// server and task the daemon starts joins (through a child token), and the tasks it waits
/// for at the end, by name.
///
/// Not one cancel but phases, children of the root, because the order is what makes a
/// shutdown lose nothing (and tests rely on it):
/// 1. `pushed`: push, events and DRAC stop accepting; the relay forwards what they
///    answered OK, and the engine takes it.
/// 2. The log sources stop (their threads have their own stop, `SourceHandle`) and hand
///    over what they read; the engine commits it.
/// 3. `answering`: the socketmap, policy and metrics servers and the shared policy
///    exchange stop last, so that Postfix is answered from the final map until the end.
/// 4. The root: whatever else joined it (the signal task); then a bounded wait for every
///    tracked task, naming any that did not end.
///
/// Each server also has a token of its own under its phase's, so that a reload can stop
/// and restart one server while the others serve on. `requested` (SIGTERM, SIGINT) only
/// ends the engine's loop: the phases then run in order.
pub(super) struct Shutdown {
    root: CancellationToken,
    requested: CancellationToken,
    pushed: CancellationToken,
    answering: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Shutdown {
    pub(super) fn new() -> Shutdown {
        let root = CancellationToken::new();
        Shutdown {
            requested: root.child_token(),
            pushed: root.child_token(),
            answering: root.child_token(),
            root,
            tasks: Vec::new(),
        }
    }

    /// Cancelled last: everything stops.
    pub(super) fn root(&self) -> &CancellationToken {
        &self.root
    }

    /// Cancelled when the daemon is asked to stop (SIGTERM, SIGINT): the engine's loop ends.
    pub(super) fn requested(&self) -> &CancellationToken {
        &self.requested
    }

    /// The parent of the pushed servers' tokens (phase 1).
    pub(super) fn pushed(&self) -> &CancellationToken {
        &self.pushed
    }

    /// The parent of the answering servers' and the shared policy's tokens (phase 3).
    pub(super) fn answering(&self) -> &CancellationToken {
        &self.answering
    }

    /// A task that ends once its phase's token (or the root) is cancelled: waited for at
    /// the end, and named if it does not end.
    pub(super) fn track(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.tasks.push((name, task));
    }

    /// Cancels the root and waits, at most TASKS_WITHIN in all, for every tracked task.
    async fn finish(self) {
        self.root.cancel();
        let deadline = tokio::time::Instant::now() + TASKS_WITHIN;
        for (name, task) in self.tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(
                    "shutdown: {name} did not end within {}s; left to the process's end",
                    TASKS_WITHIN.as_secs()
                );
            }
        }
    }
}

impl Daemon {
    /// Stops everything and returns `result`, or the death of a source when one died.
    pub(super) fn shutdown(mut self, result: Result<(), Failure>) -> Result<(), Failure> {
        crate::notify::stopping();
        // The pushed servers stop first; what they answered OK is forwarded, taken and
        // committed before the end.
        self.shutdown.pushed().cancel();
        let relay = self.pushed.close();
        self.runtime.block_on(async {
            let bound = tokio::time::sleep(RELAY_WITHIN);
            tokio::pin!(relay, bound);
            loop {
                tokio::select! {
                    Some(b) = self.sources.rx.recv() => self.engine.accept(b, timefmt::now()),
                    _ = &mut relay => break,
                    () = &mut bound => {
                        tracing::warn!(
                            "shutdown: the pushed servers' relay did not finish within {}s; the logins it still holds are not committed",
                            RELAY_WITHIN.as_secs()
                        );
                        break;
                    }
                }
            }
        });
        for b in self.sources.stop_in_place() {
            self.engine.accept(b, timefmt::now());
        }
        if self.engine.has_pending() {
            if let Err(e) = self.engine.flush(timefmt::now()) {
                tracing::error!(error = %e, "map commit at shutdown failed; the logins read since the last checkpoint are read again at the next start");
            }
        }
        // Last: the socketmap answers until the end. The servers stop one after another
        // (metrics last); then the rest of the phase (the shared policy exchange).
        if let Some(servers) = self.servers {
            self.runtime.block_on(servers.shutdown());
        }
        self.shutdown.answering().cancel();
        self.runtime.block_on(self.shutdown.finish());
        log_summary(&self.cfg.settings, &self.engine, &self.stats);
        match self.death {
            Some(why) => Err(Failure::runtime(why.to_string())),
            None => result,
        }
    }
}

fn log_summary(settings: &Settings, engine: &Engine<DaemonStore>, stats: &StatsRegistry) {
    let c = &engine.counters;
    let t = stats.totals();
    tracing::info!(
        map = %settings.map_path.display(),
        bytes = t.bytes,
        lines = t.lines,
        logins = t.logins,
        invalid_ip = t.invalid_ip,
        ambiguous_ip = t.ambiguous_ip,
        forged = t.forged,
        untimed = t.untimed,
        too_long = t.too_long,
        granted = c.granted,
        excluded = c.excluded,
        commits = c.commits,
        removed = c.removed,
        active = engine.active(),
        "dovegate stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The phases are children of the root: cancelling one leaves the others; the root's
    /// cancel reaches every one. The wait for tracked tasks is bounded: one that ignores
    /// the token is left (and named) after TASKS_WITHIN, not waited for.
    #[tokio::test(start_paused = true)]
    async fn phases_stop_alone_and_the_wait_for_tasks_is_bounded() {
        let mut shutdown = Shutdown::new();
        shutdown.pushed().cancel();
        assert!(!shutdown.answering().is_cancelled());
        assert!(!shutdown.requested().is_cancelled());
        let stop = shutdown.answering().child_token();
        let polite = tokio::spawn(async move { stop.cancelled().await });
        let stuck = tokio::spawn(std::future::pending::<()>());
        let requested = shutdown.requested().clone();
        shutdown.track("a polite task", polite);
        shutdown.track("a stuck task", stuck);
        let started = tokio::time::Instant::now();
        shutdown.finish().await;
        assert!(requested.is_cancelled());
        assert_eq!(started.elapsed(), TASKS_WITHIN);
    }
}
