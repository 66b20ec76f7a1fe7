//! The writer's MariaDB client on its own thread and runtime: the same contract as the
//! PostgreSQL worker (`store::postgres::worker`): the engine waits at most `REPLY_TIMEOUT`,
//! every statement has `QUERY_TIMEOUT`, commits go to the fsynced spill queue (the same
//! file format, `store::postgres::spill`) while the database is away and are replayed in
//! order when it returns. Revocations are polled every `POLL` on the change sequence (no
//! LISTEN in MariaDB) and handed to the engine's side.

use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_async::Conn;
use tokio::time::Instant;

use super::{timed, MyError, Target, POLL, QUERY_TIMEOUT};
use crate::store::postgres::spill::Spill;
use crate::store::postgres::worker::{write_json, Committed, WriterStatus};
use crate::store::postgres::{parse_address, Origin, Upserted};
use crate::timefmt;

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const WARN_EVERY: Duration = Duration::from_secs(60);
const KEEP_EXPIRED_SECS: i64 = 24 * 3600;
const REPLAY_CHUNK: usize = 5000;
const SKEW_EVERY: Duration = Duration::from_secs(60);
const MAX_PENDING_REVOCATIONS: usize = 100_000;

/// What the MariaDB writer needs (as `postgres::worker::WriterSpec`).
pub struct MysqlSpec {
    pub target: Target,
    pub origin: Origin,
    pub max_ttl: i64,
    pub state_dir: std::path::PathBuf,
    pub spill_max: usize,
    /// The Dovecot wiki's table, written too.
    pub popbsmtp: Option<super::Popbsmtp>,
}

enum Request {
    Commit(Vec<(IpAddr, i64)>, SyncSender<Result<Committed, MyError>>),
    Revoke(IpAddr, SyncSender<Result<bool, MyError>>),
    Set(IpAddr, i64, SyncSender<Result<(), MyError>>),
}

type Pending = Arc<Mutex<Vec<(IpAddr, i64)>>>;

/// The engine's handle on the worker thread.
pub struct MysqlWriter {
    tx: tokio::sync::mpsc::Sender<Request>,
    max_ttl: i64,
    revocations: Pending,
}

impl MysqlWriter {
    /// Opens the spill queue and starts the worker thread (it connects in the background).
    pub fn start(spec: MysqlSpec) -> Result<MysqlWriter, MyError> {
        let spill = Spill::open(&spec.state_dir, spec.spill_max)?;
        if !spill.is_empty() {
            tracing::info!(waiting = spill.len(), file = %spill.path().display(), "spilled grants from an earlier run will be written to the database");
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let max_ttl = spec.max_ttl;
        let revocations: Pending = Arc::default();
        let pending = revocations.clone();
        std::thread::Builder::new()
            .name("mariadb".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the MariaDB runtime; commits will fail");
                        return;
                    }
                };
                rt.block_on(Worker::new(spec, spill, pending).run(rx));
            })
            .map_err(|_| MyError::Worker("thread cannot be started"))?;
        Ok(MysqlWriter {
            tx,
            max_ttl,
            revocations,
        })
    }

    pub fn take_revocations(&self) -> Vec<(IpAddr, i64)> {
        match self.revocations.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    pub fn max_ttl(&self) -> i64 {
        self.max_ttl
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, MyError>>) -> Request,
    ) -> Result<T, MyError> {
        let (reply, answer) = sync_channel(1);
        self.tx.try_send(make(reply)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => {
                MyError::Worker("is busy (database hung?)")
            }
            tokio::sync::mpsc::error::TrySendError::Closed(_) => MyError::Worker("has stopped"),
        })?;
        answer
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| MyError::Worker("did not answer within 10s"))?
    }

    pub fn commit(&self, grants: &[(IpAddr, i64)]) -> Result<Committed, MyError> {
        let grants = grants.to_vec();
        self.ask(|r| Request::Commit(grants, r))
    }

    pub fn revoke(&self, ip: IpAddr) -> Result<bool, MyError> {
        self.ask(|r| Request::Revoke(ip, r))
    }

    pub fn set(&self, ip: IpAddr, expires: i64) -> Result<(), MyError> {
        self.ask(|r| Request::Set(ip, expires, r))
    }
}

struct Worker {
    spec: MysqlSpec,
    spill: Spill,
    conn: Option<Conn>,
    /// A connect in progress, in its own task: requests are answered meanwhile (spilled),
    /// however long a hung server takes to refuse.
    connecting: Option<tokio::task::JoinHandle<Result<Conn, MyError>>>,
    retry_at: Instant,
    backoff: Duration,
    warned_at: Option<Instant>,
    skew: f64,
    revocations_since: Option<i64>,
    pending: Pending,
    status: WriterStatus,
}

impl Worker {
    fn new(spec: MysqlSpec, spill: Spill, pending: Pending) -> Worker {
        let status = WriterStatus {
            database: spec.target.describe(),
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
            warned_at: None,
            skew: 0.0,
            revocations_since: None,
            pending,
            status,
        }
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Request>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clean = tokio::time::interval(Duration::from_secs(600));
        let mut skew = tokio::time::interval(SKEW_EVERY);
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => self.handle(r).await,
                    None => break,
                },
                res = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    self.connecting = None;
                    match res {
                        Ok(r) => self.connected(r).await,
                        Err(e) => self.down(format!("connect task failed: {e}")),
                    }
                }
                _ = poll.tick() => {
                    if self.conn.is_some() {
                        self.read_revocations().await;
                    }
                }
                _ = tick.tick() => {
                    if self.conn.is_none() && self.connecting.is_none() && Instant::now() >= self.retry_at {
                        let target = self.spec.target.clone();
                        self.connecting = Some(tokio::spawn(async move { target.connect().await }));
                    }
                    if self.conn.is_some() && !self.spill.is_empty() {
                        self.replay().await;
                    }
                    if self.conn.is_none() && self.status.last_error.is_some() {
                        self.warn_down();
                    }
                    self.write_status();
                }
                _ = skew.tick() => self.check_clock().await,
                _ = clean.tick() => {
                    if let (Some(w), Some(c)) = (&self.spec.popbsmtp, &mut self.conn) {
                        let keep = self.spec.max_ttl + KEEP_EXPIRED_SECS;
                        if let Err(e) = timed("deleting old popbsmtp rows", w.clean(c, keep)).await {
                            tracing::warn!(error = %e, "cannot delete old popbsmtp rows");
                        }
                    }
                    if let Some(c) = &mut self.conn {
                        match timed("deleting expired rows", super::clean(c, KEEP_EXPIRED_SECS)).await {
                            Ok(n) if n > 0 => tracing::debug!(rows = n, "expired rows deleted from the database"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot delete expired rows"),
                        }
                    }
                }
            }
        }
        self.write_status();
    }

    async fn connected(&mut self, result: Result<Conn, MyError>) {
        match result {
            Ok(c) => {
                if self.status.disconnected_since.is_some() {
                    tracing::info!(database = %self.status.database, "database reachable again");
                } else {
                    tracing::info!(database = %self.status.database, "connected to the database");
                }
                self.conn = Some(c);
                if let (Some(w), Some(c)) = (&self.spec.popbsmtp, &mut self.conn) {
                    if let Err(e) = timed("creating the popbsmtp table", w.ensure(c)).await {
                        return self.down(e.to_string());
                    }
                }
                self.backoff = Duration::from_secs(1);
                self.warned_at = None;
                self.status.connected = true;
                self.status.disconnected_since = None;
                self.status.last_error = None;
                self.check_clock().await;
                // Polls were missed while away: the recent revocations, all of them.
                self.revocations_since = None;
                self.read_revocations().await;
                if !self.spill.is_empty() {
                    self.replay().await;
                }
                self.write_status();
            }
            Err(e) => self.down(e.to_string()),
        }
    }

    async fn check_clock(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let before = timefmt::now_f64();
        let db_now = match timed("reading the database's clock", super::db_now(c)).await {
            Ok(v) => v,
            Err(e) => return self.down(e.to_string()),
        };
        let after = timefmt::now_f64();
        let skew = (before + after) / 2.0 - db_now;
        self.skew = if skew.abs() < 1.0 { 0.0 } else { skew };
        self.status.clock_skew_secs = Some((skew * 1000.0).round() / 1000.0);
    }

    async fn read_revocations(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let read = super::revocations_since(c, self.revocations_since, self.spec.max_ttl);
        let (rows, seq) = match timed("reading revocations", read).await {
            Ok(v) => v,
            Err(e) => return self.down(e.to_string()),
        };
        self.revocations_since = Some(seq);
        if rows.is_empty() {
            return;
        }
        let skew = self.skew;
        let got: Vec<(IpAddr, i64)> = rows
            .into_iter()
            .filter_map(|(a, at)| Some((parse_address(&a)?, (at + skew).ceil() as i64)))
            .collect();
        self.status.revocations_seen += got.len() as u64;
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        pending.extend(got);
        if pending.len() > MAX_PENDING_REVOCATIONS {
            tracing::warn!(
                waiting = pending.len(),
                "too many revocations waiting for the engine; the oldest are dropped"
            );
            let cut = pending.len() - MAX_PENDING_REVOCATIONS;
            pending.drain(..cut);
        }
    }

    fn down(&mut self, why: String) {
        if let Some(c) = self.conn.take() {
            // Not waited for: a hung server must not hold the worker.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(QUERY_TIMEOUT, c.disconnect()).await;
            });
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.status.connected = false;
        self.status.disconnected_since.get_or_insert(timefmt::now());
        self.status.last_error = Some(why);
        self.warn_down();
    }

    fn warn_down(&mut self) {
        if self.warned_at.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.warned_at = Some(Instant::now());
        if self.status.behind {
            tracing::error!(
                database = %self.status.database,
                error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
                waiting = self.spill.len(),
                dropped = self.status.dropped_total,
                queue = %self.spill.path().display(),
                "database copy behind: the database is unreachable and the spill queue is full; new logins are committed to the local map, but the oldest grants waiting for the database were dropped; fix the database or raise [store] spill_max_grants"
            );
            return;
        }
        tracing::warn!(
            database = %self.status.database,
            error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
            waiting = self.spill.len(),
            queue = %self.spill.path().display(),
            "database unreachable: commits are kept in the spill queue and written when it returns; check the database and [store] mysql_url_file"
        );
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Commit(grants, reply) => {
                let r = self.commit(grants).await;
                let _ = reply.send(r);
            }
            Request::Revoke(ip, reply) => {
                let r = match &mut self.conn {
                    None => Err(MyError::Unreachable("cannot revoke everywhere".into())),
                    Some(c) => {
                        timed(
                            "revoking",
                            super::revoke(c, ip, self.spec.popbsmtp.as_ref()),
                        )
                        .await
                    }
                };
                if let Err(e) = &r {
                    if !matches!(e, MyError::Unreachable(_)) {
                        self.down(e.to_string());
                    }
                }
                let _ = reply.send(r);
            }
            Request::Set(ip, e, reply) => {
                let (ttl, origin) = (self.spec.max_ttl, self.spec.origin.clone());
                let r = match &mut self.conn {
                    None => Err(MyError::Unreachable("cannot grant everywhere".into())),
                    Some(c) => timed("granting", super::set(c, ip, e, ttl, &origin)).await,
                };
                let _ = reply.send(r);
            }
        }
    }

    async fn commit(&mut self, grants: Vec<(IpAddr, i64)>) -> Result<Committed, MyError> {
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

    fn behind(&mut self, lost: usize) {
        self.status.dropped_total += lost as u64;
        if !self.status.behind {
            self.warned_at = None;
        }
        self.status.behind = true;
        self.warn_down();
    }

    /// `upsert`, telling refused data from an outage: a refused batch is written address
    /// by address, and those refused again are dropped with an ERROR naming them.
    async fn upsert_checked(&mut self, grants: &[(IpAddr, i64)]) -> Result<Upserted, MyError> {
        let (ttl, skew, origin) = (self.spec.max_ttl, self.skew, self.spec.origin.clone());
        let wiki = self.spec.popbsmtp.clone();
        let Some(c) = &mut self.conn else {
            return Err(MyError::Unreachable("not connected".into()));
        };
        match timed(
            "writing grants",
            super::upsert(c, grants, ttl, skew, &origin, wiki.as_ref()),
        )
        .await
        {
            Ok(v) => return Ok(v),
            Err(e) if e.is_data_error() => {
                tracing::warn!(error = %e, grants = grants.len(), "the database refused a batch of grants; writing them one by one");
            }
            Err(e) => return Err(e),
        }
        let mut out = Upserted::default();
        for &g in grants {
            match timed(
                "writing a grant",
                super::upsert(c, &[g], ttl, skew, &origin, wiki.as_ref()),
            )
            .await
            {
                Ok(v) => {
                    out.written.extend(v.written);
                    out.revoked.extend(v.revoked);
                }
                Err(e) if e.is_data_error() => {
                    tracing::error!(address = %g.0, error = %e, "the database refused this grant; it is kept in the local map only (not shared)");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

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
