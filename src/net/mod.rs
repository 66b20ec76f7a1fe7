//! The network layer: everything the daemon's servers (socketmap, push socket, auth-policy
//! endpoint, metrics) share, so that each keeps the same care and none drifts.
//!
//! It owns:
//! - `Listen`: where a server listens (`unix:/path`, `inet:ADDRESS:PORT`), parsed once.
//! - `socket_file`: the careful claim of a unix socket. A socket that answers is never
//!   unlinked (a second daemon on the same configuration refuses to start instead of
//!   taking the first one's socket); at stop a server unlinks only its own socket, by
//!   inode.
//! - `server`: one accept loop (`accept`, backing off when out of file descriptors) with
//!   bounded connection slots (`slots`): under pressure the stalest idle connection is
//!   evicted rather than the newcomer refused, so a local client cannot lock out Postfix,
//!   Dovecot or Prometheus by holding connections open.
//! - `bounds` and `http`: per-write time bounds, and HTTP/1 served by hyper with header,
//!   buffer and body bounds (and closing connections that do not prove themselves).
//! - `requests`: the clocks of a request/reply connection (idle, per request, per reply),
//!   for the socketmap and the policy server.
//! - `background`: the thread the servers Dovecot feeds run on (push, events).
//!
//! Log lines about events a peer can repeat at will are rate-limited with
//! `telemetry::ratelimit`, which every stage can import without importing `net`.
//! What a request means is each server's business (`serve`, `push`, `policy`); `net`
//! knows bytes and connections only, and imports no stage.

mod accept;
pub mod background;
pub mod bounds;
pub mod http;
pub mod peers;
pub mod requests;
mod server;
mod slots;
mod socket_file;

pub use crate::config::listen::{Listen, ListenError};
pub use server::{start, start_reporting, start_under, Conn, Handler, Peer, Server, Spec, Stream};

/// Why a server could not be started: the key at fault, where, and the system's reason.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its address could not be bound (taken, or a socket another server answers on).
    #[error("{key}: cannot listen on {listen}: {error}")]
    Listen {
        key: &'static str,
        listen: Listen,
        error: std::io::Error,
    },
    /// The thread or runtime the servers run on could not be started (out of resources).
    #[error("{what}: cannot start its {part}: {error}")]
    Spawn {
        what: &'static str,
        part: &'static str,
        error: std::io::Error,
    },
}

impl StartError {
    /// `Spawn` for the runtime of `what`.
    pub fn runtime(what: &'static str) -> impl FnOnce(std::io::Error) -> StartError {
        move |error| StartError::Spawn {
            what,
            part: "runtime",
            error,
        }
    }

    /// `Spawn` for the thread of `what`.
    pub fn thread(what: &'static str) -> impl FnOnce(std::io::Error) -> StartError {
        move |error| StartError::Spawn {
            what,
            part: "thread",
            error,
        }
    }
}

/// How the accept loop names its server in log lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Label {
    pub name: &'static str,
    /// The setting that bounds the server's connections, if there is one.
    pub max_key: Option<&'static str>,
}
