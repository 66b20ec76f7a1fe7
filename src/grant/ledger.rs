//! The relay window's one record: the grants committed where the MTA reads them, each with
//! its deadline.
//!
//! The engine (logins), the replica (database rows) and therefore every path that ends in
//! them (push, events, admin re-reads) keep their grants here. A grant cannot be in the
//! view lookup servers answer from without a deadline that expires it, nor keep an old
//! deadline after it was renewed, shortened or revoked: both are changed by one call.
//! The deadlines are an ordered set, so the next expiry is the first entry (mini-redis's
//! "expire on the next deadline").

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::view::GrantsView;

/// The committed grants (shared with lookup servers through `view`) and their deadlines.
#[derive(Debug, Default)]
pub struct Ledger {
    view: GrantsView,
    deadlines: BTreeSet<(i64, IpAddr)>,
}

impl Ledger {
    /// An empty ledger whose view also finds IPv6 clients under their /`bits` grant.
    pub fn with_ipv6_prefix(bits: u8) -> Ledger {
        Ledger {
            view: GrantsView::with_ipv6_prefix(bits),
            deadlines: BTreeSet::new(),
        }
    }

    /// The grants as lookup servers see them.
    pub fn view(&self) -> GrantsView {
        self.view.clone()
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// The committed expiry of `ip`, expired or not.
    pub fn get(&self, ip: IpAddr) -> Option<i64> {
        self.view.committed(ip)
    }

    /// Records grants just committed (new, renewed or shortened), under one lock.
    pub fn commit(&mut self, grants: impl IntoIterator<Item = (IpAddr, i64)>) {
        let mut view = self.view.grants_mut();
        for (ip, e) in grants {
            if let Some(old) = view.insert(ip, e) {
                self.deadlines.remove(&(old, ip));
            }
            self.deadlines.insert((e, ip));
        }
    }

    /// Forgets the grant of `ip` (revoked or expired); its old expiry, if it had one.
    pub fn remove(&mut self, ip: IpAddr) -> Option<i64> {
        let old = self.view.grants_mut().remove(&ip)?;
        self.deadlines.remove(&(old, ip));
        Some(old)
    }

    /// Replaces every grant by a fresh read of the map; the view is no longer stale.
    pub fn replace(&mut self, grants: HashMap<IpAddr, i64>) {
        self.deadlines = grants.iter().map(|(&ip, &e)| (e, ip)).collect();
        self.view.replace(grants);
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|&(e, _)| e)
    }

    /// The latest deadline (a clock stepped back shows here first).
    pub fn last_deadline(&self) -> Option<i64> {
        self.deadlines.last().map(|&(e, _)| e)
    }

    /// The addresses whose deadline is at or before `now`, earliest first.
    pub fn due(&self, now: i64) -> Vec<IpAddr> {
        self.deadlines
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|&(_, ip)| ip)
            .collect()
    }

    /// The grants still live at `now`.
    pub fn live(&self, now: i64) -> Vec<(IpAddr, i64)> {
        self.deadlines
            .iter()
            .filter(|(e, _)| *e > now)
            .map(|&(e, ip)| (ip, e))
            .collect()
    }

    /// The addresses with a grant, expired or not.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.deadlines.iter().map(|&(_, ip)| ip).collect()
    }

    /// Reads the grants in place (diffs against a fresh read).
    pub fn read<T>(&self, f: impl FnOnce(&HashMap<IpAddr, i64>) -> T) -> T {
        self.view.read(f)
    }

    /// Lookups answer unsure while the map may differ from this record (a re-read failed).
    pub fn set_stale(&self, stale: bool) {
        self.view.set_stale(stale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::view::Lookup;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn view_and_deadlines_move_together() {
        let mut l = Ledger::default();
        let v = l.view();
        l.commit([(ip("192.0.2.1"), 100), (ip("192.0.2.2"), 50)]);
        assert_eq!(l.next_deadline(), Some(50));
        assert_eq!(v.find(ip("192.0.2.2"), 10), Lookup::Found(50));
        // A renewal moves the deadline; the old one is gone.
        l.commit([(ip("192.0.2.2"), 150)]);
        assert_eq!(l.next_deadline(), Some(100));
        assert_eq!(l.last_deadline(), Some(150));
        assert_eq!(l.len(), 2);
        assert_eq!(l.due(100), vec![ip("192.0.2.1")]);
        assert_eq!(l.remove(ip("192.0.2.1")), Some(100));
        assert_eq!(v.find(ip("192.0.2.1"), 10), Lookup::Absent);
        assert_eq!(l.due(1000), vec![ip("192.0.2.2")]);
        assert_eq!(l.remove(ip("192.0.2.1")), None);
        assert_eq!(l.live(149), vec![(ip("192.0.2.2"), 150)]);
        assert!(l.live(150).is_empty());
    }

    #[test]
    fn a_fresh_read_replaces_both_and_clears_staleness() {
        let mut l = Ledger::default();
        l.commit([(ip("192.0.2.1"), 100)]);
        l.set_stale(true);
        assert!(matches!(
            l.view().find(ip("192.0.2.1"), 10),
            Lookup::Unsure { .. }
        ));
        l.replace(HashMap::from([(ip("192.0.2.3"), 70)]));
        assert_eq!(l.addresses(), vec![ip("192.0.2.3")]);
        assert_eq!(l.view().find(ip("192.0.2.3"), 10), Lookup::Found(70));
        assert_eq!(l.view().find(ip("192.0.2.1"), 10), Lookup::Absent);
        assert_eq!(l.get(ip("192.0.2.3")), Some(70));
    }
}
