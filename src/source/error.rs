//! Why a source stops for good. Every other read problem is retried and reported while it
//! lasts (`telemetry::Report::Unreadable`); these end the source, and the daemon exits
//! non-zero so that systemd's `Restart=on-failure` acts.

use std::fmt;
use std::time::Duration;

/// A source's end, by cause; each message says what to do.
#[derive(Debug)]
pub enum SourceError {
    /// journalctl cannot be run at all (not installed): no waiting brings it.
    NoJournalctl(std::io::Error),
    /// journalctl has kept exiting for `lasted`; its own messages were logged.
    JournalctlFailing {
        lasted: Duration,
        last_status: String,
    },
    /// The source's thread panicked (a bug: the message is the panic's).
    Panicked(String),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::NoJournalctl(e) => write!(
                f,
                "cannot run journalctl ({e}): install systemd's journalctl, or turn the journal off (source.journal = false)"
            ),
            SourceError::JournalctlFailing {
                lasted,
                last_status,
            } => write!(
                f,
                "journalctl has kept exiting for {} (last status {last_status}; its messages are logged above): no login can be read from the journal. Check that the service may read it (group systemd-journal) and that /proc/sys/kernel/random/boot_id is visible to it (no ProcSubset=pid)",
                humantime::format_duration(Duration::from_secs(lasted.as_secs()))
            ),
            SourceError::Panicked(why) => write!(
                f,
                "{why} (a bug in dovegate: please report it with the log lines before this one)"
            ),
        }
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SourceError::NoJournalctl(e) => Some(e),
            _ => None,
        }
    }
}

/// A source that stopped for good, as the daemon's main loop hears of it.
#[derive(Debug)]
pub struct SourceDeath {
    /// The source's name (a path, or a journal key).
    pub source: String,
    pub error: SourceError,
}

impl fmt::Display for SourceDeath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source {} died: {}", self.source, self.error)
    }
}
