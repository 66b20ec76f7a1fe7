//! Where to start reading a file met for the first time (no checkpoint).
//!
//! Only logins newer than now - ttl can still hold a grant, so reading starts near the first
//! line stamped at or after that cutoff. Log files are in time order (give or take a few
//! lines), so the file is bisected by offset: each probe reads one small window, skips to
//! the next line start and takes the first timestamp found there. Then a short forward scan
//! finds the exact line. On a 1 GB file this reads about a megabyte instead of the part
//! within the ttl twice.
//!
//! Lines written out of order (several processes, syslog buffering) must not lose a login:
//! the search aims at `cutoff - SLACK`, so it starts a little early; the older lines read
//! on the way are dropped later as expired.
//! A file whose lines carry no timestamp is started at its end (an unknown login time would
//! count as now and grant every address in the file's history). Its end is judged by the
//! newest timestamp found walking back from the end, however many untimed bytes come last
//! (a huge line being written, another program's output): those must not hide the recent
//! logins before them (issue 17). A file with no timestamp at all is read through once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::tailer::{open_regular, Start};
use crate::frame::line_time;

/// Bytes read per bisection probe: many lines, so one without a timestamp (another
/// program's, a continuation) does not stop the probe.
const PROBE: u64 = 64 * 1024;
/// Bytes read per step of the final forward scan.
const BLOCK: u64 = 256 * 1024;
/// How far out of order lines may be without a login being skipped (seconds).
pub const SLACK: i64 = 300;

/// Offset of a line start at or before the first whole line stamped at or after `cutoff`
/// (at most about `SLACK` seconds of log earlier), or the end when there is none or the
/// file has no timestamps.
pub fn start_offset(file: &File, cutoff: i64, now: i64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let target = cutoff.saturating_sub(SLACK);
    // The end first: a file with no recent timestamp (or none at all) starts at its end
    // without being searched.
    match newest_time(file, len, now)? {
        Some(t) if t >= target => {}
        _ => return Ok(len),
    }
    let lo = bisect(file, len, target, now)?;
    forward_scan(file, lo, len, target, now)
}

/// Where a first start (no checkpoint) of `path` begins: `start_offset` of the regular file
/// at `path`, opened without blocking (a FIFO at the path would block a plain open
/// forever). When it cannot be opened or read, from the beginning of whatever file appears
/// (the follower reports the problem).
pub fn first_start(path: &Path, cutoff: i64, now: i64) -> Start {
    match open_regular(path) {
        Ok((file, _)) => start_offset(&file, cutoff, now).map_or(Start::Beginning, Start::At),
        Err(_) => Start::Beginning,
    }
}

/// The timestamp of the last timed whole line that fits in a probe window (the newest,
/// give or take disorder), walking back window by window from the end; None when no line
/// has one. Lines longer than a window are passed over (the daemon drops them anyway).
fn newest_time(file: &File, len: u64, now: i64) -> io::Result<Option<i64>> {
    let mut buf = vec![0u8; PROBE as usize];
    // Everything from `end` on has been looked at.
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(PROBE);
        let window = &mut buf[..(end - start) as usize];
        file.read_exact_at(window, start)?;
        let first = if start == 0 {
            0
        } else {
            after_newline(window, 0)
        };
        if let Some(t) = lines_from(window, first)
            .filter_map(|(_, l)| line_time(l, now))
            .max()
        {
            return Ok(Some(t));
        }
        // The piece before the first line start is read again, whole, with the next window
        // unless the window holds no line start at all (inside a line longer than it).
        end = if first < window.len() {
            start + first as u64
        } else {
            start
        };
    }
    Ok(None)
}

/// A line start `lo` such that the lines before it are (nearly all) older than `target`:
/// at each step the window in the middle of `[lo, hi)` is probed; a timestamp older than
/// the target moves `lo` up to its line, anything else (newer, or no timestamp to judge
/// by) moves `hi` down, which errs on the side of starting earlier.
fn bisect(file: &File, len: u64, target: i64, now: i64) -> io::Result<u64> {
    let (mut lo, mut hi) = (0u64, len);
    let mut buf = vec![0u8; PROBE as usize];
    while hi - lo > PROBE {
        let mid = lo + (hi - lo) / 2;
        match probe(file, mid, hi, &mut buf, now)? {
            Some((at, t)) if t < target => lo = at,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// The first timestamped line starting in `[at, hi)` within one window after `at`: its
/// offset and time. The piece before the first newline belongs to the previous line.
fn probe(
    file: &File,
    at: u64,
    hi: u64,
    buf: &mut [u8],
    now: i64,
) -> io::Result<Option<(u64, i64)>> {
    let n = read_at_most(file, buf, at)?;
    let window = &buf[..n];
    let first = after_newline(window, 0);
    Ok(lines_from(window, first)
        .map(|(i, l)| (at + i as u64, l))
        .take_while(|&(off, _)| off < hi)
        .find_map(|(off, l)| line_time(l, now).map(|t| (off, t))))
}

/// From line start `from`, the offset of the first whole line stamped at or after
/// `target`; the end of the file when none is.
fn forward_scan(file: &File, from: u64, len: u64, target: i64, now: i64) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut pos = from;
    // Inside a line longer than a block: its rest is not a line start.
    let mut skipping = false;
    while pos < len {
        let n = read_at_most(file, &mut buf, pos)?;
        let block = &buf[..n];
        let begin = if skipping { after_newline(block, 0) } else { 0 };
        // Whole lines only; the last piece is read again with the next block.
        let Some(end) = memchr::memrchr(b'\n', &block[begin..]).map(|i| begin + i + 1) else {
            if n == 0 {
                break;
            }
            pos += n as u64;
            skipping = true;
            continue;
        };
        skipping = false;
        if let Some((i, _)) = lines_from(&block[..end], begin)
            .find(|(_, l)| line_time(l, now).is_some_and(|t| t >= target))
        {
            return Ok(pos + i as u64);
        }
        pos += end as u64;
    }
    Ok(len)
}

/// Reads up to `buf.len()` bytes at `offset` (fewer at the end of the file).
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The index after the first newline at or after `from` (the end when there is none).
fn after_newline(buf: &[u8], from: usize) -> usize {
    memchr::memchr(b'\n', &buf[from..]).map_or(buf.len(), |i| from + i + 1)
}

/// The whole lines of `buf` from `from` (a line start), with their start index; a last
/// piece without newline is left out (it may be cut by the window).
fn lines_from(buf: &[u8], from: usize) -> impl Iterator<Item = (usize, &[u8])> {
    let mut pos = from;
    std::iter::from_fn(move || {
        let nl = pos + memchr::memchr(b'\n', buf.get(pos..)?)?;
        let line = (pos, &buf[pos..nl]);
        pos = nl + 1;
        Some(line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(lines: &[String]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        f
    }

    /// One line per second from `base`, `n` lines, as RFC 3339 syslog lines.
    fn lines_per_second(base: i64, n: i64) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "{} vm postfix/smtpd[1]: line {i:05} padding padding padding",
                    crate::timefmt::rfc3339(base + i)
                )
            })
            .collect()
    }

    /// The line number at `off` (which must be a line start).
    fn line_at(f: &File, off: u64) -> i64 {
        let mut rest = vec![0u8; 120];
        let n = f.read_at(&mut rest, off).unwrap();
        let text = String::from_utf8_lossy(&rest[..n]).into_owned();
        assert!(
            off == 0 || {
                let mut b = [0u8];
                f.read_exact_at(&mut b, off - 1).unwrap();
                b[0] == b'\n'
            }
        );
        let at = text.find(" line ").expect("a line start") + 6;
        text[at..at + 5].parse().unwrap()
    }

    #[test]
    fn starts_at_the_cutoff() {
        // 20000 lines, one per second from 2026-11-21T00:00:00Z.
        let base = 1_795_219_200;
        let f = file_with(&lines_per_second(base, 20_000));
        let now = base + 20_000;
        let off = start_offset(&f, now - 1800, now).unwrap();
        // At the cutoff, or up to SLACK seconds earlier.
        let line = line_at(&f, off);
        assert!(
            (18_200 - SLACK..=18_200).contains(&line),
            "started at line {line}"
        );
        // Everything newer than the cutoff: start at 0.
        assert_eq!(start_offset(&f, base - SLACK - 10, now).unwrap(), 0);
        // Everything older: start at the end.
        let len = f.metadata().unwrap().len();
        assert_eq!(start_offset(&f, now + SLACK + 10, now).unwrap(), len);
    }

    #[test]
    fn out_of_order_lines_and_lines_without_time_lose_no_login() {
        let base = 1_795_219_200;
        let mut lines = lines_per_second(base, 50_000);
        // Lines a minute late here and there, and runs of lines with no timestamp.
        for i in (1000..50_000).step_by(997) {
            lines.swap(i, i + 60);
        }
        for i in (500..50_000).step_by(4999) {
            for j in 0..300 {
                lines[i + j] = format!("continuation without time line {:05}", i + j);
            }
        }
        let f = file_with(&lines);
        let now = base + 50_000;
        for age in [10, 100, 1000, 5000, 20_000, 49_000] {
            let cutoff = now - age;
            let off = start_offset(&f, cutoff, now).unwrap();
            // No line stamped at or after the cutoff lies before the start.
            let mut before = vec![0u8; off as usize];
            f.read_exact_at(&mut before, 0).unwrap();
            let before = String::from_utf8(before).unwrap();
            for l in before.lines() {
                if let Some(t) = line_time(l.as_bytes(), now) {
                    assert!(t < cutoff, "age {age}: skipped a line of time {t}: {l}");
                }
            }
            // And not far earlier than needed.
            let line = line_at(&f, off);
            assert!(
                line >= 50_000 - age - SLACK - 400,
                "age {age}: started at line {line}"
            );
        }
    }

    #[test]
    fn overlong_lines_do_not_break_line_starts() {
        let base = 1_795_219_200;
        let mut lines = lines_per_second(base, 2000);
        lines[1500] = "x".repeat(3 * BLOCK as usize);
        let f = file_with(&lines);
        let now = base + 2000;
        let off = start_offset(&f, base + 1400 + SLACK, now).unwrap();
        assert!((1399..=1401).contains(&line_at(&f, off)), "{off}");
    }

    #[test]
    fn first_start_never_blocks_on_special_files() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for p in [fifo.as_path(), d.path(), Path::new("/dev/zero")] {
            assert!(matches!(first_start(p, 0, 10), Start::Beginning));
        }
    }

    /// Issue 17: recent timed logins followed by more than a probe of bytes without a
    /// timestamp (a huge line still being written, another program's untimed output) were
    /// skipped: the end held no timestamp, so the start was the end.
    #[test]
    fn untimed_bytes_at_the_end_do_not_hide_recent_lines() {
        let base = 1_795_219_200;
        let now = base + 2000;
        let mut lines = lines_per_second(base, 2000);
        let untimed = (0..2000).map(|i| format!("garbage without time {i:05} padding padding"));
        lines.extend(untimed);
        let mut f = file_with(&lines);
        // A line longer than a probe, stamped, then a piece of one without its newline.
        writeln!(
            f,
            "{} {}",
            crate::timefmt::rfc3339(now),
            "A".repeat(3 * PROBE as usize)
        )
        .unwrap();
        write!(
            f,
            "{} {}",
            crate::timefmt::rfc3339(now),
            "B".repeat(2 * PROBE as usize)
        )
        .unwrap();
        let off = start_offset(&f, now - 600, now).unwrap();
        assert_ne!(off, f.metadata().unwrap().len(), "started at the end");
        let line = line_at(&f, off);
        assert!(
            (1400 - SLACK..=1400).contains(&line),
            "started at line {line}"
        );
    }

    #[test]
    fn no_timestamps_starts_at_end() {
        let lines: Vec<String> = (0..100)
            .map(|i| format!("imap-login: Login: user=<u{i}>"))
            .collect();
        let f = file_with(&lines);
        assert_eq!(
            start_offset(&f, 0, 10).unwrap(),
            f.metadata().unwrap().len()
        );
    }
}
