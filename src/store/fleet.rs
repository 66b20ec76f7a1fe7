//! The writer's store: the local LMDB map, and PostgreSQL when `[store] postgres_url_file`
//! is set (issue 13), or MariaDB/MySQL when `[store] mysql_url_file` is (issue 23). The
//! database is a `SharedDb`: the grant core here (revocation races, local expiries) is one
//! for both.
//!
//! The engine commits through `CommitStore::upsert` and saves checkpoints only after it
//! returns Ok; so a commit here succeeds only when the grants are in the database (or,
//! while it is down, durably in the spill queue) and in the local map. Everything the
//! engine reads (list, expiry) is the local map: the database keeps its own expiry.
//!
//! The local map is never held back by the database's copy: when the spill queue is full,
//! or the worker does not answer, the commit is local only and the database copy is
//! behind (said loudly by the worker and in `STATE/fleet.json`). Revocations recorded in
//! the database (another host, a DELETE or TRUNCATE by hand) are removed from the local
//! map at the engine's next change probe, unless a login after the revoke granted again.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::store::shared::{Upserted, REVOKE_RACE_SECS};
use crate::store::writer::{Committed, Writer, WriterDb, WriterError};

/// The shared database as the writer's store sees it: a worker that commits grants (to the
/// database, or durably to the spill queue while it is away), revokes with a tombstone,
/// and hands over the revocations other hosts recorded.
pub trait SharedDb: Send {
    /// Grants in the database or in the fsynced spill queue when Ok.
    fn commit(&self, grants: &[(IpAddr, i64)]) -> Result<Committed, StoreError>;
    /// Deletes the grant and records a tombstone; true when a grant was there.
    fn revoke(&self, ip: IpAddr) -> Result<bool, StoreError>;
    /// Sets one grant's expiry (a manual grant), bounded by now + ttl in the database.
    fn set(&self, ip: IpAddr, expires: i64) -> Result<(), StoreError>;
    /// Revocations recorded since the last call (address, when, this host's clock).
    fn take_revocations(&self) -> Vec<(IpAddr, i64)>;
    /// The longest a grant may last from now (`grant.ttl`, seconds).
    fn max_ttl(&self) -> i64;
    /// `grant.ttl` changed (a reload).
    fn set_max_ttl(&self, secs: i64);
}

impl<D: WriterDb> SharedDb for Writer<D> {
    fn commit(&self, grants: &[(IpAddr, i64)]) -> Result<Committed, StoreError> {
        Writer::commit(self, grants).map_err(db_err::<D>)
    }
    fn revoke(&self, ip: IpAddr) -> Result<bool, StoreError> {
        Writer::revoke(self, ip).map_err(db_err::<D>)
    }
    fn set(&self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        Writer::set(self, ip, expires).map_err(db_err::<D>)
    }
    fn take_revocations(&self) -> Vec<(IpAddr, i64)> {
        Writer::take_revocations(self)
    }
    fn max_ttl(&self) -> i64 {
        Writer::max_ttl(self)
    }
    fn set_max_ttl(&self, secs: i64) {
        Writer::set_max_ttl(self, secs)
    }
}

/// How long a revocation seen is kept to stop grants racing it.
const RECENT_SECS: i64 = 30;
use crate::store::{
    value, AdminStore, Cause, CommitStore, ExpireOutcome, LmdbMap, StoreError, StoredGrant,
};
use crate::telemetry::ratelimit::RateLimit;
use crate::timefmt;

/// The store `dovegate run` uses: always the local map, plus the database when configured.
pub struct WriterStore {
    map: LmdbMap,
    pg: Option<Box<dyn SharedDb>>,
    /// Revocations seen in the last `RECENT_SECS` (address, when, this host's clock): a
    /// grant in flight from a login no later than the revoke + `REVOKE_RACE_SECS` (a
    /// session renewal racing the revoke) is not committed.
    recent: HashMap<IpAddr, i64>,
    /// Says that the database copy is behind, at most once a minute.
    behind: RateLimit,
}

impl WriterStore {
    pub fn local(map: LmdbMap) -> WriterStore {
        WriterStore {
            map,
            pg: None,
            recent: HashMap::new(),
            behind: RateLimit::new(crate::telemetry::ratelimit::REMIND_EVERY),
        }
    }

    pub fn shared(map: LmdbMap, db: Box<dyn SharedDb>) -> WriterStore {
        WriterStore {
            map,
            pg: Some(db),
            recent: HashMap::new(),
            behind: RateLimit::new(crate::telemetry::ratelimit::REMIND_EVERY),
        }
    }

    /// Removes from the local map the grants revoked in the database, except those
    /// written by a login after the revoke (a local expiry later than the revoke + ttl).
    /// True when one was removed.
    fn apply_revocations(&mut self) -> Result<bool, StoreError> {
        let Some(pg) = &self.pg else {
            return Ok(false);
        };
        let ttl = pg.max_ttl();
        let now = timefmt::now();
        let fresh = pg.take_revocations();
        self.recent.retain(|_, &mut at| at + RECENT_SECS > now);
        self.recent.extend(fresh.iter().copied());
        let mut removed = false;
        for (ip, revoked_at) in fresh {
            let Some(v) = self.map.get(ip)? else {
                continue;
            };
            let expires = value::parse_expiry(v.as_bytes());
            if expires.is_some_and(|e| e > revoked_at.saturating_add(ttl + REVOKE_RACE_SECS)) {
                continue;
            }
            if self.map.revoke(ip)? {
                removed = true;
                let revoked = timefmt::rfc3339(revoked_at);
                tracing::info!(address = %ip, revoked = %revoked, "grant {ip} revoked in the database at {revoked} (dovegate revoke on some host, or a DELETE/TRUNCATE): removed from the local map");
            }
        }
        Ok(removed)
    }

    fn say_behind(&mut self, why: &str) {
        let Some(times) = self.behind.hit() else {
            return;
        };
        tracing::error!(error = why, times, "database copy behind: grants committed to the local map only (the other hosts do not see them); check the database and STATE/fleet.json");
    }
}

/// What the local map gets: per address the later of this host's expiry (the engine's,
/// already bounded by it, a session hold included) and the database's (another writer may
/// know a later one; a database clock behind this host's must not shorten it). The
/// database's answer counts only up to this host's now + ttl (`limit`): it is not trusted
/// to open a relay for longer than a login here would.
fn local_expiries(own: &[(IpAddr, i64)], committed: &Committed, limit: i64) -> Vec<(IpAddr, i64)> {
    let mut best: HashMap<IpAddr, i64> = HashMap::with_capacity(own.len());
    let mut order = Vec::with_capacity(own.len());
    for &(ip, e) in own {
        match best.get_mut(&ip) {
            Some(v) => *v = (*v).max(e),
            None => {
                best.insert(ip, e);
                order.push(ip);
            }
        }
    }
    if let Committed::Written(Upserted { written, revoked }) = committed {
        for &(ip, e) in written {
            if let Some(v) = best.get_mut(&ip) {
                *v = (*v).max(e.min(limit));
            }
        }
        // Revoked after the login that granted them: not granted here either.
        for ip in revoked {
            best.remove(ip);
        }
    }
    order
        .into_iter()
        .filter_map(|ip| Some((ip, *best.get(&ip)?)))
        .collect()
}

/// A database failure as a store error: the spill queue's I/O keeps its kind, the rest is
/// the database's (the text keeps the cause).
fn db_err<D: WriterDb>(e: WriterError<D::Error>) -> StoreError {
    let cause = e.io_kind().map_or(Cause::Database, Cause::Io);
    StoreError::new(format!("{}: {e}", D::NAME), cause)
}

impl CommitStore for WriterStore {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        if self.pg.is_none() {
            return self.map.upsert(grants);
        }
        // Revocations the worker has read since the last probe, first: a renewal in this
        // batch must not write back what was just revoked.
        self.apply_revocations()?;
        let racing = |&(ip, e): &(IpAddr, i64), ttl: i64, recent: &HashMap<IpAddr, i64>| {
            recent
                .get(&ip)
                .is_some_and(|&at| e.saturating_sub(ttl) <= at + REVOKE_RACE_SECS)
        };
        let Some(pg) = &self.pg else {
            return self.map.upsert(grants);
        };
        let ttl = pg.max_ttl();
        let kept: Vec<(IpAddr, i64)>;
        let grants = if grants.iter().any(|g| racing(g, ttl, &self.recent)) {
            kept = grants
                .iter()
                .filter(|g| !racing(g, ttl, &self.recent))
                .copied()
                .collect();
            for g in grants.iter().filter(|g| racing(g, ttl, &self.recent)) {
                tracing::warn!(address = %g.0, "grant refused: this address was revoked (dovegate revoke, or a DELETE/TRUNCATE in the database) just before");
            }
            &kept[..]
        } else {
            grants
        };
        let limit = timefmt::now().saturating_add(ttl);
        let committed = match pg.commit(grants) {
            Ok(c) => c,
            Err(e) => {
                // The local map first: this host's logins never wait on the shared copy.
                self.say_behind(&e.to_string());
                Committed::Spilled { dropped: 0 }
            }
        };
        if let Committed::Written(Upserted { revoked, .. }) = &committed {
            for &ip in revoked {
                tracing::warn!(address = %ip, "grant refused: this address was revoked after the login (dovegate revoke, or a DELETE/TRUNCATE in the database)");
                self.map.revoke(ip)?;
            }
        }
        self.map.upsert(&local_expiries(grants, &committed, limit))
    }

    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        self.map.expire(ips, now)
    }

    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        self.map.expire_all(now)
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        // Here first: an unreachable database must not keep the grant in this map.
        let here = self.map.revoke(ip)?;
        let in_db = match &self.pg {
            Some(pg) => pg.revoke(ip)?,
            None => false,
        };
        Ok(here || in_db)
    }

    // The local map's own cheap forms: the engine's view, its change probe (other writers'
    // changes reach it within a probe, without listing the map) and capping in one
    // transaction. Listing the map every minute, or capping one transaction per address,
    // would cost a large map dearly.
    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        self.map.snapshot()
    }

    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        let revoked = self.apply_revocations()?;
        let changed = self.map.changed()?;
        Ok(if revoked { Some(true) } else { changed })
    }

    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        self.map.cap(ips, limit)
    }

    fn set_ttl(&mut self, secs: i64) {
        if let Some(pg) = &self.pg {
            pg.set_max_ttl(secs);
        }
    }
}

impl AdminStore for WriterStore {
    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
        self.map.list()
    }

    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
        self.map.get(ip)
    }

    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        if let Some(pg) = &self.pg {
            pg.set(ip, expires)?;
        }
        self.map.set(ip, expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_expiry_is_the_later_one_capped_at_own_ttl() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let own = [(a, 1000), (b, 1000), (c, 1000), (a, 1100)];
        let db = Committed::Written(Upserted {
            written: vec![
                // The database's clock is behind: shorter.
                (a, 900),
                // Another writer's later grant.
                (b, 1150),
                // A far-future row (294000-01-01): never written as it is.
                (c, 9_215_576_668_800),
            ],
            revoked: vec![],
        });
        assert_eq!(
            local_expiries(&own, &db, 1200),
            vec![(a, 1100), (b, 1150), (c, 1200)]
        );
        // The engine's own expiry (a session hold may pass the ttl) is kept.
        assert_eq!(
            local_expiries(&[(a, 5000)], &Committed::Spilled { dropped: 0 }, 1200),
            vec![(a, 5000)]
        );
        // Revoked after the login: not in the local map either.
        let db = Committed::Written(Upserted {
            written: vec![(b, 1000)],
            revoked: vec![a],
        });
        assert_eq!(local_expiries(&own, &db, 1200), vec![(b, 1000), (c, 1000)]);
    }
}
