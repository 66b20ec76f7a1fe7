//! Unix seconds <-> RFC 3339 UTC text, as written in map values and reports.

use chrono::{DateTime, SecondsFormat, Utc};

/// The latest second written as plain RFC 3339 (9999-12-31T23:59:59Z): later years need a
/// sign (`+10000-…`) that the parser refuses, so a value beyond this would not read back.
pub const MAX_SECS: i64 = 253_402_300_799;

/// `2026-11-21T10:30:00Z`
pub fn rfc3339(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

/// `secs` clamped into what `rfc3339` writes and `parse_rfc3339` reads back (0 ..= MAX_SECS).
pub fn representable(secs: i64) -> i64 {
    secs.clamp(0, MAX_SECS)
}

pub fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// Now, in unix seconds.
pub fn now() -> i64 {
    i64::try_from(system_time().as_secs()).unwrap_or(i64::MAX)
}

/// Now, in unix seconds with a fraction.
pub fn now_f64() -> f64 {
    system_time().as_secs_f64()
}

/// Time since the Unix epoch by this host's clock. Tests of a host whose clock is wrong
/// shift it by `DOVEGATE_TEST_CLOCK_OFFSET_SECS` (read once; nothing else sets it).
pub fn system_time() -> std::time::Duration {
    use std::sync::OnceLock;
    static OFFSET: OnceLock<i64> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        std::env::var("DOVEGATE_TEST_CLOCK_OFFSET_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let d = std::time::Duration::from_secs(offset.unsigned_abs());
    if offset < 0 {
        t.saturating_sub(d)
    } else {
        t.saturating_add(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representable_values_round_trip() {
        for s in [
            i64::MIN,
            -1,
            0,
            1_795_257_000,
            MAX_SECS,
            MAX_SECS + 1,
            9_215_576_668_800,
            i64::MAX,
        ] {
            let r = representable(s);
            assert_eq!(parse_rfc3339(&rfc3339(r)), Some(r), "{s}");
        }
    }
}
