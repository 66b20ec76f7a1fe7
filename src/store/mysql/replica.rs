//! The MariaDB side of `dovegate replica` (`crate::replica::ReplicaDb`): a consistent
//! snapshot with the change sequence value it is current to, then every `POLL` the rows
//! whose sequence is past the last one read (an index range scan, empty and cheap when
//! nothing changed). MariaDB has no LISTEN: the poll is the change signal. A DELETE by hand
//! leaves no sequence value; the loop's full resync catches it.

use std::time::Duration;

use super::{MyError, Polled, Target};
use crate::replica::{Read, ReplicaDb, ReplicaStatus, Snapshot};
use crate::store::postgres::Reread;

/// A replica's MariaDB.
pub struct MyReplica {
    target: Target,
}

impl MyReplica {
    pub fn new(target: Target) -> MyReplica {
        MyReplica { target }
    }
}

impl ReplicaDb for MyReplica {
    type Conn = Polled;
    /// The change sequence value read up to.
    type Since = i64;
    type Error = MyError;

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn connect(&self) -> Result<Polled, MyError> {
        Polled::connect(&self.target).await
    }

    async fn snapshot(&self, c: &mut Polled, ttl: i64) -> Result<Snapshot<i64>, MyError> {
        let (rows, since, db_now) = super::snapshot(&mut c.conn, ttl)
            .await
            .map_err(|e| MyError::db("snapshot", e))?;
        Ok(Snapshot {
            rows,
            db_now,
            since,
        })
    }

    async fn changes(
        &self,
        c: &mut Polled,
        since: &i64,
        ttl: i64,
        limit: usize,
    ) -> Result<Read<i64>, MyError> {
        let ch = super::changes_since(&mut c.conn, *since, ttl, limit)
            .await
            .map_err(|e| MyError::db("reading changes", e))?;
        if ch.seq == *since {
            return Ok(Read::Nothing);
        }
        if ch.addresses.len() >= limit || ch.rows.len() >= limit {
            return Ok(Read::TooMany(ch.addresses.len().max(ch.rows.len())));
        }
        let rows = ch
            .rows
            .into_iter()
            .map(|(address, expires, updated)| Reread {
                address,
                expires,
                updated,
                host: String::new(),
                source: String::new(),
            })
            .collect();
        Ok(Read::Changes {
            addresses: ch.addresses,
            rows,
            next: ch.seq,
        })
    }

    async fn next_change(&self, c: &mut Polled) -> Result<(), MyError> {
        c.poll.tick().await;
        Ok(())
    }

    fn read_gap(&self, _commit_interval: Duration) -> Duration {
        // The poll interval is the gap already.
        Duration::ZERO
    }

    fn closed(&self, _c: &mut Polled) -> Option<MyError> {
        // The polls find out, every `POLL`.
        None
    }

    async fn ping(&self, c: &mut Polled) -> Result<(), MyError> {
        use mysql_async::prelude::Queryable;
        c.conn
            .query_drop("DO 1")
            .await
            .map_err(|e| MyError::db("a liveness check", e))
    }

    async fn report(&self, _c: &mut Polled, _status: &ReplicaStatus, _grants: usize) {
        // No fleet table in MariaDB yet: `dovegate status --fleet` reads PostgreSQL only.
    }

    async fn close(&self, c: Polled) {
        // Not waited for long: the server may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), c.conn.disconnect()).await;
    }
}
