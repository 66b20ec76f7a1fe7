//! `dovegate run`: wires sources, engine and map together and runs until SIGTERM/SIGINT;
//! SIGHUP reloads the configuration (a bad one is refused and the running one stays).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::pushed::{Pushed, PushedSettings};
use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::config::Settings;
use crate::engine::{self, Engine, Exit};
use crate::grant::Policy;
use crate::model::Batch;
use crate::net::Listen;
use crate::pattern::PatternSet;
use crate::scan::{Scanner, Visit};
use crate::serve::metrics::MetricsSource;
use crate::serve::servers::{ServeSettings, Servers};
use crate::source::handle::{Deaths, SourceHandle};
use crate::source::journal::{JournalSource, JournalSourceSpec, JournalStart, JournalTarget};
use crate::source::{DaemonSink, FileSource, FileSourceSpec};
use crate::state::CheckpointDir;
use crate::store::dry::{Details, DryStore};
use crate::store::fleet::WriterStore;
use crate::store::{CommitStore, LmdbMap, OpenMode};
use crate::telemetry::StatsRegistry;
use crate::timefmt;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Log file to follow (repeatable; replaces source.logs).
    #[arg(long = "log", value_name = "PATH")]
    logs: Vec<PathBuf>,
    /// Grant lifetime after the last login, e.g. 30m (overrides grant.ttl).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Where checkpoints are kept (overrides state.dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Pattern directory replacing the embedded library (overrides patterns.dir).
    #[arg(long, value_name = "DIR")]
    patterns: Option<PathBuf>,
    #[command(flatten)]
    journal: JournalArgs,
    /// Follow the sources and print what would be granted and expired, writing neither the
    /// map nor checkpoints (to run beside the old daemon before switching).
    #[arg(long)]
    dry_run: bool,
}

/// Journal selection, shared by `run` and `test`.
#[derive(Debug, clap::Args, Default, Clone)]
pub struct JournalArgs {
    /// Follow the system journal (source.journal = true). Without --log, files are not followed.
    #[arg(long)]
    pub journal: bool,
    /// Read the journal in this directory instead of the system one (containers, tests).
    #[arg(long, value_name = "DIR", conflicts_with = "journal_file")]
    pub journal_dir: Option<PathBuf>,
    /// Read this journal file.
    #[arg(long, value_name = "FILE")]
    pub journal_file: Option<PathBuf>,
}

impl JournalArgs {
    /// Any journal flag given on the command line.
    pub fn given(&self) -> bool {
        self.journal || self.journal_dir.is_some() || self.journal_file.is_some()
    }

    /// The journal to read, if journal mode is on (flags, else `source.journal`).
    pub fn target(&self, configured: bool) -> Option<JournalTarget> {
        if let Some(f) = &self.journal_file {
            Some(JournalTarget::File(f.clone()))
        } else if let Some(d) = &self.journal_dir {
            Some(JournalTarget::Directory(d.clone()))
        } else if self.journal || configured {
            Some(JournalTarget::System)
        } else {
            None
        }
    }
}

/// Everything a (re)loaded configuration decides.
struct Effective {
    settings: Settings,
    patterns: Arc<PatternSet>,
    exclude: Vec<ipnet::IpNet>,
    journal: Option<JournalTarget>,
}

impl Effective {
    fn load(args: &RunArgs) -> Result<Effective, Failure> {
        let (_, settings) = load_settings(&args.cfg, |f| {
            if !args.logs.is_empty() {
                f.source.logs = args.logs.iter().map(|p| p.display().to_string()).collect();
                if !args.journal.given() {
                    // --log alone means: these files only.
                    f.source.journal = crate::config::JournalMode::On(false);
                }
            } else if args.journal.given() {
                // Journal flags alone mean: the journal only.
                f.source.logs.clear();
            }
            if let Some(t) = &args.ttl {
                f.grant.ttl = t.clone();
            }
            if let Some(d) = &args.state_dir {
                f.state.dir = d.display().to_string();
            }
        })?;
        // A directory, FIFO or device named as a log would never give a line: refused at
        // start, as check-config refuses it (a missing file is waited for).
        for log in &settings.logs {
            if let Ok(meta) = std::fs::metadata(log) {
                if !meta.is_file() {
                    return Err(Failure::config(format!(
                        "source.logs: {} is not a regular file; name the log file itself",
                        log.display()
                    )));
                }
            }
        }
        let patterns = Arc::new(load_patterns(&settings, args.patterns.as_deref())?);
        let exclude = super::build::exclusions(&settings)?;
        let journal = args.journal.target(settings.journal);
        if settings.logs.is_empty()
            && journal.is_none()
            && !settings.push.enabled()
            && !settings.events.enabled()
            && !settings.drac.enabled()
        {
            return Err(Failure::config(
                "source.logs: no log file to follow, the journal is off (source.journal) and nothing is pushed ([push], [events], [drac])",
            ));
        }
        Ok(Effective {
            settings,
            patterns,
            exclude,
            journal,
        })
    }

    fn policy(&self) -> Policy {
        Policy::new(self.exclude.clone(), self.settings.ttl)
            .with_ipv6_prefix(self.settings.ipv6_prefix)
    }

    fn scanner(&self) -> Scanner {
        super::build::scanner(&self.settings, &self.patterns, Visit::Logins)
    }
}

/// One generation of sources: their handles and channel. A reload stops them (after the
/// engine committed what they sent) and starts new ones from the saved checkpoints; lines
/// read in between are read again, never lost.
struct Sources {
    handles: Vec<SourceHandle>,
    rx: tokio::sync::mpsc::Receiver<Batch>,
    /// Stopped by a reload that then failed (`stop_in_place`).
    stopped: bool,
}

impl Sources {
    fn start(
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
    fn stop_in_place(&mut self) -> Vec<Batch> {
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

    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// The pushed servers' settings. Under `--dry-run` beside a running daemon, no push or
/// events server: their sockets belong to that daemon, and binding them would take them
/// over. Under any `--dry-run`, no DRAC server: it would answer clients and take rpcbind's
/// registration from the DRAC server in place (rpc.dracd, beside which a dry run is meant
/// to run).
fn pushed_settings(settings: &crate::config::Settings, dry: Option<&DryRun>) -> PushedSettings {
    let mut s = PushedSettings {
        push: settings.push.clone(),
        events: settings.events.clone(),
        drac: settings.drac.clone(),
    };
    if dry.is_some() && s.drac.enabled() {
        tracing::warn!("[drac]: --dry-run does not serve DRAC clients (it would take rpcbind's registration from the DRAC server in place); their adds are not reported");
        s.drac = Default::default();
    }
    if !dry.is_some_and(|d| d.daemon_running) {
        return s;
    }
    if s.push.enabled() {
        tracing::warn!("[push]: a dovegate daemon holds the map; --dry-run leaves its push sockets alone and reports logged logins only");
    }
    if s.events.enabled() {
        tracing::warn!("[events]: a dovegate daemon holds the map; --dry-run leaves its events listener alone and reports logged logins only");
    }
    s.push = Default::default();
    s.events = Default::default();
    s
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

pub fn run(args: RunArgs) -> Result<(), Failure> {
    // Signal handlers first: a SIGTERM during start-up must still mean a clean stop.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))?;
    let mut signals = runtime
        .block_on(async { Signals::install() })
        .map_err(|e| Failure::runtime(format!("cannot install signal handlers: {e}")))?;
    let mut cfg = Effective::load(&args)?;
    let settings = cfg.settings.clone();
    let dry = args.dry_run.then(|| DryRun::new(&settings));
    let _instance;
    let (map, checkpoints): (DaemonStore, _) = match &dry {
        Some(d) => (
            Box::new(DryStore::new(
                d.details.clone(),
                Box::new(std::io::stdout()),
            )),
            CheckpointDir::read_only(&settings.state_dir),
        ),
        None => {
            std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
                Failure::runtime(format!(
                    "{}: cannot create state directory: {e}",
                    settings.state_dir.display()
                ))
            })?;
            // One daemon per map and state directory, before anything touches either.
            _instance = crate::store::instance::InstanceLock::acquire(
                &settings.map_path,
                &settings.state_dir,
            )
            .map_err(|e| Failure::runtime(e.0))?;
            // A damaged map is moved aside here, never opened for writing (issue 20).
            crate::store::damage::check_at_start(
                &crate::store::lmdb::file_path(&settings.map_path),
                &settings.action,
                settings.ipv6_prefix,
                timefmt::now(),
            )
            .map_err(|e| Failure::runtime(e.0))?;
            let map = LmdbMap::open_keyed(
                &settings.map_path,
                &settings.action,
                OpenMode::Create,
                settings.ipv6_prefix,
            )
            .map_err(|e| Failure::runtime(e.0))?;
            (
                Box::new(open_writer_store(&settings, map)?),
                CheckpointDir::new(&settings.state_dir),
            )
        }
    };
    let mut engine = Engine::new(map, cfg.policy(), checkpoints.clone(), timefmt::now())
        .map_err(|e| Failure::runtime(e.0))?;
    engine.set_session_hold(
        hold_secs(&cfg.settings),
        &session_sources(&cfg),
        timefmt::now(),
    );
    engine.set_session_evidence(session_probe(&cfg.settings), recheck_secs(&cfg.settings));
    let stats = Arc::new(StatsRegistry::default());
    if dry.is_some()
        && (settings.socketmap.is_some() || settings.metrics.is_some() || settings.policy.is_some())
    {
        tracing::info!("--dry-run: the socketmap, policy and metrics servers are not started");
    }
    let counters = Arc::new(Mutex::new(engine.counters.clone()));
    // Kept whatever [policy] says now: a blocked user stays blocked until `dovegate
    // unblock`, and a reload may turn block_on_cap on. The auth-policy endpoint refuses
    // its logins from the same set.
    let blocks = match &dry {
        Some(_) => None,
        None => Some(
            crate::blocks::Blocks::new(Some(&settings.state_dir))
                .map_err(|e| Failure::runtime(format!("policy.block_on_cap: {e}")))?,
        ),
    };
    let mut shared_policy = None;
    let mut servers = match &blocks {
        None => None,
        Some(blocks) => {
            engine.set_blocks(blocks.clone());
            let policy = crate::policy::Context::new(
                engine.view(),
                engine.logins(),
                Some(&settings.state_dir),
                Some(blocks.clone()),
            );
            shared_policy = start_shared_policy(&runtime, &settings, &policy, blocks)?;
            let src = Arc::new(MetricsSource {
                stats: Arc::clone(&stats),
                engine: Arc::clone(&counters),
                view: engine.view(),
                checkpoints: checkpoints.clone(),
                state_dir: settings.state_dir.clone(),
                policy: Arc::clone(&policy.stats),
            });
            Some(
                runtime
                    .block_on(Servers::start(serve_settings(&settings), src, policy))
                    .map_err(|e| Failure::runtime(e.to_string()))?,
            )
        }
    };
    let (deaths, mut died) = tokio::sync::mpsc::unbounded_channel::<crate::source::SourceDeath>();
    let mut death: Option<crate::source::SourceDeath> = None;
    // The pushed servers before the log sources: a socket another daemon serves fails
    // the start before any source thread runs.
    let mut pushed = Pushed::start(
        &runtime,
        &pushed_settings(&cfg.settings, dry.as_ref()),
        &stats,
        blocks.as_ref(),
    )?;
    let mut sources = Sources::start(
        &cfg,
        &checkpoints,
        &stats,
        &deaths,
        dry.as_ref(),
        &mut pushed,
    )?;
    tracing::info!(
        map = %settings.map_path.display(),
        grants = engine.active(),
        logs = %paths(&settings.logs),
        journal = %cfg.journal.as_ref().map_or_else(|| "off".to_string(), JournalTarget::key),
        ttl = %humantime::format_duration(settings.ttl),
        "dovegate started"
    );
    // Journal mode with Dovecot writing its own file would grant nothing, silently.
    if let Some(w) = cfg
        .journal
        .as_ref()
        .and_then(|_| super::check::journal_misses_dovecot_log(&cfg.settings.logs))
    {
        tracing::warn!("{w}");
    }
    crate::notify::ready(&status_line(&engine, &stats));
    let mut heartbeat = {
        let stats = Arc::clone(&stats);
        let counters = Arc::clone(&counters);
        move |e: &Engine<DaemonStore>| {
            crate::notify::status(&status_line(e, &stats));
            crate::notify::watchdog();
            if let Ok(mut c) = counters.lock() {
                *c = e.counters.clone();
            }
        }
    };
    let result = loop {
        // A source that dies stops the daemon like SIGTERM (committing what was read),
        // but the exit status says so.
        let control = async {
            tokio::select! {
                exit = signals.next() => exit,
                why = died.recv() => {
                    death = why;
                    Exit::Shutdown
                }
            }
        };
        let exit = runtime.block_on(engine::run(
            &mut engine,
            &mut sources.rx,
            cfg.settings.commit_interval,
            control,
            &mut heartbeat,
        ));
        match exit {
            Ok(Exit::Reload) => {
                crate::notify::reloading();
                match Effective::load(&args) {
                    Ok(mut new) => {
                        if new.settings.map_path != settings.map_path
                            || new.settings.state_dir != settings.state_dir
                        {
                            tracing::warn!(
                                "map.path and state.dir changes take effect at the next restart"
                            );
                            new.settings.map_path = settings.map_path.clone();
                            new.settings.state_dir = settings.state_dir.clone();
                        }
                        if new.settings.store.url_file != settings.store.url_file
                            || new.settings.store.schema != settings.store.schema
                        {
                            tracing::warn!("[store] changes take effect at the next restart");
                        }
                        let wanted = pushed_settings(&new.settings, dry.as_ref());
                        let started = pushed.reload(&wanted).and_then(|()| {
                            for b in sources.stop_in_place() {
                                engine.accept(b, timefmt::now());
                            }
                            Sources::start(
                                &new,
                                &checkpoints,
                                &stats,
                                &deaths,
                                dry.as_ref(),
                                &mut pushed,
                            )
                        });
                        match started {
                            Ok(started) => {
                                sources = started;
                                if let Some(servers) = &mut servers {
                                    runtime.block_on(servers.reload(serve_settings(&new.settings)));
                                }
                                engine.set_policy(new.policy());
                                engine.set_session_hold(
                                    hold_secs(&new.settings),
                                    &session_sources(&new),
                                    timefmt::now(),
                                );
                                engine.set_session_evidence(
                                    session_probe(&new.settings),
                                    recheck_secs(&new.settings),
                                );
                                cfg = new;
                                tracing::info!(logs = %paths(&cfg.settings.logs), ttl = %humantime::format_duration(cfg.settings.ttl), "configuration reloaded");
                            }
                            Err(f) => {
                                // A push socket another process serves, say: the pushed
                                // servers go back to the running configuration (a no-op
                                // when they did not move), the sources come back as they
                                // were (or never stopped), and only then is the refusal
                                // said (whoever acts on it finds them serving).
                                let running = pushed_settings(&cfg.settings, dry.as_ref());
                                if let Err(e) = pushed.reload(&running) {
                                    tracing::error!("{}", e.message);
                                }
                                if sources.is_stopped() {
                                    match Sources::start(
                                        &cfg,
                                        &checkpoints,
                                        &stats,
                                        &deaths,
                                        dry.as_ref(),
                                        &mut pushed,
                                    ) {
                                        Ok(s) => sources = s,
                                        // Out through the shutdown below: what is pending
                                        // is committed first.
                                        Err(f2) => break Err(f2),
                                    }
                                }
                                tracing::error!(
                                    "reload refused, the running configuration stays: {}",
                                    f.message
                                );
                            }
                        }
                    }
                    Err(f) => tracing::error!(
                        "reload refused, the running configuration stays: {}",
                        f.message
                    ),
                }
                crate::notify::ready(&status_line(&engine, &stats));
            }
            Ok(Exit::Shutdown) => break Ok(()),
            Ok(Exit::SourcesGone) => {
                // A dying source closes its channel just before it says why: wait for that.
                let why = runtime.block_on(async {
                    let wait = std::time::Duration::from_secs(2);
                    tokio::time::timeout(wait, died.recv()).await.ok().flatten()
                });
                break Err(Failure::runtime(why.map(|d| d.to_string()).unwrap_or_else(
                    || "every source stopped; dovegate exits so that systemd restarts it".into(),
                )));
            }
            Err(e) => break Err(Failure::runtime(e.0)),
        }
    };
    crate::notify::stopping();
    // The pushed servers stop first; what they answered OK is forwarded, taken and
    // committed before the end.
    let relay = pushed.close();
    runtime.block_on(async {
        let bound = tokio::time::sleep(std::time::Duration::from_secs(2));
        tokio::pin!(relay, bound);
        loop {
            tokio::select! {
                Some(b) = sources.rx.recv() => engine.accept(b, timefmt::now()),
                _ = &mut relay => break,
                () = &mut bound => break,
            }
        }
    });
    for b in sources.stop_in_place() {
        engine.accept(b, timefmt::now());
    }
    if engine.has_pending() {
        if let Err(e) = engine.flush(timefmt::now()) {
            tracing::error!(error = %e, "map commit at shutdown failed; the logins read since the last checkpoint are read again at the next start");
        }
    }
    if let Some(task) = shared_policy {
        task.abort();
    }
    // Last: the socketmap answers until the end.
    if let Some(servers) = servers {
        runtime.block_on(servers.shutdown());
    }
    log_summary(&cfg.settings, &engine, &stats);
    match death {
        Some(why) => Err(Failure::runtime(why.to_string())),
        None => result,
    }
}

/// What `--dry-run` needs: the login details the dry store prints, and whether a daemon
/// already runs on the configured map (whose push sockets it must not take).
struct DryRun {
    details: Details,
    daemon_running: bool,
}

impl DryRun {
    fn new(settings: &Settings) -> DryRun {
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
    fn relay(
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

/// The daemon's store: the writer's (the map, and the database when configured), or the
/// printing one of `--dry-run`.
type DaemonStore = Box<dyn CommitStore + Send>;

/// Blocked users and cap counts shared with the other hosts through PostgreSQL or MariaDB
/// (`policy::shared`), whether or not this host runs the policy server; None without a
/// database.
fn start_shared_policy(
    runtime: &tokio::runtime::Runtime,
    settings: &Settings,
    policy: &crate::policy::Context,
    blocks: &crate::blocks::Blocks,
) -> Result<Option<tokio::task::JoinHandle<()>>, Failure> {
    use crate::policy::shared::{spawn, SharedPolicy};
    use crate::store::shared::Origin;
    let host = Origin::this_host("dovecot").host;
    let _guard = runtime.enter();
    if let Some(url_file) = &settings.store.mysql_url_file {
        use crate::store::mysql;
        let target = mysql::Target::load(url_file).map_err(|e| Failure::config(e.to_string()))?;
        policy.caps.share();
        return Ok(Some(spawn(SharedPolicy {
            db: mysql::shared_policy::MyPolicy::new(target),
            host,
            blocks: blocks.clone(),
            logins: policy.logins.clone(),
            caps: Arc::clone(&policy.caps),
        })));
    }
    let Some(url_file) = &settings.store.url_file else {
        return Ok(None);
    };
    use crate::store::postgres::{shared_policy::PgPolicy, Target};
    let target = Target::load(url_file, &settings.store.schema)
        .map_err(|e| Failure::config(e.to_string()))?;
    policy.caps.share();
    Ok(Some(spawn(SharedPolicy {
        db: PgPolicy::new(target),
        host,
        blocks: blocks.clone(),
        logins: policy.logins.clone(),
        caps: Arc::clone(&policy.caps),
    })))
}

/// The local map, plus PostgreSQL when `[store] postgres_url_file` is set, or MariaDB when
/// `[store] mysql_url_file` is (a bad URL file
/// stops start-up; an unreachable database does not: commits spill until it returns).
fn open_writer_store(settings: &Settings, map: LmdbMap) -> Result<WriterStore, Failure> {
    if let Some(url_file) = &settings.store.mysql_url_file {
        use crate::store::mysql;
        let target = mysql::Target::load(url_file).map_err(|e| Failure::config(e.to_string()))?;
        tracing::info!(database = %target.describe(), "sharing grants through MariaDB/MySQL");
        let popbsmtp = settings.store.popbsmtp.clone().map(mysql::Popbsmtp::new);
        return shared_store(
            settings,
            map,
            mysql::worker::MyWriterDb::new(target, popbsmtp),
        );
    }
    let Some(url_file) = &settings.store.url_file else {
        return Ok(WriterStore::local(map));
    };
    let target = crate::store::postgres::Target::load(url_file, &settings.store.schema)
        .map_err(|e| Failure::config(e.to_string()))?;
    tracing::info!(database = %target.describe(), "sharing grants through PostgreSQL");
    shared_store(
        settings,
        map,
        crate::store::postgres::worker::PgWriterDb::new(target),
    )
}

/// The map and the writer worker for `db`, whatever the database.
fn shared_store<D: crate::store::writer::WriterDb>(
    settings: &Settings,
    map: LmdbMap,
    db: D,
) -> Result<WriterStore, Failure> {
    use crate::store::writer::{Writer, WriterSpec};
    let writer = Writer::start(WriterSpec {
        db,
        origin: crate::store::shared::Origin::this_host("dovecot"),
        max_ttl: i64::try_from(settings.ttl.as_secs()).unwrap_or(i64::MAX / 4),
        state_dir: settings.state_dir.clone(),
        spill_max: settings.store.spill_max_grants,
        instance: map.path().display().to_string(),
    })
    .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(WriterStore::shared(map, Box::new(writer)))
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

/// SIGTERM, SIGINT and SIGHUP, registered before anything else starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
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

/// The servers `[serve]` and `[policy]` ask to run.
fn serve_settings(settings: &Settings) -> ServeSettings {
    ServeSettings {
        socketmap: settings.socketmap.clone(),
        metrics: settings.metrics.map(Listen::Inet),
        policy: settings.policy.clone(),
    }
}

/// The names of the sources whose logins open sessions (a saved session of any other
/// source is dropped at start: it can no longer be ended by its source).
fn session_sources(cfg: &Effective) -> Vec<String> {
    let mut v: Vec<String> = cfg
        .settings
        .logs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    v.extend(cfg.journal.iter().map(|t| t.key()));
    if cfg.settings.events.enabled() {
        v.push(crate::events::ORIGIN.to_string());
    }
    v
}

/// What shows an open session on this host: its imap process, then `doveadm who`.
fn session_probe(settings: &Settings) -> Box<dyn crate::session::Probe> {
    Box::new(crate::session::evidence::HostProbe::new(
        &settings.session_who,
        settings.session_recheck,
    ))
}

fn recheck_secs(settings: &Settings) -> i64 {
    i64::try_from(settings.session_recheck.as_secs()).unwrap_or(60)
}

/// `grant.session_hold` in seconds (0: sessions off).
fn hold_secs(settings: &Settings) -> i64 {
    i64::try_from(settings.session_hold.as_secs()).unwrap_or(i64::MAX / 4)
}
