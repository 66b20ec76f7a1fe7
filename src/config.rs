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
    pub serve: ServeSection,
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
pub struct ServeSection {
    pub socketmap: String,
    pub socketmap_values: std::collections::BTreeMap<String, String>,
    pub socketmap_default_value: String,
    pub socketmap_max_connections: usize,
    pub socketmap_idle_timeout: String,
    pub metrics: String,
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
    pub socketmap: Option<crate::serve::socketmap::SocketmapConfig>,
    pub metrics: Option<std::net::SocketAddr>,
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
    /// Parses TOML text; `origin` names the file in error messages. Keys the text leaves
    /// out take the embedded default's values; unknown keys are errors.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        let user: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let mut merged: toml::Table = toml::from_str(DEFAULT_CONFIG)
            .unwrap_or_else(|e| panic!("embedded default config is invalid: {e}"));
        merge(&mut merged, user);
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let path = e.path().to_string();
            ConfigError(format!("{origin}: {path}: {}", e.into_inner()))
        })
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
        let socketmap = match self.serve.socketmap.trim() {
            "" => None,
            text => {
                use crate::serve::socketmap::{Listen, SocketmapConfig};
                let listen = Listen::parse(text).map_err(|m| err("serve.socketmap", m))?;
                let word = |key: &str, v: &str| {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
                        Err(err(
                            key,
                            format!("`{v}` must be one word such as OK or RELAY"),
                        ))
                    } else {
                        Ok(())
                    }
                };
                word(
                    "serve.socketmap_default_value",
                    &self.serve.socketmap_default_value,
                )?;
                for (name, v) in &self.serve.socketmap_values {
                    word(&format!("serve.socketmap_values.{name}"), v)?;
                }
                let max_connections = self.serve.socketmap_max_connections;
                if !(1..=10_000).contains(&max_connections) {
                    return Err(err(
                        "serve.socketmap_max_connections",
                        "must be between 1 and 10000",
                    ));
                }
                let idle_timeout = parse_duration(
                    "serve.socketmap_idle_timeout",
                    &self.serve.socketmap_idle_timeout,
                )?;
                if idle_timeout < Duration::from_millis(100) {
                    return Err(err(
                        "serve.socketmap_idle_timeout",
                        "must be at least 100ms",
                    ));
                }
                Some(SocketmapConfig {
                    listen,
                    values: self.serve.socketmap_values.clone(),
                    default_value: self.serve.socketmap_default_value.clone(),
                    max_connections,
                    idle_timeout,
                })
            }
        };
        let metrics = match self.serve.metrics.trim() {
            "" => None,
            text => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
                err(
                    "serve.metrics",
                    format!("`{text}` is not an address like 127.0.0.1:9154"),
                )
            })?),
        };
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
            socketmap,
            metrics,
        })
    }
}

/// Sets every key of `over` in `base`, descending into tables that both have.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32`, `[2001:db8::]/32` (Postfix's mynetworks form) or a
/// bare address (a host network). An IPv4-mapped network (`::ffff:203.0.113.0/120`) becomes
/// the IPv4 network it means, because client addresses are compared in canonical form.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    let unbracketed = t.strip_prefix('[').and_then(|rest| {
        let (addr, tail) = rest.split_once(']')?;
        (tail.is_empty() || tail.starts_with('/')).then(|| format!("{addr}{tail}"))
    });
    let t = unbracketed.as_deref().unwrap_or(t);
    let net = if let Ok(n) = t.parse::<IpNet>() {
        n.trunc()
    } else if let Ok(ip) = t.parse::<IpAddr>() {
        IpNet::from(ip)
    } else {
        return Err(format!(
            "`{text}` is not a CIDR network like 192.0.2.0/24 or 2001:db8::/32"
        ));
    };
    Ok(crate::grant::canonical_net(net))
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
    fn partial_files_take_defaults_and_types_name_their_key() {
        let c = FileConfig::parse("[grant]\nttl = \"5m\"\n", "x.toml").unwrap();
        let s = c.validate().unwrap();
        assert_eq!(s.ttl, Duration::from_secs(300));
        assert_eq!(s.map_path, PathBuf::from("/var/lib/dovegate/relay"));
        let e = FileConfig::parse("[grant]\nttl = 5\n", "x.toml")
            .unwrap_err()
            .0;
        assert!(e.contains("grant.ttl"), "{e}");
        let e = FileConfig::parse("[nope]\nx = 1\n", "x.toml")
            .unwrap_err()
            .0;
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn networks_are_canonical() {
        for (text, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::]/32", "2001:db8::/32"),
            ("[2001:db8::1]", "2001:db8::1/128"),
            ("::ffff:203.0.113.0/120", "203.0.113.0/24"),
            ("[::ffff:203.0.113.9]/120", "203.0.113.0/24"),
            ("::FFFF:192.0.2.7", "192.0.2.7/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::/64", "::/64"),
        ] {
            assert_eq!(parse_net(text).unwrap().to_string(), want, "{text}");
        }
        for bad in [
            "[2001:db8::]x/32",
            "[10.0.0.0/8",
            "10.0.0.0/33",
            "",
            "host.example",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
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
