//! Says once that something keeps failing, reminds at a bounded rate while it lasts, and
//! says once when it works again: a retry loop must not log an ERROR every 250 ms, and a
//! lasting failure must not fall silent either.

use std::time::Duration;

use tokio::time::Instant;

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

/// The failure state of one retried operation (commit, expiry, re-read of the map).
#[derive(Debug)]
pub struct Alarm {
    what: &'static str,
    since: Option<Instant>,
    last_said: Option<Instant>,
    attempts: u64,
}

impl Alarm {
    pub fn new(what: &'static str) -> Alarm {
        Alarm {
            what,
            since: None,
            last_said: None,
            attempts: 0,
        }
    }

    /// One more failed attempt.
    pub fn fail(&mut self, error: &dyn std::fmt::Display) -> Said {
        let now = Instant::now();
        self.attempts += 1;
        let what = self.what;
        match (self.since, self.last_said) {
            (None, _) => {
                self.since = Some(now);
                self.last_said = Some(now);
                tracing::error!(%error, "{what} failed; retrying");
                Said::Failing
            }
            (Some(since), Some(said)) if now.duration_since(said) >= REMIND_EVERY => {
                self.last_said = Some(now);
                let secs = now.duration_since(since).as_secs();
                let attempts = self.attempts;
                tracing::error!(%error, failing_secs = secs, attempts, "{what} still failing; retrying");
                Said::StillFailing
            }
            _ => Said::Nothing,
        }
    }

    /// A successful attempt.
    pub fn ok(&mut self) -> Said {
        let Some(since) = self.since.take() else {
            return Said::Nothing;
        };
        let secs = since.elapsed().as_secs();
        let attempts = std::mem::take(&mut self.attempts);
        self.last_said = None;
        let what = self.what;
        tracing::info!(after_secs = secs, attempts, "{what} works again");
        Said::Recovered
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
