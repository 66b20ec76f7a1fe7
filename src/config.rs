//! Configuration: the TOML file (or the embedded default) checked into typed settings.
//!
//! The file keeps durations and networks as text so that every error can name the key at
//! fault (`grant.ttl: ...`); `Settings` is the validated form the rest of the program uses.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod diag;
pub mod drac;
pub mod events;
pub mod journal;
pub mod listen;
pub mod policy;
pub mod push;
pub mod serve;
pub mod users;

/// The embedded default configuration, also installed as `/etc/dovegate/dovegate.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../packaging/dovegate.toml");

/// The configuration file every command reads when it exists (the package installs it).
pub const SYSTEM_CONFIG: &str = "/etc/dovegate/dovegate.toml";

/// The environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "DOVEGATE_CONFIG";

/// The file a command reads: `--config`, else `$DOVEGATE_CONFIG`, else
/// /etc/dovegate/dovegate.toml when it exists; None: the embedded default.
pub fn config_file(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    // A file that exists but cannot be read is an error later, never a silent fallback.
    let system = Path::new(SYSTEM_CONFIG);
    std::fs::symlink_metadata(system)
        .is_ok()
        .then(|| system.to_path_buf())
}

/// At most this many drop-ins are read (a directory filled by mistake is an error).
const DROPINS_MAX: usize = 256;

/// The drop-in directory of configuration file `file`: `dovegate.d` beside `dovegate.toml`
/// (the stem with `.d`), as systemd's and fail2ban's `jail.d` are.
pub fn dropin_dir(file: &Path) -> PathBuf {
    file.with_extension("d")
}

/// The drop-ins of `file`: `*.toml` in its drop-in directory, in lexical (byte) order of
/// their names; hidden files and any other name (`x.toml.dpkg-old`, `x.toml~`) are
/// skipped. No directory: none.
pub fn dropin_files(file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = dropin_dir(file);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError::file(format!(
                "{}: cannot list the drop-in directory: {e}",
                dir.display()
            )))
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| ConfigError::file(format!("{}: cannot list it: {e}", dir.display())))?;
        let name = entry.file_name();
        let bytes = name.as_encoded_bytes();
        if bytes.starts_with(b".") || !bytes.ends_with(b".toml") {
            continue;
        }
        names.push(name);
        if names.len() > DROPINS_MAX {
            return Err(ConfigError::file(format!(
                "{}: more than {DROPINS_MAX} drop-ins",
                dir.display()
            )));
        }
    }
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The file as written, before validation. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where each key of the file stands, for error messages.
    #[serde(skip)]
    locations: diag::Locations,
    /// The file read (None: the embedded default).
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// The drop-ins read after it, in order (`dovegate.d/*.toml` beside the file).
    #[serde(skip)]
    pub dropins: Vec<PathBuf>,
    pub source: SourceSection,
    pub patterns: PatternsSection,
    pub grant: GrantSection,
    pub map: MapSection,
    pub serve: ServeSection,
    pub state: StateSection,
    pub store: StoreSection,
    pub push: push::PushSection,
    pub policy: policy::PolicySection,
    pub events: events::EventsSection,
    pub drac: drac::DracSection,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub logs: Vec<String>,
    pub syslog_idents: Vec<String>,
    pub max_line_bytes: usize,
    pub poll_interval: String,
    pub journal_give_up: String,
    pub journal: JournalMode,
    pub journal_units: Vec<String>,
    pub journal_comms: Vec<String>,
    pub journal_exes: Vec<String>,
    pub journal_uids: Vec<u32>,
    pub untimed_lines_grant: bool,
}

/// `source.journal`: true, false, or "auto" (the journal where journald runs; else
/// /var/log/mail.log when no log file is configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum JournalMode {
    On(bool),
    Auto(AutoWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

/// What the machine has, for `source.journal = "auto"`.
#[derive(Debug, Clone, Copy)]
pub struct SystemProbe {
    /// journald runs (its native socket exists).
    pub journald: bool,
}

impl SystemProbe {
    pub fn system() -> SystemProbe {
        SystemProbe {
            journald: Path::new("/run/systemd/journal/socket").exists(),
        }
    }
}

/// The log file followed when the journal is off and no file is configured.
pub const DEFAULT_LOG: &str = "/var/log/mail.log";

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
    pub session_hold: String,
    pub session_recheck: String,
    pub session_who: Vec<String>,
    pub never_mechanisms: Vec<String>,
    pub exclude: Vec<String>,
    pub exclude_mynetworks: bool,
    pub postfix_config_dir: String,
    /// IPv6 logins grant their /N prefix (128: the address only).
    pub ipv6_prefix: i64,
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

/// Where grants are shared beyond the local map (PostgreSQL, issue 13).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub postgres_url_file: String,
    pub postgres_schema: String,
    /// MariaDB/MySQL instead of PostgreSQL (issue 23): a file holding a `mysql://` URL.
    pub mysql_url_file: String,
    /// The Dovecot wiki's table (`popbsmtp`), written too when not empty.
    pub mysql_popbsmtp_table: String,
    pub mysql_popbsmtp_address_column: String,
    pub mysql_popbsmtp_time_column: String,
    pub spill_max_grants: usize,
}

/// Validated `[store]`: `url_file` (PostgreSQL) and `mysql_url_file` both None means LMDB
/// only; at most one is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub url_file: Option<PathBuf>,
    pub mysql_url_file: Option<PathBuf>,
    /// The wiki's table: (table, address column, time column), validated identifiers.
    pub popbsmtp: Option<(String, String, String)>,
    pub schema: String,
    pub spill_max_grants: usize,
}

impl StoreSection {
    fn validate(&self) -> Result<StoreSettings, ConfigError> {
        let schema = self.postgres_schema.trim();
        // The schema is the one name put into SQL text (identifiers cannot be parameters):
        // a plain lower-case identifier only.
        let ident_ok = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !schema.as_bytes()[0].is_ascii_digit();
        if !ident_ok {
            return Err(err(
                "store.postgres_schema",
                format!("`{schema}` must be a lower-case identifier such as public"),
            ));
        }
        if !(100..=10_000_000).contains(&self.spill_max_grants) {
            return Err(err(
                "store.spill_max_grants",
                "must be between 100 and 10000000",
            ));
        }
        let url_file = match self.postgres_url_file.trim() {
            "" => None,
            f if !f.starts_with('/') => {
                return Err(err("store.postgres_url_file", "must be an absolute path"))
            }
            f => Some(PathBuf::from(f)),
        };
        let mysql_url_file = match self.mysql_url_file.trim() {
            "" => None,
            f if !f.starts_with('/') => {
                return Err(err("store.mysql_url_file", "must be an absolute path"))
            }
            f => Some(PathBuf::from(f)),
        };
        // One shared database: two would each hold half of the grants' story (revocations
        // in one, renewals in the other).
        if url_file.is_some() && mysql_url_file.is_some() {
            return Err(err(
                "store.mysql_url_file",
                "set either store.postgres_url_file or store.mysql_url_file, not both",
            ));
        }
        // Names put into SQL text (identifiers cannot be parameters): plain ones only.
        let ident = |key: &str, v: &str| -> Result<String, ConfigError> {
            let v = v.trim();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !v.as_bytes()[0].is_ascii_digit();
            if ok {
                Ok(v.to_string())
            } else {
                Err(err(
                    key,
                    format!(
                        "`{v}` must be a plain identifier such as popbsmtp (letters, digits, _)"
                    ),
                ))
            }
        };
        let popbsmtp = match self.mysql_popbsmtp_table.trim() {
            "" => None,
            t => {
                if mysql_url_file.is_none() {
                    return Err(err(
                        "store.mysql_popbsmtp_table",
                        "needs store.mysql_url_file (the table is in that database)",
                    ));
                }
                Some((
                    ident("store.mysql_popbsmtp_table", t)?,
                    ident(
                        "store.mysql_popbsmtp_address_column",
                        &self.mysql_popbsmtp_address_column,
                    )?,
                    ident(
                        "store.mysql_popbsmtp_time_column",
                        &self.mysql_popbsmtp_time_column,
                    )?,
                ))
            }
        };
        Ok(StoreSettings {
            url_file,
            mysql_url_file,
            popbsmtp,
            schema: schema.to_string(),
            spill_max_grants: self.spill_max_grants,
        })
    }
}

/// Validated settings: what every other module reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub logs: Vec<PathBuf>,
    pub syslog_idents: Vec<String>,
    pub max_line_bytes: usize,
    pub poll_interval: Duration,
    /// How long journalctl may keep failing before the daemon exits non-zero.
    pub journal_give_up: Duration,
    pub journal: bool,
    /// Log lines without a timestamp may grant (a source that has none); else refused.
    pub untimed_lines_grant: bool,
    pub provenance: journal::Provenance,
    pub patterns_dir: Option<PathBuf>,
    pub services: Vec<String>,
    pub enable_patterns: Vec<String>,
    pub ttl: Duration,
    /// The longest an open mail session holds its grant after its login (0: sessions off).
    pub session_hold: Duration,
    /// How often an open session's evidence is checked again.
    pub session_recheck: Duration,
    /// `doveadm who -1` (empty: not used).
    pub session_who: Vec<String>,
    /// SASL mechanisms whose logins never grant (upper case).
    pub never_mechanisms: Vec<String>,
    pub exclude: Vec<IpNet>,
    pub exclude_mynetworks: bool,
    /// Prefix length IPv6 logins grant (one of `grant::IPV6_PREFIXES`; 128: the address).
    pub ipv6_prefix: u8,
    /// Postfix's configuration directory for `postconf -c` (None: Postfix's default).
    pub postfix_config_dir: Option<PathBuf>,
    pub map_path: PathBuf,
    pub action: String,
    pub commit_interval: Duration,
    pub state_dir: PathBuf,
    pub socketmap: Option<serve::SocketmapConfig>,
    pub metrics: Option<std::net::SocketAddr>,
    pub store: StoreSettings,
    pub push: push::PushSettings,
    /// The Postfix policy server (None: off).
    pub policy: Option<policy::PolicySettings>,
    pub events: events::EventsSettings,
    /// DRAC clients (off while `drac.allow` is empty).
    pub drac: drac::DracSettings,
}

/// A configuration problem: the key at fault (`grant.ttl`, `push.users[1]`; empty when
/// the problem is a file itself, whose path the problem names), what is wrong with it and
/// what to do, and where the key is written when the file sets it (`FILE:LINE:COLUMN: `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub at: String,
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    /// A problem with the value of `key`.
    pub fn key(key: impl Into<String>, problem: impl std::fmt::Display) -> ConfigError {
        ConfigError {
            at: String::new(),
            key: key.into(),
            problem: problem.to_string(),
        }
    }

    /// A problem with a file or directory (named in `problem`), not with one key.
    pub fn file(problem: impl std::fmt::Display) -> ConfigError {
        ConfigError::key("", problem)
    }

    /// Says where the key at fault is written, when `locations` knows.
    fn located(mut self, locations: &diag::Locations) -> ConfigError {
        if self.at.is_empty() && !self.key.is_empty() {
            self.at = locations.prefix(&self.key);
        }
        self
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.at)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::key(key, msg)
}

/// What is wrong with a map path (map.path, or `--map` on the command line, which is
/// checked where it is parsed so that the message blames the option).
pub fn check_map_path(path: &str) -> Result<(), String> {
    if path.trim().is_empty() {
        return Err("is empty".into());
    }
    if path.starts_with("lmdb:") {
        return Err("write the path without the `lmdb:` prefix (Postfix's main.cf has lmdb:PATH; here only PATH)".into());
    }
    if !path.starts_with('/') {
        return Err(format!(
            "`{path}` must be an absolute path (Postfix opens it from its own directory)"
        ));
    }
    if path.ends_with(".lmdb") {
        return Err("name the map as Postfix does, without `.lmdb` (the file is PATH.lmdb)".into());
    }
    Ok(())
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
    /// Every problem is one line `origin:line:column: key: problem`.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        Self::parse_layers(&[(text.to_string(), origin.to_string())])
    }

    /// Parses the main file and its drop-ins, `(text, origin)` in the order read: each
    /// key takes the value of the last layer that sets it (tables merge key by key; a list
    /// is one value). A problem names the layer, line and column at fault.
    pub fn parse_layers(layers: &[(String, String)]) -> Result<FileConfig, ConfigError> {
        let mut merged: toml::Table = toml::from_str(DEFAULT_CONFIG)
            .unwrap_or_else(|e| panic!("embedded default config is invalid: {e}"));
        let known = merged.clone();
        let mut locations: Option<diag::Locations> = None;
        for (text, origin) in layers {
            let here = diag::locate(text, origin).map_err(ConfigError::file)?;
            let user: toml::Table = toml::from_str(text)
                .map_err(|e| ConfigError::file(format!("{origin}: {}", e.message())))?;
            let unknown = diag::unknown_keys(&user, &known, &here);
            if !unknown.is_empty() {
                return Err(ConfigError::file(unknown.join("\n")));
            }
            merge(&mut merged, user);
            match &mut locations {
                Some(l) => l.overlay(here),
                None => locations = Some(here),
            }
        }
        let locations = locations.unwrap_or_default();
        let mut file: FileConfig = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
                let path = e.path().to_string();
                let msg = e.into_inner().to_string();
                let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
                ConfigError::key(path, msg).located(&locations)
            })?;
        file.locations = locations;
        Ok(file)
    }

    pub fn embedded() -> FileConfig {
        // The embedded text is checked by a unit test; a failure here is a build defect.
        Self::parse(DEFAULT_CONFIG, "embedded default config")
            .unwrap_or_else(|e| panic!("embedded default config is invalid: {e}"))
    }

    /// Reads the file `config_file(explicit)` names and its drop-ins, or the embedded
    /// default.
    pub fn load(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(p) = config_file(explicit) else {
            return Ok(Self::embedded());
        };
        let read = |f: &Path| {
            crate::fsread::read_text(f, crate::fsread::CONFIG_MAX, crate::fsread::Links::Follow)
        };
        let text = read(&p).map_err(|e| {
            ConfigError::file(format!(
                "{e} (the configuration; name another with --config or {CONFIG_ENV})"
            ))
        })?;
        let mut layers = vec![(text, p.display().to_string())];
        let dropins = dropin_files(&p)?;
        for d in &dropins {
            let text = read(d).map_err(|e| ConfigError::file(format!("{e} (a drop-in)")))?;
            layers.push((text, d.display().to_string()));
        }
        let mut file = Self::parse_layers(&layers)?;
        file.file = Some(p);
        file.dropins = dropins;
        Ok(file)
    }

    /// The files read, for messages: `FILE` or `FILE + DROPIN, ...`.
    pub fn describe(&self) -> String {
        let Some(f) = &self.file else {
            return format!(
                "the embedded default (no {SYSTEM_CONFIG}, no --config, no {CONFIG_ENV})"
            );
        };
        let mut out = f.display().to_string();
        for (i, d) in self.dropins.iter().enumerate() {
            out.push_str(if i == 0 { " + " } else { ", " });
            out.push_str(&d.display().to_string());
        }
        out
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every value and returns the typed settings; an error names the file, line and
    /// column of the key at fault when the file sets it.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        self.validate_with(SystemProbe::system())
    }

    /// `validate`, with what the machine has given (for `source.journal = "auto"`).
    pub fn validate_with(&self, probe: SystemProbe) -> Result<Settings, ConfigError> {
        self.check_values(probe)
            .map_err(|e| e.located(&self.locations))
    }

    fn check_values(&self, probe: SystemProbe) -> Result<Settings, ConfigError> {
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
        let journal_give_up =
            parse_duration("source.journal_give_up", &self.source.journal_give_up)?;
        if journal_give_up < Duration::from_secs(1) {
            return Err(err("source.journal_give_up", "must be at least 1s"));
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
        let session_hold = parse_duration("grant.session_hold", &self.grant.session_hold)?;
        if session_hold > Duration::from_secs(31 * 24 * 3600) {
            return Err(err(
                "grant.session_hold",
                "must be at most 31 days (0: off)",
            ));
        }
        let session_recheck = parse_duration("grant.session_recheck", &self.grant.session_recheck)?;
        if session_recheck < Duration::from_secs(1) || session_recheck > Duration::from_secs(3600) {
            return Err(err("grant.session_recheck", "must be between 1s and 1h"));
        }
        if self.grant.session_who.len() > 32
            || self
                .grant
                .session_who
                .first()
                .is_some_and(|p| p.trim().is_empty())
        {
            return Err(err(
                "grant.session_who",
                "must be a command and its arguments, such as [\"doveadm\", \"who\", \"-1\"] ([] : not used)",
            ));
        }
        let mut never_mechanisms = Vec::new();
        for (i, m) in self.grant.never_mechanisms.iter().enumerate() {
            let m = m.trim();
            if m.is_empty()
                || m.len() > 40
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(
                    &format!("grant.never_mechanisms[{i}]"),
                    format!("`{m}` is not a SASL mechanism name (such as ANONYMOUS)"),
                ));
            }
            never_mechanisms.push(m.to_ascii_uppercase());
        }
        let mut exclude = Vec::new();
        for (i, net) in self.grant.exclude.iter().enumerate() {
            exclude.push(parse_net(net).map_err(|m| err(&format!("grant.exclude[{i}]"), m))?);
        }
        let ipv6_prefix = crate::model::address::check_ipv6_prefix(self.grant.ipv6_prefix)
            .map_err(|m| err("grant.ipv6_prefix", m))?;
        check_map_path(&self.map.path).map_err(|m| err("map.path", m))?;
        // Only actions Postfix's access(5) treats as "permit" for relaying: anything else
        // (a typo like PERMT) makes smtpd answer 451 to every granted client.
        let action = self.map.action.trim().to_ascii_uppercase();
        if action != "OK" && action != "RELAY" {
            return Err(err(
                "map.action",
                format!(
                    "`{}` is not an access(5) action that permits relaying; use OK or RELAY",
                    self.map.action
                ),
            ));
        }
        let commit_interval = parse_duration("map.commit_interval", &self.map.commit_interval)?;
        if commit_interval < Duration::from_millis(50) || commit_interval > Duration::from_secs(1) {
            return Err(err("map.commit_interval", "must be between 50ms and 1s"));
        }
        let socketmap = match self.serve.socketmap.trim() {
            "" => None,
            text => {
                use listen::Listen;
                use serve::SocketmapConfig;
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
        let mut logs: Vec<PathBuf> = self.source.logs.iter().map(PathBuf::from).collect();
        let journal = match self.source.journal {
            JournalMode::On(on) => on,
            JournalMode::Auto(_) => probe.journald,
        };
        if !journal && logs.is_empty() && self.source.journal != JournalMode::On(false) {
            logs.push(PathBuf::from(DEFAULT_LOG));
        }
        Ok(Settings {
            logs,
            syslog_idents: self.source.syslog_idents.clone(),
            max_line_bytes,
            poll_interval,
            journal_give_up,
            journal,
            untimed_lines_grant: self.source.untimed_lines_grant,
            provenance: journal::Provenance {
                units: self.source.journal_units.clone(),
                comms: self.source.journal_comms.clone(),
                exes: self.source.journal_exes.clone(),
                uids: self.source.journal_uids.clone(),
            },
            patterns_dir,
            services: self.patterns.services.clone(),
            enable_patterns: self.patterns.enable.clone(),
            ttl,
            session_hold,
            session_recheck,
            session_who: self.grant.session_who.clone(),
            never_mechanisms,
            exclude,
            exclude_mynetworks: self.grant.exclude_mynetworks,
            ipv6_prefix,
            postfix_config_dir: match self.grant.postfix_config_dir.trim() {
                "" => None,
                d => Some(PathBuf::from(d)),
            },
            map_path: PathBuf::from(&self.map.path),
            action,
            commit_interval,
            state_dir: PathBuf::from(&self.state.dir),
            socketmap,
            metrics,
            store: self.store.validate()?,
            push: push::PushSettings::from_section(&self.push)?,
            policy: policy::PolicySettings::from_section(&self.policy)?,
            events: events::EventsSettings::from_section(&self.events)?,
            drac: drac::DracSettings::from_section(&self.drac)?,
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
    Ok(crate::model::address::canonical_net(net))
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
    fn errors_name_file_line_column_and_suggest() {
        let e = FileConfig::parse(
            "[grant]\nttl = \"5m\"\ntll = \"9m\"\n\n[map]\npat = \"/x\"\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            vec![
                "f.toml:3:1: grant.tll: unknown key (did you mean ttl?)",
                "f.toml:6:1: map.pat: unknown key (did you mean path?)"
            ]
        );
        let e = FileConfig::parse("[grant]\npath = \"/x\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean map.path?"), "{e}");
        let e = FileConfig::parse("\n[grant]\n  ttl = 5\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:3:3: grant.ttl: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let c = FileConfig::parse("[grant]\n\nttl = \"soon\"\n", "f.toml").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("f.toml:3:1: grant.ttl: "), "{e}");
    }

    #[test]
    fn one_shared_database_at_most() {
        let mut c = FileConfig::embedded();
        assert!(c.validate().unwrap().store.mysql_url_file.is_none());
        c.store.mysql_url_file = "/etc/dovegate/mysql.url".into();
        let s = c.validate().unwrap();
        assert_eq!(
            s.store.mysql_url_file,
            Some(PathBuf::from("/etc/dovegate/mysql.url"))
        );
        assert!(s.store.url_file.is_none());
        c.store.postgres_url_file = "/etc/dovegate/postgres.url".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("store.mysql_url_file") && e.contains("not both"),
            "{e}"
        );
        c.store.postgres_url_file.clear();
        c.store.mysql_url_file = "mysql.url".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("must be an absolute path"), "{e}");
        c.store.mysql_url_file = "/etc/dovegate/mysql.url".into();
        c.store.mysql_popbsmtp_table = "popbsmtp".into();
        assert_eq!(
            c.validate().unwrap().store.popbsmtp,
            Some(("popbsmtp".into(), "address".into(), "last_seen".into()))
        );
        c.store.mysql_popbsmtp_time_column = "last_seen`; DROP TABLE x; --".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("store.mysql_popbsmtp_time_column"), "{e}");
    }

    #[test]
    fn journal_auto_follows_the_machine() {
        let c = FileConfig::embedded();
        let with = c.validate_with(SystemProbe { journald: true }).unwrap();
        assert!(with.journal);
        assert!(with.logs.is_empty());
        let without = c.validate_with(SystemProbe { journald: false }).unwrap();
        assert!(!without.journal);
        assert_eq!(without.logs, vec![PathBuf::from(DEFAULT_LOG)]);
        let off = FileConfig::parse("[source]\njournal = false\nlogs = []\n", "f").unwrap();
        let s = off.validate_with(SystemProbe { journald: true }).unwrap();
        assert!(!s.journal && s.logs.is_empty());
        assert!(FileConfig::parse("[source]\njournal = \"maybe\"\n", "f").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let text = DEFAULT_CONFIG.replace("[grant]", "[grant]\nttll = \"5m\"");
        let e = FileConfig::parse(&text, "x.toml").unwrap_err().to_string();
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
            .to_string();
        assert!(e.contains("grant.ttl"), "{e}");
        let e = FileConfig::parse("[nope]\nx = 1\n", "x.toml")
            .unwrap_err()
            .to_string();
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
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("embedded default config:") && e.contains(": grant.ttl: "),
            "{e}"
        );
        let mut c = FileConfig::embedded();
        let mut p = c.clone();
        p.grant.ipv6_prefix = 60;
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("grant.ipv6_prefix: 60 is not one of"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        c.grant.exclude = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains(": grant.exclude[1]:"));
        let mut c = FileConfig::embedded();
        c.map.path = "/x/relay.lmdb".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains(": map.path:"));
        for (path, bad) in [("lmdb:/x/relay", "lmdb:"), ("relay", "absolute")] {
            let mut c = FileConfig::embedded();
            c.map.path = path.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("map.path") && e.contains(bad), "{e}");
        }
        for (action, ok) in [
            ("OK", true),
            ("relay", true),
            ("PERMT", false),
            ("REJECT", false),
        ] {
            let mut c = FileConfig::embedded();
            c.map.action = action.into();
            assert_eq!(c.validate().is_ok(), ok, "{action}");
        }
    }

    /// Drop-ins: read after the main file in name order; each key takes the last value set
    /// (tables merge key by key, a list is one value); a problem names the layer at fault.
    #[test]
    fn dropins_override_per_key_in_order() {
        let layers = |l: &[(&str, &str)]| -> Vec<(String, String)> {
            l.iter()
                .map(|(t, o)| (t.to_string(), o.to_string()))
                .collect()
        };
        let c = FileConfig::parse_layers(&layers(&[
            (
                "[grant]\nttl = \"10m\"\nexclude = [\"10.0.0.0/8\"]\n",
                "main.toml",
            ),
            ("[grant]\nttl = \"20m\"\n", "main.d/10-a.toml"),
            (
                "[grant]\nexclude = [\"192.0.2.0/24\"]\n[map]\naction = \"RELAY\"\n",
                "main.d/20-b.toml",
            ),
        ]))
        .unwrap();
        assert_eq!(c.grant.ttl, "20m");
        assert_eq!(c.grant.exclude, vec!["192.0.2.0/24".to_string()]);
        assert_eq!(c.map.action, "RELAY");
        // Untouched keys keep the default.
        assert_eq!(
            c.grant.session_hold,
            FileConfig::embedded().grant.session_hold
        );
        // An unknown key, a syntax error and a bad value: each named at its drop-in's line.
        let e = FileConfig::parse_layers(&layers(&[
            ("[grant]\nttl = \"10m\"\n", "main.toml"),
            ("\n[grant]\ntll = \"20m\"\n", "main.d/10-a.toml"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("main.d/10-a.toml:3:1: grant.tll: unknown key"),
            "{e}"
        );
        let e = FileConfig::parse_layers(&layers(&[
            ("", "main.toml"),
            ("[grant\n", "main.d/10-a.toml"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("main.d/10-a.toml:1:"), "{e}");
        let c = FileConfig::parse_layers(&layers(&[
            ("[grant]\nttl = \"10m\"\n", "main.toml"),
            ("[grant]\nttl = \"soon\"\n", "main.d/10-a.toml"),
        ]))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("main.d/10-a.toml:2:1: grant.ttl:"), "{e}");
        let e = FileConfig::parse_layers(&layers(&[
            ("[grant]\nttl = 5\n", "main.toml"),
            ("[map]\naction = \"OK\"\n", "main.d/10-a.toml"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("main.toml:2:1: grant.ttl:"), "{e}");
    }

    /// The packaged /etc file sets nothing: its configuration is the embedded default.
    #[test]
    fn packaged_etc_file_is_the_default() {
        let etc = FileConfig::parse(
            include_str!("../packaging/etc-dovegate.toml"),
            "etc-dovegate.toml",
        )
        .unwrap();
        assert_eq!(etc.to_toml(), FileConfig::embedded().to_toml());
    }

    #[test]
    fn dropin_files_in_lexical_order() {
        let d = tempfile::tempdir().unwrap();
        let main = d.path().join("dovegate.toml");
        assert!(
            dropin_files(&main).unwrap().is_empty(),
            "no directory: none"
        );
        let dir = d.path().join("dovegate.d");
        std::fs::create_dir(&dir).unwrap();
        for n in [
            "20-b.toml",
            "10-a.toml",
            "9-c.toml",
            ".hidden.toml",
            "x.toml~",
            "y.toml.dpkg-old",
            "notes.txt",
        ] {
            std::fs::write(dir.join(n), "").unwrap();
        }
        let names: Vec<String> = dropin_files(&main)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-a.toml", "20-b.toml", "9-c.toml"]);
    }
}
