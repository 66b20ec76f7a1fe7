//! Where Dovecot's exporter delivers, as `net` servers: HTTP posts on loopback (2.3's
//! `http-post`: every request must carry the secret as its path, compared in constant
//! time) or a unix socket (2.4's `unix` driver: one JSON event per line, from a peer whose
//! uid is allowed). `net` bounds the connections (a stranger's are evicted before
//! Dovecot's, which prove themselves), the writes and the HTTP headers; here each request
//! or line is bounded in size and time, and an event is answered as soon as it is read.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::parse::MAX_EVENT;
use super::{EventsSettings, Intake};
use crate::net::http::BodyError;
use crate::net::{self, Conn, Handler, Listen, Peer, Server, Spec, Stream};

/// How long a request body, or the rest of a started line, may take to arrive (Dovecot
/// sends each at once).
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle keep-alive connections that sent the secret (Dovecot's client closes first).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new HTTP connection may take to send a request with the secret.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP connections at once (Dovecot's http client keeps a few per exporter).
const MAX_HTTP_CONNECTIONS: usize = 128;
/// Unix connections at once (Dovecot's stats process keeps one per exporter).
const MAX_UNIX_CONNECTIONS: usize = 64;

/// Binds the listener and serves it in the background (on the current runtime).
pub(super) async fn bind(
    listen: &Listen,
    settings: &EventsSettings,
    intake: Arc<Intake>,
) -> std::io::Result<Server> {
    match listen {
        Listen::Inet(_) => {
            // Never without a secret (validation requires one): "/" alone would do.
            let secret = settings
                .secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| std::io::Error::other("no secret (events.secret_file)"))?;
            let mut path = b"/".to_vec();
            path.extend_from_slice(secret);
            let spec = Spec {
                name: "events listener (Dovecot's http-post exporter)",
                key: "events.listen",
                max_connections: MAX_HTTP_CONNECTIONS,
                max_key: None,
                unix_mode: 0o600,
            };
            let reporter = intake.reporter.server(spec.name);
            let handler = HttpEvents {
                path: path.into(),
                intake,
            };
            net::start_reporting(listen, spec, Arc::new(handler), reporter).await
        }
        Listen::Unix(path) => {
            let spec = Spec {
                name: "events socket (Dovecot's unix exporter)",
                key: "events.listen",
                max_connections: MAX_UNIX_CONNECTIONS,
                max_key: None,
                // Anyone may connect: the peer's uid is what is checked.
                unix_mode: 0o666,
            };
            let reporter = intake.reporter.server(spec.name);
            let handler = UnixEvents {
                uids: settings.uids.clone(),
                intake,
            };
            let server = net::start_reporting(listen, spec, Arc::new(handler), reporter).await?;
            tracing::info!(socket = %path.display(), uids = ?settings.uids, "events socket: events accepted from these uids");
            Ok(server)
        }
    }
}

/// 2.3's `http-post`: one event per `POST /SECRET`, on keep-alive connections.
struct HttpEvents {
    path: Arc<[u8]>,
    intake: Arc<Intake>,
}

impl Handler for HttpEvents {
    fn serve<S: Stream>(
        self: Arc<Self>,
        stream: S,
        conn: Conn,
    ) -> impl Future<Output = ()> + Send + 'static {
        let state = conn.clone();
        let service = hyper::service::service_fn(move |req| {
            handle(
                req,
                Arc::clone(&self.path),
                Arc::clone(&self.intake),
                state.clone(),
            )
        });
        async move {
            net::http::serve_proven(
                stream,
                &conn,
                FIRST_REQUEST_TIMEOUT,
                HEADER_TIMEOUT,
                MAX_EVENT.max(8192),
                service,
            )
            .await
        }
    }
}

fn reply(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// One exported event posted over HTTP.
async fn handle(
    req: Request<Incoming>,
    path: Arc<[u8]>,
    intake: Arc<Intake>,
    conn: Conn,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED));
    }
    if !bool::from(req.uri().path().as_bytes().ct_eq(&path)) {
        intake.refuse("events: HTTP post without the secret path (events.secret_file); refused");
        return Ok(reply(StatusCode::NOT_FOUND));
    }
    conn.trust();
    conn.progress();
    match net::http::body(req, MAX_EVENT, BODY_TIMEOUT).await {
        Ok(body) => {
            intake.event(&body);
            Ok(reply(StatusCode::OK))
        }
        Err(BodyError::TooLarge) => {
            intake.invalid("events: HTTP post body too large or broken; nothing granted");
            Ok(reply(StatusCode::PAYLOAD_TOO_LARGE))
        }
        Err(BodyError::TooSlow) => {
            intake.invalid("events: HTTP post body not sent within 2s; nothing granted");
            Ok(reply(StatusCode::REQUEST_TIMEOUT))
        }
    }
}

/// 2.4's `unix` driver: events one per line, from an allowed uid.
struct UnixEvents {
    uids: Vec<u32>,
    intake: Arc<Intake>,
}

impl Handler for UnixEvents {
    async fn serve<S: Stream>(self: Arc<Self>, stream: S, conn: Conn) {
        let (uid, pid) = match stream.peer() {
            Ok(Peer::Unix { uid, pid }) => (uid, pid),
            Ok(other) => {
                self.intake.refuse(&format!(
                    "events: a peer without credentials ({other:?}); refused"
                ));
                return;
            }
            Err(e) => {
                self.intake.refuse(&format!(
                    "events: cannot read the unix peer's credentials ({e}); refused"
                ));
                return;
            }
        };
        if !self.uids.contains(&uid) {
            self.intake.refuse(&format!(
                "events: unix peer uid {uid} (pid {}) is not in events.users; refused",
                pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
            ));
            return;
        }
        // Dovecot's own connection: evicted only after every stranger's.
        conn.trust();
        read_lines(stream, &self.intake, &conn).await;
    }
}

/// Events one per line until the peer closes. Idle between events is fine (a quiet
/// server); a started line must finish within BODY_TIMEOUT and MAX_EVENT.
async fn read_lines(mut stream: impl AsyncRead + Unpin, intake: &Intake, conn: &Conn) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    loop {
        let read = if buf.is_empty() {
            stream.read(&mut chunk).await
        } else {
            match tokio::time::timeout(BODY_TIMEOUT, stream.read(&mut chunk)).await {
                Ok(r) => r,
                Err(_) => {
                    intake.invalid("events: unix line not finished within 2s; connection closed");
                    return;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(end) = memchr::memchr(b'\n', &buf[start..]) {
            intake.event(&buf[start..start + end]);
            start += end + 1;
        }
        if start > 0 {
            conn.progress();
        }
        buf.drain(..start);
        if buf.len() > MAX_EVENT {
            // The connection cannot be resynchronised.
            intake.invalid("events: unix line longer than 16 KiB; connection closed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::super::tests::{intake, LOGIN};
    use super::super::Item;
    use super::*;

    fn settings(secret: &str, uids: Vec<u32>) -> EventsSettings {
        EventsSettings {
            listen: None,
            secret: Some(secret.as_bytes().to_vec()),
            uids,
        }
    }

    /// One HTTP/1.1 POST to `path` on a fresh connection; the status line.
    fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines().next().unwrap_or("").to_string()
    }

    /// A post to the secret path is an event; any other path is refused and queues
    /// nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_posts_need_the_secret_path() {
        let (i, mut rx) = intake(8);
        let listen = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let server = bind(&listen, &settings("s3cret-0123456789", vec![]), Arc::new(i))
            .await
            .unwrap();
        let Listen::Inet(addr) = server.listen().clone() else {
            panic!("inet")
        };
        let (bad, good) = tokio::task::spawn_blocking(move || {
            (
                post(addr, "/wrong-0123456789", LOGIN),
                post(addr, "/s3cret-0123456789", LOGIN),
            )
        })
        .await
        .unwrap();
        assert!(bad.contains(" 404 "), "{bad}");
        assert!(good.contains(" 200 "), "{good}");
        assert!(matches!(rx.recv().await, Some(Item::Login(_))));
        assert!(rx.try_recv().is_err(), "the refused post queued nothing");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn no_secret_no_http_listener() {
        let (i, _rx) = intake(8);
        let listen = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let e = bind(&listen, &settings("", vec![]), Arc::new(i))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("events.secret_file"), "{e}");
    }

    /// Lines from an allowed uid are events, each answered as it ends; a peer of another
    /// uid is closed at once and queues nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_lines_from_allowed_uids_only() {
        // SAFETY: geteuid takes no pointers and cannot fail.
        let me = unsafe { libc::geteuid() };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        for (uids, queued) in [(vec![me], true), (vec![me.wrapping_add(1)], false)] {
            let (i, mut rx) = intake(8);
            let listen = Listen::Unix(path.clone());
            let server = bind(&listen, &settings("", uids), Arc::new(i))
                .await
                .unwrap();
            let p = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut s = std::os::unix::net::UnixStream::connect(p).unwrap();
                // Two events, the second in two writes.
                let (a, b) = LOGIN.split_at(40);
                let _ = write!(s, "{LOGIN}\n{a}");
                let _ = s.flush();
                let _ = writeln!(s, "{b}");
                if !queued {
                    // Closed at once, before anything was read.
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let closed = match s.read(&mut [0u8; 1]) {
                        Ok(n) => n == 0,
                        // Closed with our lines unread: a reset.
                        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                    };
                    assert!(closed, "a refused peer is closed at once");
                }
            })
            .await
            .unwrap();
            if queued {
                for _ in 0..2 {
                    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
                    assert!(matches!(got, Ok(Some(Item::Login(_)))));
                }
            }
            server.shutdown().await;
            assert!(!path.exists(), "the socket is removed at stop");
            assert!(rx.try_recv().is_err());
        }
    }
}
