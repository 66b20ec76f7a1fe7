//! `dovegate replica`: copies the grants in PostgreSQL into this host's LMDB map, so
//! Postfix on an MTA host keeps reading `lmdb:` locally and never waits on the network.
//!
//! LISTEN first, then a snapshot of every unexpired grant, then the changes as the
//! triggers announce them; a full resync after every (re)connect and every `RESYNC_EVERY`.
//! A notification carries nothing (any role that can connect may LISTEN or NOTIFY): it
//! only says that something changed, and the replica reads the addresses whose grant or
//! revocation changed since its last read (by transaction id, see `postgres::horizon`),
//! then their rows, at most once per commit interval however many notifications came. A
//! map replaced or deleted under the replica is noticed within a beat and refilled from a
//! snapshot at once. Grants expire locally by a timer on the next
//! deadline. The database is the only source of expiries: a replica never extends a grant
//! on its own; a row grants no longer than its own `updated_at` + ttl (so a far-future row
//! is not re-extended at every resync), and every expiry is capped at this host's now +
//! ttl too (a writer with a clock fault must not open a relay for a year). While the database is unreachable the map keeps serving what it has until each
//! grant's own expiry, and a warning says so, repeatedly.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::grant::{Ledger, Policy};
use crate::store::postgres::worker::write_json;
use crate::store::postgres::{
    self, parse_address, Notice, PgError, Reread, Tables, Target, CHANNEL,
};
use crate::store::{Cause, GrantStore, LmdbMap, StoreError};
use crate::timefmt;

/// A full resync this often even when nothing seems wrong.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// The stale warning is repeated this often while the database is unreachable.
const WARN_EVERY: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A clock further off the database's than this is reported at every resync.
const MAX_SKEW_SECS: f64 = 5.0;
/// Addresses re-read per statement.
const REREAD_CHUNK: usize = 5000;
/// More changed addresses than this since the last read: a full resync instead.
const MAX_CHANGES: i64 = 50_000;
/// How often the status file is rewritten (and the watchdog fed), connected or not.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the map file is checked (replaced, deleted, truncated under us).
const MAP_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Why the replica could not do something: the map, or the database.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Map(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] PgError),
}

impl ReplicaError {
    /// The map was replaced (or deleted, truncated) and reopened empty: refill it now.
    fn map_reopened(&self) -> bool {
        matches!(self, ReplicaError::Map(e) if e.cause() == Cause::Reopened)
    }

    fn db(what: &str, e: tokio_postgres::Error) -> ReplicaError {
        ReplicaError::Db(PgError::db(what, e))
    }

    fn timeout(what: &str) -> ReplicaError {
        ReplicaError::Db(PgError::Timeout {
            what: what.to_string(),
            secs: SNAPSHOT_TIMEOUT.as_secs(),
        })
    }
}

/// What the replica needs.
pub struct ReplicaSpec {
    pub target: Target,
    pub map: LmdbMap,
    pub policy: Policy,
    pub state_dir: PathBuf,
    pub commit_interval: Duration,
}

/// What the replica reports in `STATE/replica.json` (for `dovegate status` and metrics).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    pub database: String,
    pub map: String,
    pub connected: bool,
    /// Unix seconds since when the database is unreachable (the map may be stale).
    pub disconnected_since: Option<i64>,
    pub last_error: Option<String>,
    /// Unix seconds of the last full snapshot, and how many grants it held.
    pub last_snapshot: Option<i64>,
    pub last_snapshot_grants: usize,
    pub snapshots: u64,
    /// Unix seconds when the last change notification was applied.
    pub last_change: Option<i64>,
    /// Seconds from the database commit of the last change to the local map commit.
    pub lag_secs: Option<f64>,
    pub changes_applied: u64,
    /// Reads of the changes since the last one (at most one per commit interval, however
    /// many notifications arrive).
    #[serde(default)]
    pub change_reads: u64,
    /// Grants in the local map written by this replica.
    pub grants: usize,
    pub updated: i64,
    /// Set while the database refuses this dovegate for its newer schema (not an outage).
    #[serde(default)]
    pub newer_schema: Option<postgres::NewerSchema>,
    /// The replica's process (`status` tells it from a daemon that took the map since).
    #[serde(default)]
    pub pid: Option<u32>,
}

impl ReplicaStatus {
    pub const FILE: &'static str = "replica.json";

    /// The status a replica left in `state_dir`, if any (`updated` tells its age).
    pub fn load(state_dir: &std::path::Path) -> Option<ReplicaStatus> {
        crate::store::postgres::worker::read_json(&state_dir.join(Self::FILE))
    }
}

/// The map side of a replica, whatever the database (PostgreSQL here, MariaDB in
/// `store::mysql::replica`): what the map holds, expiry deadlines, snapshot and change
/// application, status.
pub(crate) struct Replica {
    pub(crate) map: LmdbMap,
    policy: Policy,
    /// What the map holds (with an expiry), with deadlines: the grant core's record, as
    /// the engine keeps it on a writer.
    pub(crate) local: Ledger,
    pub(crate) status: ReplicaStatus,
    status_file: PathBuf,
    warned_at: Option<Instant>,
    /// Where the next read of changes starts (a `postgres::horizon`).
    since: Option<postgres::Horizon>,
    /// This host's name and the database schema, for `report`.
    host: String,
    schema: String,
}

impl Replica {
    fn new(spec: ReplicaSpec) -> Result<Replica, ReplicaError> {
        Replica::open(
            spec.map,
            spec.policy,
            &spec.state_dir,
            spec.target.describe(),
            spec.target.schema().to_string(),
        )
    }

    /// A replica of `database` (its description, for logs and status) into `map`;
    /// `schema`: the PostgreSQL schema it reports itself in (`dovegate status --fleet`).
    pub(crate) fn open(
        mut map: LmdbMap,
        policy: Policy,
        state_dir: &std::path::Path,
        database: String,
        schema: String,
    ) -> Result<Replica, ReplicaError> {
        let now = timefmt::now();
        map.expire_all(now)?;
        let mut r = Replica {
            status: ReplicaStatus {
                database,
                map: map.path().display().to_string(),
                pid: Some(std::process::id()),
                ..ReplicaStatus::default()
            },
            map,
            policy,
            local: Ledger::default(),
            status_file: state_dir.join(ReplicaStatus::FILE),
            warned_at: None,
            since: None,
            host: postgres::Origin::this_host("").host,
            schema,
        };
        r.reload_local()?;
        Ok(r)
    }

    /// Re-reads the map (it is the truth after a crash or an administrator's edit).
    pub(crate) fn reload_local(&mut self) -> Result<(), ReplicaError> {
        let held = self.map.list()?;
        self.local.replace(
            held.into_iter()
                .filter_map(|g| Some((g.ip, g.expires?)))
                .collect(),
        );
        Ok(())
    }

    /// Forgets what the map held (it was reopened empty); the next resync rewrites it all.
    pub(crate) fn forget(&mut self) {
        self.local = Ledger::default();
    }

    fn note(&mut self, ip: IpAddr, expires: Option<i64>) {
        match expires {
            Some(e) => self.local.commit([(ip, e)]),
            None => {
                self.local.remove(ip);
            }
        }
    }

    /// The expiry a database row may have here: capped at now + ttl; None when it must not
    /// be granted at all (expired, or an address dovegate never grants).
    fn admit(&self, ip: IpAddr, expires: i64, now: i64) -> Option<i64> {
        self.policy.admit(ip, expires, now)
    }

    /// Makes the map equal the database: adds and shortens to the database's expiries,
    /// removes what vanished (revoked, expired).
    async fn resync(&mut self, client: &Client, t: &Tables) -> Result<(), ReplicaError> {
        // Taken before the snapshot: every change it does not show is at or after it.
        let read = async {
            let since = postgres::horizon(client).await?;
            let (rows, db_now) =
                postgres::snapshot(client, &t.grants, self.policy.ttl_secs()).await?;
            Ok::<_, tokio_postgres::Error>((since, rows, db_now))
        };
        let (since, rows, db_now) = tokio::time::timeout(SNAPSHOT_TIMEOUT, read)
            .await
            .map_err(|_| ReplicaError::timeout("snapshot"))?
            .map_err(|e| ReplicaError::db("snapshot", e))?;
        self.apply_snapshot(&rows, db_now)?;
        self.since = Some(since);
        Ok(())
    }

    /// Makes the map equal a snapshot's rows (address, effective expiry), read when the
    /// database's clock said `db_now`.
    pub(crate) fn apply_snapshot(
        &mut self,
        rows: &[(String, i64)],
        db_now: f64,
    ) -> Result<(), ReplicaError> {
        let now = timefmt::now();
        // Expiries are compared with this host's clock: a skewed clock shortens or stretches
        // every grant here (stretching is capped at now + ttl).
        let skew = now as f64 - db_now;
        if skew.abs() > MAX_SKEW_SECS {
            tracing::warn!(skew_secs = skew.round(), "this host's clock differs from the database's; grants expire early or late here: run NTP");
        }
        let mut fresh: HashMap<IpAddr, i64> = HashMap::with_capacity(rows.len());
        let mut refused = 0usize;
        for (addr, e) in rows {
            match row_grant(&self.policy, addr, *e, now) {
                Some((ip, e)) => {
                    fresh.insert(ip, e);
                }
                None => refused += 1,
            }
        }
        if refused > 0 {
            tracing::warn!(rows = refused, "database rows that are not grantable addresses (or already expired here) were skipped");
        }
        // A map replaced under us: reopened empty; this snapshot fills it.
        match self.map.changed() {
            Err(e) if e.cause() == Cause::Reopened => {
                tracing::warn!(error = %e, "the map was replaced; writing every grant again");
            }
            other => {
                other?;
            }
        }
        self.reload_local()?;
        let mut grow = Vec::new();
        let mut shorten = Vec::new();
        for (&ip, &e) in &fresh {
            match self.local.get(ip) {
                Some(l) if l == e => {}
                Some(l) if l > e => shorten.push((ip, e)),
                _ => grow.push((ip, e)),
            }
        }
        let vanished: Vec<IpAddr> = self
            .local
            .addresses()
            .into_iter()
            .filter(|ip| !fresh.contains_key(ip))
            .collect();
        if !grow.is_empty() {
            for (ip, e) in self.map.upsert(&grow)? {
                self.note(ip, Some(e));
            }
        }
        for (ip, e) in shorten {
            self.map.set(ip, e)?;
            self.note(ip, Some(e));
        }
        for ip in &vanished {
            self.map.revoke(*ip)?;
            self.note(*ip, None);
        }
        self.status.last_snapshot = Some(now);
        self.status.last_snapshot_grants = fresh.len();
        self.status.snapshots += 1;
        tracing::info!(
            grants = fresh.len(),
            removed = vanished.len(),
            "snapshot applied"
        );
        Ok(())
    }

    /// Reads what changed since the last read (addresses whose grant or revocation
    /// changed, then their rows) and applies it. Too many changes: a full resync.
    async fn refresh(&mut self, client: &Client, t: &Tables) -> Result<(), ReplicaError> {
        let Some(since) = self.since.clone() else {
            return self.resync(client, t).await;
        };
        let read = async {
            let next = postgres::horizon(client).await?;
            let changed = postgres::changes_since(client, t, &since, MAX_CHANGES + 1).await?;
            Ok::<_, tokio_postgres::Error>((next, changed))
        };
        self.status.change_reads += 1;
        let (next, changed) = tokio::time::timeout(SNAPSHOT_TIMEOUT, read)
            .await
            .map_err(|_| ReplicaError::timeout("reading changes"))?
            .map_err(|e| ReplicaError::db("reading changes", e))?;
        if changed.len() as i64 > MAX_CHANGES {
            tracing::info!(changed = changed.len(), "many changes at once; resyncing");
            return self.resync(client, t).await;
        }
        let asked: Vec<IpAddr> = changed.iter().filter_map(|a| parse_address(a)).collect();
        let mut rows = Vec::new();
        for chunk in asked.chunks(REREAD_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|&ip| crate::grant::key_text(ip)).collect();
            let got = tokio::time::timeout(
                SNAPSHOT_TIMEOUT,
                postgres::reread(client, &t.grants, &names, self.policy.ttl_secs()),
            )
            .await
            .map_err(|_| ReplicaError::timeout("reading the changed rows"))?
            .map_err(|e| ReplicaError::db("reading the changed rows", e))?;
            rows.extend(got);
        }
        match self.apply(&asked, rows) {
            Ok(()) => {}
            Err(e) if e.map_reopened() => {
                tracing::warn!(error = %e, "the map was replaced; writing every grant again");
                return self.resync(client, t).await;
            }
            Err(e) => {
                // `since` stays: the next read applies these changes again.
                tracing::error!(error = %e, "cannot apply changes to the map; retrying at the next change or resync");
                return Ok(());
            }
        }
        self.since = Some(next);
        Ok(())
    }

    /// Applies the rows read back for `asked` (an address without a row is revoked here).
    pub(crate) fn apply(
        &mut self,
        asked: &[IpAddr],
        rows: Vec<Reread>,
    ) -> Result<(), ReplicaError> {
        let now = timefmt::now();
        let now_f = timefmt::now_f64();
        let mut last: HashMap<IpAddr, Option<i64>> = asked.iter().map(|&ip| (ip, None)).collect();
        let order = asked.to_vec();
        let mut updated_at: HashMap<IpAddr, f64> = HashMap::new();
        // Grants written by hand (`dovegate grant`), with the host that wrote them.
        let mut by_hand: HashMap<IpAddr, String> = HashMap::new();
        for row in rows {
            let Some(ip) = parse_address(&row.address) else {
                continue;
            };
            if let Some(v) = last.get_mut(&ip) {
                *v = Some(row.expires);
                updated_at.insert(ip, row.updated);
                if row.source == postgres::ADMIN_SOURCE {
                    by_hand.insert(ip, row.host);
                }
            }
        }
        let mut audit = Audit::default();
        // Lag only from rows that changed something here: a notification naming an
        // unchanged row (anyone may send one) says nothing about propagation.
        let mut lag: Option<f64> = None;
        let mut changed = |ip: &IpAddr| {
            if let Some(u) = updated_at.get(ip) {
                lag = Some(lag.unwrap_or(0.0).max(now_f - u));
            }
        };
        let mut grow = Vec::new();
        for ip in order {
            let wanted = last[&ip].and_then(|e| self.admit(ip, e, now));
            match (wanted, self.local.get(ip)) {
                (None, Some(_)) => {
                    self.map.revoke(ip)?;
                    self.note(ip, None);
                    audit.removed(ip, last[&ip].is_none());
                }
                (None, None) => {}
                (Some(e), Some(l)) if l == e => {}
                (Some(e), Some(l)) if l > e => {
                    self.map.set(ip, e)?;
                    self.note(ip, Some(e));
                    changed(&ip);
                    audit.by_hand(ip, e, by_hand.get(&ip));
                }
                (Some(e), _) => {
                    grow.push((ip, e));
                    changed(&ip);
                    audit.by_hand(ip, e, by_hand.get(&ip));
                }
            }
        }
        if !grow.is_empty() {
            for (ip, e) in self.map.upsert(&grow)? {
                self.note(ip, Some(e));
            }
        }
        audit.done();
        self.status.changes_applied += last.len() as u64;
        self.status.last_change = Some(now);
        if lag.is_some() {
            self.status.lag_secs = lag.map(|l| l.max(0.0));
        }
        Ok(())
    }

    pub(crate) fn next_deadline(&self) -> Option<i64> {
        self.local.next_deadline()
    }

    pub(crate) fn expire_due(&mut self, now: i64) -> Result<(), ReplicaError> {
        let due = self.local.due(now);
        if due.is_empty() {
            return Ok(());
        }
        let out = self.map.expire(&due, now)?;
        for ip in &due {
            self.note(*ip, None);
        }
        // Extended meanwhile in the map (by a snapshot racing this, or another writer).
        for (ip, e) in out.extended {
            self.note(ip, Some(e));
        }
        Ok(())
    }

    pub(crate) fn connected(&mut self) {
        if let Some(since) = self.status.disconnected_since.take() {
            tracing::info!(database = %self.status.database, down_since = %timefmt::rfc3339(since), "database reachable again; the map is current");
        }
        self.status.connected = true;
        self.status.last_error = None;
        self.status.newer_schema = None;
        self.warned_at = None;
    }

    pub(crate) fn down(&mut self, why: String) {
        self.status.connected = false;
        self.status.disconnected_since.get_or_insert(timefmt::now());
        self.status.last_error = Some(why);
        self.warn_stale();
    }

    fn warn_stale(&mut self) {
        if self.status.connected || self.warned_at.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.warned_at = Some(Instant::now());
        if let Some(newer) = self.status.newer_schema {
            tracing::error!(
                database = %self.status.database,
                since = %self.status.disconnected_since.map(timefmt::rfc3339).unwrap_or_default(),
                grants = self.local.len(),
                "replica is STALE: {newer}; the map keeps the grants it has until each one's own expiry, new logins and revocations elsewhere are not seen"
            );
            return;
        }
        tracing::warn!(
            database = %self.status.database,
            error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
            since = %self.status.disconnected_since.map(timefmt::rfc3339).unwrap_or_default(),
            grants = self.local.len(),
            "replica is STALE: the database is unreachable; the map keeps the grants it has until each one's own expiry, new logins and revocations elsewhere are not seen; check the database and the URL file"
        );
    }

    /// Reports this replica to the database (`dovegate status --fleet`); status only, so a
    /// failure is logged at debug level and changes nothing.
    async fn report(&mut self, client: &Client) {
        let r = postgres::Report {
            role: "replica",
            instance: self.status.map.clone(),
            spill_queue: None,
            spill_dropped: None,
            lag_secs: self.status.lag_secs,
            grants: Some(i64::try_from(self.local.len()).unwrap_or(i64::MAX)),
        };
        let sent = tokio::time::timeout(
            postgres::CONNECT_TIMEOUT,
            postgres::report(client, &self.schema, &self.host, &r),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %postgres::error_text(&e), "cannot report this replica to the database")
            }
            Err(_) => tracing::debug!("reporting this replica to the database timed out"),
        }
    }

    pub(crate) fn write_status(&mut self) {
        self.status.grants = self.local.len();
        self.status.updated = timefmt::now();
        write_json(&self.status_file, &self.status);
        crate::notify::status(&format!(
            "{} grants, {}",
            self.local.len(),
            if self.status.connected {
                "current"
            } else if self.status.newer_schema.is_some() {
                "STALE (the database's schema is newer: upgrade dovegate)"
            } else {
                "STALE (database unreachable)"
            }
        ));
        crate::notify::watchdog();
    }
}

/// The audit trail of one read of changes: grants written by hand (`dovegate grant`) with
/// the host that wrote them, and grants removed; at most `Audit::LINES` lines, then a
/// count. Grants from logins are logged on the writer's host (its `grant` lines).
#[derive(Default)]
struct Audit {
    lines: usize,
    more: usize,
}

impl Audit {
    const LINES: usize = 100;

    fn room(&mut self) -> bool {
        if self.lines < Audit::LINES {
            self.lines += 1;
            true
        } else {
            self.more += 1;
            false
        }
    }

    fn by_hand(&mut self, ip: IpAddr, until: i64, host: Option<&String>) {
        if let Some(host) = host {
            if self.room() {
                tracing::info!(address = %ip, until = %timefmt::rfc3339(until), host = %host.escape_debug(), "grant written by hand on host {} (dovegate grant)", host.escape_debug());
            }
        }
    }

    /// `gone`: the row is gone (revoked, deleted); else it no longer grants here.
    fn removed(&mut self, ip: IpAddr, gone: bool) {
        if self.room() {
            let why = if gone {
                "revoked in the database (dovegate revoke on some host, or a DELETE)"
            } else {
                "it no longer grants here (its expiry passed, or grant.exclude here excludes it)"
            };
            tracing::info!(address = %ip, "grant removed: {why}");
        }
    }

    fn done(&self) {
        if self.more > 0 {
            tracing::info!(
                more = self.more,
                "more grants written by hand or removed in this read"
            );
        }
    }
}

/// The grant a database row (address text, expiry) makes here, if any
/// (`Policy::admit_row`).
pub fn row_grant(policy: &Policy, address: &str, expires: i64, now: i64) -> Option<(IpAddr, i64)> {
    policy.admit_row(address, expires, now)
}

/// Seconds until unix time `at`.
pub(crate) fn until(at: i64) -> Duration {
    let now = chrono::Utc::now().timestamp_micros();
    Duration::from_micros(
        u64::try_from(at.saturating_mul(1_000_000).saturating_sub(now)).unwrap_or(0),
    )
}

/// Why the connected loop ended.
enum Ended {
    Shutdown,
    Lost(String),
}

/// Runs until `shutdown` resolves.
pub async fn run(
    spec: ReplicaSpec,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaError> {
    let target = spec.target.clone();
    let tables = target.tables();
    let commit_interval = spec.commit_interval;
    let mut r = Replica::new(spec)?;
    tracing::info!(database = %r.status.database, map = %r.status.map, grants = r.local.len(), "dovegate replica started");
    crate::notify::ready(&format!("{} grants", r.local.len()));
    r.write_status();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        // One waiting notification stands for any number (see `postgres::drive`).
        let (tx, mut rx) = mpsc::channel(1);
        let attempt = async {
            let client = target.connect(Some(tx)).await?;
            tokio::time::timeout(
                postgres::CONNECT_TIMEOUT,
                client.batch_execute(&format!("LISTEN {CHANNEL}")),
            )
            .await
            .map_err(|_| PgError::Timeout {
                what: "LISTEN".into(),
                secs: postgres::CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|e| PgError::db("LISTEN", e))?;
            Ok::<Client, PgError>(client)
        };
        tokio::pin!(attempt);
        // A connect to a hung database takes its timeouts: meanwhile grants still expire
        // on time and the status file (and the watchdog) still says this replica serves.
        let mut beat = tokio::time::interval(STATUS_EVERY);
        let connected = loop {
            let expiry =
                tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
            tokio::select! {
                () = &mut shutdown => break None,
                c = &mut attempt => break Some(c),
                () = expiry => { expire(&mut r); }
                _ = beat.tick() => r.write_status(),
            }
        };
        let Some(connected) = connected else { break };
        let ended = match connected {
            Ok(client) => match r.resync(&client, &tables).await {
                Ok(()) => {
                    r.connected();
                    backoff = Duration::from_secs(1);
                    r.report(&client).await;
                    r.write_status();
                    follow(
                        &mut r,
                        &client,
                        &tables,
                        &mut rx,
                        commit_interval,
                        &mut shutdown,
                    )
                    .await
                }
                Err(e) => Ended::Lost(format!("snapshot failed: {e}")),
            },
            Err(e) => {
                r.status.newer_schema = e.newer_schema();
                Ended::Lost(e.to_string())
            }
        };
        match ended {
            Ended::Shutdown => break,
            Ended::Lost(why) => {
                r.down(why);
                r.write_status();
            }
        }
        // Keep expiring, warning and saying that the map is served while waiting to
        // reconnect (a status file left unwritten reads as a replica stopped or stuck).
        let retry = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let mut beat = tokio::time::interval(STATUS_EVERY);
        loop {
            let expiry =
                tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
            tokio::select! {
                () = &mut shutdown => { r.write_status(); return Ok(()); }
                () = tokio::time::sleep_until(retry) => break,
                () = expiry => { expire(&mut r); }
                _ = beat.tick() => {
                    r.warn_stale();
                    r.write_status();
                }
            }
        }
    }
    r.write_status();
    tracing::info!(grants = r.local.len(), "dovegate replica stopped");
    Ok(())
}

/// Expires what is due; false when the map was replaced (the caller refills it).
pub(crate) fn expire(r: &mut Replica) -> bool {
    match r.expire_due(timefmt::now()) {
        Ok(()) => true,
        Err(e) if e.map_reopened() => false,
        Err(e) => {
            tracing::error!(error = %e, "expiry failed; will retry");
            true
        }
    }
}

/// The connected loop: notifications, expiry, periodic resync, map checks, status.
async fn follow(
    r: &mut Replica,
    client: &Client,
    t: &Tables,
    rx: &mut mpsc::Receiver<Notice>,
    commit_interval: Duration,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Ended {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    let mut beat = tokio::time::interval(STATUS_EVERY);
    let mut map_check = tokio::time::interval(MAP_CHECK_EVERY);
    let mut last_read = Instant::now() - commit_interval;
    let mut beats = 0u64;
    loop {
        let expiry = tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
        let mut refill = false;
        tokio::select! {
            () = &mut *shutdown => return Ended::Shutdown,
            n = rx.recv() => match n {
                Some(Notice::Changed) => {
                    // At most one read per commit_interval, whatever the rate (a flood of
                    // notifications from anyone costs one read per interval).
                    tokio::time::sleep_until(last_read + commit_interval).await;
                    if let Ok(Notice::Closed(why)) = rx.try_recv() {
                        return Ended::Lost(format!("connection lost: {why}"));
                    }
                    last_read = Instant::now();
                    if let Err(e) = r.refresh(client, t).await {
                        return Ended::Lost(format!("cannot read the changes: {e}"));
                    }
                }
                // The reconnect resyncs.
                Some(Notice::Closed(why)) => return Ended::Lost(format!("connection lost: {why}")),
                None => return Ended::Lost("connection lost".into()),
            },
            _ = resync.tick() => {
                if let Err(e) = r.resync(client, t).await {
                    return Ended::Lost(format!("resync failed: {e}"));
                }
            }
            () = expiry => refill = !expire(r),
            _ = map_check.tick() => {
                match r.map.changed() {
                    Err(e) if e.cause() == Cause::Reopened => {
                        tracing::warn!(error = %e, "the map was replaced; writing every grant again");
                        refill = true;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot check the map"),
                    Ok(_) => {}
                }
            }
            _ = beat.tick() => {
                if client.is_closed() {
                    return Ended::Lost("connection closed".into());
                }
                beats += 1;
                // A database that hangs without closing the connection sends nothing
                // either: ask it now and then, and report this replica meanwhile.
                if beats % 5 == 0 {
                    match tokio::time::timeout(postgres::CONNECT_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(postgres::error_text(&e)),
                        Err(_) => return Ended::Lost("the database does not answer".into()),
                    }
                    r.report(client).await;
                }
                r.write_status();
            }
        }
        if refill {
            // Reopened empty: the local mirror is wrong too; the resync rewrites it all.
            r.forget();
            if let Err(e) = r.resync(client, t).await {
                return Ended::Lost(format!("resync failed: {e}"));
            }
        }
    }
}
