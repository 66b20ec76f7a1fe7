//! The policy server's state shared between hosts through PostgreSQL (schema 4): the users
//! blocked by a cap and what each host counted towards each user's caps
//! (`store::policy_db::PolicyDb`). Every value is a query parameter; every row read is
//! bounded and checked, since the database is outside input too.

use tokio_postgres::Client;

use super::{PgError, Target};
use crate::model::UserCount as CountRow;
use crate::store::policy_db::{cap_name, kind, parse_kind, user_name, PolicyDb, MAX_ROWS};

/// The policy state's tables in one PostgreSQL schema.
pub struct PgPolicy {
    target: Target,
    blocked_users: String,
    policy_counts: String,
}

impl PgPolicy {
    pub fn new(target: Target) -> PgPolicy {
        PgPolicy {
            blocked_users: target.blocked_users(),
            policy_counts: target.policy_counts(),
            target,
        }
    }
}

impl PolicyDb for PgPolicy {
    type Conn = Client;
    type Error = PgError;

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn connect(&self) -> Result<Client, PgError> {
        self.target.connect(None).await
    }

    async fn add_blocks(
        &self,
        c: &mut Client,
        users: &[(String, String)],
        host: &str,
    ) -> Result<(), PgError> {
        add_blocks(c, &self.blocked_users, users, host)
            .await
            .map_err(|e| PgError::db("recording blocked users", e))
    }

    async fn blocked(&self, c: &mut Client) -> Result<Vec<(String, String)>, PgError> {
        blocked(c, &self.blocked_users)
            .await
            .map_err(|e| PgError::db("reading blocked users", e))
    }

    async fn add_counts(
        &self,
        c: &mut Client,
        host: &str,
        rows: &[CountRow],
    ) -> Result<(), PgError> {
        add_counts(c, &self.policy_counts, host, rows)
            .await
            .map_err(|e| PgError::db("recording cap counts", e))
    }

    async fn other_counts(
        &self,
        c: &mut Client,
        host: &str,
        since: i64,
    ) -> Result<Vec<CountRow>, PgError> {
        other_counts(c, &self.policy_counts, host, since)
            .await
            .map_err(|e| PgError::db("reading the other hosts' cap counts", e))
    }

    async fn clean_counts(&self, c: &mut Client, before: i64) -> Result<u64, PgError> {
        clean_counts(c, &self.policy_counts, before)
            .await
            .map_err(|e| PgError::db("deleting old cap counts", e))
    }
}

/// Records users blocked here (those already there keep their first record).
async fn add_blocks(
    client: &Client,
    table: &str,
    users: &[(String, String)],
    host: &str,
) -> Result<(), tokio_postgres::Error> {
    let (names, caps): (Vec<&str>, Vec<&str>) = users
        .iter()
        .filter(|(u, _)| user_name(u))
        .map(|(u, c)| (u.as_str(), c.as_str()))
        .unzip();
    if names.is_empty() {
        return Ok(());
    }
    client
        .execute(
            &format!(
                "INSERT INTO {table} (user_name, cap, blocked_by)
                 SELECT u, c, $3 FROM unnest($1::text[], $2::text[]) AS x(u, c)
                 ON CONFLICT (user_name) DO NOTHING"
            ),
            &[&names, &caps, &host],
        )
        .await?;
    Ok(())
}

/// Every user blocked on any host, with the cap it tripped (at most `MAX_ROWS`).
async fn blocked(
    client: &Client,
    table: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT user_name, cap FROM {table} ORDER BY blocked_at LIMIT $1"),
            &[&MAX_ROWS],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let user: String = r.try_get(0).ok()?;
            let cap: String = r.try_get(1).ok()?;
            user_name(&user).then(|| (user, cap_name(cap)))
        })
        .collect())
}

/// `dovegate unblock USER` for every host: true when the user was blocked there.
pub async fn unblock(
    client: &Client,
    table: &str,
    user: &str,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            &format!("DELETE FROM {table} WHERE user_name = $1"),
            &[&user],
        )
        .await?;
    Ok(n > 0)
}

/// Adds this host's new counts.
async fn add_counts(
    client: &Client,
    table: &str,
    host: &str,
    rows: &[CountRow],
) -> Result<(), tokio_postgres::Error> {
    let rows: Vec<&CountRow> = rows.iter().filter(|r| user_name(&r.user)).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = rows.iter().map(|r| r.user.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| kind(r.recipients)).collect();
    let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.count.max(0)).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {table} AS t (user_name, kind, bucket, host, count)
                 SELECT u, k, b, $5, c FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS x(u, k, b, c)
                 ON CONFLICT (user_name, kind, bucket, host) DO UPDATE SET count = t.count + EXCLUDED.count"
            ),
            &[&users, &kinds, &buckets, &counts, &host],
        )
        .await?;
    Ok(())
}

/// What the other hosts counted since bucket `since`, summed per user, kind and bucket.
async fn other_counts(
    client: &Client,
    table: &str,
    host: &str,
    since: i64,
) -> Result<Vec<CountRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT user_name, kind, bucket, sum(count)::bigint FROM {table}
                 WHERE host <> $1 AND bucket >= $2
                 GROUP BY user_name, kind, bucket LIMIT $3"
            ),
            &[&host, &since, &MAX_ROWS],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let user: String = r.try_get(0).ok()?;
            let recipients = parse_kind(r.try_get::<_, &str>(1).ok()?)?;
            let count: i64 = r.try_get(3).ok()?;
            (user_name(&user) && count > 0).then_some(())?;
            Some(CountRow {
                user,
                recipients,
                bucket: r.try_get(2).ok()?,
                count,
            })
        })
        .collect())
}

/// Deletes counts older than bucket `before` (every host's: they no longer count).
async fn clean_counts(
    client: &Client,
    table: &str,
    before: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!("DELETE FROM {table} WHERE bucket < $1"),
            &[&before],
        )
        .await
}
