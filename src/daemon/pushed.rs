//! The servers logins are pushed to (`[push]`: the post-login socket and the auth-policy
//! endpoint; `[events]`; `[drac]`) live across reloads. Closing their sockets for a reload
//! would refuse the logins pushed meanwhile, and neither the post-login hook nor a DRAC
//! client retries: each would be a lost login (and DRAC's rpcbind registration would be
//! gone for a moment). A reload restarts only a server whose settings changed.
//!
//! They send into a queue of their own; a relay task forwards it into the channel of the
//! current generation of log sources, which a reload replaces. A batch the old generation
//! did not take waits for the next one instead of being dropped.

use std::sync::Arc;

use tokio::sync::mpsc::{self, error::SendError, Receiver, Sender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::dry::DryRun;
use crate::blocks::Blocks;
use crate::config::drac::DracSettings;
use crate::config::events::EventsSettings;
use crate::config::push::PushSettings;
use crate::model::Batch;
use crate::setup::Failure;
use crate::telemetry::StatsRegistry;

/// Batches waiting for the relay at most; beyond, a pushing server waits (bounded by its
/// own queue wait) as it would for the engine.
const QUEUE: usize = 64;

/// What the pushed servers are started with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushedSettings {
    pub push: PushSettings,
    pub events: EventsSettings,
    pub drac: DracSettings,
}

/// The pushed servers, their settings, and the relay into the current generation.
pub struct Pushed {
    push: (PushSettings, crate::push::Push),
    events: (EventsSettings, crate::events::Events),
    drac: (DracSettings, crate::drac::Drac),
    tx: Sender<Batch>,
    target: watch::Sender<Option<Sender<Batch>>>,
    /// The current generation's channel (`attach`).
    generation: Option<Sender<Batch>>,
    /// None once `close` took it.
    relay: Option<JoinHandle<()>>,
    /// The daemon's runtime: the relay, and the events' and DRAC's forwarding tasks, which
    /// must outlive their servers.
    runtime: tokio::runtime::Handle,
    stats: Arc<StatsRegistry>,
    blocks: Option<Blocks>,
    /// The shutdown's phase for the pushed servers: each server's thread runs under a
    /// child of it (`net::background`), so a reload stops one alone.
    stop: CancellationToken,
}

impl Pushed {
    /// Starts the servers `wanted` turns on (none: nothing listens) and the relay on
    /// `runtime`, under `stop`. A socket another process serves fails the start.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        wanted: &PushedSettings,
        stats: &Arc<StatsRegistry>,
        blocks: Option<&Blocks>,
        stop: &CancellationToken,
    ) -> Result<Pushed, Failure> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (target, watched) = watch::channel(None);
        let relay = runtime.spawn(relay(rx, watched));
        let mut pushed = Pushed {
            push: Default::default(),
            events: Default::default(),
            drac: Default::default(),
            tx,
            target,
            generation: None,
            relay: Some(relay),
            runtime: runtime.handle().clone(),
            stats: Arc::clone(stats),
            blocks: blocks.cloned(),
            stop: stop.clone(),
        };
        pushed.apply(wanted, false)?;
        Ok(pushed)
    }

    /// Whether any pushed server runs (its logins keep the generation's channel open).
    pub fn enabled(&self) -> bool {
        self.push.0.enabled() || self.events.0.enabled() || self.drac.0.enabled()
    }

    /// Points the relay at a new generation's channel.
    pub fn attach(&mut self, generation: &Sender<Batch>) {
        self.generation = Some(generation.clone());
        self.retarget();
    }

    /// While a pushed server runs, the relay holds a sender of the generation's channel,
    /// so the generation does not end when its log sources do; with none, it holds
    /// nothing (every source gone then ends the daemon, for systemd to restart it).
    fn retarget(&self) {
        let held = self.generation.clone().filter(|_| self.enabled());
        self.target.send_replace(held);
    }

    /// The settings the servers run with now.
    fn running(&self) -> PushedSettings {
        PushedSettings {
            push: self.push.0.clone(),
            events: self.events.0.clone(),
            drac: self.drac.0.clone(),
        }
    }

    /// Applies reloaded settings: a server whose settings changed is stopped (its socket
    /// released) and started again with the new ones; unchanged servers keep serving. When
    /// one cannot start, every server goes back to what it ran before and the error
    /// refuses the reload; one that cannot start again even so is said, and stays off until
    /// the next reload tries again.
    pub fn reload(&mut self, wanted: &PushedSettings) -> Result<(), Failure> {
        let before = self.running();
        let result = self.apply(wanted, true);
        if result.is_err() {
            if let Err(again) = self.apply(&before, true) {
                tracing::error!("{}: it stays off until a reload starts it", again.message);
            }
        }
        self.retarget();
        result
    }

    /// Starts, stops or restarts each server whose settings differ from `wanted`. A server
    /// that fails to start is left off (its settings recorded as off). `reloading`: say
    /// which servers were restarted.
    fn apply(&mut self, wanted: &PushedSettings, reloading: bool) -> Result<(), Failure> {
        if wanted.push != self.push.0 {
            self.push = Default::default();
            let s = crate::push::spawn(
                &wanted.push,
                self.tx.clone(),
                &self.stats,
                self.blocks.clone(),
                &self.stop,
            )?;
            self.push = (wanted.push.clone(), s);
            if reloading {
                tracing::info!(
                    on = wanted.push.enabled(),
                    "[push] restarted with its new settings"
                );
            }
        }
        if wanted.events != self.events.0 {
            self.events = Default::default();
            let s = crate::events::spawn(
                &wanted.events,
                self.tx.clone(),
                &self.stats,
                &self.runtime,
                &self.stop,
            )?;
            self.events = (wanted.events.clone(), s);
            if reloading {
                tracing::info!(
                    on = wanted.events.enabled(),
                    "[events] restarted with its new settings"
                );
            }
        }
        if wanted.drac != self.drac.0 {
            // Dropping the old server removes its rpcbind registration first.
            self.drac = Default::default();
            let s = crate::drac::spawn(
                &wanted.drac,
                self.tx.clone(),
                &self.stats,
                &self.runtime,
                &self.stop,
            )?;
            self.drac = (wanted.drac.clone(), s);
            if reloading {
                tracing::info!(
                    on = wanted.drac.enabled(),
                    "[drac] restarted with its new settings"
                );
            }
        }
        Ok(())
    }

    /// Stops the servers (their sockets released) and returns the relay, which ends once
    /// it has forwarded what they had queued (the events' and DRAC's forwarding tasks end
    /// when their queues are empty, and hold the relay's queue open until then).
    pub fn close(mut self) -> impl std::future::Future<Output = ()> {
        self.push = Default::default();
        self.events = Default::default();
        self.drac = Default::default();
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let relay = self.relay.take();
        // The watch stays until the relay is done: a batch it holds still has somewhere
        // to go (the generation the caller drains).
        let target = self.target.clone();
        async move {
            if let Some(r) = relay {
                let _ = r.await;
            }
            drop(target);
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

/// The pushed servers' settings. Under `--dry-run` beside a running daemon, no push or
/// events server: their sockets belong to that daemon, and binding them would take them
/// over. Under any `--dry-run`, no DRAC server: it would answer clients and take rpcbind's
/// registration from the DRAC server in place (rpc.dracd, beside which a dry run is meant
/// to run).
pub(super) fn pushed_settings(
    settings: &crate::config::Settings,
    dry: Option<&DryRun>,
) -> PushedSettings {
    let mut s = PushedSettings {
        push: settings.push.clone(),
        events: settings.events.clone(),
        drac: settings.drac.clone(),
    };
    if dry.is_some() && s.drac.enabled() {
        tracing::warn!("[drac]: --dry-run does not serve DRAC clients (it would take rpcbind's registration from the DRAC server in place); their adds are not reported");
        s.drac = Default::default();
    }
    if !dry.is_some_and(|d| d.daemon_running) {
        return s;
    }
    if s.push.enabled() {
        tracing::warn!("[push]: a dovegate daemon holds the map; --dry-run leaves its push sockets alone and reports logged logins only");
    }
    if s.events.enabled() {
        tracing::warn!("[events]: a dovegate daemon holds the map; --dry-run leaves its events listener alone and reports logged logins only");
    }
    s.push = Default::default();
    s.events = Default::default();
    s
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
