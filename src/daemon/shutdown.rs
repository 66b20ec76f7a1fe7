//! The daemon's shutdown, in the order that loses nothing: the pushed servers first (what
//! they answered OK is forwarded and committed), then the sources (their batches
//! committed), the engine's last commit, and the socketmap, policy and metrics servers last
//! (they answer until the end).

use super::{Daemon, DaemonStore};
use crate::config::Settings;
use crate::engine::Engine;
use crate::setup::Failure;
use crate::telemetry::StatsRegistry;
use crate::timefmt;

impl Daemon {
    /// Stops everything and returns `result`, or the death of a source when one died.
    pub(super) fn shutdown(mut self, result: Result<(), Failure>) -> Result<(), Failure> {
        crate::notify::stopping();
        // The pushed servers stop first; what they answered OK is forwarded, taken and
        // committed before the end.
        let relay = self.pushed.close();
        self.runtime.block_on(async {
            let bound = tokio::time::sleep(std::time::Duration::from_secs(2));
            tokio::pin!(relay, bound);
            loop {
                tokio::select! {
                    Some(b) = self.sources.rx.recv() => self.engine.accept(b, timefmt::now()),
                    _ = &mut relay => break,
                    () = &mut bound => break,
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
        if let Some(task) = self.shared_policy {
            task.abort();
        }
        // Last: the socketmap answers until the end.
        if let Some(servers) = self.servers {
            self.runtime.block_on(servers.shutdown());
        }
        log_summary(&self.cfg.settings, &self.engine, &self.stats);
        match self.death {
            Some(why) => Err(Failure::runtime(why)),
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
