//! What the shared databases (PostgreSQL, MariaDB) have in common, whichever one a site
//! uses: the canonical address text read back, who wrote a grant, what an upsert did,
//! the rows a replica rereads, what a host reports of itself, a newer schema.

use std::net::IpAddr;

pub use crate::model::address::parse_key_text as parse_address;

/// What a writer or replica reports of itself (`dovegate_report`, schema 4).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `writer` or `replica`.
    pub role: &'static str,
    /// Which one on its host (its map).
    pub instance: String,
    pub spill_queue: Option<i64>,
    pub spill_dropped: Option<i64>,
    pub lag_secs: Option<f64>,
    pub grants: Option<i64>,
}

/// Who wrote a grant, for audit.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host: String,
    pub source: String,
}

impl Origin {
    pub fn this_host(source: &str) -> Origin {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let host = if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "unknown".into()
        };
        Origin {
            host,
            source: source.to_string(),
        }
    }
}

/// A grant whose login is at most this long after a revoke is refused too: a session
/// renewal in flight while the revoke spreads (a writer learns of it within a second) must
/// not write the grant back. A real login that close to a revoke logs in again.
pub const REVOKE_RACE_SECS: i64 = 2;

/// What an upsert did.
#[derive(Debug, Default, PartialEq)]
pub struct Upserted {
    /// Written, with the expiry the database keeps (its clock).
    pub written: Vec<(IpAddr, i64)>,
    /// Refused: revoked after the login that granted it.
    pub revoked: Vec<IpAddr>,
}

/// A changed row as a replica reads it back (`postgres::reread`, `mysql::changes_since`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reread {
    pub address: String,
    /// The effective expiry (no later than its `updated_at` + ttl nor the database's now
    /// + ttl).
    pub expires: i64,
    /// `updated_at`, unix seconds (for lag).
    pub updated: f64,
    /// Who wrote it (`granted_by`: the writer's host name; `source`: `dovecot` for a
    /// login, `dovegate-admin` for `dovegate grant`), for the audit trail.
    pub host: String,
    pub source: String,
}

/// The source `dovegate grant` writes (`Origin::source`).
pub const ADMIN_SOURCE: &str = "dovegate-admin";

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
