//! Timestamp parsers for the framings Dovecot's lines arrive in. All return unix seconds.

use std::cell::Cell;

use chrono::{DateTime, Datelike, Local, NaiveDate, NaiveDateTime, TimeZone};

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// How far ahead of `now` a line without a year may be dated (clock skew between hosts).
const FUTURE_SKEW_SECS: i64 = 86_400;

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

/// The zone that local wall-clock times in log lines (BSD syslog, Dovecot's log_path) are
/// written in. An explicit value rather than the process environment, so that tests and
/// callers never need `TZ`; the system zone's offset is cached per local hour, because
/// asking chrono's `Local` for every line dominated the cost of reading a log.
#[derive(Debug, Clone)]
pub struct LocalZone {
    fixed: Option<i32>,
    /// (local hour since the epoch, its offset east of UTC; None when the offset changes
    /// within that hour or the hour does not exist, e.g. at a DST change).
    hour: Cell<Option<(i64, Option<i32>)>>,
    /// (UTC hour since the epoch, the offset then): for the local date of `now`.
    now_hour: Cell<Option<(i64, i32)>>,
    /// Cache misses, for the tests' proof that a steady log costs no zone lookups.
    #[cfg(test)]
    misses: Cell<u32>,
}

impl Default for LocalZone {
    fn default() -> Self {
        LocalZone::system()
    }
}

impl LocalZone {
    /// The host's zone (`TZ`, `/etc/localtime`), as chrono's `Local` sees it.
    pub fn system() -> LocalZone {
        LocalZone {
            fixed: None,
            hour: Cell::new(None),
            now_hour: Cell::new(None),
            #[cfg(test)]
            misses: Cell::new(0),
        }
    }

    /// A fixed offset east of UTC in seconds (`fixed(0)` is UTC).
    pub fn fixed(offset_secs: i32) -> LocalZone {
        LocalZone {
            fixed: Some(offset_secs),
            hour: Cell::new(None),
            now_hour: Cell::new(None),
            #[cfg(test)]
            misses: Cell::new(0),
        }
    }

    pub fn utc() -> LocalZone {
        LocalZone::fixed(0)
    }

    /// Unix seconds of a local wall-clock time; the earlier one when the time occurs twice
    /// (DST ends), None when it does not occur (DST starts).
    pub fn to_unix(&self, dt: NaiveDateTime) -> Option<i64> {
        let naive = dt.and_utc().timestamp();
        if let Some(off) = self.fixed {
            return Some(naive - i64::from(off));
        }
        let bucket = naive.div_euclid(3600);
        let off = match self.hour.get() {
            Some((b, off)) if b == bucket => off,
            _ => {
                #[cfg(test)]
                self.misses.set(self.misses.get() + 1);
                let off = steady_offset(bucket);
                self.hour.set(Some((bucket, off)));
                off
            }
        };
        match off {
            Some(off) => Some(naive - i64::from(off)),
            // Near a DST change: ask for this very time. chrono's `earliest()` on `Local`
            // returns the later instant of a repeated hour (seen with chrono 0.4 and
            // Europe/Berlin), so take the minimum here: the earlier reading never makes a
            // grant outlive the real one.
            None => match Local.from_local_datetime(&dt) {
                chrono::LocalResult::Single(t) => Some(t.timestamp()),
                chrono::LocalResult::Ambiguous(a, b) => Some(a.timestamp().min(b.timestamp())),
                chrono::LocalResult::None => None,
            },
        }
    }
}

impl LocalZone {
    /// The offset east of UTC at the instant `unix` (cached per UTC hour; only used to find
    /// the local year of `now`, where a DST change within the hour cannot matter).
    fn offset_at(&self, unix: i64) -> Option<i32> {
        if let Some(off) = self.fixed {
            return Some(off);
        }
        let bucket = unix.div_euclid(3600);
        if let Some((b, off)) = self.now_hour.get() {
            if b == bucket {
                return Some(off);
            }
        }
        let utc = DateTime::from_timestamp(unix, 0)?.naive_utc();
        let off = Local.offset_from_utc_datetime(&utc).local_minus_utc();
        self.now_hour.set(Some((bucket, off)));
        Some(off)
    }
}

/// The system zone's offset over a whole local hour, when it is one and the same.
fn steady_offset(bucket: i64) -> Option<i32> {
    let start = DateTime::from_timestamp(bucket.checked_mul(3600)?, 0)?.naive_utc();
    let end = start + chrono::Duration::seconds(3599);
    let a = Local.from_local_datetime(&start).single()?;
    let b = Local.from_local_datetime(&end).single()?;
    let (a, b) = (a.offset().local_minus_utc(), b.offset().local_minus_utc());
    (a == b).then_some(a)
}

/// BSD syslog `Mmm dd HH:MM:SS ` (day space-padded or one digit). Returns the time and the
/// length consumed including the trailing space. The year is not in the line: of the
/// years around `now`'s, the one that puts the time nearest to `now` without being more
/// than a day ahead (clock skew) is taken, so `Jan  1 00:00:05` read at Dec 31 23:59:59
/// is the coming year's, and `Dec 31` read in January the past year's.
pub fn parse_bsd(line: &[u8], now: i64, zone: &LocalZone) -> Option<(i64, usize)> {
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
    let off_now = i64::from(zone.offset_at(now)?);
    let now_year = DateTime::from_timestamp(now + off_now, 0)?.year();
    // Latest year first: the first one not too far ahead is the nearest to `now`.
    for year in [now_year + 1, now_year, now_year - 1] {
        let Some(dt) =
            NaiveDate::from_ymd_opt(year, month, day).and_then(|d| d.and_hms_opt(h, m, s))
        else {
            continue;
        };
        // Clearly too far ahead even with a DST shift: skip the exact conversion.
        if dt.and_utc().timestamp() - off_now > now + FUTURE_SKEW_SECS + 3 * 3600 {
            continue;
        }
        if let Some(t) = zone.to_unix(dt) {
            if t <= now + FUTURE_SKEW_SECS {
                return Some((t, i));
            }
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
    Some((parse_rfc3339_field(&line[..end])?, end + 1))
}

/// One whole RFC 3339 timestamp (an RFC 5424 TIMESTAMP field).
pub fn parse_rfc3339_field(field: &[u8]) -> Option<i64> {
    if field.len() < 20 || field[4] != b'-' || field[10] != b'T' {
        return None;
    }
    let text = std::str::from_utf8(field).ok()?;
    Some(DateTime::parse_from_rfc3339(text).ok()?.timestamp())
}

/// Dovecot's `log_timestamp = "%Y-%m-%d %H:%M:%S "` (local time), optionally with a
/// fraction of a second.
pub fn parse_iso_local(line: &[u8], zone: &LocalZone) -> Option<(i64, usize)> {
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
    Some((zone.to_unix(t)?, i + 1))
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

    fn utc() -> LocalZone {
        LocalZone::utc()
    }

    #[test]
    fn bsd_infers_year_before_now() {
        let now = 1_795_255_027; // 2026-11-21T09:57:07Z
        let (t, n) = parse_bsd(b"Nov 21 09:30:01 host", now, &utc()).unwrap();
        assert_eq!(n, 16);
        assert_eq!(t, 1_795_253_401);
        // December seen in November is last year's.
        let (t, _) = parse_bsd(b"Dec 31 23:00:00 x", now, &utc()).unwrap();
        assert!(t < now - 300 * 86_400);
        let (_, n) = parse_bsd(b"Apr  1 10:00:02 raptor", now, &utc()).unwrap();
        assert_eq!(n, 16);
        let (_, n) = parse_bsd(b"Oct 5 10:22:28 (none)", now, &utc()).unwrap();
        assert_eq!(n, 15);
        assert!(parse_bsd(b"Foo 5 10:22:28 x", now, &utc()).is_none());
        assert!(parse_bsd(b"Oct 45 10:22:28 x", now, &utc()).is_none());
    }

    #[test]
    fn bsd_year_nearest_to_now_across_new_year() {
        // Read at 2026-12-31T23:59:59Z: a line from five seconds later is 2027's.
        let now = 1_798_761_599;
        let (t, _) = parse_bsd(b"Jan  1 00:00:05 x", now, &utc()).unwrap();
        assert_eq!(t, now + 6);
        // Read at 2027-01-01T00:00:05Z: the line from just before midnight is 2026's.
        let (t, _) = parse_bsd(b"Dec 31 23:59:59 x", now + 6, &utc()).unwrap();
        assert_eq!(t, now);
        // More than a day ahead is last year's, never next year's.
        let (t, _) = parse_bsd(b"Jan  3 00:00:00 x", now, &utc()).unwrap();
        assert!(t < now - 300 * 86_400, "{t}");
        // The local zone decides the year as well: at 23:59:59 UTC+2 it is already
        // 2027-01-01 01:59:59 local.
        let (t, _) = parse_bsd(b"Jan  1 01:59:58 x", now, &LocalZone::fixed(7200)).unwrap();
        assert_eq!(t, now - 1);
        // Feb 29 exists only in leap years: read in 2029, 2028's.
        let (t, _) = parse_bsd(b"Feb 29 12:00:00 x", 1_866_000_000, &utc()).unwrap();
        assert_eq!(t, 1_835_438_400);
    }

    #[test]
    fn system_zone_cache_agrees_with_chrono() {
        // Whatever the host's zone is, the cached path gives chrono's answer.
        let z = LocalZone::system();
        for secs in (1_700_000_000i64..1_800_000_000).step_by(7_777_777) {
            let dt = DateTime::from_timestamp(secs, 0).unwrap().naive_utc();
            let want = Local
                .from_local_datetime(&dt)
                .earliest()
                .map(|t| t.timestamp());
            assert_eq!(z.to_unix(dt), want, "{dt}");
            assert_eq!(z.to_unix(dt), want, "{dt} (cached)");
        }
        assert_eq!(
            LocalZone::fixed(3600).to_unix(
                NaiveDate::from_ymd_opt(2026, 11, 21)
                    .unwrap()
                    .and_hms_opt(10, 56, 55)
                    .unwrap()
            ),
            Some(1_795_255_015)
        );
    }

    #[test]
    fn steady_log_costs_one_zone_lookup_per_hour() {
        let z = LocalZone::system();
        let now = 1_795_255_027; // 2026-11-21T09:57:07Z
        for sec in 0..600u32 {
            let line = format!("Nov 21 09:{:02}:{:02} host", sec / 60, sec % 60);
            assert!(parse_bsd(line.as_bytes(), now, &z).is_some(), "{line}");
        }
        assert!(z.misses.get() <= 2, "{} misses", z.misses.get());
    }

    /// DST in a real zone, without touching this process's environment: the test binary
    /// runs `dst_child` again in a child process with `TZ` set.
    #[test]
    fn dst_in_a_real_zone() {
        if !std::path::Path::new("/usr/share/zoneinfo/Europe/Berlin").exists() {
            eprintln!("no tzdata: DST check skipped");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "frame::time::tests::dst_child", "--ignored"])
            .env("TZ", "Europe/Berlin")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    #[ignore = "run by dst_in_a_real_zone in a child process with TZ=Europe/Berlin"]
    fn dst_child() {
        if std::env::var("TZ").as_deref() != Ok("Europe/Berlin") {
            return;
        }
        let z = LocalZone::system();
        let at = |mo, d, h, mi, s| {
            z.to_unix(
                NaiveDate::from_ymd_opt(2026, mo, d)
                    .unwrap()
                    .and_hms_opt(h, mi, s)
                    .unwrap(),
            )
        };
        // Twice each, so that the cached path is checked as well.
        for _ in 0..2 {
            assert_eq!(at(7, 1, 12, 0, 0), Some(1_782_900_000)); // 10:00Z, CEST
            assert_eq!(at(11, 21, 12, 0, 0), Some(1_795_258_800)); // 11:00Z, CET
                                                                   // Spring forward, 2026-03-29 02:00 CET: the hour 02 does not exist.
            assert_eq!(at(3, 29, 1, 59, 59), Some(1_774_745_999));
            assert_eq!(at(3, 29, 2, 30, 0), None);
            assert_eq!(at(3, 29, 3, 0, 0), Some(1_774_746_000));
            // Fall back, 2026-10-25 03:00 CEST: 02:30 happens twice; the earlier is taken.
            assert_eq!(at(10, 25, 2, 30, 0), Some(1_792_888_200));
            assert_eq!(at(10, 25, 3, 30, 0), Some(1_792_895_400));
        }
        let now = 1_795_255_027; // 2026-11-21T09:57:07Z = 10:57:07 CET
        let (t, _) = parse_bsd(b"Nov 21 10:57:00 h", now, &z).unwrap();
        assert_eq!(t, now - 7);
    }

    #[test]
    fn rfc3339_iso_tai() {
        let (t, n) = parse_rfc3339(b"2026-11-21T09:56:55.406029+00:00 vm").unwrap();
        assert_eq!((t, n), (1_795_255_015, 33));
        let (t2, _) = parse_rfc3339(b"2026-11-21T10:56:55+01:00 vm").unwrap();
        assert_eq!(t, t2);
        let (t3, n) = parse_iso_local(b"2026-11-21 09:56:55 imap-login", &utc()).unwrap();
        assert_eq!((t3, n), (t, 20));
        let (t3, _) =
            parse_iso_local(b"2026-11-21 10:56:55 imap-login", &LocalZone::fixed(3600)).unwrap();
        assert_eq!(t3, t);
        let (t4, n) = parse_tai64n(b"@400000004c91b044077a9e94 imap-login").unwrap();
        assert_eq!(n, 26);
        assert_eq!(t4, 0x4c91b044 - 10);
    }
}
