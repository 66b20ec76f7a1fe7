//! Configuration: the TOML file (or the embedded default) checked into typed settings.
//!
//! The file keeps durations and networks as text so that every error can name the key at
//! fault (`grant.ttl: ...`); `Settings` is the validated form the rest of the program uses.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The embedded default configuration, also installed as `/etc/dovegate/dovegate.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../packaging/dovegate.toml");

/// The file as written, before validation. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub source: SourceSection,
    pub patterns: PatternsSection,
    pub grant: GrantSection,
    pub map: MapSection,
    pub state: StateSection,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub logs: Vec<String>,
    pub syslog_idents: Vec<String>,
    pub max_line_bytes: usize,
    pub poll_interval: String,
    pub journal: bool,
    pub journal_units: Vec<String>,
    pub journal_comms: Vec<String>,
    pub journal_exes: Vec<String>,
    pub journal_uids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatternsSection {
    pub dir: String,
    pub services: Vec<String>,
    pub enable: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSection {
    pub ttl: String,
    pub exclude: Vec<String>,
    pub exclude_mynetworks: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MapSection {
    pub path: String,
    pub action: String,
    pub commit_interval: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    pub dir: String,
}

/// Validated settings: what every other module reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub logs: Vec<PathBuf>,
    pub syslog_idents: Vec<String>,
    pub max_line_bytes: usize,
    pub poll_interval: Duration,
    pub journal: bool,
    pub provenance: crate::source::journal::Provenance,
    pub patterns_dir: Option<PathBuf>,
    pub services: Vec<String>,
    pub enable_patterns: Vec<String>,
    pub ttl: Duration,
    pub exclude: Vec<IpNet>,
    pub exclude_mynetworks: bool,
    pub map_path: PathBuf,
    pub action: String,
    pub commit_interval: Duration,
    pub state_dir: PathBuf,
}

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(key: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {msg}"))
}

/// Parses a duration such as `30m`, `90s` or `250ms`.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        err(
            key,
            format!("`{text}` is not a duration like 30m or 90s ({e})"),
        )
    })
}

pub const KNOWN_SERVICES: &[&str] = &["imap", "pop3", "submission", "managesieve"];

impl FileConfig {
    /// Parses TOML text; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))
    }

    pub fn embedded() -> FileConfig {
        // The embedded text is checked by a unit test; a failure here is a build defect.
        Self::parse(DEFAULT_CONFIG, "embedded default config")
            .unwrap_or_else(|e| panic!("embedded default config is invalid: {e}"))
    }

    /// Reads the file, or the embedded default when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        match path {
            None => Ok(Self::embedded()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("{}: cannot read: {e}", p.display())))?;
                Self::parse(&text, &p.display().to_string())
            }
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every value and returns the typed settings.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        if self.source.logs.iter().any(|l| l.trim().is_empty()) {
            return Err(err("source.logs", "an entry is empty"));
        }
        for (i, ident) in self.source.syslog_idents.iter().enumerate() {
            let ok = !ident.is_empty()
                && ident
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(err(
                    &format!("source.syslog_idents[{i}]"),
                    format!("`{ident}` is not a syslog tag (letters, digits, - _ .)"),
                ));
            }
        }
        if self.source.syslog_idents.is_empty() {
            return Err(err("source.syslog_idents", "needs at least one tag"));
        }
        let max_line_bytes = self.source.max_line_bytes;
        if !(256..=16 * 1024 * 1024).contains(&max_line_bytes) {
            return Err(err(
                "source.max_line_bytes",
                format!("{max_line_bytes} is outside 256..=16777216"),
            ));
        }
        let poll_interval = parse_duration("source.poll_interval", &self.source.poll_interval)?;
        if poll_interval < Duration::from_millis(50) || poll_interval > Duration::from_secs(60) {
            return Err(err("source.poll_interval", "must be between 50ms and 60s"));
        }
        if self.source.journal_units.is_empty() {
            return Err(err(
                "source.journal_units",
                "needs at least one unit (entries from any other unit never grant)",
            ));
        }
        for (i, u) in self.source.journal_units.iter().enumerate() {
            if u.trim().is_empty() || u.contains(char::is_whitespace) {
                return Err(err(
                    &format!("source.journal_units[{i}]"),
                    format!("`{u}` is not a unit name"),
                ));
            }
        }
        for (i, s) in self.patterns.services.iter().enumerate() {
            if !KNOWN_SERVICES.contains(&s.as_str()) {
                return Err(err(
                    &format!("patterns.services[{i}]"),
                    format!(
                        "unknown service `{s}` (known: {})",
                        KNOWN_SERVICES.join(", ")
                    ),
                ));
            }
        }
        let ttl = parse_duration("grant.ttl", &self.grant.ttl)?;
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(31 * 24 * 3600) {
            return Err(err("grant.ttl", "must be between 1s and 31 days"));
        }
        let mut exclude = Vec::new();
        for (i, net) in self.grant.exclude.iter().enumerate() {
            exclude.push(parse_net(net).map_err(|m| err(&format!("grant.exclude[{i}]"), m))?);
        }
        if self.map.path.trim().is_empty() {
            return Err(err("map.path", "is empty"));
        }
        if self.map.path.ends_with(".lmdb") {
            return Err(err(
                "map.path",
                "name the map as Postfix does, without `.lmdb` (the file is PATH.lmdb)",
            ));
        }
        let action = self.map.action.trim().to_string();
        if action.is_empty() || !action.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err(
                "map.action",
                "must be one word such as OK or RELAY (no spaces)",
            ));
        }
        let commit_interval = parse_duration("map.commit_interval", &self.map.commit_interval)?;
        if commit_interval < Duration::from_millis(50) || commit_interval > Duration::from_secs(1) {
            return Err(err("map.commit_interval", "must be between 50ms and 1s"));
        }
        if self.state.dir.trim().is_empty() {
            return Err(err("state.dir", "is empty"));
        }
        let patterns_dir = match self.patterns.dir.trim() {
            "" => None,
            d => Some(PathBuf::from(d)),
        };
        Ok(Settings {
            logs: self.source.logs.iter().map(PathBuf::from).collect(),
            syslog_idents: self.source.syslog_idents.clone(),
            max_line_bytes,
            poll_interval,
            journal: self.source.journal,
            provenance: crate::source::journal::Provenance {
                units: self.source.journal_units.clone(),
                comms: self.source.journal_comms.clone(),
                exes: self.source.journal_exes.clone(),
                uids: self.source.journal_uids.clone(),
            },
            patterns_dir,
            services: self.patterns.services.clone(),
            enable_patterns: self.patterns.enable.clone(),
            ttl,
            exclude,
            exclude_mynetworks: self.grant.exclude_mynetworks,
            map_path: PathBuf::from(&self.map.path),
            action,
            commit_interval,
            state_dir: PathBuf::from(&self.state.dir),
        })
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a host network).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{text}` is not a CIDR network like 192.0.2.0/24 or 2001:db8::/32"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_validates() {
        let s = FileConfig::embedded().validate().expect("valid");
        assert_eq!(s.ttl, Duration::from_secs(1800));
        assert_eq!(s.map_path, PathBuf::from("/var/lib/dovegate/relay"));
        assert_eq!(s.services, vec!["imap", "pop3"]);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = DEFAULT_CONFIG.replace("[grant]", "[grant]\nttll = \"5m\"");
        let e = FileConfig::parse(&text, "x.toml").unwrap_err().0;
        assert!(e.contains("ttll"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = FileConfig::embedded();
        c.grant.ttl = "soon".into();
        assert!(c.validate().unwrap_err().0.starts_with("grant.ttl:"));
        let mut c = FileConfig::embedded();
        c.grant.exclude = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        assert!(c.validate().unwrap_err().0.starts_with("grant.exclude[1]:"));
        let mut c = FileConfig::embedded();
        c.map.path = "/x/relay.lmdb".into();
        assert!(c.validate().unwrap_err().0.starts_with("map.path:"));
    }
}
