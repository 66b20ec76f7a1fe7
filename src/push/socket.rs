//! The post-login hook's socket: one request per connection, `IP<TAB>USER\n` (at most
//! 1 KiB), answered `OK\n` once the login is queued for the engine, or `ERR <why>\n`.
//! Only peers whose uid (SO_PEERCRED, from the kernel) is configured may push; anything
//! else is refused, counted and logged (rate-limited).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::Sink;
use crate::grant::parse_any_ip;

/// The longest request: an address, a tab, a user name, a newline.
pub const MAX_REQUEST: usize = 1024;
/// How long a pusher may take to send its line (the hook itself gives up after 200 ms).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_CONNECTIONS: usize = 64;

/// A server future, bound and ready to run.
pub type Server = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Binds the socket (mode 0666: the peer's uid is what is checked) and returns its loop.
pub(crate) async fn bind(path: &Path, uids: Vec<u32>, sink: Sink) -> std::io::Result<Server> {
    super::prepare_socket_dir(path)?;
    super::remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    super::chmod_socket(path, 0o666)?;
    tracing::info!(socket = %path.display(), uids = %uids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "), "push socket listening");
    let path = path.to_path_buf();
    let uids = Arc::new(uids);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(Box::pin(async move {
        let _unlink = Unlink(path);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                sink.refused
                    .warn("push socket: too many connections; one dropped");
                continue;
            };
            let (sink, uids) = (sink.clone(), Arc::clone(&uids));
            tokio::spawn(async move {
                serve(stream, &uids, &sink).await;
                drop(permit);
            });
        }
    }))
}

/// Removes the socket when the server stops.
pub(crate) struct Unlink(pub(crate) std::path::PathBuf);
impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = super::remove_stale_socket(&self.0);
    }
}

async fn serve(mut stream: UnixStream, uids: &[u32], sink: &Sink) {
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            sink.refuse(&format!(
                "push socket: cannot read the peer's credentials ({e}); refused"
            ));
            return;
        }
    };
    if !uids.contains(&peer.uid()) {
        sink.refuse(&format!(
            "push socket: uid {} (pid {}) is not in push.users; refused",
            peer.uid(),
            peer.pid()
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
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(reply.as_bytes())).await;
}

/// Reads up to the first newline (excluded); None when the peer closes first or the line
/// would exceed MAX_REQUEST.
async fn read_line(stream: &mut UnixStream) -> Option<Vec<u8>> {
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
