//! What a later event needs from the successful authentication before it: Dovecot's
//! master-login event has no session id, and a proxy's `proxy_session_established` names
//! the connection's real peer (a trusted proxy in front, say), not the client it
//! forwarded. Both are taken from the authentication, kept briefly under the connection
//! that names them both. A login whose authentication was not seen (lost, late) grants as
//! a plain login without a session hold; a proxied one grants nothing (its client is not
//! known).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Authentications kept at most, and for how long: the login follows within milliseconds,
/// a proxied one once the backend answered.
const MAX_PENDING: usize = 50_000;
const KEEP: Duration = Duration::from_secs(60);

pub struct Pending<K, V> {
    kept: HashMap<K, (V, Instant)>,
}

impl<K, V> Default for Pending<K, V> {
    fn default() -> Self {
        Pending {
            kept: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq, V> Pending<K, V> {
    pub fn authenticated(&mut self, key: K, value: V, now: Instant) {
        if self.kept.len() >= MAX_PENDING {
            self.kept.retain(|_, (_, t)| now.duration_since(*t) < KEEP);
        }
        // Still full: a flood of authentications without logins; later ones go unpaired.
        if self.kept.len() < MAX_PENDING || self.kept.contains_key(&key) {
            self.kept.insert(key, (value, now));
        }
    }

    /// What the connection's recent authentication left, once.
    pub fn take(&mut self, key: &K, now: Instant) -> Option<V> {
        let (v, t) = self.kept.remove(key)?;
        (now.duration_since(t) < KEEP).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_once_briefly_and_bounded() {
        let t0 = Instant::now();
        let mut p = Pending::<u32, String>::default();
        p.authenticated(1, "S1".into(), t0);
        assert_eq!(p.take(&2, t0), None);
        assert_eq!(p.take(&1, t0), Some("S1".into()));
        assert_eq!(p.take(&1, t0), None, "taken once");
        p.authenticated(1, "S2".into(), t0);
        assert_eq!(p.take(&1, t0 + KEEP), None, "too old");
        for i in 0..MAX_PENDING + 5 {
            p.authenticated(i as u32, format!("S{i}"), t0);
        }
        assert_eq!(p.kept.len(), MAX_PENDING);
        // Once the old ones expire, room again.
        p.authenticated(1, "new".into(), t0 + KEEP);
        assert_eq!(p.kept.len(), 1);
    }
}
