//! MariaDB/MySQL as the shared store of grants between hosts (issue 23), beside PostgreSQL.
//!
//! Writers (`dovegate run` with `[store] mysql_url_file`) upsert grants into
//! `dovegate_grants` of the URL's database; replicas (`dovegate replica` with a `mysql://`
//! URL file) snapshot it and then follow its changes into their local LMDB map.
//!
//! MariaDB has no LISTEN/NOTIFY, so replicas learn of changes by polling an indexed change
//! sequence: every write (a batch of grants, a revoke) takes the next value of one counter
//! row (`dovegate_seq`) and stamps it on the rows it writes (`seq`, indexed). The counter
//! row stays locked until the transaction commits, so sequence values become visible in
//! commit order: a reader that has seen value N has seen every change up to N, and reads
//! `WHERE seq > N` next time (an AUTO_INCREMENT column would not do: its values are taken
//! at insert, and a transaction holding a lower one may commit after a higher one is read).
//! A poll of an index with nothing new is a cheap query, so a bounded interval (`POLL`)
//! gives a bounded propagation delay without a server feature. Revokes leave tombstones
//! (`dovegate_revocations`, with their own `seq`), so a deletion is a change a reader sees.
//!
//! Times are `DATETIME(6)` in UTC (`UTC_TIMESTAMP(6)`, never the session's time zone) and
//! cross the wire as unix seconds computed with `TIMESTAMPDIFF` from the epoch (no 2038
//! limit, no time-zone tables needed). Every value is a query parameter; table names are
//! fixed.

pub mod replica;
pub mod shared_policy;
pub mod worker;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, SslOpts};

use crate::grant::key_text;
use crate::store::shared::{parse_address, Origin, Upserted, REVOKE_RACE_SECS};
use crate::store::url_file::UrlError;

/// The URL file must not hold more than this (it is one line).
/// How long connecting (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A statement that takes longer is abandoned and the database treated as down.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// How often replicas and writers look for changes (the change sequence's index): the
/// bound on how late a change is seen, beside the writer's commit interval.
pub const POLL: Duration = Duration::from_millis(200);
/// Rows per INSERT statement (5 parameters each, far below the 65535 placeholders).
const CHUNK: usize = 1000;

/// Why talking to MariaDB failed.
#[derive(Debug, thiserror::Error)]
pub enum MyError {
    /// The URL file or the URL in it: the administrator fixes the configuration.
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("{what}: {source}")]
    Db {
        what: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("{what}: no answer within {secs}s")]
    Timeout { what: String, secs: u64 },
    #[error(
        "schema version {found} is newer than this dovegate knows ({known}); upgrade dovegate"
    )]
    NewerSchema { found: i64, known: i64 },
    /// Another session holds the schema lock past its bound (a migration in progress).
    #[error("the schema lock (GET_LOCK dovegate_schema) is held by another session; a migration is running or stuck there")]
    SchemaLocked,
}

impl MyError {
    /// The database's schema is newer than this dovegate (an upgrade, not an outage).
    pub fn newer_schema(&self) -> Option<crate::store::shared::NewerSchema> {
        match self {
            MyError::NewerSchema { found, known } => Some(crate::store::shared::NewerSchema {
                found: i32::try_from(*found).unwrap_or(i32::MAX),
                known: i32::try_from(*known).unwrap_or(i32::MAX),
            }),
            _ => None,
        }
    }

    pub fn db(what: impl Into<String>, source: mysql_async::Error) -> MyError {
        MyError::Db {
            what: what.into(),
            source,
        }
    }

    /// The server refused the data (SQLSTATE class 22 or 23: a CHECK, a bad value):
    /// retrying the same rows fails the same way, unlike an outage.
    pub fn is_data_error(&self) -> bool {
        matches!(self, MyError::Db { source: mysql_async::Error::Server(s), .. }
            if s.state.starts_with("22") || s.state.starts_with("23"))
    }
}

/// Runs `fut` with `QUERY_TIMEOUT`.
pub async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, mysql_async::Error>>,
) -> Result<T, MyError> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(MyError::db(what, e)),
        Err(_) => Err(MyError::Timeout {
            what: what.to_string(),
            secs: QUERY_TIMEOUT.as_secs(),
        }),
    }
}

/// A connection and its poll timer (MariaDB has no LISTEN: the poll of the change
/// sequence is the change signal). Writers and replicas both use one.
pub struct Polled {
    pub conn: Conn,
    pub poll: tokio::time::Interval,
}

impl Polled {
    /// Connects (migrating the schema), the first poll at once.
    pub async fn connect(target: &Target) -> Result<Polled, MyError> {
        let conn = target.connect().await?;
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Polled { conn, poll })
    }
}

/// True when the URL file holds a `mysql://` (or `mariadb://`) URL: `dovegate replica
/// --url-file` follows MariaDB then, PostgreSQL otherwise. Unreadable: false (the
/// PostgreSQL path reports the problem).
pub fn is_mysql_url_file(path: &Path) -> bool {
    super::url_file::read(path)
        .is_ok_and(|t| t.starts_with("mysql://") || t.starts_with("mariadb://"))
}

/// Where and how to connect; never printed (it holds the password).
#[derive(Clone)]
pub struct Target {
    opts: Opts,
    tls: bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Target {
    /// Reads the URL file. Refuses a file other users may read: it holds the password.
    /// `require_ssl=true` in the URL means TLS with the certificate and name checked
    /// (against `sslrootcert=FILE` in the URL if given, else the built-in web roots).
    pub fn load(path: &Path) -> Result<Target, MyError> {
        let file = || path.to_path_buf();
        let not_a_url = || UrlError::NotAUrl {
            file: file(),
            kind: "MariaDB/MySQL",
            example: "mysql://user:password@host:3306/db?require_ssl=true",
            why: None,
        };
        let text = super::url_file::read(path).map_err(UrlError::from)?;
        let text = match text.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => text,
        };
        if !text.starts_with("mysql://") {
            return Err(not_a_url().into());
        }
        let (url, rootcert) = take_param(&text, "sslrootcert");
        // The parser's message may quote the URL: never show it (password).
        let opts = Opts::from_url(&url).map_err(|_| not_a_url())?;
        if opts.db_name().is_none_or(str::is_empty) {
            return Err(UrlError::NoDatabase {
                file: file(),
                example: "mysql://user:password@host:3306/DB",
            }
            .into());
        }
        let tls = opts.ssl_opts().is_some();
        let mut b = OptsBuilder::from_opts(opts)
            // One connection per worker; the pool is not used.
            .prefer_socket(false)
            .stmt_cache_size(Some(32));
        if let Some(f) = rootcert {
            if !tls {
                return Err(UrlError::RootCertWithoutTls { file: file() }.into());
            }
            let pem = std::fs::read(&f).map_err(|source| UrlError::RootCertUnreadable {
                file: file(),
                cert: f.clone(),
                source,
            })?;
            b = b.ssl_opts(
                SslOpts::default()
                    .with_root_certs(vec![pem.into()])
                    .with_disable_built_in_roots(true),
            );
        }
        Ok(Target {
            opts: b.into(),
            tls,
        })
    }

    /// host:port/db for logs, without credentials.
    pub fn describe(&self) -> String {
        let tls = if self.tls { " (TLS)" } else { "" };
        format!(
            "mysql://{}:{}/{}{tls}",
            self.opts.ip_or_hostname(),
            self.opts.tcp_port(),
            self.opts.db_name().unwrap_or("")
        )
    }

    /// Connects and brings the schema up to date (under a named lock).
    pub async fn connect(&self) -> Result<Conn, MyError> {
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(self.opts.clone()))
            .await
            .map_err(|_| MyError::Timeout {
                what: format!("{}: connecting", self.describe()),
                secs: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|e| MyError::db(format!("{}: cannot connect", self.describe()), e))?;
        tokio::time::timeout(CONNECT_TIMEOUT * 4, migrate(&mut conn))
            .await
            .map_err(|_| MyError::Timeout {
                what: format!("{}: schema migration", self.describe()),
                secs: CONNECT_TIMEOUT.as_secs() * 4,
            })??;
        Ok(conn)
    }
}

/// The Dovecot wiki's table (PopBSMTPAndDovecot: `popbsmtp (address varchar(39) primary
/// key, last_seen datetime)`, read by Postfix's `mysql:` map with `last_seen >=
/// DATE_SUB(NOW(), INTERVAL 30 MINUTE) AND address = '%s'`), written beside dovegate's own
/// tables so a site keeps that map while dovegate replaces the post-login script and the
/// cron job. The names are validated identifiers (`[store] mysql_popbsmtp_*`).
#[derive(Debug, Clone)]
pub struct Popbsmtp {
    pub table: String,
    pub address: String,
    pub time: String,
}

impl Popbsmtp {
    pub fn new((table, address, time): (String, String, String)) -> Popbsmtp {
        Popbsmtp {
            table,
            address,
            time,
        }
    }

    /// Creates the wiki's table when the site has none yet (its own is left as it is).
    pub async fn ensure(&self, conn: &mut Conn) -> Result<(), mysql_async::Error> {
        let Popbsmtp {
            table,
            address,
            time,
        } = self;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS `{table}` (`{address}` VARCHAR(39) NOT NULL PRIMARY KEY, `{time}` DATETIME NOT NULL)"
        ))
        .await
    }

    /// Deletes rows whose time is older than `keep_secs` (the wiki's cron job).
    pub async fn clean(&self, conn: &mut Conn, keep_secs: i64) -> Result<(), mysql_async::Error> {
        let (table, time) = (&self.table, &self.time);
        conn.exec_drop(
            format!("DELETE FROM `{table}` WHERE `{time}` < NOW() - INTERVAL ? SECOND"),
            (keep_secs,),
        )
        .await
    }
}

/// Takes `name=VALUE` out of the URL's query: (URL without it, VALUE).
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let prefix = format!("{name}=");
    let (found, rest): (Vec<&str>, Vec<&str>) =
        query.split('&').partition(|kv| kv.starts_with(&prefix));
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, found.last().map(|kv| kv[prefix.len()..].to_string()))
}

/// Unix seconds of a DATETIME(6) column or expression holding UTC, as SQL.
fn secs(expr: &str) -> String {
    format!("TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', {expr})")
}

/// Unix seconds (with microseconds) as a DOUBLE, as SQL.
fn secs_f(expr: &str) -> String {
    format!("(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {expr}) / 1e6)")
}

/// The DATETIME(6) of unix seconds given as parameter `?`, as SQL.
const FROM_SECS: &str = "('1970-01-01 00:00:00' + INTERVAL ? SECOND)";

/// Schema versions, applied in order under `GET_LOCK('dovegate_schema')`. MariaDB commits
/// DDL at once, so each step is written to be repeatable (a writer killed mid-step runs it
/// again). Never edit a released step: add one.
const MIGRATIONS: &[&[&str]] = &[
    // 1: the grants with their change sequence, the tombstones, the counter.
    &[
        "CREATE TABLE IF NOT EXISTS dovegate_seq (
             id TINYINT NOT NULL PRIMARY KEY CHECK (id = 1),
             seq BIGINT NOT NULL
         ) ENGINE=InnoDB",
        "INSERT IGNORE INTO dovegate_seq (id, seq) VALUES (1, 0)",
        // Only canonical addresses (what dovegate writes; Postfix's mysql: map would try
        // `1.2.3`, `unknown`): INET6_NTOA(INET6_ATON(a)) is MariaDB's canonical text (NULL
        // for no address: a CHECK passes on NULL, hence the COALESCE), and IPv4 is never
        // written IPv6-mapped or -compatible. No expiry beyond updated_at +
        // 31 days (the longest grant.ttl).
        "CREATE TABLE IF NOT EXISTS dovegate_grants (
             address VARCHAR(39) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
             expires DATETIME(6) NOT NULL,
             granted_by VARCHAR(255) NOT NULL,
             source VARCHAR(64) NOT NULL,
             created_at DATETIME(6) NOT NULL,
             updated_at DATETIME(6) NOT NULL,
             seq BIGINT NOT NULL,
             KEY dovegate_grants_seq (seq),
             KEY dovegate_grants_expires (expires),
             CONSTRAINT dovegate_grants_canonical CHECK (
                 address REGEXP '^[0-9a-f.:]{2,39}$'
                 AND COALESCE(CONVERT(INET6_NTOA(INET6_ATON(address)) USING ascii)
                     COLLATE ascii_bin = address, FALSE)
                 AND NOT (address LIKE '::%' AND address LIKE '%.%')),
             CONSTRAINT dovegate_grants_bounded CHECK (expires <= updated_at + INTERVAL 31 DAY)
         ) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS dovegate_revocations (
             address VARCHAR(39) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
             revoked_at DATETIME(6) NOT NULL,
             revoked_by VARCHAR(255) NOT NULL,
             seq BIGINT NOT NULL,
             KEY dovegate_revocations_seq (seq)
         ) ENGINE=InnoDB",
    ],
    // 2: the policy server's state shared between hosts (`store::policy_db`): users
    // blocked by a cap (policy.block_on_cap) and what each host counted for each user's
    // caps, in five-minute buckets (no address here: only user names and counts). Names
    // and hosts are VARBINARY so that they compare byte for byte, as PostgreSQL's text
    // does (utf8mb4_bin pads: 'bob' = 'bob ').
    &[
        "CREATE TABLE IF NOT EXISTS dovegate_blocked_users (
             user_name VARBINARY(1024) NOT NULL PRIMARY KEY,
             cap VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
             blocked_at DATETIME(6) NOT NULL,
             blocked_by VARCHAR(256) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
             CONSTRAINT dovegate_blocked_users_named CHECK (
                 LENGTH(user_name) >= 1 AND CHAR_LENGTH(cap) >= 1)
         ) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS dovegate_policy_counts (
             user_name VARBINARY(1024) NOT NULL,
             kind VARCHAR(10) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
             bucket BIGINT NOT NULL,
             host VARBINARY(1024) NOT NULL,
             count BIGINT NOT NULL,
             PRIMARY KEY (user_name, kind, bucket, host),
             KEY dovegate_policy_counts_bucket (bucket),
             CONSTRAINT dovegate_policy_counts_valid CHECK (
                 LENGTH(user_name) >= 1 AND LENGTH(host) >= 1
                 AND kind IN ('messages', 'recipients') AND count >= 0)
         ) ENGINE=InnoDB",
    ],
];

/// The schema version this program writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The schema version recorded, 0 when there is no `dovegate_schema` yet.
async fn current_version(c: &mut Conn) -> Result<i64, mysql_async::Error> {
    match c
        .query_first::<Option<i64>, _>("SELECT MAX(version) FROM dovegate_schema")
        .await
    {
        Ok(v) => Ok(v.flatten().unwrap_or(0)),
        // ER_NO_SUCH_TABLE: a new database.
        Err(mysql_async::Error::Server(e)) if e.code == 1146 => Ok(0),
        Err(e) => Err(e),
    }
}

async fn migrate(conn: &mut Conn) -> Result<(), MyError> {
    let db = |what: &str| {
        let what = what.to_string();
        move |e| MyError::db(what, e)
    };
    // Read first, without CREATE: a replica's user may only SELECT.
    let found = current_version(conn)
        .await
        .map_err(db("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(MyError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        // A current schema is only read: replicas may use a SELECT-only user.
        return Ok(());
    }
    // Writers starting together: one migrates, the others wait and then find it done.
    let got: Option<Option<i64>> = conn
        .query_first("SELECT GET_LOCK('dovegate_schema', 15)")
        .await
        .map_err(db("taking the schema lock"))?;
    if got.flatten() != Some(1) {
        return Err(MyError::SchemaLocked);
    }
    let result = async {
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS dovegate_schema (
                 version INT NOT NULL PRIMARY KEY,
                 applied_at DATETIME(6) NOT NULL
             ) ENGINE=InnoDB",
        )
        .await
        .map_err(db("creating dovegate_schema"))?;
        let found = current_version(conn)
            .await
            .map_err(db("reading the schema version"))?;
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            let version = i as i64 + 1;
            for sql in *step {
                conn.query_drop(*sql)
                    .await
                    .map_err(db(&format!("schema migration {version}")))?;
            }
            conn.exec_drop(
                "INSERT INTO dovegate_schema (version, applied_at) VALUES (?, UTC_TIMESTAMP(6))",
                (version,),
            )
            .await
            .map_err(db("recording the schema version"))?;
            tracing::info!(version, "MariaDB schema migrated");
        }
        Ok(())
    }
    .await;
    let _ = conn.query_drop("DO RELEASE_LOCK('dovegate_schema')").await;
    result
}

/// The database's clock, unix seconds.
pub async fn db_now(conn: &mut Conn) -> Result<f64, mysql_async::Error> {
    let v: Option<f64> = conn
        .query_first(format!("SELECT {} + 0e0", secs_f("UTC_TIMESTAMP(6)")))
        .await?;
    Ok(v.unwrap_or(0.0))
}

/// Takes the next change sequence value inside `tx`; the counter row stays locked until
/// the transaction ends, so values become visible in commit order.
async fn next_seq(tx: &mut mysql_async::Transaction<'_>) -> Result<i64, mysql_async::Error> {
    tx.query_drop("UPDATE dovegate_seq SET seq = LAST_INSERT_ID(seq + 1) WHERE id = 1")
        .await?;
    Ok(tx.last_insert_id().unwrap_or(0) as i64)
}

/// The last change sequence value committed.
pub async fn current_seq(conn: &mut Conn) -> Result<i64, mysql_async::Error> {
    Ok(conn
        .query_first::<i64, _>("SELECT seq FROM dovegate_seq WHERE id = 1")
        .await?
        .unwrap_or(0))
}

/// Upserts grants in one transaction; the later expiry wins, and no expiry lies further
/// than `max_ttl` after the database's clock, nor is an existing row's kept beyond its own
/// `updated_at` + `max_ttl`. `skew` (this host's clock minus the database's) is taken off
/// each expiry. A grant whose login (expiry - `max_ttl`) is not after its address's
/// revocation (+ `REVOKE_RACE_SECS`) is refused. The same rules as PostgreSQL's `upsert`.
pub async fn upsert(
    conn: &mut Conn,
    grants: &[(IpAddr, i64)],
    max_ttl: i64,
    skew: f64,
    origin: &Origin,
    wiki: Option<&Popbsmtp>,
) -> Result<Upserted, mysql_async::Error> {
    let mut unique: std::collections::HashMap<IpAddr, i64> = std::collections::HashMap::new();
    for &(ip, e) in grants {
        let v = unique.entry(ip).or_insert(e);
        *v = (*v).max(e);
    }
    let mut out = Upserted::default();
    if unique.is_empty() {
        return Ok(out);
    }
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let seq = next_seq(&mut tx).await?;
    let skew = skew.round() as i64;
    let mut input: Vec<(IpAddr, i64)> = unique
        .into_iter()
        .map(|(ip, e)| (ip, e.saturating_sub(skew).max(0)))
        .collect();
    input.sort();
    // Revoked after the login: refused (the counter lock orders this with revokes).
    for chunk in input.chunks(CHUNK) {
        let marks = vec!["?"; chunk.len()].join(",");
        let rows: Vec<(String, i64)> = tx
            .exec(
                format!(
                    "SELECT address, {} FROM dovegate_revocations WHERE address IN ({marks})",
                    secs("revoked_at")
                ),
                chunk
                    .iter()
                    .map(|&(ip, _)| key_text(ip))
                    .collect::<Vec<_>>(),
            )
            .await?;
        for (a, at) in rows {
            if let Some(ip) = parse_address(&a) {
                if let Ok(i) = input.binary_search_by(|g| g.0.cmp(&ip)) {
                    if input[i].1 - max_ttl <= at + REVOKE_RACE_SECS {
                        out.revoked.push(ip);
                    }
                }
            }
        }
    }
    input.retain(|g| !out.revoked.contains(&g.0));
    let bound = format!("UTC_TIMESTAMP(6) + INTERVAL {max_ttl} SECOND");
    for chunk in input.chunks(CHUNK) {
        let row = format!(
            "(?, LEAST({FROM_SECS}, {bound}), ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?)"
        );
        let values = vec![row.as_str(); chunk.len()].join(",");
        let mut params: Vec<mysql_async::Value> = Vec::with_capacity(chunk.len() * 5);
        for &(ip, e) in chunk {
            params.push(key_text(ip).into());
            params.push(e.into());
            params.push(origin.host.as_str().into());
            params.push(origin.source.as_str().into());
            params.push(seq.into());
        }
        // `expires` first: later assignments would see the new updated_at.
        tx.exec_drop(
            format!(
                "INSERT INTO dovegate_grants (address, expires, granted_by, source, created_at, updated_at, seq)
                 VALUES {values}
                 ON DUPLICATE KEY UPDATE
                     expires = GREATEST(
                         LEAST(expires, updated_at + INTERVAL {max_ttl} SECOND, {bound}),
                         VALUES(expires)),
                     granted_by = VALUES(granted_by),
                     source = VALUES(source),
                     updated_at = UTC_TIMESTAMP(6),
                     seq = VALUES(seq)"
            ),
            params,
        )
        .await?;
        let marks = vec!["?"; chunk.len()].join(",");
        let rows: Vec<(String, i64)> = tx
            .exec(
                format!(
                    "SELECT address, {} FROM dovegate_grants WHERE address IN ({marks})",
                    secs(&format!("LEAST(expires, {bound})"))
                ),
                chunk
                    .iter()
                    .map(|&(ip, _)| key_text(ip))
                    .collect::<Vec<_>>(),
            )
            .await?;
        out.written.extend(
            rows.iter()
                .filter_map(|(a, e)| Some((parse_address(a)?, *e))),
        );
        if let Some(w) = wiki {
            // The login's time in the database's clock (never later than its now: a
            // replayed spill must not look newer than it is), the later one kept; the
            // session time zone, as the wiki's NOW() compares it.
            let (t, a, c) = (&w.table, &w.address, &w.time);
            let values = vec!["(?, LEAST(NOW(), FROM_UNIXTIME(?)))"; chunk.len()].join(",");
            let mut params: Vec<mysql_async::Value> = Vec::with_capacity(chunk.len() * 2);
            for &(ip, e) in chunk {
                params.push(key_text(ip).into());
                params.push(e.saturating_sub(max_ttl).max(0).into());
            }
            tx.exec_drop(
                format!(
                    "INSERT INTO `{t}` (`{a}`, `{c}`) VALUES {values}
                     ON DUPLICATE KEY UPDATE `{c}` = GREATEST(`{c}`, VALUES(`{c}`))"
                ),
                params,
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Revokes one address everywhere: a tombstone (refusing grants from logins before now)
/// and the grant deleted, in one transaction with a change sequence value. True when a
/// grant was there.
pub async fn revoke(
    conn: &mut Conn,
    ip: IpAddr,
    wiki: Option<&Popbsmtp>,
) -> Result<bool, mysql_async::Error> {
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let seq = next_seq(&mut tx).await?;
    let a = key_text(ip);
    tx.exec_drop(
        "INSERT INTO dovegate_revocations (address, revoked_at, revoked_by, seq)
         VALUES (?, UTC_TIMESTAMP(6), CURRENT_USER(), ?)
         ON DUPLICATE KEY UPDATE revoked_at = UTC_TIMESTAMP(6), revoked_by = CURRENT_USER(), seq = VALUES(seq)",
        (a.as_str(), seq),
    )
    .await?;
    tx.exec_drop(
        "DELETE FROM dovegate_grants WHERE address = ? AND expires > UTC_TIMESTAMP(6)",
        (a.as_str(),),
    )
    .await?;
    let mut gone = tx.affected_rows() > 0;
    if let Some(w) = wiki {
        tx.exec_drop(
            format!("DELETE FROM `{}` WHERE `{}` = ?", w.table, w.address),
            (a.as_str(),),
        )
        .await?;
        gone |= tx.affected_rows() > 0;
    }
    tx.commit().await?;
    Ok(gone)
}

/// Sets one grant's expiry, even shorter than the stored one (manual grant), no later than
/// the database's now + `max_ttl`.
pub async fn set(
    conn: &mut Conn,
    ip: IpAddr,
    expires: i64,
    max_ttl: i64,
    origin: &Origin,
) -> Result<(), mysql_async::Error> {
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let seq = next_seq(&mut tx).await?;
    tx.exec_drop(
        format!(
            "INSERT INTO dovegate_grants (address, expires, granted_by, source, created_at, updated_at, seq)
             VALUES (?, LEAST({FROM_SECS}, UTC_TIMESTAMP(6) + INTERVAL {max_ttl} SECOND), ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), ?)
             ON DUPLICATE KEY UPDATE expires = VALUES(expires), granted_by = VALUES(granted_by),
                 source = VALUES(source), updated_at = UTC_TIMESTAMP(6), seq = VALUES(seq)"
        ),
        (
            key_text(ip),
            expires,
            origin.host.as_str(),
            origin.source.as_str(),
            seq,
        ),
    )
    .await?;
    tx.commit().await
}

/// The expiry a row may grant, as SQL: no later than its own `updated_at` + ttl (a
/// far-future row is not re-extended at every resync) nor the database's now + ttl.
fn effective_sql(ttl: i64) -> String {
    format!(
        "LEAST(expires, updated_at + INTERVAL {ttl} SECOND, UTC_TIMESTAMP(6) + INTERVAL {ttl} SECOND)"
    )
}

/// Rows that may grant at all: `updated_at` not in the future (beyond a minute of clock
/// step), and an effective expiry still ahead.
fn grantable_sql(ttl: i64) -> String {
    format!(
        "updated_at <= UTC_TIMESTAMP(6) + INTERVAL 60 SECOND AND {} > UTC_TIMESTAMP(6)",
        effective_sql(ttl)
    )
}

/// A read-only transaction on one consistent snapshot, and the change sequence value it
/// sees (what the rows read in it are current to).
async fn consistent_read(
    conn: &mut Conn,
) -> Result<(mysql_async::Transaction<'_>, i64), mysql_async::Error> {
    let mut tx = conn
        .start_transaction(
            mysql_async::TxOpts::default()
                .with_consistent_snapshot(true)
                .with_readonly(true)
                .clone(),
        )
        .await?;
    let seq = tx
        .query_first::<i64, _>("SELECT seq FROM dovegate_seq WHERE id = 1")
        .await?
        .unwrap_or(0);
    Ok((tx, seq))
}

/// A consistent read of the grants (`snapshot`).
pub struct Snapshot {
    /// Every grantable row with its effective expiry.
    pub rows: Vec<(String, i64)>,
    /// The change sequence value it is current to.
    pub seq: i64,
    /// The database's clock.
    pub db_now: f64,
    /// Every row, grantable or not, whose expiry is after `held_after` (unix seconds):
    /// the rows a replica follows the count of (`changes_since`).
    pub held: Vec<String>,
    pub held_after: i64,
}

/// The rows a replica follows the count of: those whose expiry is after a time (its last
/// snapshot's), up to a sequence value (parameters: seq, after). Every write by dovegate
/// (a grant, a revoke) gives a row a new sequence value, which the replica reads as a
/// change, and the writers' clean-up deletes only rows expired for a day; so the replica
/// knows which rows these are, and a count that differs is a change without a sequence
/// value (a DELETE or TRUNCATE by hand).
const HELD_SQL: &str =
    "FROM dovegate_grants WHERE seq <= ? AND expires > ('1970-01-01 00:00:00' + INTERVAL ? SECOND)";

pub async fn snapshot(conn: &mut Conn, ttl: i64) -> Result<Snapshot, mysql_async::Error> {
    let (mut tx, seq) = consistent_read(conn).await?;
    let now: f64 = tx
        .query_first(format!("SELECT {} + 0e0", secs_f("UTC_TIMESTAMP(6)")))
        .await?
        .unwrap_or(0.0);
    let rows: Vec<(String, i64)> = tx
        .query(format!(
            "SELECT address, {} FROM dovegate_grants WHERE {}",
            secs(&effective_sql(ttl)),
            grantable_sql(ttl)
        ))
        .await?;
    let held_after = now.floor() as i64;
    let held: Vec<String> = tx
        .exec(format!("SELECT address {HELD_SQL}"), (seq, held_after))
        .await?;
    tx.commit().await?;
    Ok(Snapshot {
        rows,
        seq,
        db_now: now,
        held,
        held_after,
    })
}

/// What changed after sequence value `since`: the addresses whose grant or revocation
/// changed, with their rows as `snapshot` reads them (an address without a row grants
/// nothing), `updated_at` for lag; and the sequence value this is current to. At most
/// `limit` addresses (more: the caller resyncs). With `held_after` (a snapshot's
/// `held_after`), also the changed rows whose expiry is after it (`kept`), and with
/// `count` how many rows `HELD_SQL` counts up to `seq`, in the same consistent read.
pub struct Changes {
    pub seq: i64,
    pub addresses: Vec<String>,
    /// (address, effective expiry, updated_at, granted_by, source).
    pub rows: Vec<(String, i64, f64, String, String)>,
    pub kept: Vec<String>,
    pub held: Option<i64>,
}

pub async fn changes_since(
    conn: &mut Conn,
    since: i64,
    ttl: i64,
    limit: usize,
    held_after: Option<i64>,
    count: bool,
) -> Result<Changes, mysql_async::Error> {
    let (mut tx, seq) = consistent_read(conn).await?;
    let held = match held_after {
        Some(after) if count => Some(
            tx.exec_first::<i64, _, _>(format!("SELECT COUNT(*) {HELD_SQL}"), (seq, after))
                .await?
                .unwrap_or(0),
        ),
        _ => None,
    };
    if seq <= since {
        tx.commit().await?;
        return Ok(Changes {
            seq: since,
            addresses: Vec::new(),
            rows: Vec::new(),
            kept: Vec::new(),
            held,
        });
    }
    let kept: Vec<String> = match held_after {
        Some(after) => {
            tx.exec(
                format!("SELECT address {HELD_SQL} AND seq > ? LIMIT ?"),
                (seq, after, since, limit as u64),
            )
            .await?
        }
        None => Vec::new(),
    };
    let addresses: Vec<String> = tx
        .exec(
            "SELECT address FROM dovegate_grants WHERE seq > ? AND seq <= ?
             UNION SELECT address FROM dovegate_revocations WHERE seq > ? AND seq <= ?
             LIMIT ?",
            (since, seq, since, seq, limit as u64),
        )
        .await?;
    let rows: Vec<(String, i64, f64, String, String)> = tx
        .exec(
            format!(
                "SELECT address, {}, {} + 0e0, LEFT(granted_by, 255), LEFT(source, 64)
                 FROM dovegate_grants WHERE seq > ? AND seq <= ? AND {} LIMIT ?",
                secs(&effective_sql(ttl)),
                secs_f("updated_at"),
                grantable_sql(ttl)
            ),
            (since, seq, limit as u64),
        )
        .await?;
    tx.commit().await?;
    Ok(Changes {
        seq,
        addresses,
        rows,
        kept,
        held,
    })
}

/// Revocations after sequence value `since` (None: those younger than `ttl`), with the
/// sequence value this is current to: ((address, revoked_at unix seconds), seq).
pub async fn revocations_since(
    conn: &mut Conn,
    since: Option<i64>,
    ttl: i64,
) -> Result<(Vec<(String, f64)>, i64), mysql_async::Error> {
    let (mut tx, seq) = consistent_read(conn).await?;
    let cols = format!("address, {} + 0e0", secs_f("revoked_at"));
    let rows: Vec<(String, f64)> = match since {
        Some(s) if s >= seq => Vec::new(),
        Some(s) => {
            tx.exec(
                format!("SELECT {cols} FROM dovegate_revocations WHERE seq > ? AND seq <= ?"),
                (s, seq),
            )
            .await?
        }
        None => {
            tx.query(format!(
                "SELECT {cols} FROM dovegate_revocations WHERE revoked_at > UTC_TIMESTAMP(6) - INTERVAL {ttl} SECOND"
            ))
            .await?
        }
    };
    tx.commit().await?;
    Ok((rows, seq))
}

/// Removes rows expired for longer than `keep_secs`, and revocations older than the
/// longest grant they could cancel (31 days) plus `keep_secs`.
pub async fn clean(conn: &mut Conn, keep_secs: i64) -> Result<u64, mysql_async::Error> {
    conn.exec_drop(
        "DELETE FROM dovegate_grants WHERE expires < UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
        (keep_secs,),
    )
    .await?;
    let a = conn.affected_rows();
    conn.exec_drop(
        "DELETE FROM dovegate_revocations
         WHERE revoked_at < UTC_TIMESTAMP(6) - INTERVAL 31 DAY - INTERVAL ? SECOND",
        (keep_secs,),
    )
    .await?;
    Ok(a + conn.affected_rows())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn url_file_must_be_private_and_mysql() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("my.url");
        std::fs::write(&f, "mysql://u:secret@127.0.0.1:3307/mail\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Target::load(&f).unwrap_err().to_string();
        assert!(e.contains("readable by every user"), "{e}");
        assert!(!e.contains("secret"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(is_mysql_url_file(&f));
        let t = Target::load(&f).unwrap();
        assert_eq!(t.describe(), "mysql://127.0.0.1:3307/mail");
        assert!(!format!("{t:?}").contains("secret"));
        std::fs::write(&f, "mysql://u:secret@db.example/mail?require_ssl=true").unwrap();
        assert!(Target::load(&f).unwrap().tls);
        std::fs::write(&f, "mysql://u:secret@db.example/").unwrap();
        let e = Target::load(&f).unwrap_err().to_string();
        assert!(e.contains("no database") && !e.contains("secret"), "{e}");
        std::fs::write(&f, "postgresql://u:secret@h/db").unwrap();
        assert!(!is_mysql_url_file(&f));
        let e = Target::load(&f).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        std::fs::write(&f, "mysql://u:secret@h:notaport/db").unwrap();
        let e = Target::load(&f).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            take_param(
                "mysql://h/db?sslrootcert=/ca.pem&require_ssl=true",
                "sslrootcert"
            ),
            (
                "mysql://h/db?require_ssl=true".into(),
                Some("/ca.pem".into())
            )
        );
    }
}
