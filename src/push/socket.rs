//! The post-login hook's socket: one request per connection, `IP<TAB>USER\n` (at most
//! 1 KiB), answered `OK\n` once the login is queued for the engine, or `ERR <why>\n`.
//! Only peers whose uid (SO_PEERCRED, from the kernel) is configured may push; anything
//! else is refused, counted and logged (rate-limited).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::Sink;
use crate::model::address::parse_any_ip;
use crate::net::bounds::Bounded;
use crate::net::{self, Conn, Handler, Listen, Peer, Server, Spec, Stream};

/// The longest request: an address, a tab, a user name, a newline.
pub const MAX_REQUEST: usize = 1024;
/// How long a pusher may take to send its line, and to take the reply (the hook itself
/// gives up after 200 ms).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_CONNECTIONS: usize = 64;

/// The post-login socket as a `net` server.
struct PushSocket {
    uids: Vec<u32>,
    sink: Sink,
}

impl Handler for PushSocket {
    async fn serve<S: Stream>(self: Arc<Self>, stream: S, _conn: Conn) {
        serve(stream, &self.uids, &self.sink).await
    }
}

/// Binds the socket (mode 0666: the peer's uid is what is checked) and serves it.
pub(crate) async fn bind(path: &Path, uids: Vec<u32>, sink: Sink) -> std::io::Result<Server> {
    let spec = Spec {
        name: "push socket",
        key: "push.socket",
        max_connections: MAX_CONNECTIONS,
        max_key: None,
        unix_mode: 0o666,
    };
    let listen = Listen::Unix(path.to_path_buf());
    let allowed = uids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let reporter = sink.reporter.server(spec.name);
    let handler = Arc::new(PushSocket { uids, sink });
    let server = net::start_reporting(&listen, spec, handler, reporter).await?;
    tracing::info!(socket = %path.display(), uids = %allowed, "push socket: logins accepted from these uids");
    Ok(server)
}

async fn serve<S: Stream>(stream: S, uids: &[u32], sink: &Sink) {
    let peer = match stream.peer() {
        Ok(Peer::Unix { uid, pid }) => (uid, pid),
        Ok(other) => {
            sink.refuse(&format!(
                "push socket: a peer without credentials ({other:?}); refused"
            ));
            return;
        }
        Err(e) => {
            sink.refuse(&format!(
                "push socket: cannot read the peer's credentials ({e}); refused"
            ));
            return;
        }
    };
    let mut stream = Bounded::new(stream, READ_TIMEOUT);
    if !uids.contains(&peer.0) {
        sink.refuse(&format!(
            "push socket: uid {} (pid {}) is not in push.users; refused",
            peer.0,
            peer.1
                .map_or_else(|| "unknown".to_string(), |p| p.to_string())
        ));
        let _ = stream.write_all(b"ERR not allowed\n").await;
        return;
    }
    let reply = match tokio::time::timeout(READ_TIMEOUT, read_line(&mut stream)).await {
        Ok(Some(line)) => match parse_request(&line) {
            Some((ip, user)) => {
                tracing::debug!(%ip, user = %user.escape_debug(), "login pushed by the post-login hook");
                if sink.push(ip).await {
                    "OK\n"
                } else {
                    "ERR busy\n"
                }
            }
            None => {
                sink.invalid(&format!(
                    "push socket: malformed request {:?}; nothing granted",
                    String::from_utf8_lossy(&line[..line.len().min(80)])
                ));
                "ERR malformed\n"
            }
        },
        Ok(None) => {
            sink.invalid("push socket: request too long or not terminated; nothing granted");
            "ERR malformed\n"
        }
        Err(_) => {
            sink.invalid("push socket: request not sent within 1s; nothing granted");
            return;
        }
    };
    let _ = stream.write_all(reply.as_bytes()).await;
}

/// Reads up to the first newline (excluded); None when the peer closes first or the line
/// would exceed MAX_REQUEST.
async fn read_line(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memchr(b'\n', &buf) {
            buf.truncate(end);
            return Some(buf);
        }
        if buf.len() >= MAX_REQUEST {
            return None;
        }
    }
}

/// `IP<TAB>USER`: the address in any textual form Dovecot prints, canonicalised. The user
/// is only logged.
pub fn parse_request(line: &[u8]) -> Option<(std::net::IpAddr, String)> {
    if line.len() >= MAX_REQUEST {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let (ip, user) = text.split_once('\t').unwrap_or((text, ""));
    if ip.is_empty() || ip.len() > 64 || ip.contains(char::is_whitespace) {
        return None;
    }
    Some((parse_any_ip(ip)?, user.to_string()))
}

/// The request line the hook sends (tabs and newlines in the user name would break it:
/// they become spaces).
pub fn request_line(ip: &str, user: &str) -> Vec<u8> {
    let user: String = user
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(256)
        .collect();
    format!("{ip}\t{user}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(
            parse_request(b"192.0.2.7\talice"),
            Some((ip("192.0.2.7"), "alice".into()))
        );
        assert_eq!(
            parse_request(b"::ffff:192.0.2.7\t"),
            Some((ip("192.0.2.7"), "".into()))
        );
        assert_eq!(
            parse_request(b"2001:DB8::1\tbob"),
            Some((ip("2001:db8::1"), "bob".into()))
        );
        for bad in [
            &b""[..],
            b"\talice",
            b"example.org\tx",
            b"1.2.3.4 x\ty",
            b"\xff\tx",
            b"unknown",
        ] {
            assert_eq!(parse_request(bad), None, "{bad:?}");
        }
        assert_eq!(parse_request(&[b'1'; 2000]), None);
        assert_eq!(request_line("192.0.2.7", "a\tb\nc"), b"192.0.2.7\ta b c\n");
    }
}
