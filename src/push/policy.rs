//! The auth-policy endpoint Dovecot's auth process talks to (`auth_policy_server_url`).
//! `command=allow` is answered at once: "no objection", unless its `login` is a user
//! `policy.block_on_cap` blocked (status -1 with the reason: Dovecot fails the
//! authentication and shows the text to the client); `command=report` with
//! `"success":true` for a configured protocol grants the
//! reported `remote` address, unless the passdb made it a proxied or `nologin` login:
//! Dovecot reports those as successes before acting on them (the user never logs in here),
//! so the report must carry `proxy` and `nologin` (auth_policy_request_attributes) and a
//! report without them grants nothing. Requests must carry the configured secret header;
//! bodies are bounded in size and time, connections in number and idle time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use super::{ApiHeader, Sink};
use crate::blocks::{Blocks, LoginCheck};
use crate::model::address::parse_any_ip;
use crate::net::http::BodyError;
use crate::net::{self, Conn, Handler, Listen, Server, Spec, Stream};

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
    /// The blocked users, refused at `command=allow` (None: nobody is).
    pub blocks: Option<Blocks>,
}

/// What `%{passdb:proxy:-}` expands to when the passdb did not set the field.
pub const UNSET: &str = "-";

/// The `auth_policy_request_attributes` Dovecot 2.3 must send: its defaults plus `proxy`
/// and `nologin`, defaulting to `-` when absent (present, Dovecot 2.3 expands them to "").
pub const REQUEST_ATTRIBUTES: &str = "login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} device_id=%{client_id} protocol=%s session_id=%{session} proxy=%{passdb:proxy:-} nologin=%{passdb:nologin:-}";

/// The same for Dovecot 2.4, where the setting is a block (a 2.3 line is refused there)
/// that adds to Dovecot's defaults, and `:-` became the `default` filter.
pub const REQUEST_ATTRIBUTES_24: &str = "auth_policy_request_attributes { proxy = %{passdb:proxy | default('-')} nologin = %{passdb:nologin | default('-')} }";

/// No objection.
const ALLOW: &str = r#"{"status":0,"msg":""}"#;

/// The refusal of a blocked user's login: Dovecot fails the authentication on any
/// negative status (`auth_request_policy_check_callback`) and sends `msg` to the client
/// (IMAP `NO [ALERT] ...`, POP3 `-ERR [AUTH] ...`). The cap is the name the policy
/// server recorded; cut so that a damaged file cannot make a long answer.
fn refusal(cap: &str) -> String {
    let cap: String = cap
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_SHOWN)
        .collect();
    serde_json::json!({
        "status": -1,
        "msg": format!("blocked by dovegate: cap {cap} tripped; ask the administrator"),
    })
    .to_string()
}

/// How much of a login name or cap goes into a log line or an answer.
const MAX_SHOWN: usize = 80;

fn shown(text: &str) -> String {
    let mut t: String = text.chars().take(MAX_SHOWN).collect();
    if t.len() < text.len() {
        t.push_str("...");
    }
    t.escape_debug().to_string()
}

/// What a request amounts to, decided without I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A question before a login (`command=allow`): answer it for the `login` and client
    /// address it names (either absent or not text: nobody to refuse); grant nothing.
    Ask {
        login: Option<String>,
        remote: Option<String>,
    },
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
    let ask = match command {
        Some("allow") => true,
        Some("report") => false,
        _ => return Verdict::BadRequest("expected ?command=allow or ?command=report"),
    };
    let parsed = serde_json::from_slice::<serde_json::Value>(body);
    if ask {
        // Never a bad request: an answer Dovecot cannot read counts as "allow" only
        // with auth_policy_reject_on_fail = no, and refusing is not ours to decide here.
        let text = |k: &str| {
            parsed
                .as_ref()
                .ok()
                .and_then(|v| v.get(k))
                .and_then(|x| x.as_str())
                .map(str::to_string)
        };
        return Verdict::Ask {
            login: text("login"),
            remote: text("remote"),
        };
    }
    let Ok(v) = parsed else {
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
    let mut r = json_reply(body.to_string());
    *r.status_mut() = status;
    r
}

fn json_reply(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
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
    conn: Conn,
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
    conn.trust();
    conn.progress();
    let query = req.uri().query().map(str::to_string);
    let body = match net::http::body(req, MAX_BODY, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            sink.invalid("auth policy: request body too large or broken; nothing granted");
            return Ok(reply(StatusCode::PAYLOAD_TOO_LARGE, r#"{"error":"body"}"#));
        }
        Err(BodyError::TooSlow) => {
            sink.invalid("auth policy: request body not sent within 2s; nothing granted");
            return Ok(reply(StatusCode::REQUEST_TIMEOUT, r#"{"error":"timeout"}"#));
        }
    };
    Ok(match judge(query.as_deref(), &body, &cfg.protocols) {
        Verdict::Ask { login, remote } => {
            let (Some(blocks), Some(login)) = (&cfg.blocks, login) else {
                return Ok(reply(StatusCode::OK, ALLOW));
            };
            match blocks.login(&login) {
                LoginCheck::Allowed => reply(StatusCode::OK, ALLOW),
                LoginCheck::Blocked(cap) => {
                    sink.blocked_login(&format!(
                        "auth policy: login of user \"{}\" from {} refused: blocked since it tripped cap {} (policy.block_on_cap; `dovegate unblock USER` lifts it)",
                        shown(&login),
                        shown(remote.as_deref().unwrap_or("-")),
                        shown(&cap),
                    ));
                    json_reply(refusal(&cap))
                }
                LoginCheck::Unreadable(e) => {
                    // Refusing everyone would lock every user out of their mail on a
                    // file dovegate cannot read: allowed, as before the kill switch
                    // (blocked users' grants stay revoked by the engine meanwhile).
                    sink.blocks_unreadable(&format!(
                        "auth policy: cannot read the blocked users ({e}); logins are not refused until it can be read"
                    ));
                    reply(StatusCode::OK, ALLOW)
                }
            }
        }
        Verdict::Ignore => reply(StatusCode::OK, ALLOW),
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
                &format!("auth policy: report without the `proxy` and `nologin` attributes; nothing granted: set auth_policy_request_attributes = {REQUEST_ATTRIBUTES} in Dovecot 2.3, or on Dovecot 2.4 {REQUEST_ATTRIBUTES_24} (one setting a line; see README, \"Auth policy endpoint\")"),
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

/// The endpoint as a `net` server. Anyone who can connect can hold a slot, so a connection
/// that sent the secret is trusted (evicted last) and one that did not send it within
/// `FIRST_REQUEST_TIMEOUT` is closed: Dovecot's connections send it at once.
struct Policy {
    cfg: Arc<PolicyConfig>,
    sink: Sink,
}

impl Handler for Policy {
    fn serve<S: Stream>(
        self: Arc<Self>,
        stream: S,
        conn: Conn,
    ) -> impl Future<Output = ()> + Send + 'static {
        let state = conn.clone();
        let service = hyper::service::service_fn(move |req| {
            handle(req, Arc::clone(&self.cfg), self.sink.clone(), state.clone())
        });
        async move {
            net::http::serve_proven(
                stream,
                &conn,
                FIRST_REQUEST_TIMEOUT,
                HEADER_TIMEOUT,
                MAX_BODY,
                service,
            )
            .await
        }
    }
}

/// Binds the endpoint and serves it.
pub(crate) async fn bind(
    listen: &Listen,
    cfg: PolicyConfig,
    sink: Sink,
) -> std::io::Result<Server> {
    let spec = Spec {
        name: "auth policy endpoint",
        key: "push.auth_policy",
        max_connections: MAX_CONNECTIONS,
        max_key: None,
        // Reports grant: only the daemon's user and group may connect.
        unix_mode: 0o660,
    };
    let reporter = sink.reporter.server(spec.name);
    let handler = Policy {
        cfg: Arc::new(cfg),
        sink,
    };
    net::start_reporting(listen, spec, Arc::new(handler), reporter).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protos() -> Vec<String> {
        vec!["imap".into(), "pop3".into()]
    }

    /// The refusal as Dovecot parses it: a negative status and the text for the client,
    /// escaped, bounded, without control characters.
    #[test]
    fn refusal_is_dovecot_json() {
        let v: serde_json::Value =
            serde_json::from_str(&refusal("user_messages_per_hour")).unwrap();
        assert_eq!(v["status"], -1);
        assert_eq!(
            v["msg"],
            "blocked by dovegate: cap user_messages_per_hour tripped; ask the administrator"
        );
        let odd = format!("a\"b\n{}", "x".repeat(500));
        let v: serde_json::Value = serde_json::from_str(&refusal(&odd)).unwrap();
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.contains("a\"bx") && msg.len() < 200, "{msg}");
        assert_eq!(shown("bob\u{1b}"), "bob\\u{1b}");
        assert_eq!(shown(&"y".repeat(90)), format!("{}...", "y".repeat(80)));
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
        // A question before the login, as Dovecot 2.3 sends it (no `success`).
        let ask = br#"{"device_id":"","login":"alice","nologin":"-","protocol":"pop3","proxy":"-","pwhash":"0a49","remote":"203.0.113.9","session_id":"x","tls":false}"#;
        assert_eq!(
            judge(Some("command=allow"), ask, &protos()),
            Verdict::Ask {
                login: Some("alice".into()),
                remote: Some("203.0.113.9".into())
            }
        );
        // Nobody named: nobody to refuse, never a bad request.
        for body in [&b""[..], b"{", br#"{"login":7}"#] {
            assert_eq!(
                judge(Some("a=b&command=allow"), body, &protos()),
                Verdict::Ask {
                    login: None,
                    remote: None
                }
            );
        }
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
        // The 2.4 block's settings, one a line there (doveconf checks the README's, see
        // tests/dovecot_config.rs).
        for setting in [
            "proxy = %{passdb:proxy | default('-')}",
            "nologin = %{passdb:nologin | default('-')}",
        ] {
            assert!(REQUEST_ATTRIBUTES_24.contains(setting));
            assert!(include_str!("../../README.md").contains(&format!("  {setting}\n")));
            assert!(include_str!("../../tests/support/dovecot.sh").contains(setting));
        }
        assert!(matches!(
            judge(Some("command=reportx"), ok, &protos()),
            Verdict::BadRequest(_)
        ));
    }
}
