//! The spill queue: grants committed while the database was unreachable, kept on disk
//! (fsynced before the commit counts) until they are written to the database.
//!
//! One file, `STATE/spill/queue`, one grant per line (`address expiry`), appended in
//! commit order and replayed in that order. Replaying twice is harmless (the database
//! keeps the later expiry), so a crash mid-replay only replays again. A torn last line
//! (crash mid-append) is skipped.
//!
//! The queue never refuses a commit (the local map must never wait on the database's
//! copy): when it is full it is merged (one line per address, its latest expiry; expired
//! lines dropped), and if still full the grants that expire first are dropped: the
//! database copy is then behind, and the worker says so.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::grant::key_text;
use crate::store::shared::parse_address;

/// The spill queue file failed (the writer reports the commit as not durable).
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {source}; check the state directory's disk and permissions", .path.display())]
pub struct SpillError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The bounded, durable queue.
pub struct Spill {
    path: PathBuf,
    file: File,
    len: usize,
    max: usize,
}

impl Spill {
    /// Opens (creating) `DIR/spill/queue` and counts what an earlier run left.
    pub fn open(state_dir: &Path, max: usize) -> Result<Spill, SpillError> {
        let dir = state_dir.join("spill");
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "cannot create", e))?;
        let path = dir.join("queue");
        let file = open_append(&path)?;
        // A torn last line (crash mid-append) is cut off, so the next append starts a line.
        let text = std::fs::read(&path).map_err(|e| io_err(&path, "cannot read", e))?;
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(file = %path.display(), "cutting off a torn spill line");
            file.set_len(whole as u64)
                .map_err(|e| io_err(&path, "cannot truncate", e))?;
        }
        let mut spill = Spill {
            path,
            file,
            len: 0,
            max,
        };
        spill.len = spill.read()?.len();
        Ok(spill)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grants waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends grants and fsyncs. When they would not fit, merges the queue (see the
    /// module) and returns how many grants were dropped (0: nothing lost).
    pub fn push(&mut self, grants: &[(IpAddr, i64)], now: i64) -> Result<usize, SpillError> {
        if self.len + grants.len() > self.max {
            return self.merge(grants, now);
        }
        let mut text = String::with_capacity(grants.len() * 32);
        for &(ip, e) in grants {
            text.push_str(&format!("{} {e}\n", key_text(ip)));
        }
        let io = |e: std::io::Error| io_err(&self.path, "cannot write", e);
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len += grants.len();
        Ok(0)
    }

    /// Rewrites the queue with `grants` added: one line per address (the latest expiry),
    /// none expired at `now`, at most `max` (those expiring first dropped). Write, fsync,
    /// rename: a crash leaves the old queue or the new one.
    fn merge(&mut self, grants: &[(IpAddr, i64)], now: i64) -> Result<usize, SpillError> {
        let mut all = self.read()?;
        let before = all.len() + grants.len();
        all.extend_from_slice(grants);
        // Per address its latest expiry, and when it was queued last (of equal expiries,
        // the later login is kept).
        let mut latest: std::collections::HashMap<IpAddr, (i64, usize)> =
            std::collections::HashMap::with_capacity(all.len());
        for (pos, (ip, e)) in all.into_iter().enumerate() {
            let v = latest.entry(ip).or_insert((e, pos));
            *v = (v.0.max(e), pos);
        }
        let mut kept: Vec<(IpAddr, (i64, usize))> =
            latest.into_iter().filter(|&(_, (e, _))| e > now).collect();
        let expired = before - kept.len();
        let mut dropped = 0;
        // Oldest first, as they would have been replayed; the oldest go when too many.
        kept.sort_by_key(|&(_, key)| key);
        if kept.len() > self.max {
            dropped = kept.len() - self.max;
            kept.drain(..dropped);
        }
        let kept: Vec<(IpAddr, i64)> = kept.into_iter().map(|(ip, (e, _))| (ip, e)).collect();
        let mut text = String::with_capacity(kept.len() * 32);
        for &(ip, e) in &kept {
            text.push_str(&format!("{} {e}\n", key_text(ip)));
        }
        let tmp = self.path.with_extension("tmp");
        let io = |e: std::io::Error| io_err(&tmp, "cannot write", e);
        {
            let mut f = File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, "cannot replace", e))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.file = open_append(&self.path)?;
        self.len = kept.len();
        tracing::debug!(
            merged = expired,
            dropped,
            kept = kept.len(),
            "spill queue merged"
        );
        Ok(dropped)
    }

    /// Everything waiting, in order.
    pub fn read(&mut self) -> Result<Vec<(IpAddr, i64)>, SpillError> {
        let io = |e: std::io::Error| io_err(&self.path, "cannot read", e);
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut out = Vec::new();
        let mut reader = BufReader::new(&self.file);
        let mut line = String::new();
        loop {
            line.clear();
            // Lines are short; a longer one is damage, skipped by the parse below.
            if reader.read_line(&mut line).map_err(io)? == 0 {
                break;
            }
            let parsed = line
                .trim_end()
                .split_once(' ')
                .and_then(|(a, e)| Some((parse_address(a)?, e.parse::<i64>().ok()?)));
            match parsed {
                Some(g) => out.push(g),
                None => {
                    tracing::warn!(file = %self.path.display(), "skipping a damaged spill line")
                }
            }
        }
        Ok(out)
    }

    /// Empties the queue after its grants reached the database.
    pub fn clear(&mut self) -> Result<(), SpillError> {
        let io = |e: std::io::Error| io_err(&self.path, "cannot truncate", e);
        self.file.set_len(0).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len = 0;
        Ok(())
    }
}

fn io_err(path: &Path, what: &'static str, source: std::io::Error) -> SpillError {
    SpillError {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn open_append(path: &Path) -> Result<File, SpillError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io_err(path, "cannot open", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_durable_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let mut s = Spill::open(dir.path(), 3).unwrap();
        s.push(&[(a, 10), (b, 20)], 0).unwrap();
        // Full: merged, a later grant for the same address supersedes the older one.
        assert_eq!(s.push(&[(a, 30), (b, 40)], 0).unwrap(), 0);
        assert_eq!(s.read().unwrap(), vec![(a, 30), (b, 40)]);
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let d: IpAddr = "192.0.2.4".parse().unwrap();
        // Still full after merging: the grant expiring first goes; expired ones first.
        assert_eq!(s.push(&[(c, 50), (d, 60)], 35).unwrap(), 0);
        assert_eq!(s.read().unwrap(), vec![(b, 40), (c, 50), (d, 60)]);
        assert_eq!(s.push(&[(a, 70)], 35).unwrap(), 1);
        assert_eq!(s.read().unwrap(), vec![(c, 50), (d, 60), (a, 70)]);
        s.clear().unwrap();
        s.push(&[(a, 10), (b, 20)], 0).unwrap();
        drop(s);
        // A torn line from a crash is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("spill/queue"))
            .unwrap();
        f.write_all(b"192.0.2.9 12").unwrap();
        let mut s = Spill::open(dir.path(), 3).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.read().unwrap(), vec![(a, 10), (b, 20)]);
        s.clear().unwrap();
        assert!(s.is_empty());
        s.push(&[(b, 50)], 0).unwrap();
        s.push(&[(a, 60)], 0).unwrap();
        assert_eq!(s.read().unwrap(), vec![(b, 50), (a, 60)]);
    }
}
