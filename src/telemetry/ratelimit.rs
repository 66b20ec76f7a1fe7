//! "Warn, then remind": log lines about events a hostile or broken peer (or a broken
//! source) can repeat at will are written once, then at most once per interval with the
//! count of events since the last line, instead of hundreds of thousands of lines that fill
//! the journal and cost more than the event. The one limiter of the daemon: every stage
//! imports it from here (telemetry imports no stage).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts events and says when a line may be written, and for how many events.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Records one event now; see `hit_at`.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    /// Records one event at `now`. Some(n) when a line should be written now, n being the
    /// events since the last line (this one included); the first event is always written.
    pub fn hit_at(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        match self.last {
            Some(t) if now.duration_since(t) < self.every => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.pending))
            }
        }
    }

    /// Events recorded but not yet written, and forgets them (for a closing line such as
    /// "accepting again"); the next event is written at once.
    pub fn take_pending(&mut self) -> u64 {
        self.last = None;
        std::mem::take(&mut self.pending)
    }
}

/// A `RateLimit` shared by the tasks that report one kind of event.
#[derive(Debug)]
pub struct SharedLimit(Mutex<RateLimit>);

/// The interval of `SharedLimit::default()`.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

impl Default for SharedLimit {
    fn default() -> SharedLimit {
        SharedLimit::new(REMIND_EVERY)
    }
}

impl SharedLimit {
    pub fn new(every: Duration) -> SharedLimit {
        SharedLimit(Mutex::new(RateLimit::new(every)))
    }

    /// Records one event; Some(events since the last line) when a line should be written.
    pub fn hit(&self) -> Option<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).hit()
    }

    /// Records one event and writes `what` as a WARN if the limit lets it through.
    pub fn warn(&self, what: &str) {
        if let Some(n) = self.hit() {
            tracing::warn!(events_since_last = n, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(Duration::from_secs(10));
        assert_eq!(l.hit_at(t0), Some(1), "the first event is written at once");
        for i in 1..1000 {
            assert_eq!(l.hit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.hit_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(l.hit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.take_pending(), 1);
        assert_eq!(l.take_pending(), 0);
        assert_eq!(
            l.hit_at(t0 + Duration::from_secs(12)),
            Some(1),
            "fresh after take"
        );
    }

    #[test]
    fn shared_reports_the_first_then_holds_back() {
        let l = SharedLimit::new(Duration::from_secs(3600));
        assert_eq!(l.hit(), Some(1));
        assert_eq!(l.hit(), None);
        assert_eq!(l.hit(), None);
        assert_eq!(l.0.lock().unwrap().take_pending(), 2);
        assert_eq!(l.hit(), Some(1));
    }
}
