//! `dovegate status` where it is about the fleet: on a host whose map a replica keeps (an
//! MTA host), the replica's own status (its map, the database, lag, last sync) instead of
//! a Dovecot host's sources and sessions; and `status --fleet`.

use std::path::Path;

use serde::Serialize;

use super::Failure;
use crate::config::Settings;
use crate::replica::ReplicaStatus;
use crate::store::postgres::{self, SeenHost, Target};
use crate::store::shared::NewerSchema;
use crate::store::{instance, AdminStore, OpenMode};
use crate::timefmt;

/// The replica rewrites its status file every 2 s while it runs, connected or not; a file
/// older than this from a replica that holds its map means it is stuck (a database read
/// that has not timed out yet, up to a minute).
const REPLICA_STALE_SECS: i64 = 30;

/// The replica as `status` shows it on its host.
#[derive(Serialize)]
struct ReplicaHost {
    /// Always `replica`: what this host's dovegate does.
    role: &'static str,
    map: super::status::MapStatus,
    replica: ReplicaOut,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct ReplicaOut {
    /// A `dovegate replica` holds the map (its single-instance lock); null: cannot tell.
    running: Option<bool>,
    pid: Option<u32>,
    database: String,
    /// `current`, `unreachable`, `newer-schema`, or `unknown` (not running).
    database_state: &'static str,
    connected: bool,
    disconnected_since: Option<String>,
    last_error: Option<String>,
    newer_schema: Option<NewerSchema>,
    last_snapshot: Option<String>,
    last_snapshot_grants: usize,
    last_change: Option<String>,
    lag_secs: Option<f64>,
    updated: String,
    /// Seconds since the replica last wrote its status.
    status_age_secs: i64,
}

/// The replica's status when this configuration's map is the one a replica keeps (its
/// `replica.json` names it), else None: `status` then describes a Dovecot host.
pub fn replica_host(settings: &Settings, json: bool) -> Option<Result<(), Failure>> {
    let r = ReplicaStatus::load(&settings.state_dir)?;
    let file = crate::store::lmdb::file_path(&settings.map_path);
    let ours = [file.as_path(), settings.map_path.as_path()]
        .iter()
        .any(|p| Path::new(&r.map) == *p);
    if !ours {
        return None;
    }
    let holder = instance::map_holder(&settings.map_path);
    // A daemon that took the map after the replica stopped: a Dovecot host again.
    if let (Ok(Some(Some(pid))), Some(own)) = (&holder, r.pid) {
        if *pid != own {
            return None;
        }
    }
    Some(show_replica(settings, r, holder, json))
}

fn show_replica(
    settings: &Settings,
    r: ReplicaStatus,
    holder: std::io::Result<Option<Option<u32>>>,
    json: bool,
) -> Result<(), Failure> {
    let mut warnings = Vec::new();
    let now = timefmt::now();
    let mut map = super::admin::open(settings, OpenMode::ReadOnly)?;
    let grants = map.list().map_err(super::admin::store_failure)?;
    let file = map.path().to_path_buf();
    let (running, pid) = match holder {
        Ok(Some(pid)) => (Some(true), pid),
        Ok(None) => (Some(false), None),
        Err(e) => {
            warnings.push(format!(
                "{}: cannot tell whether the replica holds the map: {e}",
                instance::map_lock_path(&settings.map_path).display()
            ));
            (None, None)
        }
    };
    let age = now - r.updated;
    match running {
        Some(false) => warnings.push(format!(
            "no dovegate replica holds {}: nothing updates it, and its grants do not expire (Postfix reads no expiry); start the replica",
            file.display()
        )),
        Some(true) if age > REPLICA_STALE_SECS => warnings.push(format!(
            "the replica runs but has not written its status for {age} s: stuck (a database read waiting for its timeout?)"
        )),
        _ => {}
    }
    let database_state = match (running, r.connected, r.newer_schema) {
        (Some(false), _, _) => "unknown",
        (_, true, _) => "current",
        (_, false, Some(_)) => "newer-schema",
        (_, false, None) => "unreachable",
    };
    let out = ReplicaHost {
        role: "replica",
        map: super::status::MapStatus::of(&file, &grants, now),
        replica: ReplicaOut {
            running,
            pid,
            database: r.database,
            database_state,
            connected: r.connected,
            disconnected_since: r.disconnected_since.map(timefmt::rfc3339),
            last_error: r.last_error,
            newer_schema: r.newer_schema,
            last_snapshot: r.last_snapshot.map(timefmt::rfc3339),
            last_snapshot_grants: r.last_snapshot_grants,
            last_change: r.last_change.map(timefmt::rfc3339),
            lag_secs: r.lag_secs,
            updated: timefmt::rfc3339(r.updated),
            status_age_secs: age,
        },
        warnings,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    print_replica(&out);
    for w in &out.warnings {
        eprintln!("dovegate: warning: {w}");
    }
    Ok(())
}

fn print_replica(h: &ReplicaHost) {
    h.map.print();
    let r = &h.replica;
    match (r.running, r.pid) {
        (Some(true), Some(pid)) => println!(
            "replica: running (pid {pid}), copies the grants of {} into this map",
            r.database
        ),
        (Some(true), None) => println!(
            "replica: the map's lock is held, but not by a running dovegate that named itself"
        ),
        (Some(false), _) => println!("replica: NOT RUNNING (none holds the map)"),
        (None, _) => println!("replica: unknown"),
    }
    let sync = format!(
        "last snapshot {} ({} grants), last change {}{}",
        r.last_snapshot.as_deref().unwrap_or("-"),
        r.last_snapshot_grants,
        r.last_change.as_deref().unwrap_or("-"),
        r.lag_secs
            .map_or(String::new(), |l| format!(", lag {l:.3} s"))
    );
    let since = r.disconnected_since.as_deref().unwrap_or("-");
    match r.database_state {
        "current" => println!("database: reachable, the map is current; {sync}"),
        "newer-schema" => println!(
            "database: NOT USED since {since}: {}; the map serves its grants until each one's expiry; {sync}",
            r.newer_schema.map(|n| n.to_string()).unwrap_or_default()
        ),
        "unreachable" => println!(
            "database: UNREACHABLE since {since} ({}); the map is STALE: it serves its grants until each one's expiry, new logins elsewhere are not seen; {sync}",
            r.last_error.as_deref().unwrap_or("not connected yet")
        ),
        _ => println!(
            "database: unknown (the replica's last status, {}: {}); {sync}",
            r.updated,
            if r.connected { "connected" } else { "not connected" }
        ),
    }
}

/// A host that has not reported for this long is shown as silent (they report every 10 s).
const SILENT_SECS: f64 = 60.0;
/// A clock further off the database's than this is flagged (as the writers warn).
const MAX_SKEW_SECS: f64 = 5.0;
/// How long `--fleet` waits for the database.
const FLEET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Serialize)]
struct Fleet {
    database: String,
    hosts: Vec<HostOut>,
}

#[derive(Serialize)]
struct HostOut {
    #[serde(flatten)]
    seen: SeenHost,
    /// No report for a minute: stopped, or cut off from the database.
    silent: bool,
}

/// `dovegate status --fleet`: every writer and replica as the database sees them.
pub fn fleet(settings: &Settings, json: bool) -> Result<(), Failure> {
    let Some(url_file) = &settings.store.url_file else {
        return Err(Failure::config(
            "status --fleet: store.postgres_url_file is not set (the fleet is what the shared database sees)",
        ));
    };
    let target = Target::load(url_file, &settings.store.schema)
        .map_err(|e| Failure::config(e.to_string()))?;
    let runtime = super::admin::runtime()?;
    let fail = |m: String| Failure::runtime(format!("{}: {m}", target.describe()));
    let hosts = runtime.block_on(async {
        let read = async {
            let client = target.connect(None).await.map_err(|e| e.to_string())?;
            postgres::fleet(&client, target.schema())
                .await
                .map_err(|e| postgres::error_text(&e))
        };
        tokio::time::timeout(FLEET_TIMEOUT, read)
            .await
            .map_err(|_| format!("no answer within {}s", FLEET_TIMEOUT.as_secs()))?
    });
    let hosts = hosts.map_err(fail)?;
    let out = Fleet {
        database: target.describe(),
        hosts: hosts
            .into_iter()
            .map(|seen| HostOut {
                silent: seen.seen_secs_ago > SILENT_SECS,
                seen,
            })
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    print_fleet(&out);
    Ok(())
}

fn print_fleet(f: &Fleet) {
    let count = |role: &str| f.hosts.iter().filter(|h| h.seen.role == role).count();
    println!(
        "fleet of {}: {} writer(s), {} replica(s), as the database saw them",
        f.database,
        count("writer"),
        count("replica")
    );
    if f.hosts.is_empty() {
        println!("  no writer or replica has reported yet (each does within 10 s of connecting)");
    }
    for h in &f.hosts {
        let s = &h.seen;
        let seen = if h.silent {
            format!(
                "SILENT for {:.0} s (last report {})",
                s.seen_secs_ago,
                timefmt::rfc3339(s.seen as i64)
            )
        } else {
            format!("seen {:.0} s ago", s.seen_secs_ago)
        };
        let mut parts = vec![seen];
        if let (Some(q), Some(d)) = (s.spill_queue, s.spill_dropped) {
            parts.push(if d > 0 {
                format!("spill queue {q}, {d} grants DROPPED (the database copy is behind)")
            } else {
                format!("spill queue {q}")
            });
        }
        if s.role == "replica" {
            parts.push(match s.lag_secs {
                Some(l) => format!("lag {l:.3} s"),
                None => "lag -".to_string(),
            });
        }
        if let Some(g) = s.grants {
            parts.push(format!("{g} grant(s)"));
        }
        if let Some(k) = s.clock_skew_secs {
            parts.push(if k.abs() > MAX_SKEW_SECS {
                format!("clock {k:+.1} s OFF the database's: run NTP")
            } else {
                format!("clock {k:+.1} s")
            });
        }
        println!(
            "{:<7} {} {}: {}",
            s.role,
            s.host.escape_debug(),
            s.instance.escape_debug(),
            parts.join("; ")
        );
    }
}
