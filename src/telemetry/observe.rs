//! The observability seam, in the spirit of vector's file-source events trait: a source
//! says what happened as a typed [`Report`] through its [`Reporter`]; what is done about
//! it is the business of the [`Observer`]s behind it: the log ([`LogObserver`]: one line
//! when a condition starts, reminders at a bounded rate while it lasts, one when it
//! clears), the counters behind the metrics and systemd's STATUS= line (`StatsRegistry`),
//! and in tests a [`Recorder`]. A source never decides how often to warn, and "never fail
//! silently" is asserted by recording reports, not by grepping logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ratelimit::{Lasting, RateLimit, Say};
use super::{ServerStats, SourceStats};

/// What a source has to tell: odd input it refused (each one), and the state of its
/// reading (`Unreadable` at every check while it lasts, `Readable` once after: the
/// observers decide what to say when).
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
    /// receive, a full queue): said at `level` at most once a minute per `kind`.
    Fault {
        kind: &'static str,
        what: String,
        level: Level,
    },
    /// The daemon stopped the source (a reload, shutdown): what it reported no longer
    /// holds, and whatever its successor finds is said afresh.
    Stopped,
}

/// How loud a fault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Degraded: something is lost or late, and the daemon goes on.
    Warn,
    /// Someone must act (nobody is refused while the blocked users cannot be read).
    Error,
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

/// What a server (socketmap, policy, metrics, push, events, DRAC) has to tell: the
/// connections it could not serve as asked, and its accept loop's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerReport {
    /// A connection closed at once: every slot busy and as many newcomers waiting.
    /// `raise`: the setting that allows more.
    Refused {
        max_connections: usize,
        raise: Option<&'static str>,
    },
    /// The stalest connection closed to make room for a newcomer.
    Evicted { max_connections: usize },
    /// An accept failed (not for one connection's sake); `fix` says what to change.
    AcceptFailing { error: String, fix: String },
    /// Accepts work again after `failed` failures.
    AcceptingAgain { failed: u64 },
}

/// Whatever wants to hear what sources and servers report. Called on the reporter's own
/// thread or task: keep it short and never block on I/O that can stall.
pub trait Observer: Send + Sync {
    fn observe(&self, source: &str, report: &Report);
    /// A server's report; most observers want only the sources'.
    fn server(&self, _server: &str, _report: &ServerReport) {}
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

    /// A pushed request declined: counted as `count`, said as `what` (rate-limited per
    /// `kind`).
    pub fn decline(&self, count: Count, kind: &'static str, what: impl Into<String>) {
        self.report(Report::Declined {
            count,
            kind,
            what: what.into(),
        });
    }

    /// How a server this source runs (its listener) reports, to the same observers.
    pub fn server(&self, name: &'static str) -> ServerReporter {
        Observers::server_reporter(&self.observers, name)
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

/// One server's way to report: its name, its counters, and every observer.
#[derive(Clone)]
pub struct ServerReporter {
    server: &'static str,
    stats: Arc<ServerStats>,
    observers: Arc<Observers>,
}

impl ServerReporter {
    pub fn new(server: &'static str, stats: Arc<ServerStats>, observers: Arc<Observers>) -> Self {
        ServerReporter {
            server,
            stats,
            observers,
        }
    }

    /// A reporter that only logs and counts (tests, benches, the replica's own server).
    pub fn standalone(server: &'static str) -> ServerReporter {
        ServerReporter::new(
            server,
            Arc::new(ServerStats::default()),
            Arc::new(Observers::default()),
        )
    }

    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    pub fn report(&self, report: ServerReport) {
        self.stats.count(&report);
        self.observers.log.server(self.server, &report);
        for o in self.observers.more() {
            o.server(self.server, &report);
        }
    }
}

/// The log, and any observer added (tests add a [`Recorder`]); and the servers' counters,
/// so that a source can start a server that reports where the daemon's metrics read.
pub struct Observers {
    log: LogObserver,
    more: Mutex<Vec<Arc<dyn Observer>>>,
    servers: Mutex<BTreeMap<&'static str, Arc<ServerStats>>>,
}

impl Default for Observers {
    fn default() -> Observers {
        Observers {
            log: LogObserver::default(),
            more: Mutex::new(Vec::new()),
            servers: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Observers {
    /// How the server `name` reports: its counters (kept by name), and these observers.
    pub fn server_reporter(observers: &Arc<Observers>, name: &'static str) -> ServerReporter {
        let stats = {
            let mut m = observers.servers.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(name).or_default())
        };
        ServerReporter::new(name, stats, Arc::clone(observers))
    }

    /// Every server's counters by name.
    pub fn servers(&self) -> Vec<(&'static str, Arc<ServerStats>)> {
        let m = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (*k, Arc::clone(v))).collect()
    }

    pub fn add(&self, observer: Arc<dyn Observer>) {
        self.more
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    fn more(&self) -> Vec<Arc<dyn Observer>> {
        self.more.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn observe(&self, source: &str, report: &Report) {
        self.log.observe(source, report);
        for o in self.more() {
            o.observe(source, report);
        }
    }
}

/// Every report, kept in order (tests).
#[derive(Default)]
pub struct Recorder(
    Mutex<Vec<(String, Report)>>,
    Mutex<Vec<(String, ServerReport)>>,
);

impl Recorder {
    pub fn reports(&self) -> Vec<(String, Report)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn server_reports(&self) -> Vec<(String, ServerReport)> {
        self.1.lock().unwrap_or_else(|e| e.into_inner()).clone()
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

    fn server(&self, server: &str, report: &ServerReport) {
        self.1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((server.to_string(), report.clone()));
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
/// once when it clears. What to say is decided under the source's own lock, and said after
/// it is released: a log write that blocks (a stalled journald) holds up only its caller.
#[derive(Default)]
pub struct LogObserver {
    by_source: Mutex<HashMap<String, Arc<Mutex<SourceLog>>>>,
}

/// One source's log state.
struct SourceLog {
    odd: HashMap<&'static str, RateLimit<Instant>>,
    unreadable: Lasting<Instant>,
    problem: Option<String>,
    /// Checks that found it unreadable since the last line about it.
    checks: u64,
}

impl SourceLog {
    fn new() -> SourceLog {
        SourceLog {
            odd: HashMap::new(),
            unreadable: Lasting::new(UNREADABLE_EVERY),
            problem: None,
            checks: 0,
        }
    }

    /// How many of `kind` since the last line, when one is due now.
    fn odd(&mut self, kind: &'static str, every: Duration) -> Option<u64> {
        self.odd
            .entry(kind)
            .or_insert_with(|| RateLimit::new(every))
            .hit()
    }

    /// Whether (and with what count) `report` is to be said now.
    fn due(&mut self, report: &Report) -> Option<u64> {
        let now = Instant::now();
        match report {
            Report::Untimed => self.odd("untimed", ODD_EVERY),
            Report::Ambiguous => self.odd("ambiguous", ODD_EVERY),
            Report::InvalidAddress { .. } => self.odd("invalid", ODD_EVERY),
            Report::Forged { .. } => self.odd("forged", ODD_EVERY),
            Report::TooLong { .. } => self.odd("too_long", ODD_EVERY),
            Report::NearMiss {
                hint: Some(Hint::NeverMechanism),
                ..
            } => self.odd("never_mechanism", HINT_EVERY),
            Report::NearMiss {
                hint: Some(Hint::NoAddressElement),
                ..
            } => self.odd("no_address", HINT_EVERY),
            Report::NearMiss { hint: None, .. } => None,
            Report::Declined { kind, .. } | Report::Fault { kind, .. } => {
                self.odd(kind, PUSHED_EVERY)
            }
            Report::Unreadable { problem, .. } => {
                if self.problem.as_deref() != Some(problem.as_str()) {
                    // Another problem is news: said at once.
                    self.unreadable = Lasting::new(UNREADABLE_EVERY);
                    self.problem = Some(problem.clone());
                }
                self.checks += 1;
                match self.unreadable.seen(now) {
                    Say::Began | Say::Lasts { .. } => Some(std::mem::take(&mut self.checks)),
                    _ => None,
                }
            }
            Report::Readable => match self.unreadable.gone(now) {
                Say::Ended { .. } => {
                    self.problem = None;
                    self.checks = 0;
                    Some(1)
                }
                _ => None,
            },
            Report::Stopped => {
                // Whatever the next start finds is news again.
                *self = SourceLog::new();
                None
            }
            Report::JournalQuiet { .. } | Report::JournalHeard { .. } | Report::Died { .. } => {
                Some(1)
            }
        }
    }
}

impl LogObserver {
    fn log_of(&self, source: &str) -> Arc<Mutex<SourceLog>> {
        let mut all = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = all.get(source) {
            return Arc::clone(log);
        }
        let log = Arc::new(Mutex::new(SourceLog::new()));
        all.insert(source.to_string(), Arc::clone(&log));
        log
    }
}

impl LogObserver {
    /// Whether (and with what count) a server's report is to be said now: refusals and
    /// evictions at most once per ODD_EVERY each, failing accepts too, and the recovery
    /// once (it clears the failures' count).
    fn server_due(&self, server: &str, report: &ServerReport) -> Option<u64> {
        let log = self.log_of(server);
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.server_due(report)
    }
}

impl SourceLog {
    /// A server's side of `due`. The recovery forgets the failures not yet said (the
    /// recovery line counts them), so the next failure is said at once.
    fn server_due(&mut self, report: &ServerReport) -> Option<u64> {
        match report {
            ServerReport::Refused { .. } => self.odd("slots-refused", ODD_EVERY),
            ServerReport::Evicted { .. } => self.odd("slots-evicted", ODD_EVERY),
            ServerReport::AcceptFailing { .. } => self.odd("accept-failing", ODD_EVERY),
            ServerReport::AcceptingAgain { .. } => {
                if let Some(limit) = self.odd.get_mut("accept-failing") {
                    limit.take_pending();
                }
                Some(1)
            }
        }
    }
}

impl Observer for LogObserver {
    fn server(&self, server: &str, report: &ServerReport) {
        let Some(n) = self.server_due(server, report) else {
            return;
        };
        match report {
            ServerReport::Refused {
                max_connections,
                raise,
            } => {
                let raise = raise
                    .map(|k| format!("; raise {k} if the clients are honest"))
                    .unwrap_or_default();
                tracing::warn!(
                    refused = n,
                    max_connections,
                    "{server} connections refused: every connection slot is busy and as many newcomers \
                     wait (count since the last such line{raise})"
                );
            }
            ServerReport::Evicted { max_connections } => tracing::warn!(
                evicted = n,
                max_connections,
                "{server}: every connection slot busy; closed the stalest connections to \
                 make room (count since the last such line)"
            ),
            ServerReport::AcceptFailing { error, fix } => tracing::warn!(
                failures = n,
                "{server}: cannot accept connections; backing off: {error}{fix}"
            ),
            ServerReport::AcceptingAgain { failed } => {
                tracing::info!(failed, "{server}: accepting connections again")
            }
        }
    }

    fn observe(&self, source: &str, report: &Report) {
        if matches!(report, Report::NearMiss { hint: None, .. }) {
            return;
        }
        let due = {
            let log = self.log_of(source);
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.due(report)
        };
        let Some(n) = due else {
            return;
        };
        match report {
            Report::Untimed => tracing::warn!(source, count = n, "login lines without a timestamp not granted (they could be old); if this source never writes timestamps, set source.untimed_lines_grant = true"),
            Report::Ambiguous => tracing::warn!(source, count = n, "login line with conflicting rip= elements (forged user name?); not granted"),
            Report::InvalidAddress { ip } => tracing::warn!(source, count = n, ip = %ip, "login line with an invalid client address; not granted"),
            Report::Forged { sender, ip } => tracing::warn!(source, count = n, last_sender = %sender, last_ip = %ip, "forged Dovecot login entries (not from a trusted sender) ignored"),
            Report::TooLong { len } => tracing::warn!(source, count = n, len, "skipping over-long lines (source.max_line_bytes)"),
            Report::NearMiss {
                hint: Some(Hint::NeverMechanism),
                ..
            } => tracing::info!(source, count = n, "logins by a SASL mechanism in grant.never_mechanisms (ANONYMOUS proves nothing about the user) granted nothing"),
            Report::NearMiss {
                hint: Some(Hint::NoAddressElement),
                ..
            } => tracing::warn!(source, count = n, "Dovecot login lines are seen but none carries the client address (rip=): a custom login_log_format_elements? add rip=%{{rip}} to it (Dovecot 2.3; rip=%{{remote_ip}} on 2.4), or name the element in the pattern (address_element)"),
            Report::NearMiss { hint: None, .. } | Report::Stopped => {}
            Report::Unreadable { problem, still } => {
                let text = unreadable_text(source, problem, still);
                tracing::warn!(path = %source, checks = n, "{text}");
            }
            Report::Readable => tracing::info!(path = %source, "{source} readable again; following it"),
            Report::JournalQuiet { units, secs } => tracing::warn!(
                journal = %source,
                "source.journal: no entry from {units} has reached the journal for {} minutes, so no login is seen: if Dovecot logs to a file of its own (doveconf log_path), set source.logs = [that file] or Dovecot's log_path = syslog; else check source.journal_units",
                secs / 60
            ),
            Report::JournalHeard { units } => tracing::info!(
                journal = %source,
                "source.journal: entries from {units} arrive again"
            ),
            Report::Died { error } => tracing::error!(source, error = %error, "source died; dovegate exits so that systemd restarts it"),
            Report::Declined { what, .. } => tracing::warn!(events_since_last = n, "{what}"),
            Report::Fault {
                what,
                level: Level::Warn,
                ..
            } => tracing::warn!(events_since_last = n, "{what}"),
            Report::Fault {
                what,
                level: Level::Error,
                ..
            } => tracing::error!(events_since_last = n, "{what}"),
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

    /// The log's schedule: a condition said when it starts, not again at once, said at
    /// once when it changes, once when it clears, afresh after a stop; each kind of odd
    /// input on its own limit; plain near misses never.
    #[test]
    fn the_log_says_what_is_due_and_no_more() {
        let mut log = SourceLog::new();
        let gone = |p: &str| Report::Unreadable {
            problem: p.into(),
            still: vec![],
        };
        assert_eq!(log.due(&gone("missing")), Some(1));
        assert_eq!(log.due(&gone("missing")), None);
        assert_eq!(log.due(&gone("missing")), None);
        assert_eq!(
            log.due(&gone("a FIFO")),
            Some(3),
            "news, with the checks since the last line"
        );
        assert_eq!(log.due(&Report::Readable), Some(1));
        assert_eq!(log.due(&Report::Readable), None, "said once");
        assert_eq!(log.due(&gone("missing")), Some(1));
        assert_eq!(log.due(&Report::Stopped), None);
        assert_eq!(log.due(&gone("missing")), Some(1), "afresh after a stop");
        let forged = Report::Forged {
            sender: "_COMM=x".into(),
            ip: "192.0.2.1".into(),
        };
        assert_eq!(log.due(&forged), Some(1));
        assert_eq!(log.due(&forged), None);
        assert_eq!(
            log.due(&Report::TooLong { len: 9 }),
            Some(1),
            "its own limit"
        );
        let plain = Report::NearMiss {
            name: "failed",
            hint: None,
        };
        assert_eq!(log.due(&plain), None);
    }

    /// A server's lines: each kind on its own limit; a failure after a recovery is said at
    /// once (as `RateLimit::take_pending` has it), the ones after it at the limit's rate.
    #[test]
    fn a_server_says_what_is_due_and_no_more() {
        let mut log = SourceLog::new();
        let failing = ServerReport::AcceptFailing {
            error: "Too many open files".into(),
            fix: String::new(),
        };
        assert_eq!(log.server_due(&failing), Some(1));
        assert_eq!(log.server_due(&failing), None);
        assert_eq!(
            log.server_due(&ServerReport::AcceptingAgain { failed: 2 }),
            Some(1)
        );
        assert_eq!(
            log.server_due(&failing),
            Some(1),
            "a new failure after a recovery is news"
        );
        assert_eq!(log.server_due(&failing), None);
        let evicted = ServerReport::Evicted { max_connections: 1 };
        assert_eq!(log.server_due(&evicted), Some(1), "its own limit");
        assert_eq!(log.server_due(&evicted), None);
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
