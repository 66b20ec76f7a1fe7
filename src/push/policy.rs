//! The auth-policy endpoint Dovecot's auth process talks to (`auth_policy_server_url`).
//! `command=allow` is answered at once with "no objection" (dovegate never rejects a
//! login); `command=report` with `"success":true` for a configured protocol grants the
//! reported `remote` address. Requests must carry the configured secret header; bodies are
//! bounded in size and time, connections in number and idle time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::socket::Server;
use super::{ApiHeader, Sink};
use crate::grant::parse_any_ip;
use crate::serve::socketmap::Listen;

/// The largest request body: Dovecot's JSON is a few hundred bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Headers of the next request, and so idle keep-alive connections (Dovecot's own client
/// closes idle ones after 10 s, so it closes first and never races our close).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Dovecot opens up to 100 parallel connections.
const MAX_CONNECTIONS: usize = 128;

/// What the endpoint checks.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub secret: Option<ApiHeader>,
    pub protocols: Vec<String>,
}

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

fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slots: &Arc<Semaphore>,
    cfg: &Arc<PolicyConfig>,
    sink: &Sink,
) {
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
        sink.refused
            .warn("auth policy: too many connections; one dropped");
        return;
    };
    let (cfg, sink) = (Arc::clone(cfg), sink.clone());
    tokio::spawn(async move {
        let service =
            hyper::service::service_fn(move |req| handle(req, Arc::clone(&cfg), sink.clone()));
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_BODY)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        drop(permit);
    });
}

/// Binds the endpoint and returns its accept loop.
pub(crate) async fn bind(
    listen: &Listen,
    cfg: PolicyConfig,
    sink: Sink,
) -> std::io::Result<Server> {
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    match listen {
        Listen::Inet(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(address = %listener.local_addr()?, "auth policy endpoint listening");
            Ok(Box::pin(async move {
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => serve(s, &slots, &cfg, &sink),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }))
        }
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            super::remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)?;
            // Reports grant: only the daemon's user and group may connect.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            tracing::info!(socket = %path.display(), "auth policy endpoint listening");
            let path = path.clone();
            Ok(Box::pin(async move {
                let _unlink = Unlink(path);
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => serve(s, &slots, &cfg, &sink),
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
    fn verdicts() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        // As Dovecot 2.3 sends it (default auth_policy_request_attributes).
        let ok = br#"{"login":"alice","pwhash":"ab","remote":"203.0.113.5","device_id":"","protocol":"imap","session_id":"x","success":true,"policy_reject":false}"#;
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
        let v6 = br#"{"remote":"2001:DB8::9","protocol":"pop3","success":true}"#;
        assert_eq!(
            judge(Some("command=report"), v6, &protos()),
            Verdict::Grant(ip("2001:db8::9"))
        );
        let bad = br#"{"remote":"","protocol":"pop3","success":true}"#;
        assert!(matches!(
            judge(Some("command=report"), bad, &protos()),
            Verdict::BadAddress(_)
        ));
        assert!(matches!(
            judge(Some("command=report"), b"{", &protos()),
            Verdict::BadRequest(_)
        ));
        assert!(matches!(judge(None, ok, &protos()), Verdict::BadRequest(_)));
        assert!(matches!(
            judge(Some("command=reportx"), ok, &protos()),
            Verdict::BadRequest(_)
        ));
    }
}
