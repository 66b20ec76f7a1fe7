//! Unix seconds <-> RFC 3339 UTC text, as written in map values and reports.

use chrono::{DateTime, SecondsFormat, Utc};

/// `2026-11-21T10:30:00Z`
pub fn rfc3339(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

pub fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// Now, in unix seconds.
pub fn now() -> i64 {
    Utc::now().timestamp()
}
