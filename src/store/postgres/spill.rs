//! The spill queue: grants committed while the database was unreachable, kept on disk
//! (fsynced before the commit counts) until they are written to the database.
//!
//! One file, `STATE/spill/queue`, one grant per line (`address expiry`), appended in
//! commit order and replayed in that order. Replaying twice is harmless (the database
//! keeps the later expiry), so a crash mid-replay only replays again. A torn last line
//! (crash mid-append) is skipped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::parse_address;
use crate::grant::key_text;

/// The bounded, durable queue.
pub struct Spill {
    path: PathBuf,
    file: File,
    len: usize,
    max: usize,
}

impl Spill {
    /// Opens (creating) `DIR/spill/queue` and counts what an earlier run left.
    pub fn open(state_dir: &Path, max: usize) -> Result<Spill, String> {
        let dir = state_dir.join("spill");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let path = dir.join("queue");
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
        // A torn last line (crash mid-append) is cut off, so the next append starts a line.
        let text =
            std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(file = %path.display(), "cutting off a torn spill line");
            file.set_len(whole as u64)
                .map_err(|e| format!("{}: cannot truncate: {e}", path.display()))?;
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

    /// Appends grants and fsyncs; refuses (writing nothing) when they would not fit.
    pub fn push(&mut self, grants: &[(IpAddr, i64)]) -> Result<(), String> {
        if self.len + grants.len() > self.max {
            return Err(format!(
                "{}: spill queue full ({} of {} grants waiting for the database); the commit is refused and retried",
                self.path.display(),
                self.len,
                self.max
            ));
        }
        let mut text = String::with_capacity(grants.len() * 32);
        for &(ip, e) in grants {
            text.push_str(&format!("{} {e}\n", key_text(ip)));
        }
        let io = |e: std::io::Error| format!("{}: cannot write: {e}", self.path.display());
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len += grants.len();
        Ok(())
    }

    /// Everything waiting, in order.
    pub fn read(&mut self) -> Result<Vec<(IpAddr, i64)>, String> {
        let io = |e: std::io::Error| format!("{}: cannot read: {e}", self.path.display());
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
    pub fn clear(&mut self) -> Result<(), String> {
        let io = |e: std::io::Error| format!("{}: cannot truncate: {e}", self.path.display());
        self.file.set_len(0).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len = 0;
        Ok(())
    }
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
        s.push(&[(a, 10), (b, 20)]).unwrap();
        assert!(s.push(&[(a, 30), (b, 40)]).unwrap_err().contains("full"));
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
        s.push(&[(b, 50)]).unwrap();
        s.push(&[(a, 60)]).unwrap();
        assert_eq!(s.read().unwrap(), vec![(b, 50), (a, 60)]);
    }
}
