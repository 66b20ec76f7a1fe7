//! "Warn, then remind": log lines about events a hostile or broken peer (or a broken
//! source) can repeat at will are written once, then at most once per interval with the
//! count of events since the last line, instead of hundreds of thousands of lines that fill
//! the journal and cost more than the event. The one limiter of the daemon: every stage
//! imports it from here (telemetry imports no stage).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A point in time a limiter counts from: std's clock, tokio's (paused in tests), or unix
/// seconds where the caller passes time as an argument.
pub trait Moment: Copy {
    /// Time from `earlier` to `self` (zero if `earlier` is later).
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl Moment for tokio::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// Unix seconds.
impl Moment for i64 {
    fn since(self, earlier: Self) -> Duration {
        Duration::from_secs(u64::try_from(self.saturating_sub(earlier)).unwrap_or(0))
    }
}

/// Counts events and says when a line may be written, and for how many events.
#[derive(Debug)]
pub struct RateLimit<T: Moment = Instant> {
    every: Duration,
    last: Option<T>,
    pending: u64,
}

impl RateLimit<Instant> {
    /// Records one event now; see `hit_at`.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }
}

impl<T: Moment> RateLimit<T> {
    pub fn new(every: Duration) -> RateLimit<T> {
        RateLimit {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Records one event at `now`. Some(n) when a line should be written now, n being the
    /// events since the last line (this one included); the first event is always written.
    pub fn hit_at(&mut self, now: T) -> Option<u64> {
        self.pending += 1;
        match self.last {
            Some(t) if now.since(t) < self.every => None,
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

/// What to say about a lasting condition (see `Lasting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    Nothing,
    /// It began (the first time it was seen).
    Began,
    /// It still lasts: a reminder, with how long and how many times it was seen since it
    /// began.
    Lasts {
        lasted: Duration,
        seen: u64,
    },
    /// It ended, after lasting this long and being seen this many times.
    Ended {
        lasted: Duration,
        seen: u64,
    },
}

/// A condition that lasts (an operation that keeps failing, a source gone silent): said
/// when it begins, reminded at most once per interval while it lasts, said once when it
/// ends. A retry loop must not log every attempt, and a lasting failure must not fall
/// silent either.
#[derive(Debug)]
pub struct Lasting<T: Moment = Instant> {
    since: Option<T>,
    seen: u64,
    limit: RateLimit<T>,
}

impl<T: Moment> Lasting<T> {
    /// Reminders at most once per `every`.
    pub fn new(every: Duration) -> Lasting<T> {
        Lasting {
            since: None,
            seen: 0,
            limit: RateLimit::new(every),
        }
    }

    /// Whether the condition lasts now.
    pub fn is_on(&self) -> bool {
        self.since.is_some()
    }

    /// The condition was seen at `now`.
    pub fn seen(&mut self, now: T) -> Say {
        self.seen += 1;
        let began = *self.since.get_or_insert(now);
        match self.limit.hit_at(now) {
            Some(_) if self.seen == 1 => Say::Began,
            Some(_) => Say::Lasts {
                lasted: now.since(began),
                seen: self.seen,
            },
            None => Say::Nothing,
        }
    }

    /// The condition is gone at `now`: `Ended` once if it lasted, else `Nothing`.
    pub fn gone(&mut self, now: T) -> Say {
        let Some(began) = self.since.take() else {
            return Say::Nothing;
        };
        self.limit.take_pending();
        Say::Ended {
            lasted: now.since(began),
            seen: std::mem::take(&mut self.seen),
        }
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

    #[test]
    fn a_lasting_condition_begins_reminds_and_ends_once() {
        let mut l: Lasting<i64> = Lasting::new(Duration::from_secs(60));
        assert_eq!(l.gone(0), Say::Nothing);
        assert_eq!(l.seen(100), Say::Began);
        assert!(l.is_on());
        let said: Vec<Say> = (1..=720).map(|i| l.seen(100 + i / 4)).collect();
        let reminders = said
            .iter()
            .filter(|s| matches!(s, Say::Lasts { .. }))
            .count();
        assert_eq!(reminders, 3, "one reminder a minute for three minutes");
        assert_eq!(
            said[239],
            Say::Lasts {
                lasted: Duration::from_secs(60),
                seen: 241
            }
        );
        assert_eq!(
            l.gone(400),
            Say::Ended {
                lasted: Duration::from_secs(300),
                seen: 721
            }
        );
        assert_eq!(l.gone(401), Say::Nothing);
        assert_eq!(l.seen(402), Say::Began, "a new episode is said at once");
    }
}
