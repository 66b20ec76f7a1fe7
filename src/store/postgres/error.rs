//! PostgreSQL failures that keep their cause: callers tell an outage (retry, spill) from
//! refused data or a configuration mistake by the variant, not by message text.

use std::path::PathBuf;

/// Why talking to the database (or keeping its spill queue) failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL file or TLS settings: the administrator fixes the configuration.
    #[error("{0}")]
    Config(String),
    /// The URL file itself (missing, readable by every user, too large).
    #[error(transparent)]
    UrlFile(#[from] crate::store::url_file::UrlFileError),
    /// `sslmode=` names no mode dovegate knows.
    #[error("{}: sslmode={mode} is not one of disable, prefer, require, verify-ca, verify-full", .file.display())]
    SslMode { file: PathBuf, mode: String },
    /// A statement or connection failed; `what` names what was being done.
    #[error("{what}: {}", super::error_text(.source))]
    Db {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No answer within the bound (a hung database).
    #[error("{what}: no answer within {secs}s")]
    Timeout { what: String, secs: u64 },
    /// The schema in the database is newer than this program: not an outage, an upgrade.
    #[error(transparent)]
    NewerSchema(NewerSchema),
    /// The spill queue file.
    #[error("{}: {what}: {source}", .path.display())]
    Spill {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The writer's worker thread did not take or answer a request.
    #[error("the PostgreSQL worker {0}")]
    Worker(&'static str),
    /// The connection ended under us (the server closed it, the network failed); the
    /// caller reconnects.
    #[error("connection lost: {0}")]
    Lost(String),
    /// Not connected now (the worker retries in the background).
    #[error("database unreachable: {0}")]
    Unreachable(String),
}

/// The database holds a schema version this dovegate does not know (another host was
/// upgraded first). Kept in the status files so that `status` says so, not "unreachable".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
#[error(
    "the database's schema {found} is newer than this dovegate knows ({known}); upgrade dovegate"
)]
pub struct NewerSchema {
    pub found: i32,
    pub known: i32,
}

impl PgError {
    /// The newer schema this error is about, if it is one.
    pub fn newer_schema(&self) -> Option<NewerSchema> {
        match self {
            PgError::NewerSchema(n) => Some(*n),
            _ => None,
        }
    }

    pub fn db(what: impl Into<String>, source: tokio_postgres::Error) -> PgError {
        PgError::Db {
            what: what.into(),
            source,
        }
    }

    /// True when the database refused the data (SQLSTATE class 22 data exception, 23
    /// integrity constraint): retrying the same rows fails the same way, unlike an outage.
    pub fn is_data_error(&self) -> bool {
        matches!(self, PgError::Db { source, .. } if super::is_data_error(source))
    }
}
