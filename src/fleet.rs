//! The writer's store: the local LMDB map, and PostgreSQL when `[store] postgres_url_file`
//! is set (issue 13).
//!
//! The engine commits through `GrantStore::upsert` and saves checkpoints only after it
//! returns Ok; so a commit here succeeds only when the grants are in the database (or,
//! while it is down, durably in the spill queue) and in the local map. Everything the
//! engine reads (list, expiry) is the local map: the database keeps its own expiry.

use std::net::IpAddr;

use crate::store::postgres::worker::{Committed, PgWriter};
use crate::store::{ExpireOutcome, GrantStore, LmdbMap, StoreError, StoredGrant};

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

fn db_err(e: String) -> StoreError {
    StoreError::other(format!("PostgreSQL: {e}"))
}

impl GrantStore for WriterStore {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let Some(pg) = &self.pg else {
            return self.map.upsert(grants);
        };
        match pg.commit(grants).map_err(db_err)? {
            // The database may know a later expiry (another writer): keep it locally too.
            Committed::Written(effective) => self.map.upsert(&effective),
            Committed::Spilled => self.map.upsert(grants),
        }
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

    // The map's own versions (a look at its meta page; the fault check that reopens a
    // deleted, replaced or truncated map; one-transaction caps), not the trait's defaults.
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
