//! Timestamp parsers for the framings Dovecot's lines arrive in. All return unix seconds.

use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, TimeZone};

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u32, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    })
}

fn hms(b: &[u8]) -> Option<(u32, u32, u32)> {
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    Some((digits(&b[0..2])?, digits(&b[3..5])?, digits(&b[6..8])?))
}

fn local_to_unix(dt: NaiveDateTime) -> Option<i64> {
    Local
        .from_local_datetime(&dt)
        .earliest()
        .map(|t| t.timestamp())
}

/// BSD syslog `Mmm dd HH:MM:SS ` (day space-padded or one digit). Returns the time and the
/// length consumed including the trailing space. The year is not in the line: the one that
/// puts the time closest before `now` (plus a day of clock skew) is taken.
pub fn parse_bsd(line: &[u8], now: i64) -> Option<(i64, usize)> {
    if line.len() < 15 || line[3] != b' ' {
        return None;
    }
    let month = MONTHS.iter().position(|m| line[..3] == m[..])? as u32 + 1;
    let mut i = 4;
    if line[i] == b' ' {
        i += 1;
    }
    let day_start = i;
    while i < line.len() && line[i].is_ascii_digit() && i - day_start < 2 {
        i += 1;
    }
    let day = digits(&line[day_start..i])?;
    if line.get(i) != Some(&b' ') {
        return None;
    }
    i += 1;
    let (h, m, s) = hms(line.get(i..i + 8)?)?;
    i += 8;
    if line.get(i) != Some(&b' ') {
        return None;
    }
    i += 1;
    let now_year = DateTime::from_timestamp(now, 0)
        .map(|t| t.with_timezone(&Local).format("%Y").to_string())
        .and_then(|y| y.parse::<i32>().ok())?;
    for year in [now_year, now_year - 1] {
        let Some(date) = NaiveDate::from_ymd_opt(year, month, day) else {
            continue;
        };
        let Some(t) = date.and_hms_opt(h, m, s).and_then(local_to_unix) else {
            continue;
        };
        if t <= now + 86_400 {
            return Some((t, i));
        }
    }
    None
}

/// RFC 3339 (`2026-11-21T09:30:01.889064+01:00`, `...Z`) up to the next space.
pub fn parse_rfc3339(line: &[u8]) -> Option<(i64, usize)> {
    if line.len() < 20 || line[4] != b'-' || line[10] != b'T' {
        return None;
    }
    let end = memchr::memchr(b' ', line)?;
    let text = std::str::from_utf8(&line[..end]).ok()?;
    let t = DateTime::parse_from_rfc3339(text).ok()?;
    Some((t.timestamp(), end + 1))
}

/// Dovecot's `log_timestamp = "%Y-%m-%d %H:%M:%S "` (local time), optionally with a
/// fraction of a second.
pub fn parse_iso_local(line: &[u8]) -> Option<(i64, usize)> {
    if line.len() < 20 || line[4] != b'-' || line[7] != b'-' || line[10] != b' ' {
        return None;
    }
    let y = digits(&line[0..4])? as i32;
    let mo = digits(&line[5..7])?;
    let d = digits(&line[8..10])?;
    let (h, mi, s) = hms(&line[11..19])?;
    let mut i = 19;
    if line.get(i) == Some(&b'.') {
        i += 1;
        while line.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    if line.get(i) != Some(&b' ') {
        return None;
    }
    let t = NaiveDate::from_ymd_opt(y, mo, d)?.and_hms_opt(h, mi, s)?;
    Some((local_to_unix(t)?, i + 1))
}

/// daemontools TAI64N label `@4000000050000000xxxxxxxx ` (TAI, 10 s ahead of UTC then).
pub fn parse_tai64n(line: &[u8]) -> Option<(i64, usize)> {
    if line.len() < 26 || line[0] != b'@' || line[25] != b' ' {
        return None;
    }
    let hex = std::str::from_utf8(&line[1..17]).ok()?;
    let secs = u64::from_str_radix(hex, 16).ok()?;
    let unix = secs.checked_sub(1u64 << 62)?.checked_sub(10)?;
    if !line[17..25].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    Some((i64::try_from(unix).ok()?, 26))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() {
        std::env::set_var("TZ", "UTC");
    }

    #[test]
    fn bsd_infers_year_before_now() {
        utc();
        let now = 1_795_255_027; // 2026-11-21T09:57:07Z
        let (t, n) = parse_bsd(b"Nov 21 09:30:01 host", now).unwrap();
        assert_eq!(n, 16);
        assert_eq!(t, 1_795_253_401);
        // December seen in November is last year's.
        let (t, _) = parse_bsd(b"Dec 31 23:00:00 x", now).unwrap();
        assert!(t < now - 300 * 86_400);
        let (_, n) = parse_bsd(b"Apr  1 10:00:02 raptor", now).unwrap();
        assert_eq!(n, 16);
        let (_, n) = parse_bsd(b"Oct 5 10:22:28 (none)", now).unwrap();
        assert_eq!(n, 15);
        assert!(parse_bsd(b"Foo 5 10:22:28 x", now).is_none());
        assert!(parse_bsd(b"Oct 45 10:22:28 x", now).is_none());
    }

    #[test]
    fn rfc3339_iso_tai() {
        utc();
        let (t, n) = parse_rfc3339(b"2026-11-21T09:56:55.406029+00:00 vm").unwrap();
        assert_eq!((t, n), (1_795_255_015, 33));
        let (t2, _) = parse_rfc3339(b"2026-11-21T10:56:55+01:00 vm").unwrap();
        assert_eq!(t, t2);
        let (t3, n) = parse_iso_local(b"2026-11-21 09:56:55 imap-login").unwrap();
        assert_eq!((t3, n), (t, 20));
        let (t4, n) = parse_tai64n(b"@400000004c91b044077a9e94 imap-login").unwrap();
        assert_eq!(n, 26);
        assert_eq!(t4, 0x4c91b044 - 10);
    }
}
