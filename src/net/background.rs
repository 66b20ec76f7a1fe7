//! Servers fed by Dovecot (push socket, auth policy, events) run on a thread of their own
//! with a small runtime: they share nothing with the engine but a channel, so a busy engine
//! never delays an answer to Dovecot, and stopping them (a reload, shutdown) is dropping
//! the `Background` handle.

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Runtime;

use super::Server;

/// Servers being set up: bound (and tasks spawned) on their runtime, not yet running.
pub struct Setup {
    runtime: Runtime,
    servers: Vec<Server>,
}

impl Setup {
    pub fn new() -> io::Result<Setup> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Setup {
            runtime,
            servers: Vec::new(),
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

    /// Runs the servers on a thread named `name` until the handle is dropped.
    pub fn run(self, name: &str) -> io::Result<Background> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let Setup { runtime, servers } = self;
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                    // Each removes its unix socket, if the path still names it.
                    for s in servers {
                        s.shutdown().await;
                    }
                });
                // Dropping the runtime cancels the connections and tasks still running.
            })?;
        Ok(Background {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Running servers; dropping it stops them and waits until their sockets are removed.
pub struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Nothing configured: nothing runs.
    pub fn idle() -> Background {
        Background {
            stop: None,
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
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
