//! What a replica reads from a shared database (`ReplicaDb`), whatever the database:
//! PostgreSQL (`store::postgres::replica`) or MariaDB (`store::mysql::replica`). The loop
//! that follows it and keeps the map is `crate::replica`'s; this trait lives here so that
//! the databases' code imports nothing from it.

use std::time::Duration;

use crate::store::shared::{Report, Reread};

/// A full read of the grants.
pub struct Snapshot<S> {
    /// Every grantable row: the address as stored, its effective expiry (unix seconds).
    pub rows: Vec<(String, i64)>,
    /// The database's clock when it was read (unix seconds).
    pub db_now: f64,
    /// Where the next read of changes starts: every change the rows miss is after it.
    pub since: S,
}

/// A read of what changed since a position.
pub enum Read<S> {
    /// Nothing changed: the position stays.
    Nothing,
    /// More than the limit changed (this many at least): a full resync is cheaper.
    TooMany(usize),
    /// Rows changed without a trace in the change sequence (MariaDB: a DELETE by hand):
    /// `found` of the `expected` rows the last snapshot held are there. A full resync.
    Unsequenced { expected: usize, found: usize },
    /// The addresses whose grant or revocation changed, their rows now (an address
    /// without a row grants nothing), and the position this is current to.
    Changes {
        addresses: Vec<String>,
        rows: Vec<Reread>,
        next: S,
    },
}

/// The database side of a replica: what differs between PostgreSQL
/// (`store::postgres::replica`) and MariaDB (`store::mysql::replica`). Every statement it
/// runs is bounded by the loop (`crate::replica`).
// Used generically by `crate::replica::run`, never boxed nor spawned: no Send bound
// is needed on the futures.
#[allow(async_fn_in_trait)]
pub trait ReplicaDb {
    /// A connection, with whatever tells it of changes (notifications, a poll timer).
    type Conn;
    /// A position in the database's changes.
    type Since: Clone;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The database for logs and status, without credentials.
    fn describe(&self) -> String;
    /// Connects (bounded), with the schema checked or migrated, subscribed to changes
    /// where the database can announce them.
    async fn connect(&self) -> Result<Self::Conn, Self::Error>;
    /// Every grantable row with its effective expiry (`ttl`: this host's `grant.ttl`).
    async fn snapshot(
        &self,
        c: &mut Self::Conn,
        ttl: i64,
    ) -> Result<Snapshot<Self::Since>, Self::Error>;
    /// What changed after `since`; `Read::TooMany` beyond `limit` addresses.
    async fn changes(
        &self,
        c: &mut Self::Conn,
        since: &Self::Since,
        ttl: i64,
        limit: usize,
    ) -> Result<Read<Self::Since>, Self::Error>;
    /// Resolves when something may have changed (a notification, the next poll); an error
    /// when the connection is lost. Cancel-safe (a `select!` branch).
    async fn next_change(&self, c: &mut Self::Conn) -> Result<(), Self::Error>;
    /// The least time between two reads of changes (a flood of signals, which anyone may
    /// send, costs one read per gap).
    fn read_gap(&self, commit_interval: Duration) -> Duration;
    /// Some when the connection is known to be closed (no round trip).
    fn closed(&self, c: &mut Self::Conn) -> Option<Self::Error>;
    /// One round trip: a database that hangs without closing the connection sends
    /// nothing either.
    async fn ping(&self, c: &mut Self::Conn) -> Result<(), Self::Error>;
    /// Reports this replica (`dovegate status --fleet`) where the database keeps the
    /// fleet; status only, so a failure is logged at debug level and changes nothing.
    async fn report(&self, c: &mut Self::Conn, r: &Report);
    /// Ends the connection, waiting a bounded time (the server may be gone).
    async fn close(&self, c: Self::Conn);
}
