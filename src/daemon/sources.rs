//! The log sources run in generations: a reload stops one (after the engine took what it
//! sent) and starts the next from the checkpoints.

use super::dry::DryRun;
use super::effective::Effective;
use super::pushed::Pushed;
use crate::model::Batch;
use crate::setup::Failure;
use crate::source::handle::{Deaths, SourceHandle};
use crate::source::journal::{JournalSource, JournalSourceSpec, JournalStart};
use crate::source::{DaemonSink, FileSource, FileSourceSpec};
use crate::state::CheckpointDir;
use crate::telemetry::StatsRegistry;
use crate::timefmt;

/// One generation of sources: their handles and channel. A reload stops them (after the
/// engine committed what they sent) and starts new ones from the saved checkpoints; lines
/// read in between are read again, never lost.
pub(super) struct Sources {
    handles: Vec<SourceHandle>,
    pub(super) rx: tokio::sync::mpsc::Receiver<Batch>,
    /// Stopped by a reload that then failed (`stop_in_place`).
    stopped: bool,
}

impl Sources {
    pub(super) fn start(
        cfg: &Effective,
        checkpoints: &CheckpointDir,
        stats: &StatsRegistry,
        deaths: &Deaths,
        dry: Option<&DryRun>,
        pushed: &mut Pushed,
    ) -> Result<Sources, Failure> {
        let (tx, rx) = match dry {
            Some(d) => d.relay()?,
            None => tokio::sync::mpsc::channel(64),
        };
        let settings = &cfg.settings;
        pushed.attach(&tx);
        let mut handles = Vec::new();
        let cutoff = timefmt::now() - i64::try_from(settings.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let sink = |name: &str| DaemonSink::new(stats.reporter(name), settings.untimed_lines_grant);
        // Every source by name, for a file source's warning when it cannot be read.
        let mut named: Vec<String> = settings
            .logs
            .iter()
            .map(|p| format!("log file {}", p.display()))
            .collect();
        if cfg.journal.is_some() {
            named.push("the journal".into());
        }
        if let Some(s) = &settings.push.socket {
            named.push(format!("the post-login socket {}", s.display()));
        }
        if let Some(a) = &settings.push.auth_policy {
            named.push(format!("the auth-policy endpoint {a}"));
        }
        if let Some(l) = &settings.events.listen {
            named.push(format!("Dovecot's events on {l}"));
        }
        if settings.drac.enabled() {
            named.push("DRAC clients".into());
        }
        for (index, path) in settings.logs.iter().enumerate() {
            let mut others = named.clone();
            others.remove(index);
            let spec = FileSourceSpec {
                index,
                path: path.clone(),
                checkpoint: checkpoints.load(path),
                max_line: settings.max_line_bytes,
                poll_interval: settings.poll_interval,
                cutoff,
                others,
            };
            let source = FileSource {
                spec,
                scanner: cfg.scanner(),
                sink: sink(&path.display().to_string()),
                tx: tx.clone(),
            };
            let handle = source
                .spawn(deaths.clone())
                .map_err(|e| Failure::runtime(format!("cannot start source thread: {e}")))?;
            handles.push(handle);
        }
        if let Some(target) = &cfg.journal {
            let start = match checkpoints.load_cursor(&target.key()) {
                Some(c) => JournalStart::AfterCursor(c),
                None => JournalStart::Since(cutoff),
            };
            tracing::info!(journal = %target.key(), start = %start, units = %settings.provenance.units.join(", "), "following the journal");
            let source = JournalSource {
                spec: JournalSourceSpec {
                    index: settings.logs.len(),
                    target: target.clone(),
                    start,
                    max_line: settings.max_line_bytes.max(64 * 1024),
                    give_up: settings.journal_give_up,
                    others: {
                        let mut others = named.clone();
                        others.remove(settings.logs.len());
                        others
                    },
                },
                scanner: cfg.scanner(),
                provenance: settings.provenance.clone(),
                sink: sink(&target.key()),
                tx: tx.clone(),
            };
            let handle = source
                .spawn(deaths.clone())
                .map_err(|e| Failure::runtime(format!("cannot start journal thread: {e}")))?;
            handles.push(handle);
        }
        Ok(Sources {
            handles,
            rx,
            stopped: false,
        })
    }

    /// Stops every source thread (killing journalctl) and joins them, and returns what
    /// they (and the pushed servers' relay) sent that the engine has not taken: the caller
    /// accepts it, so a pushed login answered OK is never dropped with the channel. The
    /// channel is closed first, so that a thread blocked on a full channel returns and the
    /// relay holds its next batch for the next generation.
    pub(super) fn stop_in_place(&mut self) -> Vec<Batch> {
        self.rx.close();
        self.stopped = true;
        let handles = std::mem::take(&mut self.handles);
        for h in &handles {
            h.request_stop();
        }
        for h in handles {
            let name = h.name().to_string();
            h.stop();
            tracing::debug!(source = %name, "source stopped");
        }
        // Until None, not until empty: after `close`, a sender that already reserved its
        // slot (the relay) still delivers, and `try_recv` could miss that batch.
        let mut left = Vec::new();
        while let Some(b) = self.rx.blocking_recv() {
            left.push(b);
        }
        left
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped
    }
}
