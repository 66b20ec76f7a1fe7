//! The daemon, `dovegate run`: start-up (`start.rs`: the store, the engine, the servers,
//! the sources), the loop that runs the engine until a signal or a dying source, reloads
//! (`reload.rs`, on SIGHUP: a bad configuration is refused and the running one stays) and
//! the shutdown (`shutdown.rs`). Log sources run in generations (`sources.rs`); the pushed
//! servers live across them (`pushed.rs`).

mod dry;
mod effective;
mod pushed;
mod reload;
mod shutdown;
mod signals;
mod sources;
mod start;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::Settings;
use crate::engine::{self, Engine, Exit};
use crate::serve::servers::Servers;
use crate::setup::{ConfigArgs, Failure, JournalArgs};
use crate::source::handle::Deaths;
use crate::source::SourceDeath;
use crate::state::CheckpointDir;
use crate::store::CommitStore;
use crate::telemetry::StatsRegistry;

use dry::DryRun;
use effective::Effective;
use pushed::Pushed;
use shutdown::Shutdown;
use signals::Signals;
use sources::Sources;

/// What `dovegate run`'s command line asks (`cli::run::RunArgs`, parsed).
#[derive(Debug, Default)]
pub struct Options {
    pub cfg: ConfigArgs,
    /// Log files to follow (replace source.logs).
    pub logs: Vec<PathBuf>,
    /// Grant lifetime (overrides grant.ttl).
    pub ttl: Option<String>,
    /// Overrides state.dir.
    pub state_dir: Option<PathBuf>,
    /// Overrides patterns.dir.
    pub patterns: Option<PathBuf>,
    pub journal: JournalArgs,
    /// Print what would be granted; write neither the map nor checkpoints.
    pub dry_run: bool,
}

/// The daemon's store: the writer's (the map, and the database when configured), or the
/// printing one of `--dry-run`.
type DaemonStore = Box<dyn CommitStore + Send>;

/// The running daemon. The fields are in the order they are dropped after the shutdown:
/// the engine (and its store) before the instance lock, the runtime last.
struct Daemon {
    sources: Sources,
    pushed: Pushed,
    /// Why a source died, when one did (the exit status says so).
    death: Option<SourceDeath>,
    died: tokio::sync::mpsc::UnboundedReceiver<SourceDeath>,
    deaths: Deaths,
    servers: Option<Servers>,
    _blocks: Option<crate::blocks::Blocks>,
    counters: Arc<Mutex<crate::engine::Counters>>,
    stats: Arc<StatsRegistry>,
    engine: Engine<DaemonStore>,
    checkpoints: CheckpointDir,
    _instance: Option<crate::store::instance::InstanceLock>,
    dry: Option<DryRun>,
    /// The settings at start: what only a restart changes (map.path, state.dir, map.action,
    /// grant.ipv6_prefix, [store]) keeps them (`reload::keep_restart_only`).
    started: Settings,
    cfg: Effective,
    args: Options,
    /// Woken by SIGHUP (the signal task).
    reload: Arc<Notify>,
    shutdown: Shutdown,
    runtime: tokio::runtime::Runtime,
}

pub fn run(args: Options) -> Result<(), Failure> {
    // Signal handlers first: a SIGTERM during start-up must still mean a clean stop.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))?;
    let signals = runtime
        .block_on(async { Signals::install() })
        .map_err(|e| Failure::runtime(format!("cannot install signal handlers: {e}")))?;
    let mut shutdown = Shutdown::new();
    let reload = Arc::new(Notify::new());
    let task = signals.spawn(&runtime, &shutdown, Arc::clone(&reload));
    shutdown.track("the signal handler", task);
    let mut daemon = Daemon::start(args, runtime, shutdown, reload)?;
    let result = daemon.serve();
    daemon.shutdown(result)
}

impl Daemon {
    /// Runs the engine until a signal stops it, a source dies or every source is gone;
    /// SIGHUP reloads and goes on.
    fn serve(&mut self) -> Result<(), Failure> {
        let mut heartbeat = {
            let stats = Arc::clone(&self.stats);
            let counters = Arc::clone(&self.counters);
            move |e: &Engine<DaemonStore>| {
                crate::notify::status(&status_line(e, &stats));
                crate::notify::watchdog();
                if let Ok(mut c) = counters.lock() {
                    *c = e.counters.clone();
                }
            }
        };
        loop {
            // A source that dies stops the daemon like SIGTERM (committing what was read),
            // but the exit status says so.
            let requested = self.shutdown.requested();
            let reload = &self.reload;
            let died = &mut self.died;
            let death = &mut self.death;
            let control = async {
                tokio::select! {
                    () = requested.cancelled() => Exit::Shutdown,
                    () = reload.notified() => Exit::Reload,
                    why = died.recv() => {
                        *death = why;
                        Exit::Shutdown
                    }
                }
            };
            let exit = self.runtime.block_on(engine::run(
                &mut self.engine,
                &mut self.sources.rx,
                self.cfg.settings.commit_interval,
                control,
                &mut heartbeat,
            ));
            match exit {
                Ok(Exit::Reload) => self.reload()?,
                Ok(Exit::Shutdown) => return Ok(()),
                Ok(Exit::SourcesGone) => {
                    // A dying source closes its channel just before it says why: wait for that.
                    let died = &mut self.died;
                    let why = self.runtime.block_on(async {
                        let wait = std::time::Duration::from_secs(2);
                        tokio::time::timeout(wait, died.recv()).await.ok().flatten()
                    });
                    return Err(Failure::runtime(why.map(|d| d.to_string()).unwrap_or_else(
                        || {
                            "every source stopped; dovegate exits so that systemd restarts it"
                                .into()
                        },
                    )));
                }
                Err(e) => return Err(Failure::runtime(e.0)),
            }
        }
    }
}

/// Followed files for logs: `a, b`, or `none`.
fn paths(logs: &[PathBuf]) -> String {
    if logs.is_empty() {
        return "none".into();
    }
    logs.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn status_line(engine: &Engine<DaemonStore>, stats: &StatsRegistry) -> String {
    stats.status_line(engine.active())
}
