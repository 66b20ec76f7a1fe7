//! Where to start reading a file met for the first time (no checkpoint).
//!
//! Only logins newer than now - ttl can still hold a grant, so reading starts at the first
//! line stamped at or after that cutoff. The file is searched backwards in blocks from its
//! end: on a busy server only the last ttl's worth of log is read, not the whole file.
//! A file whose lines carry no timestamp is started at its end (an unknown login time would
//! count as now and grant every address in the file's history).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::frame::line_time;

const BLOCK: u64 = 256 * 1024;

/// Offset of the first whole line stamped at or after `cutoff`.
pub fn start_offset(file: &File, cutoff: i64, now: i64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut saw_time = false;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &mut buf[..(end - start) as usize];
        file.read_exact_at(block, start)?;
        // Whole lines only: skip the piece before the first newline unless at file start.
        let first = if start == 0 {
            0
        } else {
            match memchr::memchr(b'\n', block) {
                Some(i) => i + 1,
                // A line longer than a block: step over it.
                None => {
                    end = start;
                    continue;
                }
            }
        };
        let mut pos = first;
        let mut answer = None;
        let mut oldest_in_block = None;
        while pos < block.len() {
            let nl = memchr::memchr(b'\n', &block[pos..]).map_or(block.len(), |i| pos + i);
            if let Some(t) = line_time(&block[pos..nl], now) {
                saw_time = true;
                oldest_in_block.get_or_insert(t);
                if t >= cutoff && answer.is_none() {
                    answer = Some(start + pos as u64);
                }
            }
            pos = nl + 1;
        }
        if oldest_in_block.is_some_and(|t| t < cutoff) {
            // The cutoff lies in this block (or at its end).
            return Ok(answer.unwrap_or(end.min(len)));
        }
        if start == 0 {
            break;
        }
        end = start + first as u64;
        if first == 0 {
            end = start;
        }
    }
    Ok(if saw_time { 0 } else { len })
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

    #[test]
    fn starts_at_the_cutoff() {
        std::env::set_var("TZ", "UTC");
        // 20000 lines, one per second from 2026-11-21T00:00:00Z.
        let base = 1_795_219_200;
        let lines: Vec<String> = (0..20_000)
            .map(|i| {
                format!(
                    "{} vm postfix/smtpd[1]: line {i:05} padding padding padding",
                    crate::timefmt::rfc3339(base + i)
                )
            })
            .collect();
        let f = file_with(&lines);
        let now = base + 20_000;
        let off = start_offset(&f, now - 1800, now).unwrap();
        let mut rest = vec![0u8; 120];
        f.read_at(&mut rest, off).unwrap();
        assert!(
            String::from_utf8_lossy(&rest).contains("line 18200"),
            "{}",
            String::from_utf8_lossy(&rest)
        );
        // Everything newer than the cutoff: start at 0.
        assert_eq!(start_offset(&f, base - 10, now).unwrap(), 0);
        // Everything older: start at the end.
        let len = f.metadata().unwrap().len();
        assert_eq!(start_offset(&f, now + 10, now).unwrap(), len);
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
