//! Rate limiting for log lines about events a hostile or broken peer can repeat at will
//! (refused connections, failing accepts): one line per interval carrying a count, instead
//! of hundreds of thousands of lines that fill the journal and cost more than the event.

use std::time::{Duration, Instant};

/// Counts events and says when a line may be written, and for how many events.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Records one event at `now`. Some(n) when a line should be written now, n being the
    /// events since the last line (this one included); the first event is always written.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
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
    /// "accepting again").
    pub fn take_pending(&mut self) -> u64 {
        self.last = None;
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(Duration::from_secs(10));
        assert_eq!(l.hit(t0), Some(1), "the first event is written at once");
        for i in 1..1000 {
            assert_eq!(l.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.hit(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(l.hit(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.take_pending(), 1);
        assert_eq!(l.take_pending(), 0);
        assert_eq!(
            l.hit(t0 + Duration::from_secs(12)),
            Some(1),
            "fresh after take"
        );
    }
}
