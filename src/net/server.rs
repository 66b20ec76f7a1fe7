//! One server: binds its address (a unix socket through the careful claim), accepts with
//! backoff, gives each connection a slot (evicting the stalest when every slot is busy)
//! and serves it in its own task until it ends or is evicted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::slots::{Admission, Slot, Slots};
use super::socket_file::{self, Claim};
use super::{accept, Label, Listen};
use crate::telemetry::{ServerReport, ServerReporter};

/// What a server is, for its limits and its log lines.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// In log lines: "socketmap", "push socket".
    pub name: &'static str,
    /// The configuration key of the address ("serve.socketmap").
    pub key: &'static str,
    /// Connections served at once; a newcomer beyond them evicts the stalest.
    pub max_connections: usize,
    /// The setting that raises `max_connections`, if there is one.
    pub max_key: Option<&'static str>,
    /// A unix socket's mode: who may connect.
    pub unix_mode: u32,
}

/// Who is at the other end, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A unix socket peer's credentials (SO_PEERCRED).
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
    Inet(SocketAddr),
}

/// A connection stream a handler can serve.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn peer(&self) -> io::Result<Peer>;
}

impl Stream for tokio::net::UnixStream {
    fn peer(&self) -> io::Result<Peer> {
        let c = self.peer_cred()?;
        Ok(Peer::Unix {
            uid: c.uid(),
            pid: c.pid(),
        })
    }
}

impl Stream for tokio::net::TcpStream {
    fn peer(&self) -> io::Result<Peer> {
        self.peer_addr().map(Peer::Inet)
    }
}

/// What a server does with each connection.
pub trait Handler: Send + Sync + 'static {
    /// Serves one connection until it ends. Dropped (the connection closed) when a
    /// newcomer evicts it.
    fn serve<S: Stream>(
        self: Arc<Self>,
        stream: S,
        conn: Conn,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A connection's slot, as its handler sees it.
#[derive(Clone)]
pub struct Conn(Arc<Slot>);

impl Conn {
    /// A request began or was answered: the connection is in use, not stale.
    pub fn progress(&self) {
        self.0.progress()
    }

    /// The peer proved who it is (a secret): evicted only after every untrusted one.
    pub fn trust(&self) {
        self.0.trust()
    }

    /// Whether the peer proved who it is.
    pub fn trusted(&self) -> bool {
        self.0.trusted()
    }
}

/// How long a newcomer waits for the slot of the connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// File descriptors the rest of the daemon may need besides one server's connections
/// (logs, the map, journalctl pipes, the other servers).
const FD_RESERVE: u64 = 128;

struct Shared<H> {
    spec: Spec,
    handler: Arc<H>,
    slots: Arc<Slots>,
    /// Refusals and evictions are reported (counted, and logged at a bounded rate).
    reporter: ServerReporter,
}

impl<H: Handler> Shared<H> {
    fn refused(&self) {
        self.reporter.report(ServerReport::Refused {
            max_connections: self.spec.max_connections,
            raise: self.spec.max_key,
        });
    }

    /// Serves `stream` in its own task once it has a slot: a free one, or the one of the
    /// stalest connection, which it closes; refuses it (closes it at once) when even the
    /// newcomers waiting for a slot fill every slot.
    fn connection<S: Stream>(self: &Arc<Self>, stream: S) {
        let waiter = match self.slots.admit() {
            Admission::Refused => return self.refused(),
            Admission::Now(slot) => Ok(slot),
            Admission::AfterEviction(w) => {
                self.reporter.report(ServerReport::Evicted {
                    max_connections: self.spec.max_connections,
                });
                Err(w)
            }
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
            let conn = Conn(Arc::new(slot));
            let serving = Arc::clone(&shared.handler).serve(stream, conn.clone());
            tokio::select! {
                _ = serving => {}
                _ = conn.0.evicted() => {}
            }
        });
    }
}

/// Warns when the open-files limit cannot fit `max_connections`: accepts would then fail
/// with EMFILE before the connection limit is reached.
fn check_fd_limit(spec: &Spec) {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let need = spec.max_connections as u64 + FD_RESERVE;
    if soft != RLIM_INFINITY && soft < need {
        let lower = spec
            .max_key
            .map(|k| format!(", or lower {k}"))
            .unwrap_or_default();
        tracing::warn!(
            "{}: {} connections need about {need} open files, but the limit (RLIMIT_NOFILE) \
             is {soft}: set LimitNOFILE={need} or more in the unit (ulimit -n){lower}",
            spec.name,
            spec.max_connections
        );
    }
}

/// A running server. Dropping it leaves the server running until the runtime ends;
/// `shutdown` (or cancelling the token it was started under) stops it and removes its
/// socket file if the path still names it.
pub struct Server {
    /// Its own token: a child of the one it was started under, so that it can be stopped
    /// alone (a reload) while the parent stops every server (shutdown).
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    listen: Listen,
}

impl Server {
    /// Where it listens (for `inet:` with port 0, the port chosen).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting and removes the unix socket file if the path still names it.
    /// Connections already open are served until the runtime ends.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds `listen` and serves it in the background (on the current tokio runtime). A unix
/// socket that another server still accepts on is never removed: that is an error.
pub async fn start<H: Handler>(listen: &Listen, spec: Spec, handler: Arc<H>) -> io::Result<Server> {
    let reporter = ServerReporter::standalone(spec.name);
    start_under(&CancellationToken::new(), listen, spec, handler, reporter).await
}

/// `start`, with what it reports going to `reporter`'s observers (the daemon's counters and
/// log).
pub async fn start_reporting<H: Handler>(
    listen: &Listen,
    spec: Spec,
    handler: Arc<H>,
    reporter: ServerReporter,
) -> io::Result<Server> {
    start_under(&CancellationToken::new(), listen, spec, handler, reporter).await
}

/// `start_reporting`, stopped also when `parent` is cancelled (the daemon's shutdown).
pub async fn start_under<H: Handler>(
    parent: &CancellationToken,
    listen: &Listen,
    spec: Spec,
    handler: Arc<H>,
    reporter: ServerReporter,
) -> io::Result<Server> {
    check_fd_limit(&spec);
    let label = Label {
        name: spec.name,
        max_key: spec.max_key,
    };
    let shared = Arc::new(Shared {
        spec,
        handler,
        slots: Slots::new(spec.max_connections),
        reporter: reporter.clone(),
    });
    let stop = parent.child_token();
    let stopped = stop.clone();
    let (task, listen) = match listen {
        Listen::Unix(path) => {
            let claim = Claim {
                path,
                mode: spec.unix_mode,
                name: spec.name,
                key: spec.key,
            };
            let (listener, file) = socket_file::bind(claim).await?;
            tracing::info!(socket = %path.display(), "{} listening", spec.name);
            let task = tokio::spawn(async move {
                accept::run(listener, label, stopped, reporter, |s| shared.connection(s)).await;
                // Removes the file (if ours) when the loop stops or the runtime ends.
                drop(file);
            });
            (task, Listen::Unix(path.clone()))
        }
        Listen::Inet(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            tracing::info!(address = %local, "{} listening", spec.name);
            let task = tokio::spawn(async move {
                accept::run(listener, label, stopped, reporter, |s| shared.connection(s)).await;
            });
            (task, Listen::Inet(local))
        }
    };
    Ok(Server { stop, task, listen })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::observe::Recorder;
    use crate::telemetry::StatsRegistry;

    /// Holds every connection open until the peer closes it.
    struct Hold;

    impl Handler for Hold {
        async fn serve<S: Stream>(self: Arc<Self>, mut stream: S, _conn: Conn) {
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut [0u8; 1]).await;
        }
    }

    /// A newcomer that finds every slot held closes the stalest: reported to the observers
    /// and counted where the metrics read, without reading the log.
    #[tokio::test]
    async fn an_eviction_is_reported_and_counted() {
        let registry = StatsRegistry::default();
        let seen = Arc::new(Recorder::default());
        registry.observe_with(seen.clone());
        let spec = Spec {
            name: "test server",
            key: "test.listen",
            max_connections: 1,
            max_key: Some("test.max_connections"),
            unix_mode: 0o600,
        };
        let listen = Listen::Inet("127.0.0.1:0".parse().unwrap());
        let reporter = registry.server_reporter(spec.name);
        let server = start_reporting(&listen, spec, Arc::new(Hold), reporter)
            .await
            .unwrap();
        let Listen::Inet(addr) = *server.listen() else {
            panic!("inet")
        };
        let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let evicted = || {
            seen.server_reports().iter().any(|(s, r)| {
                s == "test server" && *r == ServerReport::Evicted { max_connections: 1 }
            })
        };
        let mut _newer = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !evicted() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no eviction reported"
            );
            _newer.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let counted = registry.servers();
        assert_eq!(counted[0].0, "test server");
        assert!(
            counted[0]
                .1
                .evicted
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        server.shutdown().await;
    }
}
