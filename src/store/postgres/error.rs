//! PostgreSQL failures that keep their cause: callers tell an outage (retry, spill) from
//! refused data or a configuration mistake by the variant, not by message text.

use crate::store::shared::NewerSchema;

/// Why talking to the database (or keeping its spill queue) failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL file or the URL in it: the administrator fixes the configuration.
    #[error(transparent)]
    Url(#[from] crate::store::url_file::UrlError),
    /// No CA certificate to check the server's against.
    #[error("sslmode: no CA certificate found in the system store (/etc/ssl/certs); install ca-certificates or the database's CA")]
    NoCa,
    /// rustls refused the TLS settings.
    #[error("TLS set-up failed: {0}")]
    Tls(String),
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
    /// The connection ended under us (the server closed it, the network failed); the
    /// caller reconnects.
    #[error("connection lost: {0}")]
    Lost(String),
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
