//! The `store` stage: where grants live. `GrantStore` is the seam; `LmdbMap` is the Postfix
//! LMDB map. A fleet store (PostgreSQL) will implement the same trait.

pub mod lmdb;
mod lock;
pub mod postgres;
pub mod value;

use std::net::IpAddr;

pub use lmdb::{LmdbMap, OpenMode};

/// One grant as stored: canonical address and expiry (unix seconds; None = no expiry
/// written, e.g. an entry an administrator added with postmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGrant {
    pub ip: IpAddr,
    pub expires: Option<i64>,
    pub value: String,
}

/// A store failure, naming the map and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

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
}

/// What an expiry pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpireOutcome {
    pub removed: Vec<IpAddr>,
    pub extended: Vec<(IpAddr, i64)>,
}
