//! The `pattern` stage: versioned Dovecot login patterns, loaded from data files.
//!
//! Patterns are TOML files (`patterns/*.toml`, embedded at build time, or a directory given
//! with `--patterns`). All enabled patterns are compiled into one multi-pattern regex that
//! runs once over a framed message (linear time, on bytes). Before any regex runs, the
//! caller searches whole buffers for the patterns' literals (`prefilter`), so the 99% of
//! lines that are not Dovecot login lines cost a SIMD substring search and nothing else.

pub mod elements;

use std::collections::BTreeMap;
use std::path::Path;

use aho_corasick::AhoCorasick;
use regex_automata::meta::Regex;
use regex_automata::util::captures::Captures;
use regex_automata::util::syntax;
use regex_automata::Input;
use serde::Deserialize;

pub use elements::IpVerdict;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_patterns.rs"));
}

/// One pattern file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternDef {
    pub id: String,
    /// Dovecot versions whose success line this pattern covers, e.g. `2.2-2.3`.
    pub dovecot: String,
    pub description: String,
    /// Login services the pattern accepts (`imap`, `pop3`, ...).
    pub services: Vec<String>,
    /// On unless the configuration enables it by id.
    pub default: bool,
    /// Lower wins when two patterns match the same message.
    pub priority: i64,
    /// Literals; every matching line contains at least one.
    pub literals: Vec<String>,
    /// Regex over the framed message; groups: `service`, and `elements` or `ip` (+ `user`).
    pub regex: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FragmentsFile {
    fragments: BTreeMap<String, String>,
}

/// A problem in the pattern library, naming the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(pub String);

/// A successful login recognised in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginMatch<'a> {
    /// Index into `PatternSet::defs()`.
    pub pattern: usize,
    pub service: &'a [u8],
    pub user: Option<&'a [u8]>,
    pub ip: IpVerdict,
}

/// The compiled, enabled patterns.
#[derive(Debug)]
pub struct PatternSet {
    defs: Vec<PatternDef>,
    regex: Regex,
    prefilter: AhoCorasick,
    services: Vec<String>,
}

fn expand(
    regex: &str,
    fragments: &BTreeMap<String, String>,
    origin: &str,
) -> Result<String, PatternError> {
    let mut out = regex.to_string();
    // Fragments may use other fragments; a few rounds settle every real library.
    for _ in 0..8 {
        if !out.contains("{{") {
            return Ok(out);
        }
        for (name, text) in fragments {
            out = out.replace(&format!("{{{{{name}}}}}"), text);
        }
    }
    Err(PatternError(format!(
        "{origin}: unknown or circular {{{{fragment}}}} in regex"
    )))
}

/// Reads the library: (file name, text) pairs.
fn read_dir_files(dir: &Path) -> Result<Vec<(String, String)>, PatternError> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        PatternError(format!(
            "{}: cannot read pattern directory: {e}",
            dir.display()
        ))
    })?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| PatternError(format!("{}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PatternError(format!("{}: cannot read: {e}", path.display())))?;
        files.push((path.display().to_string(), text));
    }
    files.sort();
    Ok(files)
}

impl PatternSet {
    /// Loads the embedded library, or the one in `dir`, enabling default patterns plus
    /// `enable` (ids), accepting logins of `services` only.
    pub fn load(
        dir: Option<&Path>,
        services: &[String],
        enable: &[String],
    ) -> Result<PatternSet, PatternError> {
        let files = match dir {
            Some(d) => read_dir_files(d)?,
            None => embedded::EMBEDDED
                .iter()
                .map(|(n, t)| (format!("embedded:{n}"), (*t).to_string()))
                .collect(),
        };
        Self::from_files(&files, services, enable)
    }

    /// Builds from (origin, TOML text) pairs; a file with `[fragments]` defines fragments.
    pub fn from_files(
        files: &[(String, String)],
        services: &[String],
        enable: &[String],
    ) -> Result<PatternSet, PatternError> {
        let mut fragments = BTreeMap::new();
        let mut defs: Vec<(String, PatternDef)> = Vec::new();
        for (origin, text) in files {
            let value: toml::Table =
                toml::from_str(text).map_err(|e| PatternError(format!("{origin}: {e}")))?;
            if value.contains_key("fragments") {
                let f: FragmentsFile =
                    toml::from_str(text).map_err(|e| PatternError(format!("{origin}: {e}")))?;
                fragments.extend(f.fragments);
            } else {
                let d: PatternDef =
                    toml::from_str(text).map_err(|e| PatternError(format!("{origin}: {e}")))?;
                defs.push((origin.clone(), d));
            }
        }
        for id in enable {
            if !defs.iter().any(|(_, d)| &d.id == id) {
                return Err(PatternError(format!(
                    "patterns.enable: no pattern has id `{id}`"
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (origin, d) in &defs {
            if !seen.insert(d.id.clone()) {
                return Err(PatternError(format!(
                    "{origin}: duplicate pattern id `{}`",
                    d.id
                )));
            }
            if d.literals.is_empty() || d.literals.iter().any(String::is_empty) {
                return Err(PatternError(format!(
                    "{origin}: `literals` needs at least one non-empty literal"
                )));
            }
        }
        defs.retain(|(_, d)| d.default || enable.contains(&d.id));
        defs.sort_by(|a, b| (a.1.priority, &a.1.id).cmp(&(b.1.priority, &b.1.id)));
        if defs.is_empty() {
            return Err(PatternError("no pattern is enabled".into()));
        }
        let mut regexes = Vec::new();
        for (origin, d) in &defs {
            let r = expand(&d.regex, &fragments, origin)?;
            // Check each alone so that an error names its file.
            build_regex(&[r.as_str()])
                .map_err(|e| PatternError(format!("{origin}: bad regex: {e}")))?;
            if !d.regex.contains("(?P<service>") && !r.contains("(?P<service>") {
                return Err(PatternError(format!(
                    "{origin}: regex has no `service` group"
                )));
            }
            if !r.contains("(?P<elements>") && !r.contains("(?P<ip>") {
                return Err(PatternError(format!(
                    "{origin}: regex needs an `elements` or `ip` group"
                )));
            }
            regexes.push(r);
        }
        let regex = build_regex(&regexes.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| PatternError(format!("pattern set: {e}")))?;
        let mut literals: Vec<&str> = defs
            .iter()
            .flat_map(|(_, d)| d.literals.iter().map(String::as_str))
            .collect();
        literals.sort();
        literals.dedup();
        let prefilter = AhoCorasick::new(&literals)
            .map_err(|e| PatternError(format!("pattern literals: {e}")))?;
        Ok(PatternSet {
            defs: defs.into_iter().map(|(_, d)| d).collect(),
            regex,
            prefilter,
            services: services.to_vec(),
        })
    }

    pub fn defs(&self) -> &[PatternDef] {
        &self.defs
    }

    /// The literal search run over whole buffers before any regex.
    pub fn prefilter(&self) -> &AhoCorasick {
        &self.prefilter
    }

    /// Fresh capture slots for `match_message` (one per thread, reused).
    pub fn captures(&self) -> Captures {
        self.regex.create_captures()
    }

    /// Matches one framed message; None when it is not a successful login of an enabled
    /// service.
    pub fn match_message<'a>(&self, msg: &'a [u8], caps: &mut Captures) -> Option<LoginMatch<'a>> {
        self.regex.captures(Input::new(msg), caps);
        let pid = caps.pattern()?.as_usize();
        let def = self.defs.get(pid)?;
        let span = |name: &str| caps.get_group_by_name(name).map(|s| &msg[s.range()]);
        let service = span("service")?;
        let svc = std::str::from_utf8(service).ok()?;
        if !self.services.iter().any(|s| s == svc) || !def.services.iter().any(|s| s == svc) {
            return None;
        }
        let (ip, user) = match span("elements") {
            Some(el) => (
                elements::client_ip(el),
                span("user").or_else(|| elements::user(el)),
            ),
            None => {
                let text = span("ip").unwrap_or_default();
                let ip = match elements::parse_ip(text) {
                    Some(ip) => IpVerdict::Valid(ip),
                    None => IpVerdict::Invalid(String::from_utf8_lossy(text).into_owned()),
                };
                (ip, span("user"))
            }
        };
        Some(LoginMatch {
            pattern: pid,
            service,
            user,
            ip,
        })
    }
}

fn build_regex(patterns: &[&str]) -> Result<Regex, String> {
    Regex::builder()
        .syntax(syntax::Config::new().utf8(false).unicode(false))
        .configure(Regex::config().utf8_empty(false))
        .build_many(patterns)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> PatternSet {
        PatternSet::load(None, &["imap".into(), "pop3".into()], &[]).expect("embedded library")
    }

    fn m(msg: &str) -> Option<(String, String)> {
        let s = set();
        let mut caps = s.captures();
        s.match_message(msg.as_bytes(), &mut caps).map(|l| {
            let ip = match l.ip {
                IpVerdict::Valid(ip) => ip.to_string(),
                other => format!("{other:?}"),
            };
            (s.defs()[l.pattern].id.clone(), ip)
        })
    }

    #[test]
    fn eras() {
        let cases = [
            ("imap-login: Logged in: user=<u>, method=PLAIN, rip=203.0.113.4, lip=1.1.1.1, mpid=2, TLS, session=<abc>", "dovecot-2.4", "203.0.113.4"),
            ("pop3-login: Login: user=<u>, method=PLAIN, rip=172.17.0.1, lip=172.17.0.2, mpid=18, TLS, session=<PeYc/+AB>", "dovecot-2.2", "172.17.0.1"),
            ("imap-login: Login: user=<u>, method=PLAIN, rip=185.101.93.86, lip=1.1.1.1, mpid=27548, TLS, TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits)", "dovecot-2.0", "185.101.93.86"),
            ("imap-login: Login: user=<admin>, PID=12151, method=PLAIN, rip=192.168.0.1, lip=10.0.0.1", "dovecot-1", "192.168.0.1"),
            ("imap-login: Login: user=<geo@example.com>, rip=2001:db8::4, lip=10.0.0.1", "dovecot-1", "2001:db8::4"),
            ("imap-login: Login: bob [::ffff:192.0.2.9]", "dovecot-0.99", "192.0.2.9"),
            ("imap-login: Login: user=<u>, rip=198.423.11.235, mpid=1, session=<x>", "dovecot-2.2", "Invalid(\"198.423.11.235\")"),
        ];
        for (msg, id, ip) in cases {
            assert_eq!(m(msg), Some((id.to_string(), ip.to_string())), "{msg}");
        }
    }

    #[test]
    fn near_misses_never_match() {
        for msg in [
            "imap-login: Login failed: Plaintext authentication disabled: user=<>, rip=1.2.3.4, lip=1.1.1.1, session=<a>",
            "imap-login: Aborted login (auth failed, 1 attempts): user=<u>, method=PLAIN, rip=1.2.3.4, lip=1.1.1.1",
            "imap-login: Login aborted: Connection closed (auth failed, 3 attempts in 16 secs) (auth_failed): user=<i>, method=PLAIN, rip=192.0.2.110, lip=0.0.0.0, TLS, session=<C>",
            "imap-login: Disconnected (auth failed, 1 attempts in 6 secs): user=<t>, method=PLAIN, rip=1.1.1.1, lip=7.7.7.7, TLS, session=<a>",
            "imap-login: Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10): user=<j>, method=PLAIN, rip=61.136.200.177, lip=1.1.1.1, TLS, session=<e>",
            "imap-login: Login: user=<username>, method=PLAIN, rip=1.2.3.4, lip=1.2.3.5 Authentication Failure:",
            "lmtp(110): Login: user=<u>, rip=1.2.3.4",
            "auth: Debug: client in: AUTH\t1\tPLAIN\tservice=imap\trip=1.2.3.4",
            "submission-login: Login: user=<u>, method=PLAIN, rip=1.2.3.4, lip=1.1.1.1, mpid=1, session=<a>",
        ] {
            assert_eq!(m(msg), None, "{msg}");
        }
    }

    #[test]
    fn forged_user_cannot_supply_ip() {
        assert_eq!(
            m("imap-login: Login: user=<x, rip=6.6.6.6>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, mpid=1, session=<a>"),
            Some(("dovecot-2.2".into(), "192.0.2.7".into()))
        );
        assert_eq!(
            m("imap-login: Login: user=<x>, rip=6.6.6.6, y>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, mpid=1, session=<a>"),
            Some(("dovecot-2.2".into(), "Ambiguous".into()))
        );
        assert_eq!(
            m("imap-login: Login: user=<x, rip=6.6.6.6>"),
            Some(("dovecot-1".into(), "Missing".into()))
        );
    }

    #[test]
    fn bad_library_names_the_file() {
        let files = vec![("x.toml".to_string(), "id = \"x\"\n".to_string())];
        let e = PatternSet::from_files(&files, &[], &[]).unwrap_err().0;
        assert!(e.starts_with("x.toml:"), "{e}");
        let bad = "id='b'\ndovecot='1'\ndescription=''\nservices=['imap']\ndefault=true\npriority=1\nliterals=['x']\nregex='(?P<service>a'\n";
        let e = PatternSet::from_files(&[("b.toml".into(), bad.into())], &[], &[])
            .unwrap_err()
            .0;
        assert!(e.starts_with("b.toml: bad regex"), "{e}");
    }
}
