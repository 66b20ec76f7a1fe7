//! What every command and the daemon share: the options that name the configuration, its
//! loading and validation, the pattern library, the grant `Policy` and `Scanner` (`build`),
//! and `Failure` with its exit codes. `cli` and `daemon` both import it; it imports
//! neither (ARCHITECTURE.md's layer table).

pub mod build;
pub mod dovecot;

use std::path::{Path, PathBuf};

use crate::config::{FileConfig, Settings};
use crate::pattern::PatternSet;
use crate::source::journal::JournalTarget;

/// Options every command that reads the configuration shares.
#[derive(Debug, clap::Args, Clone, Default)]
pub struct ConfigArgs {
    /// Configuration file (default: $DOVEGATE_CONFIG, else /etc/dovegate/dovegate.toml
    /// when it exists, else the embedded default that `dovegate config --default` prints).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The map as Postfix names it, without `.lmdb` (overrides map.path).
    #[arg(long, value_name = "PATH", value_parser = map_path_arg)]
    pub map: Option<PathBuf>,
}

/// `--map` checked as map.path is, when parsed: a mistake is blamed on the option, not on
/// the configuration whose map.path it replaces.
fn map_path_arg(text: &str) -> Result<PathBuf, String> {
    crate::config::check_map_path(text)?;
    Ok(PathBuf::from(text))
}

/// Journal selection, shared by `run` and `test`.
#[derive(Debug, clap::Args, Default, Clone)]
pub struct JournalArgs {
    /// Follow the system journal (source.journal = true). Without --log, files are not followed.
    #[arg(long)]
    pub journal: bool,
    /// Read the journal in this directory instead of the system one (containers, tests).
    #[arg(long, value_name = "DIR", conflicts_with = "journal_file")]
    pub journal_dir: Option<PathBuf>,
    /// Read this journal file.
    #[arg(long, value_name = "FILE")]
    pub journal_file: Option<PathBuf>,
}

impl JournalArgs {
    /// Any journal flag given on the command line.
    pub fn given(&self) -> bool {
        self.journal || self.journal_dir.is_some() || self.journal_file.is_some()
    }

    /// The journal to read, if journal mode is on (flags, else `source.journal`).
    pub fn target(&self, configured: bool) -> Option<JournalTarget> {
        if let Some(f) = &self.journal_file {
            Some(JournalTarget::File(f.clone()))
        } else if let Some(d) = &self.journal_dir {
            Some(JournalTarget::Directory(d.clone()))
        } else if self.journal || configured {
            Some(JournalTarget::System)
        } else {
            None
        }
    }
}

/// A command's failure: its message and exit code (2: bad configuration or usage).
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn config(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

/// A configuration problem exits 2, as `check-config` does: the configuration must change.
impl From<crate::config::ConfigError> for Failure {
    fn from(e: crate::config::ConfigError) -> Failure {
        Failure::config(e.to_string())
    }
}

/// A server that cannot start (its address taken, a socket another daemon answers on)
/// exits 1: the configuration may be right, the machine is not ready for it.
impl From<crate::net::StartError> for Failure {
    fn from(e: crate::net::StartError) -> Failure {
        Failure::runtime(e.to_string())
    }
}

/// Loads the configuration, applies the common overrides, validates.
pub fn load_settings(
    cfg: &ConfigArgs,
    edit: impl FnOnce(&mut FileConfig),
) -> Result<(FileConfig, Settings), Failure> {
    let mut file = FileConfig::load(cfg.config.as_deref())?;
    if let Some(m) = &cfg.map {
        file.map.path = m.display().to_string();
    }
    edit(&mut file);
    let settings = file.validate()?;
    Ok((file, settings))
}

/// The pattern library the settings ask for.
pub fn load_patterns(settings: &Settings, dir: Option<&Path>) -> Result<PatternSet, Failure> {
    let dir = dir.or(settings.patterns_dir.as_deref());
    let sessions = !settings.session_hold.is_zero();
    let mut p = PatternSet::load_for(dir, &settings.services, &settings.enable_patterns, sessions)
        .map_err(|e| Failure::config(e.0))?;
    p.set_never_mechanisms(&settings.never_mechanisms);
    Ok(p)
}
