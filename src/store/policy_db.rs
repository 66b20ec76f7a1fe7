//! The policy state shared between hosts (`policy::shared`: users blocked by a cap, and
//! what each host counted towards each user's caps), whatever the database: PostgreSQL
//! (`store::postgres::shared_policy`, schema 4) or MariaDB (`store::mysql::shared_policy`,
//! schema 2). Every value is a query parameter; every row read is bounded (`MAX_ROWS`) and
//! checked (`user_name`, `cap_name`), since the database is outside input too.

use std::future::Future;

use crate::model::UserCount;

/// Rows read at most per query: past it, the rest waits for the next round.
pub const MAX_ROWS: i64 = 100_000;
/// The longest user name kept (as the tables' CHECK).
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

/// A user name the tables accept (and that is kept when read back).
pub fn user_name(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_USER
}

/// How a count's kind is stored.
pub fn kind(recipients: bool) -> &'static str {
    if recipients {
        "recipients"
    } else {
        "messages"
    }
}

/// A count's kind read back; None for anything dovegate does not write.
pub fn parse_kind(text: &str) -> Option<bool> {
    match text {
        "recipients" => Some(true),
        "messages" => Some(false),
        _ => None,
    }
}

/// A database the policy state is exchanged through. The futures are Send: the exchange
/// runs as a spawned task. Each error names what was being done.
pub trait PolicyDb: Send + Sync + 'static {
    type Conn: Send;
    type Error: std::error::Error + Send + 'static;

    /// The database for logs, without credentials.
    fn describe(&self) -> String;
    /// Connects (bounded), the schema checked or migrated.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;
    /// Records users blocked here (a user already there keeps its first record).
    fn add_blocks(
        &self,
        c: &mut Self::Conn,
        users: &[(String, String)],
        host: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Every user blocked on any host, with the cap it tripped (at most `MAX_ROWS`).
    fn blocked(
        &self,
        c: &mut Self::Conn,
    ) -> impl Future<Output = Result<Vec<(String, String)>, Self::Error>> + Send;
    /// Adds this host's new counts to its rows.
    fn add_counts(
        &self,
        c: &mut Self::Conn,
        host: &str,
        rows: &[UserCount],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// What the other hosts counted since bucket `since`, summed per user, kind, bucket.
    fn other_counts(
        &self,
        c: &mut Self::Conn,
        host: &str,
        since: i64,
    ) -> impl Future<Output = Result<Vec<UserCount>, Self::Error>> + Send;
    /// Deletes every host's counts older than bucket `before`.
    fn clean_counts(
        &self,
        c: &mut Self::Conn,
        before: i64,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;
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

    #[test]
    fn only_known_kinds_are_read() {
        assert_eq!(parse_kind(kind(true)), Some(true));
        assert_eq!(parse_kind(kind(false)), Some(false));
        assert_eq!(parse_kind("Messages"), None);
    }
}
