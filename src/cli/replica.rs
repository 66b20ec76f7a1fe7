//! `dovegate replica`: wires the configuration, the local map and the database
//! (PostgreSQL or MariaDB) to `crate::replica` and runs until SIGTERM/SIGINT.

use std::path::PathBuf;

use super::{load_settings, ConfigArgs, Failure};
use crate::grant::Policy;
use crate::net::Listen;
use crate::replica::ReplicaSpec;
use crate::store::postgres::Target;
use crate::store::{LmdbMap, OpenMode};

#[derive(Debug, clap::Args)]
pub struct ReplicaArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// File holding the database URL (overrides store.postgres_url_file, or
    /// store.mysql_url_file when it holds a mysql:// URL).
    #[arg(long, value_name = "FILE")]
    url_file: Option<PathBuf>,
    /// Where the status file (replica.json) is kept (overrides state.dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics: inet:127.0.0.1:PORT or
    /// unix:/path (the replica's own; serve.metrics is the daemon's, which a host running
    /// both already uses).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    metrics: Option<Listen>,
}

fn parse_listen(text: &str) -> Result<Listen, String> {
    Listen::parse(text).map_err(|e| e.to_string())
}

pub fn run(args: ReplicaArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |f| {
        if let Some(u) = &args.url_file {
            if crate::store::mysql::is_mysql_url_file(u) {
                f.store.mysql_url_file = u.display().to_string();
                f.store.postgres_url_file.clear();
            } else {
                f.store.postgres_url_file = u.display().to_string();
                f.store.mysql_url_file.clear();
            }
        }
        if let Some(d) = &args.state_dir {
            f.state.dir = d.display().to_string();
        }
    })?;
    let mysql = match &settings.store.mysql_url_file {
        Some(f) => {
            Some(crate::store::mysql::Target::load(f).map_err(|e| Failure::config(e.to_string()))?)
        }
        None => None,
    };
    let target = match (&settings.store.url_file, &mysql) {
        (_, Some(_)) => None,
        (Some(url_file), None) => Some(
            Target::load(url_file, &settings.store.schema)
                .map_err(|e| Failure::config(e.to_string()))?,
        ),
        (None, None) => return Err(Failure::config(
            "store.postgres_url_file: a replica needs the database: set it (or store.mysql_url_file) or pass --url-file",
        )),
    };
    let runtime = super::admin::runtime()?;
    let (mut term, mut int) = runtime
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(|e| Failure::runtime(format!("cannot install signal handlers: {e}")))?;
    std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
        Failure::runtime(format!(
            "{}: cannot create state directory: {e}",
            settings.state_dir.display()
        ))
    })?;
    // One writer per map: a `dovegate run` (or a second replica) on this map would fight
    // this one's resyncs.
    let _lock = crate::store::instance::InstanceLock::acquire_map(&settings.map_path)
        .map_err(|e| Failure::runtime(e.0))?;
    let map =
        LmdbMap::open_configured(&settings, OpenMode::Create).map_err(|e| Failure::runtime(e.0))?;
    let policy =
        Policy::new(settings.exclude.clone(), settings.ttl).with_ipv6_prefix(settings.ipv6_prefix);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down");
    };
    let state_dir = settings.state_dir.clone();
    let result = runtime.block_on(async move {
        let metrics = match &args.metrics {
            Some(listen) => Some(
                crate::serve::metrics::start_replica(listen, state_dir)
                    .await
                    .map_err(|e| {
                        Failure::runtime(format!("--metrics {listen}: cannot listen: {e}"))
                    })?,
            ),
            None => None,
        };
        if let Some(m) = &metrics {
            tracing::info!(listen = %m.listen(), "replica metrics served at /metrics");
        }
        let result = match (target, mysql) {
            (_, Some(target)) => {
                let db = crate::store::mysql::replica::MyReplica::new(target);
                follow(db, map, policy, &settings, shutdown).await
            }
            (Some(target), None) => {
                let db = crate::store::postgres::replica::PgReplica::new(target);
                follow(db, map, policy, &settings, shutdown).await
            }
            (None, None) => unreachable!("checked above"),
        };
        if let Some(m) = metrics {
            m.shutdown().await;
        }
        result
    });
    crate::notify::stopping();
    result
}

/// Follows `db` into `map` until `shutdown`: the one replica loop, whatever the database.
async fn follow<D: crate::store::follow::ReplicaDb>(
    db: D,
    map: LmdbMap,
    policy: Policy,
    settings: &crate::config::Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Failure>
where
    crate::replica::ReplicaError: From<D::Error>,
{
    let spec = ReplicaSpec {
        db,
        map,
        policy,
        state_dir: settings.state_dir.clone(),
        commit_interval: settings.commit_interval,
    };
    crate::replica::run(spec, shutdown)
        .await
        .map_err(|e| Failure::runtime(e.to_string()))
}
