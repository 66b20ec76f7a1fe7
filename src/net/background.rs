//! Servers fed by Dovecot (push socket, auth policy, events) run on a thread of their own
//! with a small runtime: they share nothing with the engine but a channel, so a busy engine
//! never delays an answer to Dovecot, and stopping them (a reload, shutdown) is dropping
//! the `Background` handle, or cancelling the token they were set up under (the daemon's
//! shutdown stops every one at once).

use std::future::Future;
use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use super::Server;

/// How long dropping a `Background` waits for its thread before it says so (and waits on:
/// its servers' sockets must be gone before they start again).
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Servers being set up: bound (and tasks spawned) on their runtime, not yet running.
pub struct Setup {
    runtime: Runtime,
    servers: Vec<Server>,
    /// A child of the token given to `new`: cancelled by the handle's drop, or with it.
    stop: CancellationToken,
}

impl Setup {
    /// Servers that stop when their handle is dropped or when `parent` is cancelled.
    pub fn new(parent: &CancellationToken) -> io::Result<Setup> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Setup {
            runtime,
            servers: Vec::new(),
            stop: parent.child_token(),
        })
    }

    /// Binds one server now (so that an error names its address before anything runs).
    pub fn bind(&mut self, start: impl Future<Output = io::Result<Server>>) -> io::Result<()> {
        let server = self.runtime.block_on(start)?;
        self.servers.push(server);
        Ok(())
    }

    /// Like `bind`, for a start that yields a value besides its servers (the addresses
    /// bound, when a server has sockets of its own beside them).
    pub fn bind_with<T>(
        &mut self,
        start: impl Future<Output = io::Result<(T, Vec<Server>)>>,
    ) -> io::Result<T> {
        let (value, servers) = self.runtime.block_on(start)?;
        self.servers.extend(servers);
        Ok(value)
    }

    /// A task that runs with the servers and ends with them.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(task);
    }

    /// Runs the servers on a thread named `name` until the handle is dropped or the
    /// token cancelled.
    pub fn run(self, name: &str) -> io::Result<Background> {
        let Setup {
            runtime,
            servers,
            stop,
        } = self;
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async move {
                    stopped.cancelled().await;
                    // Each removes its unix socket, if the path still names it.
                    for s in servers {
                        s.shutdown().await;
                    }
                });
                // Dropping the runtime cancels the connections and tasks still running.
            })?;
        Ok(Background {
            stop,
            thread: Some(thread),
        })
    }
}

/// Running servers; dropping it stops them and waits until their sockets are removed.
pub struct Background {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Nothing configured: nothing runs.
    pub fn idle() -> Background {
        Background {
            stop: CancellationToken::new(),
            thread: None,
        }
    }
}

/// Idle: nothing runs.
impl Default for Background {
    fn default() -> Background {
        Background::idle()
    }
}

impl Drop for Background {
    /// Stops the servers and waits for their thread: their sockets must be gone (and a
    /// DRAC registration withdrawn) before a reload starts them again, or the new ones would
    /// meet the old. Every wait inside the thread is bounded; one that takes longer than
    /// STOP_WITHIN is said, with the name of what is waited for.
    fn drop(&mut self) {
        self.stop.cancel();
        let Some(t) = self.thread.take() else {
            return;
        };
        // A thread cannot be joined with a timeout: its end is polled for, then joined.
        let deadline = Instant::now() + STOP_WITHIN;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !t.is_finished() {
            tracing::warn!(
                "the {} servers have not stopped within {}s; still waiting for them (their sockets must be gone before they start again)",
                t.thread().name().unwrap_or("pushed"),
                STOP_WITHIN.as_secs()
            );
        }
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::net::{Conn, Handler, Listen, Spec, Stream};

    /// Holds each connection until the peer leaves.
    struct Idle;

    impl Handler for Idle {
        async fn serve<S: Stream>(self: Arc<Self>, mut stream: S, _: Conn) {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            let _ = stream.read(&mut b).await;
        }
    }

    fn connects(path: &std::path::Path) -> bool {
        std::os::unix::net::UnixStream::connect(path).is_ok()
    }

    /// The daemon's shutdown: cancelling the parent stops the servers (their socket files
    /// removed) while the handle is still held; the handle's drop then only joins.
    #[test]
    fn cancelling_the_parent_stops_the_servers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let parent = CancellationToken::new();
        let mut setup = Setup::new(&parent).unwrap();
        let spec = Spec {
            name: "test",
            key: "test.listen",
            max_connections: 2,
            max_key: None,
            unix_mode: 0o600,
        };
        setup
            .bind(crate::net::start(
                &Listen::Unix(path.clone()),
                spec,
                Arc::new(Idle),
            ))
            .unwrap();
        let handle = setup.run("test").unwrap();
        assert!(connects(&path));
        parent.cancel();
        let deadline = Instant::now() + Duration::from_secs(5);
        while path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!path.exists(), "socket file left after the parent's cancel");
        assert!(!connects(&path));
        drop(handle);
    }
}
