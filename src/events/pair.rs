//! The session id of a login: Dovecot's master-login event has none, the successful
//! authentication just before it has. Both name the connection (protocol, local and
//! remote address and port, the forwarded ones for a proxied client), so the id is kept
//! briefly under that key and taken by the login. A login whose authentication was not
//! seen (lost, late) still grants, as a plain login without a session hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::parse::Conn;

/// Authentications kept at most, and for how long: the login follows within milliseconds.
const MAX_PENDING: usize = 10_000;
const KEEP: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Pending {
    ids: HashMap<Conn, (String, Instant)>,
}

impl Pending {
    pub fn authenticated(&mut self, conn: Conn, session: String, now: Instant) {
        if self.ids.len() >= MAX_PENDING {
            self.ids.retain(|_, (_, t)| now.duration_since(*t) < KEEP);
        }
        // Still full: a flood of authentications without logins; later ones go unpaired.
        if self.ids.len() < MAX_PENDING || self.ids.contains_key(&conn) {
            self.ids.insert(conn, (session, now));
        }
    }

    /// The session id of the connection that just logged in, if its authentication was
    /// seen recently.
    pub fn login(&mut self, conn: &Conn, now: Instant) -> Option<String> {
        let (id, t) = self.ids.remove(conn)?;
        (now.duration_since(t) < KEEP).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16) -> Conn {
        Conn {
            protocol: "imap".into(),
            local: ("127.0.0.1".parse().unwrap(), 143),
            remote: ("203.0.113.5".parse().unwrap(), port),
        }
    }

    #[test]
    fn pairs_once_briefly_and_bounded() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.authenticated(conn(1), "S1".into(), t0);
        assert_eq!(p.login(&conn(2), t0), None);
        assert_eq!(p.login(&conn(1), t0), Some("S1".into()));
        assert_eq!(p.login(&conn(1), t0), None, "taken once");
        p.authenticated(conn(1), "S2".into(), t0);
        assert_eq!(p.login(&conn(1), t0 + KEEP), None, "too old");
        for i in 0..MAX_PENDING + 5 {
            p.authenticated(conn(i as u16), format!("S{i}"), t0);
        }
        assert_eq!(p.ids.len(), MAX_PENDING);
        // Once the old ones expire, room again.
        p.authenticated(conn(1), "new".into(), t0 + KEEP);
        assert_eq!(p.ids.len(), 1);
    }
}
