//! Where a followed file was read up to, kept in the state directory.
//!
//! A checkpoint names each open generation of the file (the current one, and a rotated one
//! still being drained) by device, inode and a fingerprint of its first bytes, with the
//! offset after the last line whose grants are committed. It is written atomically (temp
//! file, fsync, rename) and only after the map commit that covers it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes at the start of a file that identify its content (inode numbers are reused).
pub const FINGERPRINT_BYTES: usize = 64;

/// Identity of one file generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// FNV-1a of the first `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fingerprint {
    pub len: u32,
    pub hash: u64,
}

impl Fingerprint {
    pub fn of_bytes(b: &[u8]) -> Fingerprint {
        let b = &b[..b.len().min(FINGERPRINT_BYTES)];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &x in b {
            h ^= u64::from(x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Fingerprint {
            len: b.len() as u32,
            hash: h,
        }
    }

    /// Reads the first bytes of `file` (positioned reads; the file offset is untouched).
    pub fn read(file: &File, len: usize) -> std::io::Result<Fingerprint> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; FINGERPRINT_BYTES];
        let want = len.min(FINGERPRINT_BYTES);
        let mut got = 0;
        while got < want {
            let n = file.read_at(&mut buf[got..want], got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(Fingerprint::of_bytes(&buf[..got]))
    }

    /// True when `file` still starts with the bytes this fingerprint was taken of.
    pub fn matches(&self, file: &File) -> std::io::Result<bool> {
        Ok(Fingerprint::read(file, self.len as usize)? == *self)
    }
}

/// One generation's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    pub id: FileId,
    pub fingerprint: Fingerprint,
    pub offset: u64,
}

/// A followed path's checkpoint: its generations, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub files: Vec<FilePos>,
}

/// A journal reader's position: the cursor of the last entry dealt with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCursor {
    /// Which journal: `system`, `dir:PATH` or `file:PATH`.
    pub journal: String,
    pub cursor: String,
}

/// Where a source stands, saved once the grants before it are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    File(Checkpoint),
    Journal(JournalCursor),
}

impl Checkpoint {
    /// Bytes written to the followed path after the checkpoint, when the path still names
    /// the current checkpointed generation (None: rotated since, or gone).
    pub fn lag(&self) -> Option<u64> {
        let meta = std::fs::metadata(&self.path).ok()?;
        let cur = self.files.last()?;
        (FileId::of(&meta) == cur.id).then(|| meta.len().saturating_sub(cur.offset))
    }
}

/// Reads and writes checkpoints under `<state>/checkpoints/`.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    /// `run --dry-run`: positions are read but never written (the real daemon owns them).
    read_only: bool,
}

fn file_name_for(path: &Path) -> String {
    file_name_with_prefix("", path)
}

fn file_name_with_prefix(prefix: &str, path: &Path) -> String {
    let fp = Fingerprint::of_bytes(path.as_os_str().as_encoded_bytes());
    // The hash only covers the first 64 bytes; add the length and a readable tail.
    let full = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(fp.hash, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let tail: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-' || *c == '_')
        .take(40)
        .collect();
    format!("{prefix}{tail}-{full:016x}.json")
}

impl CheckpointDir {
    pub fn new(state_dir: &Path) -> CheckpointDir {
        CheckpointDir {
            dir: state_dir.join("checkpoints"),
            read_only: false,
        }
    }

    /// Loads as `new` does; every save is a no-op (for `run --dry-run`).
    pub fn read_only(state_dir: &Path) -> CheckpointDir {
        CheckpointDir {
            read_only: true,
            ..CheckpointDir::new(state_dir)
        }
    }

    /// False in `run --dry-run`: nothing may be written to the state directory (other state
    /// savers, such as open sessions, ask here too).
    pub fn writes(&self) -> bool {
        !self.read_only
    }

    pub fn file_for(&self, path: &Path) -> PathBuf {
        self.dir.join(file_name_for(path))
    }

    /// The checkpoint of `path`, if one was saved. A corrupt file is reported and ignored.
    pub fn load(&self, path: &Path) -> Option<Checkpoint> {
        let f = self.file_for(path);
        let mut text = String::new();
        File::open(&f).ok()?.read_to_string(&mut text).ok()?;
        match serde_json::from_str::<Checkpoint>(&text) {
            Ok(c) if c.path == path => Some(c),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "ignoring unreadable checkpoint");
                None
            }
        }
    }

    /// Saves a file checkpoint atomically.
    pub fn save(&self, c: &Checkpoint) -> std::io::Result<()> {
        self.write_atomic(
            &self.file_for(&c.path),
            &serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?,
        )
    }

    /// The open mail sessions, saved beside the checkpoints (written just before them, so
    /// that a restart never misses a session whose login is behind a checkpoint).
    pub fn sessions_file(&self) -> PathBuf {
        self.dir.join("sessions.json")
    }

    pub fn save_sessions(&self, open: &[crate::session::OpenSession]) -> std::io::Result<()> {
        self.write_atomic(
            &self.sessions_file(),
            &serde_json::to_vec_pretty(open).map_err(std::io::Error::other)?,
        )
    }

    /// The saved sessions (none when absent; a corrupt file is reported and ignored).
    pub fn load_sessions(&self) -> Vec<crate::session::OpenSession> {
        let Ok(bytes) = std::fs::read(self.sessions_file()) else {
            return Vec::new();
        };
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %self.sessions_file().display(), error = %e, "ignoring unreadable sessions file; open sessions fall back to plain logins");
            Vec::new()
        })
    }

    /// What the daemon's session checks did, for `dovegate status` (written with the
    /// sessions).
    pub fn session_stats_file(&self) -> PathBuf {
        self.dir.join("session-stats.json")
    }

    pub fn save_session_stats(&self, stats: &crate::session::SessionStats) -> std::io::Result<()> {
        self.write_atomic(
            &self.session_stats_file(),
            &serde_json::to_vec_pretty(stats).map_err(std::io::Error::other)?,
        )
    }

    /// Where `dovegate sessions drop` leaves its requests for the running daemon (one small
    /// file each, holding a session id).
    pub fn session_drops_dir(&self) -> PathBuf {
        self.dir.join("session-drops")
    }

    /// Creates the requests directory (the daemon does, so that it owns it and may delete
    /// what an administrator writes there).
    pub fn prepare_session_drops(&self) {
        if !self.read_only {
            let _ = std::fs::create_dir_all(self.session_drops_dir());
        }
    }

    /// Leaves a request to drop session `id` for the daemon.
    pub fn request_session_drop(&self, id: &str) -> std::io::Result<PathBuf> {
        let dir = self.session_drops_dir();
        std::fs::create_dir_all(&dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("drop-{}-{nanos}", std::process::id());
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, id.as_bytes())?;
        let dest = dir.join(name);
        std::fs::rename(&tmp, &dest)?;
        Ok(dest)
    }

    /// The session ids asked to be dropped, each request removed as it is read (at most
    /// 1000 per call; odd files are removed unread).
    pub fn take_session_drops(&self) -> Vec<String> {
        if self.read_only {
            return Vec::new();
        }
        let Ok(rd) = std::fs::read_dir(self.session_drops_dir()) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for entry in rd.filter_map(Result::ok).take(1000) {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("drop-") {
                continue;
            }
            let path = entry.path();
            let mut text = String::new();
            let read = File::open(&path).and_then(|f| f.take(256).read_to_string(&mut text));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a session drop request; it is read again");
            }
            let id = text.trim();
            if read.is_ok() && crate::session::valid_id(id) {
                ids.push(id.to_string());
            }
        }
        ids
    }

    /// Saves any position atomically.
    pub fn save_position(&self, p: &Position) -> std::io::Result<()> {
        match p {
            Position::File(c) => self.save(c),
            Position::Journal(j) => self.write_atomic(
                &self.cursor_file_for(&j.journal),
                &serde_json::to_vec_pretty(j).map_err(std::io::Error::other)?,
            ),
        }
    }

    fn cursor_file_for(&self, journal: &str) -> PathBuf {
        self.dir
            .join(file_name_with_prefix("journal-", Path::new(journal)))
    }

    /// The saved cursor of a journal, if any.
    pub fn load_cursor(&self, journal: &str) -> Option<String> {
        let bytes = std::fs::read(self.cursor_file_for(journal)).ok()?;
        match serde_json::from_slice::<JournalCursor>(&bytes) {
            Ok(j) if j.journal == journal => Some(j.cursor),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(journal, error = %e, "ignoring unreadable journal cursor");
                None
            }
        }
    }

    /// Temp file, fsync, rename, fsync of the directory.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let tmp = dest.with_extension("json.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dest)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Every saved journal cursor.
    pub fn cursors(&self) -> Vec<JournalCursor> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("journal-") && n.ends_with(".json")
            })
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Every saved checkpoint (for `dovegate status`).
    pub fn all(&self) -> Vec<Checkpoint> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Checkpoint> = rd
            .filter_map(Result::ok)
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".json") && !n.starts_with("journal-")
            })
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a: &Checkpoint, b| a.path.cmp(&b.path));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        let c = Checkpoint {
            path: "/var/log/mail.log".into(),
            files: vec![FilePos {
                id: FileId { dev: 1, ino: 2 },
                fingerprint: Fingerprint::of_bytes(b"hello"),
                offset: 42,
            }],
        };
        cd.save(&c).unwrap();
        assert_eq!(cd.load(Path::new("/var/log/mail.log")), Some(c));
        assert_eq!(cd.load(Path::new("/var/log/other.log")), None);
        assert_ne!(
            cd.file_for(Path::new("/a/mail.log")),
            cd.file_for(Path::new("/b/mail.log"))
        );
        let j = Position::Journal(JournalCursor {
            journal: "system".into(),
            cursor: "s=1;i=2".into(),
        });
        cd.save_position(&j).unwrap();
        assert_eq!(cd.load_cursor("system").as_deref(), Some("s=1;i=2"));
        assert_eq!(cd.load_cursor("file:/x.journal"), None);
        assert_eq!(cd.all().len(), 1);
    }

    #[test]
    fn read_only_loads_but_never_writes() {
        let d = tempfile::tempdir().unwrap();
        let c = Checkpoint {
            path: "/var/log/mail.log".into(),
            files: vec![],
        };
        CheckpointDir::new(d.path()).save(&c).unwrap();
        let ro = CheckpointDir::read_only(d.path());
        assert!(!ro.writes());
        assert_eq!(ro.load(Path::new("/var/log/mail.log")), Some(c));
        let j = Position::Journal(JournalCursor {
            journal: "system".into(),
            cursor: "s=1".into(),
        });
        ro.save_position(&j).unwrap();
        assert_eq!(ro.load_cursor("system"), None);
        let other = tempfile::tempdir().unwrap();
        CheckpointDir::read_only(other.path())
            .save_position(&j)
            .unwrap();
        assert!(!other.path().join("checkpoints").exists());
    }
}
