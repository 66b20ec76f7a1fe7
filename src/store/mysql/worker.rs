//! The writer's MariaDB statements (`store::writer::WriterDb`): the worker thread, spill
//! queue, retries and warnings are `store::writer`'s, shared with PostgreSQL. MariaDB has
//! no LISTEN: revocations are polled every `POLL` on the change sequence. With
//! `[store] mysql_popbsmtp_*`, the Dovecot wiki's table is written in the same
//! transactions and cleaned as the wiki's cron job did.

use std::net::IpAddr;
use std::time::Duration;

use super::{MyError, Polled, Popbsmtp, Target};
use crate::store::shared::{NewerSchema, Origin, Report, Upserted};
use crate::store::writer::{Writer, WriterDb, KEEP_EXPIRED_SECS, QUERY_TIMEOUT};

/// The writer's handle on its MariaDB worker.
pub type MysqlWriter = Writer<MyWriterDb>;

/// A writer's MariaDB, and the wiki's table when it is written too.
#[derive(Clone)]
pub struct MyWriterDb {
    target: Target,
    popbsmtp: Option<Popbsmtp>,
}

impl MyWriterDb {
    pub fn new(target: Target, popbsmtp: Option<Popbsmtp>) -> MyWriterDb {
        MyWriterDb { target, popbsmtp }
    }
}

fn db(what: &'static str) -> impl FnOnce(mysql_async::Error) -> MyError {
    move |e| MyError::db(what, e)
}

impl WriterDb for MyWriterDb {
    type Conn = Polled;
    /// The change sequence value read up to.
    type Since = i64;
    type Error = MyError;

    const NAME: &'static str = "MariaDB";
    const URL_SETTING: &'static str = "mysql_url_file";
    const THREAD: &'static str = "mariadb";

    fn describe(&self) -> String {
        self.target.describe()
    }

    fn connect(&self) -> impl std::future::Future<Output = Result<Polled, MyError>> + Send {
        let (target, wiki) = (self.target.clone(), self.popbsmtp.clone());
        async move {
            let mut c = Polled::connect(&target).await?;
            if let Some(w) = &wiki {
                super::timed("creating the popbsmtp table", w.ensure(&mut c.conn)).await?;
            }
            Ok(c)
        }
    }

    async fn upsert(
        &self,
        c: &mut Polled,
        grants: &[(IpAddr, i64)],
        max_ttl: i64,
        skew: f64,
        origin: &Origin,
    ) -> Result<Upserted, MyError> {
        let wiki = self.popbsmtp.as_ref();
        super::upsert(&mut c.conn, grants, max_ttl, skew, origin, wiki)
            .await
            .map_err(db("writing grants"))
    }

    async fn revoke(&self, c: &mut Polled, ip: IpAddr) -> Result<bool, MyError> {
        super::revoke(&mut c.conn, ip, self.popbsmtp.as_ref())
            .await
            .map_err(db("revoking"))
    }

    async fn set(
        &self,
        c: &mut Polled,
        ip: IpAddr,
        expires: i64,
        max_ttl: i64,
        origin: &Origin,
    ) -> Result<(), MyError> {
        super::set(&mut c.conn, ip, expires, max_ttl, origin)
            .await
            .map_err(db("granting"))
    }

    async fn db_now(&self, c: &mut Polled) -> Result<f64, MyError> {
        super::db_now(&mut c.conn)
            .await
            .map_err(db("reading the database's clock"))
    }

    async fn revocations_since(
        &self,
        c: &mut Polled,
        since: Option<&i64>,
        ttl: i64,
    ) -> Result<(Vec<(String, f64)>, i64), MyError> {
        super::revocations_since(&mut c.conn, since.copied(), ttl)
            .await
            .map_err(db("reading revocations"))
    }

    async fn clean(&self, c: &mut Polled, keep_secs: i64, max_ttl: i64) -> Result<u64, MyError> {
        if let Some(w) = &self.popbsmtp {
            // The wiki's rows older than its Postfix query's window (grant.ttl) and a day.
            let keep = max_ttl + KEEP_EXPIRED_SECS;
            if let Err(e) = w.clean(&mut c.conn, keep).await {
                tracing::warn!(error = %MyError::db("deleting old popbsmtp rows", e), "cannot delete old popbsmtp rows");
            }
        }
        super::clean(&mut c.conn, keep_secs)
            .await
            .map_err(db("deleting expired rows"))
    }

    async fn report(&self, _c: &mut Polled, _host: &str, _r: &Report) -> Result<(), MyError> {
        // No fleet table in MariaDB yet: `dovegate status --fleet` reads PostgreSQL only.
        Ok(())
    }

    async fn next_change(&self, c: &mut Polled) -> Result<(), MyError> {
        c.poll.tick().await;
        Ok(())
    }

    fn read_gap(&self) -> Duration {
        // The poll interval is the gap already.
        Duration::ZERO
    }

    fn closed(&self, _c: &mut Polled) -> Option<MyError> {
        // The polls find out, every `POLL`.
        None
    }

    fn close(&self, c: Polled) {
        // Not waited for: a hung server must not hold the worker.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(QUERY_TIMEOUT, c.conn.disconnect()).await;
        });
    }

    fn is_data_error(e: &MyError) -> bool {
        e.is_data_error()
    }

    fn newer_schema(e: &MyError) -> Option<NewerSchema> {
        e.newer_schema()
    }
}
