//! The writer's PostgreSQL client on its own thread and runtime.
//!
//! The engine is synchronous and commits from its loop; a hung or unreachable database
//! must not hold it longer than a bound. The engine's side (`PgWriter`) sends requests
//! over a bounded channel and waits at most `REPLY_TIMEOUT`; the worker gives every
//! statement `QUERY_TIMEOUT`, connects in the background with a backoff, and while the
//! database is unreachable puts commits into the spill queue (fsynced), replayed in order
//! when it returns.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use super::spill::Spill;
use super::{error_text, is_data_error, Origin, Target};
use crate::timefmt;

/// A statement that takes longer is abandoned and the database treated as down.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest the engine waits for the worker (a connect or query in progress).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While the database is down, the warning is repeated this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Expired rows are kept this long for audit, then deleted.
const KEEP_EXPIRED_SECS: i64 = 24 * 3600;
/// Replayed spill grants per statement.
const REPLAY_CHUNK: usize = 5000;
/// A clock further off the database's than this is reported at each connect.
const MAX_SKEW_SECS: f64 = 5.0;

/// How a commit reached durability.
#[derive(Debug)]
pub enum Committed {
    /// In the database; the effective expiries.
    Written(Vec<(IpAddr, i64)>),
    /// In the spill queue, waiting for the database.
    Spilled,
}

enum Request {
    Commit(Vec<(IpAddr, i64)>, SyncSender<Result<Committed, String>>),
    Revoke(IpAddr, SyncSender<Result<bool, String>>),
    Set(IpAddr, i64, SyncSender<Result<(), String>>),
}

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

/// The engine's handle on the worker thread.
pub struct PgWriter {
    tx: tokio::sync::mpsc::Sender<Request>,
    max_ttl: i64,
}

/// What the worker needs.
pub struct WriterSpec {
    pub target: Target,
    pub origin: Origin,
    pub max_ttl: i64,
    pub state_dir: PathBuf,
    pub spill_max: usize,
}

impl PgWriter {
    /// Opens the spill queue and starts the worker thread (it connects in the background).
    pub fn start(spec: WriterSpec) -> Result<PgWriter, String> {
        let spill = Spill::open(&spec.state_dir, spec.spill_max)?;
        if !spill.is_empty() {
            tracing::info!(waiting = spill.len(), file = %spill.path().display(), "spilled grants from an earlier run will be written to the database");
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let max_ttl = spec.max_ttl;
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the PostgreSQL runtime; commits will fail");
                        return;
                    }
                };
                rt.block_on(Worker::new(spec, spill).run(rx));
            })
            .map_err(|e| format!("cannot start the PostgreSQL thread: {e}"))?;
        Ok(PgWriter { tx, max_ttl })
    }

    /// The longest a grant may last from now (`grant.ttl`, in seconds).
    pub fn max_ttl(&self) -> i64 {
        self.max_ttl
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, String>>) -> Request,
    ) -> Result<T, String> {
        let (reply, answer) = sync_channel(1);
        self.tx.try_send(make(reply)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => {
                "the PostgreSQL worker is busy (database hung?)".to_string()
            }
            tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                "the PostgreSQL worker has stopped".to_string()
            }
        })?;
        answer.recv_timeout(REPLY_TIMEOUT).map_err(|_| {
            format!(
                "no answer from the PostgreSQL worker within {}s",
                REPLY_TIMEOUT.as_secs()
            )
        })?
    }

    /// Writes grants to the database or, while it is down, to the spill queue.
    pub fn commit(&self, grants: &[(IpAddr, i64)]) -> Result<Committed, String> {
        let grants = grants.to_vec();
        self.ask(|r| Request::Commit(grants, r))
    }

    pub fn revoke(&self, ip: IpAddr) -> Result<bool, String> {
        self.ask(|r| Request::Revoke(ip, r))
    }

    pub fn set(&self, ip: IpAddr, expires: i64) -> Result<(), String> {
        self.ask(|r| Request::Set(ip, expires, r))
    }
}

struct Worker {
    spec: WriterSpec,
    table: String,
    spill: Spill,
    client: Option<Client>,
    connecting: Option<tokio::task::JoinHandle<Result<Client, String>>>,
    retry_at: Instant,
    backoff: Duration,
    warned_at: Option<Instant>,
    status: WriterStatus,
}

impl Worker {
    fn new(spec: WriterSpec, spill: Spill) -> Worker {
        let status = WriterStatus {
            database: spec.target.describe(),
            queue_len: spill.len(),
            queue_max: spec.spill_max,
            queue_file: spill.path().display().to_string(),
            ..WriterStatus::default()
        };
        Worker {
            table: spec.target.table(),
            spec,
            spill,
            client: None,
            connecting: None,
            retry_at: Instant::now(),
            backoff: Duration::from_secs(1),
            warned_at: None,
            status,
        }
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Request>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut clean = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => self.handle(r).await,
                    None => break,
                },
                res = async { self.connecting.as_mut().expect("guarded").await }, if self.connecting.is_some() => {
                    self.connecting = None;
                    match res {
                        Ok(Ok(client)) => self.connected(client).await,
                        Ok(Err(e)) => self.down(e),
                        Err(e) => self.down(format!("connect task failed: {e}")),
                    }
                }
                _ = tick.tick() => {
                    if self.client.as_ref().is_some_and(|c| c.is_closed()) {
                        self.down("the connection was closed".into());
                    }
                    if self.client.is_none() && self.connecting.is_none() && Instant::now() >= self.retry_at {
                        let target = self.spec.target.clone();
                        self.connecting = Some(tokio::spawn(async move { target.connect(None).await }));
                    }
                    if self.client.is_some() && !self.spill.is_empty() {
                        self.replay().await;
                    }
                    // Not before a first failure: connecting at start-up is not an outage.
                    if self.client.is_none() && self.status.last_error.is_some() {
                        self.warn_down();
                    }
                    self.write_status();
                }
                _ = clean.tick() => {
                    if let Some(c) = &self.client {
                        match tokio::time::timeout(QUERY_TIMEOUT, super::clean(c, &self.table, KEEP_EXPIRED_SECS)).await {
                            Ok(Ok(n)) if n > 0 => tracing::debug!(rows = n, "expired rows deleted from the database"),
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::warn!(error = %error_text(&e), "cannot delete expired rows"),
                            Err(_) => tracing::warn!("deleting expired rows timed out"),
                        }
                    }
                }
            }
        }
        self.write_status();
    }

    async fn connected(&mut self, client: Client) {
        if self.status.disconnected_since.is_some() {
            tracing::info!(database = %self.status.database, "database reachable again");
        } else {
            tracing::info!(database = %self.status.database, "connected to the database");
        }
        self.client = Some(client);
        self.backoff = Duration::from_secs(1);
        self.warned_at = None;
        self.status.connected = true;
        self.status.disconnected_since = None;
        self.status.last_error = None;
        self.check_clock().await;
        if !self.spill.is_empty() {
            self.replay().await;
        }
        self.write_status();
    }

    /// Warns when this host's clock is off the database's: the database caps expiries at
    /// its own now + ttl, so replicas get grants shorter (or longer) than this host writes.
    async fn check_clock(&mut self) {
        let Some(c) = &self.client else { return };
        let Ok(db_now) = timed(super::db_now(c)).await else {
            return;
        };
        let skew = chrono::Utc::now().timestamp_micros() as f64 / 1e6 - db_now;
        if skew.abs() > MAX_SKEW_SECS {
            tracing::warn!(database = %self.status.database, skew_secs = skew.round(), "this host's clock differs from the database's; grants are shortened or lengthened on the replicas: run NTP on both");
        }
    }

    /// The database failed: forget the client, retry later, say so (once now, then every
    /// `WARN_EVERY`).
    fn down(&mut self, why: String) {
        self.client = None;
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
        if self.spill.len() * 10 >= self.spec.spill_max * 9 {
            tracing::error!(
                database = %self.status.database,
                error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
                waiting = self.spill.len(),
                max = self.spec.spill_max,
                queue = %self.spill.path().display(),
                "database unreachable and the spill queue is (nearly) full: new logins are not committed (nor checkpointed) until the database returns; fix the database or raise [store] spill_max_grants"
            );
            return;
        }
        tracing::warn!(
            database = %self.status.database,
            error = self.status.last_error.as_deref().unwrap_or("not connected yet"),
            waiting = self.spill.len(),
            queue = %self.spill.path().display(),
            "database unreachable: commits are kept in the spill queue and written when it returns; check the database and [store] postgres_url_file"
        );
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Commit(grants, reply) => {
                let _ = reply.send(self.commit(grants).await);
            }
            Request::Revoke(ip, reply) => {
                let r = match &self.client {
                    None => Err("database unreachable: cannot revoke everywhere".to_string()),
                    Some(c) => timed(super::delete(c, &self.table, ip)).await,
                };
                let _ = reply.send(r);
            }
            Request::Set(ip, e, reply) => {
                let r = match &self.client {
                    None => Err("database unreachable".to_string()),
                    Some(c) => timed(super::set(c, &self.table, ip, e, &self.spec.origin)).await,
                };
                let _ = reply.send(r);
            }
        }
    }

    async fn commit(&mut self, grants: Vec<(IpAddr, i64)>) -> Result<Committed, String> {
        // Order: while older grants wait in the queue, newer ones queue behind them.
        if let (Some(c), true) = (&self.client, self.spill.is_empty()) {
            match upsert_checked(
                c,
                &self.table,
                &grants,
                self.spec.max_ttl,
                &self.spec.origin,
            )
            .await
            {
                Ok(effective) => {
                    self.status.last_commit = Some(timefmt::now());
                    return Ok(Committed::Written(effective));
                }
                Err(e) => self.down(e),
            }
        }
        self.spill.push(&grants)?;
        self.status.spilled_total += grants.len() as u64;
        self.status.queue_len = self.spill.len();
        Ok(Committed::Spilled)
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
        let Some(c) = &self.client else { return };
        let mut failed = None;
        for chunk in grants.chunks(REPLAY_CHUNK) {
            let r =
                upsert_checked(c, &self.table, chunk, self.spec.max_ttl, &self.spec.origin).await;
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            self.down(e);
            return;
        }
        if let Err(e) = self.spill.clear() {
            tracing::error!(error = %e, "cannot empty the spill queue; it will be written again");
            return;
        }
        self.status.replayed_total += grants.len() as u64;
        self.status.queue_len = 0;
        self.status.last_commit = Some(timefmt::now());
        tracing::info!(
            grants = grants.len(),
            "spilled grants written to the database"
        );
    }

    fn write_status(&mut self) {
        self.status.queue_len = self.spill.len();
        self.status.updated = timefmt::now();
        write_json(&self.spec.state_dir.join(WriterStatus::FILE), &self.status);
    }
}

/// `upsert`, telling refused data from an outage: when the database refuses the batch
/// (SQLSTATE class 22/23), each address is written alone and those refused again are
/// dropped with an ERROR naming them, so one bad row cannot keep every later commit in
/// the spill queue. An outage is an error (the caller spills).
async fn upsert_checked(
    c: &Client,
    table: &str,
    grants: &[(IpAddr, i64)],
    max_ttl: i64,
    origin: &Origin,
) -> Result<Vec<(IpAddr, i64)>, String> {
    match tokio::time::timeout(
        QUERY_TIMEOUT,
        super::upsert(c, table, grants, max_ttl, origin),
    )
    .await
    {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) if is_data_error(&e) => {
            tracing::warn!(error = %error_text(&e), grants = grants.len(), "the database refused a batch of grants; writing them one by one");
        }
        Ok(Err(e)) => return Err(error_text(&e)),
        Err(_) => return Err(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())),
    }
    let mut unique: std::collections::HashMap<IpAddr, i64> = std::collections::HashMap::new();
    for &(ip, e) in grants {
        let v = unique.entry(ip).or_insert(e);
        *v = (*v).max(e);
    }
    let mut out = Vec::with_capacity(unique.len());
    for (ip, e) in unique {
        let one = [(ip, e)];
        match tokio::time::timeout(
            QUERY_TIMEOUT,
            super::upsert(c, table, &one, max_ttl, origin),
        )
        .await
        {
            Ok(Ok(v)) => out.extend(v),
            Ok(Err(e)) if is_data_error(&e) => {
                tracing::error!(address = %ip, error = %error_text(&e), "the database refused this grant; it is kept in the local map only (not shared): check the row of this address in the table");
            }
            Ok(Err(e)) => return Err(error_text(&e)),
            Err(_) => return Err(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())),
        }
    }
    Ok(out)
}

/// Runs a statement with `QUERY_TIMEOUT`.
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_text(&e)),
        Err(_) => Err(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())),
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
