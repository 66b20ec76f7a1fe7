//! DRAC's sockets: one UDP socket served by a loop that answers each datagram at once,
//! and a TCP listener on the `net` accept loop (bounded connection slots, idle and
//! per-request clocks) whose records are answered the same way. Neither ever waits for
//! the engine: `Intake::answer` only queues.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::{rpc, Intake};
use crate::config::drac::DracSettings;
use crate::net::requests::{self, Framed, Limits};
use crate::net::{self, Conn, Handler, Listen, Peer, Server, Spec, Stream};

/// The UDP port the last generation bound (0: none yet), for `drac.port = 0`.
static LAST_PORT: AtomicU16 = AtomicU16::new(0);

/// TCP connections served at once (DRAC clients call once and close).
const MAX_CONNECTIONS: usize = 64;
/// A TCP connection with no call for this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// A call must arrive whole, and its reply be taken, within this.
const REQUEST: Duration = Duration::from_secs(2);

/// Binds UDP and TCP on the same port when it is free (port 0: UDP's), and starts serving.
/// Returns the addresses bound (UDP, TCP) and the TCP server.
pub(super) async fn bind(
    settings: &DracSettings,
    intake: Arc<Intake>,
) -> io::Result<((SocketAddrV4, SocketAddrV4), Vec<Server>)> {
    // Port 0: the port of the previous generation first, so that a reload keeps it (a
    // firewall rule written for it, clients holding it from rpcbind stay right).
    let last = LAST_PORT.load(Ordering::Relaxed);
    let udp = match (settings.port, last) {
        (0, last) if last != 0 => {
            match UdpSocket::bind(SocketAddrV4::new(settings.listen, last)).await {
                Ok(s) => s,
                Err(_) => UdpSocket::bind(SocketAddrV4::new(settings.listen, 0)).await?,
            }
        }
        (port, _) => UdpSocket::bind(SocketAddrV4::new(settings.listen, port)).await?,
    };
    let udp_addr = match udp.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => return Err(io::Error::other("the UDP socket is not IPv4")),
    };
    let spec = Spec {
        name: "DRAC (TCP)",
        key: "drac.listen",
        max_connections: MAX_CONNECTIONS,
        max_key: None,
        unix_mode: 0,
    };
    let handler = Arc::new(Tcp {
        intake: Arc::clone(&intake),
    });
    let same = Listen::Inet(SocketAddr::V4(udp_addr));
    let reporter = intake.reporter.server(spec.name);
    let tcp = match net::start_reporting(&same, spec, Arc::clone(&handler), reporter.clone()).await
    {
        Ok(s) => s,
        // The port UDP was given is taken for TCP: any other one (rpcbind tells clients).
        Err(_) if settings.port == 0 => {
            let any = Listen::Inet(SocketAddr::V4(SocketAddrV4::new(settings.listen, 0)));
            net::start_reporting(&any, spec, handler, reporter).await?
        }
        Err(e) => return Err(e),
    };
    let tcp_addr = match tcp.listen() {
        Listen::Inet(SocketAddr::V4(a)) => *a,
        other => return Err(io::Error::other(format!("TCP bound {other}"))),
    };
    LAST_PORT.store(udp_addr.port(), Ordering::Relaxed);
    tokio::spawn(serve_udp(udp, intake));
    Ok(((udp_addr, tcp_addr), vec![tcp]))
}

/// Answers datagrams until the runtime ends. A reply the socket cannot take at once is
/// dropped (the client retries), never waited for.
async fn serve_udp(socket: UdpSocket, intake: Arc<Intake>) {
    // One byte more than the longest call: a datagram that fills it is too long.
    let mut buf = vec![0u8; rpc::MAX_MESSAGE + 1];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                intake.receive_failed(&e);
                // A persistent error must not spin a core.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(reply) = intake.answer(&buf[..n], peer.ip()) {
            let _ = socket.try_send_to(&reply, peer);
        }
    }
}

struct Tcp {
    intake: Arc<Intake>,
}

impl Handler for Tcp {
    async fn serve<S: Stream>(self: Arc<Self>, stream: S, conn: Conn) {
        let peer: IpAddr = match stream.peer() {
            Ok(Peer::Inet(a)) => a.ip(),
            _ => return,
        };
        let limits = Limits {
            idle: IDLE,
            request: REQUEST,
            read_chunk: 2048,
        };
        let bounded = crate::net::bounds::Bounded::new(stream, REQUEST);
        requests::serve(
            bounded,
            limits,
            |buf| match record(buf) {
                Record::Incomplete => Framed::Incomplete,
                Record::Malformed => Framed::Malformed,
                Record::Whole { body, used } => match self.intake.answer(&body, peer) {
                    Some(reply) => Framed::Reply {
                        reply: marked(&reply),
                        used,
                    },
                    // Not a call: nothing to answer, and nothing after it to trust.
                    None => Framed::Malformed,
                },
            },
            || conn.progress(),
        )
        .await;
    }
}

/// One record of TCP record marking (RFC 5531 section 11).
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Incomplete,
    Malformed,
    /// The fragments' bodies joined, and the bytes of `buf` they took.
    Whole {
        body: Vec<u8>,
        used: usize,
    },
}

/// Fragments in one record at most (a client sends one; empty fragments must not let a
/// record grow without bound).
const MAX_FRAGMENTS: usize = 16;

/// The first record in `buf`: fragments until the last, at most `rpc::MAX_MESSAGE` bytes
/// of body and `MAX_FRAGMENTS` fragments in all.
pub fn record(buf: &[u8]) -> Record {
    let mut body = Vec::new();
    let mut at = 0usize;
    for _ in 0..MAX_FRAGMENTS {
        let Some(mark) = buf.get(at..at + 4) else {
            return Record::Incomplete;
        };
        let mark = u32::from_be_bytes([mark[0], mark[1], mark[2], mark[3]]);
        let len = (mark & !rpc::LAST_FRAGMENT) as usize;
        if body.len() + len > rpc::MAX_MESSAGE {
            return Record::Malformed;
        }
        let Some(fragment) = buf.get(at + 4..at + 4 + len) else {
            return Record::Incomplete;
        };
        body.extend_from_slice(fragment);
        at += 4 + len;
        if mark & rpc::LAST_FRAGMENT != 0 {
            return Record::Whole { body, used: at };
        }
    }
    Record::Malformed
}

/// A reply as one last fragment.
fn marked(reply: &[u8]) -> Vec<u8> {
    let mut out = (rpc::LAST_FRAGMENT | reply.len() as u32)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(reply);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        assert_eq!(record(&[0x80, 0, 0]), Record::Incomplete);
        assert_eq!(record(&[0x80, 0, 0, 2, 1]), Record::Incomplete);
        assert_eq!(
            record(&[0x80, 0, 0, 2, 1, 2, 9]),
            Record::Whole {
                body: vec![1, 2],
                used: 6
            }
        );
        // Two fragments make one record.
        assert_eq!(
            record(&[0, 0, 0, 1, 7, 0x80, 0, 0, 1, 8]),
            Record::Whole {
                body: vec![7, 8],
                used: 10
            }
        );
        assert_eq!(record(&[0x80, 0, 0x10, 0]), Record::Malformed);
        // Many small fragments cannot grow a record past the bound.
        let mut many = Vec::new();
        for _ in 0..2000 {
            many.extend_from_slice(&[0, 0, 0, 1, 0]);
        }
        assert_eq!(record(&many), Record::Malformed);
        assert_eq!(record(&[0; 4 * 17]), Record::Malformed);
        assert_eq!(marked(&[1, 2]), vec![0x80, 0, 0, 2, 1, 2]);
    }
}
