//! The writer's store: the local LMDB map, and PostgreSQL when `[store] postgres_url_file`
//! is set (issue 13).
//!
//! The engine commits through `GrantStore::upsert` and saves checkpoints only after it
//! returns Ok; so a commit here succeeds only when the grants are in the database (or,
//! while it is down, durably in the spill queue) and in the local map. Everything the
//! engine reads (list, expiry) is the local map: the database keeps its own expiry.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::store::postgres::worker::{Committed, PgWriter};
use crate::store::{ExpireOutcome, GrantStore, LmdbMap, StoreError, StoredGrant};
use crate::timefmt;

/// The store `dovegate run` uses: always the local map, plus the database when configured.
pub struct WriterStore {
    map: LmdbMap,
    pg: Option<PgWriter>,
}

impl WriterStore {
    pub fn local(map: LmdbMap) -> WriterStore {
        WriterStore { map, pg: None }
    }

    pub fn shared(map: LmdbMap, pg: PgWriter) -> WriterStore {
        WriterStore { map, pg: Some(pg) }
    }
}

/// What the local map gets: per address the later of this host's expiry (the engine's,
/// already bounded by it, a session hold included) and the database's (another writer may
/// know a later one; a database clock behind this host's must not shorten it). The
/// database's answer counts only up to this host's now + ttl (`limit`): it is not trusted
/// to open a relay for longer than a login here would.
fn local_expiries(own: &[(IpAddr, i64)], committed: Committed, limit: i64) -> Vec<(IpAddr, i64)> {
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
    if let Committed::Written(effective) = committed {
        for (ip, e) in effective {
            if let Some(v) = best.get_mut(&ip) {
                *v = (*v).max(e.min(limit));
            }
        }
    }
    order.into_iter().map(|ip| (ip, best[&ip])).collect()
}

fn db_err(e: String) -> StoreError {
    StoreError::other(format!("PostgreSQL: {e}"))
}

impl GrantStore for WriterStore {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let Some(pg) = &self.pg else {
            return self.map.upsert(grants);
        };
        let limit = timefmt::now().saturating_add(pg.max_ttl());
        let committed = pg.commit(grants).map_err(db_err)?;
        self.map.upsert(&local_expiries(grants, committed, limit))
    }

    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        self.map.expire(ips, now)
    }

    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        self.map.expire_all(now)
    }

    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
        self.map.list()
    }

    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
        self.map.get(ip)
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        let in_db = match &self.pg {
            Some(pg) => pg.revoke(ip).map_err(db_err)?,
            None => false,
        };
        Ok(self.map.revoke(ip)? || in_db)
    }

    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        if let Some(pg) = &self.pg {
            pg.set(ip, expires).map_err(db_err)?;
        }
        self.map.set(ip, expires)
    }

    // The local map's own cheap forms: the engine's view, its change probe (other writers'
    // changes reach it within a probe, without listing the map) and capping in one
    // transaction. The trait's defaults would list the map every minute and cap one
    // transaction per address.
    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        self.map.snapshot()
    }

    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        self.map.changed()
    }

    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        self.map.cap(ips, limit)
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
        let db = Committed::Written(vec![
            // The database's clock is behind: shorter.
            (a, 900),
            // Another writer's later grant.
            (b, 1150),
            // A far-future row (294000-01-01): never written as it is.
            (c, 9_215_576_668_800),
        ]);
        assert_eq!(
            local_expiries(&own, db, 1200),
            vec![(a, 1100), (b, 1150), (c, 1200)]
        );
        // The engine's own expiry (a session hold may pass the ttl) is kept.
        assert_eq!(
            local_expiries(&[(a, 5000)], Committed::Spilled, 1200),
            vec![(a, 5000)]
        );
    }
}
