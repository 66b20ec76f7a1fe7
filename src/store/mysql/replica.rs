//! `dovegate replica` following MariaDB: a consistent snapshot (with the change sequence
//! value it is current to), then every `POLL` the rows whose sequence is past the last one
//! read (an index range scan, empty and cheap when nothing changed), applied through the
//! same map side as the PostgreSQL replica (`crate::replica::Replica`: admission, caps at
//! now + ttl, expiry deadlines, status file). A full resync every `RESYNC_EVERY` and after
//! every reconnect catches what leaves no sequence value (a DELETE by hand); while the
//! database is unreachable the replica is STALE and keeps what it has until each grant's
//! own expiry.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use mysql_async::Conn;
use tokio::time::Instant;

use super::{MyError, Target, POLL};
use crate::grant::Policy;
use crate::replica::{expire, until, Replica, ReplicaError, RESYNC_EVERY};
use crate::store::postgres::parse_address;
use crate::store::{Cause, GrantStore, LmdbMap};

const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// More changed addresses than this since the last read: a full resync instead.
const MAX_CHANGES: usize = 50_000;
const MAP_CHECK_EVERY: Duration = Duration::from_secs(2);

pub struct MysqlReplicaSpec {
    pub target: Target,
    pub map: LmdbMap,
    pub policy: Policy,
    pub state_dir: PathBuf,
}

fn lost(what: &str, e: MyError) -> String {
    format!("{what}: {e}")
}

async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = Result<T, mysql_async::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(lost(what, MyError::db(what, e))),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            SNAPSHOT_TIMEOUT.as_secs()
        )),
    }
}

/// The replica's position in the change sequence.
struct Follower {
    r: Replica,
    since: i64,
    ttl: i64,
}

impl Follower {
    async fn resync(&mut self, conn: &mut Conn) -> Result<(), String> {
        let (rows, seq, db_now) = bounded("snapshot", super::snapshot(conn, self.ttl)).await?;
        self.r
            .apply_snapshot(&rows, db_now)
            .map_err(|e| format!("snapshot: {e}"))?;
        self.since = seq;
        Ok(())
    }

    async fn refresh(&mut self, conn: &mut Conn) -> Result<(), String> {
        let ch = bounded(
            "reading changes",
            super::changes_since(conn, self.since, self.ttl, MAX_CHANGES + 1),
        )
        .await?;
        self.r.status.change_reads += 1;
        if ch.seq == self.since {
            return Ok(());
        }
        if ch.addresses.len() > MAX_CHANGES || ch.rows.len() > MAX_CHANGES {
            tracing::info!(
                changed = ch.addresses.len(),
                "many changes at once; resyncing"
            );
            return self.resync(conn).await;
        }
        let asked: Vec<IpAddr> = ch
            .addresses
            .iter()
            .filter_map(|a| parse_address(a))
            .collect();
        let rows = ch
            .rows
            .into_iter()
            .map(
                |(address, expires, updated)| crate::store::postgres::Reread {
                    address,
                    expires,
                    updated,
                    host: String::new(),
                    source: String::new(),
                },
            )
            .collect();
        match self.r.apply(&asked, rows) {
            Ok(()) => {}
            Err(e) if is_reopened(&e) => {
                tracing::warn!(error = %e, "the map was replaced; writing every grant again");
                self.r.forget();
                return self.resync(conn).await;
            }
            Err(e) => {
                // `since` stays: the next poll applies these changes again.
                tracing::error!(error = %e, "cannot apply changes to the map; retrying at the next poll");
                return Ok(());
            }
        }
        self.since = ch.seq;
        Ok(())
    }
}

fn is_reopened(e: &ReplicaError) -> bool {
    matches!(e, ReplicaError::Map(m) if m.cause() == Cause::Reopened)
}

/// Runs until `shutdown` resolves.
pub async fn run(
    spec: MysqlReplicaSpec,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaError> {
    let target = spec.target.clone();
    let ttl = spec.policy.ttl_secs();
    // No schema to report in: `dovegate status --fleet` reads PostgreSQL only.
    let r = Replica::open(
        spec.map,
        spec.policy,
        &spec.state_dir,
        target.describe(),
        String::new(),
    )?;
    let mut f = Follower { r, since: 0, ttl };
    tracing::info!(database = %f.r.status.database, map = %f.r.status.map, grants = f.r.local.len(), "dovegate replica started");
    crate::notify::ready(&format!("{} grants", f.r.local.len()));
    f.r.write_status();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let connected = tokio::select! {
            () = &mut shutdown => break,
            c = target.connect() => c,
        };
        let why = match connected {
            Ok(mut conn) => match f.resync(&mut conn).await {
                Ok(()) => {
                    f.r.connected();
                    backoff = Duration::from_secs(1);
                    f.r.write_status();
                    let why = follow(&mut f, &mut conn, &mut shutdown).await;
                    // Not waited for long: the server may be gone.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
                    match why {
                        None => break,
                        Some(w) => w,
                    }
                }
                Err(e) => format!("snapshot failed: {e}"),
            },
            Err(e) => e.to_string(),
        };
        f.r.down(why);
        f.r.write_status();
        let retry = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        loop {
            let expiry =
                tokio::time::sleep(f.r.next_deadline().map_or(Duration::from_secs(3600), until));
            tokio::select! {
                () = &mut shutdown => { f.r.write_status(); return Ok(()); }
                () = tokio::time::sleep_until(retry) => break,
                () = expiry => { expire(&mut f.r); }
            }
        }
    }
    f.r.write_status();
    tracing::info!(grants = f.r.local.len(), "dovegate replica stopped");
    Ok(())
}

/// The connected loop: polls, expiry, periodic resync, map checks, status. None on
/// shutdown, else why the connection was given up.
async fn follow(
    f: &mut Follower,
    conn: &mut Conn,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<String> {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = tokio::time::interval(Duration::from_secs(2));
    let mut map_check = tokio::time::interval(MAP_CHECK_EVERY);
    loop {
        let expiry =
            tokio::time::sleep(f.r.next_deadline().map_or(Duration::from_secs(3600), until));
        let mut refill = false;
        tokio::select! {
            () = shutdown.as_mut() => return None,
            _ = poll.tick() => {
                if let Err(e) = f.refresh(conn).await {
                    return Some(format!("cannot read the changes: {e}"));
                }
            }
            _ = resync.tick() => {
                if let Err(e) = f.resync(conn).await {
                    return Some(format!("resync failed: {e}"));
                }
            }
            () = expiry => refill = !expire(&mut f.r),
            _ = map_check.tick() => {
                match f.r.map.changed() {
                    Err(e) if e.cause() == Cause::Reopened => {
                        tracing::warn!(error = %e, "the map was replaced; writing every grant again");
                        refill = true;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot check the map"),
                    Ok(_) => {}
                }
            }
            _ = beat.tick() => f.r.write_status(),
        }
        if refill {
            f.r.forget();
            if let Err(e) = f.resync(conn).await {
                return Some(format!("resync failed: {e}"));
            }
        }
    }
}
