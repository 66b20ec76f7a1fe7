//! Telemetry: what each source read and found, kept for `status`, the logs, the sd_notify
//! STATUS line and the Prometheus exposition (`serve::metrics`). Sources only add to
//! counters here; readers take snapshots, so nothing on the scanning path waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One source's counters.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub bytes: AtomicU64,
    pub lines: AtomicU64,
    pub logins: AtomicU64,
    pub invalid_ip: AtomicU64,
    pub ambiguous_ip: AtomicU64,
    /// Journal entries that looked like Dovecot logins from an untrusted sender.
    pub forged: AtomicU64,
    /// Login lines without a timestamp, refused (`source.untimed_lines_grant = false`).
    pub untimed: AtomicU64,
    /// Lines longer than `source.max_line_bytes`, skipped.
    pub too_long: AtomicU64,
    /// Logins by pattern id.
    pub per_pattern: Mutex<BTreeMap<String, u64>>,
    /// Login-looking lines that granted nothing, by reason (`scan::NearMiss::name`).
    pub near_misses: Mutex<BTreeMap<&'static str, u64>>,
    /// Why new logins cannot be read from this source now (None: it reads).
    problem: Mutex<Option<String>>,
}

impl SourceStats {
    pub fn count_pattern(&self, id: &str) {
        let mut m = self.per_pattern.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(id) {
            Some(n) => *n += 1,
            None => {
                m.insert(id.to_string(), 1);
            }
        }
    }

    pub fn count_near_miss(&self, why: &'static str) {
        let mut m = self.near_misses.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(why).or_default() += 1;
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a problem is on record (no copy of it: asked per chunk and per poll).
    pub fn has_problem(&self) -> bool {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Why new logins cannot be read from this source now, if they cannot.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters' side of a report (the log's is `observe::LogObserver`).
    pub fn count(&self, report: &Report) {
        let set_problem = |p: Option<String>| {
            *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = p;
        };
        match report {
            Report::Untimed => SourceStats::add(&self.untimed, 1),
            Report::Ambiguous => SourceStats::add(&self.ambiguous_ip, 1),
            Report::InvalidAddress { .. } => SourceStats::add(&self.invalid_ip, 1),
            Report::Forged { .. } => SourceStats::add(&self.forged, 1),
            Report::TooLong { .. } => SourceStats::add(&self.too_long, 1),
            Report::NearMiss { name, .. } => self.count_near_miss(name),
            Report::Unreadable { problem, .. } => set_problem(Some(problem.clone())),
            Report::Readable => set_problem(None),
            Report::Died { error } => set_problem(Some(format!("stopped: {error}"))),
            Report::Declined { count, .. } => match count {
                Count::Forged => SourceStats::add(&self.forged, 1),
                Count::InvalidAddress => SourceStats::add(&self.invalid_ip, 1),
                Count::NearMiss(name) => self.count_near_miss(name),
            },
            Report::Stopped => set_problem(None),
            Report::JournalQuiet { .. } | Report::JournalHeard { .. } | Report::Fault { .. } => {}
        }
    }
}

/// One server's counters: the connections it could not serve as asked, its failed accepts.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub refused: AtomicU64,
    pub evicted: AtomicU64,
    pub accept_failures: AtomicU64,
}

impl ServerStats {
    /// The counters' side of a server's report.
    pub fn count(&self, report: &ServerReport) {
        let counter = match report {
            ServerReport::Refused { .. } => &self.refused,
            ServerReport::Evicted { .. } => &self.evicted,
            ServerReport::AcceptFailing { .. } => &self.accept_failures,
            ServerReport::AcceptingAgain { .. } => return,
        };
        SourceStats::add(counter, 1);
    }
}

/// Every source's counters by name (a path, or a journal key), every server's, and the
/// observers their reports reach; kept across reloads.
#[derive(Default)]
pub struct StatsRegistry {
    sources: Mutex<BTreeMap<String, Arc<SourceStats>>>,
    observers: Arc<Observers>,
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
    pub untimed: u64,
    pub too_long: u64,
}

impl StatsRegistry {
    pub fn for_source(&self, name: &str) -> Arc<SourceStats> {
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(name.to_string()).or_default())
    }

    /// How the source `name` reports (its counters, the log, every observer added).
    pub fn reporter(&self, name: &str) -> Reporter {
        Reporter::new(name, self.for_source(name), Arc::clone(&self.observers))
    }

    /// How the server `name` reports (its counters, the log, every observer added).
    pub fn server_reporter(&self, name: &'static str) -> ServerReporter {
        Observers::server_reporter(&self.observers, name)
    }

    /// Every server's counters by name.
    pub fn servers(&self) -> Vec<(&'static str, Arc<ServerStats>)> {
        self.observers.servers()
    }

    /// Adds an observer of every source's reports (tests add a `Recorder`).
    pub fn observe_with(&self, observer: Arc<dyn Observer>) {
        self.observers.add(observer);
    }

    pub fn sources(&self) -> Vec<(String, Arc<SourceStats>)> {
        let m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }

    /// The sources that cannot deliver new logins now, with why.
    pub fn failing(&self) -> Vec<(String, String)> {
        self.sources()
            .into_iter()
            .filter_map(|(name, s)| Some((name, s.problem()?)))
            .collect()
    }

    /// The daemon's one-line state (systemd's STATUS=, `systemctl status`): what is
    /// granted and read, and every source that cannot read.
    pub fn status_line(&self, active: usize) -> String {
        let t = self.totals();
        let mut line = format!(
            "{active} grants active, {} lines read, {} logins, {} forged",
            t.lines, t.logins, t.forged
        );
        let failing = self.failing();
        if !failing.is_empty() {
            let names: Vec<&str> = failing.iter().map(|(n, _)| n.as_str()).collect();
            line.push_str(&format!("; cannot read: {}", names.join(", ")));
        }
        line
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
                untimed: t.untimed + get(&s.untimed),
                too_long: t.too_long + get(&s.too_long),
            })
    }
}

pub mod observe;
pub mod ratelimit;

pub use observe::{
    Count, Hint, Level, Observer, Observers, Report, Reporter, ServerReport, ServerReporter,
};

/// The name the sources know the limiter by.
pub use ratelimit::RateLimit as Throttle;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_sources() {
        let r = StatsRegistry::default();
        SourceStats::add(&r.for_source("a").lines, 2);
        SourceStats::add(&r.for_source("b").lines, 3);
        r.for_source("a").count_pattern("p");
        assert_eq!(r.totals().lines, 5);
        assert_eq!(r.sources()[0].1.per_pattern.lock().unwrap()["p"], 1);
    }
}
