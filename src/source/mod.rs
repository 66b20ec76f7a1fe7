//! The `source` stage: bytes from log files and the journal, turned into logins with their
//! checkpoint.
//!
//! Each followed file runs on its own thread (file reads block): it waits for an inotify
//! event on the file's directory or the poll interval, reads what is new, runs the
//! [`Scanner`] over it and sends one `Batch` per chunk to the engine over a bounded channel
//! (a slow map applies back-pressure instead of growing memory).

pub mod backscan;
pub mod error;
pub mod handle;
pub mod journal;
pub mod lines;
pub mod quiet;
pub mod tailer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::Watcher;

use crate::model::{Batch, LoginDetail, SeenLogin, SessionStart};
use crate::pattern::IpVerdict;
use crate::scan::{Line, Login, NearMiss, Scanner, Sink};
use crate::state::{Checkpoint, Position};
use crate::telemetry::{Hint, Report, Reporter, SourceStats};
use crate::timefmt;
pub use error::{SourceDeath, SourceError};
use handle::{Deaths, SourceCtl, SourceHandle};
use tailer::FileFollower;

/// The session a login line opens as `source` read it, if it holds one.
pub fn session_start(login: &Login<'_>, source: &str) -> Option<SessionStart> {
    if !crate::model::holds(login.service) {
        return None;
    }
    let mut s = login.session.clone()?;
    s.user = login.user.map(|u| String::from_utf8_lossy(u).into_owned());
    s.source = source.to_string();
    s.trusted = login.framing.only_dovecot();
    Some(s)
}

/// The daemon's sink: collects the logins of a chunk for its `Batch`, counts the hot
/// numbers (logins per pattern) itself and reports everything refused through its
/// [`Reporter`] (counted, and logged at a bounded rate by the observers).
pub struct DaemonSink {
    reporter: Reporter,
    untimed_grant: bool,
    logins: Vec<SeenLogin>,
    ends: Vec<crate::model::SessionEnd>,
}

impl DaemonSink {
    /// `untimed_grant`: `source.untimed_lines_grant`.
    pub fn new(reporter: Reporter, untimed_grant: bool) -> DaemonSink {
        DaemonSink {
            reporter,
            untimed_grant,
            logins: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// The logins found since the last call.
    pub fn take(&mut self) -> Vec<SeenLogin> {
        std::mem::take(&mut self.logins)
    }

    /// The session ends found since the last call.
    pub fn take_ends(&mut self) -> Vec<crate::model::SessionEnd> {
        std::mem::take(&mut self.ends)
    }

    pub fn stats(&self) -> &SourceStats {
        self.reporter.stats()
    }

    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    fn grant(&mut self, login: &Login<'_>) {
        if let IpVerdict::Valid(ip) = login.ip {
            let stats = self.reporter.stats();
            SourceStats::add(&stats.logins, 1);
            stats.count_pattern(&login.pattern.id);
            self.logins.push(SeenLogin {
                ip,
                time: login.time,
                session: session_start(login, self.reporter.source()),
                detail: Some(Box::new(LoginDetail {
                    user: login.user.map(|u| String::from_utf8_lossy(u).into_owned()),
                    protocol: String::from_utf8_lossy(login.service)
                        .trim_end_matches("-login")
                        .to_string(),
                    session: login.session.as_ref().map(|s| s.id.clone()),
                    pattern: login.pattern.id.to_string(),
                    source: self.reporter.source().to_string(),
                })),
            });
        }
    }
}

/// A client address as the line gave it, for logs: the address, or the invalid text
/// escaped (it comes from the log and may hold control characters).
fn verdict_text(v: &IpVerdict) -> String {
    match v {
        IpVerdict::Valid(ip) => ip.to_string(),
        IpVerdict::Invalid(text) => text.escape_debug().to_string(),
        IpVerdict::Ambiguous => "conflicting rip= elements".into(),
        IpVerdict::Missing => "none".into(),
    }
}

impl Sink for DaemonSink {
    fn login(&mut self, _line: Line<'_>, login: &Login<'_>) {
        self.grant(login);
    }

    fn untimed(&mut self, _line: Line<'_>, login: &Login<'_>) {
        if self.untimed_grant {
            return self.grant(login);
        }
        self.reporter.report(Report::Untimed);
    }

    fn bad_address(&mut self, _line: Line<'_>, login: &Login<'_>) {
        self.reporter.report(match login.ip {
            IpVerdict::Ambiguous => Report::Ambiguous,
            ref ip => Report::InvalidAddress {
                ip: verdict_text(ip),
            },
        });
    }

    fn forged(&mut self, _line: Line<'_>, login: &Login<'_>, why: &str) {
        self.reporter.report(Report::Forged {
            sender: why.to_string(),
            ip: verdict_text(&login.ip),
        });
    }

    fn too_long(&mut self, line: Line<'_>) {
        self.reporter.report(Report::TooLong {
            len: line.text.len(),
        });
    }

    fn near_miss(&mut self, _line: Line<'_>, why: NearMiss) {
        let hint = match why {
            NearMiss::NoAddress => Some(Hint::NoAddressElement),
            NearMiss::NeverMechanism => Some(Hint::NeverMechanism),
            _ => None,
        };
        self.reporter.report(Report::NearMiss {
            name: why.name(),
            hint,
        });
    }

    fn session_end(&mut self, _line: Line<'_>, end: &crate::model::SessionEnd) {
        if crate::model::ends_held(&end.service) {
            let mut end = end.clone();
            end.source = self.reporter.source().to_string();
            self.ends.push(end);
        }
    }
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
    /// The daemon's other sources (other log paths, the journal, push, events), named for
    /// the warning when this one cannot be read: what still works.
    pub others: Vec<String>,
}

/// Follows one file: reads what is new, scans it, sends batches, until stopped or the
/// engine hangs up.
pub struct FileSource {
    pub spec: FileSourceSpec,
    pub scanner: Scanner,
    pub sink: DaemonSink,
    pub tx: tokio::sync::mpsc::Sender<Batch>,
}

impl FileSource {
    /// Starts it on its own thread.
    pub fn spawn(self, deaths: Deaths) -> std::io::Result<SourceHandle> {
        let reporter = self.sink.reporter().clone();
        SourceHandle::spawn(reporter, deaths, move |ctl| self.run(ctl))
    }

    /// The follower's loop. Read errors are retried (a missing file is waited for).
    pub fn run(mut self, ctl: SourceCtl) -> Result<(), SourceError> {
        let SourceCtl {
            stop,
            wake_tx,
            wake_rx,
            ..
        } = ctl;
        let spec = &self.spec;
        let mut follower = match &spec.checkpoint {
            Some(cp) => FileFollower::resume(&spec.path, spec.max_line, cp),
            None => {
                // Never a plain open: the path may be a FIFO (defect 10).
                let start = backscan::first_start(&spec.path, spec.cutoff, timefmt::now());
                FileFollower::new(&spec.path, spec.max_line, start)
            }
        };
        // Where reading begins, for the administrator (and the tests, which wait for it
        // before writing: a line written earlier may or may not be read on a first start).
        match follower.current() {
            Some(pos) => tracing::info!(
                "following {} from offset {} (inode {})",
                spec.path.display(),
                pos.offset,
                pos.id.ino
            ),
            None => tracing::info!(
                "following {} from its start once it can be read",
                spec.path.display()
            ),
        }
        let _watcher = watch_dir(&spec.path, wake_tx);
        // Tell the engine where we start, so that a first start is checkpointed even
        // before any line arrives.
        let first = Batch {
            source: spec.index,
            logins: Vec::new(),
            ends: Vec::new(),
            position: Some(Position::File(follower.checkpoint())),
        };
        if self.tx.blocking_send(first).is_err() {
            return Ok(());
        }
        let health = Health::new(&spec.path, spec.others.clone());
        while !stop.is_set() {
            let mut closed = false;
            let (scanner, sink, tx) = (&mut self.scanner, &mut self.sink, &self.tx);
            let result = follower.poll(&mut |chunk, cp| {
                if closed {
                    return;
                }
                let n = scanner.scan(chunk, timefmt::now(), sink);
                SourceStats::add(&sink.stats().bytes, n.bytes);
                SourceStats::add(&sink.stats().lines, n.lines);
                let batch = Batch {
                    source: spec.index,
                    logins: sink.take(),
                    ends: sink.take_ends(),
                    position: Some(Position::File(cp.clone())),
                };
                closed = tx.blocking_send(batch).is_err();
            });
            if closed {
                return Ok(());
            }
            let problem = match &result {
                Ok(()) => follower.problem().map(ToString::to_string),
                Err(e) => Some(tailer::PathProblem::of(e).map_or_else(
                    || format!("{}: {e}", spec.path.display()),
                    |p| p.to_string(),
                )),
            };
            health.note(self.sink.reporter(), problem, follower.open_generations());
            // Wait for a change, a stop or the poll interval, then swallow queued wake-ups.
            let _ = wake_rx.recv_timeout(spec.poll_interval);
            while wake_rx.try_recv().is_ok() {}
        }
        Ok(())
    }
}

/// Reports, at every check while it lasts, why a followed file cannot be read (missing,
/// unreadable, not a regular file), and once when it reads again: the daemon never grants
/// nothing in silence (the observers decide how often that is said). It names what still
/// delivers logins (the file the path named before, read through its descriptor; the other
/// sources), so that "no logins" is said only when true. Whether a problem is on record is
/// the source's counters' to say (they outlive a reload's new generation).
struct Health {
    path: PathBuf,
    others: Vec<String>,
}

impl Health {
    fn new(path: &Path, others: Vec<String>) -> Health {
        Health {
            path: path.to_path_buf(),
            others,
        }
    }

    /// `open`: files of this path still read (see `FileFollower::open_generations`).
    fn note(&self, reporter: &Reporter, problem: Option<String>, open: usize) {
        match problem {
            Some(problem) => reporter.report(Report::Unreadable {
                problem,
                still: self.still_read(open),
            }),
            None if reporter.stats().has_problem() => reporter.report(Report::Readable),
            None => {}
        }
    }

    fn still_read(&self, open: usize) -> Vec<String> {
        let mut still = Vec::new();
        if open > 0 {
            still.push(format!(
                "the file {} named before (rotated or replaced; read until it goes quiet)",
                self.path.display()
            ));
        }
        still.extend(self.others.iter().cloned());
        still
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::Visit;
    use std::sync::Arc;

    fn scanner() -> Scanner {
        crate::scan::test_scanner(Visit::Logins, 16384)
    }

    /// "No logins" only when nothing else delivers them (issue 26).
    #[test]
    fn an_unreadable_path_says_what_still_works() {
        use crate::telemetry::observe::unreadable_text;
        let p = "log path /l/a.log is a FIFO";
        let alone = Health::new(Path::new("/l/a.log"), Vec::new());
        let text = |h: &Health, open| unreadable_text("/l/a.log", p, &h.still_read(open));
        assert_eq!(text(&alone, 0), format!("no logins can be read: {p}"));
        let w = text(&alone, 1);
        assert!(
            w.starts_with("new logins cannot be read from /l/a.log: "),
            "{w}"
        );
        assert!(
            w.contains("Still read: the file /l/a.log named before"),
            "{w}"
        );
        let others = Health::new(
            Path::new("/l/a.log"),
            vec!["log file /l/b.log".into(), "the journal".into()],
        );
        let w = text(&others, 0);
        assert!(
            w.ends_with("Still read: log file /l/b.log; the journal"),
            "{w}"
        );
        assert!(!w.contains("no logins"), "{w}");
    }

    /// A file source that cannot read says so through its observers while it lasts, with
    /// the problem kept for `status`, and says once when it reads again: asserted on the
    /// reports, not on log text.
    #[test]
    fn an_unreadable_file_is_reported_until_it_reads() {
        use crate::telemetry::observe::Recorder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later.log");
        let registry = crate::telemetry::StatsRegistry::default();
        let seen = Arc::new(Recorder::default());
        registry.observe_with(seen.clone());
        let name = path.display().to_string();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let source = FileSource {
            spec: FileSourceSpec {
                index: 0,
                path: path.clone(),
                checkpoint: None,
                max_line: 16384,
                poll_interval: Duration::from_millis(20),
                cutoff: 0,
                others: vec![],
            },
            scanner: scanner(),
            sink: DaemonSink::new(registry.reporter(&name), false),
            tx,
        };
        let (deaths, _died) = tokio::sync::mpsc::unbounded_channel();
        let handle = source.spawn(deaths).unwrap();
        let mut wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "never {what}");
                while rx.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait("reported unreadable", &|| {
            seen.saw(
                &name,
                |r| matches!(r, Report::Unreadable { still, .. } if still.is_empty()),
            )
        });
        assert!(registry.for_source(&name).problem().is_some());
        std::fs::write(&path, b"").unwrap();
        wait("reported readable", &|| {
            seen.saw(&name, |r| *r == Report::Readable)
        });
        assert_eq!(registry.for_source(&name).problem(), None);
        handle.stop();
    }

    /// Files and the journal count logins per pattern the same way (the journal's were
    /// once missing), and untimed lines are refused unless configured.
    #[test]
    fn the_daemon_sink_counts_files_and_journal_alike() {
        let reporter = Reporter::standalone("t");
        let stats = std::sync::Arc::clone(reporter.stats());
        let mut sink = DaemonSink::new(reporter.clone(), false);
        let mut s = scanner();
        let file = b"2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<a>, rip=203.0.113.5, lip=192.0.2.1\n\
                     imap-login: Login: user=<b>, rip=203.0.113.6, lip=192.0.2.1\n";
        s.scan(file, 0, &mut sink);
        let entry = br#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1795256894146773","_SYSTEMD_UNIT":"dovecot.service","MESSAGE":"imap-login: Login: user=<c>, rip=203.0.113.7, lip=192.0.2.1"}"#;
        let provenance = journal::Provenance {
            units: vec!["dovecot.service".into()],
            ..Default::default()
        };
        journal::scan_entries(&mut s, &provenance, entry, 0, &mut sink, &mut None);
        let ips: Vec<String> = sink.take().iter().map(|l| l.ip.to_string()).collect();
        assert_eq!(ips, ["203.0.113.5", "203.0.113.7"]);
        assert_eq!(
            stats.per_pattern.lock().unwrap().values().sum::<u64>(),
            2,
            "{stats:?}"
        );
        assert_eq!(stats.untimed.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A session end in the journal, from the trusted unit, is an event too.
        let end = br#"{"__CURSOR":"d","__REALTIME_TIMESTAMP":"1795256894146773","_SYSTEMD_UNIT":"dovecot.service","MESSAGE":"imap(c)<42><Cm5r5yxhtLN/AAAB>: Disconnected: Logged out in=1 out=2"}"#;
        journal::scan_entries(&mut s, &provenance, end, 0, &mut sink, &mut None);
        let ends = sink.take_ends();
        assert_eq!(ends.len(), 1);
        assert_eq!(
            (ends[0].pid, ends[0].id.as_deref()),
            (Some(42), Some("Cm5r5yxhtLN/AAAB"))
        );
        assert!(ends[0].trusted, "a journal entry from the trusted unit");
        let mut granting = DaemonSink::new(reporter, true);
        s.scan(file, 0, &mut granting);
        assert_eq!(granting.take().len(), 2);
    }
}
