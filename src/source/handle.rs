//! A running source as a value: it stops its thread, kills its child process through the
//! `Child` it owns (never by pid: pids are reused), and joins. A source thread that dies
//! (panics, or returns an error it cannot recover from) reports it, and the daemon exits
//! non-zero so that systemd's `Restart=on-failure` acts.

use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::error::{SourceDeath, SourceError};
use crate::telemetry::{Report, Reporter};

/// The child process a source runs (journalctl), reachable by its handle to kill it.
pub type ChildSlot = Arc<Mutex<Option<Child>>>;

/// Where a dying source says why (the daemon's main loop listens).
pub type Deaths = tokio::sync::mpsc::UnboundedSender<SourceDeath>;

/// What a source thread is asked to watch: the stop flag and its wake-up channel.
#[derive(Clone)]
pub struct StopSignal {
    stop: Arc<AtomicBool>,
}

impl StopSignal {
    pub fn is_set(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What a source thread gets: its stop signal, its wake-up channel (a stop sends on it;
/// give `wake_tx` clones to whatever else should wake it) and its child slot.
pub struct SourceCtl {
    pub stop: StopSignal,
    pub wake_tx: mpsc::Sender<()>,
    pub wake_rx: mpsc::Receiver<()>,
    pub child: ChildSlot,
}

/// The controls of one running source thread.
pub struct SourceHandle {
    name: String,
    reporter: Reporter,
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    child: ChildSlot,
    thread: Option<JoinHandle<()>>,
}

impl SourceHandle {
    /// Runs `body` on a thread named after the reporter's source; its death is reported
    /// there and sent on `deaths`.
    pub fn spawn<F>(reporter: Reporter, deaths: Deaths, body: F) -> std::io::Result<SourceHandle>
    where
        F: FnOnce(SourceCtl) -> Result<(), SourceError> + Send + 'static,
    {
        let name = reporter.source().to_string();
        let name = name.as_str();
        let own = reporter.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, wake_rx) = mpsc::channel();
        let child: ChildSlot = Arc::new(Mutex::new(None));
        let signal = StopSignal {
            stop: Arc::clone(&stop),
        };
        let ctl = SourceCtl {
            stop: signal.clone(),
            wake_tx: wake.clone(),
            wake_rx,
            child: Arc::clone(&child),
        };
        let thread = std::thread::Builder::new()
            .name(thread_name(name))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(ctl)));
                if signal.is_set() {
                    return;
                }
                let error = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(panic) => SourceError::Panicked(
                        panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "panic".into()),
                    ),
                };
                reporter.report(Report::Died {
                    error: error.to_string(),
                });
                let _ = deaths.send(SourceDeath {
                    source: reporter.source().to_string(),
                    error,
                });
            })?;
        Ok(SourceHandle {
            name: name.to_string(),
            reporter: own,
            stop,
            wake,
            child,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the thread to stop: sets the flag, wakes it, kills its child (which ends the
    /// read it may be blocked in).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        let mut slot = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_mut() {
            let _ = c.kill();
        }
    }

    /// Stops and waits for the thread. The engine's receiver must be gone or drained, or a
    /// thread blocked on a full channel never returns. What it reported (a file it could
    /// not read) no longer holds: a reload that drops it leaves no stale alarm.
    pub fn stop(mut self) {
        self.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.reporter.report(Report::Stopped);
    }
}

/// Linux keeps 15 bytes of a thread name.
fn thread_name(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    format!("src-{}", base.chars().take(11).collect::<String>())
}

/// Puts a freshly started child in its slot, or kills it at once when a stop came first
/// (the flag is set before the slot is looked at, so one of the two sides kills it).
pub fn install_child(slot: &ChildSlot, stop: &StopSignal, child: Child) -> bool {
    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
    *s = Some(child);
    if stop.is_set() {
        if let Some(c) = s.as_mut() {
            let _ = c.kill();
        }
        return false;
    }
    true
}

/// Takes the child back out of its slot (to kill and reap it).
pub fn take_child(slot: &ChildSlot) -> Option<Child> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_source_is_reported_and_a_stopped_one_is_not() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let seen = std::sync::Arc::new(crate::telemetry::observe::Recorder::default());
        let stats = crate::telemetry::StatsRegistry::default();
        stats.observe_with(seen.clone());
        let h = SourceHandle::spawn(stats.reporter("/var/log/x.log"), tx.clone(), |_| {
            panic!("boom")
        })
        .unwrap();
        let why = rx.blocking_recv().unwrap().to_string();
        assert!(why.contains("x.log") && why.contains("boom"), "{why}");
        // Said through the observers too, and kept as the source's problem for status.
        assert!(seen.saw(
            "/var/log/x.log",
            |r| matches!(r, Report::Died { error } if error.contains("boom"))
        ));
        let problem = stats
            .for_source("/var/log/x.log")
            .problem()
            .unwrap_or_default();
        assert!(problem.contains("boom"), "{problem}");
        h.stop();
        let h = SourceHandle::spawn(stats.reporter("quiet"), tx, |ctl| {
            while !ctl.stop.is_set() {
                let _ = ctl.wake_rx.recv();
            }
            Err(SourceError::Panicked("stopped".into()))
        })
        .unwrap();
        h.stop();
        assert!(rx.try_recv().is_err());
        assert!(!seen.saw("quiet", |r| matches!(r, Report::Died { .. })));
        assert!(seen.saw("quiet", |r| *r == Report::Stopped));
    }

    #[test]
    fn stop_kills_the_child() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let h = SourceHandle::spawn(Reporter::standalone("child"), tx, |ctl| {
            let (stop, slot) = (ctl.stop, ctl.child);
            let mut child = std::process::Command::new("sleep")
                .arg("600")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(SourceError::NoJournalctl)?;
            let mut out = child.stdout.take().unwrap();
            if install_child(&slot, &stop, child) {
                // Blocks until the child dies.
                let _ = std::io::Read::read(&mut out, &mut [0u8; 8]);
            }
            let mut c = take_child(&slot).unwrap();
            c.wait().map_err(SourceError::NoJournalctl)?;
            Ok(())
        })
        .unwrap();
        // Wait until the child is in its slot, then stop: the join returns.
        while h.child.lock().unwrap().is_none() {
            std::thread::yield_now();
        }
        h.stop();
    }
}
