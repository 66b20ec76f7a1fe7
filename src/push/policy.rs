//! The auth-policy endpoint Dovecot's auth process talks to (`auth_policy_server_url`).
//! `command=allow` is answered at once with "no objection" (dovegate never rejects a
//! login); `command=report` with `"success":true` for a configured protocol grants the
//! reported `remote` address, unless the passdb made it a proxied or `nologin` login:
//! Dovecot reports those as successes before acting on them (the user never logs in here),
//! so the report must carry `proxy` and `nologin` (auth_policy_request_attributes) and a
//! report without them grants nothing. Requests must carry the configured secret header;
//! bodies are bounded in size and time, connections in number and idle time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use subtle::ConstantTimeEq;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::socket::Server;
use super::{ApiHeader, Sink};
use crate::grant::parse_any_ip;
use crate::serve::socketmap::Listen;

/// The largest request body: Dovecot's JSON is a few hundred bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Headers of the next request on a connection that sent the secret, and so idle
/// keep-alive connections (Dovecot's own client closes idle ones after 10 s, so it closes
/// first and never races our close).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may take to send a request with the secret: anyone can
/// connect, and Dovecot sends its request as soon as it is connected.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Dovecot opens up to 100 parallel connections.
const MAX_CONNECTIONS: usize = 128;

/// What the endpoint checks.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub secret: Option<ApiHeader>,
    pub protocols: Vec<String>,
}

/// What `%{passdb:proxy:-}` expands to when the passdb did not set the field.
pub const UNSET: &str = "-";

/// The `auth_policy_request_attributes` Dovecot 2.3 must send: its defaults plus `proxy`
/// and `nologin`, defaulting to `-` when absent (present, Dovecot 2.3 expands them to "").
pub const REQUEST_ATTRIBUTES: &str = "login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} device_id=%{client_id} protocol=%s session_id=%{session} proxy=%{passdb:proxy:-} nologin=%{passdb:nologin:-}";

/// The one answer dovegate gives: no objection.
const ALLOW: &str = r#"{"status":0,"msg":""}"#;

/// What a request amounts to, decided without I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer "allow", grant nothing.
    Allow,
    /// A successful login to grant.
    Grant(std::net::IpAddr),
    /// A report that grants nothing (failed login, other protocol).
    Ignore,
    /// A successful authentication that is not a login here: the passdb set `proxy` or
    /// `nologin` (the field named).
    NotALogin(&'static str),
    /// A successful report without the `proxy` and `nologin` attributes: Dovecot is not
    /// configured as the README says, so a proxied login cannot be told apart.
    NoAttributes,
    /// The address in a successful report is not an address.
    BadAddress(String),
    BadRequest(&'static str),
}

/// Decides one request from its command (query string) and JSON body.
pub fn judge(query: Option<&str>, body: &[u8], protocols: &[String]) -> Verdict {
    let command = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("command="));
    match command {
        Some("allow") => return Verdict::Allow,
        Some("report") => {}
        _ => return Verdict::BadRequest("expected ?command=allow or ?command=report"),
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Verdict::BadRequest("the body is not JSON");
    };
    if v.get("success") != Some(&serde_json::Value::Bool(true)) {
        return Verdict::Ignore;
    }
    let protocol = v.get("protocol").and_then(|p| p.as_str()).unwrap_or("");
    if !protocols.iter().any(|p| p == protocol) {
        return Verdict::Ignore;
    }
    for field in ["proxy", "nologin"] {
        match v.get(field) {
            None => return Verdict::NoAttributes,
            // Dovecot acts on the field's presence, whatever its value: only the default
            // of an absent field means "not set".
            Some(serde_json::Value::String(s)) if s == UNSET => {}
            Some(_) => return Verdict::NotALogin(field),
        }
    }
    let remote = v.get("remote").and_then(|r| r.as_str()).unwrap_or("");
    match parse_any_ip(remote) {
        Some(ip) if remote.len() <= 64 => Verdict::Grant(ip),
        _ => Verdict::BadAddress(remote.chars().take(64).collect()),
    }
}

/// True when the request carries the secret (or none is configured). Constant time.
fn authorised(req: &Request<Incoming>, secret: &Option<ApiHeader>) -> bool {
    let Some(secret) = secret else {
        return true;
    };
    let mut values = req.headers().get_all(&secret.name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => bool::from(v.as_bytes().trim_ascii().ct_eq(&secret.value)),
        _ => false,
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<PolicyConfig>,
    sink: Sink,
    conn: Arc<Conn>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"POST only"}"#,
        ));
    }
    if !authorised(&req, &cfg.secret) {
        sink.refuse("auth policy: request without the configured secret header; refused");
        return Ok(reply(StatusCode::UNAUTHORIZED, r#"{"error":"secret"}"#));
    }
    conn.trusted.store(true, Ordering::Relaxed);
    let query = req.uri().query().map(str::to_string);
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            sink.invalid("auth policy: request body too large or broken; nothing granted");
            return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, r#"{"error":"body"}"#));
        }
        Err(_) => {
            sink.invalid("auth policy: request body not sent within 2s; nothing granted");
            return Ok(reply(StatusCode::REQUEST_TIMEOUT, r#"{"error":"timeout"}"#));
        }
    };
    Ok(match judge(query.as_deref(), &body, &cfg.protocols) {
        Verdict::Allow | Verdict::Ignore => reply(StatusCode::OK, ALLOW),
        Verdict::Grant(ip) => {
            tracing::debug!(%ip, "login reported by the auth policy client");
            sink.push(ip).await;
            reply(StatusCode::OK, ALLOW)
        }
        Verdict::NotALogin(field) => {
            sink.skip(
                if field == "proxy" { "proxied" } else { "nologin" },
                &format!("auth policy: successful report with `{field}` set by the passdb (not a login on this server); nothing granted"),
            );
            reply(StatusCode::OK, ALLOW)
        }
        Verdict::NoAttributes => {
            sink.misconfigured(
                "no-proxy-attributes",
                &format!("auth policy: report without the `proxy` and `nologin` attributes; nothing granted: set auth_policy_request_attributes = {REQUEST_ATTRIBUTES} in Dovecot (see README, \"Auth policy endpoint\")"),
            );
            reply(StatusCode::OK, ALLOW)
        }
        Verdict::BadAddress(text) => {
            sink.invalid(&format!(
                "auth policy: report with an invalid remote address {text:?}; nothing granted"
            ));
            reply(StatusCode::OK, ALLOW)
        }
        Verdict::BadRequest(why) => {
            sink.invalid(&format!("auth policy: bad request: {why}"));
            reply(StatusCode::BAD_REQUEST, r#"{"error":"bad request"}"#)
        }
    })
}

/// One connection: whether it has sent the secret, and how to close it.
#[derive(Default)]
pub(crate) struct Conn {
    pub(crate) trusted: AtomicBool,
    pub(crate) close: Notify,
}

/// The open connections, oldest first. Anyone who can connect can hold a slot, so when all
/// are taken the oldest one that has not sent the secret makes room: Dovecot's connections
/// send it at once and are never the ones closed.
#[derive(Default)]
pub(crate) struct Conns {
    open: Mutex<(u64, BTreeMap<u64, Arc<Conn>>)>,
}

impl Conns {
    /// A slot for a new connection, or None when every slot holds a trusted one.
    pub(crate) fn admit(&self) -> Option<(u64, Arc<Conn>)> {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (next, open) = &mut *guard;
        if open.len() >= MAX_CONNECTIONS {
            let oldest = open
                .iter()
                .find(|(_, c)| !c.trusted.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(c) = open.remove(&oldest) {
                c.close.notify_one();
            }
        }
        *next += 1;
        let conn = Arc::new(Conn::default());
        open.insert(*next, Arc::clone(&conn));
        Some((*next, conn))
    }

    pub(crate) fn leave(&self, id: u64) {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.remove(&id);
    }
}

fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    conns: &Arc<Conns>,
    cfg: &Arc<PolicyConfig>,
    sink: &Sink,
) {
    let Some((id, conn)) = conns.admit() else {
        sink.refused
            .warn("auth policy: too many connections that sent the secret; one dropped");
        return;
    };
    let (cfg, sink, conns) = (Arc::clone(cfg), sink.clone(), Arc::clone(conns));
    tokio::spawn(async move {
        let state = Arc::clone(&conn);
        let service = hyper::service::service_fn(move |req| {
            handle(req, Arc::clone(&cfg), sink.clone(), Arc::clone(&state))
        });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_BODY)
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

/// Binds the endpoint and returns its accept loop.
pub(crate) async fn bind(
    listen: &Listen,
    cfg: PolicyConfig,
    sink: Sink,
) -> std::io::Result<Server> {
    let cfg = Arc::new(cfg);
    let conns = Arc::new(Conns::default());
    match listen {
        Listen::Inet(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(address = %listener.local_addr()?, "auth policy endpoint listening");
            Ok(Box::pin(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => serve(s, &conns, &cfg, &sink),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }))
        }
        Listen::Unix(path) => {
            super::prepare_socket_dir(path)?;
            super::remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)?;
            // Reports grant: only the daemon's user and group may connect.
            super::chmod_socket(path, 0o660)?;
            tracing::info!(socket = %path.display(), "auth policy endpoint listening");
            let path = path.clone();
            Ok(Box::pin(async move {
                let _unlink = Unlink(path);
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => serve(s, &conns, &cfg, &sink),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }))
        }
    }
}

struct Unlink(std::path::PathBuf);
impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = super::remove_stale_socket(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protos() -> Vec<String> {
        vec!["imap".into(), "pop3".into()]
    }

    #[test]
    fn full_slots_close_the_oldest_connection_without_the_secret() {
        let conns = Conns::default();
        let mut held: Vec<(u64, Arc<Conn>)> = (0..MAX_CONNECTIONS)
            .map(|_| conns.admit().unwrap())
            .collect();
        held[0].1.trusted.store(true, Ordering::Relaxed);
        // The oldest without the secret (the second) makes room.
        let (_, newest) = conns.admit().unwrap();
        let evicted = Arc::clone(&held[1].1);
        assert!(futures_now(evicted.close.notified()));
        assert!(!futures_now(held[0].1.close.notified()));
        assert_eq!(conns.open.lock().unwrap().1.len(), MAX_CONNECTIONS);
        // All trusted: a new connection is refused, none is closed.
        for (_, c) in &held {
            c.trusted.store(true, Ordering::Relaxed);
        }
        newest.trusted.store(true, Ordering::Relaxed);
        assert!(conns.admit().is_none());
        let (id, _) = held.pop().unwrap();
        conns.leave(id);
        assert!(conns.admit().is_some());
    }

    /// Whether a future is ready at once.
    fn futures_now<F: std::future::Future>(f: F) -> bool {
        let f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        f.poll(&mut cx).is_ready()
    }

    #[test]
    fn verdicts() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        // As Dovecot 2.3 sends it with REQUEST_ATTRIBUTES.
        let ok = br#"{"device_id":"","login":"alice","nologin":"-","protocol":"imap","proxy":"-","pwhash":"ab","remote":"203.0.113.5","session_id":"x","success":true,"policy_reject":false}"#;
        assert_eq!(
            judge(Some("command=report"), ok, &protos()),
            Verdict::Grant(ip("203.0.113.5"))
        );
        assert_eq!(judge(Some("command=allow"), ok, &protos()), Verdict::Allow);
        assert_eq!(
            judge(Some("a=b&command=allow"), b"", &protos()),
            Verdict::Allow
        );
        let failed = br#"{"remote":"203.0.113.5","protocol":"imap","success":false}"#;
        assert_eq!(
            judge(Some("command=report"), failed, &protos()),
            Verdict::Ignore
        );
        let smtp = br#"{"remote":"203.0.113.5","protocol":"smtp","success":true}"#;
        assert_eq!(
            judge(Some("command=report"), smtp, &protos()),
            Verdict::Ignore
        );
        let text_success = br#"{"remote":"203.0.113.5","protocol":"imap","success":"true"}"#;
        assert_eq!(
            judge(Some("command=report"), text_success, &protos()),
            Verdict::Ignore
        );
        let v6 = br#"{"remote":"2001:DB8::9","protocol":"pop3","proxy":"-","nologin":"-","success":true}"#;
        assert_eq!(
            judge(Some("command=report"), v6, &protos()),
            Verdict::Grant(ip("2001:db8::9"))
        );
        let bad = br#"{"remote":"","protocol":"pop3","proxy":"-","nologin":"-","success":true}"#;
        assert!(matches!(
            judge(Some("command=report"), bad, &protos()),
            Verdict::BadAddress(_)
        ));
        // Authenticated, but not a login here: proxied elsewhere, or nologin (a field
        // Dovecot 2.3 booleanized expands to ""; any value but the default counts).
        for (body, field) in [
            (r#""proxy":"","nologin":"-""#, "proxy"),
            (r#""proxy":"y","nologin":"-""#, "proxy"),
            (r#""proxy":"no","nologin":"-""#, "proxy"),
            (r#""proxy":"-","nologin":"""#, "nologin"),
            (r#""proxy":"-","nologin":1"#, "nologin"),
        ] {
            let r =
                format!(r#"{{"remote":"203.0.113.5","protocol":"imap",{body},"success":true}}"#);
            assert_eq!(
                judge(Some("command=report"), r.as_bytes(), &protos()),
                Verdict::NotALogin(field),
                "{r}"
            );
        }
        // Dovecot's default attributes: refused, it cannot tell a proxied login.
        for r in [
            &br#"{"login":"alice","remote":"203.0.113.5","protocol":"imap","success":true}"#[..],
            br#"{"remote":"203.0.113.5","protocol":"imap","proxy":"-","success":true}"#,
        ] {
            assert_eq!(
                judge(Some("command=report"), r, &protos()),
                Verdict::NoAttributes
            );
        }
        assert!(matches!(
            judge(Some("command=report"), b"{", &protos()),
            Verdict::BadRequest(_)
        ));
        assert!(matches!(judge(None, ok, &protos()), Verdict::BadRequest(_)));
        // What the README tells administrators and the test Dovecot is configured with.
        assert!(include_str!("../../README.md").contains(REQUEST_ATTRIBUTES));
        assert!(include_str!("../../tests/support/dovecot.sh").contains(REQUEST_ATTRIBUTES));
        assert!(REQUEST_ATTRIBUTES.contains("proxy=%{passdb:proxy:-}"));
        assert!(REQUEST_ATTRIBUTES.contains("nologin=%{passdb:nologin:-}"));
        assert!(matches!(
            judge(Some("command=reportx"), ok, &protos()),
            Verdict::BadRequest(_)
        ));
    }
}
