//! The MariaDB side of `dovegate replica` (`store::follow::ReplicaDb`): a consistent
//! snapshot with the change sequence value it is current to, then every `POLL` the rows
//! whose sequence is past the last one read (an index range scan, empty and cheap when
//! nothing changed). MariaDB has no LISTEN: the poll is the change signal.
//!
//! A DELETE (or TRUNCATE) by hand leaves no sequence value. So the replica knows which
//! rows the table holds (grantable or not, unexpired at its last snapshot: the snapshot's
//! rows, then each change read's), and every `HELD_CHECK_EVERY` polls it counts them in
//! the database, in the same consistent read as the changes (`super::HELD_SQL`): a count
//! that differs means rows went without a trace, and it resyncs at once (within seconds,
//! not at the next 5-minute resync). One count every few seconds, not one per poll.

use std::collections::HashSet;
use std::time::Duration;

use super::{MyError, Polled, Target};
use crate::store::follow::{Read, ReplicaDb, Snapshot};
use crate::store::shared::{Report, Reread};

/// Every this many polls the held rows are counted (`POLL` 200 ms: every 2 s).
const HELD_CHECK_EVERY: u32 = 10;

/// A replica's MariaDB.
pub struct MyReplica {
    target: Target,
}

impl MyReplica {
    pub fn new(target: Target) -> MyReplica {
        MyReplica { target }
    }
}

/// A replica's connection, and what it knows of the rows the table holds.
pub struct Following {
    polled: Polled,
    /// The time after which a row's expiry makes it one the replica follows the count of
    /// (its last snapshot's, unix seconds).
    held_after: Option<i64>,
    /// Those rows' addresses: the snapshot's, then kept up to date by each change read.
    held: HashSet<String>,
    polls: u32,
}

impl ReplicaDb for MyReplica {
    type Conn = Following;
    /// The change sequence value read up to.
    type Since = i64;
    type Error = MyError;

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn connect(&self) -> Result<Following, MyError> {
        Ok(Following {
            polled: Polled::connect(&self.target).await?,
            held_after: None,
            held: HashSet::new(),
            polls: 0,
        })
    }

    async fn snapshot(&self, c: &mut Following, ttl: i64) -> Result<Snapshot<i64>, MyError> {
        let s = super::snapshot(&mut c.polled.conn, ttl)
            .await
            .map_err(|e| MyError::db("snapshot", e))?;
        c.held_after = Some(s.held_after);
        c.held = s.held.into_iter().collect();
        Ok(Snapshot {
            rows: s.rows,
            db_now: s.db_now,
            since: s.seq,
        })
    }

    async fn changes(
        &self,
        c: &mut Following,
        since: &i64,
        ttl: i64,
        limit: usize,
    ) -> Result<Read<i64>, MyError> {
        c.polls = c.polls.wrapping_add(1);
        let count = c.polls % HELD_CHECK_EVERY == 0;
        let ch = super::changes_since(&mut c.polled.conn, *since, ttl, limit, c.held_after, count)
            .await
            .map_err(|e| MyError::db("reading changes", e))?;
        let most = ch.addresses.len().max(ch.rows.len()).max(ch.kept.len());
        if most >= limit {
            return Ok(Read::TooMany(most));
        }
        for a in &ch.addresses {
            c.held.remove(a);
        }
        c.held.extend(ch.kept);
        if let Some(n) = ch.held {
            let expected = c.held.len();
            if usize::try_from(n).ok() != Some(expected) {
                return Ok(Read::Unsequenced {
                    expected,
                    found: usize::try_from(n).unwrap_or(0),
                });
            }
        }
        if ch.seq == *since {
            return Ok(Read::Nothing);
        }
        let rows = ch
            .rows
            .into_iter()
            .map(|(address, expires, updated, host, source)| Reread {
                address,
                expires,
                updated,
                host,
                source,
            })
            .collect();
        Ok(Read::Changes {
            addresses: ch.addresses,
            rows,
            next: ch.seq,
        })
    }

    async fn next_change(&self, c: &mut Following) -> Result<(), MyError> {
        c.polled.poll.tick().await;
        Ok(())
    }

    fn read_gap(&self, _commit_interval: Duration) -> Duration {
        // The poll interval is the gap already.
        Duration::ZERO
    }

    fn closed(&self, _c: &mut Following) -> Option<MyError> {
        // The polls find out, every `POLL`.
        None
    }

    async fn ping(&self, c: &mut Following) -> Result<(), MyError> {
        use mysql_async::prelude::Queryable;
        c.polled
            .conn
            .query_drop("DO 1")
            .await
            .map_err(|e| MyError::db("a liveness check", e))
    }

    async fn report(&self, _c: &mut Following, _r: &Report) {
        // No fleet table in MariaDB yet: `dovegate status --fleet` reads PostgreSQL only.
    }

    async fn close(&self, c: Following) {
        // Not waited for long: the server may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), c.polled.conn.disconnect()).await;
    }
}
