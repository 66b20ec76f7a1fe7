//! The map file as the operating system sees it: which file it is, how long it is, its
//! disk blocks, and its descriptors' close-on-exec flag.
//!
//! Postfix obeys the file at the map's path, not the one we opened: a file deleted,
//! replaced or truncated under us must be noticed before we commit into it (or read pages
//! that no longer exist, which is SIGBUS on a memory map).

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Device and inode: the identity of a file, whatever its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What happened to the map file since we opened it, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFault {
    Deleted,
    Replaced,
    Truncated { from: u64, to: u64 },
}

impl std::fmt::Display for FileFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileFault::Deleted => f.write_str("was deleted"),
            FileFault::Replaced => f.write_str("was replaced by another file"),
            FileFault::Truncated { from, to } => {
                write!(f, "was truncated from {from} to {to} bytes")
            }
        }
    }
}

/// Compares the file at `path` with the open `file` (`ident`), and the open file's length
/// with the longest length seen (`known_len`; LMDB never shrinks its file). Updates
/// `known_len` when the file grew.
pub fn check(
    path: &Path,
    file: &File,
    ident: FileIdentity,
    known_len: &mut u64,
) -> io::Result<Option<FileFault>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(FileFault::Deleted)),
        Err(e) => return Err(e),
        Ok(m) if FileIdentity::of(&m) != ident => return Ok(Some(FileFault::Replaced)),
        Ok(_) => {}
    }
    let len = file.metadata()?.len();
    if len < *known_len {
        return Ok(Some(FileFault::Truncated {
            from: *known_len,
            to: len,
        }));
    }
    *known_len = len;
    Ok(None)
}

/// Reserves disk blocks for the first `len` bytes without changing the file's length, so
/// that LMDB's copy-on-write pages (a delete writes new pages too) never need a block the
/// disk does not have: expiries keep working on a full disk.
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, len) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Sets FD_CLOEXEC on `fd`: the map must not stay open in children (journalctl), which
/// would keep a deleted map's blocks and hold its locks' file open.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on an fd we own; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Drops this process's resident pages of its read-only shared mappings of the file with
/// inode `ident` (LMDB's memory map). A full listing touches every page of the map, which
/// would then count in the daemon's RSS for nothing; the pages stay in the page cache and
/// are mapped again on the next access. Only `r--s` mappings are touched: dropping pages
/// of a read-only shared file mapping loses nothing.
pub fn release_mapped_pages(ident: FileIdentity) {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        // start-end perms offset dev inode [path]
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(_), Some(_), Some(ino)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        if perms != "r--s" || ino.parse::<u64>().ok() != Some(ident.ino) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: a page-aligned range of our own read-only shared file mapping, as the
        // kernel listed it; MADV_DONTNEED there only drops page-table entries.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}
