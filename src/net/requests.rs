//! Connections that carry requests and replies (the socketmap, the policy server): what
//! a request is belongs to the server; the clocks and bounds of the connection are here,
//! so that both keep them alike.
//!
//! A connection waits at most `idle` for a request to begin; a request must be complete
//! within `request` of its first byte, and each reply written within `request` too. An
//! honest client (Postfix, sendmail) sends a request in one write and reads its reply at
//! once; one that trickles bytes or never reads would otherwise hold a connection slot
//! forever. Requests are answered in order, every complete one already read at once.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Why a server closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or a read or write failed.
    Peer,
    /// No request began within the idle time.
    Idle,
    /// A request did not complete within the request time.
    SlowRequest,
    /// A reply could not be written within the request time (the client does not read).
    SlowReader,
    /// Not a request of the protocol, or too long.
    Malformed,
}

/// What the server makes of the bytes read and not yet answered.
pub enum Framed {
    /// The first `used` bytes are a request; `reply` answers it.
    Reply { reply: Vec<u8>, used: usize },
    /// No complete request yet (the server bounds how long one may grow).
    Incomplete,
    /// Not a request: the connection is closed without a reply.
    Malformed,
}

/// A connection's clocks and read size.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub request: Duration,
    /// Bytes read at once: the most requests answered before the next read.
    pub read_chunk: usize,
}

/// Serves one connection until the peer closes it, goes idle, is too slow to send a
/// request or to take a reply, or sends something malformed. `answer` is given the bytes
/// not yet answered; `progress` is called when a request begins and after each reply (so
/// that a connection in use is never the stalest, see `slots`).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    limits: Limits,
    mut answer: impl FnMut(&[u8]) -> Framed,
    mut progress: impl FnMut(),
) -> Closed {
    let mut buf: Vec<u8> = Vec::with_capacity(limits.read_chunk);
    let mut chunk = vec![0u8; limits.read_chunk];
    // When the first byte of the request being read arrived; None while between requests.
    let mut started: Option<Instant> = None;
    loop {
        loop {
            match answer(&buf) {
                Framed::Reply { reply, used } => {
                    buf.drain(..used);
                    match tokio::time::timeout(limits.request, stream.write_all(&reply)).await {
                        Ok(Ok(())) => progress(),
                        Ok(Err(_)) => return Closed::Peer,
                        Err(_) => return Closed::SlowReader,
                    }
                    // Bytes of the next request are here already: its clock starts now.
                    started = (!buf.is_empty()).then(Instant::now);
                }
                Framed::Incomplete => break,
                Framed::Malformed => return Closed::Malformed,
            }
        }
        let read = stream.read(&mut chunk);
        let read = match started {
            None => tokio::time::timeout(limits.idle, read)
                .await
                .map_err(|_| Closed::Idle),
            Some(t) => tokio::time::timeout_at(t + limits.request, read)
                .await
                .map_err(|_| Closed::SlowRequest),
        };
        match read {
            Err(why) => return why,
            Ok(Ok(0)) | Ok(Err(_)) => return Closed::Peer,
            Ok(Ok(n)) => {
                if started.is_none() {
                    started = Some(Instant::now());
                    progress();
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}
