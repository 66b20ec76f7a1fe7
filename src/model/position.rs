//! Where a source stands: the part of a `Batch` that becomes true once its logins are
//! committed (then saved by `state`).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

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
