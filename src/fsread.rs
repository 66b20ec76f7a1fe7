//! Bounded reads of small files (configuration, state, status, secrets), like the log reader:
//! a link to /dev/zero, a FIFO or a multi-gigabyte file is refused with the path named,
//! never read into memory nor waited on.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The configuration file and the pattern files: far larger than any real one.
pub const CONFIG_MAX: u64 = 4 << 20;
/// Files the daemon itself writes (checkpoints, cursors, status and fleet files).
pub const STATE_MAX: u64 = 1 << 20;
/// The saved open sessions: a few hundred bytes each; a busy server holds tens of thousands.
pub const SESSIONS_MAX: u64 = 64 << 20;
/// A file holding one secret or URL.
pub const SECRET_MAX: u64 = 64 << 10;

/// Whether a symbolic link at the path itself is followed. The configuration and secrets
/// may be links an administrator made; state files are written by the daemon and renamed
/// into place, so a link there was planted by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    Follow,
    Refuse,
}

#[derive(Debug)]
pub enum ReadError {
    Open(PathBuf, io::Error),
    NotRegular(PathBuf, &'static str),
    TooLarge(PathBuf, u64),
    Read(PathBuf, io::Error),
    NotText(PathBuf),
}

impl ReadError {
    /// The file does not exist: for optional files, not an error.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Open(_, e) if e.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Open(p, e) if e.raw_os_error() == Some(libc::ELOOP) => write!(
                f,
                "{}: is a symbolic link; refusing to follow it (remove it: the daemon writes this file itself)",
                p.display()
            ),
            ReadError::Open(p, e) => write!(f, "{}: cannot open: {e}", p.display()),
            ReadError::NotRegular(p, kind) => write!(
                f,
                "{}: is a {kind}, not a regular file; refusing to read it",
                p.display()
            ),
            ReadError::TooLarge(p, max) => write!(
                f,
                "{}: larger than {max} bytes; refusing to read it",
                p.display()
            ),
            ReadError::Read(p, e) => write!(f, "{}: cannot read: {e}", p.display()),
            ReadError::NotText(p) => write!(f, "{}: is not UTF-8 text", p.display()),
        }
    }
}

impl std::error::Error for ReadError {}

/// What kind of non-regular file `t` is, in words (for errors naming the path).
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Reads at most `max` bytes of the regular file at `path`.
pub fn read(path: &Path, max: u64, links: Links) -> Result<Vec<u8>, ReadError> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| ReadError::Open(path.to_path_buf(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| ReadError::Read(path.to_path_buf(), e))?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(
            path.to_path_buf(),
            kind_of(meta.file_type()),
        ));
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge(path.to_path_buf(), max));
    }
    // The size may grow between fstat and read: read one byte past the bound to tell.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Read(path.to_path_buf(), e))?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge(path.to_path_buf(), max));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
pub fn read_text(path: &Path, max: u64, links: Links) -> Result<String, ReadError> {
    String::from_utf8(read(path, max, links)?).map_err(|_| ReadError::NotText(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn reads_a_small_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "hello").unwrap();
        assert_eq!(read_text(&p, 10, Links::Refuse).unwrap(), "hello");
        assert_eq!(read_text(&p, 5, Links::Refuse).unwrap(), "hello");
    }

    #[test]
    fn refuses_a_file_over_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "hello!").unwrap();
        let e = read(&p, 5, Links::Follow).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge(..)), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn refuses_dev_zero_promptly() {
        let e = read(Path::new("/dev/zero"), 1 << 20, Links::Follow).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero: is a character device, not a regular file; refusing to read it"
        );
    }

    #[test]
    fn refuses_a_fifo_without_waiting_for_a_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = Instant::now();
        let e = read(&p, 100, Links::Follow).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("is a FIFO"), "{e}");
    }

    #[test]
    fn refuses_a_link_where_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, "x").unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read(&link, 100, Links::Refuse).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(read(&link, 100, Links::Follow).unwrap(), b"x");
        assert!(read(&d.path().join("none"), 1, Links::Refuse)
            .unwrap_err()
            .is_not_found());
    }
}
