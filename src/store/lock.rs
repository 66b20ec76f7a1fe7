//! Whole-file fcntl OFD locks, the protocol Postfix's LMDB readers follow.
//!
//! Postfix takes `fcntl(F_SETLKW, F_RDLCK)` on the whole `.lmdb` file for every lookup and
//! ignores LMDB's lock file. flock() does not conflict with fcntl locks on Linux, and a
//! classic POSIX lock is dropped when any fd of the file closes (LMDB closes its own), so
//! an open-file-description lock on a dedicated fd is the one that works.
//!
//! The map is world-readable (Postfix must read it), so any local user can take a shared
//! lock and keep it: the exclusive lock is therefore waited for a bounded time only, and
//! the failure names the holder when it can be found.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use crate::ofd::{self, busy, Kind};

/// How long a writer waits for the exclusive lock before the operation fails. Postfix
/// holds its shared lock for one lookup (microseconds); seconds mean a stuck or hostile
/// holder.
pub const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The longest pause between two attempts (the first ones are much shorter).
const MAX_PAUSE: Duration = Duration::from_millis(50);

pub struct FileLock<'a> {
    file: &'a File,
}

/// Takes `kind` without blocking, retrying with short pauses until `limit` has passed;
/// then fails with `WouldBlock` and a message naming the holder when it can be found.
fn ofd_bounded(file: &File, kind: Kind, limit: Duration) -> io::Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match ofd::set(file, kind, false) {
            Ok(()) => return Ok(()),
            Err(e) if busy(&e) => {}
            Err(e) => return Err(e),
        }
        let waited = start.elapsed();
        if waited >= limit {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another process has held a lock on it for over {}s ({})",
                    limit.as_secs(),
                    holder(file).unwrap_or_else(|| "holder not found".into())
                ),
            ));
        }
        std::thread::sleep(pause.min(limit - waited));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Who holds a lock that conflicts with a write lock on `file`: "pid N, COMMAND" when
/// the kernel says (a classic POSIX lock reports its pid; an OFD lock reports -1, then
/// /proc/locks and the lock lines in /proc/PID/fdinfo are searched), else None.
fn holder(file: &File) -> Option<String> {
    let mut pids = Vec::new();
    if let Ok(Some(Some(pid))) = ofd::holder(file) {
        pids.push(pid);
    } else {
        let meta = file.metadata().ok()?;
        let id = lock_id(meta.dev(), meta.ino());
        let own = std::process::id();
        let from_locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        pids.extend(pids_in(&from_locks, &id).filter(|&p| p != own));
        if pids.is_empty() {
            pids = fdinfo_holders(&id, own);
        }
    }
    if pids.is_empty() {
        return None;
    }
    pids.sort_unstable();
    pids.dedup();
    let named: Vec<String> = pids
        .iter()
        .take(5)
        .map(|&p| match command(p) {
            Some(c) => format!("pid {p}, {c}"),
            None => format!("pid {p}"),
        })
        .collect();
    Some(named.join("; "))
}

/// The `MAJOR:MINOR:INODE` form /proc/locks uses (major and minor in hex).
fn lock_id(dev: u64, ino: u64) -> String {
    format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev))
}

/// Pids of the lock lines (`/proc/locks` format) on `id`; -1 (OFD locks) is skipped.
fn pids_in<'a>(text: &'a str, id: &'a str) -> impl Iterator<Item = u32> + 'a {
    text.lines().filter_map(move |l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: OFDLCK ADVISORY READ PID DEV:INO START END", maybe after "lock:" (fdinfo)
        // or "->" (a waiter).
        let at = f.iter().position(|w| *w == id)?;
        if f.contains(&"->") {
            return None;
        }
        f.get(at.checked_sub(1)?)?
            .parse::<i64>()
            .ok()
            .and_then(|p| u32::try_from(p).ok())
    })
}

/// Processes with an open file description of the map that holds a lock on it (an OFD
/// lock is listed in the fdinfo of every fd that shares the description). Bounded: at
/// most this many processes are looked at.
fn fdinfo_holders(id: &str, own: u32) -> Vec<u32> {
    const MAX_PROCS: usize = 20_000;
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten().take(MAX_PROCS) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.starts_with("lock:") && l.split_whitespace().any(|w| w == id))
            })
        });
        if holds {
            found.push(pid);
        }
    }
    found
}

/// The process's command name, for the message (control characters dropped).
fn command(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let clean: String = comm
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(32)
        .collect();
    Some(clean).filter(|c| !c.is_empty())
}

impl<'a> FileLock<'a> {
    /// Waits up to `WRITE_LOCK_WAIT` for an exclusive lock (writers); then fails with
    /// `WouldBlock`, naming the holder when it can be found.
    pub fn exclusive(file: &'a File) -> io::Result<FileLock<'a>> {
        FileLock::exclusive_within(file, WRITE_LOCK_WAIT)
    }

    /// `exclusive` with another bound (tests).
    pub fn exclusive_within(file: &'a File, limit: Duration) -> io::Result<FileLock<'a>> {
        ofd_bounded(file, Kind::Exclusive, limit)?;
        Ok(FileLock { file })
    }

    /// Waits for a shared lock (readers). Only a writer conflicts, and writers hold it
    /// for one transaction (a write lock needs the file open for writing: root or owner).
    pub fn shared(file: &'a File) -> io::Result<FileLock<'a>> {
        ofd::set(file, Kind::Shared, true)?;
        Ok(FileLock { file })
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = ofd::set(self.file, Kind::Unlock, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    /// A reader that keeps its shared lock makes the writer fail after the bound (not
    /// wait forever), naming the holder's kind of lock; once it lets go, the writer gets in.
    #[test]
    fn exclusive_is_bounded_and_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.lmdb");
        std::fs::write(&path, b"x").unwrap();
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let reader = File::open(&path).unwrap();
        let held = FileLock::shared(&reader).unwrap();
        let e = match FileLock::exclusive_within(&writer, Duration::from_millis(200)) {
            Ok(_) => panic!("the write lock was given while a reader held its lock"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(e.to_string().contains("held a lock"), "{e}");
        drop(held);
        let got = FileLock::exclusive_within(&writer, Duration::from_millis(200));
        assert!(got.is_ok(), "{:?}", got.err());
    }

    #[test]
    fn lock_lines_give_their_pids() {
        let text = "1: OFDLCK ADVISORY  READ  -1 fe:01:77 0 EOF\n\
                    2: POSIX  ADVISORY  READ  4242 fe:01:77 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 99 fe:01:78 0 EOF\n\
                    4: -> POSIX  ADVISORY  WRITE 7 fe:01:77 0 EOF\n";
        let pids: Vec<u32> = pids_in(text, "fe:01:77").collect();
        assert_eq!(pids, vec![4242]);
        let fdinfo = "lock:\t1: OFDLCK ADVISORY  READ  -1 fe:01:77 0 EOF\n";
        assert_eq!(pids_in(fdinfo, "fe:01:77").count(), 0);
        assert_eq!(lock_id(libc::makedev(254, 1), 77), "fe:01:77");
    }
}
