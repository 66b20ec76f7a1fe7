//! The `store` stage: where grants live. `CommitStore` (the engine's commit path) and
//! `AdminStore` (the administrator's commands) are the seams; `LmdbMap` is the Postfix
//! LMDB map, `fleet::WriterStore` the map with the shared database behind it.

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

/// The engine's commit path: what the daemon does to the map every commit interval and
/// at each expiry (the replica's loop too). Implementations keep the later expiry when two
/// writers grant the same address, and never remove a grant whose stored expiry is still
/// in the future. Split from [`AdminStore`] so that the engine cannot reach what only an
/// administrator may do (set an expiry shorter or longer than the rules, list values).
pub trait CommitStore: Send {
    /// Writes grants in one transaction; an existing later expiry wins. Returns the
    /// effective expiry of each address.
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError>;
    /// Removes those of `ips` whose stored expiry is at or before `now`. Returns the
    /// addresses removed and those found extended by another writer (with their expiry).
    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError>;
    /// Removes every grant expired at `now`; returns how many.
    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError>;
    /// Removes one address; true when it was there (a blocked user's grants; `dovegate
    /// revoke`).
    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError>;
    /// Every grant that has an expiry, for the engine's view; also marks the store as
    /// read, so that `changed` reports only what other writers do after this.
    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError>;
    /// Whether another writer changed the store since the last `snapshot`: `Some(false)`
    /// when it can tell cheaply that nothing changed, `None` when it cannot tell (the
    /// engine then takes a snapshot at its resync interval).
    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }
    /// Shortens every stored expiry of `ips` later than `limit` to `limit` (a clock fixed
    /// after a step forward, a rule made shorter); returns what each address holds after.
    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError>;
    /// `grant.ttl` changed (a reload): a store that bounds what it writes elsewhere by it
    /// (the shared database's rows, its revoke checks) follows.
    fn set_ttl(&mut self, _secs: i64) {}
}

/// What the administrator's commands (`list`, `lookup`, `grant`, `revoke`, `status`) and
/// the replica's reconciliation ask beyond the commit path: whole entries with their
/// values, and an expiry set as given, shorter than the stored one included.
pub trait AdminStore: CommitStore {
    /// Every grant in the store.
    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError>;
    /// The stored value for one address.
    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError>;
    /// Sets one address's expiry, even if shorter than the stored one (manual grant).
    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError>;
}

/// The daemon holds its store boxed (the writer's, or `--dry-run`'s).
impl<S: CommitStore + ?Sized> CommitStore for Box<S> {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        (**self).upsert(grants)
    }
    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        (**self).expire(ips, now)
    }
    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        (**self).expire_all(now)
    }
    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        (**self).revoke(ip)
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
    fn set_ttl(&mut self, secs: i64) {
        (**self).set_ttl(secs)
    }
}

/// What an expiry pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpireOutcome {
    pub removed: Vec<IpAddr>,
    pub extended: Vec<(IpAddr, i64)>,
}
