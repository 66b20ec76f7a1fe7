//! Says once that something keeps failing, reminds at a bounded rate while it lasts, and
//! says once when it works again: a retry loop must not log an ERROR every 250 ms, and a
//! lasting failure must not fall silent either (the daemon's one `Lasting` limiter).

use std::time::Duration;

use tokio::time::Instant;

use crate::telemetry::ratelimit::{Lasting, Say};

/// How often a lasting failure is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

/// What `Alarm` logged, for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    Nothing,
    Failing,
    StillFailing,
    Recovered,
}

/// The failure state of one retried operation (commit, expiry, re-read of the map): a
/// `telemetry::ratelimit::Lasting` on tokio's clock, with the engine's wording.
#[derive(Debug)]
pub struct Alarm {
    what: &'static str,
    state: Lasting<Instant>,
}

impl Alarm {
    pub fn new(what: &'static str) -> Alarm {
        Alarm {
            what,
            state: Lasting::new(REMIND_EVERY),
        }
    }

    /// One more failed attempt.
    pub fn fail(&mut self, error: &dyn std::fmt::Display) -> Said {
        let what = self.what;
        match self.state.seen(Instant::now()) {
            Say::Began => {
                tracing::error!(%error, "{what} failed; retrying");
                Said::Failing
            }
            Say::Lasts { lasted, seen } => {
                let secs = lasted.as_secs();
                tracing::error!(%error, failing_secs = secs, attempts = seen, "{what} still failing; retrying");
                Said::StillFailing
            }
            _ => Said::Nothing,
        }
    }

    /// A successful attempt.
    pub fn ok(&mut self) -> Said {
        let what = self.what;
        match self.state.gone(Instant::now()) {
            Say::Ended { lasted, seen } => {
                let secs = lasted.as_secs();
                tracing::info!(after_secs = secs, attempts = seen, "{what} works again");
                Said::Recovered
            }
            _ => Said::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn state_changes_once_and_bounded_reminders() {
        let mut a = Alarm::new("expiry");
        assert_eq!(a.ok(), Said::Nothing);
        assert_eq!(a.fail(&"disk full"), Said::Failing);
        let mut said = Vec::new();
        // Four attempts a second for three minutes.
        for _ in 0..720 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            said.push(a.fail(&"disk full"));
        }
        let reminders = said.iter().filter(|&&s| s == Said::StillFailing).count();
        assert_eq!(reminders, 3, "one reminder a minute");
        assert!(!said.contains(&Said::Failing));
        assert_eq!(a.ok(), Said::Recovered);
        assert_eq!(a.ok(), Said::Nothing);
        assert_eq!(a.fail(&"again"), Said::Failing);
    }
}
