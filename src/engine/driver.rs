//! The engine's event loop: batches from the sources, rate-limited commits, expiry on the
//! deadline, a cheap check for other writers' changes, the heartbeat, and a drain on
//! shutdown. Its clock and heartbeat are arguments, so that tests run it on paused time.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::{sleep_until, Instant};

use super::alarm::Alarm;
use super::Engine;
use crate::model::Batch;
use crate::store::{CommitStore, StoreError};

/// Wall-clock time, for the login times and expiries the engine compares.
pub trait Clock: Send + Sync {
    /// Time since the Unix epoch.
    fn now(&self) -> Duration;

    fn secs(&self) -> i64 {
        i64::try_from(self.now().as_secs()).unwrap_or(i64::MAX)
    }

    /// How long until unix second `at` (zero when past).
    fn until(&self, at: i64) -> Duration {
        Duration::from_secs(u64::try_from(at).unwrap_or(0)).saturating_sub(self.now())
    }
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        crate::timefmt::system_time()
    }
}

/// How often the loop does each thing.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// At most one map commit per interval; checkpoint writes alone are limited apart.
    pub commit_interval: Duration,
    pub heartbeat: Duration,
    /// How often the store is asked whether another writer changed it (for the LMDB map
    /// a look at the meta page: no listing, no lock).
    pub probe: Duration,
    /// How often a store that cannot tell is re-read anyway.
    pub resync: Duration,
    /// Wait before retrying a failed expiry.
    pub retry: Duration,
}

/// How often `heartbeat` runs (status, metrics) at most; the watchdog may ask for more.
const HEARTBEAT: Duration = Duration::from_secs(5);

impl Pace {
    pub fn new(commit_interval: Duration) -> Pace {
        Pace {
            commit_interval,
            heartbeat: crate::notify::watchdog_interval().map_or(HEARTBEAT, |w| w.min(HEARTBEAT)),
            probe: Duration::from_millis(250),
            resync: Duration::from_secs(60),
            retry: Duration::from_secs(1),
        }
    }
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

/// `drive` with the system clock and the default pace.
pub async fn run<S: CommitStore>(
    engine: &mut Engine<S>,
    rx: &mut Receiver<Batch>,
    commit_interval: Duration,
    control: impl Future<Output = Exit>,
    heartbeat: &mut (dyn FnMut(&Engine<S>) + Send),
) -> Result<Exit, StoreError> {
    drive(
        engine,
        rx,
        Pace::new(commit_interval),
        &SystemClock,
        control,
        heartbeat,
    )
    .await
}

/// Blocking store work: off the async worker on a multi-thread runtime (the daemon),
/// inline on a current-thread one (tests on paused time).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs the engine until `control` resolves (shutdown or reload) or every source has hung
/// up; then commits what the sources already sent. `heartbeat` runs every `pace.heartbeat`
/// from this loop, so a stalled loop stops it (and the watchdog notices).
///
/// Commits are rate-limited, not ticked: the first grant after a quiet spell is committed
/// at once, and further ones wait until `commit_interval` has passed since the last map
/// commit. Writing checkpoints alone (background log lines) does not start that interval.
pub async fn drive<S: CommitStore>(
    engine: &mut Engine<S>,
    rx: &mut Receiver<Batch>,
    pace: Pace,
    clock: &dyn Clock,
    control: impl Future<Output = Exit>,
    heartbeat: &mut (dyn FnMut(&Engine<S>) + Send),
) -> Result<Exit, StoreError> {
    tokio::pin!(control);
    let mut beat = tokio::time::interval(pace.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(pace.probe);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    let mut last_read = Instant::now();
    let mut last_commit: Option<Instant> = None;
    let mut last_checkpoint: Option<Instant> = None;
    let mut expiry_retry: Option<Instant> = None;
    let mut commit_alarm = Alarm::new("map commit");
    let mut expiry_alarm = Alarm::new("expiry");
    let mut read_alarm = Alarm::new("re-reading the map");
    let exit = loop {
        let now = Instant::now();
        let expiry_at = engine.next_deadline().map(|d| {
            let at = now + clock.until(d);
            expiry_retry.map_or(at, |r| at.max(r))
        });
        let flush_at = if engine.has_pending_grants() {
            Some(last_commit.map_or(now, |t| t + pace.commit_interval))
        } else if engine.has_pending() {
            Some(last_checkpoint.map_or(now, |t| t + pace.commit_interval))
        } else {
            None
        };
        let renew_at = engine.next_session_due().map(|d| now + clock.until(d));
        tokio::select! {
            why = &mut control => break why,
            () = sleep_until(renew_at.unwrap_or(now)), if renew_at.is_some() => {
                // It may re-read the map and probe processes: off the async worker.
                blocking(|| engine.renew_sessions(clock.secs()));
            }
            b = rx.recv() => match b {
                Some(b) => engine.accept(b, clock.secs()),
                None => break Exit::SourcesGone,
            },
            () = sleep_until(flush_at.unwrap_or(now)), if flush_at.is_some() => {
                let started = Instant::now();
                let commits = engine.has_pending_grants();
                match blocking(|| engine.flush(clock.secs())) {
                    Ok(()) => commit_alarm.ok(),
                    Err(e) => commit_alarm.fail(&e),
                };
                if commits {
                    last_commit = Some(started);
                }
                last_checkpoint = Some(started);
            }
            _ = beat.tick() => heartbeat(engine),
            _ = probe.tick() => {
                let periodic = last_read.elapsed() >= pace.resync;
                match blocking(|| engine.poll(clock.secs(), periodic)) {
                    Ok(read) => {
                        read_alarm.ok();
                        if read {
                            last_read = Instant::now();
                        }
                    }
                    Err(e) => {
                        read_alarm.fail(&e);
                    }
                }
            }
            () = sleep_until(expiry_at.unwrap_or(now)), if expiry_at.is_some() => {
                match blocking(|| engine.expire_due(clock.secs())) {
                    Ok(_) => {
                        expiry_alarm.ok();
                        expiry_retry = None;
                    }
                    Err(e) => {
                        expiry_alarm.fail(&e);
                        expiry_retry = Some(Instant::now() + pace.retry);
                    }
                }
            }
        }
    };
    // Drain: what the sources already sent is committed before returning.
    while let Ok(b) = rx.try_recv() {
        engine.accept(b, clock.secs());
    }
    match blocking(|| engine.flush(clock.secs())) {
        Ok(()) => Ok(exit),
        // A reload comes back to this loop with the same engine: what is pending stays
        // pending and is retried after it; only a real exit reports the failure.
        Err(e) if exit == Exit::Reload => {
            tracing::error!(error = %e, "map commit failed before the reload; the pending grants and checkpoints are kept and retried after it");
            Ok(exit)
        }
        Err(e) => Err(e),
    }
}
