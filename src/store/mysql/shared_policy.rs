//! The policy server's state shared between hosts through MariaDB (schema 2): the users
//! blocked by a cap and what each host counted towards each user's caps
//! (`store::policy_db::PolicyDb`), as `store::postgres::shared_policy` does for
//! PostgreSQL. Every value is a query parameter (table names are fixed); every row read
//! is bounded and checked, since the database is outside input too.

use mysql_async::prelude::*;
use mysql_async::{Conn, Row, Value};

use super::{MyError, Target};
use crate::model::UserCount;
use crate::store::policy_db::{cap_name, kind, parse_kind, user_name, PolicyDb, MAX_ROWS};

/// Rows per INSERT statement (5 parameters each, far below the 65535 placeholders).
const CHUNK: usize = 1000;

/// The policy state's tables in the URL's database.
pub struct MyPolicy {
    target: Target,
}

impl MyPolicy {
    pub fn new(target: Target) -> MyPolicy {
        MyPolicy { target }
    }
}

/// Column `i` of a row read back, None when it is NULL or not of type `T` (a row
/// written by someone else is skipped, never a panic).
fn column<T: FromValue>(row: &Row, i: usize) -> Option<T> {
    row.get_opt::<T, usize>(i)?.ok()
}

impl PolicyDb for MyPolicy {
    type Conn = Conn;
    type Error = MyError;

    fn describe(&self) -> String {
        self.target.describe()
    }

    async fn connect(&self) -> Result<Conn, MyError> {
        self.target.connect().await
    }

    async fn add_blocks(
        &self,
        c: &mut Conn,
        users: &[(String, String)],
        host: &str,
    ) -> Result<(), MyError> {
        let users: Vec<&(String, String)> = users.iter().filter(|(u, _)| user_name(u)).collect();
        for chunk in users.chunks(CHUNK) {
            let values = vec!["(?, ?, UTC_TIMESTAMP(6), ?)"; chunk.len()].join(",");
            let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
            for (u, cap) in chunk {
                params.push(u.as_str().into());
                params.push(cap.as_str().into());
                params.push(host.into());
            }
            // A user already there keeps its first record (`DO NOTHING`, not `IGNORE`:
            // that would also hide a refused CHECK).
            c.exec_drop(
                format!(
                    "INSERT INTO dovegate_blocked_users (user_name, cap, blocked_at, blocked_by)
                     VALUES {values} ON DUPLICATE KEY UPDATE user_name = user_name"
                ),
                params,
            )
            .await
            .map_err(|e| MyError::db("recording blocked users", e))?;
        }
        Ok(())
    }

    async fn blocked(&self, c: &mut Conn) -> Result<Vec<(String, String)>, MyError> {
        let rows: Vec<Row> = c
            .exec(
                "SELECT user_name, cap FROM dovegate_blocked_users ORDER BY blocked_at LIMIT ?",
                (MAX_ROWS,),
            )
            .await
            .map_err(|e| MyError::db("reading blocked users", e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let user: String = column(r, 0)?;
                let cap: String = column(r, 1)?;
                user_name(&user).then(|| (user, cap_name(cap)))
            })
            .collect())
    }

    async fn add_counts(
        &self,
        c: &mut Conn,
        host: &str,
        rows: &[UserCount],
    ) -> Result<(), MyError> {
        let rows: Vec<&UserCount> = rows.iter().filter(|r| user_name(&r.user)).collect();
        for chunk in rows.chunks(CHUNK) {
            let values = vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(",");
            let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 5);
            for r in chunk {
                params.push(r.user.as_str().into());
                params.push(kind(r.recipients).into());
                params.push(r.bucket.into());
                params.push(host.into());
                params.push(r.count.max(0).into());
            }
            c.exec_drop(
                format!(
                    "INSERT INTO dovegate_policy_counts (user_name, kind, bucket, host, count)
                     VALUES {values} ON DUPLICATE KEY UPDATE count = count + VALUES(count)"
                ),
                params,
            )
            .await
            .map_err(|e| MyError::db("recording cap counts", e))?;
        }
        Ok(())
    }

    async fn other_counts(
        &self,
        c: &mut Conn,
        host: &str,
        since: i64,
    ) -> Result<Vec<UserCount>, MyError> {
        let rows: Vec<Row> = c
            .exec(
                "SELECT user_name, kind, bucket, CAST(SUM(count) AS SIGNED) FROM dovegate_policy_counts
                 WHERE host <> ? AND bucket >= ?
                 GROUP BY user_name, kind, bucket LIMIT ?",
                (host, since, MAX_ROWS),
            )
            .await
            .map_err(|e| MyError::db("reading the other hosts' cap counts", e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let user: String = column(r, 0)?;
                let recipients = parse_kind(&column::<String>(r, 1)?)?;
                let count: i64 = column(r, 3)?;
                (user_name(&user) && count > 0).then_some(())?;
                Some(UserCount {
                    user,
                    recipients,
                    bucket: column(r, 2)?,
                    count,
                })
            })
            .collect())
    }

    async fn clean_counts(&self, c: &mut Conn, before: i64) -> Result<u64, MyError> {
        c.exec_drop(
            "DELETE FROM dovegate_policy_counts WHERE bucket < ?",
            (before,),
        )
        .await
        .map_err(|e| MyError::db("deleting old cap counts", e))?;
        Ok(c.affected_rows())
    }
}

/// `dovegate unblock USER` for every host: true when the user was blocked there.
pub async fn unblock(c: &mut Conn, user: &str) -> Result<bool, mysql_async::Error> {
    c.exec_drop(
        "DELETE FROM dovegate_blocked_users WHERE user_name = ?",
        (user,),
    )
    .await?;
    Ok(c.affected_rows() > 0)
}
