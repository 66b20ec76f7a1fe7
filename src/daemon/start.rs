//! The daemon's start-up: the configuration, the store (the writer's map and database, or
//! `--dry-run`'s printing one), the engine, the servers, the pushed servers and the first
//! generation of sources.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::dry::DryRun;
use super::effective::{
    hold_secs, recheck_secs, serve_settings, session_probe, session_sources, Effective,
};
use super::pushed::{pushed_settings, Pushed};
use super::shutdown::Shutdown;
use super::sources::Sources;
use super::{paths, status_line, Daemon, DaemonStore, Options};
use crate::config::Settings;
use crate::engine::Engine;
use crate::serve::metrics::MetricsSource;
use crate::serve::servers::Servers;
use crate::setup::Failure;
use crate::source::journal::JournalTarget;
use crate::state::CheckpointDir;
use crate::store::dry::DryStore;
use crate::store::fleet::WriterStore;
use crate::store::{LmdbMap, OpenMode};
use crate::telemetry::StatsRegistry;
use crate::timefmt;

impl Daemon {
    /// Starts everything `args` and the configuration ask for, in order: what fails first
    /// stops the start before anything after it runs.
    pub(super) fn start(
        args: Options,
        runtime: tokio::runtime::Runtime,
        mut shutdown: Shutdown,
        reload: Arc<Notify>,
    ) -> Result<Daemon, Failure> {
        let cfg = Effective::load(&args)?;
        let settings = cfg.settings.clone();
        let dry = args.dry_run.then(|| DryRun::new(&settings));
        let mut _instance = None;
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
                _instance = Some(
                    crate::store::instance::InstanceLock::acquire(
                        &settings.map_path,
                        &settings.state_dir,
                    )
                    .map_err(|e| Failure::runtime(e.0))?,
                );
                // A damaged map is moved aside here, never opened for writing (issue 20).
                crate::store::damage::check_at_start(
                    &crate::store::lmdb::file_path(&settings.map_path),
                    &settings.action,
                    settings.ipv6_prefix,
                    timefmt::now(),
                )
                .map_err(|e| Failure::runtime(e.0))?;
                let map = LmdbMap::open_configured(&settings, OpenMode::Create)
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
            && (settings.socketmap.is_some()
                || settings.metrics.is_some()
                || settings.policy.is_some())
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
        let servers = match &blocks {
            None => None,
            Some(blocks) => {
                engine.set_blocks(blocks.clone());
                let policy = crate::policy::Context::new(
                    engine.view(),
                    engine.logins(),
                    Some(&settings.state_dir),
                    Some(blocks.clone()),
                );
                let stop = shutdown.answering().child_token();
                if let Some(task) = start_shared_policy(&runtime, &settings, &policy, blocks, stop)?
                {
                    shutdown.track("the shared policy exchange", task);
                }
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
                        .block_on(Servers::start(
                            serve_settings(&settings),
                            src,
                            policy,
                            shutdown.answering(),
                        ))
                        .map_err(Failure::from)?,
                )
            }
        };
        let (deaths, died) = tokio::sync::mpsc::unbounded_channel::<crate::source::SourceDeath>();
        // The pushed servers before the log sources: a socket another daemon serves fails
        // the start before any source thread runs.
        let mut pushed = Pushed::start(
            &runtime,
            &pushed_settings(&cfg.settings, dry.as_ref()),
            &stats,
            blocks.as_ref(),
            shutdown.pushed(),
        )?;
        let sources = Sources::start(
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
            .and_then(|_| crate::setup::dovecot::journal_misses_dovecot_log(&cfg.settings.logs))
        {
            tracing::warn!("{w}");
        }
        crate::notify::ready(&status_line(&engine, &stats));
        Ok(Daemon {
            sources,
            pushed,
            death: None,
            died,
            deaths,
            servers,
            _blocks: blocks,
            counters,
            stats,
            engine,
            checkpoints,
            _instance,
            dry,
            started: settings,
            cfg,
            args,
            reload,
            shutdown,
            runtime,
        })
    }
}

/// Blocked users and cap counts shared with the other hosts through PostgreSQL or MariaDB
/// (`policy::shared`), whether or not this host runs the policy server; None without a
/// database.
pub(super) fn start_shared_policy(
    runtime: &tokio::runtime::Runtime,
    settings: &Settings,
    policy: &crate::policy::Context,
    blocks: &crate::blocks::Blocks,
    stop: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, Failure> {
    use crate::policy::shared::{spawn, SharedPolicy};
    use crate::store::shared::Origin;
    let host = Origin::this_host("dovecot").host;
    let _guard = runtime.enter();
    if let Some(url_file) = &settings.store.mysql_url_file {
        use crate::store::mysql;
        let target = mysql::Target::load(url_file).map_err(|e| Failure::config(e.to_string()))?;
        policy.caps.share();
        return Ok(Some(spawn(
            SharedPolicy {
                db: mysql::shared_policy::MyPolicy::new(target),
                host,
                blocks: blocks.clone(),
                logins: policy.logins.clone(),
                caps: Arc::clone(&policy.caps),
            },
            stop,
        )));
    }
    let Some(url_file) = &settings.store.url_file else {
        return Ok(None);
    };
    use crate::store::postgres::{shared_policy::PgPolicy, Target};
    let target = Target::load(url_file, &settings.store.schema)
        .map_err(|e| Failure::config(e.to_string()))?;
    policy.caps.share();
    Ok(Some(spawn(
        SharedPolicy {
            db: PgPolicy::new(target),
            host,
            blocks: blocks.clone(),
            logins: policy.logins.clone(),
            caps: Arc::clone(&policy.caps),
        },
        stop,
    )))
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
