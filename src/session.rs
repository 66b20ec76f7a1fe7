//! Open mail sessions, so that a client that stays connected (IMAP IDLE for hours) keeps its
//! relay, and loses it ttl after its session ends.
//!
//! Dovecot's login line carries `session=<ID>` and `mpid=PID`; the mail process logs its end
//! as `imap(user)<PID><ID>: Disconnected: ...` (imap-hibernate: its own pid, the same ID).
//! Not seeing an end proves nothing (older releases, custom prefixes, a lost line, a killed
//! process), so a session holds its grant past ttl only with evidence that it is open,
//! re-checked every `recheck` (see `evidence`): its imap process, `doveadm who`, a source
//! that ties end lines to their sessions, or, for a session Dovecot's events reported
//! (`exact`), those events having delivered exact ends of their sessions. Without evidence
//! the grant lasts ttl from the login or from the last check that found evidence, and never
//! past `hold` after the login. In 2.4 the end line can be written before its login line
//! (and an exported end before its login event): such ends are remembered briefly and
//! close the session at once. A session that a log line and the events both report is
//! one session, with what either knows.
//!
//! This is where the relay window of a session is decided; the engine asks, with time as
//! an argument, and writes the renewals to the map like any login, so the map stays the
//! one source of truth for Postfix.

pub mod evidence;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

pub use crate::model::saved::{OpenSession, SessionStats};
pub use crate::model::{ends_held, holds, valid_id, SessionEnd, SessionStart};
pub use evidence::{Evidence, Probe};

/// Longest user name kept for the evidence checks.
const MAX_USER: usize = 256;
/// Open sessions kept at most; beyond, new sessions grant as plain logins.
const MAX_OPEN: usize = 200_000;
/// Ends seen before their login, kept at most, and for how long (seconds).
const MAX_EARLY: usize = 10_000;
const EARLY_KEEP: i64 = 300;

#[derive(Debug, Clone, Copy)]
struct EarlyEnd {
    pid: Option<u32>,
    time: i64,
    hibernate: bool,
    /// An exact end (Dovecot's events), from an authenticated channel.
    exact: bool,
}

/// What a session event asks of the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub ip: IpAddr,
    /// Grant as if the client logged in at this time.
    pub time: i64,
}

/// A session an end line closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub id: String,
    /// Grant as if the client logged in at the end.
    pub renewal: Renewal,
}

/// Sessions that stopped holding, by why (for logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// No evidence that they were open: their grant ran out ttl after the last evidence.
    pub no_evidence: u64,
    /// Held until grant.session_hold after their login.
    pub hold: u64,
}

fn evidence_index(e: Evidence) -> usize {
    Evidence::ALL.iter().position(|&x| x == e).unwrap_or(0)
}

/// The open sessions, by id.
#[derive(Debug, Clone)]
pub struct Sessions {
    open: HashMap<String, OpenSession>,
    /// When each open session next needs attention (a check, or its drop at the hold),
    /// by id: the engine's timer asks for the first without visiting every session.
    due: BTreeSet<(i64, String)>,
    /// Open session ids by user, for end lines that name no session (2.2 and older).
    by_user: HashMap<String, Vec<String>>,
    early: HashMap<String, EarlyEnd>,
    /// When each source last tied an end line to an open session of its own.
    tied: HashMap<String, i64>,
    /// When each source of exact ends (Dovecot's events) last closed a session whose start
    /// such a source reported: the exporter delivers ends, so a missing one means open.
    tied_exact: HashMap<String, i64>,
    /// Open sessions by `Evidence` (index in `Evidence::ALL`), kept as they change: the
    /// counts are read after every batch.
    counts: [u64; 5],
    ttl: i64,
    hold: i64,
    recheck: i64,
    /// When old early ends are next forgotten.
    next_forget: i64,
    released: Released,
}

impl Sessions {
    /// `ttl`: the grant lifetime after a login or a session end; `hold`: the longest a
    /// session holds a grant after its login.
    pub fn new(ttl: i64, hold: i64) -> Sessions {
        Sessions {
            open: HashMap::new(),
            due: BTreeSet::new(),
            by_user: HashMap::new(),
            early: HashMap::new(),
            tied: HashMap::new(),
            tied_exact: HashMap::new(),
            counts: [0; 5],
            next_forget: 0,
            ttl: ttl.max(1),
            hold: hold.max(0),
            recheck: 60,
            released: Released::default(),
        }
    }

    pub fn set_limits(&mut self, ttl: i64, hold: i64) {
        self.ttl = ttl.max(1);
        self.hold = hold.max(0);
        self.reindex();
    }

    /// Forgets what sources no longer configured have shown (a reload): their ties are
    /// evidence for nobody now.
    pub fn keep_sources(&mut self, sources: &[String]) {
        self.tied.retain(|s, _| sources.contains(s));
        self.tied_exact.retain(|s, _| sources.contains(s));
    }

    /// How often evidence is checked again (grant.session_recheck).
    pub fn set_recheck(&mut self, secs: i64) {
        self.recheck = secs.max(1);
        self.reindex();
    }

    fn reindex(&mut self) {
        self.due = self
            .open
            .values()
            .map(|s| (self.due_of(s), s.id.clone()))
            .collect();
    }

    /// When `s` is next checked, or, at the latest, dropped at its hold.
    fn due_of(&self, s: &OpenSession) -> i64 {
        s.checked
            .saturating_add(self.check_every())
            .min(s.login.saturating_add(self.hold))
    }

    /// Replaces a session of the same ID. The old due entry goes first: it may equal the
    /// new one (a login line read again after a restart), and removing it afterwards
    /// would leave the session unchecked for good.
    fn insert(&mut self, s: OpenSession) {
        self.remove(&s.id);
        self.due.insert((self.due_of(&s), s.id.clone()));
        if let Some(u) = &s.user {
            self.by_user
                .entry(u.clone())
                .or_default()
                .push(s.id.clone());
        }
        self.counts[evidence_index(s.evidence)] += 1;
        self.open.insert(s.id.clone(), s);
    }

    fn remove(&mut self, id: &str) -> Option<OpenSession> {
        let s = self.open.remove(id)?;
        self.due.remove(&(self.due_of(&s), s.id.clone()));
        let n = &mut self.counts[evidence_index(s.evidence)];
        *n = n.saturating_sub(1);
        if let Some(u) = &s.user {
            if let Some(ids) = self.by_user.get_mut(u) {
                ids.retain(|i| i != id);
                if ids.is_empty() {
                    self.by_user.remove(u);
                }
            }
        }
        Some(s)
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Open sessions of `ip`.
    pub fn open_for(&self, ip: IpAddr) -> usize {
        self.open.values().filter(|s| s.ip == ip).count()
    }

    /// Open sessions by what their last check found.
    pub fn by_evidence(&self) -> BTreeMap<&'static str, u64> {
        Evidence::ALL
            .iter()
            .zip(self.counts)
            .map(|(e, n)| (e.name(), n))
            .collect()
    }

    /// Sessions released so far, by why.
    pub fn released(&self) -> Released {
        self.released
    }

    /// How often an open session is checked (and its grant written again while there is
    /// evidence): often enough that the grant never lapses and that evidence gone is
    /// noticed within `recheck`, rarely enough that a day of IDLE costs a few dozen commits.
    fn check_every(&self) -> i64 {
        (self.ttl / 3).min(self.recheck).clamp(1, 600)
    }

    /// The last time a session that logged in at `login` may be renewed at.
    fn last_renewal(&self, login: i64) -> i64 {
        login.saturating_add(self.hold).saturating_sub(self.ttl)
    }

    /// A login that names a session. Its grant is the login's own; this only remembers
    /// the session (unless its end was already seen). True when the session is open.
    pub fn opened(&mut self, ip: IpAddr, login: i64, start: &SessionStart, now: i64) -> bool {
        self.forget_old_early(now);
        if !valid_id(&start.id) || self.hold == 0 {
            return false;
        }
        if let Some(e) = self.early.get(&start.id).copied() {
            if e.hibernate || start.pid.is_none() || e.pid.is_none() || start.pid == e.pid {
                self.early.remove(&start.id);
                // The exporter can deliver an end before its login (parallel posts).
                if e.exact && start.exact {
                    self.tied_exact.insert(start.source.clone(), now);
                }
                return false;
            }
        }
        if let Some(open) = self.open.get(&start.id) {
            if open.source != start.source {
                if open.ip.to_canonical() == ip.to_canonical() {
                    // The same session reported by a second source (its log line and
                    // Dovecot's events, whichever came first): one session, knowing what
                    // either says (the log's pid for the process check, the events' exact
                    // end).
                    let Some(mut s) = self.remove(&start.id) else {
                        return false;
                    };
                    if start.trusted {
                        s.pid = s.pid.or(start.pid);
                        s.user = s
                            .user
                            .or(start.user.clone().filter(|u| u.len() <= MAX_USER));
                    }
                    s.exact |= start.exact;
                    self.insert(s);
                    return true;
                }
                // Another client under the same id (session ids can be predicted): a
                // forgeable line never takes a trusted session over; otherwise the later
                // report replaces it, as a line read again does.
                if open.trusted && !start.trusted {
                    return true;
                }
            }
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&start.id) {
            tracing::warn!(
                limit = MAX_OPEN,
                "too many open sessions; new ones grant as plain logins"
            );
            return false;
        }
        // A login in the future (a clock stepped back, a damaged line) is taken as now.
        let login = login.min(now);
        self.insert(OpenSession {
            id: start.id.clone(),
            ip,
            pid: start.pid,
            login,
            renewed: login,
            user: start.user.clone().filter(|u| u.len() <= MAX_USER),
            source: start.source.clone(),
            trusted: start.trusted,
            evidence: Evidence::None,
            checked: login,
            exact: start.exact,
        });
        true
    }

    /// A session end. Some: grant as a login at the end time (the grant lasts ttl after
    /// the session ends). An end whose login is not seen yet is remembered briefly. An end
    /// that names no session closes one only when it is unambiguous (the one open session
    /// of that user from that source, and of that pid when the line names one).
    pub fn closed(&mut self, end: &SessionEnd, now: i64) -> Option<Closed> {
        self.forget_old_early(now);
        let hibernate = end.service.ends_with("-hibernate");
        let time = end.time.unwrap_or(now).min(now);
        let id = match &end.id {
            Some(id) if valid_id(id) => id.clone(),
            Some(_) => return None,
            None => self.only_session_of(end)?,
        };
        match self.open.get(&id) {
            // The mail process logs its own end; imap-hibernate has another pid.
            Some(s) if hibernate || s.pid.is_none() || end.pid.is_none() || s.pid == end.pid => {
                let s = self.remove(&id)?;
                if end.exact {
                    if s.exact && end.trusted {
                        self.tied_exact.insert(end.source.clone(), now);
                    }
                } else if s.source == end.source && s.trusted && end.trusted {
                    self.tied.insert(s.source.clone(), now);
                }
                // ttl after the end, but never past login + hold.
                let time = time.clamp(s.login, self.last_renewal(s.login).max(s.login));
                Some(Closed {
                    id,
                    renewal: Renewal { ip: s.ip, time },
                })
            }
            Some(_) => None,
            None => {
                if self.early.len() < MAX_EARLY {
                    self.early.insert(
                        id,
                        EarlyEnd {
                            pid: end.pid,
                            time,
                            hibernate,
                            exact: end.exact && end.trusted,
                        },
                    );
                }
                None
            }
        }
    }

    /// The one open session an end without a session id can mean, if there is one.
    fn only_session_of(&self, end: &SessionEnd) -> Option<String> {
        let ids = self.by_user.get(end.user.as_ref()?)?;
        let mut fits = ids.iter().filter(|id| {
            self.open
                .get(*id)
                .is_some_and(|s| s.source == end.source && (end.pid.is_none() || s.pid == end.pid))
        });
        let one = fits.next()?;
        fits.next().is_none().then(|| one.clone())
    }

    fn forget_old_early(&mut self, now: i64) {
        // At most once every ten seconds of log time: not a walk of the map per line.
        if !self.early.is_empty() && now >= self.next_forget {
            self.early.retain(|_, e| e.time + EARLY_KEEP > now);
            self.next_forget = now + 10;
        }
    }

    /// When `renewals` next has something to do.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|&(d, _)| d)
    }

    /// What shows at `now` that `s` is open.
    fn evidence_of(&self, s: &OpenSession, probe: &mut dyn Probe, now: i64) -> Evidence {
        if let Some(pid) = s.pid {
            let claim = evidence::Claim {
                pid,
                user: s.user.as_deref(),
                ip: s.ip,
            };
            let found = probe.check(&claim, now);
            if found != Evidence::None {
                return found;
            }
        }
        let recent = |t: i64| t > now.saturating_sub(self.hold);
        if s.exact && self.tied_exact.values().any(|&t| recent(t)) {
            return Evidence::Pushed;
        }
        let ties = self.tied.get(&s.source).is_some_and(|&t| recent(t));
        if s.trusted && ties {
            Evidence::EndLines
        } else {
            Evidence::None
        }
    }

    /// Checks the sessions that are due at `now` for evidence; returns the grants to write
    /// again for those that have it. Sessions past their hold, and those without evidence
    /// whose grant has run out, are dropped.
    pub fn renewals(&mut self, now: i64, probe: &mut dyn Probe) -> Vec<Renewal> {
        let (hold, ttl) = (self.hold, self.ttl);
        let mut out = Vec::new();
        while let Some((d, id)) = self.due.first().cloned() {
            if d > now {
                break;
            }
            let Some(mut s) = self.remove(&id) else {
                self.due.remove(&(d, id));
                continue;
            };
            // Times saved in the future (a clock stepped back) are taken as now.
            s.login = s.login.min(now);
            s.renewed = s.renewed.min(now);
            if now >= s.login.saturating_add(hold) {
                self.released.hold += 1;
                continue;
            }
            s.evidence = self.evidence_of(&s, probe, now);
            s.checked = now;
            if s.evidence == Evidence::None {
                if now >= s.renewed.saturating_add(ttl) {
                    self.released.no_evidence += 1;
                    tracing::info!(address = %s.ip, session = %s.id, source = %s.source, "mail session no longer holds its grant: nothing shows it is open (its imap process is gone or cannot be seen, and its source ties no end lines)");
                    continue;
                }
            } else {
                let last = self.last_renewal(s.login);
                if s.renewed < last {
                    s.renewed = now.min(last);
                    out.push(Renewal {
                        ip: s.ip,
                        time: s.renewed,
                    });
                }
            }
            self.insert(s);
        }
        out
    }

    /// For a report at the end of its input (`dovegate test`, where no process can be
    /// seen): each session its source's end lines keep open, as the grant its hold would
    /// last until.
    pub fn held_at_the_end(&self, at: i64) -> Vec<Renewal> {
        let mut none = evidence::NoProbe;
        self.open
            .values()
            .filter(|s| self.evidence_of(s, &mut none, at) != Evidence::None)
            .map(|s| Renewal {
                ip: s.ip,
                time: self.last_renewal(s.login).max(s.login),
            })
            .collect()
    }

    /// Ends the open sessions of `ip` (a revoke); returns how many.
    pub fn revoke(&mut self, ip: IpAddr) -> usize {
        self.revoke_grant(ip, 128)
    }

    /// Ends the sessions that renew the grant kept under `ip` when IPv6 logins grant
    /// /`bits` (`grant::widen`): a revoked /64 is renewed by no session inside it.
    pub fn revoke_grant(&mut self, ip: IpAddr, bits: u8) -> usize {
        let ip = ip.to_canonical();
        let ids: Vec<String> = self
            .open
            .values()
            .filter(|s| crate::grant::widen(s.ip, bits) == ip)
            .map(|s| s.id.clone())
            .collect();
        for id in &ids {
            self.remove(id);
        }
        ids.len()
    }

    /// Forgets one session (an administrator's `dovegate sessions drop`).
    pub fn drop_session(&mut self, id: &str) -> Option<OpenSession> {
        self.remove(id)
    }

    /// The open sessions, for saving beside the checkpoints.
    pub fn snapshot(&self) -> Vec<OpenSession> {
        let mut v: Vec<OpenSession> = self.open.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Restores saved sessions: those past their hold, and those of a source not in
    /// `sources` (no longer configured), are dropped; times in the future are taken as
    /// now. Returns how many were dropped for their source.
    pub fn restore(&mut self, saved: Vec<OpenSession>, now: i64, sources: &[String]) -> usize {
        let mut unconfigured = 0;
        for mut s in saved {
            if !sources.contains(&s.source) {
                unconfigured += 1;
                continue;
            }
            s.login = s.login.min(now);
            s.renewed = s.renewed.min(now).max(s.login);
            s.checked = s.checked.min(now).max(s.login);
            if valid_id(&s.id)
                && now < s.login.saturating_add(self.hold)
                && self.open.len() < MAX_OPEN
            {
                self.insert(s);
            }
        }
        unconfigured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    fn start(id: &str, pid: u32) -> SessionStart {
        SessionStart {
            id: id.into(),
            pid: Some(pid),
            user: Some("alice".into()),
            source: "log".into(),
            trusted: true,
            exact: false,
        }
    }

    fn end(service: &str, id: &str, pid: u32, t: i64) -> SessionEnd {
        SessionEnd {
            service: service.into(),
            id: Some(id.into()),
            pid: Some(pid),
            user: Some("alice".into()),
            time: Some(t),
            source: "log".into(),
            trusted: true,
            exact: false,
        }
    }

    impl Sessions {
        fn closed_r(&mut self, e: &SessionEnd, now: i64) -> Option<Renewal> {
            self.closed(e, now).map(|c| c.renewal)
        }
    }

    /// A host where the processes in the set are the sessions' own.
    struct Alive(Vec<u32>);
    impl Probe for Alive {
        fn check(&mut self, c: &evidence::Claim<'_>, _: i64) -> Evidence {
            if self.0.contains(&c.pid) {
                Evidence::Process
            } else {
                Evidence::None
            }
        }
    }

    #[test]
    fn idle_session_renews_while_its_process_lives_until_its_end() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = Alive(vec![42]);
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        assert_eq!(s.next_due(), Some(1060), "checked every recheck (60 s)");
        assert!(s.renewals(1050, &mut host).is_empty());
        assert_eq!(
            s.renewals(1060, &mut host),
            vec![Renewal {
                ip: ip(),
                time: 1060
            }]
        );
        assert_eq!(
            s.renewals(5000, &mut host),
            vec![Renewal {
                ip: ip(),
                time: 5000
            }]
        );
        assert_eq!(s.by_evidence()["process"], 1);
        // The end: grant until end + ttl (as a login at the end time).
        assert_eq!(
            s.closed_r(&end("imap", "abc", 42, 6000), 6001),
            Some(Renewal {
                ip: ip(),
                time: 6000
            })
        );
        assert!(s.is_empty());
        assert!(s.renewals(9000, &mut host).is_empty());
    }

    /// Issue 19: a lone login line, no end, no process: the grant is the login's (ttl),
    /// never renewed, and the session is released once that grant has run out.
    #[test]
    fn a_lone_login_without_evidence_is_not_held() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = evidence::NoProbe;
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        let mut t = 1000;
        while let Some(d) = s.next_due() {
            t = d;
            assert!(s.renewals(t, &mut host).is_empty(), "renewed at {t}");
        }
        assert!(t <= 1000 + 300 + 60, "released at {t}");
        assert_eq!(s.released().no_evidence, 1);
    }

    /// Evidence gone (kill -9 of the imap process, no end line): no renewal after the
    /// last check that found it, so the grant ends at most ttl after evidence went.
    #[test]
    fn evidence_gone_ends_the_hold_within_ttl() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = Alive(vec![42]);
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        let mut last = 1000;
        let mut t = 1000;
        while t < 5000 {
            t = s.next_due().unwrap();
            for r in s.renewals(t, &mut host) {
                last = r.time;
            }
        }
        let killed = t;
        host.0.clear();
        while let Some(d) = s.next_due() {
            t = d;
            for r in s.renewals(t, &mut host) {
                last = r.time;
            }
        }
        assert!(last + 300 <= killed + 300, "granted until {}", last + 300);
        assert!(s.is_empty());
    }

    /// A source that ties end lines to their sessions is evidence for its trusted
    /// sessions: a missing end then means open. Syslog-framed (forgeable) sessions and
    /// other sources' sessions get nothing from it.
    #[test]
    fn tied_end_lines_are_evidence_for_their_own_trusted_source() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = evidence::NoProbe;
        s.opened(ip(), 1000, &start("a", 1), 1000);
        assert!(s.closed_r(&end("imap", "a", 1, 1001), 1001).is_some());
        s.opened(ip(), 1000, &start("held", 2), 1000);
        let mut forged = start("forged", 3);
        forged.trusted = false;
        s.opened(ip(), 1000, &forged, 1000);
        let mut other = start("other", 4);
        other.source = "remote".into();
        s.opened(ip(), 1000, &other, 1000);
        let mut t = 1000;
        let mut renewed = Vec::new();
        while t < 3000 {
            t = s.next_due().unwrap();
            renewed.extend(s.renewals(t, &mut host));
        }
        assert_eq!(s.len(), 1);
        assert_eq!(s.by_evidence()["end-lines"], 1);
        assert!(s.snapshot()[0].id == "held");
        assert!(!renewed.is_empty());
    }

    /// What `[events]` reports: a start with no pid, an exact end with no pid.
    fn pushed_start(id: &str) -> SessionStart {
        SessionStart {
            pid: None,
            source: "events".into(),
            exact: true,
            ..start(id, 0)
        }
    }

    fn exact_end(id: &str, t: i64) -> SessionEnd {
        SessionEnd {
            pid: None,
            source: "events".into(),
            exact: true,
            ..end("imap", id, 0, t)
        }
    }

    /// A session the events opened holds (evidence `pushed`) once the events have shown
    /// an exact end of one of their sessions, and ends when its own exact end arrives;
    /// grants ttl after it.
    #[test]
    fn pushed_sessions_hold_until_their_exact_end() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = evidence::NoProbe;
        s.opened(ip(), 1000, &pushed_start("a"), 1000);
        assert!(s.closed_r(&exact_end("a", 1001), 1001).is_some());
        s.opened(ip(), 1000, &pushed_start("idle"), 1000);
        let mut t = 1000;
        while t < 5000 {
            t = s.next_due().unwrap();
            s.renewals(t, &mut host);
        }
        assert_eq!(s.by_evidence()["pushed"], 1);
        assert_eq!(
            s.closed_r(&exact_end("idle", t), t),
            Some(Renewal { ip: ip(), time: t }),
            "its end grants ttl from then"
        );
        assert!(s.is_empty() && s.next_due().is_none());
    }

    /// Without an exact end ever tied (the exporter's end metric missing, the events lost),
    /// an events session has no evidence: its grant runs out ttl after the login.
    #[test]
    fn pushed_sessions_without_ends_seen_hold_nothing() {
        let mut s = Sessions::new(300, 12 * 3600);
        let mut host = evidence::NoProbe;
        s.opened(ip(), 1000, &pushed_start("idle"), 1000);
        // A log source's tied end proves nothing about the events' sessions.
        s.opened(ip(), 1000, &start("logged", 7), 1000);
        assert!(s.closed_r(&end("imap", "logged", 7, 1001), 1001).is_some());
        let mut renewed = Vec::new();
        while let Some(t) = s.next_due() {
            renewed.extend(s.renewals(t, &mut host));
        }
        assert!(renewed.is_empty());
        assert_eq!(s.released().no_evidence, 1);
    }

    /// The same session from its log line and from the events is one session: the log's
    /// pid is checked, the events' exact end closes it, whichever arrived first.
    #[test]
    fn a_session_from_both_sources_is_one() {
        for events_first in [true, false] {
            let mut s = Sessions::new(300, 12 * 3600);
            let (a, b) = (start("x", 42), pushed_start("x"));
            let (first, second) = if events_first { (&b, &a) } else { (&a, &b) };
            assert!(s.opened(ip(), 1000, first, 1000));
            assert!(s.opened(ip(), 1000, second, 1000));
            assert_eq!(s.len(), 1);
            let o = &s.snapshot()[0];
            assert_eq!(
                (o.pid, o.exact),
                (Some(42), true),
                "events first: {events_first}"
            );
            let mut host = Alive(vec![42]);
            let t = s.next_due().unwrap();
            assert_eq!(s.renewals(t, &mut host).len(), 1, "its process is evidence");
            assert_eq!(s.by_evidence()["process"], 1);
            assert!(s.closed_r(&exact_end("x", t + 1), t + 1).is_some());
            assert!(s.is_empty());
        }
        // A forged (syslog) line gives an events session no pid, and cannot move it to
        // another address.
        let mut s = Sessions::new(300, 12 * 3600);
        s.opened(ip(), 1000, &pushed_start("y"), 1000);
        let mut forged = start("y", 666);
        forged.trusted = false;
        s.opened(ip(), 1000, &forged, 1000);
        let other: IpAddr = "203.0.113.66".parse().unwrap();
        s.opened(other, 1000, &forged, 1000);
        let o = &s.snapshot()[0];
        assert_eq!((o.pid, o.ip, o.exact), (None, ip(), true));
        // The other way round: the events' session replaces a forged one for another
        // address (which keeps nothing of the events' evidence).
        let mut s = Sessions::new(300, 12 * 3600);
        s.opened(other, 1000, &forged, 1000);
        s.opened(ip(), 1000, &pushed_start("y"), 1000);
        let o = &s.snapshot()[0];
        assert_eq!((o.pid, o.ip, o.exact), (None, ip(), true));
    }

    /// An exact end that arrives before its login (the exporter is faster than a log)
    /// closes the session at once.
    #[test]
    fn an_early_exact_end_closes_the_session_at_once() {
        let mut s = Sessions::new(300, 12 * 3600);
        assert!(s.closed_r(&exact_end("e", 1000), 1000).is_none());
        assert!(!s.opened(ip(), 1000, &start("e", 9), 1000));
        assert!(s.is_empty());
        // Before the events' own login: it counts as an end the events delivered.
        assert!(s.closed_r(&exact_end("f", 1000), 1000).is_none());
        assert!(!s.opened(ip(), 1000, &pushed_start("f"), 1000));
        s.opened(ip(), 1000, &pushed_start("g"), 1000);
        let t = s.next_due().unwrap();
        s.renewals(t, &mut evidence::NoProbe);
        assert_eq!(s.by_evidence()["pushed"], 1);
    }

    #[test]
    fn hold_caps_a_session_with_evidence() {
        let mut s = Sessions::new(300, 3600);
        let mut host = Alive(vec![42]);
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        let mut last = 1000;
        let mut t = 1000;
        while t < 10_000 {
            t = s.next_due().unwrap_or(10_000).max(t + 1);
            for r in s.renewals(t, &mut host) {
                last = r.time;
            }
        }
        // The last grant written expires exactly at login + hold.
        assert_eq!(last + 300, 1000 + 3600);
        assert!(s.is_empty());
        assert_eq!(s.released().hold, 1);
    }

    /// Ends without a session id (2.2 and older) close a session only when unambiguous.
    #[test]
    fn ends_without_a_session_id() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("a", 1), 1000);
        let mut e = end("imap", "x", 1, 1500);
        e.id = None;
        e.pid = None;
        assert!(s.closed(&e, 1500).is_some(), "the user's only session");
        s.opened(ip(), 1000, &start("b", 2), 1000);
        s.opened(ip(), 1000, &start("c", 3), 1000);
        assert_eq!(
            s.closed(&e, 1500),
            None,
            "two sessions of the user: ambiguous"
        );
        let mut bob = e.clone();
        bob.user = Some("bob".into());
        assert_eq!(s.closed(&bob, 1500), None);
        let mut by_pid = e.clone();
        by_pid.pid = Some(3);
        assert!(s.closed(&by_pid, 1500).is_some(), "user and pid");
        assert_eq!(s.snapshot()[0].id, "b");
        let mut elsewhere = e.clone();
        elsewhere.source = "remote".into();
        assert_eq!(s.closed(&elsewhere, 1500), None, "another source's end");
    }

    /// Defect 5: a login saved in the future is clamped to now on restore and renewal.
    #[test]
    fn future_times_are_clamped() {
        let mut s = Sessions::new(10, 60);
        let mut host = Alive(vec![1]);
        let mut saved = OpenSession {
            id: "f".into(),
            ip: ip(),
            pid: Some(1),
            login: 1000 + 1620,
            renewed: 1000 + 1620,
            user: Some("alice".into()),
            source: "log".into(),
            trusted: true,
            evidence: Evidence::None,
            checked: 1000 + 1620,
            exact: false,
        };
        s.restore(vec![saved.clone()], 1000, &["log".into()]);
        let mut last = 0;
        let mut t = 1000;
        while let Some(d) = s.next_due() {
            t = d;
            for r in s.renewals(t, &mut host) {
                last = r.time;
            }
        }
        assert!(last + 10 <= 1000 + 60, "held until {}", last + 10);
        assert!(t <= 1060);
        // A source no longer configured: dropped at start.
        saved.source = "gone".into();
        let mut u = Sessions::new(10, 60);
        assert_eq!(u.restore(vec![saved], 1000, &["log".into()]), 1);
        assert!(u.is_empty());
    }

    #[test]
    fn revoke_and_drop() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("a", 1), 1000);
        s.opened(ip(), 1000, &start("b", 2), 1000);
        s.opened("192.0.2.8".parse().unwrap(), 1000, &start("c", 3), 1000);
        assert_eq!(s.revoke(ip()), 2);
        assert!(s.drop_session("c").is_some());
        assert!(s.is_empty());
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn end_before_login_and_hibernate() {
        let mut s = Sessions::new(300, 3600);
        // 2.4: the end line first, then the login.
        assert_eq!(s.closed_r(&end("imap", "x1", 7429, 1000), 1000), None);
        s.opened(ip(), 1000, &start("x1", 7429), 1000);
        assert!(s.is_empty(), "already ended");
        // imap-hibernate ends it with its own pid and the same id.
        s.opened(ip(), 1000, &start("x2", 50), 1000);
        assert!(s
            .closed(&end("imap-hibernate", "x2", 99, 2000), 2000)
            .is_some());
        // Another process's end with the wrong pid does not close it.
        s.opened(ip(), 1000, &start("x3", 50), 1000);
        assert_eq!(s.closed_r(&end("imap", "x3", 51, 2000), 2000), None);
        assert_eq!(s.len(), 1);
        // An end in the future is taken as now; the grant never outlives login + hold.
        assert_eq!(
            s.closed_r(&end("imap", "x3", 50, 99_999), 3000),
            Some(Renewal {
                ip: ip(),
                time: 3000
            })
        );
        s.opened(ip(), 1000, &start("x4", 50), 1000);
        assert_eq!(
            s.closed_r(&end("imap", "x4", 50, 4500), 4500),
            Some(Renewal {
                ip: ip(),
                time: 1000 + 3600 - 300
            })
        );
    }

    #[test]
    fn survives_a_restart() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("a", 1), 1000);
        s.opened(ip(), 1000, &start("b", 2), 1000);
        let saved = serde_json::to_string(&s.snapshot()).unwrap();
        let mut t = Sessions::new(300, 3600);
        t.restore(serde_json::from_str(&saved).unwrap(), 2000, &["log".into()]);
        assert_eq!(t.open_for(ip()), 2);
        let mut u = Sessions::new(300, 3600);
        u.restore(serde_json::from_str(&saved).unwrap(), 5000, &["log".into()]);
        assert!(u.is_empty(), "past the hold");
    }

    #[test]
    fn bounded() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1, &start(&"x".repeat(65), 1), 1);
        assert!(s.is_empty());
        for i in 0..(MAX_EARLY + 10) {
            s.closed_r(&end("imap", &format!("e{i}"), 1, 1), 1);
        }
        assert_eq!(s.early.len(), MAX_EARLY);
        s.closed_r(&end("imap", "late", 1, 1000), 1000);
        assert_eq!(s.early.len(), 1, "old early ends forgotten");
    }

    /// A login line read again (after a restart, the checkpoint behind it) must not drop
    /// the session from the renewal index (found by tests/e2e_sessions.rs under load).
    #[test]
    fn a_login_seen_twice_is_still_renewed() {
        let mut s = Sessions::new(4, 120);
        assert!(s.opened(ip(), 100, &start("S1", 7), 100));
        assert!(s.opened(ip(), 100, &start("S1", 7), 100));
        assert_eq!(s.next_due(), Some(101));
        let r = s.renewals(101, &mut Alive(vec![7]));
        assert_eq!(r.len(), 1);
        assert_eq!(s.next_due(), Some(102));
    }
}
