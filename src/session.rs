//! Open mail sessions, so that a client that stays connected (IMAP IDLE for hours) keeps its
//! relay, and loses it ttl after its session ends.
//!
//! Dovecot's login line carries `session=<ID>` and `mpid=PID`; the mail process logs its end
//! as `imap(user)<PID><ID>: Disconnected: ...` (imap-hibernate: its own pid, the same ID).
//! A session is open from its login to its end; while open, its grant is renewed as if the
//! client logged in again, but never past `hold` after the login, so a session whose end is
//! never seen (crash, lost line) falls back to that cap. In 2.4 the end line can be written
//! before its login line: such ends are remembered briefly and close the session at once.
//!
//! Pure state with time as an argument; the engine feeds it and writes its renewals to the
//! map like any login, so the map stays the one source of truth for Postfix.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest session id kept (Dovecot's are 16-32 base64 characters).
const MAX_ID: usize = 64;
/// Open sessions kept at most; beyond, new sessions grant as plain logins.
const MAX_OPEN: usize = 200_000;
/// Ends seen before their login, kept at most, and for how long (seconds).
const MAX_EARLY: usize = 10_000;
const EARLY_KEEP: i64 = 300;

/// The session a login line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStart {
    pub id: String,
    /// `mpid=`: the mail process that will log the end.
    pub pid: Option<u32>,
}

/// Only IMAP clients stay connected for hours; POP3 sessions grant as plain logins.
pub fn holds(login_service: &[u8]) -> bool {
    login_service == b"imap"
}

/// The end lines that can close a held session (imap-hibernate ends hibernated ones).
pub fn ends_held(service: &str) -> bool {
    service == "imap" || service == "imap-hibernate"
}

/// Session ids are base64 (`+`, `/`) of bounded length; anything else is not one.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

impl SessionStart {
    pub fn new(id: &str, pid: Option<u32>) -> Option<SessionStart> {
        valid_id(id).then(|| SessionStart {
            id: id.to_string(),
            pid,
        })
    }
}

/// A session end line: `imap(user)<PID><ID>: Disconnected: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// `imap`, `pop3` or `imap-hibernate`.
    pub service: String,
    pub id: String,
    pub pid: u32,
    /// The line's own time (None: now).
    pub time: Option<i64>,
    /// Reported by Dovecot itself (the events source), not read from a log: it names the
    /// session exactly but carries no pid (`pid` is 0), so any pid matches.
    pub exact: bool,
}

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    pub id: String,
    pub ip: IpAddr,
    pub pid: Option<u32>,
    /// When the login happened (unix seconds).
    pub login: i64,
    /// The time of the last grant written for it (login or renewal).
    pub renewed: i64,
}

#[derive(Debug, Clone, Copy)]
struct EarlyEnd {
    pid: u32,
    time: i64,
    hibernate: bool,
}

/// What a session event asks of the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub ip: IpAddr,
    /// Grant as if the client logged in at this time.
    pub time: i64,
}

/// The open sessions, by id.
#[derive(Debug, Clone)]
pub struct Sessions {
    open: HashMap<String, OpenSession>,
    /// When each open session next needs attention (a renewal, or its drop at the hold),
    /// by id: the engine's timer asks for the first without visiting every session.
    due: BTreeSet<(i64, String)>,
    early: HashMap<String, EarlyEnd>,
    ttl: i64,
    hold: i64,
    /// When old early ends are next forgotten.
    next_forget: i64,
}

impl Sessions {
    /// `ttl`: the grant lifetime after a login or a session end; `hold`: the longest a
    /// session holds a grant after its login.
    pub fn new(ttl: i64, hold: i64) -> Sessions {
        Sessions {
            open: HashMap::new(),
            due: BTreeSet::new(),
            early: HashMap::new(),
            next_forget: 0,
            ttl: ttl.max(1),
            hold: hold.max(0),
        }
    }

    pub fn set_limits(&mut self, ttl: i64, hold: i64) {
        self.ttl = ttl.max(1);
        self.hold = hold.max(0);
        self.due = self
            .open
            .values()
            .map(|s| (self.due_of(s), s.id.clone()))
            .collect();
    }

    /// When `s` next needs attention: its next renewal, or, past its last one, its drop.
    fn due_of(&self, s: &OpenSession) -> i64 {
        let next = s.renewed.saturating_add(self.renew_every());
        if next > self.last_renewal(s.login) {
            s.login.saturating_add(self.hold)
        } else {
            next
        }
    }

    /// Replaces a session of the same ID. The old due entry goes first: it may equal the
    /// new one (a login line read again after a restart), and removing it afterwards
    /// would leave the session unrenewed for good.
    fn insert(&mut self, s: OpenSession) {
        if let Some(old) = self.open.remove(&s.id) {
            self.due.remove(&(self.due_of(&old), old.id));
        }
        self.due.insert((self.due_of(&s), s.id.clone()));
        self.open.insert(s.id.clone(), s);
    }

    fn remove(&mut self, id: &str) -> Option<OpenSession> {
        let s = self.open.remove(id)?;
        self.due.remove(&(self.due_of(&s), s.id.clone()));
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

    /// How often an open session's grant is written again: often enough that it never
    /// lapses, rarely enough that a day of IDLE costs a few dozen commits.
    fn renew_every(&self) -> i64 {
        (self.ttl / 3).clamp(1, 600)
    }

    /// The last time a session that logged in at `login` may be renewed at.
    fn last_renewal(&self, login: i64) -> i64 {
        login.saturating_add(self.hold).saturating_sub(self.ttl)
    }

    /// A login that names a session. Its grant is the login's own; this only remembers
    /// the session (unless its end was already seen). True when the session is open.
    pub fn opened(&mut self, ip: IpAddr, login: i64, start: &SessionStart, now: i64) -> bool {
        self.forget_old_early(now);
        if start.id.is_empty() || start.id.len() > MAX_ID || self.hold == 0 {
            return false;
        }
        if let Some(e) = self.early.get(&start.id).copied() {
            if e.hibernate || start.pid.is_none_or(|p| p == e.pid) {
                self.early.remove(&start.id);
                return false;
            }
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&start.id) {
            tracing::warn!(
                limit = MAX_OPEN,
                "too many open sessions; new ones grant as plain logins"
            );
            return false;
        }
        self.insert(OpenSession {
            id: start.id.clone(),
            ip,
            pid: start.pid,
            login,
            renewed: login,
        });
        true
    }

    /// A session end. Some: grant as a login at the end time (the grant lasts ttl after
    /// the session ends). An end whose login is not seen yet is remembered briefly.
    pub fn closed(&mut self, end: &SessionEnd, now: i64) -> Option<Renewal> {
        self.forget_old_early(now);
        if end.id.is_empty() || end.id.len() > MAX_ID {
            return None;
        }
        // imap-hibernate has its own pid; an exact end has none: either matches any pid.
        let hibernate = end.service.ends_with("-hibernate") || end.exact;
        let time = end.time.unwrap_or(now).min(now);
        match self.open.get(&end.id) {
            // The mail process logs its own end; imap-hibernate has another pid.
            Some(s) if hibernate || s.pid.is_none_or(|p| p == end.pid) => {
                let s = self.remove(&end.id)?;
                // ttl after the end, but never past login + hold.
                let time = time.clamp(s.login, self.last_renewal(s.login).max(s.login));
                Some(Renewal { ip: s.ip, time })
            }
            Some(_) => None,
            None => {
                if self.early.len() < MAX_EARLY {
                    self.early.insert(
                        end.id.clone(),
                        EarlyEnd {
                            pid: end.pid,
                            time,
                            hibernate,
                        },
                    );
                }
                None
            }
        }
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

    /// Grants to write again for open sessions at `now`; sessions past their hold are
    /// dropped (their grant then runs out ttl after the last renewal).
    pub fn renewals(&mut self, now: i64) -> Vec<Renewal> {
        let (every, hold, ttl) = (self.renew_every(), self.hold, self.ttl);
        let mut out = Vec::new();
        while let Some((d, id)) = self.due.first().cloned() {
            if d > now {
                break;
            }
            let Some(mut s) = self.remove(&id) else {
                self.due.remove(&(d, id));
                continue;
            };
            if now >= s.login.saturating_add(hold) {
                continue;
            }
            let last = s.login.saturating_add(hold).saturating_sub(ttl);
            if now >= s.renewed.saturating_add(every) && s.renewed < last {
                s.renewed = now.min(last);
                out.push(Renewal {
                    ip: s.ip,
                    time: s.renewed,
                });
            }
            self.insert(s);
        }
        out
    }

    /// For a report at the end of its input: each open session as the grant its hold
    /// would last until (renewed up to the cap).
    pub fn held_to_the_cap(&self) -> Vec<Renewal> {
        self.open
            .values()
            .map(|s| Renewal {
                ip: s.ip,
                time: self.last_renewal(s.login).max(s.login),
            })
            .collect()
    }

    /// The open sessions, for saving beside the checkpoints.
    pub fn snapshot(&self) -> Vec<OpenSession> {
        let mut v: Vec<OpenSession> = self.open.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Restores saved sessions (those past their hold are dropped).
    pub fn restore(&mut self, saved: Vec<OpenSession>, now: i64) {
        for s in saved {
            if s.id.len() <= MAX_ID
                && now < s.login.saturating_add(self.hold)
                && self.open.len() < MAX_OPEN
            {
                self.insert(s);
            }
        }
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
        }
    }

    fn end(service: &str, id: &str, pid: u32, t: i64) -> SessionEnd {
        SessionEnd {
            service: service.into(),
            id: id.into(),
            pid,
            time: Some(t),
            exact: false,
        }
    }

    #[test]
    fn idle_session_renews_until_its_end() {
        let mut s = Sessions::new(300, 12 * 3600);
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        assert_eq!(s.next_due(), Some(1100));
        assert!(s.renewals(1050).is_empty());
        assert_eq!(
            s.renewals(1100),
            vec![Renewal {
                ip: ip(),
                time: 1100
            }]
        );
        assert_eq!(
            s.renewals(5000),
            vec![Renewal {
                ip: ip(),
                time: 5000
            }]
        );
        // The end: grant until end + ttl (as a login at the end time).
        assert_eq!(
            s.closed(&end("imap", "abc", 42, 6000), 6001),
            Some(Renewal {
                ip: ip(),
                time: 6000
            })
        );
        assert!(s.is_empty());
        assert!(s.renewals(9000).is_empty());
    }

    #[test]
    fn hold_caps_a_session_whose_end_is_never_seen() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("abc", 42), 1000);
        let mut last = 1000;
        let mut t = 1000;
        while t < 10_000 {
            t = s.next_due().unwrap_or(10_000).max(t + 1);
            for r in s.renewals(t) {
                last = r.time;
            }
        }
        // The last grant written expires exactly at login + hold.
        assert_eq!(last + 300, 1000 + 3600);
        assert!(s.is_empty());
    }

    #[test]
    fn end_before_login_and_hibernate() {
        let mut s = Sessions::new(300, 3600);
        // 2.4: the end line first, then the login.
        assert_eq!(s.closed(&end("imap", "x1", 7429, 1000), 1000), None);
        s.opened(ip(), 1000, &start("x1", 7429), 1000);
        assert!(s.is_empty(), "already ended");
        // imap-hibernate ends it with its own pid and the same id.
        s.opened(ip(), 1000, &start("x2", 50), 1000);
        assert!(s
            .closed(&end("imap-hibernate", "x2", 99, 2000), 2000)
            .is_some());
        // Another process's end with the wrong pid does not close it.
        s.opened(ip(), 1000, &start("x3", 50), 1000);
        assert_eq!(s.closed(&end("imap", "x3", 51, 2000), 2000), None);
        assert_eq!(s.len(), 1);
        // An end in the future is taken as now; the grant never outlives login + hold.
        assert_eq!(
            s.closed(&end("imap", "x3", 50, 99_999), 3000),
            Some(Renewal {
                ip: ip(),
                time: 3000
            })
        );
        s.opened(ip(), 1000, &start("x4", 50), 1000);
        assert_eq!(
            s.closed(&end("imap", "x4", 50, 4500), 4500),
            Some(Renewal {
                ip: ip(),
                time: 1000 + 3600 - 300
            })
        );
    }

    /// Dovecot's own session-end event has no pid: it closes the session a log line
    /// opened (with its mail process's pid), also when it arrives before the login.
    #[test]
    fn an_exact_end_closes_whatever_the_pid() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("x1", 7429), 1000);
        let exact = |id: &str, t| SessionEnd {
            exact: true,
            ..end("imap", id, 0, t)
        };
        assert!(s.closed(&exact("x1", 2000), 2000).is_some());
        assert!(s.is_empty());
        assert_eq!(s.closed(&exact("x2", 2000), 2000), None);
        assert!(
            !s.opened(ip(), 2000, &start("x2", 7430), 2000),
            "already ended"
        );
    }

    #[test]
    fn survives_a_restart() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1000, &start("a", 1), 1000);
        s.opened(ip(), 1000, &start("b", 2), 1000);
        let saved = serde_json::to_string(&s.snapshot()).unwrap();
        let mut t = Sessions::new(300, 3600);
        t.restore(serde_json::from_str(&saved).unwrap(), 2000);
        assert_eq!(t.open_for(ip()), 2);
        let mut u = Sessions::new(300, 3600);
        u.restore(serde_json::from_str(&saved).unwrap(), 5000);
        assert!(u.is_empty(), "past the hold");
    }

    #[test]
    fn bounded() {
        let mut s = Sessions::new(300, 3600);
        s.opened(ip(), 1, &start(&"x".repeat(65), 1), 1);
        assert!(s.is_empty());
        for i in 0..(MAX_EARLY + 10) {
            s.closed(&end("imap", &format!("e{i}"), 1, 1), 1);
        }
        assert_eq!(s.early.len(), MAX_EARLY);
        s.closed(&end("imap", "late", 1, 1000), 1000);
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
        let r = s.renewals(101);
        assert_eq!(r.len(), 1);
        assert_eq!(s.next_due(), Some(102));
    }
}
