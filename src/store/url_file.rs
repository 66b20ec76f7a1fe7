//! The database URL file (`store.postgres_url_file`, `store.mysql_url_file`): one URL with
//! the password in it, so refused when every user may read it, and read with a bound.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The most a URL file may hold.
pub const MAX_URL_FILE: u64 = 4096;

/// Why the URL file cannot be used; one line naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum UrlFileError {
    #[error("{}: cannot read: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: is readable by every user (mode {mode:o}) but holds the database password; chmod 0600 (or 0640 with the service's group)", .path.display())]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error("{}: larger than {MAX_URL_FILE} bytes; it must hold one URL", .path.display())]
    TooLarge { path: PathBuf },
    #[error(transparent)]
    Read(#[from] crate::fsread::ReadError),
}

/// Why the URL in the file cannot be used; one line naming the file and the fix, never the
/// URL itself (it holds the password).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(transparent)]
    File(#[from] UrlFileError),
    #[error("{}: is empty; write one URL like {example}", .file.display())]
    Empty {
        file: PathBuf,
        example: &'static str,
    },
    /// Not a URL of this database; `why`: the parser's reason, when it cannot hold the URL.
    #[error("{}: not a {kind} URL like {example}{}", .file.display(), .why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default())]
    NotAUrl {
        file: PathBuf,
        kind: &'static str,
        example: &'static str,
        why: Option<String>,
    },
    #[error("{}: the URL names no host", .file.display())]
    NoHost { file: PathBuf },
    #[error("{}: the URL names no database ({example})", .file.display())]
    NoDatabase {
        file: PathBuf,
        example: &'static str,
    },
    #[error("{}: sslmode={mode} is not one of disable, prefer, require, verify-ca, verify-full", .file.display())]
    SslMode { file: PathBuf, mode: String },
    #[error("{}: sslrootcert without require_ssl=true", .file.display())]
    RootCertWithoutTls { file: PathBuf },
    #[error("{}: sslrootcert {cert}: cannot read: {source}", .file.display())]
    RootCertUnreadable {
        file: PathBuf,
        cert: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: sslrootcert {cert}: cannot read PEM certificates: {why}", .file.display())]
    RootCertNotPem {
        file: PathBuf,
        cert: String,
        why: String,
    },
    #[error("{}: sslrootcert {cert}: no certificate in the file", .file.display())]
    RootCertEmpty { file: PathBuf, cert: String },
}

/// The file's text, trimmed.
pub fn read(path: &Path) -> Result<String, UrlFileError> {
    let meta = std::fs::metadata(path).map_err(|source| UrlFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(UrlFileError::WorldReadable {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    if meta.len() > MAX_URL_FILE {
        return Err(UrlFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    // Bounded again on the read itself: the file may change after the stat above.
    let text = crate::fsread::read_text(path, MAX_URL_FILE, crate::fsread::Links::Follow)?;
    Ok(text.trim().to_string())
}
