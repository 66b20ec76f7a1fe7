//! The `source` stage: bytes from log files, turned into logins with their checkpoint.
//!
//! Each followed file runs on its own thread (file reads block): it waits for an inotify
//! event on the file's directory or the poll interval, reads what is new, runs the
//! searcher over it and sends one `Batch` per chunk to the engine over a bounded channel
//! (a slow map applies back-pressure instead of growing memory).

pub mod backscan;
pub mod checkpoint;
pub mod journal;
pub mod lines;
pub mod tailer;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use notify::Watcher;

use crate::pattern::IpVerdict;
use crate::scan::{candidate_lines, LineMatcher};
use crate::timefmt;
use checkpoint::{Checkpoint, Position};
use tailer::{FileFollower, Start};

/// A login seen in a log, before policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenLogin {
    pub ip: IpAddr,
    /// The line's own timestamp (unix seconds), when it has one.
    pub time: Option<i64>,
}

/// What one chunk of a source produced: its logins, and the position that becomes true
/// once they are committed (None: a source with nothing to checkpoint, such as pushed
/// logins).
#[derive(Debug)]
pub struct Batch {
    pub source: usize,
    pub logins: Vec<SeenLogin>,
    pub position: Option<Position>,
}

/// One source's counters, for status, logs and metrics.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub bytes: AtomicU64,
    pub lines: AtomicU64,
    pub logins: AtomicU64,
    pub invalid_ip: AtomicU64,
    pub ambiguous_ip: AtomicU64,
    /// Journal entries that looked like Dovecot logins from an untrusted sender.
    pub forged: AtomicU64,
    /// Logins by pattern id.
    pub per_pattern: Mutex<BTreeMap<String, u64>>,
}

impl SourceStats {
    pub fn count_pattern(&self, id: &str) {
        if let Ok(mut m) = self.per_pattern.lock() {
            *m.entry(id.to_string()).or_default() += 1;
        }
    }
}

/// Every source's counters by name (a path, or a journal key); kept across reloads.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    sources: Mutex<BTreeMap<String, Arc<SourceStats>>>,
}

/// Sums over all sources.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatsTotals {
    pub bytes: u64,
    pub lines: u64,
    pub logins: u64,
    pub invalid_ip: u64,
    pub ambiguous_ip: u64,
    pub forged: u64,
}

impl StatsRegistry {
    pub fn for_source(&self, name: &str) -> Arc<SourceStats> {
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(name.to_string()).or_default())
    }

    pub fn sources(&self) -> Vec<(String, Arc<SourceStats>)> {
        let m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }

    pub fn totals(&self) -> StatsTotals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.sources()
            .iter()
            .fold(StatsTotals::default(), |t, (_, s)| StatsTotals {
                bytes: t.bytes + get(&s.bytes),
                lines: t.lines + get(&s.lines),
                logins: t.logins + get(&s.logins),
                invalid_ip: t.invalid_ip + get(&s.invalid_ip),
                ambiguous_ip: t.ambiguous_ip + get(&s.ambiguous_ip),
                forged: t.forged + get(&s.forged),
            })
    }
}

/// Runs the matching path over a chunk of whole lines.
pub fn scan_chunk(
    matcher: &mut LineMatcher,
    chunk: &[u8],
    max_line: usize,
    now: i64,
    stats: &SourceStats,
    origin: &Path,
) -> Vec<SeenLogin> {
    let mut out = Vec::new();
    // The matcher is borrowed by the closure; the pattern set is reached through it.
    let patterns = Arc::clone(matcher.patterns_arc());
    candidate_lines(&patterns, chunk, |_, line| {
        if line.len() > max_line {
            tracing::warn!(file = %origin.display(), len = line.len(), "skipping an over-long line");
            return;
        }
        let Some((frame, login)) = matcher.match_line(line, now) else {
            return;
        };
        match login.ip {
            IpVerdict::Valid(ip) => {
                stats.logins.fetch_add(1, Ordering::Relaxed);
                stats.count_pattern(&patterns.defs()[login.pattern].id);
                out.push(SeenLogin {
                    ip,
                    time: frame.time,
                })
            }
            IpVerdict::Invalid(text) => {
                stats.invalid_ip.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = %origin.display(), rip = %text.escape_debug(), "login line with an invalid client address; not granted");
            }
            IpVerdict::Ambiguous => {
                stats.ambiguous_ip.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = %origin.display(), "login line with conflicting rip= elements (forged user name?); not granted");
            }
            IpVerdict::Missing => {}
        }
    });
    stats.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    stats.lines.fetch_add(
        memchr::memchr_iter(b'\n', chunk).count() as u64,
        Ordering::Relaxed,
    );
    out
}

/// How a file source begins.
pub struct FileSourceSpec {
    pub index: usize,
    pub path: PathBuf,
    pub checkpoint: Option<Checkpoint>,
    pub max_line: usize,
    pub poll_interval: Duration,
    /// Logins before this time cannot hold a grant: where a first start begins reading.
    pub cutoff: i64,
}

/// Starts the thread following one file. It stops when `stop` is set (checked at least
/// every poll interval) or when the engine hangs up.
pub fn spawn_file_source(
    spec: FileSourceSpec,
    mut matcher: LineMatcher,
    tx: tokio::sync::mpsc::Sender<Batch>,
    stop: Arc<AtomicBool>,
    stats: Arc<SourceStats>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("source-{}", spec.index))
        .spawn(move || {
            let mut follower = match &spec.checkpoint {
                Some(cp) => FileFollower::resume(&spec.path, spec.max_line, cp),
                None => {
                    let start = std::fs::File::open(&spec.path)
                        .and_then(|f| backscan::start_offset(&f, spec.cutoff, timefmt::now()))
                        .map_or(Start::Beginning, Start::At);
                    FileFollower::new(&spec.path, spec.max_line, start)
                }
            };
            let (wake_tx, wake_rx) = mpsc::channel::<()>();
            let _watcher = watch_dir(&spec.path, wake_tx);
            // Tell the engine where we start, so that a first start is checkpointed even
            // before any line arrives.
            let first = Batch {
                source: spec.index,
                logins: Vec::new(),
                position: Some(Position::File(follower.checkpoint())),
            };
            if tx.blocking_send(first).is_err() {
                return;
            }
            let mut last_error: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut closed = false;
                let result = follower.poll(&mut |chunk, cp| {
                    if closed {
                        return;
                    }
                    let logins = scan_chunk(&mut matcher, chunk, spec.max_line, timefmt::now(), &stats, &spec.path);
                    let batch = Batch {
                        source: spec.index,
                        logins,
                        position: Some(Position::File(cp.clone())),
                    };
                    closed = tx.blocking_send(batch).is_err();
                });
                if closed {
                    return;
                }
                match result {
                    Ok(()) => last_error = None,
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(path = %spec.path.display(), error = %msg, "cannot read log file; retrying");
                            last_error = Some(msg);
                        }
                    }
                }
                // Wait for a change or the poll interval, then swallow queued wake-ups.
                let _ = wake_rx.recv_timeout(spec.poll_interval);
                while wake_rx.try_recv().is_ok() {}
            }
        })
}

/// Watches the file's directory (the file itself is replaced on rotation). None: inotify
/// unavailable; the poll interval alone drives reading.
fn watch_dir(path: &Path, wake: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut w = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = wake.send(());
    })
    .map_err(|e| tracing::warn!(error = %e, "inotify unavailable; polling only"))
    .ok()?;
    match w.watch(dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; polling only");
            None
        }
    }
}
