//! Where Dovecot's exporter delivers: HTTP posts on loopback (2.3's `http-post`: every
//! request must carry the secret as its path, compared in constant time) or a unix socket
//! (2.4's `unix` driver: one JSON event per line, from a peer whose uid is allowed). Each
//! connection is handled in one function (`serve_http`, `serve_unix`), bounded in number,
//! request size and time; an event is answered as soon as it is read.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Semaphore;

use super::parse::MAX_EVENT;
use super::{EventsListen, EventsSettings, Intake};
use crate::push::policy::{Conn, Conns};
use crate::push::socket::{Server, Unlink};

/// How long a request body, or the rest of a started line, may take to arrive (Dovecot
/// sends each at once).
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle keep-alive connections that sent the secret (Dovecot's client closes first).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new HTTP connection may take to send a request with the secret.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Unix connections at once (Dovecot's stats process keeps one per exporter).
const MAX_UNIX_CONNECTIONS: usize = 64;

/// Binds the listener and returns its accept loop.
pub(super) async fn bind(
    listen: &EventsListen,
    settings: &EventsSettings,
    intake: Arc<Intake>,
) -> std::io::Result<Server> {
    match listen {
        EventsListen::Http(addr) => {
            // Never without a secret (validation requires one): "/" alone would do.
            let secret = settings
                .secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| std::io::Error::other("no secret (events.secret_file)"))?;
            let mut path = b"/".to_vec();
            path.extend_from_slice(secret);
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(address = %listener.local_addr()?, "events listening (Dovecot's http-post exporter)");
            let path: Arc<[u8]> = path.into();
            let conns = Arc::new(Conns::default());
            Ok(Box::pin(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => serve_http(s, &conns, &path, &intake),
                        // EMFILE and the like: do not spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }))
        }
        EventsListen::Unix(path) => {
            crate::push::prepare_socket_dir(path)?;
            crate::push::remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)?;
            // Anyone may connect: the peer's uid is what is checked.
            crate::push::chmod_socket(path, 0o666)?;
            tracing::info!(socket = %path.display(), uids = ?settings.uids, "events listening (Dovecot's unix exporter)");
            let uids: Arc<[u32]> = settings.uids.clone().into();
            let slots = Arc::new(Semaphore::new(MAX_UNIX_CONNECTIONS));
            let path = path.clone();
            Ok(Box::pin(async move {
                let _unlink = Unlink(path);
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        intake.refuse("events: too many unix connections; one dropped");
                        continue;
                    };
                    let (intake, uids) = (Arc::clone(&intake), Arc::clone(&uids));
                    tokio::spawn(async move {
                        serve_unix(stream, &uids, &intake).await;
                        drop(permit);
                    });
                }
            }))
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
    conn: Arc<Conn>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED));
    }
    if !bool::from(req.uri().path().as_bytes().ct_eq(&path)) {
        intake.refuse("events: HTTP post without the secret path (events.secret_file); refused");
        return Ok(reply(StatusCode::NOT_FOUND));
    }
    conn.trusted.store(true, Ordering::Relaxed);
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_EVENT).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            intake.invalid("events: HTTP post body too large or broken; nothing granted");
            return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE));
        }
        Err(_) => {
            intake.invalid("events: HTTP post body not sent within 2s; nothing granted");
            return Ok(reply(StatusCode::REQUEST_TIMEOUT));
        }
    };
    intake.event(&body);
    Ok(reply(StatusCode::OK))
}

/// One HTTP connection (keep-alive: Dovecot posts many events on it).
fn serve_http(stream: TcpStream, conns: &Arc<Conns>, path: &Arc<[u8]>, intake: &Arc<Intake>) {
    // Anyone local can connect: when every slot is taken, the oldest connection that has
    // not sent the secret makes room (Conns::admit); Dovecot's are never the ones closed.
    let Some((id, conn)) = conns.admit() else {
        intake.refuse("events: too many HTTP connections that sent the secret; one dropped");
        return;
    };
    let (path, intake, conns) = (Arc::clone(path), Arc::clone(intake), Arc::clone(conns));
    tokio::spawn(async move {
        let state = Arc::clone(&conn);
        let service = hyper::service::service_fn(move |req| {
            handle(
                req,
                Arc::clone(&path),
                Arc::clone(&intake),
                Arc::clone(&state),
            )
        });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_EVENT.max(8192))
            .serve_connection(TokioIo::new(stream), service);
        let untrusted_deadline = async {
            tokio::time::sleep(FIRST_REQUEST_TIMEOUT).await;
            if conn.trusted.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = http => {}
            _ = conn.close.notified() => {}
            _ = untrusted_deadline => {}
        }
        conns.leave(id);
    });
}

/// One unix connection: the peer's uid, then events one per line until it closes.
async fn serve_unix(mut stream: UnixStream, uids: &[u32], intake: &Intake) {
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            intake.refuse(&format!(
                "events: cannot read the unix peer's credentials ({e}); refused"
            ));
            return;
        }
    };
    if !uids.contains(&peer.uid()) {
        intake.refuse(&format!(
            "events: unix peer uid {} (pid {}) is not in events.users; refused",
            peer.uid(),
            peer.pid()
                .map_or_else(|| "unknown".to_string(), |p| p.to_string())
        ));
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    loop {
        // Idle between events is fine (a quiet server); a started line must finish soon.
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
        while let Some(end) = buf[start..].iter().position(|&b| b == b'\n') {
            intake.event(&buf[start..start + end]);
            start += end + 1;
        }
        buf.drain(..start);
        if buf.len() > MAX_EVENT {
            // The connection cannot be resynchronised.
            intake.invalid("events: unix line longer than 16 KiB; connection closed");
            return;
        }
    }
}
