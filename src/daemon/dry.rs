//! `--dry-run`: what it prints beside the grants, and whether a daemon already holds the map.

use crate::config::Settings;
use crate::model::Batch;
use crate::setup::Failure;
use crate::store::dry::Details;

/// What `--dry-run` needs: the login details the dry store prints, and whether a daemon
/// already runs on the configured map (whose push sockets it must not take).
pub(super) struct DryRun {
    pub(super) details: Details,
    pub(super) daemon_running: bool,
}

impl DryRun {
    pub(super) fn new(settings: &Settings) -> DryRun {
        let daemon_running = matches!(
            crate::store::instance::map_holder(&settings.map_path),
            Ok(Some(_))
        );
        tracing::info!(
            "--dry-run: printing what would be granted and expired; neither {} nor the checkpoints in {} are written",
            settings.map_path.display(),
            settings.state_dir.display()
        );
        DryRun {
            details: Details::default(),
            daemon_running,
        }
    }

    /// A channel whose batches pass a thread that notes their login details on the way.
    pub(super) fn relay(
        &self,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<Batch>,
            tokio::sync::mpsc::Receiver<Batch>,
        ),
        Failure,
    > {
        let (tx, mut from_sources) = tokio::sync::mpsc::channel::<Batch>(64);
        let (to_engine, rx) = tokio::sync::mpsc::channel(64);
        let details = self.details.clone();
        std::thread::Builder::new()
            .name("dry-run".into())
            .spawn(move || {
                // Ends when the sources are gone or the engine dropped its receiver.
                while let Some(batch) = from_sources.blocking_recv() {
                    details.record(&batch);
                    if to_engine.blocking_send(batch).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Failure::runtime(format!("cannot start dry-run thread: {e}")))?;
        Ok((tx, rx))
    }
}
