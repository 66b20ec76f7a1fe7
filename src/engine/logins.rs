//! Who logged in behind each committed grant, and which grants ended recently: what the
//! policy server needs beyond the grants themselves (caps per user, receipts, `why`, and
//! "check your mail first" for a client whose grant just ended).
//!
//! Fed by the engine: logins of a batch wait here until their grant is committed (a
//! receipt must never name a login whose grant Postfix cannot see), expiries move an
//! address to the recently ended. Everything is bounded; what falls out is detail for
//! receipts only, never a grant.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// One login behind a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    pub user: Option<String>,
    /// `imap`, `pop3`, ...
    pub protocol: String,
    /// Dovecot's session id, when the line named one.
    pub session: Option<String>,
    /// The login's time (unix seconds).
    pub at: i64,
}

/// The logins behind one committed grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    /// When the grant began: the first login of this grant that dovegate saw.
    pub began: i64,
    /// The latest logins, oldest first (at most `MAX_LOGINS_PER_GRANT`).
    pub logins: VecDeque<LoginRecord>,
}

impl Behind {
    /// The login that counts for caps and receipts: the latest.
    pub fn latest(&self) -> Option<&LoginRecord> {
        self.logins.back()
    }

    /// How many different users logged in behind this grant (2 or more: a shared address,
    /// such as a NAT).
    pub fn users(&self) -> usize {
        let mut users: Vec<&str> = self
            .logins
            .iter()
            .filter_map(|l| l.user.as_deref())
            .collect();
        users.sort_unstable();
        users.dedup();
        users.len()
    }
}

/// Logins kept per grant (`dovegate why` shows them).
pub const MAX_LOGINS_PER_GRANT: usize = 8;
/// Logins waiting for their commit; past this the oldest details are dropped (the grants
/// themselves wait in the engine, unaffected).
const MAX_PENDING: usize = 100_000;
/// Recently ended grants remembered; past this the oldest are forgotten (their clients
/// get DUNNO, the answer without this feature).
pub const MAX_RECENT: usize = 100_000;

#[derive(Debug, Default)]
struct Inner {
    behind: HashMap<IpAddr, Behind>,
    pending: VecDeque<(IpAddr, LoginRecord)>,
    /// Address -> when its grant ended.
    recent: HashMap<IpAddr, i64>,
    /// The same in order of ending (may hold entries superseded in `recent`).
    recent_order: VecDeque<(i64, IpAddr)>,
    /// How long an ended grant is remembered (0: not at all).
    recent_keep: i64,
    /// Bumped on every change (the state file is rewritten when it moved).
    version: u64,
}

/// Shared between the engine (writer) and the policy server (reader).
#[derive(Debug, Clone, Default)]
pub struct LoginsView(Arc<Mutex<Inner>>);

impl LoginsView {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data is detail only: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers ended grants for `secs` (the policy server's `policy.recent`).
    pub fn set_recent(&self, secs: i64) {
        self.lock().recent_keep = secs.max(0);
    }

    /// The logins behind `ip`'s committed grant.
    pub fn behind(&self, ip: IpAddr) -> Option<Behind> {
        self.lock().behind.get(&ip.to_canonical()).cloned()
    }

    /// When `ip`'s grant ended, if within `policy.recent` of `now`.
    pub fn ended_recently(&self, ip: IpAddr, now: i64) -> Option<i64> {
        let m = self.lock();
        m.recent
            .get(&ip.to_canonical())
            .copied()
            .filter(|&t| now - t < m.recent_keep)
    }

    /// The addresses whose grant has a login of `user`.
    pub fn addresses_of(&self, user: &str) -> Vec<IpAddr> {
        let m = self.lock();
        m.behind
            .iter()
            .filter(|(_, b)| b.logins.iter().any(|l| l.user.as_deref() == Some(user)))
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Addresses with several users behind their grant.
    pub fn shared(&self) -> usize {
        self.lock()
            .behind
            .values()
            .filter(|b| b.users() >= 2)
            .count()
    }

    /// Every committed grant's logins, with a version that changes with them.
    pub fn snapshot(&self) -> (u64, Vec<(IpAddr, Behind)>) {
        let m = self.lock();
        let all = m.behind.iter().map(|(ip, b)| (*ip, b.clone())).collect();
        (m.version, all)
    }

    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// The logins behind grants as saved before a restart (for addresses that still have
    /// their grant; what the engine learnt since wins).
    pub fn restore(&self, saved: Vec<(IpAddr, Behind)>) {
        let mut m = self.lock();
        for (ip, mut b) in saved {
            b.logins.truncate(MAX_LOGINS_PER_GRANT);
            m.behind.entry(ip.to_canonical()).or_insert(b);
        }
        m.version += 1;
    }

    /// A login that granted `ip` (canonical), waiting for the commit.
    pub(super) fn pending(&self, ip: IpAddr, login: LoginRecord) {
        let mut m = self.lock();
        if m.pending.len() >= MAX_PENDING {
            m.pending.pop_front();
        }
        m.pending.push_back((ip, login));
    }

    /// The pending logins' grants are committed.
    pub(super) fn commit_pending(&self) {
        let mut m = self.lock();
        if m.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut m.pending);
        for (ip, login) in pending {
            m.recent.remove(&ip);
            let b = m.behind.entry(ip).or_insert_with(|| Behind {
                began: login.at,
                logins: VecDeque::new(),
            });
            let new_user = login
                .user
                .as_deref()
                .is_some_and(|u| b.logins.iter().all(|l| l.user.as_deref() != Some(u)));
            if b.logins.len() >= MAX_LOGINS_PER_GRANT {
                b.logins.pop_front();
            }
            b.logins.push_back(login);
            if new_user && b.users() == 2 {
                tracing::info!(address = %ip, "address shared: several users logged in behind one grant (caps per address count them together)");
            }
        }
        m.version += 1;
    }

    /// `ip`'s grant expired at `now`.
    pub fn expired(&self, ip: IpAddr, now: i64) {
        let mut m = self.lock();
        m.behind.remove(&ip);
        m.version += 1;
        if m.recent_keep == 0 {
            return;
        }
        // Forget what is too old or too much, oldest first.
        while let Some(&(t, old)) = m.recent_order.front() {
            if now - t < m.recent_keep && m.recent_order.len() < MAX_RECENT {
                break;
            }
            m.recent_order.pop_front();
            if m.recent.get(&old) == Some(&t) {
                m.recent.remove(&old);
            }
        }
        m.recent.insert(ip, now);
        m.recent_order.push_back((now, ip));
    }

    /// `ip`'s grant was removed by another writer (a revocation): not "ended recently".
    pub(super) fn forget(&self, ip: IpAddr) {
        let mut m = self.lock();
        if m.behind.remove(&ip).is_some() {
            m.version += 1;
        }
        m.recent.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str, at: i64) -> LoginRecord {
        LoginRecord {
            user: Some(user.into()),
            protocol: "imap".into(),
            session: Some("s1".into()),
            at,
        }
    }

    #[test]
    fn pending_until_commit_then_recent_after_expiry() {
        let v = LoginsView::default();
        v.set_recent(100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        v.pending(ip, login("alice", 10));
        assert_eq!(v.behind(ip), None, "not committed yet");
        v.commit_pending();
        v.pending(ip, login("bob", 20));
        v.commit_pending();
        let b = v.behind(ip).unwrap();
        assert_eq!(b.began, 10);
        assert_eq!(b.latest().unwrap().user.as_deref(), Some("bob"));
        assert_eq!(b.users(), 2);
        assert_eq!(v.shared(), 1);
        v.expired(ip, 50);
        assert_eq!(v.behind(ip), None);
        assert_eq!(v.ended_recently(ip, 149), Some(50));
        assert_eq!(v.ended_recently(ip, 150), None);
        // A new grant clears it.
        v.pending(ip, login("alice", 60));
        v.commit_pending();
        assert_eq!(v.ended_recently(ip, 61), None);
        assert_eq!(v.behind(ip).unwrap().began, 60);
    }

    #[test]
    fn bounded() {
        let v = LoginsView::default();
        v.set_recent(1_000_000);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..20 {
            v.pending(ip, login("u", i));
        }
        v.commit_pending();
        assert_eq!(v.behind(ip).unwrap().logins.len(), MAX_LOGINS_PER_GRANT);
        for i in 0..(MAX_RECENT as u32 + 10) {
            v.expired(IpAddr::from(i.to_be_bytes()), 1);
        }
        assert!(v.lock().recent.len() <= MAX_RECENT);
    }
}
