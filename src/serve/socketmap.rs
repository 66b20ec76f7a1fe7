//! The socketmap server: sendmail (which has no LMDB map class) and Postfix
//! (`socketmap:unix:PATH:NAME`) ask it `<mapname> <key>` in a netstring and get `OK <value>`,
//! `NOTFOUND ` or `TEMP <reason>` back, answered from the live grants.
//!
//! Keys: sendmail's access-map form `connect:1.2.3.4` and `connect:ipv6:2001:db8:0:0:0:0:0:7`
//! (uncompressed, lower case), and plain addresses as Postfix sends them. The reply value is
//! configurable per map name (sendmail's access map wants `RELAY`). Strict limits: request
//! length, concurrent connections (a newcomer finding every slot busy closes the stalest
//! connection, see `net`), idle time, time per request and per reply. A malformed request
//! closes the connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::netstring;
use crate::engine::GrantsView;
use crate::model::address::parse_any_ip;
use crate::net::requests::{self, Framed, Limits};
use crate::net::{self, Conn, Handler, Spec, Stream};
use crate::telemetry::ratelimit::SharedLimit;
use crate::telemetry::ServerReporter;
use crate::timefmt;

pub use crate::config::serve::{SocketmapConfig, MAX_REQUEST_TIME};
pub use crate::net::{Listen, Server};

/// Requests longer than this are refused (a map name and an address fit in far less).
pub const MAX_REQUEST: usize = 1024;

/// The address a socketmap key names, if any.
pub fn key_ip(key: &str) -> Option<IpAddr> {
    let k = key.trim().to_ascii_lowercase();
    let k = k.strip_prefix("connect:").unwrap_or(&k);
    parse_any_ip(k)
}

/// The reply to one request payload.
pub fn answer(request: &[u8], view: &GrantsView, cfg: &SocketmapConfig, now: i64) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(request) else {
        return b"PERM request is not text".to_vec();
    };
    let Some((name, key)) = text.split_once(' ') else {
        return b"PERM expected: <mapname> <key>".to_vec();
    };
    let Some(ip) = key_ip(key) else {
        return b"NOTFOUND ".to_vec();
    };
    match view.try_lookup(ip, now) {
        Ok(Some(_)) => {
            let value = cfg.values.get(name).unwrap_or(&cfg.default_value);
            format!("OK {value}").into_bytes()
        }
        Ok(None) => b"NOTFOUND ".to_vec(),
        Err(_) => b"TEMP grants unavailable".to_vec(),
    }
}

/// At most one WARN line per this interval about connections closed for slowness.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub use crate::net::requests::Closed;

/// Serves one connection until the peer closes it, goes idle, is too slow to send a request
/// or to take a reply, or sends something malformed.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    view: GrantsView,
    cfg: Arc<SocketmapConfig>,
) -> Closed {
    serve(stream, view, cfg, || {}).await
}

/// `serve_connection`, calling `progress` when a request begins and after each reply (so
/// that a connection in use is never the stalest).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    view: GrantsView,
    cfg: Arc<SocketmapConfig>,
    progress: impl FnMut(),
) -> Closed {
    let limits = Limits {
        idle: cfg.idle_timeout,
        request: cfg.request_timeout(),
        // At most 512 bytes' worth of requests answered before the next read.
        read_chunk: 512,
    };
    let answer = |buf: &[u8]| match netstring::decode(buf, MAX_REQUEST) {
        Ok(Some((payload, used))) => Framed::Reply {
            reply: netstring::encode(&answer(payload, &view, &cfg, timefmt::now())),
            used,
        },
        Ok(None) => Framed::Incomplete,
        Err(e) => {
            tracing::debug!(error = %e, "malformed socketmap request; closing");
            Framed::Malformed
        }
    };
    requests::serve(stream, limits, answer, progress).await
}

/// The socketmap as a `net` server: each connection is served by `serve`.
struct Socketmap {
    cfg: Arc<SocketmapConfig>,
    view: GrantsView,
    /// The WARN about connections closed for a slow request or an unread reply.
    slow: SharedLimit,
}

impl Handler for Socketmap {
    async fn serve<S: Stream>(self: Arc<Self>, stream: S, conn: Conn) {
        let why = serve(stream, self.view.clone(), Arc::clone(&self.cfg), || {
            conn.progress()
        })
        .await;
        if matches!(why, Closed::SlowRequest | Closed::SlowReader) {
            if let Some(n) = self.slow.hit() {
                tracing::warn!(
                    closed = n,
                    timeout = %humantime::format_duration(self.cfg.request_timeout()),
                    "socketmap connections closed: a request arrived too slowly or a reply was not read \
                     (count since the last such line)"
                );
            }
        }
    }
}

/// Binds and serves in the background (on the current tokio runtime) until `shutdown`.
/// A unix socket that another server still accepts on is never removed: that is an error.
pub async fn start(cfg: SocketmapConfig, view: GrantsView) -> std::io::Result<Server> {
    let reporter = ServerReporter::standalone(NAME);
    start_under(&CancellationToken::new(), cfg, view, reporter).await
}

/// The server's name in log lines and metrics.
pub const NAME: &str = "socketmap";

/// `start`, stopped also when `parent` is cancelled, reporting to `reporter`.
pub async fn start_under(
    parent: &CancellationToken,
    cfg: SocketmapConfig,
    view: GrantsView,
    reporter: ServerReporter,
) -> std::io::Result<Server> {
    let spec = Spec {
        name: NAME,
        key: "serve.socketmap",
        max_connections: cfg.max_connections,
        max_key: Some("serve.socketmap_max_connections"),
        // smtpd and sendmail query as their own users; lookups reveal only grants.
        unix_mode: 0o666,
    };
    let listen = cfg.listen.clone();
    let handler = Socketmap {
        cfg: Arc::new(cfg),
        view,
        slow: SharedLimit::new(LOG_EVERY),
    };
    net::start_under(parent, &listen, spec, Arc::new(handler), reporter).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    fn cfg() -> SocketmapConfig {
        SocketmapConfig {
            listen: Listen::Inet("127.0.0.1:0".parse().unwrap()),
            values: [("access".to_string(), "RELAY".to_string())].into(),
            default_value: "OK".into(),
            max_connections: 4,
            idle_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn keys() {
        assert_eq!(key_ip("connect:192.0.2.1"), "192.0.2.1".parse().ok());
        assert_eq!(
            key_ip("connect:ipv6:2001:db8:0:0:0:0:0:7"),
            "2001:db8::7".parse().ok()
        );
        assert_eq!(
            key_ip("CONNECT:IPv6:2001:DB8:0:0:0:0:0:7"),
            "2001:db8::7".parse().ok()
        );
        assert_eq!(key_ip("2001:db8::7"), "2001:db8::7".parse().ok());
        assert_eq!(key_ip("192.0.2"), None);
        assert_eq!(key_ip("from:user@example.com"), None);
        assert_eq!(key_ip("unknown"), None);
    }

    #[tokio::test]
    async fn answers_and_closes_on_garbage() {
        let view = GrantsView::default();
        view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve_connection(server, view, Arc::new(cfg())));
        let mut req = netstring::encode(b"access connect:192.0.2.1");
        req.extend(netstring::encode(b"relay connect:192.0.2.2"));
        req.extend(netstring::encode(b"relay 192.0.2.1"));
        // Split anywhere: requests may arrive in pieces.
        client.write_all(&req[..7]).await.unwrap();
        client.write_all(&req[7..]).await.unwrap();
        let want = b"8:OK RELAY,9:NOTFOUND ,5:OK OK,";
        let mut got = vec![0u8; 64];
        let mut n = 0;
        while n < want.len() {
            n += client.read(&mut got[n..]).await.unwrap();
        }
        assert_eq!(&got[..n], want.as_slice());
        client.write_all(b"xx:garbage").await.unwrap();
        assert_eq!(task.await.unwrap(), Closed::Malformed);
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "closed after garbage"
        );
    }

    fn unix_cfg(path: &std::path::Path) -> SocketmapConfig {
        SocketmapConfig {
            listen: Listen::Unix(path.to_path_buf()),
            ..cfg()
        }
    }

    async fn ask(path: &std::path::Path, request: &[u8]) -> Vec<u8> {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(&netstring::encode(request)).await.unwrap();
        let mut got = vec![0u8; 64];
        let n = s.read(&mut got).await.unwrap();
        got.truncate(n);
        got
    }

    #[tokio::test]
    async fn a_trickling_request_is_cut_off() {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve_connection(
            server,
            GrantsView::default(),
            Arc::new(cfg()),
        ));
        // One byte per 100 ms: each read is well inside idle_timeout (1 s), the request
        // never completes.
        client.write_all(b"900:").await.unwrap();
        while !task.is_finished() {
            if client.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(task.await.unwrap(), Closed::SlowRequest);
    }

    /// Postfix keeps its connection open between lookups: the request timeout runs per
    /// request, not per connection.
    #[tokio::test]
    async fn a_persistent_client_outlives_the_request_timeout() {
        let (mut client, server) = tokio::io::duplex(4096);
        let cfg = Arc::new(cfg());
        let task = tokio::spawn(serve_connection(server, GrantsView::default(), cfg.clone()));
        let started = Instant::now();
        let mut got = [0u8; 32];
        while started.elapsed() < cfg.request_timeout() * 2 {
            client
                .write_all(&netstring::encode(b"relay 192.0.2.1"))
                .await
                .unwrap();
            let n = client.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], b"9:NOTFOUND ,");
            tokio::time::sleep(cfg.idle_timeout / 4).await;
        }
        drop(client);
        assert_eq!(task.await.unwrap(), Closed::Peer);
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped() {
        // A tiny pipe: replies fill it at once.
        let (mut client, server) = tokio::io::duplex(64);
        let task = tokio::spawn(serve_connection(
            server,
            GrantsView::default(),
            Arc::new(cfg()),
        ));
        let req = netstring::encode(b"relay 192.0.2.1");
        let writer = tokio::spawn(async move {
            while client.write_all(&req).await.is_ok() {}
            client
        });
        assert_eq!(task.await.unwrap(), Closed::SlowReader);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_client_is_closed_after_idle_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let closed = serve_connection(server, GrantsView::default(), Arc::new(cfg())).await;
        assert_eq!(closed, Closed::Idle);
    }

    #[tokio::test]
    async fn a_live_socket_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socketmap");
        let view = GrantsView::default();
        view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
        let first = start(unix_cfg(&path), view.clone()).await.unwrap();
        let err = match start(unix_cfg(&path), view.clone()).await {
            Err(e) => e,
            Ok(_) => panic!("a second server started on a live socket"),
        };
        assert!(
            err.to_string()
                .contains(&format!("another dovegate is serving {}", path.display())),
            "{err}"
        );
        assert_eq!(ask(&path, b"relay 192.0.2.1").await, b"5:OK OK,");

        // Clean shutdown removes our own socket; the lock file stays (harmless).
        first.shutdown().await;
        assert!(!path.exists(), "socket removed on shutdown");

        // A stale socket (nobody listens) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = start(unix_cfg(&path), view.clone()).await.unwrap();
        assert_eq!(ask(&path, b"relay 192.0.2.1").await, b"5:OK OK,");

        // Someone else's socket at the path now: shutdown leaves it.
        std::fs::remove_file(&path).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        second.shutdown().await;
        assert!(
            path.exists(),
            "another process's socket is not ours to remove"
        );
    }

    /// A live socket without our lock (another program, an older dovegate): the probe
    /// connection is accepted, so it is left alone.
    #[tokio::test]
    async fn a_live_socket_without_the_lock_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socketmap");
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let Err(err) = start(unix_cfg(&path), GrantsView::default()).await else {
            panic!("started over a live socket");
        };
        assert!(
            err.to_string().contains("another dovegate is serving"),
            "{err}"
        );
        assert!(
            other.accept().is_ok(),
            "the other listener still owns the path"
        );
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socketmap");
        std::fs::write(&path, "keep me").unwrap();
        let Err(err) = start(unix_cfg(&path), GrantsView::default()).await else {
            panic!("started over a regular file");
        };
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn inet_port_zero_and_shutdown() {
        let server = start(cfg(), GrantsView::default()).await.unwrap();
        let Listen::Inet(addr) = server.listen().clone() else {
            panic!("inet");
        };
        assert_ne!(addr.port(), 0);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&netstring::encode(b"relay 192.0.2.9"))
            .await
            .unwrap();
        let mut got = [0u8; 16];
        let n = s.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"9:NOTFOUND ,");
        server.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
