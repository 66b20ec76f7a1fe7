//! Store failures that keep their cause, so that commands choose exit codes and the daemon
//! chooses its reaction (and its advice) by what went wrong, not by message text.

use std::io;

/// Why a store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The map does not exist (a wrong `map.path`, or `dovegate init` not run).
    Missing,
    /// An operating-system error of this kind (permission, disk full, read-only, ...).
    Io(io::ErrorKind),
    /// The map file was deleted, replaced or truncated under us and has been reopened:
    /// grants committed before may be gone, so the caller writes its live grants again.
    Reopened,
    /// The shared database (PostgreSQL, MariaDB) or its writer worker failed; the local
    /// map is fine.
    Database,
    /// Anything else (LMDB errors, a corrupt file).
    Other,
}

/// A store failure: one line naming the map, what was being done and what to do (`.0`),
/// and why (`.1`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String, pub Cause);

impl StoreError {
    pub fn new(message: impl Into<String>, cause: Cause) -> StoreError {
        StoreError(message.into(), cause)
    }

    pub fn cause(&self) -> Cause {
        self.1
    }

    pub fn other(message: impl Into<String>) -> StoreError {
        StoreError::new(message, Cause::Other)
    }

    /// `FILE: WHAT: ERROR`, with advice for the causes an administrator can fix.
    pub fn io(file: &std::path::Path, what: &str, e: &io::Error) -> StoreError {
        let kind = e.kind();
        let mut message = format!("{}: {what}: {e}", file.display());
        if let Some(fix) = advice(kind) {
            message.push_str("; ");
            message.push_str(fix);
        }
        StoreError::new(message, Cause::Io(kind))
    }

    /// An LMDB error: errno values keep their kind.
    pub fn lmdb(file: &std::path::Path, what: &str, e: lmdb::Error) -> StoreError {
        match e {
            lmdb::Error::Other(code) if code > 0 => {
                StoreError::io(file, what, &io::Error::from_raw_os_error(code))
            }
            e => StoreError::new(format!("{}: {what}: {e}", file.display()), Cause::Other),
        }
    }

    /// The error is the operating system's and the administrator can fix it (permission,
    /// disk full): a runtime failure, not a configuration mistake.
    pub fn is_io(&self) -> bool {
        matches!(self.1, Cause::Io(_))
    }
}

/// What to do about an I/O error on the map.
fn advice(kind: io::ErrorKind) -> Option<&'static str> {
    match kind {
        io::ErrorKind::PermissionDenied => Some(
            "run as root or as the map's owner (the daemon's user), or fix the file's owner and mode (0640, group postfix)",
        ),
        io::ErrorKind::StorageFull => Some(
            "the map's filesystem is full: free space there now; expired grants cannot be removed until then",
        ),
        io::ErrorKind::ReadOnlyFilesystem => {
            Some("the map's filesystem is read-only: remount it read-write")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_keeps_its_kind_and_advice() {
        let e = StoreError::lmdb(
            std::path::Path::new("/m.lmdb"),
            "write failed",
            lmdb::Error::Other(libc::ENOSPC),
        );
        assert_eq!(e.cause(), Cause::Io(io::ErrorKind::StorageFull));
        assert!(e.0.starts_with("/m.lmdb: write failed"), "{e}");
        assert!(e.0.contains("free space"), "{e}");
        let e = StoreError::lmdb(std::path::Path::new("/m"), "x", lmdb::Error::MapFull);
        assert_eq!(e.cause(), Cause::Other);
    }
}
