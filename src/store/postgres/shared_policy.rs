//! The policy server's state shared between hosts (schema 4): the users blocked by a cap
//! and what each host counted towards each user's caps. Every value is a query parameter;
//! every row read is bounded and checked, since the database is outside input too.

use tokio_postgres::Client;

use crate::model::UserCount as CountRow;

/// Rows read at most per query: past it, the rest waits for the next round.
pub const MAX_ROWS: i64 = 100_000;
/// The longest user name kept (as the table's CHECK).
pub const MAX_USER: usize = 256;

/// A cap name as dovegate writes it (`user_messages_per_hour`): anything else read from
/// the database is replaced, since it is shown to the blocked user's mail client.
pub fn cap_name(text: String) -> String {
    if !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        text
    } else {
        "unknown".into()
    }
}

pub fn user_name(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_USER
}

/// Records users blocked here (those already there keep their first record).
pub async fn add_blocks(
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
pub async fn blocked(
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

fn kind(recipients: bool) -> &'static str {
    if recipients {
        "recipients"
    } else {
        "messages"
    }
}

/// Adds this host's new counts.
pub async fn add_counts(
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
pub async fn other_counts(
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
            let recipients = match r.try_get::<_, &str>(1).ok()? {
                "recipients" => true,
                "messages" => false,
                _ => return None,
            };
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
pub async fn clean_counts(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_cap_names_are_replaced() {
        assert_eq!(
            cap_name("user_messages_per_hour".into()),
            "user_messages_per_hour"
        );
        assert_eq!(cap_name("x\"}{".into()), "unknown");
        assert_eq!(cap_name(String::new()), "unknown");
        assert_eq!(cap_name("a".repeat(65)), "unknown");
    }
}
