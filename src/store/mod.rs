//! The `store` stage: where grants live. `GrantStore` is the seam; `LmdbMap` is the Postfix
//! LMDB map. A fleet store (PostgreSQL) will implement the same trait.

pub mod damage;
pub mod dry;
mod error;
mod file;
pub mod fleet;
pub mod follow;
pub mod instance;
pub mod lmdb;
mod lock;
pub mod mysql;
pub mod policy_db;
pub mod postgres;
pub mod shared;
pub mod spill;
pub mod url_file;
pub mod value;
pub mod writer;

use std::net::IpAddr;

pub use error::{Cause, StoreError};
pub use lmdb::{LmdbMap, OpenMode};

/// One grant as stored: canonical address and expiry (unix seconds; None = no expiry
/// written, e.g. an entry an administrator added with postmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGrant {
    pub ip: IpAddr,
    pub expires: Option<i64>,
    pub value: String,
}

/// Where grants are written. Implementations keep the later expiry when two writers grant
/// the same address, and never remove a grant whose stored expiry is still in the future.
pub trait GrantStore: Send {
    /// Writes grants in one transaction; an existing later expiry wins. Returns the
    /// effective expiry of each address.
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError>;
    /// Removes those of `ips` whose stored expiry is at or before `now`. Returns the
    /// addresses removed and those found extended by another writer (with their expiry).
    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError>;
    /// Removes every grant expired at `now`; returns how many.
    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError>;
    /// Every grant in the store.
    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError>;
    /// The stored value for one address.
    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError>;
    /// Removes one address; true when it was there.
    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError>;
    /// Sets one address's expiry, even if shorter than the stored one (manual grant).
    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError>;

    /// Every grant that has an expiry, for the engine's view; also marks the store as
    /// read, so that `changed` reports only what other writers do after this.
    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|g| g.expires.map(|e| (g.ip, e)))
            .collect())
    }

    /// Whether another writer changed the store since the last `snapshot` (Some), or None
    /// when this store cannot tell cheaply (the engine then re-reads it now and then).
    /// `Cause::Reopened` when the store had to be reopened: the live grants must be
    /// written again.
    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }

    /// Lowers the expiry of those of `ips` stored later than `limit` to `limit` (grants
    /// written under a wrong clock or a longer ttl). Returns the effective expiries.
    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            let stored = self
                .get(ip)?
                .and_then(|v| value::parse_expiry(v.as_bytes()));
            match stored {
                Some(e) if e > limit => {
                    self.set(ip, limit)?;
                    out.push((ip, limit));
                }
                Some(e) => out.push((ip, e)),
                None => {}
            }
        }
        Ok(out)
    }
}

/// A boxed store is a store: the daemon chooses the writer's or the dry run's at start.
impl<S: GrantStore + ?Sized> GrantStore for Box<S> {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        (**self).upsert(grants)
    }
    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        (**self).expire(ips, now)
    }
    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        (**self).expire_all(now)
    }
    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
        (**self).list()
    }
    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
        (**self).get(ip)
    }
    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        (**self).revoke(ip)
    }
    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        (**self).set(ip, expires)
    }
    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        (**self).snapshot()
    }
    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        (**self).changed()
    }
    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        (**self).cap(ips, limit)
    }
}

/// What an expiry pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpireOutcome {
    pub removed: Vec<IpAddr>,
    pub extended: Vec<(IpAddr, i64)>,
}
