//! The policy server: answers Postfix's `check_policy_service` from the committed grants,
//! the logins behind them, the recently ended grants and the caps.
//!
//! Connections are persistent (one per smtpd process); every request is bounded in size,
//! attributes and time, an idle connection is closed, and a malformed request closes its
//! connection without a reply (Postfix then applies the service's `default_action`; with
//! `DUNNO` the relay stays closed). Connection slots and the socket file are the
//! socketmap server's.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::caps::Caps;
use super::protocol::{format_reply, parse_request, request_end, Request, Stage, MAX_REQUEST};
use super::receipts::{Receipt, ReceiptLog};
use super::PolicySettings;
use crate::engine::{Blocks, GrantsView, LoginsView, Lookup};
use crate::serve::socketmap::log_limit::LogLimit;
use crate::serve::socketmap::slots::{Admission, Slots};
use crate::serve::socketmap::{accept, socket_file, Closed, Listen};
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
    pub receipts: AtomicU64,
    /// Users blocked by `policy.block_on_cap`.
    pub users_blocked: AtomicU64,
    /// Addresses with several users behind their grant (as of the last grants file write).
    pub shared_addresses: AtomicU64,
    /// Deferrals per cap.
    caps_tripped: Mutex<std::collections::BTreeMap<&'static str, u64>>,
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

/// What every connection shares.
pub struct State {
    pub cfg: PolicySettings,
    pub view: GrantsView,
    pub logins: LoginsView,
    pub caps: Caps,
    pub receipts: ReceiptLog,
    pub stats: Arc<PolicyStats>,
    /// Where blocked users are kept (`policy.block_on_cap`; None: off).
    pub blocks: Option<Blocks>,
}

impl State {
    pub fn new(
        cfg: PolicySettings,
        view: GrantsView,
        logins: LoginsView,
        receipts: ReceiptLog,
        stats: Arc<PolicyStats>,
    ) -> State {
        logins.set_recent(cfg.recent.as_secs() as i64);
        State {
            caps: Caps::new(cfg.caps),
            cfg,
            view,
            logins,
            receipts,
            stats,
            blocks: None,
        }
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
    let Some(ip) = req.client_address else {
        return dunno(st);
    };
    match req.stage {
        Stage::Rcpt => rcpt(ip, msg, st, now),
        Stage::Data if msg.relayed > 0 && st.cfg.receipt_header && !req.instance.is_empty() => {
            inc(&st.stats.prepend);
            let behind = st.logins.behind(ip);
            format!(
                "PREPEND {}",
                Receipt::new(&req.queue_id, ip, behind.as_ref(), now).header()
            )
        }
        Stage::EndOfMessage if msg.relayed > 0 && !req.instance.is_empty() => {
            let behind = st.logins.behind(ip);
            let user = behind.as_ref().and_then(|b| b.latest()?.user.clone());
            if let Err(cap) = st.caps.message(ip, user.as_deref(), now) {
                return cap_reached(st, ip, user.as_deref(), cap);
            }
            inc(&st.stats.receipts);
            st.receipts
                .record(&Receipt::new(&req.queue_id, ip, behind.as_ref(), now));
            dunno(st)
        }
        _ => dunno(st),
    }
}

fn dunno(st: &State) -> String {
    inc(&st.stats.dunno);
    "DUNNO".into()
}

fn cap_reached(st: &State, ip: IpAddr, user: Option<&str>, cap: &'static str) -> String {
    inc(&st.stats.defer_cap);
    st.stats.trip(cap);
    if let (Some(blocks), Some(user), true) = (&st.blocks, user, st.cfg.block_on_cap) {
        let mut addresses = st.logins.addresses_of(user);
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
        let count = addresses.len();
        if blocks.block(user, cap, addresses, timefmt::now()) {
            inc(&st.stats.users_blocked);
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
    match st.view.find(ip, now) {
        Lookup::Found(_) => {
            let behind = st.logins.behind(ip);
            let user = behind.as_ref().and_then(|b| b.latest()?.user.clone());
            if let (Some(b), Some(u)) = (&st.blocks, &user) {
                // Blocked: its grants are being revoked.
                if b.is_blocked(u) {
                    return dunno(st);
                }
            }
            if let Err(cap) = st.caps.recipient(ip, user.as_deref(), now) {
                return cap_reached(st, ip, user.as_deref(), cap);
            }
            msg.relayed += 1;
            inc(&st.stats.ok);
            "OK".into()
        }
        // A stale view may hold a revoked grant: never OK on a guess.
        Lookup::Unsure { guess: Some(_) } => {
            inc(&st.stats.defer_unsure);
            "DEFER 4.3.0 relay permission cannot be checked now, try again later".into()
        }
        Lookup::Absent | Lookup::Unsure { guess: None } => {
            if st.logins.ended_recently(ip, now).is_some() {
                inc(&st.stats.defer_recent);
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
    mut stream: S,
    st: &State,
    mut progress: impl FnMut(),
) -> Closed {
    let request_timeout = st.cfg.request_timeout();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut msg = Message::default();
    let mut started: Option<Instant> = None;
    loop {
        while let Some(end) = request_end(&buf) {
            let reply = match parse_request(&buf[..end]) {
                Ok(req) => format_reply(&decide(&req, &mut msg, st, timefmt::now())),
                Err(e) => {
                    inc(&st.stats.malformed);
                    tracing::debug!(error = %e, "malformed policy request; closing");
                    return Closed::Malformed;
                }
            };
            buf.drain(..end);
            match tokio::time::timeout(request_timeout, stream.write_all(&reply)).await {
                Ok(Ok(())) => progress(),
                Ok(Err(_)) => return Closed::Peer,
                Err(_) => return Closed::SlowReader,
            }
            started = (!buf.is_empty()).then(Instant::now);
        }
        if buf.len() > MAX_REQUEST {
            inc(&st.stats.malformed);
            return Closed::Malformed;
        }
        let read = stream.read(&mut chunk);
        let read = match started {
            None => tokio::time::timeout(st.cfg.idle_timeout, read)
                .await
                .map_err(|_| Closed::Idle),
            Some(t) => tokio::time::timeout_at(t + request_timeout, read)
                .await
                .map_err(|_| Closed::SlowRequest),
        };
        match read {
            Err(why) => return why,
            Ok(Ok(0)) | Ok(Err(_)) => return Closed::Peer,
            Ok(Ok(n)) => {
                if started.is_none() {
                    started = Some(Instant::now());
                    progress();
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// How long a newcomer waits for the slot of the connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

struct Shared {
    state: Arc<State>,
    slots: Arc<Slots>,
    refused: Mutex<LogLimit>,
    slow: Mutex<LogLimit>,
}

fn hit(limit: &Mutex<LogLimit>) -> Option<u64> {
    limit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .hit(std::time::Instant::now())
}

impl Shared {
    fn refused(&self) {
        if let Some(n) = hit(&self.refused) {
            tracing::warn!(
                refused = n,
                max_connections = self.state.cfg.max_connections,
                "policy connections refused: every policy.max_connections slot is busy and as \
                 many newcomers wait (count since the last such line)"
            );
        }
    }

    /// Whether a unix peer's uid is one of `policy.users` (always, when none is set).
    fn peer_allowed(&self, s: &tokio::net::UnixStream) -> bool {
        let Some(peers) = &self.state.cfg.peers else {
            return true;
        };
        let uid = s.peer_cred().ok().map(|c| c.uid());
        if uid.is_some_and(|u| peers.contains(&u)) {
            return true;
        }
        inc(&self.state.stats.malformed);
        if let Some(n) = hit(&self.refused) {
            tracing::warn!(
                uid = ?uid,
                refused = n,
                "policy connection from a user not in policy.users refused (count since the last such line)"
            );
        }
        false
    }

    fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self: &Arc<Self>, stream: S) {
        let waiter = match self.slots.admit() {
            Admission::Refused => return self.refused(),
            Admission::Now(slot) => Ok(slot),
            Admission::AfterEviction(w) => Err(w),
        };
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let slot = match waiter {
                Ok(slot) => slot,
                Err(w) => match w.slot(EVICTION_WAIT).await {
                    Some(slot) => slot,
                    None => return shared.refused(),
                },
            };
            let why = tokio::select! {
                why = serve(stream, &shared.state, || slot.progress()) => why,
                _ = slot.evicted() => Closed::Evicted,
            };
            drop(slot);
            if matches!(
                why,
                Closed::SlowRequest | Closed::SlowReader | Closed::Malformed
            ) {
                if let Some(n) = hit(&shared.slow) {
                    tracing::warn!(
                        closed = n,
                        "policy connections closed: a request was malformed, too long or too \
                         slow, or a reply was not read (count since the last such line)"
                    );
                }
            }
        });
    }
}

/// A running policy server.
pub struct Server {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    listen: Listen,
}

impl Server {
    /// Where it listens (for port 0, the port chosen).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting and removes the socket file if still ours.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds and serves in the background until `shutdown` (or the runtime ends).
pub async fn start(state: Arc<State>) -> std::io::Result<Server> {
    let shared = Arc::new(Shared {
        slots: Slots::new(state.cfg.max_connections),
        state,
        refused: Mutex::new(LogLimit::new(LOG_EVERY)),
        slow: Mutex::new(LogLimit::new(LOG_EVERY)),
    });
    let (stop, stopped) = watch::channel(false);
    let (task, listen) = match shared.state.cfg.listen.clone() {
        Listen::Unix(path) => {
            let (listener, file) = socket_file::bind(&path).await?;
            tracing::info!(socket = %path.display(), "policy server listening");
            let task = tokio::spawn(async move {
                accept::run(listener, stopped, |s: tokio::net::UnixStream| {
                    if shared.peer_allowed(&s) {
                        shared.connection(s)
                    }
                })
                .await;
                drop(file);
            });
            (task, Listen::Unix(path))
        }
        Listen::Inet(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            tracing::info!(address = %local, "policy server listening");
            let task = tokio::spawn(async move {
                accept::run(listener, stopped, |s| shared.connection(s)).await;
            });
            (task, Listen::Inet(local))
        }
    };
    Ok(Server { stop, task, listen })
}

#[cfg(test)]
mod tests;
