//! `[serve]`: the socketmap server's settings, validated (the server is `serve::socketmap`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::listen::Listen;

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketmapConfig {
    pub listen: Listen,
    /// Reply value per map name; others get `default_value`.
    pub values: BTreeMap<String, String>,
    pub default_value: String,
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// The longest a request may take from its first byte to its last, and a reply to be
/// written (`idle_timeout` lowers both). An honest client sends a request (under 1 KiB) in
/// one write and reads the reply at once; a client that trickles bytes or never reads would
/// otherwise hold a connection slot forever.
pub const MAX_REQUEST_TIME: Duration = Duration::from_secs(5);

impl SocketmapConfig {
    /// Time allowed for one request once its first byte has arrived, and for one reply.
    pub fn request_timeout(&self) -> Duration {
        self.idle_timeout.min(MAX_REQUEST_TIME)
    }
}
