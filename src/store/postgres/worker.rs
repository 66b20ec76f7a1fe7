//! The writer's PostgreSQL statements (`store::writer::WriterDb`): the worker thread,
//! spill queue, retries and warnings are `store::writer`'s, shared with MariaDB. The
//! connection LISTENs: revocations recorded in the database (another host's `dovegate
//! revoke`, a DELETE or TRUNCATE by hand, whose triggers write tombstones) are read at
//! each notification, at most once per `READ_GAP`.

use std::net::IpAddr;
use std::time::Duration;

use super::{Horizon, Listening, NewerSchema, Origin, PgError, Report, Tables, Target, Upserted};
use crate::store::writer::{Writer, WriterDb};

/// Revocations are read at most this often (notifications come from anyone).
const READ_GAP: Duration = Duration::from_millis(250);

/// The writer's handle on its PostgreSQL worker.
pub type PgWriter = Writer<PgWriterDb>;

/// A writer's PostgreSQL: where, and its schema's tables.
#[derive(Clone)]
pub struct PgWriterDb {
    target: Target,
    tables: Tables,
}

impl PgWriterDb {
    pub fn new(target: Target) -> PgWriterDb {
        PgWriterDb {
            tables: target.tables(),
            target,
        }
    }
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| PgError::db(what, e)
}

impl WriterDb for PgWriterDb {
    type Conn = Listening;
    type Since = Horizon;
    type Error = PgError;

    const NAME: &'static str = "PostgreSQL";
    const URL_SETTING: &'static str = "postgres_url_file";
    const THREAD: &'static str = "postgres";

    fn describe(&self) -> String {
        self.target.describe()
    }

    fn connect(&self) -> impl std::future::Future<Output = Result<Listening, PgError>> + Send {
        let target = self.target.clone();
        async move { Listening::connect(&target).await }
    }

    async fn upsert(
        &self,
        c: &mut Listening,
        grants: &[(IpAddr, i64)],
        max_ttl: i64,
        skew: f64,
        origin: &Origin,
    ) -> Result<Upserted, PgError> {
        super::upsert(&c.client, &self.tables, grants, max_ttl, skew, origin)
            .await
            .map_err(db("writing grants"))
    }

    async fn revoke(&self, c: &mut Listening, ip: IpAddr) -> Result<bool, PgError> {
        super::revoke(&c.client, &self.tables, ip)
            .await
            .map_err(db("revoking"))
    }

    async fn set(
        &self,
        c: &mut Listening,
        ip: IpAddr,
        expires: i64,
        max_ttl: i64,
        origin: &Origin,
    ) -> Result<(), PgError> {
        super::set(&c.client, &self.tables.grants, ip, expires, max_ttl, origin)
            .await
            .map_err(db("granting"))
    }

    async fn db_now(&self, c: &mut Listening) -> Result<f64, PgError> {
        super::db_now(&c.client)
            .await
            .map_err(db("reading the database's clock"))
    }

    async fn revocations_since(
        &self,
        c: &mut Listening,
        since: Option<&Horizon>,
        ttl: i64,
    ) -> Result<(Vec<(String, f64)>, Horizon), PgError> {
        // Taken before the read: every revocation it misses is at or after it.
        let next = super::horizon(&c.client)
            .await
            .map_err(db("reading revocations"))?;
        let rows = super::revocations_since(&c.client, &self.tables, since, ttl)
            .await
            .map_err(db("reading revocations"))?;
        Ok((rows, next))
    }

    async fn clean(
        &self,
        c: &mut Listening,
        keep_secs: i64,
        _max_ttl: i64,
    ) -> Result<u64, PgError> {
        super::clean(&c.client, &self.tables, keep_secs)
            .await
            .map_err(db("deleting expired rows"))
    }

    async fn report(&self, c: &mut Listening, host: &str, r: &Report) -> Result<(), PgError> {
        super::report(&c.client, self.target.schema(), host, r)
            .await
            .map_err(db("reporting to the fleet"))
    }

    async fn next_change(&self, c: &mut Listening) -> Result<(), PgError> {
        c.changed().await
    }

    fn read_gap(&self) -> Duration {
        READ_GAP
    }

    fn closed(&self, c: &mut Listening) -> Option<PgError> {
        c.closed()
    }

    fn close(&self, c: Listening) {
        drop(c);
    }

    fn is_data_error(e: &PgError) -> bool {
        e.is_data_error()
    }

    fn newer_schema(e: &PgError) -> Option<NewerSchema> {
        e.newer_schema()
    }
}
