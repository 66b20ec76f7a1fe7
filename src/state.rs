//! The state directory's files: where each followed file was read up to (checkpoints), the
//! journal cursor, the open sessions and the requests to drop one.
//!
//! A checkpoint names each open generation of the file (the current one, and a rotated one
//! still being drained) by device, inode and a fingerprint of its first bytes, with the
//! offset after the last line whose grants are committed. It is written atomically (temp
//! file, fsync, rename) and only after the map commit that covers it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::fsread::{self, Links};
pub use crate::model::position::{
    Checkpoint, FileId, FilePos, Fingerprint, JournalCursor, Position, FINGERPRINT_BYTES,
};

/// A state file's bytes: None when absent, or when refused (a link, a device, a FIFO, too
/// large: reported, never read into memory nor waited on).
fn read_state(path: &Path, max: u64) -> Option<Vec<u8>> {
    match fsread::read(path, max, Links::Refuse) {
        Ok(b) => Some(b),
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a state file");
            None
        }
    }
}

/// The saved open sessions, from the bytes of `sessions.json`.
pub fn parse_sessions(
    bytes: &[u8],
) -> Result<Vec<crate::model::saved::OpenSession>, serde_json::Error> {
    serde_json::from_slice(bytes)
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
        let bytes = read_state(&f, fsread::STATE_MAX)?;
        match serde_json::from_slice::<Checkpoint>(&bytes) {
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

    pub fn save_sessions(&self, open: &[crate::model::saved::OpenSession]) -> std::io::Result<()> {
        self.write_atomic(
            &self.sessions_file(),
            &serde_json::to_vec_pretty(open).map_err(std::io::Error::other)?,
        )
    }

    /// The saved sessions (none when absent; a corrupt file is reported and ignored).
    pub fn load_sessions(&self) -> Vec<crate::model::saved::OpenSession> {
        let Some(bytes) = read_state(&self.sessions_file(), fsread::SESSIONS_MAX) else {
            return Vec::new();
        };
        parse_sessions(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %self.sessions_file().display(), error = %e, "ignoring unreadable sessions file; open sessions fall back to plain logins");
            Vec::new()
        })
    }

    /// What the daemon's session checks did, for `dovegate status` (written with the
    /// sessions).
    pub fn session_stats_file(&self) -> PathBuf {
        self.dir.join("session-stats.json")
    }

    pub fn save_session_stats(
        &self,
        stats: &crate::model::saved::SessionStats,
    ) -> std::io::Result<()> {
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
            // Bounded, no link followed: the directory is the daemon's own.
            let read = fsread::read_text(&path, 256, Links::Refuse);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a session drop request; it is read again");
            }
            if let Ok(id) = read.as_deref().map(str::trim) {
                if crate::model::valid_id(id) {
                    ids.push(id.to_string());
                }
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
        let bytes = read_state(&self.cursor_file_for(journal), fsread::STATE_MAX)?;
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
            .filter_map(|e| read_state(&e.path(), fsread::STATE_MAX))
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
            .filter_map(|e| read_state(&e.path(), fsread::STATE_MAX))
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

    /// A sessions file that is a link to /dev/zero took the daemon to 10 GB of memory.
    #[test]
    fn a_sessions_file_that_is_not_a_regular_file_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        std::fs::create_dir_all(d.path().join("checkpoints")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", cd.sessions_file()).unwrap();
        let started = std::time::Instant::now();
        assert!(cd.load_sessions().is_empty());
        // Refused, not read until memory runs out (std's read gives up with an error once
        // an allocation fails, so the time and the peak memory tell).
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        assert!(
            usage.ru_maxrss < 512 << 10,
            "peak RSS {} KiB",
            usage.ru_maxrss
        );
        std::fs::remove_file(cd.sessions_file()).unwrap();
        std::os::unix::fs::symlink("/dev/zero", cd.file_for(Path::new("/var/log/x"))).unwrap();
        assert_eq!(cd.load(Path::new("/var/log/x")), None);
        assert!(cd.all().is_empty());
    }
}
