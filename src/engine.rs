//! The daemon's core: turns batches of logins into map commits, expires grants on time,
//! and advances checkpoints only behind commits.
//!
//! `Engine` is plain synchronous state (testable with values); `run` drives it from tokio:
//! batches from the sources, a commit tick (at most one map transaction per tick, whatever
//! the login rate), a timer on the next expiry deadline (no scans), and shutdown, which
//! drains what the sources already sent, commits it and writes the checkpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc::Receiver;

use crate::grant::{Decision, Policy};
use crate::source::checkpoint::{CheckpointDir, Position};
use crate::source::Batch;
use crate::store::{GrantStore, StoreError};
use crate::timefmt;

/// A read-only view of the committed grants, for servers answering lookups (socketmap).
#[derive(Debug, Clone, Default)]
pub struct GrantsView(Arc<RwLock<HashMap<IpAddr, i64>>>);

impl GrantsView {
    /// The expiry of `ip`'s grant, if it has one that has not expired at `now`.
    pub fn lookup(&self, ip: IpAddr, now: i64) -> Option<i64> {
        self.try_lookup(ip, now).unwrap_or_else(|e| e)
    }

    /// Like `lookup`, but Err when the view may be inconsistent (a writer panicked while
    /// holding it): a lookup server should answer "try again" rather than guess.
    pub fn try_lookup(&self, ip: IpAddr, now: i64) -> Result<Option<i64>, Option<i64>> {
        let found =
            |m: &HashMap<IpAddr, i64>| m.get(&ip.to_canonical()).copied().filter(|&e| e > now);
        match self.0.read() {
            Ok(m) => Ok(found(&m)),
            Err(poisoned) => Err(found(&poisoned.into_inner())),
        }
    }

    /// Adds a grant to the view only (tests of lookup servers).
    pub fn insert(&self, ip: IpAddr, expires: i64) {
        self.write().insert(ip.to_canonical(), expires);
    }

    /// The committed expiry, expired or not.
    fn committed(&self, ip: IpAddr) -> Option<i64> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<IpAddr, i64>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Grants known to be in the store, pending writes, and checkpoints waiting for a commit.
pub struct Engine<S: GrantStore> {
    store: S,
    policy: Policy,
    /// Expiry of each grant as committed (shared with lookup servers).
    grants: GrantsView,
    /// The same, ordered by deadline, for the expiry timer.
    deadlines: BTreeSet<(i64, IpAddr)>,
    pending: HashMap<IpAddr, i64>,
    pending_checkpoints: BTreeMap<usize, Position>,
    checkpoints: CheckpointDir,
    /// A login that moves an expiry by less than this is not written again.
    slack: i64,
    pub counters: Counters,
}

/// Upper bounds (seconds) of the commit latency histogram buckets.
pub const COMMIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Map commit latency: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Default, Clone)]
pub struct CommitLatency {
    pub buckets: [u64; COMMIT_BUCKETS.len()],
    pub sum_secs: f64,
    pub count: u64,
}

impl CommitLatency {
    fn record(&mut self, secs: f64) {
        if let Some(i) = COMMIT_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i] += 1;
        }
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// What the engine did, for logs, status and metrics.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub commit_latency: CommitLatency,
    pub commits: u64,
    pub granted: u64,
    pub excluded: u64,
    pub expired_logins: u64,
    pub removed: u64,
}

impl<S: GrantStore> Engine<S> {
    /// Loads the grants the store holds (the map is the source of truth for expiry) after
    /// removing those already expired.
    pub fn new(
        mut store: S,
        policy: Policy,
        checkpoints: CheckpointDir,
        now: i64,
    ) -> Result<Engine<S>, StoreError> {
        let removed = store.expire_all(now)?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed grants that expired while dovegate was not running"
            );
        }
        let grants = GrantsView::default();
        let mut deadlines = BTreeSet::new();
        for g in store.list()? {
            if let Some(e) = g.expires {
                grants.write().insert(g.ip, e);
                deadlines.insert((e, g.ip));
            }
        }
        let slack = (policy.ttl_secs() / 30).clamp(0, 60);
        Ok(Engine {
            store,
            policy,
            grants,
            deadlines,
            pending: HashMap::new(),
            pending_checkpoints: BTreeMap::new(),
            checkpoints,
            slack,
            counters: Counters {
                removed: removed as u64,
                ..Counters::default()
            },
        })
    }

    /// Grants or checkpoints wait for a flush.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.pending_checkpoints.is_empty()
    }

    pub fn active(&self) -> usize {
        self.grants.len()
    }

    /// The live grants, for lookup servers.
    pub fn view(&self) -> GrantsView {
        self.grants.clone()
    }

    /// Replaces the policy (a reloaded configuration); committed grants keep their expiry.
    pub fn set_policy(&mut self, policy: Policy) {
        self.slack = (policy.ttl_secs() / 30).clamp(0, 60);
        self.policy = policy;
    }

    /// Applies policy to a batch; grants wait for the next flush with their checkpoint.
    pub fn accept(&mut self, batch: Batch, now: i64) {
        for login in batch.logins {
            match self.policy.decide(login.ip, login.time, now) {
                Decision::Grant { ip, expires } => {
                    let known = match self.pending.get(&ip) {
                        Some(&e) => Some(e),
                        None => self.grants.committed(ip),
                    };
                    if known.is_none_or(|k| expires > k + self.slack) {
                        self.pending.insert(ip, expires.max(known.unwrap_or(0)));
                    }
                    self.counters.granted += 1;
                }
                Decision::Excluded(why) => {
                    self.counters.excluded += 1;
                    tracing::debug!(ip = %login.ip, reason = %why, "login not granted");
                }
                Decision::Expired => self.counters.expired_logins += 1,
            }
        }
        if let Some(position) = batch.position {
            self.pending_checkpoints.insert(batch.source, position);
        }
    }

    /// Commits pending grants in one transaction, then writes the checkpoints they cover.
    /// On error nothing is forgotten: the next flush retries.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            let grants: Vec<(IpAddr, i64)> = self.pending.iter().map(|(&ip, &e)| (ip, e)).collect();
            let started = std::time::Instant::now();
            let effective = self.store.upsert(&grants)?;
            self.counters
                .commit_latency
                .record(started.elapsed().as_secs_f64());
            self.counters.commits += 1;
            let mut grants = self.grants.write();
            for (ip, e) in effective {
                if let Some(old) = grants.insert(ip, e) {
                    self.deadlines.remove(&(old, ip));
                }
                self.deadlines.insert((e, ip));
            }
            drop(grants);
            self.pending.clear();
        }
        while let Some((source, cp)) = self.pending_checkpoints.pop_first() {
            if let Err(e) = self.checkpoints.save_position(&cp) {
                self.pending_checkpoints.insert(source, cp);
                return Err(StoreError(format!("cannot save checkpoint: {e}")));
            }
        }
        Ok(())
    }

    /// Re-reads the store: picks up grants written by others (`dovegate grant`, another
    /// host) so that they expire on time, and forgets revoked ones so that the next login
    /// writes them again.
    pub fn resync(&mut self) -> Result<(), StoreError> {
        let fresh: HashMap<IpAddr, i64> = self
            .store
            .list()?
            .into_iter()
            .filter_map(|g| g.expires.map(|e| (g.ip, e)))
            .collect();
        self.deadlines = fresh.iter().map(|(&ip, &e)| (e, ip)).collect();
        *self.grants.write() = fresh;
        Ok(())
    }

    /// The earliest expiry among committed grants.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|&(e, _)| e)
    }

    /// Removes grants whose deadline has come. Another writer may have extended some
    /// (the store checks); those get their new deadline.
    pub fn expire_due(&mut self, now: i64) -> Result<usize, StoreError> {
        let due: Vec<IpAddr> = self
            .deadlines
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|&(_, ip)| ip)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let out = self.store.expire(&due, now)?;
        let mut grants = self.grants.write();
        for ip in &due {
            if let Some(e) = grants.remove(ip) {
                self.deadlines.remove(&(e, *ip));
            }
        }
        for (ip, e) in out.extended {
            grants.insert(ip, e);
            self.deadlines.insert((e, ip));
        }
        drop(grants);
        self.counters.removed += out.removed.len() as u64;
        if !out.removed.is_empty() {
            tracing::debug!(count = out.removed.len(), "grants expired");
        }
        Ok(out.removed.len())
    }
}

/// How often the map is re-read for grants written by other processes.
const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Seconds (with fraction) until unix time `at`.
fn until(at: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(u64::try_from(at).unwrap_or(0)).saturating_sub(now)
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT.
    Shutdown,
    /// SIGHUP: reload the configuration and come back.
    Reload,
    /// Every source hung up.
    SourcesGone,
}

/// How often `heartbeat` runs (status, metrics); the watchdog may ask for more.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Runs the engine until `control` resolves (shutdown or reload) or every source has hung
/// up; then commits what the sources already sent. `heartbeat` runs every few seconds
/// (and at least twice per watchdog interval) from this loop, so a stalled loop stops it.
///
/// Commits are rate-limited, not ticked: the first grant after a quiet spell is committed
/// at once, and further ones wait until `commit_interval` has passed since the last
/// commit. The map sees at most one write transaction per interval, whatever the login
/// rate, and a lone login reaches it without waiting for a tick.
pub async fn run<S: GrantStore>(
    engine: &mut Engine<S>,
    rx: &mut Receiver<Batch>,
    commit_interval: Duration,
    control: impl Future<Output = Exit>,
    heartbeat: &mut (dyn FnMut(&Engine<S>) + Send),
) -> Result<Exit, StoreError> {
    use tokio::time::{sleep_until, Instant};
    tokio::pin!(control);
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.tick().await;
    let beat_every = crate::notify::watchdog_interval().map_or(HEARTBEAT, |w| w.min(HEARTBEAT));
    let mut beat = tokio::time::interval(beat_every);
    let mut last_commit = Instant::now() - commit_interval;
    let mut failing = false;
    let exit = loop {
        let deadline = engine.next_deadline();
        let expiry = tokio::time::sleep(deadline.map_or(Duration::from_secs(3600), until));
        let flush_at = engine.has_pending().then(|| last_commit + commit_interval);
        tokio::select! {
            why = &mut control => break why,
            b = rx.recv() => match b {
                Some(b) => engine.accept(b, timefmt::now()),
                None => break Exit::SourcesGone,
            },
            () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                last_commit = Instant::now();
                match tokio::task::block_in_place(|| engine.flush()) {
                    Ok(()) => failing = false,
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %e, "commit failed; will retry");
                        }
                        failing = true;
                    }
                }
            }
            _ = beat.tick() => heartbeat(engine),
            _ = resync.tick() => {
                if let Err(e) = tokio::task::block_in_place(|| engine.resync()) {
                    tracing::warn!(error = %e, "cannot re-read the map");
                }
            }
            () = expiry, if deadline.is_some() => {
                if let Err(e) = tokio::task::block_in_place(|| engine.expire_due(timefmt::now())) {
                    tracing::error!(error = %e, "expiry failed; will retry");
                    tokio::time::sleep(commit_interval).await;
                }
            }
        }
    };
    // Drain: what the sources already sent is committed before returning.
    while let Ok(b) = rx.try_recv() {
        engine.accept(b, timefmt::now());
    }
    tokio::task::block_in_place(|| engine.flush())?;
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SeenLogin;
    use crate::store::{ExpireOutcome, StoredGrant};

    /// An in-memory store to test the engine's bookkeeping with plain values.
    #[derive(Default)]
    struct MemStore {
        map: HashMap<IpAddr, i64>,
        commits: usize,
    }

    impl GrantStore for MemStore {
        fn upsert(&mut self, g: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
            self.commits += 1;
            Ok(g.iter()
                .map(|&(ip, e)| {
                    let v = self.map.entry(ip).or_insert(e);
                    *v = (*v).max(e);
                    (ip, *v)
                })
                .collect())
        }
        fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
            let mut o = ExpireOutcome::default();
            for ip in ips {
                match self.map.get(ip).copied() {
                    Some(e) if e <= now => {
                        self.map.remove(ip);
                        o.removed.push(*ip);
                    }
                    Some(e) => o.extended.push((*ip, e)),
                    None => {}
                }
            }
            Ok(o)
        }
        fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
            let n = self.map.len();
            self.map.retain(|_, e| *e > now);
            Ok(n - self.map.len())
        }
        fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
            Ok(self
                .map
                .iter()
                .map(|(&ip, &e)| StoredGrant {
                    ip,
                    expires: Some(e),
                    value: String::new(),
                })
                .collect())
        }
        fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
            Ok(self.map.get(&ip).map(|e| e.to_string()))
        }
        fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
            Ok(self.map.remove(&ip).is_some())
        }
        fn set(&mut self, ip: IpAddr, e: i64) -> Result<(), StoreError> {
            self.map.insert(ip, e);
            Ok(())
        }
    }

    fn batch(logins: &[(&str, i64)]) -> Batch {
        Batch {
            source: 0,
            logins: logins
                .iter()
                .map(|(ip, t)| SeenLogin {
                    ip: ip.parse().unwrap(),
                    time: Some(*t),
                    session: None,
                })
                .collect(),
            ends: vec![],
            position: Some(Position::File(crate::source::checkpoint::Checkpoint {
                path: "/x".into(),
                files: vec![],
            })),
        }
    }

    #[test]
    fn batches_slides_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MemStore::default();
        store.map.insert("198.51.100.9".parse().unwrap(), 10); // already expired at start
        let policy = Policy::new(vec![], Duration::from_secs(1800));
        let mut e = Engine::new(store, policy, CheckpointDir::new(dir.path()), 1000).unwrap();
        assert_eq!(e.active(), 0);
        e.accept(
            batch(&[
                ("192.0.2.1", 1000),
                ("192.0.2.1", 1001),
                ("127.0.0.1", 1000),
                ("192.0.2.2", 1000),
            ]),
            1001,
        );
        e.accept(batch(&[("192.0.2.3", 1001)]), 1001);
        e.flush().unwrap();
        // Many logins, one commit.
        assert_eq!(e.store.commits, 1);
        assert_eq!(e.active(), 3);
        assert!(dir.path().join("checkpoints").exists());
        // A small extension is not rewritten; a large one is (sliding expiry).
        e.accept(batch(&[("192.0.2.1", 1010)]), 1010);
        e.flush().unwrap();
        assert_eq!(e.store.commits, 1);
        e.accept(batch(&[("192.0.2.1", 1500)]), 1500);
        e.flush().unwrap();
        assert_eq!(e.store.commits, 2);
        assert_eq!(e.next_deadline(), Some(2800));
        assert_eq!(e.expire_due(2800).unwrap(), 1);
        assert_eq!(e.expire_due(2801).unwrap(), 1);
        assert_eq!(e.active(), 1);
        assert_eq!(e.next_deadline(), Some(3300));
        // Replayed old logins grant nothing.
        e.accept(batch(&[("192.0.2.7", 100)]), 4000);
        assert_eq!(e.counters.expired_logins, 1);
    }
}
