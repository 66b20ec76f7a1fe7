//! The observability seam, in the spirit of vector's file-source events trait: a source
//! says what happened as a typed [`Report`] through its [`Reporter`]; what is done about
//! it is the business of the [`Observer`]s behind it: the log ([`LogObserver`]: one line
//! when a condition starts, reminders at a bounded rate while it lasts, one when it
//! clears), the counters that `status` and the metrics read (`StatsRegistry`), and in
//! tests a [`Recorder`]. A source never decides how often to warn, and "never fail
//! silently" is asserted by recording reports, not by grepping logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ratelimit::{Lasting, RateLimit, Say};
use super::SourceStats;

/// What a log source has to tell: odd input it refused (each one), and the state of its
/// reading (at every check, whether it changed or not: the observers keep the state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A login line without a timestamp, not granted.
    Untimed,
    /// A login line whose `rip=` elements disagree, not granted.
    Ambiguous,
    /// A login line whose client address is not an address (escaped text, or "none").
    InvalidAddress { ip: String },
    /// A Dovecot-looking entry from an untrusted sender (`sender`: the field that failed).
    Forged { sender: String, ip: String },
    /// A line over `source.max_line_bytes`, skipped.
    TooLong { len: usize },
    /// A login-looking line that granted nothing (`name`: `scan::NearMiss::name`), with
    /// the hint to the administrator some of them call for.
    NearMiss {
        name: &'static str,
        hint: Option<Hint>,
    },
    /// New logins cannot be read: `problem`, with what still delivers them.
    Unreadable { problem: String, still: Vec<String> },
    /// The source reads (after `Unreadable`, it says so once).
    Readable,
    /// No entry from Dovecot's `units` reached the journal for `secs` (already rate-limited
    /// by `source::quiet::QuietWatch`, which owns that schedule).
    JournalQuiet { units: String, secs: i64 },
    /// Entries from `units` arrive again after `JournalQuiet`.
    JournalHeard { units: String },
    /// The source stopped for good; the daemon exits so that systemd restarts it.
    Died { error: String },
    /// A pushed request (post-login, auth policy, event, DRAC call) that granted nothing:
    /// counted as `count`, said as `what` at most once a minute per `kind` (each kind its
    /// own limit, so that a flood of one cannot hide another).
    Declined {
        count: Count,
        kind: &'static str,
        what: String,
    },
    /// Something the source needs fails (the blocked users unreadable, a socket's
    /// receive): said as an ERROR at most once a minute per `kind`.
    Fault { kind: &'static str, what: String },
}

/// Which counter a declined request adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Refused for its origin (peer user, secret, network): `forged`.
    Forged,
    /// Its client address (or the message itself) is not usable: `invalid_ip`.
    InvalidAddress,
    /// A genuine report that grants nothing: the near miss of this name.
    NearMiss(&'static str),
}

/// Whatever wants to hear what sources report. Called on the source's own thread: keep it
/// short and never block on I/O that can stall.
pub trait Observer: Send + Sync {
    fn observe(&self, source: &str, report: &Report);
}

/// One source's way to report: its name, its counters, and every observer.
#[derive(Clone)]
pub struct Reporter {
    source: Arc<str>,
    stats: Arc<SourceStats>,
    observers: Arc<Observers>,
}

impl Reporter {
    pub fn new(source: &str, stats: Arc<SourceStats>, observers: Arc<Observers>) -> Reporter {
        Reporter {
            source: source.into(),
            stats,
            observers,
        }
    }

    /// A reporter that only logs and counts (tests, benches, one-off commands).
    pub fn standalone(source: &str) -> Reporter {
        Reporter::new(
            source,
            Arc::new(SourceStats::default()),
            Arc::new(Observers::default()),
        )
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The source's counters (the hot ones, bytes, lines and logins, are added directly).
    pub fn stats(&self) -> &Arc<SourceStats> {
        &self.stats
    }

    pub fn report(&self, report: Report) {
        self.stats.count(&report);
        self.observers.observe(&self.source, &report);
    }
}

/// A near miss that says something about the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Login lines without the client address: a custom login_log_format_elements.
    NoAddressElement,
    /// A login by a mechanism in `grant.never_mechanisms`.
    NeverMechanism,
}

/// The log, and any observer added (tests add a [`Recorder`]).
pub struct Observers {
    log: LogObserver,
    more: Mutex<Vec<Arc<dyn Observer>>>,
}

impl Default for Observers {
    fn default() -> Observers {
        Observers {
            log: LogObserver::default(),
            more: Mutex::new(Vec::new()),
        }
    }
}

impl Observers {
    pub fn add(&self, observer: Arc<dyn Observer>) {
        self.more
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    fn observe(&self, source: &str, report: &Report) {
        self.log.observe(source, report);
        let more = self.more.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for o in more {
            o.observe(source, report);
        }
    }
}

/// Every report, kept in order (tests).
#[derive(Default)]
pub struct Recorder(Mutex<Vec<(String, Report)>>);

impl Recorder {
    pub fn reports(&self) -> Vec<(String, Report)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether any report from `source` matches.
    pub fn saw(&self, source: &str, matches: impl Fn(&Report) -> bool) -> bool {
        self.reports()
            .iter()
            .any(|(s, r)| s == source && matches(r))
    }
}

impl Observer for Recorder {
    fn observe(&self, source: &str, report: &Report) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((source.to_string(), report.clone()));
    }
}

/// Odd input is warned about at most this often per source and kind.
const ODD_EVERY: Duration = Duration::from_secs(10);
/// Hints about configuration (a custom log format, a never-granting mechanism).
const HINT_EVERY: Duration = Duration::from_secs(60);
/// Declined pushed requests and faults, per kind.
const PUSHED_EVERY: Duration = Duration::from_secs(60);
/// A source that cannot read is said again this often while it lasts.
const UNREADABLE_EVERY: Duration = Duration::from_secs(60);

/// The log lines: each kind of odd input rate-limited per source (with the count since the
/// last line), a lasting condition said when it starts, reminded while it lasts and said
/// once when it clears.
#[derive(Default)]
pub struct LogObserver {
    by_source: Mutex<HashMap<String, SourceLog>>,
}

/// One source's log state.
struct SourceLog {
    odd: HashMap<&'static str, RateLimit<Instant>>,
    unreadable: Lasting<Instant>,
    problem: Option<String>,
}

impl SourceLog {
    fn new() -> SourceLog {
        SourceLog {
            odd: HashMap::new(),
            unreadable: Lasting::new(UNREADABLE_EVERY),
            problem: None,
        }
    }

    /// How many of `kind` since the last line, when one is due now.
    fn odd(&mut self, kind: &'static str, every: Duration) -> Option<u64> {
        self.odd
            .entry(kind)
            .or_insert_with(|| RateLimit::new(every))
            .hit()
    }
}

impl Observer for LogObserver {
    fn observe(&self, source: &str, report: &Report) {
        let mut all = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains_key(source) {
            all.insert(source.to_string(), SourceLog::new());
        }
        let Some(log) = all.get_mut(source) else {
            return;
        };
        match report {
            Report::Untimed => {
                if let Some(n) = log.odd("untimed", ODD_EVERY) {
                    tracing::warn!(source, count = n, "login lines without a timestamp not granted (they could be old); if this source never writes timestamps, set source.untimed_lines_grant = true");
                }
            }
            Report::Ambiguous => {
                if let Some(n) = log.odd("ambiguous", ODD_EVERY) {
                    tracing::warn!(source, count = n, "login line with conflicting rip= elements (forged user name?); not granted");
                }
            }
            Report::InvalidAddress { ip } => {
                if let Some(n) = log.odd("invalid", ODD_EVERY) {
                    tracing::warn!(source, count = n, ip = %ip, "login line with an invalid client address; not granted");
                }
            }
            Report::Forged { sender, ip } => {
                if let Some(n) = log.odd("forged", ODD_EVERY) {
                    tracing::warn!(source, count = n, last_sender = %sender, last_ip = %ip, "forged Dovecot login entries (not from a trusted sender) ignored");
                }
            }
            Report::TooLong { len } => {
                if let Some(n) = log.odd("too_long", ODD_EVERY) {
                    tracing::warn!(
                        source,
                        count = n,
                        len,
                        "skipping over-long lines (source.max_line_bytes)"
                    );
                }
            }
            Report::NearMiss {
                hint: Some(Hint::NeverMechanism),
                ..
            } => {
                if let Some(n) = log.odd("never_mechanism", HINT_EVERY) {
                    tracing::info!(source, count = n, "logins by a SASL mechanism in grant.never_mechanisms (ANONYMOUS proves nothing about the user) granted nothing");
                }
            }
            Report::NearMiss {
                hint: Some(Hint::NoAddressElement),
                ..
            } => {
                if let Some(n) = log.odd("no_address", HINT_EVERY) {
                    tracing::warn!(source, count = n, "Dovecot login lines are seen but none carries the client address (rip=): a custom login_log_format_elements? add rip=%{{rip}} to it (Dovecot 2.3; rip=%{{remote_ip}} on 2.4), or name the element in the pattern (address_element)");
                }
            }
            Report::NearMiss { hint: None, .. } => {}
            Report::Unreadable { problem, still } => {
                if log.problem.as_deref() != Some(problem.as_str()) {
                    // Another problem is news: said at once.
                    log.unreadable = Lasting::new(UNREADABLE_EVERY);
                    log.problem = Some(problem.clone());
                }
                let checks = match log.unreadable.seen(Instant::now()) {
                    Say::Began => 1,
                    Say::Lasts { seen, .. } => seen,
                    _ => return,
                };
                let text = unreadable_text(source, problem, still);
                tracing::warn!(path = %source, checks, "{text}");
            }
            Report::Readable => {
                if let Say::Ended { .. } = log.unreadable.gone(Instant::now()) {
                    log.problem = None;
                    tracing::info!(path = %source, "log file readable again; following it");
                }
            }
            Report::JournalQuiet { units, secs } => tracing::warn!(
                journal = %source,
                "source.journal: no entry from {units} has reached the journal for {} minutes, so no login is seen: if Dovecot logs to a file of its own (doveconf log_path), set source.logs = [that file] or Dovecot's log_path = syslog; else check source.journal_units",
                secs / 60
            ),
            Report::JournalHeard { units } => tracing::info!(
                journal = %source,
                "source.journal: entries from {units} arrive again"
            ),
            Report::Died { error } => {
                tracing::error!(source, error = %error, "source died; dovegate exits so that systemd restarts it");
            }
            Report::Declined { kind, what, .. } => {
                if let Some(n) = log.odd(kind, PUSHED_EVERY) {
                    tracing::warn!(events_since_last = n, "{what}");
                }
            }
            Report::Fault { kind, what } => {
                if let Some(n) = log.odd(kind, PUSHED_EVERY) {
                    tracing::error!(events_since_last = n, "{what}");
                }
            }
        }
    }
}

/// What an unreadable source means for logins: none at all, or not from this path while
/// others (named) still deliver.
pub fn unreadable_text(source: &str, problem: &str, still: &[String]) -> String {
    if still.is_empty() {
        return format!("no logins can be read: {problem}");
    }
    format!(
        "new logins cannot be read from {source}: {problem}. Still read: {}",
        still.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_observer_hears_and_the_counters_count() {
        let observers = Arc::new(Observers::default());
        let seen = Arc::new(Recorder::default());
        observers.add(seen.clone());
        let r = Reporter::new("a.log", Arc::new(SourceStats::default()), observers);
        r.report(Report::TooLong { len: 9 });
        r.report(Report::Unreadable {
            problem: "gone".into(),
            still: vec![],
        });
        assert!(seen.saw("a.log", |r| *r == Report::TooLong { len: 9 }));
        assert!(seen.saw("a.log", |r| matches!(r, Report::Unreadable { .. })));
        assert_eq!(
            r.stats()
                .too_long
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(r.stats().problem().as_deref(), Some("gone"));
        r.report(Report::Readable);
        assert_eq!(r.stats().problem(), None);
    }

    #[test]
    fn the_status_line_names_the_sources_that_cannot_read() {
        let registry = super::super::StatsRegistry::default();
        registry.reporter("b.log").report(Report::Readable);
        assert_eq!(
            registry.status_line(3),
            "3 grants active, 0 lines read, 0 logins, 0 forged"
        );
        registry.reporter("a.log").report(Report::Unreadable {
            problem: "gone".into(),
            still: vec!["b.log".into()],
        });
        assert!(registry.status_line(3).ends_with("; cannot read: a.log"));
    }

    #[test]
    fn unreadable_text_names_what_still_delivers() {
        assert_eq!(
            unreadable_text("p", "gone", &[]),
            "no logins can be read: gone"
        );
        let t = unreadable_text("p", "gone", &["the journal".into()]);
        assert_eq!(
            t,
            "new logins cannot be read from p: gone. Still read: the journal"
        );
    }
}
