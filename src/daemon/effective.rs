//! What a loaded (or reloaded) configuration decides for the daemon: its settings with
//! `run`'s options applied, the patterns, the exclusions, the journal, and what the engine
//! and the servers are given from them.

use std::sync::Arc;

use super::Options;
use crate::config::Settings;
use crate::grant::Policy;
use crate::net::Listen;
use crate::pattern::PatternSet;
use crate::scan::{Scanner, Visit};
use crate::serve::servers::ServeSettings;
use crate::setup::{load_patterns, load_settings, Failure};
use crate::source::journal::JournalTarget;

/// Everything a (re)loaded configuration decides.
pub(super) struct Effective {
    pub(super) settings: Settings,
    patterns: Arc<PatternSet>,
    exclude: Vec<ipnet::IpNet>,
    pub(super) journal: Option<JournalTarget>,
}

impl Effective {
    pub(super) fn load(args: &Options) -> Result<Effective, Failure> {
        let (_, settings) = load_settings(&args.cfg, |f| {
            if !args.logs.is_empty() {
                f.source.logs = args.logs.iter().map(|p| p.display().to_string()).collect();
                if !args.journal.given() {
                    // --log alone means: these files only.
                    f.source.journal = crate::config::JournalMode::On(false);
                }
            } else if args.journal.given() {
                // Journal flags alone mean: the journal only.
                f.source.logs.clear();
            }
            if let Some(t) = &args.ttl {
                f.grant.ttl = t.clone();
            }
            if let Some(d) = &args.state_dir {
                f.state.dir = d.display().to_string();
            }
        })?;
        // A directory, FIFO or device named as a log would never give a line: refused at
        // start, as check-config refuses it (a missing file is waited for).
        for log in &settings.logs {
            if let Ok(meta) = std::fs::metadata(log) {
                if !meta.is_file() {
                    return Err(Failure::config(format!(
                        "source.logs: {} is not a regular file; name the log file itself",
                        log.display()
                    )));
                }
            }
        }
        let patterns = Arc::new(load_patterns(&settings, args.patterns.as_deref())?);
        let exclude = crate::setup::build::exclusions(&settings)?;
        let journal = args.journal.target(settings.journal);
        if settings.logs.is_empty()
            && journal.is_none()
            && !settings.push.enabled()
            && !settings.events.enabled()
            && !settings.drac.enabled()
        {
            return Err(Failure::config(
                "source.logs: no log file to follow, the journal is off (source.journal) and nothing is pushed ([push], [events], [drac])",
            ));
        }
        Ok(Effective {
            settings,
            patterns,
            exclude,
            journal,
        })
    }

    pub(super) fn policy(&self) -> Policy {
        Policy::new(self.exclude.clone(), self.settings.ttl)
            .with_ipv6_prefix(self.settings.ipv6_prefix)
    }

    pub(super) fn scanner(&self) -> Scanner {
        crate::setup::build::scanner(&self.settings, &self.patterns, Visit::Logins)
    }
}

/// The servers `[serve]` and `[policy]` ask to run.
pub(super) fn serve_settings(settings: &Settings) -> ServeSettings {
    ServeSettings {
        socketmap: settings.socketmap.clone(),
        metrics: settings.metrics.map(Listen::Inet),
        policy: settings.policy.clone(),
    }
}

/// The names of the sources whose logins open sessions (a saved session of any other
/// source is dropped at start: it can no longer be ended by its source).
pub(super) fn session_sources(cfg: &Effective) -> Vec<String> {
    let mut v: Vec<String> = cfg
        .settings
        .logs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    v.extend(cfg.journal.iter().map(|t| t.key()));
    if cfg.settings.events.enabled() {
        v.push(crate::events::ORIGIN.to_string());
    }
    v
}

/// What shows an open session on this host: its imap process, then `doveadm who`.
pub(super) fn session_probe(settings: &Settings) -> Box<dyn crate::session::Probe> {
    Box::new(crate::session::evidence::HostProbe::new(
        &settings.session_who,
        settings.session_recheck,
    ))
}

pub(super) fn recheck_secs(settings: &Settings) -> i64 {
    i64::try_from(settings.session_recheck.as_secs()).unwrap_or(60)
}

/// `grant.session_hold` in seconds (0: sessions off).
pub(super) fn hold_secs(settings: &Settings) -> i64 {
    i64::try_from(settings.session_hold.as_secs()).unwrap_or(i64::MAX / 4)
}
