//! The `pattern` stage: versioned Dovecot login patterns, loaded from data files.
//!
//! Patterns are TOML files (`patterns/*.toml`, embedded at build time, or a directory given
//! with `--patterns`). All enabled patterns are compiled into one multi-pattern regex that
//! runs once over a framed message (linear time, on bytes). Before any regex runs, the
//! caller searches whole buffers for the patterns' literals (`prefilter`), so the 99% of
//! lines that are not Dovecot login lines cost a SIMD substring search and nothing else.
//!
//! A line is claimed by one era's grammar: when another enabled pattern also matches it
//! and reads a different address (a 0.99 `Login: user [ip]` whose user name holds
//! `, rip=X,`, a 1.x element list ending in ` [IP]`), the line is ambiguous and grants
//! nothing.

pub mod elements;
mod literals;
mod proxy;
mod split;
mod star;

use std::collections::BTreeMap;
use std::path::Path;

pub use literals::Literals;
use regex_automata::meta::Regex;
use regex_automata::util::captures::Captures;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, PatternID};
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
    /// The element that holds the client address, for sites whose
    /// `login_log_format_elements` names it differently (default `rip`).
    #[serde(default = "default_address_element")]
    pub address_element: String,
    /// The `user` group is Dovecot's `proxy(USER...)` log prefix, written before the
    /// success text: the match counts only when the element list is strict and its user
    /// element is that user, whole (not cut by Dovecot's 80-byte `str_sanitize`; see
    /// `proxy.rs`).
    #[serde(default)]
    pub prefix_user: bool,
    /// What the pattern recognises: a successful login (default), or the end of a mail
    /// session (`imap(user)<PID><ID>: Disconnected: ...`), which holds no address and
    /// never grants by itself.
    #[serde(default)]
    pub kind: PatternKind,
}

/// What a pattern recognises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatternKind {
    #[default]
    Login,
    /// Groups: `service`, `user`, and `pid` and `session` where the line has them (or an
    /// `elements` list holding `session=<ID>`, a proxy's end).
    SessionEnd,
}

/// The end of a mail session, as a session-end pattern reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEndMatch<'a> {
    /// `imap`, `pop3`, `imap-hibernate`, `imap-login` (a proxy).
    pub service: &'a [u8],
    pub pid: Option<u32>,
    pub session: Option<&'a [u8]>,
    pub user: Option<&'a [u8]>,
}

fn default_address_element() -> String {
    "rip".to_string()
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
    /// `session=<ID>` and `mpid=PID`, when the line has them (2.2+): the mail session this
    /// login opened.
    pub session: Option<crate::model::SessionStart>,
    /// `method=`: the SASL mechanism, when the line has it.
    pub mechanism: Option<&'a [u8]>,
}

/// The compiled, enabled patterns.
#[derive(Debug)]
pub struct PatternSet {
    defs: Vec<PatternDef>,
    regex: Regex,
    /// Per login pattern, its cheap-captures form (see `split`), when it has one.
    splits: Vec<Option<split::Split>>,
    prefilter: Literals,
    services: Vec<String>,
    /// Whether each pattern reads its address from an `elements` group (else `ip`).
    has_elements: Vec<bool>,
    /// The session-end patterns, in one regex (None: none enabled).
    ends: Option<Regex>,
    /// Per session-end pattern, its cheap-captures form (see `star`), when it has one.
    end_stars: Vec<Option<star::Star>>,
    /// Every enabled pattern's literals (the prefilter's).
    literals: Vec<String>,
    /// The login patterns' literals together: a message holding none cannot match, so
    /// the regex (the costly part of a candidate line) is not run.
    login_gate: LiteralGate,
    /// The session-end patterns' literals together.
    end_gate: LiteralGate,
    /// SASL mechanisms whose logins never grant (grant.never_mechanisms), upper case.
    never: Vec<String>,
}

/// Some literal of a set occurs in a text (a few memchr-speed searches over one message).
#[derive(Debug)]
struct LiteralGate(Vec<memchr::memmem::Finder<'static>>);

impl LiteralGate {
    fn new<'s>(literals: impl IntoIterator<Item = &'s String>) -> LiteralGate {
        let mut literals: Vec<&String> = literals.into_iter().collect();
        literals.sort_unstable();
        literals.dedup();
        LiteralGate(
            literals
                .into_iter()
                .map(|l| memchr::memmem::Finder::new(l.as_bytes()).into_owned())
                .collect(),
        )
    }

    fn admits(&self, text: &[u8]) -> bool {
        self.0.iter().any(|f| f.find(text).is_some())
    }
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
        let text = crate::fsread::read_text(
            &path,
            crate::fsread::CONFIG_MAX,
            crate::fsread::Links::Follow,
        )
        .map_err(|e| PatternError(e.to_string()))?;
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
        Self::load_for(dir, services, enable, true)
    }

    /// Like `load`; without `sessions` (grant.session_hold = 0) the session-end patterns
    /// are checked but left out, so that their lines cost nothing.
    pub fn load_for(
        dir: Option<&Path>,
        services: &[String],
        enable: &[String],
        sessions: bool,
    ) -> Result<PatternSet, PatternError> {
        let files = match dir {
            Some(d) => read_dir_files(d)?,
            None => embedded::EMBEDDED
                .iter()
                .map(|(n, t)| (format!("embedded:{n}"), (*t).to_string()))
                .collect(),
        };
        Self::build(&files, services, enable, sessions)
    }

    /// Builds from (origin, TOML text) pairs; a file with `[fragments]` defines fragments.
    pub fn from_files(
        files: &[(String, String)],
        services: &[String],
        enable: &[String],
    ) -> Result<PatternSet, PatternError> {
        Self::build(files, services, enable, true)
    }

    fn build(
        files: &[(String, String)],
        services: &[String],
        enable: &[String],
        sessions: bool,
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
            if d.literals.iter().any(|l| l.contains('\n')) {
                return Err(PatternError(format!(
                    "{origin}: a literal cannot hold a newline (a line never does)"
                )));
            }
            if d.literals.is_empty() || d.literals.iter().any(String::is_empty) {
                return Err(PatternError(format!(
                    "{origin}: `literals` needs at least one non-empty literal"
                )));
            }
            if d.address_element.is_empty()
                || !d
                    .address_element
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(PatternError(format!(
                    "{origin}: `address_element` must be an element name like `rip`, not `{}`",
                    d.address_element
                )));
            }
        }
        defs.retain(|(_, d)| d.default || enable.contains(&d.id));
        defs.sort_by(|a, b| (a.1.priority, &a.1.id).cmp(&(b.1.priority, &b.1.id)));
        let (mut end_defs, defs): (Vec<_>, Vec<_>) = defs
            .into_iter()
            .partition(|(_, d)| d.kind == PatternKind::SessionEnd);
        let mut end_regexes = Vec::new();
        for (origin, d) in &end_defs {
            let r = expand(&d.regex, &fragments, origin)?;
            build_regex(&[r.as_str()])
                .map_err(|e| PatternError(format!("{origin}: bad regex: {e}")))?;
            if !r.contains("(?P<service>") {
                return Err(PatternError(format!(
                    "{origin}: a session-end regex needs a `service` group"
                )));
            }
            if !["session", "elements", "user"]
                .iter()
                .any(|g| r.contains(&format!("(?P<{g}>")))
            {
                return Err(PatternError(format!(
                    "{origin}: a session-end regex needs a `session` (or `elements`) group, or at least `user`"
                )));
            }
            end_regexes.push(r);
        }
        if !sessions {
            end_defs.clear();
            end_regexes.clear();
        }
        let end_stars = end_regexes
            .iter()
            .map(|r| star::Star::new(r, |t| build_regex(&[t])))
            .collect();
        let ends = if end_regexes.is_empty() {
            None
        } else {
            Some(
                build_regex(&end_regexes.iter().map(String::as_str).collect::<Vec<_>>())
                    .map_err(|e| PatternError(format!("session-end patterns: {e}")))?,
            )
        };
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
            if d.prefix_user && !(r.contains("(?P<elements>") && r.contains("(?P<user>")) {
                return Err(PatternError(format!(
                    "{origin}: `prefix_user` needs `user` and `elements` groups"
                )));
            }
            regexes.push(r);
        }
        let regex = build_regex(&regexes.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| PatternError(format!("pattern set: {e}")))?;
        let splits = regexes
            .iter()
            .map(|r| split::Split::new(r, |t| build_regex(&[t])))
            .collect();
        let mut literals: Vec<&str> = defs
            .iter()
            .chain(&end_defs)
            .flat_map(|(_, d)| d.literals.iter().map(String::as_str))
            .collect();
        literals.sort();
        literals.dedup();
        let prefilter = literal_searcher(&literals)?;
        let literals: Vec<String> = literals.into_iter().map(str::to_string).collect();
        let has_elements = regexes
            .iter()
            .map(|r| r.contains("(?P<elements>"))
            .collect();
        let login_gate = LiteralGate::new(defs.iter().flat_map(|(_, d)| &d.literals));
        let end_gate = LiteralGate::new(end_defs.iter().flat_map(|(_, d)| &d.literals));
        Ok(PatternSet {
            login_gate,
            end_gate,
            defs: defs.into_iter().map(|(_, d)| d).collect(),
            regex,
            splits,
            prefilter,
            services: services.to_vec(),
            has_elements,
            ends,
            end_stars,
            literals,
            never: vec!["ANONYMOUS".to_string()],
        })
    }

    pub fn defs(&self) -> &[PatternDef] {
        &self.defs
    }

    /// SASL mechanisms that prove nothing about the user (grant.never_mechanisms; the
    /// default is ANONYMOUS): their logins never grant.
    pub fn set_never_mechanisms(&mut self, never: &[String]) {
        self.never = never.iter().map(|m| m.to_ascii_uppercase()).collect();
    }

    /// Whether this login's mechanism is one that never grants.
    pub fn refuses(&self, login: &LoginMatch<'_>) -> bool {
        login.mechanism.is_some_and(|m| {
            self.never
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(m))
        })
    }

    /// The literals the prefilter searches for.
    pub fn literals(&self) -> &[String] {
        &self.literals
    }

    /// The literal search run over whole buffers before any regex.
    pub fn prefilter(&self) -> &Literals {
        &self.prefilter
    }

    /// Fresh capture slots for `match_message` (one per thread, reused).
    pub fn captures(&self) -> Slots {
        Slots {
            whole: self.regex.create_captures(),
            heads: self
                .splits
                .iter()
                .map(|s| s.as_ref().map(split::Split::captures))
                .collect(),
        }
    }

    /// Matches one framed message; None when it is not a successful login of an enabled
    /// service.
    pub fn match_message<'a>(&self, msg: &'a [u8], slots: &mut Slots) -> Option<LoginMatch<'a>> {
        if !self.login_gate.admits(msg) {
            return None;
        }
        let found = self.regex.search(&Input::new(msg))?;
        let pid = found.pattern().as_usize();
        let fast = match (&self.splits[pid], &mut slots.heads[pid]) {
            (Some(split), Some(head)) if found.start() == 0 => {
                split.groups(msg, head).map(|elements| (&*head, elements))
            }
            _ => None,
        };
        let mut login = match fast {
            Some((head, elements)) => self.read(pid, msg, &Groups::Split { head, elements })?,
            None => {
                let input = Input::new(msg)
                    .range(found.start()..)
                    .anchored(Anchored::Pattern(found.pattern()));
                self.regex.captures(input, &mut slots.whole);
                self.read(pid, msg, &Groups::Whole(&slots.whole))?
            }
        };
        if login.ip != IpVerdict::Ambiguous
            && self.another_grammar_disagrees(&login, msg, &mut slots.whole)
        {
            login.ip = IpVerdict::Ambiguous;
        }
        Some(login)
    }

    /// `match_message` by the whole regex's captures only (what the split form must equal).
    #[cfg(test)]
    fn match_message_whole<'a>(
        &self,
        msg: &'a [u8],
        caps: &mut Captures,
    ) -> Option<LoginMatch<'a>> {
        self.regex.captures(Input::new(msg), caps);
        let pid = caps.pattern()?.as_usize();
        let mut login = self.read(pid, msg, &Groups::Whole(caps))?;
        if login.ip != IpVerdict::Ambiguous && self.another_grammar_disagrees(&login, msg, caps) {
            login.ip = IpVerdict::Ambiguous;
        }
        Some(login)
    }

    /// Fresh capture slots for `match_session_end`.
    pub fn end_captures(&self) -> Option<EndSlots> {
        Some(EndSlots {
            whole: self.ends.as_ref()?.create_captures(),
            stars: self
                .end_stars
                .iter()
                .map(|s| s.as_ref().map(star::Star::captures))
                .collect(),
        })
    }

    /// The session end this framed message reports, if a session-end pattern matches.
    pub fn match_session_end<'a>(
        &self,
        msg: &'a [u8],
        slots: &mut EndSlots,
    ) -> Option<SessionEndMatch<'a>> {
        let ends = self.ends.as_ref()?;
        if !self.end_gate.admits(msg) {
            return None;
        }
        // One pattern (the library's): its star form alone decides, no DFA pass first
        // (`star`: what it finds is the whole regex's match). Several: the DFA says which.
        let (pid, start) = match self.end_stars.as_slice() {
            [Some(_)] => (0, 0),
            _ => {
                let found = ends.search(&Input::new(msg))?;
                (found.pattern().as_usize(), found.start())
            }
        };
        let fast = match (self.end_stars.get(pid), slots.stars.get_mut(pid)) {
            (Some(Some(star)), Some(Some((head, tail)))) if start == 0 => {
                star.groups(msg, head, tail).map(|range| Groups::Star {
                    head,
                    tail,
                    name: star.name(),
                    range,
                })
            }
            _ => None,
        };
        let groups = match fast {
            Some(g) => g,
            None => {
                ends.captures(Input::new(msg), &mut slots.whole);
                slots.whole.pattern()?;
                Groups::Whole(&slots.whole)
            }
        };
        session_end_of(msg, &groups)
    }

    /// `match_session_end` by the whole regex's captures only (what `star` must equal).
    #[cfg(test)]
    fn match_session_end_whole<'a>(
        &self,
        msg: &'a [u8],
        caps: &mut Captures,
    ) -> Option<SessionEndMatch<'a>> {
        let ends = self.ends.as_ref()?;
        ends.captures(Input::new(msg), caps);
        caps.pattern()?;
        session_end_of(msg, &Groups::Whole(caps))
    }

    /// The login that pattern `pid` reads from its captures in `caps`.
    fn read<'a>(&self, pid: usize, msg: &'a [u8], groups: &Groups<'_>) -> Option<LoginMatch<'a>> {
        let def = self.defs.get(pid)?;
        let span = |name: &str| groups.get(name).map(|r| &msg[r]);
        let service = span("service")?;
        let svc = std::str::from_utf8(service).ok()?;
        if !self.services.iter().any(|s| s == svc) || !def.services.iter().any(|s| s == svc) {
            return None;
        }
        let key = def.address_element.as_bytes();
        let session = span("elements").and_then(session_start);
        let mechanism = span("elements").and_then(|el| elements::single_value(el, b"method"));
        let (ip, user) = match span("elements") {
            Some(el) => {
                if def.prefix_user && !proxy::prefix_user_agrees(span("user")?, el, msg) {
                    return None;
                }
                (
                    elements::client_ip_in(el, key),
                    span("user").or_else(|| elements::user(el)),
                )
            }
            None => {
                let text = span("ip").unwrap_or_default();
                let mut ip = match elements::parse_ip(text) {
                    Some(ip) => IpVerdict::Valid(ip),
                    None => IpVerdict::Invalid(String::from_utf8_lossy(text).into_owned()),
                };
                // The element grammar's reading of the same text: a user name holding
                // `, rip=X` must not be a second opinion that nobody asked.
                if let Some(u) = span("user") {
                    let other = elements::client_ip_in(u, key);
                    if other != IpVerdict::Missing && other != ip {
                        ip = IpVerdict::Ambiguous;
                    }
                }
                (ip, span("user"))
            }
        };
        Some(LoginMatch {
            pattern: pid,
            service,
            user,
            ip,
            session,
            mechanism,
        })
    }

    /// Whether another enabled pattern also matches `msg` and reads a different address.
    /// Only patterns of the other kind (element list against `Login: user [ip]`) or with
    /// another address element can read differently; others are not run again.
    fn another_grammar_disagrees(
        &self,
        login: &LoginMatch<'_>,
        msg: &[u8],
        caps: &mut Captures,
    ) -> bool {
        let me = login.pattern;
        for other in 0..self.defs.len() {
            if other == me
                || (self.has_elements[other] == self.has_elements[me]
                    && self.defs[other].address_element == self.defs[me].address_element
                    && !self.defs[other].prefix_user
                    && !self.defs[me].prefix_user)
            {
                continue;
            }
            let input = Input::new(msg).anchored(Anchored::Pattern(PatternID::must(other)));
            // Most lines fit one grammar: the DFA says no long before captures would.
            if !self.regex.is_match(input.clone()) {
                continue;
            }
            self.regex.captures(input, caps);
            if caps.pattern().is_none() {
                continue;
            }
            if let Some(theirs) = self.read(other, msg, &Groups::Whole(caps)) {
                if theirs.ip != IpVerdict::Missing && theirs.ip != login.ip {
                    return true;
                }
            }
        }
        false
    }
}

/// Capture slots for `PatternSet::match_message`, made by `PatternSet::captures`.
pub struct Slots {
    whole: Captures,
    heads: Vec<Option<Captures>>,
}

/// Capture slots for `PatternSet::match_session_end`, made by `PatternSet::end_captures`.
pub struct EndSlots {
    whole: Captures,
    stars: Vec<Option<(Captures, Captures)>>,
}

/// Where a match's groups are: the whole regex's captures, HEAD's and the `elements`
/// range (see `split`), or HEAD's, TAIL's and the `.*` group's range (see `star`).
enum Groups<'c> {
    Whole(&'c Captures),
    Split {
        head: &'c Captures,
        elements: std::ops::Range<usize>,
    },
    Star {
        head: &'c Captures,
        tail: &'c Captures,
        name: &'c str,
        range: std::ops::Range<usize>,
    },
}

impl Groups<'_> {
    fn get(&self, name: &str) -> Option<std::ops::Range<usize>> {
        match self {
            Groups::Whole(c) => c.get_group_by_name(name).map(|s| s.range()),
            Groups::Split { elements, .. } if name == "elements" => Some(elements.clone()),
            Groups::Split { head, .. } => head.get_group_by_name(name).map(|s| s.range()),
            Groups::Star {
                name: star, range, ..
            } if *star == name => Some(range.clone()),
            Groups::Star { head, tail, .. } => head
                .get_group_by_name(name)
                .or_else(|| tail.get_group_by_name(name))
                .map(|s| s.range()),
        }
    }
}

/// The session end a matched session-end pattern's groups name.
fn session_end_of<'a>(msg: &'a [u8], groups: &Groups<'_>) -> Option<SessionEndMatch<'a>> {
    let span = |name: &str| groups.get(name).map(|r| &msg[r]);
    let pid = match span("pid") {
        Some(p) => Some(std::str::from_utf8(p).ok()?.parse().ok()?),
        None => None,
    };
    // A proxy's end carries the session in its element list (outside the user element,
    // which the client chose).
    let session = match span("elements") {
        Some(el) => Some(
            elements::single_value(el, b"session")?
                .strip_prefix(b"<")?
                .strip_suffix(b">")?,
        ),
        None => span("session"),
    };
    Some(SessionEndMatch {
        service: span("service")?,
        pid,
        session,
        user: span("user"),
    })
}

/// `session=<ID>` and `mpid=PID` of an element list (outside the user element).
fn session_start(el: &[u8]) -> Option<crate::model::SessionStart> {
    let id = elements::single_value(el, b"session")?
        .strip_prefix(b"<")?
        .strip_suffix(b">")?;
    let id = std::str::from_utf8(id).ok()?;
    let pid =
        elements::single_value(el, b"mpid").and_then(|p| std::str::from_utf8(p).ok()?.parse().ok());
    crate::model::SessionStart::new(id, pid)
}

fn literal_searcher(literals: &[&str]) -> Result<Literals, PatternError> {
    Literals::new(literals).map_err(|e| PatternError(format!("pattern literals: {e}")))
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

    /// The embedded library for imap and pop3, built once for the proptests.
    pub(super) fn library() -> &'static PatternSet {
        static SET: std::sync::OnceLock<PatternSet> = std::sync::OnceLock::new();
        SET.get_or_init(set)
    }

    fn m(msg: &str) -> Option<(String, String)> {
        matched(&set(), msg)
    }

    /// The pattern id and the address (or its verdict) `s` reads from `msg`.
    fn matched(s: &PatternSet, msg: &str) -> Option<(String, String)> {
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

    fn proxies() -> PatternSet {
        PatternSet::load(
            None,
            &["imap".into(), "pop3".into()],
            &[
                "dovecot-2.2-proxy".into(),
                "dovecot-2.3-proxy".into(),
                "dovecot-2.4-proxy".into(),
            ],
        )
        .expect("embedded library")
    }

    fn mp(msg: &str) -> Option<(String, String)> {
        matched(&proxies(), msg)
    }

    /// Success lines built from Dovecot's format strings (see patterns/*-proxy.toml).
    #[test]
    fn proxy_success_by_version() {
        let el = "user=<a b=<c>>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, TLS, session=<k>";
        for (id, line) in [
            ("dovecot-2.2-proxy", format!("imap-login: proxy(a b=<c>): started proxying to 10.0.0.2:143: {el}")),
            ("dovecot-2.2-proxy", format!("imap-login: Info: proxy(a b=<c>): started proxying to backend.example:143/other (master adm): {el}")),
            ("dovecot-2.2-proxy", format!("pop3-login: proxy(a b=<c>): started proxying to 2001:db8::2:110: {el}")),
            ("dovecot-2.3-proxy", format!("imap-login: proxy(a b=<c>,10.0.0.2:143): Started proxying to backend.example as user other: {el}")),
            ("dovecot-2.3-proxy", format!("imap-login: proxy(a b=<c>,10.0.0.2:143): Started proxying to 10.0.0.2 from 10.0.0.1 (0.012 secs): {el}")),
            ("dovecot-2.3-proxy", format!("imap-login: proxy(a b=<c>,10.0.0.2:143): Started proxying to <10.0.0.2> (0.004 secs): {el}")),
            ("dovecot-2.3-proxy", format!("imap-login: proxy(a b=<c>,backend[10.0.0.2]:143): Started proxying to <10.0.0.2> (<backend>) as user x (master m) (1.250 secs, 2 reconnects): {el}")),
            ("dovecot-2.4-proxy", format!("imap-login: proxy(a b=<c>,[2001:db8::2]:143): Started proxying to remote host (0.012 secs): {el}")),
            ("dovecot-2.4-proxy", format!("imap-login: proxy(a b=<c>,10.0.0.2:143): Started proxying to remote host from 10.0.0.1 as user o (master m) (0.001 secs, 1 reconnects): {el}")),
        ] {
            assert_eq!(mp(&line), Some((id.to_string(), "203.0.113.9".to_string())), "{line}");
        }
    }

    /// Defect 2: the success text inside a user name never makes a failed line a success.
    #[test]
    fn proxy_success_text_inside_user_is_refused() {
        let long = "p".repeat(70);
        let padded = format!("{long}): started proxying to h:1: user=<{long}>, rip=203.0.113.9, x");
        for (user, rest) in [
            // 2.2: the failure line (elements added by client_log_err).
            ("x): started proxying to h:1: user=<x", "): Login failed to 10.0.0.2:143: Authentication failed: user=<{U}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
            ("x): started proxying to h:1: user=<q>, rip=203.0.113.9, z", "): Login failed to 10.0.0.2:143: NO: user=<{U}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
            (padded.as_str(), "): Login failed to 10.0.0.2:143: NO: user=<{S}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
            // 2.3/2.4 (the event prefix carries ip:port; elements from the log callback).
            ("x,h:1): Started proxying to remote host: user=<x", ",10.0.0.2:143): Login failed: Authentication failed: user=<{U}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
            ("x,h:1): Started proxying to <h> (0.001 secs): user=<x", ",10.0.0.2:143): Disconnected by server: user=<{U}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
            ("b,h:1): Started proxying to remote host: user=<b>, rip=203.0.113.9, user=<", ",10.0.0.2:143): Login failed: NO: user=<{U}>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.10, session=<k>"),
        ] {
            let sanitized = if user.len() > 80 { format!("{}...", &user[..77]) } else { user.to_string() };
            let msg = format!("imap-login: proxy({user}{}", rest.replace("{U}", user).replace("{S}", &sanitized));
            assert_eq!(mp(&msg), None, "{msg}");
        }
    }

    /// Defect 7: two grammars reading different addresses make the line ambiguous.
    #[test]
    fn one_grammar_per_line() {
        assert_eq!(
            m("imap-login: Login: bob, rip=6.6.6.6, x [192.0.2.9]"),
            Some(("dovecot-1".into(), "Ambiguous".into()))
        );
        assert_eq!(
            m("imap-login: Login: rip=192.0.2.7, user=x [6.6.6.6]"),
            Some(("dovecot-0.99".into(), "Ambiguous".into()))
        );
        assert_eq!(
            m("imap-login: Login: user=<u>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, TLS [6.6.6.6]"),
            Some(("dovecot-1".into(), "Ambiguous".into()))
        );
        // Agreeing grammars are fine.
        assert_eq!(
            m("imap-login: Login: user=<u>, rip=192.0.2.7, lip=10.0.0.1, TLS [192.0.2.7]"),
            Some(("dovecot-1".into(), "192.0.2.7".into()))
        );
        assert_eq!(
            m("imap-login: Login: bob smith [192.0.2.9]"),
            Some(("dovecot-0.99".into(), "192.0.2.9".into()))
        );
    }

    #[test]
    fn address_element_is_configurable() {
        let def = "id='custom'\ndovecot='2.3'\ndescription=''\nservices=['imap']\ndefault=true\npriority=1\nliterals=['Login: ']\naddress_element='ip'\nregex='^(?P<service>imap)-login: Login: (?P<elements>.*)$'\n";
        let s = PatternSet::from_files(&[("c.toml".into(), def.into())], &["imap".into()], &[])
            .unwrap();
        let mut caps = s.captures();
        let l = s
            .match_message(
                b"imap-login: Login: user=<a>, ip=192.0.2.7, rip=10.0.0.1",
                &mut caps,
            )
            .unwrap();
        assert_eq!(l.ip, IpVerdict::Valid("192.0.2.7".parse().unwrap()));
        let bad = def.replace("address_element='ip'", "address_element='ip='");
        let e = PatternSet::from_files(&[("c.toml".into(), bad)], &["imap".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: `address_element`"), "{e}");
    }

    #[test]
    fn a_literal_with_a_newline_is_refused() {
        let text = "id='n'\ndovecot='x'\ndescription=''\nservices=['imap']\ndefault=true\npriority=1\nliterals=[\"a\\nb\"]\nregex='^(?P<service>imap)-login: (?P<ip>a)'\n";
        let err = PatternSet::from_files(&[("n.toml".into(), text.into())], &["imap".into()], &[])
            .unwrap_err();
        assert!(
            err.0.contains("n.toml") && err.0.contains("newline"),
            "{}",
            err.0
        );
    }

    #[test]
    fn sessions_off_leaves_session_end_lines_unread() {
        let services = ["imap".to_string(), "pop3".to_string()];
        let end = b"imap(u)<123><AbCd>: Disconnected: Logged out in=1 out=2";
        let on = PatternSet::load_for(None, &services, &[], true).unwrap();
        let mut caps = on.end_captures().unwrap();
        assert!(on.match_session_end(end, &mut caps).is_some());
        assert!(on.prefilter().is_match(end));
        let off = PatternSet::load_for(None, &services, &[], false).unwrap();
        assert!(off.end_captures().is_none());
        assert!(!off.prefilter().is_match(end), "{:?}", off.literals());
        let login = b"imap-login: Login: user=<u>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<AbCd>";
        let mut caps = off.captures();
        assert!(off.prefilter().is_match(login));
        assert!(off.match_message(login, &mut caps).is_some());
    }

    #[test]
    fn prefilter_literals_start_rarely() {
        // Every literal must be found in each era's success line, none starts with `-`.
        let s = proxies();
        for d in s.defs() {
            for l in &d.literals {
                assert!(!l.starts_with('-'), "{}: {l}", d.id);
            }
        }
        for line in [
            "imap-login: Info: Login: user=<a>",
            "imap-login: Logged in: user=<a>",
            "imap-login: proxy(a,1.2.3.4:143): Started proxying to remote host",
            "imap-login: proxy(a): started proxying to 1.2.3.4:143",
        ] {
            assert!(s.prefilter().is_match(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn bad_library_names_the_file() {
        let files = vec![("x.toml".to_string(), "id = \"x\"\n".to_string())];
        let e = PatternSet::from_files(&files, &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:"), "{e}");
        let bad = "id='b'\ndovecot='1'\ndescription=''\nservices=['imap']\ndefault=true\npriority=1\nliterals=['x']\nregex='(?P<service>a'\n";
        let e = PatternSet::from_files(&[("b.toml".into(), bad.into())], &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("b.toml: bad regex"), "{e}");
    }
}
