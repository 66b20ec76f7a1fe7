//! The servers Dovecot pushes logins to (`[push]`: the post-login socket and the
//! auth-policy endpoint; `[events]`) live across reloads. Closing their sockets for a
//! reload would refuse the logins Dovecot pushes meanwhile, and the post-login hook does
//! not retry: each would be a lost login. A reload restarts only a server whose settings
//! changed.
//!
//! They send into a queue of their own; a relay task forwards it into the channel of the
//! current generation of log sources, which a reload replaces. A batch the old generation
//! did not take waits for the next one instead of being dropped.

use std::sync::Arc;

use tokio::sync::mpsc::{self, error::SendError, Receiver, Sender};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Failure;
use crate::blocks::Blocks;
use crate::config::events::EventsSettings;
use crate::config::push::PushSettings;
use crate::model::Batch;
use crate::telemetry::StatsRegistry;

/// Batches waiting for the relay at most; beyond, a pushing server waits (bounded by its
/// own queue wait) as it would for the engine.
const QUEUE: usize = 64;

/// The pushed servers, their settings, and the relay into the current generation.
pub struct Pushed {
    push: (PushSettings, crate::push::Push),
    events: (EventsSettings, crate::events::Events),
    tx: Sender<Batch>,
    target: watch::Sender<Option<Sender<Batch>>>,
    /// None once `close` took it.
    relay: Option<JoinHandle<()>>,
    stats: Arc<StatsRegistry>,
    blocks: Option<Blocks>,
}

impl Pushed {
    /// Starts the servers `push` and `events` turn on (none: nothing listens) and the relay
    /// on `runtime`. A socket another process serves fails the start.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        push: &PushSettings,
        events: &EventsSettings,
        stats: &Arc<StatsRegistry>,
        blocks: Option<&Blocks>,
    ) -> Result<Pushed, Failure> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (target, watched) = watch::channel(None);
        let push_server = crate::push::spawn(push, tx.clone(), stats, blocks.cloned())
            .map_err(Failure::runtime)?;
        let events_server =
            crate::events::spawn(events, tx.clone(), stats).map_err(Failure::runtime)?;
        let relay = runtime.spawn(relay(rx, watched));
        Ok(Pushed {
            push: (push.clone(), push_server),
            events: (events.clone(), events_server),
            tx,
            target,
            relay: Some(relay),
            stats: Arc::clone(stats),
            blocks: blocks.cloned(),
        })
    }

    /// Whether any pushed server runs (its logins keep the generation's channel open).
    pub fn enabled(&self) -> bool {
        self.push.0.enabled() || self.events.0.enabled()
    }

    /// Points the relay at a new generation's channel. While a pushed server runs, the
    /// relay holds a sender of it, so the generation does not end when its log sources do.
    pub fn attach(&self, generation: &Sender<Batch>) {
        let held = self.enabled().then(|| generation.clone());
        self.target.send_replace(held);
    }

    /// Applies reloaded settings: a server whose settings changed is stopped (its socket
    /// released) and started again with the new ones; unchanged servers keep serving. A
    /// server that cannot start again is started with its old settings, and the error
    /// refuses the reload.
    pub fn reload(&mut self, push: &PushSettings, events: &EventsSettings) -> Result<(), Failure> {
        if *push != self.push.0 {
            let old = std::mem::replace(&mut self.push.1, crate::push::Push::idle());
            drop(old);
            let blocks = self.blocks.clone();
            match crate::push::spawn(push, self.tx.clone(), &self.stats, blocks.clone()) {
                Ok(s) => self.push = (push.clone(), s),
                Err(e) => {
                    self.push.1 =
                        crate::push::spawn(&self.push.0, self.tx.clone(), &self.stats, blocks)
                            .map_err(Failure::runtime)?;
                    return Err(Failure::runtime(e));
                }
            }
            tracing::info!("[push] restarted with its new settings");
        }
        if *events != self.events.0 {
            let old = std::mem::replace(&mut self.events.1, crate::events::Events::idle());
            drop(old);
            match crate::events::spawn(events, self.tx.clone(), &self.stats) {
                Ok(s) => self.events = (events.clone(), s),
                Err(e) => {
                    self.events.1 =
                        crate::events::spawn(&self.events.0, self.tx.clone(), &self.stats)
                            .map_err(Failure::runtime)?;
                    return Err(Failure::runtime(e));
                }
            }
            tracing::info!("[events] restarted with its new settings");
        }
        Ok(())
    }
}

impl Pushed {
    /// Stops the servers (their sockets released) and returns the relay, which ends once
    /// it has forwarded what they had queued.
    pub fn close(mut self) -> impl std::future::Future<Output = ()> {
        self.push.1 = crate::push::Push::idle();
        self.events.1 = crate::events::Events::idle();
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let relay = self.relay.take();
        async move {
            if let Some(r) = relay {
                let _ = r.await;
            }
        }
    }
}

impl Drop for Pushed {
    fn drop(&mut self) {
        if let Some(r) = &self.relay {
            r.abort();
        }
    }
}

/// Forwards pushed batches into the generation `target` names; a batch the generation
/// refuses (a reload dropped its channel) waits for the next one.
async fn relay(mut rx: Receiver<Batch>, mut target: watch::Receiver<Option<Sender<Batch>>>) {
    while let Some(mut batch) = rx.recv().await {
        loop {
            let tx = target.borrow_and_update().clone();
            if let Some(tx) = tx {
                match tx.send(batch).await {
                    Ok(()) => break,
                    Err(SendError(b)) => batch = b,
                }
            }
            if target.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SeenLogin;

    fn batch(ip: &str) -> Batch {
        Batch {
            source: usize::MAX,
            logins: vec![SeenLogin {
                ip: ip.parse().unwrap(),
                time: None,
                session: None,
                detail: None,
            }],
            ends: Vec::new(),
            position: None,
        }
    }

    #[tokio::test]
    async fn a_batch_the_old_generation_refuses_reaches_the_next() {
        let (tx, rx) = mpsc::channel(4);
        let (target, watched) = watch::channel(None);
        let relay = tokio::spawn(relay(rx, watched));
        let (old_tx, mut old_rx) = mpsc::channel(4);
        target.send_replace(Some(old_tx));
        tx.send(batch("192.0.2.1")).await.unwrap();
        assert_eq!(
            old_rx.recv().await.unwrap().logins[0].ip.to_string(),
            "192.0.2.1"
        );
        // A reload: the old generation's receiver is gone before the next exists.
        drop(old_rx);
        tx.send(batch("192.0.2.2")).await.unwrap();
        let (new_tx, mut new_rx) = mpsc::channel(4);
        target.send_replace(Some(new_tx));
        assert_eq!(
            new_rx.recv().await.unwrap().logins[0].ip.to_string(),
            "192.0.2.2"
        );
        relay.abort();
    }
}
