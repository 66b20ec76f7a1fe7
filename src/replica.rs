//! `dovegate replica`: copies the grants in the shared database (PostgreSQL or MariaDB)
//! into this host's LMDB map, so Postfix on an MTA host keeps reading `lmdb:` locally and
//! never waits on the network.
//!
//! One loop for both databases (`run`), over `store::follow::ReplicaDb` (PostgreSQL:
//! `store::postgres::replica`, MariaDB: `store::mysql::replica`): connect with a backoff,
//! a snapshot of every unexpired grant, then the changes since the snapshot's position as
//! the database signals them (PostgreSQL: LISTEN/NOTIFY; MariaDB: a bounded poll of its
//! change sequence); a full resync after every (re)connect and every `RESYNC_EVERY`. A
//! change signal carries nothing (anyone may send one): the replica reads the addresses
//! whose grant or revocation changed since its last read, then their rows, at most once
//! per read gap however many signals came. A map replaced or deleted under the replica is
//! noticed within a beat and refilled from a snapshot at once. Grants expire locally by a
//! timer on the next deadline. The database is the only source of expiries: a replica never
//! extends a grant on its own; a row grants no longer than its own `updated_at` + ttl (so a
//! far-future row is not re-extended at every resync), and every expiry is capped at this
//! host's now + ttl too (a writer with a clock fault must not open a relay for a year).
//! While the database is unreachable the map keeps serving what it has until each grant's
//! own expiry, and a warning says so, repeatedly.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::grant::{Ledger, Policy};
use crate::store::follow::{Read, ReplicaDb};
use crate::store::mysql::MyError;
use crate::store::postgres::PgError;
use crate::store::shared::{self, parse_address, Reread};
use crate::store::writer::{read_json, write_json};
use crate::store::{AdminStore, Cause, CommitStore, LmdbMap, StoreError};
use crate::telemetry::ratelimit::RateLimit;
use crate::timefmt;

/// A full resync this often even when nothing seems wrong.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// The stale warning is repeated this often while the database is unreachable.
const WARN_EVERY: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest a snapshot or a read of changes may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a liveness check or a report may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A clock further off the database's than this is reported at every resync.
const MAX_SKEW_SECS: f64 = 5.0;
/// More changed addresses than this since the last read: a full resync instead.
const MAX_CHANGES: usize = 50_000;
/// How often the status file is rewritten (and the watchdog fed), connected or not.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the map file is checked (replaced, deleted, truncated under us).
const MAP_CHECK_EVERY: Duration = Duration::from_secs(2);
/// The database is asked for a round trip (and this replica reported) every this many
/// beats.
const PING_BEATS: u64 = 5;

/// Why the replica could not do something: the map, or the database (its cause kept).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Map(#[from] StoreError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    My(#[from] MyError),
    /// A read that did not finish within its bound (a hung database).
    #[error("{what}: no answer within {secs}s; the database hangs or is overloaded")]
    Timeout { what: &'static str, secs: u64 },
}

impl ReplicaError {
    /// The map was replaced (or deleted, truncated) and reopened empty: refill it now.
    fn map_reopened(&self) -> bool {
        matches!(self, ReplicaError::Map(e) if e.cause() == Cause::Reopened)
    }

    /// The database's schema is newer than this dovegate (an upgrade, not an outage).
    pub fn newer_schema(&self) -> Option<shared::NewerSchema> {
        match self {
            ReplicaError::Pg(e) => e.newer_schema(),
            ReplicaError::My(e) => e.newer_schema(),
            _ => None,
        }
    }
}

/// What the replica needs.
pub struct ReplicaSpec<D> {
    pub db: D,
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
    pub newer_schema: Option<shared::NewerSchema>,
    /// The replica's process (`status` tells it from a daemon that took the map since).
    #[serde(default)]
    pub pid: Option<u32>,
}

impl ReplicaStatus {
    pub const FILE: &'static str = "replica.json";

    /// The status a replica left in `state_dir`, if any (`updated` tells its age).
    pub fn load(state_dir: &std::path::Path) -> Option<ReplicaStatus> {
        read_json(&state_dir.join(Self::FILE))
    }
}

/// The map side of a replica, whatever the database: what the map holds, expiry deadlines, snapshot and change
/// application, status.
pub(crate) struct Replica {
    pub(crate) map: LmdbMap,
    policy: Policy,
    /// What the map holds (with an expiry), with deadlines: the grant core's record, as
    /// the engine keeps it on a writer.
    pub(crate) local: Ledger,
    pub(crate) status: ReplicaStatus,
    status_file: PathBuf,
    /// Says a stale replica at most every `WARN_EVERY`.
    stale_limit: RateLimit<Instant>,
}

impl Replica {
    /// A replica of `database` (its description, for logs and status) into `map`.
    pub(crate) fn open(
        mut map: LmdbMap,
        policy: Policy,
        state_dir: &std::path::Path,
        database: String,
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
            stale_limit: RateLimit::new(WARN_EVERY),
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
            match self.policy.admit_row(addr, *e, now) {
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
                if row.source == shared::ADMIN_SOURCE {
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

    /// Writes the live grants this replica knows into a map replaced under it while the
    /// database cannot be read (the resync that would refill it has to wait for the
    /// database; Postfix must not lose them meanwhile).
    pub(crate) fn refill(&mut self) {
        let live = self.local.live(timefmt::now());
        match self.map.upsert(&live) {
            Ok(_) => tracing::warn!(
                grants = live.len(),
                "the map was replaced while the database is unreachable; wrote the {} live grants this replica knows again",
                live.len()
            ),
            Err(e) => tracing::error!(error = %e, "cannot write the live grants into the replaced map; retrying at the next expiry"),
        }
    }

    /// Looks whether the map was replaced (deleted, truncated) while the database cannot be
    /// read, and refills it then.
    pub(crate) fn refill_if_replaced(&mut self) {
        match self.map.changed() {
            Err(e) if e.cause() == Cause::Reopened => self.refill(),
            Err(e) => tracing::debug!(error = %e, "cannot look at the map"),
            Ok(_) => {}
        }
    }

    pub(crate) fn connected(&mut self) {
        if let Some(since) = self.status.disconnected_since.take() {
            tracing::info!(database = %self.status.database, down_since = %timefmt::rfc3339(since), "database reachable again; the map is current");
        }
        self.status.connected = true;
        self.status.last_error = None;
        self.status.newer_schema = None;
        self.stale_limit.take_pending();
    }

    pub(crate) fn down(&mut self, why: String) {
        self.status.connected = false;
        self.status.disconnected_since.get_or_insert(timefmt::now());
        self.status.last_error = Some(why);
        self.warn_stale();
    }

    fn warn_stale(&mut self) {
        if self.status.connected || self.stale_limit.hit_at(Instant::now()).is_none() {
            return;
        }
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
    Lost(Lost),
}

/// The connection given up: what was being done, and the error.
struct Lost {
    during: &'static str,
    error: ReplicaError,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.during.is_empty() {
            write!(f, "{}", self.error)
        } else {
            write!(f, "{}: {}", self.during, self.error)
        }
    }
}

fn lost(during: &'static str, error: impl Into<ReplicaError>) -> Ended {
    Ended::Lost(Lost {
        during,
        error: error.into(),
    })
}

/// Runs `fut` with `bound`, its error or the timeout as a `ReplicaError`.
async fn bounded<T, E: Into<ReplicaError>>(
    what: &'static str,
    bound: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ReplicaError> {
    match tokio::time::timeout(bound, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ReplicaError::Timeout {
            what,
            secs: bound.as_secs(),
        }),
    }
}

/// `bounded`, with grants due meanwhile still expiring: a slow or hung database read must
/// not keep a grant in the map past its expiry.
async fn bounded_expiring<T, E: Into<ReplicaError>>(
    r: &mut Replica,
    what: &'static str,
    bound: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ReplicaError> {
    tokio::pin!(fut);
    let limit = tokio::time::sleep(bound);
    tokio::pin!(limit);
    loop {
        let expiry = tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
        tokio::select! {
            out = &mut fut => return out.map_err(Into::into),
            () = &mut limit => {
                return Err(ReplicaError::Timeout {
                    what,
                    secs: bound.as_secs(),
                })
            }
            () = expiry => {
                if !expire(r) {
                    r.refill();
                }
            }
        }
    }
}

/// The map side with the database side and the position in its changes.
struct Follower<D: ReplicaDb> {
    r: Replica,
    db: D,
    /// Where the next read of changes starts (None: resync first).
    since: Option<D::Since>,
}

impl<D: ReplicaDb> Follower<D>
where
    ReplicaError: From<D::Error>,
{
    /// Makes the map equal the database: adds and shortens to the database's expiries,
    /// removes what vanished (revoked, expired, deleted by hand).
    async fn resync(&mut self, c: &mut D::Conn) -> Result<(), ReplicaError> {
        let ttl = self.r.policy.ttl_secs();
        let snap = bounded_expiring(
            &mut self.r,
            "snapshot",
            SNAPSHOT_TIMEOUT,
            self.db.snapshot(c, ttl),
        )
        .await?;
        self.r.apply_snapshot(&snap.rows, snap.db_now)?;
        self.since = Some(snap.since);
        Ok(())
    }

    /// Reads what changed since the last read and applies it. Too many changes: a full
    /// resync. A map that cannot take them keeps the position (read again next time).
    async fn refresh(&mut self, c: &mut D::Conn) -> Result<(), ReplicaError> {
        let Some(since) = self.since.clone() else {
            return self.resync(c).await;
        };
        let ttl = self.r.policy.ttl_secs();
        self.r.status.change_reads += 1;
        let read = bounded_expiring(
            &mut self.r,
            "reading changes",
            SNAPSHOT_TIMEOUT,
            self.db.changes(c, &since, ttl, MAX_CHANGES + 1),
        )
        .await?;
        let (addresses, rows, next) = match read {
            Read::Nothing => return Ok(()),
            Read::TooMany(n) => {
                tracing::info!(changed = n, "many changes at once; resyncing");
                return self.resync(c).await;
            }
            Read::Unsequenced { expected, found } => {
                tracing::info!(
                    expected,
                    found,
                    "rows changed in the database without a change sequence value (a DELETE or TRUNCATE by hand?); resyncing"
                );
                return self.resync(c).await;
            }
            Read::Changes {
                addresses,
                rows,
                next,
            } => (addresses, rows, next),
        };
        let asked: Vec<IpAddr> = addresses.iter().filter_map(|a| parse_address(a)).collect();
        match self.r.apply(&asked, rows) {
            Ok(()) => {}
            Err(e) if e.map_reopened() => {
                tracing::warn!(error = %e, "the map was replaced; writing every grant again");
                self.r.forget();
                return self.resync(c).await;
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

    /// Reports this replica (bounded; status only).
    async fn report(&mut self, c: &mut D::Conn) {
        let r = shared::Report {
            role: "replica",
            instance: self.r.status.map.clone(),
            spill_queue: None,
            spill_dropped: None,
            lag_secs: self.r.status.lag_secs,
            grants: Some(i64::try_from(self.r.local.len()).unwrap_or(i64::MAX)),
        };
        let sent = tokio::time::timeout(PING_TIMEOUT, self.db.report(c, &r));
        if sent.await.is_err() {
            tracing::debug!("reporting this replica to the database timed out");
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run<D: ReplicaDb>(
    spec: ReplicaSpec<D>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaError>
where
    ReplicaError: From<D::Error>,
{
    let ReplicaSpec {
        db,
        map,
        policy,
        state_dir,
        commit_interval,
    } = spec;
    let r = Replica::open(map, policy, &state_dir, db.describe())?;
    let gap = db.read_gap(commit_interval);
    let mut f = Follower { r, db, since: None };
    tracing::info!(database = %f.r.status.database, map = %f.r.status.map, grants = f.r.local.len(), "dovegate replica started");
    crate::notify::ready(&format!("{} grants", f.r.local.len()));
    f.r.write_status();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        // A connect to a hung database takes its timeouts: meanwhile grants still expire
        // on time and the status file (and the watchdog) still says this replica serves.
        let connected = {
            let attempt = f.db.connect();
            tokio::pin!(attempt);
            let mut beat = tokio::time::interval(STATUS_EVERY);
            loop {
                let expiry = tokio::time::sleep(
                    f.r.next_deadline().map_or(Duration::from_secs(3600), until),
                );
                tokio::select! {
                    () = &mut shutdown => break None,
                    c = &mut attempt => break Some(c),
                    () = expiry => {
                        if !expire(&mut f.r) {
                            f.r.refill();
                        }
                    }
                    _ = beat.tick() => f.r.write_status(),
                }
            }
        };
        let Some(connected) = connected else { break };
        let ended = match connected {
            Ok(mut conn) => {
                let ended = match f.resync(&mut conn).await {
                    Ok(()) => {
                        f.r.connected();
                        backoff = Duration::from_secs(1);
                        f.report(&mut conn).await;
                        f.r.write_status();
                        follow(&mut f, &mut conn, gap, &mut shutdown).await
                    }
                    Err(e) => lost("snapshot failed", e),
                };
                f.db.close(conn).await;
                ended
            }
            Err(e) => lost("", e),
        };
        match ended {
            Ended::Shutdown => break,
            Ended::Lost(why) => {
                f.r.status.newer_schema = why.error.newer_schema();
                f.r.down(why.to_string());
                f.r.write_status();
            }
        }
        // Keep expiring, warning and saying that the map is served while waiting to
        // reconnect (a status file left unwritten reads as a replica stopped or stuck).
        let retry = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let mut beat = tokio::time::interval(STATUS_EVERY);
        loop {
            let expiry =
                tokio::time::sleep(f.r.next_deadline().map_or(Duration::from_secs(3600), until));
            tokio::select! {
                () = &mut shutdown => { f.r.write_status(); return Ok(()); }
                () = tokio::time::sleep_until(retry) => break,
                () = expiry => {
                    if !expire(&mut f.r) {
                        f.r.refill();
                    }
                }
                _ = beat.tick() => {
                    f.r.refill_if_replaced();
                    f.r.warn_stale();
                    f.r.write_status();
                }
            }
        }
    }
    f.r.write_status();
    tracing::info!(grants = f.r.local.len(), "dovegate replica stopped");
    Ok(())
}

/// Expires what is due; false when the map was replaced (the caller refills it).
fn expire(r: &mut Replica) -> bool {
    match r.expire_due(timefmt::now()) {
        Ok(()) => true,
        Err(e) if e.map_reopened() => false,
        Err(e) => {
            tracing::error!(error = %e, "expiry failed; will retry");
            true
        }
    }
}

/// The connected loop: change signals, expiry, periodic resync, map checks, liveness,
/// status.
async fn follow<D: ReplicaDb>(
    f: &mut Follower<D>,
    conn: &mut D::Conn,
    gap: Duration,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Ended
where
    ReplicaError: From<D::Error>,
{
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    let mut beat = tokio::time::interval(STATUS_EVERY);
    let mut map_check = tokio::time::interval(MAP_CHECK_EVERY);
    let mut last_read = Instant::now() - gap;
    let mut beats = 0u64;
    loop {
        let expiry =
            tokio::time::sleep(f.r.next_deadline().map_or(Duration::from_secs(3600), until));
        let mut refill = false;
        tokio::select! {
            () = &mut *shutdown => return Ended::Shutdown,
            n = f.db.next_change(conn) => match n {
                Ok(()) => {
                    // At most one read per gap, whatever the rate of signals.
                    tokio::time::sleep_until(last_read + gap).await;
                    if let Some(e) = f.db.closed(conn) {
                        return lost("", e);
                    }
                    last_read = Instant::now();
                    if let Err(e) = f.refresh(conn).await {
                        return lost("cannot read the changes", e);
                    }
                }
                // The reconnect resyncs.
                Err(e) => return lost("", e),
            },
            _ = resync.tick() => {
                if let Err(e) = f.resync(conn).await {
                    return lost("resync failed", e);
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
            _ = beat.tick() => {
                if let Some(e) = f.db.closed(conn) {
                    return lost("", e);
                }
                beats += 1;
                if beats % PING_BEATS == 0 {
                    if let Err(e) = bounded("a liveness check", PING_TIMEOUT, f.db.ping(conn)).await {
                        return lost("", e);
                    }
                    f.report(conn).await;
                }
                f.r.write_status();
            }
        }
        if refill {
            // Reopened empty: the local mirror is wrong too; the resync rewrites it all.
            f.r.forget();
            if let Err(e) = f.resync(conn).await {
                return lost("resync failed", e);
            }
        }
    }
}
