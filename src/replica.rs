//! `dovegate replica`: copies the grants in PostgreSQL into this host's LMDB map, so
//! Postfix on an MTA host keeps reading `lmdb:` locally and never waits on the network.
//!
//! LISTEN first, then a snapshot of every unexpired grant, then the changes as the
//! trigger announces them; a full resync after every (re)connect, every `RESYNC_EVERY`, and
//! whenever a notification could not be read or was dropped (NOTIFY is best effort and
//! never replayed; at most once per `FORCED_RESYNC_GAP`: anyone may send junk). A
//! notification only names an address, whose row is then read (any role that can connect
//! may NOTIFY, so a payload grants nothing). Grants expire locally by a timer on the next
//! deadline. The database is the only source of expiries: a replica never extends a grant
//! on its own; a row grants no longer than its own `updated_at` + ttl (so a far-future row
//! is not re-extended at every resync), and every expiry is capped at this host's now +
//! ttl too (a writer with a clock fault must not open a relay for a year). While the database is unreachable the map keeps serving what it has until each
//! grant's own expiry, and a warning says so, repeatedly.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::grant::Policy;
use crate::store::postgres::worker::write_json;
use crate::store::postgres::{self, error_text, parse_address, Notice, Target, CHANNEL};
use crate::store::{GrantStore, LmdbMap, StoreError};
use crate::timefmt;

/// A full resync this often even when nothing seems wrong.
pub const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// The stale warning is repeated this often while the database is unreachable.
const WARN_EVERY: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A clock further off the database's than this is reported at every resync.
const MAX_SKEW_SECS: f64 = 5.0;
/// Notifications buffered between two map commits; more means a resync.
const NOTICE_QUEUE: usize = 65_536;
/// Resyncs forced by unreadable or dropped notifications are at least this far apart.
const FORCED_RESYNC_GAP: Duration = Duration::from_secs(15);
/// Addresses re-read per statement.
const REREAD_CHUNK: usize = 5000;

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
    /// Grants in the local map written by this replica.
    pub grants: usize,
    pub updated: i64,
}

impl ReplicaStatus {
    pub const FILE: &'static str = "replica.json";

    /// The status a replica left in `state_dir`, if any (`updated` tells its age).
    pub fn load(state_dir: &std::path::Path) -> Option<ReplicaStatus> {
        crate::store::postgres::worker::read_json(&state_dir.join(Self::FILE))
    }
}

struct Replica {
    map: LmdbMap,
    policy: Policy,
    /// What the map holds (with an expiry), mirrored for deadlines and diffs.
    local: HashMap<IpAddr, i64>,
    deadlines: BTreeSet<(i64, IpAddr)>,
    status: ReplicaStatus,
    status_file: PathBuf,
    warned_at: Option<Instant>,
}

fn map_err(e: StoreError) -> String {
    e.0
}

impl Replica {
    fn new(mut spec: ReplicaSpec) -> Result<Replica, String> {
        let now = timefmt::now();
        spec.map.expire_all(now).map_err(map_err)?;
        let mut r = Replica {
            status: ReplicaStatus {
                database: spec.target.describe(),
                map: spec.map.path().display().to_string(),
                ..ReplicaStatus::default()
            },
            map: spec.map,
            policy: spec.policy,
            local: HashMap::new(),
            deadlines: BTreeSet::new(),
            status_file: spec.state_dir.join(ReplicaStatus::FILE),
            warned_at: None,
        };
        r.reload_local()?;
        Ok(r)
    }

    /// Re-reads the map (it is the truth after a crash or an administrator's edit).
    fn reload_local(&mut self) -> Result<(), String> {
        self.local = self
            .map
            .list()
            .map_err(map_err)?
            .into_iter()
            .filter_map(|g| Some((g.ip, g.expires?)))
            .collect();
        self.deadlines = self.local.iter().map(|(&ip, &e)| (e, ip)).collect();
        Ok(())
    }

    fn note(&mut self, ip: IpAddr, expires: Option<i64>) {
        if let Some(old) = self.local.remove(&ip) {
            self.deadlines.remove(&(old, ip));
        }
        if let Some(e) = expires {
            self.local.insert(ip, e);
            self.deadlines.insert((e, ip));
        }
    }

    /// The expiry a database row may have here: capped at now + ttl; None when it must not
    /// be granted at all (expired, or an address dovegate never grants).
    fn admit(&self, ip: IpAddr, expires: i64, now: i64) -> Option<i64> {
        admit(&self.policy, ip, expires, now)
    }

    /// Makes the map equal the database: adds and shortens to the database's expiries,
    /// removes what vanished (revoked, expired).
    async fn resync(&mut self, client: &Client, table: &str) -> Result<(), String> {
        let (rows, db_now) = tokio::time::timeout(
            SNAPSHOT_TIMEOUT,
            postgres::snapshot(client, table, self.policy.ttl_secs()),
        )
        .await
        .map_err(|_| "snapshot timed out".to_string())?
        .map_err(|e| error_text(&e))?;
        let now = timefmt::now();
        // Expiries are compared with this host's clock: a skewed clock shortens or stretches
        // every grant here (stretching is capped at now + ttl).
        let skew = now as f64 - db_now;
        if skew.abs() > MAX_SKEW_SECS {
            tracing::warn!(skew_secs = skew.round(), "this host's clock differs from the database's; grants expire early or late here: run NTP");
        }
        let mut fresh: HashMap<IpAddr, i64> = HashMap::with_capacity(rows.len());
        let mut refused = 0usize;
        for (addr, e) in &rows {
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
        self.reload_local()?;
        let mut grow = Vec::new();
        let mut shorten = Vec::new();
        for (&ip, &e) in &fresh {
            match self.local.get(&ip) {
                Some(&l) if l == e => {}
                Some(&l) if l > e => shorten.push((ip, e)),
                _ => grow.push((ip, e)),
            }
        }
        let vanished: Vec<IpAddr> = self
            .local
            .keys()
            .filter(|ip| !fresh.contains_key(ip))
            .copied()
            .collect();
        if !grow.is_empty() {
            for (ip, e) in self.map.upsert(&grow).map_err(map_err)? {
                self.note(ip, Some(e));
            }
        }
        for (ip, e) in shorten {
            self.map.set(ip, e).map_err(map_err)?;
            self.note(ip, Some(e));
        }
        for ip in &vanished {
            self.map.revoke(*ip).map_err(map_err)?;
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

    /// Reads the rows of the addresses the notifications name and applies them.
    async fn refresh(
        &mut self,
        client: &Client,
        table: &str,
        notices: &[Notice],
    ) -> Result<(), String> {
        let mut asked: Vec<IpAddr> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for n in notices {
            if let Notice::Changed(ip) = n {
                if seen.insert(*ip) {
                    asked.push(*ip);
                }
            }
        }
        let mut rows = Vec::new();
        for chunk in asked.chunks(REREAD_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|&ip| crate::grant::key_text(ip)).collect();
            let got = tokio::time::timeout(
                SNAPSHOT_TIMEOUT,
                postgres::reread(client, table, &names, self.policy.ttl_secs()),
            )
            .await
            .map_err(|_| "reading the changed rows timed out".to_string())?
            .map_err(|e| error_text(&e))?;
            rows.extend(got);
        }
        if let Err(e) = self.apply(&asked, rows) {
            tracing::error!(error = %e, "cannot apply changes to the map; the next resync retries");
        }
        Ok(())
    }

    /// Applies the rows read back for `asked` (an address without a row is revoked here).
    fn apply(&mut self, asked: &[IpAddr], rows: Vec<(String, i64, f64)>) -> Result<(), String> {
        let now = timefmt::now();
        let now_f = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
        let mut last: HashMap<IpAddr, Option<i64>> = asked.iter().map(|&ip| (ip, None)).collect();
        let order = asked.to_vec();
        let mut updated_at: HashMap<IpAddr, f64> = HashMap::new();
        for (addr, e, updated) in rows {
            let Some(ip) = parse_address(&addr) else {
                continue;
            };
            if let Some(v) = last.get_mut(&ip) {
                *v = Some(e);
                updated_at.insert(ip, updated);
            }
        }
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
            match (wanted, self.local.get(&ip).copied()) {
                (None, Some(_)) => {
                    self.map.revoke(ip).map_err(map_err)?;
                    self.note(ip, None);
                }
                (None, None) => {}
                (Some(e), Some(l)) if l == e => {}
                (Some(e), Some(l)) if l > e => {
                    self.map.set(ip, e).map_err(map_err)?;
                    self.note(ip, Some(e));
                    changed(&ip);
                }
                (Some(e), _) => {
                    grow.push((ip, e));
                    changed(&ip);
                }
            }
        }
        if !grow.is_empty() {
            for (ip, e) in self.map.upsert(&grow).map_err(map_err)? {
                self.note(ip, Some(e));
            }
        }
        self.status.changes_applied += last.len() as u64;
        self.status.last_change = Some(now);
        if lag.is_some() {
            self.status.lag_secs = lag.map(|l| l.max(0.0));
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|&(e, _)| e)
    }

    fn expire_due(&mut self, now: i64) -> Result<(), String> {
        let due: Vec<IpAddr> = self
            .deadlines
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|&(_, ip)| ip)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let out = self.map.expire(&due, now).map_err(map_err)?;
        for ip in &due {
            self.note(*ip, None);
        }
        // Extended meanwhile in the map (by a snapshot racing this, or another writer).
        for (ip, e) in out.extended {
            self.note(ip, Some(e));
        }
        Ok(())
    }

    fn connected(&mut self) {
        if let Some(since) = self.status.disconnected_since.take() {
            tracing::info!(database = %self.status.database, down_since = %timefmt::rfc3339(since), "database reachable again; the map is current");
        }
        self.status.connected = true;
        self.status.last_error = None;
        self.warned_at = None;
    }

    fn down(&mut self, why: String) {
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
        tracing::warn!(
            database = %self.status.database,
            error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
            since = %self.status.disconnected_since.map(timefmt::rfc3339).unwrap_or_default(),
            grants = self.local.len(),
            "replica is STALE: the database is unreachable; the map keeps the grants it has until each one's own expiry, new logins and revocations elsewhere are not seen; check the database and the URL file"
        );
    }

    fn write_status(&mut self) {
        self.status.grants = self.local.len();
        self.status.updated = timefmt::now();
        write_json(&self.status_file, &self.status);
        crate::notify::status(&format!(
            "{} grants, {}",
            self.local.len(),
            if self.status.connected {
                "current"
            } else {
                "STALE (database unreachable)"
            }
        ));
        crate::notify::watchdog();
    }
}

/// Seconds until unix time `at`.
/// The expiry a database row may have here: capped at now + ttl; None when it must not
/// be granted at all (expired, or an address dovegate never grants).
pub fn admit(policy: &Policy, ip: IpAddr, expires: i64, now: i64) -> Option<i64> {
    if policy.exclusion(ip).is_some() {
        return None;
    }
    let e = expires.min(now.saturating_add(policy.ttl_secs()));
    (e > now).then_some(e)
}

/// The grant a database row (address text, expiry) makes here, if any.
pub fn row_grant(policy: &Policy, address: &str, expires: i64, now: i64) -> Option<(IpAddr, i64)> {
    let ip = parse_address(address)?;
    Some((ip, admit(policy, ip, expires, now)?))
}

fn until(at: i64) -> Duration {
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
pub async fn run(spec: ReplicaSpec, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let target = spec.target.clone();
    let table = target.table();
    let commit_interval = spec.commit_interval;
    let mut r = Replica::new(spec)?;
    tracing::info!(database = %r.status.database, map = %r.status.map, grants = r.local.len(), "dovegate replica started");
    crate::notify::ready(&format!("{} grants", r.local.len()));
    r.write_status();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let (tx, mut rx) = mpsc::channel(NOTICE_QUEUE);
        let attempt = async {
            let client = target.connect(Some(tx)).await?;
            tokio::time::timeout(
                postgres::CONNECT_TIMEOUT,
                client.batch_execute(&format!("LISTEN {CHANNEL}")),
            )
            .await
            .map_err(|_| "LISTEN timed out".to_string())?
            .map_err(|e| error_text(&e))?;
            Ok::<Client, String>(client)
        };
        let connected = tokio::select! {
            () = &mut shutdown => break,
            c = attempt => c,
        };
        let ended = match connected {
            Ok(client) => match r.resync(&client, &table).await {
                Ok(()) => {
                    r.connected();
                    backoff = Duration::from_secs(1);
                    r.write_status();
                    follow(
                        &mut r,
                        &client,
                        &table,
                        &mut rx,
                        commit_interval,
                        &mut shutdown,
                    )
                    .await
                }
                Err(e) => Ended::Lost(format!("snapshot failed: {e}")),
            },
            Err(e) => Ended::Lost(e),
        };
        match ended {
            Ended::Shutdown => break,
            Ended::Lost(why) => {
                r.down(why);
                r.write_status();
            }
        }
        // Keep expiring and warning while waiting to reconnect.
        let retry = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        loop {
            let expiry =
                tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
            tokio::select! {
                () = &mut shutdown => { r.write_status(); return Ok(()); }
                () = tokio::time::sleep_until(retry) => break,
                () = expiry => expire(&mut r),
            }
        }
    }
    r.write_status();
    tracing::info!(grants = r.local.len(), "dovegate replica stopped");
    Ok(())
}

fn expire(r: &mut Replica) {
    if let Err(e) = r.expire_due(timefmt::now()) {
        tracing::error!(error = %e, "expiry failed; will retry");
    }
}

/// The connected loop: notifications, expiry, periodic resync, status.
async fn follow(
    r: &mut Replica,
    client: &Client,
    table: &str,
    rx: &mut mpsc::Receiver<Notice>,
    commit_interval: Duration,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Ended {
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    let mut beat = tokio::time::interval(Duration::from_secs(2));
    let mut last_commit = Instant::now() - commit_interval;
    let mut beats = 0u64;
    // A resync asked for by an unreadable or dropped notification, and when it may run.
    let mut forced_at: Option<Instant> = None;
    let mut last_forced = Instant::now();
    loop {
        let expiry = tokio::time::sleep(r.next_deadline().map_or(Duration::from_secs(3600), until));
        let forced_deadline = forced_at;
        let forced = async move {
            match forced_deadline {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut *shutdown => return Ended::Shutdown,
            n = rx.recv() => {
                // Batch: at most one map commit per commit_interval, whatever the rate.
                tokio::time::sleep_until(last_commit + commit_interval).await;
                let mut batch: Vec<Notice> = n.into_iter().collect();
                while batch.len() < NOTICE_QUEUE {
                    match rx.try_recv() {
                        Ok(n) => batch.push(n),
                        Err(_) => break,
                    }
                }
                if let Some(why) = batch.iter().find_map(|n| match n { Notice::Closed(w) => Some(w.clone()), _ => None }) {
                    // The reconnect resyncs.
                    return Ended::Lost(format!("connection lost: {why}"));
                }
                if batch.is_empty() {
                    return Ended::Lost("connection lost".into());
                }
                let need_resync = batch.iter().any(|n| matches!(n, Notice::Overflow | Notice::Unreadable));
                last_commit = Instant::now();
                if let Err(e) = r.refresh(client, table, &batch).await {
                    return Ended::Lost(format!("cannot read the changed rows: {e}"));
                }
                if need_resync && forced_at.is_none() {
                    let at = (last_forced + FORCED_RESYNC_GAP).max(Instant::now());
                    forced_at = Some(at);
                    tracing::warn!(in_secs = at.saturating_duration_since(Instant::now()).as_secs(), "a change notification was dropped or unreadable; resyncing");
                }
            }
            () = forced => {
                forced_at = None;
                last_forced = Instant::now();
                if let Err(e) = r.resync(client, table).await {
                    return Ended::Lost(format!("resync failed: {e}"));
                }
            }
            _ = resync.tick() => {
                if let Err(e) = r.resync(client, table).await {
                    return Ended::Lost(format!("resync failed: {e}"));
                }
            }
            () = expiry => expire(r),
            _ = beat.tick() => {
                if client.is_closed() {
                    return Ended::Lost("connection closed".into());
                }
                beats += 1;
                // A database that hangs without closing the connection sends nothing
                // either: ask it now and then.
                if beats % 5 == 0 {
                    match tokio::time::timeout(postgres::CONNECT_TIMEOUT, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(error_text(&e)),
                        Err(_) => return Ended::Lost("the database does not answer".into()),
                    }
                }
                r.write_status();
            }
        }
    }
}
