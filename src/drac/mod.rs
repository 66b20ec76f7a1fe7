//! DRAC clients (`[drac]`): POP/IMAP servers with a DRAC patch or plugin call
//! `dracauth()`, an ONC RPC to program 900101 that `rpc.dracd` served; dovegate serves it
//! instead, over UDP and TCP, registered with the host's rpcbind (where clients find it).
//!
//! - `rpc`: the messages (no I/O): what a datagram or record asks, and the replies.
//! - `server`: the UDP loop and the TCP handler (the `net` accept loop, its slots and
//!   clocks), each request answered at once without waiting for the engine.
//! - `rpcbind`: SET, UNSET and GETADDR with rpcbind over its unix socket.
//!
//! An ADD from a peer in `drac.allow` is a login like any other: it becomes the same
//! `Batch` as pushed logins (policy, exclusions, ttl), with an audit line naming the DRAC
//! client (`source=drac:PEER`). An ADD from any other peer is answered `ADD_PERM`, counted
//! and logged (rate-limited); nothing else grants.

pub mod rpc;
pub mod rpcbind;
pub mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::drac::DracSettings;
use crate::model::{Batch, LoginDetail, SeenLogin};
use crate::net::background::{Background, Setup};
use crate::net::{Listen, StartError};
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::{Count, Level, Report, Reporter, StatsRegistry};

/// The `Batch::source` of DRAC adds (no position; distinct from the other sources').
pub const DRAC_SOURCE: usize = usize::MAX - 2;
/// The name of this source in the metrics.
pub const ORIGIN: &str = "drac";
/// Adds waiting for the engine at most; beyond, a client is answered `ADD_SYSERR`.
const QUEUE: usize = 4096;
/// Adds sent to the engine in one batch at most.
const BATCH: usize = 256;

/// What one message from `peer` asks, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No answer (not a call, or too short or long to be one).
    Ignore,
    /// The answer to a NULL call.
    Reply(Vec<u8>),
    /// An RPC error (another program, version or procedure, malformed arguments or
    /// credentials): nothing granted.
    Error(Vec<u8>),
    /// An ADD from a peer outside `drac.allow`: this `ADD_PERM` reply, nothing granted.
    Denied(Vec<u8>),
    /// A well-formed ADD from an allowed peer: grant `ip` (answered once queued).
    Add { xid: u32, ip: Ipv4Addr },
}

/// Decides one message (a datagram, or a record without its marker) from `peer`.
pub fn decide(msg: &[u8], peer: IpAddr, settings: &DracSettings) -> Decision {
    let parsed = rpc::parse(msg);
    let Some(xid) = parsed.xid else {
        return Decision::Ignore;
    };
    match parsed.call {
        Err(why) => rpc::refusal(Some(xid), why).map_or(Decision::Ignore, Decision::Error),
        Ok(rpc::Call::Null) => Decision::Reply(rpc::success(xid, None)),
        Ok(rpc::Call::Add(ip)) if settings.allows(peer) => Decision::Add { xid, ip },
        Ok(rpc::Call::Add(_)) => Decision::Denied(rpc::success(xid, Some(rpc::AddStat::Perm))),
    }
}

/// Takes each request as it arrives: decides, counts and queues it without waiting.
pub(crate) struct Intake {
    settings: DracSettings,
    queue: mpsc::Sender<SeenLogin>,
    /// What it declines, each kind rate-limited on its own by the log.
    reporter: Reporter,
}

impl Intake {
    /// A datagram the socket could not receive (said at a bounded rate).
    pub(crate) fn receive_failed(&self, e: &std::io::Error) {
        self.reporter.report(Report::Fault {
            kind: "receive",
            what: format!("drac: cannot receive a datagram: {e}"),
            level: Level::Warn,
        });
    }

    /// The reply to one message from `peer` (None: none is sent).
    pub(crate) fn answer(&self, msg: &[u8], peer: IpAddr) -> Option<Vec<u8>> {
        let peer = peer.to_canonical();
        match decide(msg, peer, &self.settings) {
            Decision::Ignore => {
                self.reporter.decline(
                    Count::InvalidAddress,
                    "invalid",
                    format!(
                        "drac: {} bytes from {peer} are not an RPC call; ignored, nothing granted",
                        msg.len()
                    ),
                );
                None
            }
            Decision::Reply(r) => Some(r),
            Decision::Error(r) => {
                self.reporter.decline(Count::InvalidAddress, "invalid", format!(
                    "drac: a call from {peer} that is not a DRAC add; answered with an RPC error, nothing granted"
                ));
                Some(r)
            }
            Decision::Denied(r) => {
                self.reporter.decline(Count::Forged, "refused", format!(
                    "drac: {peer} is not in drac.allow; its add was answered permission denied, nothing granted"
                ));
                Some(r)
            }
            Decision::Add { xid, ip } => {
                self.reporter.stats().logins.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(address = %ip, client = %peer, "DRAC add");
                let login = SeenLogin {
                    ip: IpAddr::V4(ip),
                    time: Some(crate::timefmt::now()),
                    session: None,
                    detail: Some(Box::new(LoginDetail {
                        user: None,
                        protocol: "drac".into(),
                        session: None,
                        pattern: "drac".into(),
                        source: format!("drac:{peer}"),
                    })),
                };
                let status = match self.queue.try_send(login) {
                    Ok(()) => rpc::AddStat::Success,
                    Err(_) => {
                        self.reporter.decline(Count::NearMiss("queue-full"), "dropped", format!(
                            "drac: the engine's queue is full; the add of {ip} from {peer} was answered system error"
                        ));
                        rpc::AddStat::SysErr
                    }
                };
                Some(rpc::success(xid, Some(status)))
            }
        }
    }
}

/// Moves queued adds to the engine in batches; only this task ever waits for it.
async fn forward(mut rx: mpsc::Receiver<SeenLogin>, tx: mpsc::Sender<Batch>) {
    while let Some(first) = rx.recv().await {
        let mut logins = vec![first];
        while logins.len() < BATCH {
            match rx.try_recv() {
                Ok(l) => logins.push(l),
                Err(_) => break,
            }
        }
        let batch = Batch {
            source: DRAC_SOURCE,
            logins,
            ends: Vec::new(),
            position: None,
        };
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// How often a registration that holds is checked (rpcbind restarted forgets it).
const RECHECK: Duration = Duration::from_secs(30);
/// The longest pause between attempts while registration fails.
const MAX_RETRY: Duration = Duration::from_secs(10);

/// Keeps DRAC registered with rpcbind for `addrs` (netid, address): registers now, says
/// loudly when it cannot (and again at a bounded rate while it cannot), retries, and
/// registers again when rpcbind has lost it.
async fn keep_registered(socket: PathBuf, addrs: Vec<(&'static str, SocketAddrV4)>) {
    let mut remind = RateLimit::new(crate::telemetry::ratelimit::REMIND_EVERY);
    let mut failures: u64 = 0;
    let mut pause = Duration::from_secs(1);
    let mut registered = false;
    loop {
        let (path, want) = (socket.clone(), addrs.clone());
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let mut changed = false;
            for (netid, addr) in want {
                if !rpcbind::registered(&path, netid, &rpcbind::uaddr(addr))? {
                    rpcbind::register(&path, netid, addr)?;
                    changed = true;
                }
            }
            Ok(changed)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match result {
            Ok(changed) => {
                if failures > 0 {
                    tracing::info!(
                        failures,
                        "drac: registered with rpcbind ({}) again; DRAC clients can find dovegate",
                        socket.display()
                    );
                } else if changed && registered {
                    tracing::warn!(
                        "drac: rpcbind had lost DRAC's registration (restarted?); registered again"
                    );
                } else if changed {
                    let what = addrs
                        .iter()
                        .map(|(n, a)| format!("{n} {a}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    tracing::info!(
                        "drac: registered program {} version {} with rpcbind: {what}",
                        rpc::PROGRAM,
                        rpc::VERSION
                    );
                }
                failures = 0;
                registered = true;
                pause = Duration::from_secs(1);
                tokio::time::sleep(RECHECK).await;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::error!("drac: cannot register with rpcbind ({}): {e}; DRAC clients cannot find dovegate until it can (is rpcbind running?); retrying", socket.display());
                } else if let Some(n) = remind.hit() {
                    tracing::error!(
                        failures = n,
                        "drac: still cannot register with rpcbind ({}): {e}; retrying",
                        socket.display()
                    );
                }
                registered = false;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The running DRAC server; dropping it stops it and removes its rpcbind registration.
pub struct Drac {
    background: Option<Background>,
    /// rpcbind's socket, when something was (or may have been) registered.
    rpcbind: Option<PathBuf>,
}

impl Drac {
    pub fn idle() -> Drac {
        Drac {
            background: None,
            rpcbind: None,
        }
    }
}

/// Idle: nothing served, nothing registered.
impl Default for Drac {
    fn default() -> Drac {
        Drac::idle()
    }
}

impl Drop for Drac {
    fn drop(&mut self) {
        // The servers and the registration task first: nothing registers after the UNSET.
        drop(self.background.take());
        if let Some(socket) = self.rpcbind.take() {
            let mut removed = true;
            for netid in rpcbind::NETIDS {
                match rpcbind::unregister(&socket, netid) {
                    Ok(_) => {}
                    // No rpcbind: nothing of ours is registered (already said at start).
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        removed = false
                    }
                    Err(e) => {
                        removed = false;
                        tracing::warn!(
                            "drac: cannot remove the {netid} registration from rpcbind ({}): {e}",
                            socket.display()
                        )
                    }
                }
            }
            if removed {
                tracing::info!("drac: stopped; registration removed from rpcbind");
            } else {
                tracing::info!("drac: stopped");
            }
        }
    }
}

/// Starts the DRAC server when `drac.allow` is set (else an idle `Drac`). The sockets are
/// bound before this returns, so an error names the address at fault; registration with
/// rpcbind goes on in the background (a missing rpcbind is logged and retried, never
/// fatal).
///
/// The task that hands queued adds to the engine runs on `forward_on` (the daemon's own
/// runtime), not on the server's: an add answered success is forwarded even after the
/// server is dropped (a reload that changes `[drac]`, shutdown). `stop`: cancelled, it
/// stops the server too.
pub fn spawn(
    settings: &DracSettings,
    tx: mpsc::Sender<Batch>,
    stats: &StatsRegistry,
    forward_on: &tokio::runtime::Handle,
    stop: &CancellationToken,
) -> Result<Drac, StartError> {
    spawn_with(
        settings,
        tx,
        stats,
        PathBuf::from(rpcbind::SOCKET),
        forward_on,
        stop,
    )
}

/// `spawn` with another rpcbind socket (tests).
pub fn spawn_with(
    settings: &DracSettings,
    tx: mpsc::Sender<Batch>,
    stats: &StatsRegistry,
    rpcbind_socket: PathBuf,
    forward_on: &tokio::runtime::Handle,
    stop: &CancellationToken,
) -> Result<Drac, StartError> {
    if !settings.enabled() {
        return Ok(Drac::idle());
    }
    let mut setup = Setup::new(stop).map_err(StartError::runtime("drac"))?;
    let (queue, rx) = mpsc::channel(QUEUE);
    let intake = Arc::new(Intake {
        settings: settings.clone(),
        queue,
        reporter: stats.reporter(ORIGIN),
    });
    let (udp, tcp) = setup
        .bind_with(server::bind(settings, Arc::clone(&intake)))
        .map_err(|error| StartError::Listen {
            key: "drac.listen",
            listen: Listen::Inet(SocketAddrV4::new(settings.listen, settings.port).into()),
            error,
        })?;
    let nets = settings
        .allow
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(udp = %udp, tcp = %tcp, allow = %nets, "drac: serving DRAC clients");
    forward_on.spawn(forward(rx, tx));
    setup.spawn(keep_registered(
        rpcbind_socket.clone(),
        vec![("udp", udp), ("tcp", tcp)],
    ));
    let background = setup.run("drac").map_err(StartError::thread("drac"))?;
    Ok(Drac {
        background: Some(background),
        rpcbind: Some(rpcbind_socket),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DracSettings {
        DracSettings {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn only_an_allowed_add_grants() {
        let s = settings();
        let add = rpc::call(3, rpc::PROGRAM, 1, 1, &[198, 51, 100, 7]);
        let inside: IpAddr = "192.0.2.5".parse().unwrap();
        let outside: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(
            decide(&add, inside, &s),
            Decision::Add {
                xid: 3,
                ip: Ipv4Addr::new(198, 51, 100, 7)
            }
        );
        assert!(matches!(decide(&add, outside, &s), Decision::Denied(_)));
        let null = rpc::call(4, rpc::PROGRAM, 1, 0, &[]);
        assert!(matches!(decide(&null, outside, &s), Decision::Reply(_)));
        let v2 = rpc::call(5, rpc::PROGRAM, 2, 1, &[0; 16]);
        assert!(matches!(decide(&v2, inside, &s), Decision::Error(_)));
        assert_eq!(decide(b"junk", inside, &s), Decision::Ignore);
    }

    #[tokio::test]
    async fn a_full_queue_answers_system_error() {
        let (queue, mut rx) = mpsc::channel(1);
        let intake = Intake {
            settings: settings(),
            queue,
            reporter: Reporter::standalone(ORIGIN),
        };
        let peer: IpAddr = "192.0.2.5".parse().unwrap();
        let add = rpc::call(3, rpc::PROGRAM, 1, 1, &[198, 51, 100, 7]);
        let ok = intake.answer(&add, peer).unwrap();
        assert_eq!(ok, rpc::success(3, Some(rpc::AddStat::Success)));
        let full = intake.answer(&add, peer).unwrap();
        assert_eq!(full, rpc::success(3, Some(rpc::AddStat::SysErr)));
        let l = rx.try_recv().unwrap();
        assert_eq!(l.detail.unwrap().source, "drac:192.0.2.5");
    }
}
