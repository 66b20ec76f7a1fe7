//! The writer's database client on its own thread and runtime, whatever the database
//! (`WriterDb`: PostgreSQL in `store::postgres::worker`, MariaDB in
//! `store::mysql::worker`).
//!
//! The engine is synchronous and commits from its loop; a hung or unreachable database
//! must not hold it longer than a bound. The engine's side (`Writer`) sends requests over a
//! bounded channel and waits at most `REPLY_TIMEOUT`; the worker gives every statement
//! `QUERY_TIMEOUT`, connects in the background with a backoff, and while the database is
//! unreachable puts commits into the spill queue (fsynced), replayed in order when it
//! returns.
//!
//! The worker also follows the revocations recorded in the database (another host's
//! `dovegate revoke`, a DELETE by hand) as the database signals them (PostgreSQL's
//! NOTIFY, MariaDB's polled change sequence) and hands them to the engine's side
//! (`Writer::take_revocations`), which removes them from the local map. And it measures
//! this host's clock against the database's, so that expiries it writes last as long as
//! the ttl says even when this clock is off.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::shared::{parse_address, NewerSchema, Origin, Report, Upserted};
use crate::store::spill::{Spill, SpillError};
use crate::telemetry::ratelimit::RateLimit;
use crate::timefmt;

/// A statement that takes longer is abandoned and the database treated as down.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest the engine waits for the worker (a connect or query in progress).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While the database is down, the warning is repeated this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Expired rows are kept this long for audit, then deleted.
pub const KEEP_EXPIRED_SECS: i64 = 24 * 3600;
/// Replayed spill grants per statement.
const REPLAY_CHUNK: usize = 5000;
/// A clock further off the database's than this is warned about (every `WARN_EVERY`).
pub const MAX_SKEW_SECS: f64 = 5.0;
/// The clock is measured again this often.
const SKEW_EVERY: Duration = Duration::from_secs(60);
/// How often this writer reports itself to the database (`dovegate status --fleet`).
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How often expired rows are deleted.
const CLEAN_EVERY: Duration = Duration::from_secs(600);
/// Revocations waiting for the engine beyond this are dropped for a full re-read.
const MAX_PENDING_REVOCATIONS: usize = 100_000;

/// The database side of a writer: its statements, and how it signals changes. Each
/// error names what was being done; the worker bounds every call with `QUERY_TIMEOUT`.
// Used generically inside this crate, on the worker's own current-thread runtime: only
// `connect` runs in a spawned task (so requests are answered while a hung server takes
// its time), hence the only Send future.
#[allow(async_fn_in_trait)]
pub trait WriterDb: Clone + Send + Sync + 'static {
    /// A connection, with whatever tells it of changes.
    type Conn: Send + 'static;
    /// A position in the revocations read.
    type Since: Clone;
    type Error: std::error::Error + Send + 'static;

    /// The database's name in messages (`PostgreSQL`, `MariaDB`).
    const NAME: &'static str;
    /// The setting that names its URL file, for the advice in warnings.
    const URL_SETTING: &'static str;
    /// The worker thread's name.
    const THREAD: &'static str;

    /// The database for logs and status, without credentials.
    fn describe(&self) -> String;
    /// Connects (bounded), the schema checked or migrated, subscribed to changes.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;
    /// Grants in one transaction; the later expiry wins, bounded by the database's now +
    /// `max_ttl`; `skew` taken off; grants from logins before a revoke refused.
    async fn upsert(
        &self,
        c: &mut Self::Conn,
        grants: &[(IpAddr, i64)],
        max_ttl: i64,
        skew: f64,
        origin: &Origin,
    ) -> Result<Upserted, Self::Error>;
    /// Deletes the grant and records a tombstone; true when a grant was there.
    async fn revoke(&self, c: &mut Self::Conn, ip: IpAddr) -> Result<bool, Self::Error>;
    /// Sets one grant's expiry (a manual grant), bounded by now + `max_ttl`.
    async fn set(
        &self,
        c: &mut Self::Conn,
        ip: IpAddr,
        expires: i64,
        max_ttl: i64,
        origin: &Origin,
    ) -> Result<(), Self::Error>;
    /// The database's clock, unix seconds.
    async fn db_now(&self, c: &mut Self::Conn) -> Result<f64, Self::Error>;
    /// Revocations after `since` (None: those younger than `ttl`), as (address, revoked
    /// at in the database's clock), and the position this read is current to.
    async fn revocations_since(
        &self,
        c: &mut Self::Conn,
        since: Option<&Self::Since>,
        ttl: i64,
    ) -> Result<(Vec<(String, f64)>, Self::Since), Self::Error>;
    /// Deletes rows expired for longer than `keep_secs`, and old tombstones.
    async fn clean(
        &self,
        c: &mut Self::Conn,
        keep_secs: i64,
        max_ttl: i64,
    ) -> Result<u64, Self::Error>;
    /// Reports this writer where the database keeps the fleet (status only).
    async fn report(&self, c: &mut Self::Conn, host: &str, r: &Report) -> Result<(), Self::Error>;
    /// Resolves when revocations may have been recorded (a notification, the next poll);
    /// an error when the connection is lost. Cancel-safe (a `select!` branch).
    async fn next_change(&self, c: &mut Self::Conn) -> Result<(), Self::Error>;
    /// The least time between two reads of revocations (signals come from anyone).
    fn read_gap(&self) -> Duration;
    /// Some when the connection is known to be closed (no round trip).
    fn closed(&self, c: &mut Self::Conn) -> Option<Self::Error>;
    /// Ends a connection without waiting for it (a hung server must not hold the worker).
    fn close(&self, c: Self::Conn);

    /// The database refused the data (retrying the same rows fails the same way).
    fn is_data_error(e: &Self::Error) -> bool;
    /// The database's schema is newer than this dovegate (an upgrade, not an outage).
    fn newer_schema(e: &Self::Error) -> Option<NewerSchema>;
}

/// Why the writer could not do something: the database's own error, or the worker's.
#[derive(Debug, thiserror::Error)]
pub enum WriterError<E: std::error::Error + 'static> {
    /// A statement failed (the error names it).
    #[error(transparent)]
    Db(E),
    /// The spill queue file: the commit is not durable.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// No answer within the bound (a hung database; the connection is dropped).
    #[error("{what}: no answer within {secs}s; the database hangs or is overloaded")]
    Timeout { what: &'static str, secs: u64 },
    /// Not connected now (the worker retries in the background): `what` was not done.
    #[error("database unreachable: {what}; run the command again when it is reachable")]
    Unreachable { what: &'static str },
    /// The worker thread did not take or answer a request.
    #[error("the {db} worker {what}")]
    Worker {
        db: &'static str,
        what: &'static str,
    },
}

impl<E: std::error::Error + 'static> WriterError<E> {
    /// The spill queue's I/O error kind, when that is what failed.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            WriterError::Spill(s) => Some(s.source.kind()),
            _ => None,
        }
    }
}

/// How a commit reached durability.
#[derive(Debug)]
pub enum Committed {
    /// In the database: the effective expiries, and the grants refused as revoked.
    Written(Upserted),
    /// In the spill queue, waiting for the database; `dropped` older grants had to go to
    /// keep it bounded (the database copy is behind).
    Spilled { dropped: usize },
}

type Reply<T, E> = SyncSender<Result<T, WriterError<E>>>;

enum Request<E: std::error::Error + 'static> {
    Commit(Vec<(IpAddr, i64)>, Reply<Committed, E>),
    Revoke(IpAddr, Reply<bool, E>),
    Set(IpAddr, i64, Reply<(), E>),
}

/// Revocations read from the database, waiting for the engine's side: (address, when it
/// was revoked, in this host's clock).
type Pending = Arc<Mutex<Vec<(IpAddr, i64)>>>;

/// What the writer reports in `STATE/fleet.json` (for `dovegate status` and metrics).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriterStatus {
    pub database: String,
    pub connected: bool,
    /// Unix seconds since when the database is unreachable.
    pub disconnected_since: Option<i64>,
    pub last_error: Option<String>,
    /// Unix seconds of the last commit that reached the database.
    pub last_commit: Option<i64>,
    /// Grants waiting in the spill queue.
    pub queue_len: usize,
    pub queue_max: usize,
    pub queue_file: String,
    pub spilled_total: u64,
    pub replayed_total: u64,
    /// Grants dropped from a full spill queue: the database copy is behind by these.
    #[serde(default)]
    pub dropped_total: u64,
    /// Some grants never reached the database (spill queue overflow, or a failed spill).
    #[serde(default)]
    pub behind: bool,
    /// This host's clock minus the database's, in seconds (last measured).
    #[serde(default)]
    pub clock_skew_secs: Option<f64>,
    /// Revocations recorded in the database applied to the local map.
    #[serde(default)]
    pub revocations_seen: u64,
    /// Set while the database refuses this dovegate for its newer schema (not an outage).
    #[serde(default)]
    pub newer_schema: Option<NewerSchema>,
    /// Unix seconds when this file was written.
    pub updated: i64,
}

impl WriterStatus {
    pub const FILE: &'static str = "fleet.json";

    /// The status a writer left in `state_dir`, if any (`updated` tells its age).
    pub fn load(state_dir: &std::path::Path) -> Option<WriterStatus> {
        read_json(&state_dir.join(Self::FILE))
    }
}

/// What the worker needs.
pub struct WriterSpec<D> {
    pub db: D,
    pub origin: Origin,
    pub max_ttl: i64,
    pub state_dir: PathBuf,
    pub spill_max: usize,
    /// Which writer on its host (its map), for `dovegate status --fleet`.
    pub instance: String,
}

/// The engine's handle on the worker thread.
pub struct Writer<D: WriterDb> {
    tx: tokio::sync::mpsc::Sender<Request<D::Error>>,
    /// `grant.ttl` in seconds, shared with the worker: a reload changes it for both.
    max_ttl: Arc<AtomicI64>,
    revocations: Pending,
}

impl<D: WriterDb> Writer<D> {
    /// Opens the spill queue and starts the worker thread (it connects in the background).
    pub fn start(spec: WriterSpec<D>) -> Result<Writer<D>, WriterError<D::Error>> {
        let spill = Spill::open(&spec.state_dir, spec.spill_max)?;
        if !spill.is_empty() {
            tracing::info!(waiting = spill.len(), file = %spill.path().display(), "spilled grants from an earlier run will be written to the database");
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let max_ttl = Arc::new(AtomicI64::new(spec.max_ttl));
        let ttl = Arc::clone(&max_ttl);
        let revocations: Pending = Arc::default();
        let pending = revocations.clone();
        std::thread::Builder::new()
            .name(D::THREAD.into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the {} runtime; commits will fail", D::NAME);
                        return;
                    }
                };
                rt.block_on(Worker::new(spec, spill, pending, ttl).run(rx));
            })
            .map_err(|_| Self::worker("thread cannot be started"))?;
        Ok(Writer {
            tx,
            max_ttl,
            revocations,
        })
    }

    /// Revocations recorded in the database since the last call (address, when it was
    /// revoked in this host's clock).
    pub fn take_revocations(&self) -> Vec<(IpAddr, i64)> {
        match self.revocations.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    /// The longest a grant may last from now (`grant.ttl`, in seconds).
    pub fn max_ttl(&self) -> i64 {
        self.max_ttl.load(Ordering::Relaxed)
    }

    /// `grant.ttl` changed (a reload): the rows' bounds and the revoke checks follow it.
    pub fn set_max_ttl(&self, secs: i64) {
        self.max_ttl.store(secs, Ordering::Relaxed);
    }

    fn worker(what: &'static str) -> WriterError<D::Error> {
        WriterError::Worker { db: D::NAME, what }
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T, D::Error>) -> Request<D::Error>,
    ) -> Result<T, WriterError<D::Error>> {
        let (reply, answer) = sync_channel(1);
        self.tx.try_send(make(reply)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => {
                Self::worker("is busy (database hung?)")
            }
            tokio::sync::mpsc::error::TrySendError::Closed(_) => Self::worker("has stopped"),
        })?;
        answer
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| Self::worker("did not answer within 10s"))?
    }

    /// Writes grants to the database or, while it is down, to the spill queue.
    pub fn commit(&self, grants: &[(IpAddr, i64)]) -> Result<Committed, WriterError<D::Error>> {
        let grants = grants.to_vec();
        self.ask(|r| Request::Commit(grants, r))
    }

    pub fn revoke(&self, ip: IpAddr) -> Result<bool, WriterError<D::Error>> {
        self.ask(|r| Request::Revoke(ip, r))
    }

    pub fn set(&self, ip: IpAddr, expires: i64) -> Result<(), WriterError<D::Error>> {
        self.ask(|r| Request::Set(ip, expires, r))
    }
}

/// A connect in progress, in its own task: requests are answered meanwhile (spilled),
/// however long a hung server takes to refuse.
type Connecting<D> = tokio::task::JoinHandle<Result<<D as WriterDb>::Conn, <D as WriterDb>::Error>>;

struct Worker<D: WriterDb> {
    spec: WriterSpec<D>,
    spill: Spill,
    conn: Option<D::Conn>,
    connecting: Option<Connecting<D>>,
    retry_at: Instant,
    backoff: Duration,
    /// The database unreachable, and the clock skew: each said at most every `WARN_EVERY`.
    down_limit: RateLimit<Instant>,
    skew_limit: RateLimit<Instant>,
    /// This host's clock minus the database's (0 until measured).
    skew: f64,
    /// Where the next read of revocations starts (None: the recent ones, after a connect).
    revocations_since: Option<D::Since>,
    revocations_due: bool,
    last_read: Option<Instant>,
    pending: Pending,
    status: WriterStatus,
    /// `grant.ttl` as it is now (the handle's; a reload changes it).
    max_ttl: Arc<AtomicI64>,
}

/// Runs `fut` with `QUERY_TIMEOUT`.
async fn timed<T, E: std::error::Error + 'static>(
    what: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, WriterError<E>> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(r) => r.map_err(WriterError::Db),
        Err(_) => Err(WriterError::Timeout {
            what,
            secs: QUERY_TIMEOUT.as_secs(),
        }),
    }
}

/// One entry per address, the latest expiry (a statement may not touch a row twice).
fn latest(grants: &[(IpAddr, i64)]) -> Vec<(IpAddr, i64)> {
    let mut unique: std::collections::HashMap<IpAddr, i64> = std::collections::HashMap::new();
    for &(ip, e) in grants {
        let v = unique.entry(ip).or_insert(e);
        *v = (*v).max(e);
    }
    unique.into_iter().collect()
}

impl<D: WriterDb> Worker<D> {
    /// `grant.ttl` now, in seconds.
    fn max_ttl(&self) -> i64 {
        self.max_ttl.load(Ordering::Relaxed)
    }

    fn new(
        spec: WriterSpec<D>,
        spill: Spill,
        pending: Pending,
        max_ttl: Arc<AtomicI64>,
    ) -> Worker<D> {
        let status = WriterStatus {
            database: spec.db.describe(),
            queue_len: spill.len(),
            queue_max: spec.spill_max,
            queue_file: spill.path().display().to_string(),
            ..WriterStatus::default()
        };
        Worker {
            spec,
            spill,
            conn: None,
            connecting: None,
            retry_at: Instant::now(),
            backoff: Duration::from_secs(1),
            down_limit: RateLimit::new(WARN_EVERY),
            skew_limit: RateLimit::new(WARN_EVERY),
            skew: 0.0,
            revocations_since: None,
            revocations_due: false,
            last_read: None,
            pending,
            status,
            max_ttl,
        }
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Request<D::Error>>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut clean = tokio::time::interval(CLEAN_EVERY);
        let mut skew = tokio::time::interval(SKEW_EVERY);
        let mut report = tokio::time::interval(REPORT_EVERY);
        let db = self.spec.db.clone();
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => self.handle(r).await,
                    None => break,
                },
                res = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    self.connecting = None;
                    match res {
                        Ok(Ok(conn)) => self.connected(conn).await,
                        Ok(Err(e)) => {
                            self.status.newer_schema = D::newer_schema(&e);
                            self.down(e.to_string());
                        }
                        Err(e) => self.down(format!("connect task failed: {e}")),
                    }
                }
                n = async { db.next_change(self.conn.as_mut().expect("guarded")).await }, if self.conn.is_some() => {
                    match n {
                        Ok(()) => {
                            // At once (a renewal must not race the revoke), but at most once
                            // per read gap however many signals come.
                            if self.last_read.is_some_and(|t| t.elapsed() < db.read_gap()) {
                                self.revocations_due = true;
                            } else {
                                self.read_revocations().await;
                            }
                        }
                        Err(e) => self.down(e.to_string()),
                    }
                }
                _ = tick.tick() => {
                    if let Some(e) = self.conn.as_mut().and_then(|c| db.closed(c)) {
                        self.down(e.to_string());
                    }
                    if self.conn.is_none() && self.connecting.is_none() && Instant::now() >= self.retry_at {
                        let db = db.clone();
                        self.connecting = Some(tokio::spawn(async move { db.connect().await }));
                    }
                    if self.conn.is_some() && !self.spill.is_empty() {
                        self.replay().await;
                    }
                    // At most one read per tick however many signals came (anyone may send
                    // them).
                    if self.conn.is_some() && self.revocations_due {
                        self.read_revocations().await;
                    }
                    // Not before a first failure: connecting at start-up is not an outage.
                    if self.conn.is_none() && self.status.last_error.is_some() {
                        self.warn_down();
                    }
                    self.warn_skew();
                    self.write_status();
                }
                _ = skew.tick() => self.check_clock().await,
                _ = report.tick() => self.report().await,
                _ = clean.tick() => self.clean().await,
            }
        }
        self.write_status();
    }

    async fn connected(&mut self, conn: D::Conn) {
        if self.status.disconnected_since.is_some() {
            tracing::info!(database = %self.status.database, "database reachable again");
        } else {
            tracing::info!(database = %self.status.database, "connected to the database");
        }
        self.conn = Some(conn);
        self.backoff = Duration::from_secs(1);
        self.down_limit.take_pending();
        self.status.connected = true;
        self.status.disconnected_since = None;
        self.status.last_error = None;
        self.status.newer_schema = None;
        self.check_clock().await;
        // Signals were missed while away: the recent revocations, all of them.
        self.revocations_since = None;
        self.read_revocations().await;
        // Not after a failed clock check (it dropped the connection and said why).
        if self.conn.is_some() && !self.spill.is_empty() {
            self.replay().await;
        }
        self.report().await;
        self.write_status();
    }

    /// Deletes expired rows now and then (they only serve audit meanwhile).
    async fn clean(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let (keep, ttl) = (KEEP_EXPIRED_SECS, self.max_ttl.load(Ordering::Relaxed));
        match timed("deleting expired rows", self.spec.db.clean(c, keep, ttl)).await {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "expired rows deleted from the database"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete expired rows"),
        }
    }

    /// Reports this writer to the database. Status only: a refused report changes nothing,
    /// but one that gets no answer is an outage like any statement's (and the one that
    /// notices a hung database while no login comes).
    async fn report(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let r = Report {
            role: "writer",
            instance: self.spec.instance.clone(),
            spill_queue: Some(i64::try_from(self.spill.len()).unwrap_or(i64::MAX)),
            spill_dropped: Some(i64::try_from(self.status.dropped_total).unwrap_or(i64::MAX)),
            lag_secs: None,
            grants: None,
        };
        let sent = tokio::time::timeout(
            QUERY_TIMEOUT,
            self.spec.db.report(c, &self.spec.origin.host, &r),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot report this writer to the database"),
            Err(_) => {
                let e = WriterError::<D::Error>::Timeout {
                    what: "reporting to the fleet",
                    secs: QUERY_TIMEOUT.as_secs(),
                };
                self.down(e.to_string())
            }
        }
    }

    /// Measures this host's clock against the database's (half the round trip taken off):
    /// expiries written are corrected by it, and it is warned about while it lasts.
    async fn check_clock(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let before = timefmt::now_f64();
        let db_now = match timed("reading the database's clock", self.spec.db.db_now(c)).await {
            Ok(v) => v,
            Err(e) => return self.down(e.to_string()),
        };
        let after = timefmt::now_f64();
        let skew = (before + after) / 2.0 - db_now;
        // Below a second it is measurement noise: expiries have second precision.
        self.skew = if skew.abs() < 1.0 { 0.0 } else { skew };
        self.status.clock_skew_secs = Some((skew * 1000.0).round() / 1000.0);
        if skew.abs() <= MAX_SKEW_SECS {
            self.skew_limit.take_pending();
        }
        self.warn_skew();
    }

    fn warn_skew(&mut self) {
        let Some(skew) = self.status.clock_skew_secs else {
            return;
        };
        if skew.abs() <= MAX_SKEW_SECS || self.skew_limit.hit_at(Instant::now()).is_none() {
            return;
        }
        tracing::warn!(database = %self.status.database, skew_secs = skew.round(), "this host's clock differs from the database's: the expiries written are corrected by it (the database's clock decides), but this host's own map and log times are off; run NTP");
    }

    /// Reads the revocations since the last read and hands them to the engine's side.
    async fn read_revocations(&mut self) {
        let Some(c) = &mut self.conn else { return };
        self.revocations_due = false;
        self.last_read = Some(Instant::now());
        let read = self.spec.db.revocations_since(
            c,
            self.revocations_since.as_ref(),
            self.max_ttl.load(Ordering::Relaxed),
        );
        let (rows, next) = match timed("reading revocations", read).await {
            Ok(v) => v,
            Err(e) => {
                self.revocations_due = true;
                return self.down(e.to_string());
            }
        };
        self.revocations_since = Some(next);
        if rows.is_empty() {
            return;
        }
        let skew = self.skew;
        let mut got: Vec<(IpAddr, i64)> = rows
            .into_iter()
            .filter_map(|(a, at)| Some((parse_address(&a)?, (at + skew).ceil() as i64)))
            .collect();
        self.status.revocations_seen += got.len() as u64;
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if pending.len() + got.len() > MAX_PENDING_REVOCATIONS {
            tracing::warn!(
                waiting = pending.len() + got.len(),
                "too many revocations waiting for the engine; the oldest are dropped"
            );
            let keep = MAX_PENDING_REVOCATIONS.saturating_sub(got.len());
            let cut = pending.len().saturating_sub(keep);
            pending.drain(..cut);
            got.truncate(MAX_PENDING_REVOCATIONS);
        }
        pending.extend(got);
    }

    /// The database failed: forget the connection, retry later, say so (once now, then
    /// every `WARN_EVERY`).
    fn down(&mut self, why: String) {
        if let Some(c) = self.conn.take() {
            self.spec.db.close(c);
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.status.connected = false;
        self.status.disconnected_since.get_or_insert(timefmt::now());
        self.status.last_error = Some(why);
        self.warn_down();
    }

    fn warn_down(&mut self) {
        if self.down_limit.hit_at(Instant::now()).is_none() {
            return;
        }
        if self.status.behind {
            tracing::error!(
                database = %self.status.database,
                error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
                waiting = self.spill.len(),
                max = self.spec.spill_max,
                dropped = self.status.dropped_total,
                queue = %self.spill.path().display(),
                "database copy behind: the database is unreachable and the spill queue is full; new logins are committed to the local map, but the oldest grants waiting for the database were dropped (the other hosts will not see them); fix the database or raise [store] spill_max_grants"
            );
            return;
        }
        if let Some(newer) = self.status.newer_schema {
            tracing::error!(
                database = %self.status.database,
                waiting = self.spill.len(),
                queue = %self.spill.path().display(),
                "{newer}: this writer does not use the database until then; commits are kept in the spill queue and written after the upgrade"
            );
            return;
        }
        tracing::warn!(
            database = %self.status.database,
            error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
            waiting = self.spill.len(),
            queue = %self.spill.path().display(),
            "database unreachable: commits are kept in the spill queue and written when it returns; check the database and [store] {}", D::URL_SETTING
        );
    }

    async fn handle(&mut self, req: Request<D::Error>) {
        match req {
            Request::Commit(grants, reply) => {
                let _ = reply.send(self.commit(grants).await);
            }
            Request::Revoke(ip, reply) => {
                let r = match &mut self.conn {
                    None => Err(WriterError::Unreachable {
                        what: "cannot revoke everywhere",
                    }),
                    Some(c) => timed("revoking", self.spec.db.revoke(c, ip)).await,
                };
                self.down_if_hung(&r);
                let _ = reply.send(r);
            }
            Request::Set(ip, e, reply) => {
                let (ttl, origin) = (self.max_ttl(), &self.spec.origin);
                let r = match &mut self.conn {
                    None => Err(WriterError::Unreachable {
                        what: "cannot grant everywhere",
                    }),
                    Some(c) => timed("granting", self.spec.db.set(c, ip, e, ttl, origin)).await,
                };
                self.down_if_hung(&r);
                let _ = reply.send(r);
            }
        }
    }

    /// A statement that got no answer leaves the connection in an unknown state: a new one.
    fn down_if_hung<T>(&mut self, r: &Result<T, WriterError<D::Error>>) {
        if let Err(e @ WriterError::Timeout { .. }) = r {
            if self.conn.is_some() {
                self.down(e.to_string());
            }
        }
    }

    async fn commit(
        &mut self,
        grants: Vec<(IpAddr, i64)>,
    ) -> Result<Committed, WriterError<D::Error>> {
        // Order: while older grants wait in the queue, newer ones queue behind them.
        if self.conn.is_some() && self.spill.is_empty() {
            match self.upsert_checked(&grants).await {
                Ok(done) => {
                    self.status.last_commit = Some(timefmt::now());
                    return Ok(Committed::Written(done));
                }
                Err(e) => self.down(e.to_string()),
            }
        }
        let dropped = match self.spill.push(&grants, timefmt::now()) {
            Ok(d) => d,
            Err(e) => {
                self.behind(grants.len());
                return Err(e.into());
            }
        };
        self.status.spilled_total += grants.len() as u64;
        self.status.queue_len = self.spill.len();
        if dropped > 0 {
            self.behind(dropped);
        }
        Ok(Committed::Spilled { dropped })
    }

    /// Grants that will never reach the database: said loudly, now and while it lasts.
    fn behind(&mut self, lost: usize) {
        self.status.dropped_total += lost as u64;
        if !self.status.behind {
            self.down_limit.take_pending();
        }
        self.status.behind = true;
        self.warn_down();
    }

    /// `upsert`, telling refused data from an outage: when the database refuses the batch
    /// (a data error), each address is written alone and those refused again are dropped
    /// with an ERROR naming them, so one bad row cannot keep every later commit in the
    /// spill queue. An outage is an error (the caller spills).
    async fn upsert_checked(
        &mut self,
        grants: &[(IpAddr, i64)],
    ) -> Result<Upserted, WriterError<D::Error>> {
        let (db, ttl, skew, origin) = (&self.spec.db, self.max_ttl(), self.skew, &self.spec.origin);
        let Some(c) = &mut self.conn else {
            return Err(WriterError::Unreachable {
                what: "cannot write grants",
            });
        };
        match timed("writing grants", db.upsert(c, grants, ttl, skew, origin)).await {
            Ok(v) => return Ok(v),
            Err(WriterError::Db(e)) if D::is_data_error(&e) => {
                tracing::warn!(error = %e, grants = grants.len(), "the database refused a batch of grants; writing them one by one");
            }
            Err(e) => return Err(e),
        }
        let mut out = Upserted::default();
        for g in latest(grants) {
            match timed("writing a grant", db.upsert(c, &[g], ttl, skew, origin)).await {
                Ok(v) => {
                    out.written.extend(v.written);
                    out.revoked.extend(v.revoked);
                }
                Err(WriterError::Db(e)) if D::is_data_error(&e) => {
                    tracing::error!(address = %g.0, error = %e, "the database refused this grant; it is kept in the local map only (not shared): check the row of this address in the table");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Writes the spill queue to the database in order, then empties it.
    async fn replay(&mut self) {
        let grants = match self.spill.read() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spill queue");
                return;
            }
        };
        let mut refused = 0usize;
        for chunk in grants.chunks(REPLAY_CHUNK) {
            match self.upsert_checked(chunk).await {
                Ok(done) => refused += done.revoked.len(),
                Err(e) => return self.down(e.to_string()),
            }
        }
        if let Err(e) = self.spill.clear() {
            tracing::error!(error = %e, "cannot empty the spill queue; it will be written again");
            return;
        }
        self.status.replayed_total += grants.len() as u64;
        self.status.queue_len = 0;
        self.status.last_commit = Some(timefmt::now());
        if self.status.behind {
            tracing::warn!(dropped = self.status.dropped_total, "the spill queue is written; the database copy lacks the grants dropped while it was full (until their addresses log in again)");
            self.status.behind = false;
        }
        tracing::info!(
            grants = grants.len(),
            revoked_meanwhile = refused,
            "spilled grants written to the database"
        );
    }

    fn write_status(&mut self) {
        self.status.queue_len = self.spill.len();
        self.status.updated = timefmt::now();
        write_json(&self.spec.state_dir.join(WriterStatus::FILE), &self.status);
    }
}

/// Replaces `path` with `value` as JSON (write then rename: readers never see half).
pub fn write_json(path: &std::path::Path, value: &impl serde::Serialize) {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::debug!(file = %path.display(), error = %e, "cannot write status file");
    }
}

/// Reads a status file written by `write_json` (bounded: these files are small).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Option<T> {
    use crate::fsread::{self, Links};
    let bytes = fsread::read(path, fsread::STATE_MAX, Links::Refuse).ok()?;
    serde_json::from_slice(&bytes).ok()
}
