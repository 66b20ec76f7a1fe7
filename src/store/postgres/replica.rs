//! The PostgreSQL side of `dovegate replica` (`store::follow::ReplicaDb`): LISTEN on
//! the connection, a snapshot with its transaction horizon, then on each notification the
//! addresses whose grant or revocation changed since the last horizon (`changes_since`)
//! and their rows (`reread`). A notification carries nothing (any role that can connect
//! may LISTEN or NOTIFY): it only says that something may have changed.

use std::time::Duration;

use super::{Horizon, Listening, Origin, PgError, Report, Reread, Tables, Target};
use crate::store::follow::{Read, ReplicaDb, Snapshot};

/// Addresses re-read per statement.
const REREAD_CHUNK: usize = 5000;

/// A replica's PostgreSQL.
pub struct PgReplica {
    target: Target,
    tables: Tables,
    /// This host's name, as reported in `dovegate_hosts`.
    host: String,
}

impl PgReplica {
    pub fn new(target: Target) -> PgReplica {
        PgReplica {
            tables: target.tables(),
            target,
            host: Origin::this_host("").host,
        }
    }
}

impl ReplicaDb for PgReplica {
    type Conn = Listening;
    type Since = Horizon;
    type Error = PgError;

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn connect(&self) -> Result<Listening, PgError> {
        Listening::connect(&self.target).await
    }

    async fn snapshot(&self, c: &mut Listening, ttl: i64) -> Result<Snapshot<Horizon>, PgError> {
        // Taken before the snapshot: every change it does not show is at or after it.
        let since = super::horizon(&c.client)
            .await
            .map_err(|e| PgError::db("snapshot", e))?;
        let (rows, db_now) = super::snapshot(&c.client, &self.tables.grants, ttl)
            .await
            .map_err(|e| PgError::db("snapshot", e))?;
        Ok(Snapshot {
            rows,
            db_now,
            since,
        })
    }

    async fn changes(
        &self,
        c: &mut Listening,
        since: &Horizon,
        ttl: i64,
        limit: usize,
    ) -> Result<Read<Horizon>, PgError> {
        let db = |e| PgError::db("reading changes", e);
        let next = super::horizon(&c.client).await.map_err(db)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let changed = super::changes_since(&c.client, &self.tables, since, limit)
            .await
            .map_err(db)?;
        if changed.len() as i64 >= limit {
            return Ok(Read::TooMany(changed.len()));
        }
        let mut rows: Vec<Reread> = Vec::new();
        for chunk in changed.chunks(REREAD_CHUNK) {
            let got = super::reread(&c.client, &self.tables.grants, chunk, ttl)
                .await
                .map_err(|e| PgError::db("reading the changed rows", e))?;
            rows.extend(got);
        }
        Ok(Read::Changes {
            addresses: changed,
            rows,
            next,
        })
    }

    async fn next_change(&self, c: &mut Listening) -> Result<(), PgError> {
        c.changed().await
    }

    fn read_gap(&self, commit_interval: Duration) -> Duration {
        commit_interval
    }

    fn closed(&self, c: &mut Listening) -> Option<PgError> {
        c.closed()
    }

    async fn ping(&self, c: &mut Listening) -> Result<(), PgError> {
        c.client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| PgError::db("a liveness check", e))
    }

    async fn report(&self, c: &mut Listening, r: &Report) {
        if let Err(e) = super::report(&c.client, self.target.schema(), &self.host, r).await {
            tracing::debug!(error = %super::error_text(&e), "cannot report this replica to the database");
        }
    }

    async fn close(&self, c: Listening) {
        drop(c);
    }
}
