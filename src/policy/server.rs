//! The policy server: answers Postfix's `check_policy_service` from the committed grants,
//! the logins behind them, the recently ended grants and the caps.
//!
//! Connections are persistent (one per smtpd process); every request is bounded in size,
//! attributes and time, an idle connection is closed, and a malformed request closes its
//! connection without a reply (Postfix then applies the service's `default_action`; with
//! `DUNNO` the relay stays closed). The socket file, the accept loop and the connection
//! slots (a newcomer finding every slot busy closes the stalest) are `net`'s.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::protocol::{format_reply, parse_request, request_end, Request, Stage, MAX_REQUEST};
use super::receipts::Receipt;
use super::{Context, PolicySettings};
use crate::engine::Lookup;
use crate::net::requests::{self, Closed, Framed, Limits};
use crate::net::{self, Conn, Handler, Peer, Server, Spec, Stream};
use crate::telemetry::ratelimit::SharedLimit;
use crate::telemetry::ServerReporter;
use crate::timefmt;

/// The answer to a client whose grant ended within `policy.recent`.
pub const RECENT_TEXT: &str = "DEFER 4.7.1 check your mail first, then send again";

/// Answers by kind, for metrics and tests.
#[derive(Debug, Default)]
pub struct PolicyStats {
    pub ok: AtomicU64,
    pub dunno: AtomicU64,
    pub defer_recent: AtomicU64,
    pub defer_cap: AtomicU64,
    /// The grants view was unsure (a failed re-read): deferred rather than guessed.
    pub defer_unsure: AtomicU64,
    pub prepend: AtomicU64,
    pub malformed: AtomicU64,
    /// Unix peers whose uid is not in `policy.users`, refused.
    pub peers_refused: AtomicU64,
    pub receipts: AtomicU64,
    /// Users blocked by `policy.block_on_cap`.
    pub users_blocked: AtomicU64,
    /// Addresses with several users behind their grant (as of the last grants file write).
    pub shared_addresses: AtomicU64,
    /// Deferrals per cap.
    caps_tripped: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Whether `[policy]` is on (its metrics are shown).
    pub serving: AtomicBool,
}

impl PolicyStats {
    /// Deferrals per cap name.
    pub fn tripped(&self) -> Vec<(&'static str, u64)> {
        let m = self.caps_tripped.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub(crate) fn trip(&self, cap: &'static str) {
        *self
            .caps_tripped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cap)
            .or_default() += 1;
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What every connection shares: the settings and the server's context.
pub struct State {
    pub cfg: PolicySettings,
    pub ctx: Context,
}

impl State {
    pub fn new(cfg: PolicySettings, ctx: Context) -> State {
        ctx.logins.set_recent(cfg.recent.as_secs() as i64);
        State { cfg, ctx }
    }
}

/// One message's requests on one connection (Postfix asks about a message over the one
/// connection of its smtpd process).
#[derive(Debug, Default)]
pub struct Message {
    instance: String,
    /// Recipients relayed under a grant (answered OK).
    relayed: u32,
}

/// The answer to one request.
pub fn decide(req: &Request, msg: &mut Message, st: &State, now: i64) -> String {
    if req.instance != msg.instance {
        *msg = Message {
            instance: req.instance.clone(),
            relayed: 0,
        };
    }
    let Some(client) = req.client_address else {
        return dunno(st);
    };
    // Logins, caps and recent ends belong to the grant: the client's own, or the IPv6
    // prefix it relays by (grant.ipv6_prefix). Receipts name the client itself.
    let ip = st.ctx.view.granted_under(client);
    match req.stage {
        Stage::Rcpt => rcpt(ip, msg, st, now),
        Stage::Data if msg.relayed > 0 && st.cfg.receipt_header && !req.instance.is_empty() => {
            inc(&st.ctx.stats.prepend);
            let behind = st.ctx.logins.behind(ip);
            format!(
                "PREPEND {}",
                Receipt::new(&req.queue_id, client, behind.as_ref(), now).header()
            )
        }
        Stage::EndOfMessage if msg.relayed > 0 && !req.instance.is_empty() => {
            let behind = st.ctx.logins.behind(ip);
            let user = behind.as_ref().and_then(|b| b.latest()?.user.clone());
            if let Err(cap) = st.ctx.caps.message(&st.cfg.caps, ip, user.as_deref(), now) {
                return cap_reached(st, ip, user.as_deref(), cap);
            }
            inc(&st.ctx.stats.receipts);
            st.ctx
                .receipts
                .record(&Receipt::new(&req.queue_id, client, behind.as_ref(), now));
            dunno(st)
        }
        _ => dunno(st),
    }
}

fn dunno(st: &State) -> String {
    inc(&st.ctx.stats.dunno);
    "DUNNO".into()
}

fn cap_reached(st: &State, ip: IpAddr, user: Option<&str>, cap: &'static str) -> String {
    inc(&st.ctx.stats.defer_cap);
    st.ctx.stats.trip(cap);
    if let (Some(blocks), Some(user), true) = (&st.ctx.blocks, user, st.cfg.block_on_cap) {
        let mut addresses = st.ctx.logins.addresses_of(user);
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
        let count = addresses.len();
        if blocks.block(user, cap, addresses, timefmt::now()) {
            inc(&st.ctx.stats.users_blocked);
            tracing::warn!(
                user = %user.escape_debug(),
                client = %ip,
                cap,
                addresses = count,
                "user blocked (policy.block_on_cap): every grant revoked, no new one until `dovegate unblock USER`"
            );
        }
    }
    tracing::info!(
        client = %ip,
        user = %user.unwrap_or("-").escape_debug(),
        cap,
        "policy: cap reached; deferred"
    );
    format!("DEFER 4.7.1 sending cap {cap} reached, try again later")
}

fn rcpt(ip: IpAddr, msg: &mut Message, st: &State, now: i64) -> String {
    match st.ctx.view.find(ip, now) {
        Lookup::Found(_) => {
            let behind = st.ctx.logins.behind(ip);
            let user = behind.as_ref().and_then(|b| b.latest()?.user.clone());
            if let (Some(b), Some(u)) = (&st.ctx.blocks, &user) {
                // Blocked: its grants are being revoked.
                if b.is_blocked(u) {
                    return dunno(st);
                }
            }
            if let Err(cap) = st
                .ctx
                .caps
                .recipient(&st.cfg.caps, ip, user.as_deref(), now)
            {
                return cap_reached(st, ip, user.as_deref(), cap);
            }
            msg.relayed += 1;
            inc(&st.ctx.stats.ok);
            "OK".into()
        }
        // A stale view may hold a revoked grant: never OK on a guess.
        Lookup::Unsure { guess: Some(_) } => {
            inc(&st.ctx.stats.defer_unsure);
            "DEFER 4.3.0 relay permission cannot be checked now, try again later".into()
        }
        Lookup::Absent | Lookup::Unsure { guess: None } => {
            if st.ctx.logins.ended_recently(ip, now).is_some() {
                inc(&st.ctx.stats.defer_recent);
                RECENT_TEXT.into()
            } else {
                dunno(st)
            }
        }
    }
}

/// Serves one connection until the peer closes it, goes idle, is too slow, or sends a
/// malformed request.
pub async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<State>,
) -> Closed {
    serve(stream, &state, || {}).await
}

/// `handle_connection`, calling `progress` when a request begins and after each reply.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    st: &State,
    progress: impl FnMut(),
) -> Closed {
    let limits = Limits {
        idle: st.cfg.idle_timeout,
        request: st.cfg.request_timeout(),
        read_chunk: 4096,
    };
    let mut msg = Message::default();
    let answer = |buf: &[u8]| {
        let Some(end) = request_end(buf) else {
            if buf.len() > MAX_REQUEST {
                inc(&st.ctx.stats.malformed);
                return Framed::Malformed;
            }
            return Framed::Incomplete;
        };
        match parse_request(&buf[..end]) {
            Ok(req) => Framed::Reply {
                reply: format_reply(&decide(&req, &mut msg, st, timefmt::now())),
                used: end,
            },
            Err(e) => {
                inc(&st.ctx.stats.malformed);
                tracing::debug!(error = %e, "malformed policy request; closing");
                Framed::Malformed
            }
        }
    };
    requests::serve(stream, limits, answer, progress).await
}

/// At most one WARN line per this interval about closed or refused connections.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The policy server as a `net` server: each connection is served by `serve`.
struct Policy {
    state: Arc<State>,
    /// The WARN about connections closed for a malformed, slow or unread request.
    closed: SharedLimit,
    /// The WARN about unix peers not in `policy.users`.
    refused: SharedLimit,
}

impl Policy {
    /// Whether the peer may ask: a unix peer's uid must be one of `policy.users` (anyone,
    /// when none is set: inet on loopback, or a socket without users).
    fn peer_allowed<S: Stream>(&self, stream: &S) -> bool {
        let Some(peers) = &self.state.cfg.peers else {
            return true;
        };
        let peer = stream.peer();
        if let Ok(Peer::Unix { uid, .. }) = peer {
            if peers.contains(&uid) {
                return true;
            }
        }
        inc(&self.state.ctx.stats.peers_refused);
        if let Some(n) = self.refused.hit() {
            tracing::warn!(
                peer = ?peer.ok(),
                refused = n,
                "policy connection from a user not in policy.users refused (count since the last such line)"
            );
        }
        false
    }
}

impl Handler for Policy {
    async fn serve<S: Stream>(self: Arc<Self>, stream: S, conn: Conn) {
        if !self.peer_allowed(&stream) {
            return;
        }
        let why = serve(stream, &self.state, || conn.progress()).await;
        if matches!(
            why,
            Closed::SlowRequest | Closed::SlowReader | Closed::Malformed
        ) {
            if let Some(n) = self.closed.hit() {
                tracing::warn!(
                    closed = n,
                    "policy connections closed: a request was malformed, too long or too \
                     slow, or a reply was not read (count since the last such line)"
                );
            }
        }
    }
}

/// Binds and serves in the background (on the current tokio runtime) until `shutdown`.
/// A unix socket that another server still accepts on is never removed: that is an error.
pub async fn start(state: Arc<State>) -> std::io::Result<Server> {
    let reporter = ServerReporter::standalone(NAME);
    start_under(&tokio_util::sync::CancellationToken::new(), state, reporter).await
}

/// The server's name in log lines and metrics.
pub const NAME: &str = "policy server";

/// `start`, stopped also when `parent` is cancelled, reporting to `reporter`.
pub async fn start_under(
    parent: &tokio_util::sync::CancellationToken,
    state: Arc<State>,
    reporter: ServerReporter,
) -> std::io::Result<Server> {
    let spec = Spec {
        name: NAME,
        key: "policy.listen",
        max_connections: state.cfg.max_connections,
        max_key: Some("policy.max_connections"),
        // smtpd connects as postfix; the peer's uid (policy.users) is what is checked.
        unix_mode: 0o666,
    };
    let listen = state.cfg.listen.clone();
    let handler = Policy {
        state,
        closed: SharedLimit::new(LOG_EVERY),
        refused: SharedLimit::new(LOG_EVERY),
    };
    net::start_under(parent, &listen, spec, Arc::new(handler), reporter).await
}

#[cfg(test)]
mod tests;
