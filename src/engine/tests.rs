//! The engine with an in-memory store: bookkeeping with plain values, and the loop on
//! paused tokio time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::model::SeenLogin;
use crate::state::Checkpoint;
use crate::store::ExpireOutcome;

/// What the in-memory store holds and how it behaves; shared with the test.
#[derive(Default)]
struct Mem {
    map: HashMap<IpAddr, i64>,
    commits: usize,
    snapshots: usize,
    /// Another writer changed it since the last snapshot.
    dirty: bool,
    /// The next operation finds the "file" replaced: empty, and says Reopened once.
    reopen_next: bool,
    fail_expire: bool,
    fail_read: bool,
    fail_upsert: bool,
}

#[derive(Default, Clone)]
struct MemStore(Arc<Mutex<Mem>>);

impl MemStore {
    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.0.lock().unwrap()
    }

    fn reopened(&self) -> Result<(), StoreError> {
        let mut m = self.mem();
        if std::mem::take(&mut m.reopen_next) {
            m.map.clear();
            return Err(StoreError::new("replaced", Cause::Reopened));
        }
        Ok(())
    }
}

impl CommitStore for MemStore {
    fn upsert(&mut self, g: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        self.reopened()?;
        let mut m = self.mem();
        if m.fail_upsert {
            return Err(StoreError::new(
                "relay.lmdb: cannot lock for writing",
                Cause::Io(std::io::ErrorKind::WouldBlock),
            ));
        }
        m.commits += 1;
        Ok(g.iter()
            .map(|&(ip, e)| {
                let v = m.map.entry(ip).or_insert(e);
                *v = (*v).max(e);
                (ip, *v)
            })
            .collect())
    }

    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        self.reopened()?;
        let mut m = self.mem();
        if m.fail_expire {
            return Err(StoreError::new(
                "disk full",
                Cause::Io(std::io::ErrorKind::StorageFull),
            ));
        }
        let mut o = ExpireOutcome::default();
        for ip in ips {
            match m.map.get(ip).copied() {
                Some(e) if e <= now => {
                    m.map.remove(ip);
                    o.removed.push(*ip);
                }
                Some(e) => o.extended.push((*ip, e)),
                None => {}
            }
        }
        Ok(o)
    }

    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        let mut m = self.mem();
        let n = m.map.len();
        m.map.retain(|_, e| *e > now);
        Ok(n - m.map.len())
    }

    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let mut m = self.mem();
        if m.fail_read {
            return Err(StoreError::new("cannot lock", Cause::Other));
        }
        m.snapshots += 1;
        m.dirty = false;
        Ok(m.map.iter().map(|(&ip, &e)| (ip, e)).collect())
    }

    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        self.reopened()?;
        Ok(Some(self.mem().dirty))
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        Ok(self.mem().map.remove(&ip).is_some())
    }

    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let map = &mut self.mem().map;
        Ok(crate::store::dry::cap_in_memory(map, ips, limit))
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
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
                detail: None,
            })
            .collect(),
        ends: vec![],
        position: Some(Position::File(Checkpoint {
            path: "/x".into(),
            files: vec![],
        })),
    }
}

fn engine(store: &MemStore, dir: &std::path::Path, ttl: u64, now: i64) -> Engine<MemStore> {
    let policy = Policy::new(vec![], Duration::from_secs(ttl));
    Engine::new(store.clone(), policy, CheckpointDir::new(dir), now).unwrap()
}

#[test]
fn batches_slides_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    store.mem().map.insert(ip("198.51.100.9"), 10); // already expired at start
    let mut e = engine(&store, dir.path(), 1800, 1000);
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
    e.flush(1001).unwrap();
    // Many logins, one commit.
    assert_eq!(store.mem().commits, 1);
    assert_eq!(e.active(), 3);
    assert!(dir.path().join("checkpoints").exists());
    // A small extension is not rewritten; a large one is (sliding expiry).
    e.accept(batch(&[("192.0.2.1", 1010)]), 1010);
    e.flush(1010).unwrap();
    assert_eq!(store.mem().commits, 1);
    e.accept(batch(&[("192.0.2.1", 1500)]), 1500);
    e.flush(1500).unwrap();
    assert_eq!(store.mem().commits, 2);
    assert_eq!(e.next_deadline(), Some(2800));
    assert_eq!(e.expire_due(2800).unwrap(), 1);
    assert_eq!(e.expire_due(2801).unwrap(), 1);
    assert_eq!(e.active(), 1);
    assert_eq!(e.next_deadline(), Some(3300));
    // Replayed old logins grant nothing.
    e.accept(batch(&[("192.0.2.7", 100)]), 4000);
    assert_eq!(e.counters.expired_logins, 1);
}

/// Defect 1: an expiry beyond now + ttl (a wrong clock) is capped in the map itself, at
/// start and when another writer's change is read.
#[test]
fn far_future_expiries_are_capped_in_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let year = 365 * 86400;
    store.mem().map.insert(ip("192.0.2.1"), 1000 + year);
    store.mem().map.insert(ip("192.0.2.2"), 1500);
    let mut e = engine(&store, dir.path(), 1800, 1000);
    assert_eq!(
        store.mem().map[&ip("192.0.2.1")],
        2800,
        "rewritten in the map"
    );
    assert_eq!(
        store.mem().map[&ip("192.0.2.2")],
        1500,
        "within the ttl: kept"
    );
    assert_eq!(e.view().find(ip("192.0.2.1"), 1000), Lookup::Found(2800));
    assert_eq!(e.next_deadline(), Some(1500));
    // Another writer adds one under a wrong clock while we run.
    {
        let mut m = store.mem();
        m.map.insert(ip("192.0.2.3"), 5000 + year);
        m.dirty = true;
    }
    assert!(e.poll(2000, false).unwrap());
    assert_eq!(store.mem().map[&ip("192.0.2.3")], 3800);
    assert_eq!(e.view().find(ip("192.0.2.3"), 2000), Lookup::Found(3800));
    // A longer hold (a later feature) raises the cap.
    e.set_longest_hold(7200);
    assert_eq!(e.max_lifetime(), 7200);
}

/// Defect 4 and issue 14: the store is re-read only when another writer changed it; a
/// re-read makes revokes and manual grants visible in the view.
#[test]
fn rereads_only_when_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    store.mem().map.insert(ip("192.0.2.1"), 2000);
    let mut e = engine(&store, dir.path(), 1800, 1000);
    let reads = store.mem().snapshots;
    for _ in 0..10 {
        assert!(!e.poll(1000, false).unwrap());
    }
    assert_eq!(store.mem().snapshots, reads, "no listing while unchanged");
    {
        let mut m = store.mem();
        m.map.remove(&ip("192.0.2.1"));
        m.map.insert(ip("192.0.2.9"), 2500);
        m.dirty = true;
    }
    assert!(e.poll(1000, false).unwrap());
    assert_eq!(e.view().find(ip("192.0.2.1"), 1000), Lookup::Absent);
    assert_eq!(e.view().find(ip("192.0.2.9"), 1000), Lookup::Found(2500));
    assert_eq!(e.next_deadline(), Some(2500));
}

/// Defect 9: when the store was reopened (the map deleted or replaced), the live grants
/// are written again before the pending ones, and checkpoints move only after.
#[test]
fn reopened_store_gets_the_live_grants_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut e = engine(&store, dir.path(), 1800, 1000);
    e.accept(batch(&[("192.0.2.1", 1000), ("192.0.2.2", 1000)]), 1000);
    e.flush(1000).unwrap();
    store.mem().reopen_next = true;
    e.accept(batch(&[("192.0.2.3", 1100)]), 1100);
    e.flush(1100).unwrap();
    let m = store.mem();
    assert_eq!(m.map.len(), 3, "live grants rewritten: {:?}", m.map);
    assert!(!e.has_pending());
}

/// A test clock: a fixed wall-clock start plus tokio's (paused) elapsed time.
struct PausedClock {
    base: Duration,
    start: tokio::time::Instant,
}

impl PausedClock {
    fn new(base_secs: u64) -> PausedClock {
        PausedClock {
            base: Duration::from_secs(base_secs),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for PausedClock {
    fn now(&self) -> Duration {
        self.base + self.start.elapsed()
    }
}

const BASE: i64 = 1_800_000_000;
const INTERVAL: Duration = Duration::from_millis(250);

fn pace() -> Pace {
    Pace {
        commit_interval: INTERVAL,
        heartbeat: Duration::from_secs(5),
        probe: Duration::from_millis(250),
        resync: Duration::from_secs(60),
        retry: Duration::from_secs(1),
    }
}

/// The loop in a task on paused time; returns the batch sender, the stop switch and the
/// task's handle.
struct Running {
    tx: tokio::sync::mpsc::Sender<Batch>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<(Engine<MemStore>, Result<Exit, StoreError>)>,
    view: GrantsView,
}

fn start(store: &MemStore, dir: &std::path::Path, ttl: u64) -> Running {
    let mut e = engine(store, dir, ttl, BASE);
    let view = e.view();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let clock = PausedClock::new(BASE as u64);
        let control = async move {
            let _ = stopped.await;
            Exit::Shutdown
        };
        let r = drive(&mut e, &mut rx, pace(), &clock, control, &mut |_| {}).await;
        (e, r)
    });
    Running {
        tx,
        stop: Some(stop),
        task,
        view,
    }
}

fn now_secs(start: tokio::time::Instant) -> i64 {
    BASE + i64::try_from(start.elapsed().as_secs()).unwrap()
}

/// Lets the loop run everything that is due now, without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn commits_at_once_when_idle_then_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut r = start(&store, dir.path(), 1800);
    let t0 = tokio::time::Instant::now();
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    assert_eq!(store.mem().commits, 1, "a lone login is committed at once");
    assert_eq!(t0.elapsed(), Duration::ZERO);
    r.tx.send(batch(&[("192.0.2.2", BASE)])).await.unwrap();
    r.tx.send(batch(&[("192.0.2.3", BASE)])).await.unwrap();
    settle().await;
    assert_eq!(store.mem().commits, 1, "the next waits for the interval");
    tokio::time::sleep(INTERVAL / 2).await;
    assert_eq!(store.mem().commits, 1);
    tokio::time::sleep(INTERVAL / 2).await;
    settle().await;
    assert_eq!(store.mem().commits, 2, "both in one commit");
    assert_eq!(store.mem().map.len(), 3);
    r.stop.take().unwrap().send(()).unwrap();
    let (_, exit) = r.task.await.unwrap();
    assert_eq!(exit.unwrap(), Exit::Shutdown);
}

/// Issue 14: a flush that only writes checkpoints (background log lines) does not start
/// the commit interval: the next login is committed at once.
#[tokio::test(start_paused = true)]
async fn checkpoint_only_flush_does_not_delay_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let r = start(&store, dir.path(), 1800);
    let noise = Batch {
        logins: vec![],
        ..batch(&[])
    };
    r.tx.send(noise).await.unwrap();
    settle().await;
    assert!(
        dir.path().join("checkpoints").exists(),
        "checkpoint written"
    );
    let t0 = tokio::time::Instant::now();
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    assert_eq!(store.mem().commits, 1);
    assert_eq!(t0.elapsed(), Duration::ZERO, "committed without waiting");
}

#[tokio::test(start_paused = true)]
async fn expires_on_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let r = start(&store, dir.path(), 10);
    let t0 = tokio::time::Instant::now();
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    assert_eq!(r.view.find(ip("192.0.2.1"), BASE), Lookup::Found(BASE + 10));
    tokio::time::sleep(Duration::from_millis(9_990)).await;
    settle().await;
    assert!(store.mem().map.contains_key(&ip("192.0.2.1")), "not before");
    tokio::time::sleep(Duration::from_millis(20)).await;
    settle().await;
    assert!(store.mem().map.is_empty(), "removed at the deadline");
    assert_eq!(now_secs(t0), BASE + 10);
}

/// Defect 19's retry: a failing expiry is retried (once a second) until it works.
#[tokio::test(start_paused = true)]
async fn failing_expiry_is_retried_until_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let r = start(&store, dir.path(), 10);
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    store.mem().fail_expire = true;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(store.mem().map.contains_key(&ip("192.0.2.1")));
    store.mem().fail_expire = false;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    assert!(store.mem().map.is_empty(), "removed once the store works");
}

/// Runs the loop once until `exit` is asked for (the loop has seen `logins` first).
async fn drive_until(
    e: &mut Engine<MemStore>,
    exit: Exit,
    logins: &[(&str, i64)],
) -> Result<Exit, StoreError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tx.send(batch(logins)).await.unwrap();
    let clock = PausedClock::new(BASE as u64);
    let control = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        exit
    };
    drive(e, &mut rx, pace(), &clock, control, &mut |_| {}).await
}

/// A SIGHUP while commits fail does not stop the daemon: the reload returns Ok with the
/// grants still pending, and the loop after it commits them; only a shutdown reports the
/// failure.
#[tokio::test(start_paused = true)]
async fn reload_while_commits_fail_keeps_the_pending_grants() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut e = engine(&store, dir.path(), 1800, BASE);
    store.mem().fail_upsert = true;
    let exit = drive_until(&mut e, Exit::Reload, &[("192.0.2.1", BASE)]).await;
    assert_eq!(exit.unwrap(), Exit::Reload);
    assert!(
        e.has_pending_grants(),
        "the login is kept for after the reload"
    );
    assert!(store.mem().map.is_empty());
    assert!(
        !dir.path().join("checkpoints").exists(),
        "no checkpoint before its commit"
    );
    let exit = drive_until(&mut e, Exit::Shutdown, &[("192.0.2.2", BASE)]).await;
    assert!(exit.is_err(), "a shutdown reports the failed final commit");
    assert!(e.has_pending_grants());
    store.mem().fail_upsert = false;
    let exit = drive_until(&mut e, Exit::Shutdown, &[]).await;
    assert_eq!(exit.unwrap(), Exit::Shutdown);
    assert!(!e.has_pending());
    let m = store.mem();
    assert!(m.map.contains_key(&ip("192.0.2.1")) && m.map.contains_key(&ip("192.0.2.2")));
}

#[tokio::test(start_paused = true)]
async fn drains_and_commits_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut r = start(&store, dir.path(), 1800);
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    // Sent, and the stop comes before the interval allows another commit.
    r.tx.send(batch(&[("192.0.2.2", BASE)])).await.unwrap();
    r.tx.send(batch(&[("192.0.2.3", BASE)])).await.unwrap();
    r.stop.take().unwrap().send(()).unwrap();
    let (e, exit) = r.task.await.unwrap();
    assert_eq!(exit.unwrap(), Exit::Shutdown);
    assert_eq!(store.mem().map.len(), 3);
    assert!(!e.has_pending());
}

/// Defect 4: another writer's revoke reaches the view within one probe interval.
#[tokio::test(start_paused = true)]
async fn other_writers_changes_reach_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let r = start(&store, dir.path(), 1800);
    r.tx.send(batch(&[("192.0.2.1", BASE)])).await.unwrap();
    settle().await;
    assert!(matches!(
        r.view.find(ip("192.0.2.1"), BASE),
        Lookup::Found(_)
    ));
    {
        let mut m = store.mem();
        m.map.remove(&ip("192.0.2.1"));
        m.map.insert(ip("192.0.2.8"), BASE + 600);
        m.dirty = true;
    }
    tokio::time::sleep(pace().probe).await;
    settle().await;
    assert_eq!(r.view.find(ip("192.0.2.1"), BASE), Lookup::Absent);
    assert_eq!(
        r.view.find(ip("192.0.2.8"), BASE),
        Lookup::Found(BASE + 600)
    );
}

/// A map known to have changed that cannot be re-read makes lookups unsure (socketmap
/// answers TEMP) until a re-read works.
#[test]
fn view_is_unsure_while_a_needed_reread_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    store.mem().map.insert(ip("192.0.2.1"), 2000);
    let mut e = engine(&store, dir.path(), 1800, 1000);
    assert_eq!(e.view().find(ip("192.0.2.1"), 1000), Lookup::Found(2000));
    {
        let mut m = store.mem();
        m.map.remove(&ip("192.0.2.1"));
        m.dirty = true;
        m.fail_read = true;
    }
    assert!(e.poll(1000, false).is_err());
    assert_eq!(
        e.view().find(ip("192.0.2.1"), 1000),
        Lookup::Unsure { guess: Some(2000) }
    );
    store.mem().fail_read = false;
    assert!(e.poll(1000, false).unwrap());
    assert_eq!(e.view().find(ip("192.0.2.1"), 1000), Lookup::Absent);
}

/// Defect 1 while running: the clock steps back (a fault fixed); grants written under the
/// wrong clock are capped at the next probe.
#[test]
fn clock_stepping_back_caps_our_own_grants() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let year = 365 * 86400;
    let mut e = engine(&store, dir.path(), 1800, 1000 + year);
    e.accept(batch(&[("192.0.2.1", 1000 + year)]), 1000 + year);
    e.flush(1000 + year).unwrap();
    assert!(!e.poll(1000 + year, false).unwrap(), "nothing to do");
    assert!(e.poll(1000, false).unwrap());
    assert_eq!(store.mem().map[&ip("192.0.2.1")], 2800);
    assert_eq!(e.next_deadline(), Some(2800));
}

fn session_login(ip_text: &str, t: i64, id: &str, pid: u32) -> Batch {
    let mut b = batch(&[(ip_text, t)]);
    let mut start = crate::model::SessionStart::new(id, Some(pid)).unwrap();
    start.source = "log".into();
    start.user = Some("alice".into());
    b.logins[0].session = Some(start);
    b
}

fn session_end(id: &str, pid: u32, t: i64) -> Batch {
    let mut b = batch(&[]);
    b.ends.push(crate::model::SessionEnd {
        service: "imap".into(),
        id: Some(id.into()),
        pid: Some(pid),
        user: Some("alice".into()),
        time: Some(t),
        source: "log".into(),
        trusted: true,
        exact: false,
    });
    b
}

/// A host where every session's process is alive and its own.
struct AllAlive;
impl crate::session::Probe for AllAlive {
    fn check(
        &mut self,
        _: &crate::session::evidence::Claim<'_>,
        _: i64,
    ) -> crate::session::Evidence {
        crate::session::Evidence::Process
    }
}

fn sources() -> Vec<String> {
    vec!["log".into()]
}

/// An IMAP session that stays open keeps its grant for three times the ttl, then loses
/// it ttl after its end; the open session survives a kill -9 (saved beside the
/// checkpoints before them).
#[test]
fn open_sessions_hold_their_grant_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let ttl = 60;
    let mut e = engine(&store, dir.path(), ttl, 1000);
    e.set_session_hold(3600, &sources(), 1000);
    e.set_session_evidence(Box::new(AllAlive), 60);
    e.accept(session_login("192.0.2.1", 1000, "abc", 7), 1000);
    e.flush(1000).unwrap();
    assert_eq!(store.mem().map.get(&ip("192.0.2.1")), Some(&1060));
    // Renewals while the session lasts: the grant never lapses.
    let mut t = 1000;
    while t < 1000 + 3 * ttl as i64 {
        t = e.next_session_due().unwrap();
        e.renew_sessions(t);
        e.flush(t).unwrap();
        e.expire_due(t).unwrap();
        let exp = store.mem().map.get(&ip("192.0.2.1")).copied();
        assert!(exp.is_some_and(|x| x > t), "grant lapsed at {t}: {exp:?}");
    }
    // kill -9: a new engine on the same state directory still holds the session.
    let mut again = engine(&store, dir.path(), ttl, t);
    again.set_session_hold(3600, &sources(), t);
    assert_eq!(again.counters.sessions_open, 1);
    again.accept(session_end("abc", 7, t + 5), t + 5);
    again.flush(t + 5).unwrap();
    assert_eq!(again.counters.sessions_open, 0);
    assert_eq!(store.mem().map.get(&ip("192.0.2.1")), Some(&(t + 5 + 60)));
    assert_eq!(again.next_session_due(), None);
    again.expire_due(t + 5 + 60).unwrap();
    assert!(!store.mem().map.contains_key(&ip("192.0.2.1")));
}

/// A session whose end is never seen holds its grant no longer than the hold.
#[test]
fn a_lost_end_falls_back_to_the_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut e = engine(&store, dir.path(), 60, 1000);
    e.set_session_hold(600, &sources(), 1000);
    e.set_session_evidence(Box::new(AllAlive), 60);
    e.accept(session_login("192.0.2.2", 1000, "lost", 9), 1000);
    let mut t = 1000;
    while let Some(due) = e.next_session_due() {
        t = due;
        e.renew_sessions(t);
        e.flush(t).unwrap();
    }
    let exp = store.mem().map.get(&ip("192.0.2.2")).copied().unwrap();
    assert!(exp <= 1000 + 600, "held until {exp}, past login + hold");
    assert!(t <= 1000 + 600);
}

/// Issue 19 defect 1: a revoke (another writer removes the grant) sticks while the
/// address's IMAP session stays open: the next renewal notices the removal first, ends
/// the session, and writes nothing back.
#[test]
fn a_revoke_sticks_while_a_session_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut e = engine(&store, dir.path(), 60, 1000);
    e.set_session_hold(3600, &sources(), 1000);
    e.set_session_evidence(Box::new(AllAlive), 60);
    e.accept(session_login("192.0.2.1", 1000, "abc", 7), 1000);
    e.flush(1000).unwrap();
    // dovegate revoke: the map loses the grant.
    {
        let mut m = store.mem();
        m.map.remove(&ip("192.0.2.1"));
        m.dirty = true;
    }
    let mut t = 1000;
    while t < 1000 + 600 {
        t = e.next_session_due().unwrap_or(t + 60);
        e.renew_sessions(t);
        e.flush(t).unwrap();
        assert!(
            !store.mem().map.contains_key(&ip("192.0.2.1")),
            "revoked grant written back at {t}"
        );
    }
    assert_eq!(e.counters.sessions_open, 0);
    assert_eq!(e.counters.sessions_dropped, 1);
    // A new login grants again.
    e.accept(batch(&[("192.0.2.1", t)]), t);
    e.flush(t).unwrap();
    assert!(store.mem().map.contains_key(&ip("192.0.2.1")));
}

/// Issue 19: a lone login line naming a session, with nothing to show it open (no live
/// process, a source that ties no ends), expires ttl after the login.
#[test]
fn a_lone_session_login_expires_after_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let mut e = engine(&store, dir.path(), 60, 1000);
    e.set_session_hold(3600, &sources(), 1000);
    e.accept(session_login("192.0.2.3", 1000, "lone", 999_999), 1000);
    e.flush(1000).unwrap();
    let mut t = 1000;
    while t < 1000 + 600 {
        t = [e.next_session_due(), e.next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(1000 + 600);
        e.renew_sessions(t);
        e.flush(t).unwrap();
        e.expire_due(t).unwrap();
    }
    assert!(!store.mem().map.contains_key(&ip("192.0.2.3")));
    assert_eq!(e.counters.sessions_released_no_evidence, 1);
    assert_eq!(e.counters.session_renewals, 0);
}

/// grant.ipv6_prefix = 64: a login grants its /64 (kept under the network); the IMAP
/// session stays under the login's own address (its evidence names it) and renews the
/// /64; revoking the /64 ends it and nothing is written back.
#[test]
fn prefix_grants_are_renewed_by_sessions_inside_and_revokes_stick() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemStore::default();
    let policy = Policy::new(vec![], Duration::from_secs(60)).with_ipv6_prefix(64);
    let mut e = Engine::new(store.clone(), policy, CheckpointDir::new(dir.path()), 1000).unwrap();
    e.set_session_hold(3600, &sources(), 1000);
    e.set_session_evidence(Box::new(AllAlive), 60);
    e.accept(session_login("2001:db8:1:2::7", 1000, "abc", 7), 1000);
    e.flush(1000).unwrap();
    let net = ip("2001:db8:1:2::");
    assert_eq!(
        store.mem().map.keys().copied().collect::<Vec<_>>(),
        vec![net]
    );
    assert_eq!(
        e.view().find(ip("2001:db8:1:2::99"), 1001),
        crate::grant::Lookup::Found(1060)
    );
    let t = e.next_session_due().unwrap();
    e.renew_sessions(t);
    e.flush(t).unwrap();
    assert!(store.mem().map.get(&net).is_some_and(|&x| x > t));
    {
        let mut m = store.mem();
        m.map.remove(&net);
        m.dirty = true;
    }
    let t = e.next_session_due().unwrap();
    e.renew_sessions(t);
    e.flush(t).unwrap();
    assert!(store.mem().map.is_empty(), "revoked /64 written back");
    assert_eq!(e.counters.sessions_dropped, 1);
}
