//! The grants as committed, shared with lookup servers (socketmap, metrics).
//!
//! A lookup has three answers: found (with its expiry), absent, or unsure. Unsure means
//! the view may not be what the map holds (a writer panicked while holding it, or the map
//! is known to have changed and could not be re-read): a lookup server answers "try
//! again" rather than guess, since a stale "found" may be a revoked grant.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

/// The answer of a lookup in the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A grant that has not expired, with its expiry.
    Found(i64),
    Absent,
    /// The view may be stale or inconsistent; the best guess is in `guess`.
    Unsure {
        guess: Option<i64>,
    },
}

#[derive(Debug, Default)]
struct Inner {
    grants: HashMap<IpAddr, i64>,
    /// The map changed and could not be re-read.
    stale: bool,
    /// `grant.ipv6_prefix` (0 = unset = 128): an IPv6 client is also found under the
    /// network its prefix grant is kept under.
    ipv6_prefix: u8,
}

/// A read-only view of the committed grants, for servers answering lookups.
#[derive(Debug, Clone, Default)]
pub struct GrantsView(Arc<RwLock<Inner>>);

impl GrantsView {
    /// An empty view whose lookups also find IPv6 clients under their /`bits` grant.
    pub fn with_ipv6_prefix(bits: u8) -> GrantsView {
        let v = GrantsView::default();
        v.write().ipv6_prefix = bits;
        v
    }

    /// Found, absent or unsure for `ip` at `now`: the address's own grant, else its
    /// prefix's.
    pub fn find(&self, ip: IpAddr, now: i64) -> Lookup {
        let found = |m: &Inner| {
            let ip = ip.to_canonical();
            let get = |k: &IpAddr| m.grants.get(k).copied().filter(|&e| e > now);
            get(&ip).or_else(|| match m.ipv6_prefix {
                b @ 1..128 => get(&crate::grant::widen(ip, b)),
                _ => None,
            })
        };
        match self.0.read() {
            Ok(m) if !m.stale => found(&m).map_or(Lookup::Absent, Lookup::Found),
            Ok(m) => Lookup::Unsure { guess: found(&m) },
            Err(poisoned) => Lookup::Unsure {
                guess: found(&poisoned.into_inner()),
            },
        }
    }

    /// The address the grant `ip` relays by is kept under: its own when it has one, else
    /// its IPv6 prefix's (`grant::widen`; itself when prefixes are off).
    pub fn granted_under(&self, ip: IpAddr) -> IpAddr {
        let ip = ip.to_canonical();
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        match m.ipv6_prefix {
            b @ 1..128 if !m.grants.contains_key(&ip) => crate::grant::widen(ip, b),
            _ => ip,
        }
    }

    /// The expiry of `ip`'s grant, if it has one that has not expired at `now` (best guess
    /// when unsure).
    pub fn lookup(&self, ip: IpAddr, now: i64) -> Option<i64> {
        self.try_lookup(ip, now).unwrap_or_else(|e| e)
    }

    /// Like `find`: Ok when sure, Err(best guess) when unsure.
    pub fn try_lookup(&self, ip: IpAddr, now: i64) -> Result<Option<i64>, Option<i64>> {
        match self.find(ip, now) {
            Lookup::Found(e) => Ok(Some(e)),
            Lookup::Absent => Ok(None),
            Lookup::Unsure { guess } => Err(guess),
        }
    }

    /// Adds a grant to the view only (tests of lookup servers).
    pub fn insert(&self, ip: IpAddr, expires: i64) {
        self.write().grants.insert(ip.to_canonical(), expires);
    }

    pub fn len(&self) -> usize {
        self.read(|m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The committed expiry, expired or not.
    pub(crate) fn committed(&self, ip: IpAddr) -> Option<i64> {
        self.read(|m| m.get(&ip).copied())
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&HashMap<IpAddr, i64>) -> T) -> T {
        f(&self.0.read().unwrap_or_else(|e| e.into_inner()).grants)
    }

    /// Marks the view stale (lookups answer unsure) or fresh again.
    pub(crate) fn set_stale(&self, stale: bool) {
        self.write().stale = stale;
    }

    /// Replaces every grant (a fresh read of the map) and clears staleness.
    pub(crate) fn replace(&self, grants: HashMap<IpAddr, i64>) {
        let mut w = self.write();
        w.grants = grants;
        w.stale = false;
        drop(w);
        // Consistent again.
        self.0.clear_poison();
    }

    pub(crate) fn grants_mut(&self) -> GrantsGuard<'_> {
        GrantsGuard(self.write())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        // A poisoned lock is cleared by the next full write (`replace`); meanwhile
        // lookups answer unsure.
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Write access to the grants for the engine's bookkeeping.
pub(crate) struct GrantsGuard<'a>(RwLockWriteGuard<'a, Inner>);

impl std::ops::Deref for GrantsGuard<'_> {
    type Target = HashMap<IpAddr, i64>;
    fn deref(&self) -> &Self::Target {
        &self.0.grants
    }
}

impl std::ops::DerefMut for GrantsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0.grants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_answers() {
        let v = GrantsView::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        v.insert("::ffff:192.0.2.1".parse().unwrap(), 100);
        assert_eq!(v.find(ip, 50), Lookup::Found(100));
        assert_eq!(v.find(ip, 100), Lookup::Absent);
        assert_eq!(v.try_lookup(ip, 50), Ok(Some(100)));
        v.set_stale(true);
        assert_eq!(v.find(ip, 50), Lookup::Unsure { guess: Some(100) });
        assert_eq!(v.try_lookup(ip, 50), Err(Some(100)));
        assert_eq!(v.lookup(ip, 50), Some(100));
        v.replace(HashMap::new());
        assert_eq!(v.find(ip, 50), Lookup::Absent);
    }

    #[test]
    fn addresses_are_found_under_their_prefix_grant() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let v = GrantsView::with_ipv6_prefix(64);
        v.insert(ip("2001:db8:1:2::"), 100);
        v.insert(ip("2001:db8::7"), 100);
        assert_eq!(v.find(ip("2001:db8:1:2::99"), 50), Lookup::Found(100));
        assert_eq!(v.find(ip("2001:db8:1:3::1"), 50), Lookup::Absent);
        assert_eq!(v.find(ip("2001:db8::7"), 50), Lookup::Found(100));
        // 2001:db8::/64 has no prefix key: its grants are per address.
        assert_eq!(v.find(ip("2001:db8::8"), 50), Lookup::Absent);
        let exact = GrantsView::default();
        exact.insert(ip("2001:db8:1:2::"), 100);
        assert_eq!(exact.find(ip("2001:db8:1:2::99"), 50), Lookup::Absent);
        assert_eq!(
            v.granted_under(ip("2001:db8:1:2::99")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(v.granted_under(ip("2001:db8::7")), ip("2001:db8::7"));
        assert_eq!(
            exact.granted_under(ip("2001:db8:1:2::99")),
            ip("2001:db8:1:2::99")
        );
    }

    #[test]
    fn poisoned_is_unsure() {
        let v = GrantsView::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        v.insert(ip, 100);
        let v2 = v.clone();
        let _ = std::thread::spawn(move || {
            let _g = v2.0.write().unwrap();
            panic!("poison the view");
        })
        .join();
        assert_eq!(v.find(ip, 50), Lookup::Unsure { guess: Some(100) });
        assert_eq!(v.try_lookup(ip, 50), Err(Some(100)));
    }
}
