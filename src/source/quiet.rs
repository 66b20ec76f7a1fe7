//! The quiet-journal warning: in journal mode, a Dovecot that logs to its own file
//! (`log_path = /var/log/dovecot.log`) sends nothing to the journal, and dovegate would
//! grant nothing without a word. So the journal source notes each chunk holding an entry
//! from a trusted unit, and a watcher WARNs (rate-limited, repeatedly) while none came for
//! [`QUIET_AFTER`], and says when entries arrive again.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::telemetry::ratelimit::{Lasting, Say};
use crate::telemetry::{Report, Reporter};

/// Silence (seconds) after which the first warning comes.
pub const QUIET_AFTER: i64 = 10 * 60;
/// Between repeated warnings while the silence lasts (seconds).
pub const REPEAT_EVERY: i64 = 30 * 60;

/// What the watcher has to say at a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuietEvent {
    /// Nothing from the trusted units for this many seconds.
    Quiet(i64),
    /// Entries arrive again after a warning.
    Cleared,
}

/// When a trusted Dovecot entry was last seen, and the silence as a lasting condition
/// (`telemetry::ratelimit::Lasting`). Time is an argument (unix seconds) so that tests
/// need no clock.
#[derive(Debug)]
pub struct QuietWatch {
    last_seen: AtomicI64,
    silence: Mutex<Lasting<i64>>,
}

impl QuietWatch {
    /// A watch whose silence starts at `now` (the source's start).
    pub fn new(now: i64) -> QuietWatch {
        QuietWatch {
            last_seen: AtomicI64::new(now),
            silence: Mutex::new(Lasting::new(Duration::from_secs(REPEAT_EVERY as u64))),
        }
    }

    /// A trusted entry arrived at `now`.
    pub fn seen(&self, now: i64) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    /// What to say at `now`, if anything: the first warning after [`QUIET_AFTER`], then one
    /// every [`REPEAT_EVERY`]; `Cleared` once after a warning when entries came again.
    pub fn check(&self, now: i64) -> Option<QuietEvent> {
        let quiet = now - self.last_seen.load(Ordering::Relaxed);
        let mut silence = self.silence.lock().unwrap_or_else(|e| e.into_inner());
        if quiet < QUIET_AFTER {
            return match silence.gone(now) {
                Say::Ended { .. } => Some(QuietEvent::Cleared),
                _ => None,
            };
        }
        match silence.seen(now) {
            Say::Began | Say::Lasts { .. } => Some(QuietEvent::Quiet(quiet)),
            _ => None,
        }
    }
}

/// The byte strings that mark an entry from a trusted unit in journalctl's JSON output
/// (`"_SYSTEMD_UNIT":"dovecot.service"`). A MESSAGE cannot hold them: its quotes are
/// escaped. A liveness hint only: it never grants.
pub fn unit_markers(units: &[String]) -> Vec<Vec<u8>> {
    units
        .iter()
        .filter_map(|u| serde_json::to_string(u).ok())
        .map(|u| format!("\"_SYSTEMD_UNIT\":{u}").into_bytes())
        .collect()
}

/// Whether `chunk` holds an entry from one of the units `markers` name.
pub fn has_unit_entry(chunk: &[u8], markers: &[Vec<u8>]) -> bool {
    markers
        .iter()
        .any(|m| memchr::memmem::find(chunk, m).is_some())
}

/// Runs the watch on its own thread until `done`'s sender is dropped, checking every
/// minute and reporting what [`QuietWatch::check`] says about `units`.
pub fn spawn_watcher(
    watch: Arc<QuietWatch>,
    reporter: Reporter,
    units: Vec<String>,
    done: mpsc::Receiver<()>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("journal-quiet".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                done.recv_timeout(Duration::from_secs(60))
            {
                let units = units.join(", ");
                match watch.check(crate::timefmt::now()) {
                    Some(QuietEvent::Quiet(secs)) => {
                        reporter.report(Report::JournalQuiet { units, secs })
                    }
                    Some(QuietEvent::Cleared) => reporter.report(Report::JournalHeard { units }),
                    None => {}
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_after_silence_repeats_rate_limited_and_clears() {
        let w = QuietWatch::new(1000);
        assert_eq!(w.check(1000 + QUIET_AFTER - 1), None);
        assert_eq!(
            w.check(1000 + QUIET_AFTER),
            Some(QuietEvent::Quiet(QUIET_AFTER))
        );
        // Rate-limited: not again until REPEAT_EVERY has passed, then again.
        let t = 1000 + QUIET_AFTER;
        assert_eq!(w.check(t + 60), None);
        assert_eq!(w.check(t + REPEAT_EVERY - 1), None);
        assert_eq!(
            w.check(t + REPEAT_EVERY),
            Some(QuietEvent::Quiet(QUIET_AFTER + REPEAT_EVERY))
        );
        // An entry arrives: said once, then nothing.
        w.seen(t + REPEAT_EVERY + 5);
        assert_eq!(w.check(t + REPEAT_EVERY + 60), Some(QuietEvent::Cleared));
        assert_eq!(w.check(t + REPEAT_EVERY + 120), None);
    }

    #[test]
    fn regular_entries_never_warn() {
        let w = QuietWatch::new(0);
        for minute in 1..200 {
            w.seen(minute * 60 - 30);
            assert_eq!(w.check(minute * 60), None, "minute {minute}");
        }
    }

    #[test]
    fn unit_markers_find_trusted_fields_only() {
        let m = unit_markers(&["dovecot.service".to_string()]);
        let real = br#"{"__CURSOR":"c","_SYSTEMD_UNIT":"dovecot.service","MESSAGE":"x"}"#;
        assert!(has_unit_entry(real, &m));
        let other = br#"{"__CURSOR":"c","_SYSTEMD_UNIT":"cron.service","MESSAGE":"x"}"#;
        assert!(!has_unit_entry(other, &m));
        // The field's text inside a message is escaped by journalctl: no marker.
        let forged =
            br#"{"_SYSTEMD_UNIT":"cron.service","MESSAGE":"\"_SYSTEMD_UNIT\":\"dovecot.service\""}"#;
        assert!(!has_unit_entry(forged, &m));
    }
}
