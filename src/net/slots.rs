//! Connection slots (a server's `max_connections`) that make room for a newcomer.
//!
//! Refusing newcomers while every slot is busy lets a local client lock out every MTA
//! lookup: it opens as many connections as there are slots and reconnects each time one is
//! cut off by a timeout. So a newcomer finding every slot busy closes the stalest
//! connection (the one whose last request began or was answered longest ago, or, without
//! requests, that was accepted first) and takes its slot. A fresh connection is the last to
//! be evicted, so an honest client that sends its request at once is answered; Postfix
//! (and Dovecot, Prometheus) reopen an evicted idle connection by themselves. A connection
//! that proved who it is (the auth-policy secret) is evicted only when every other one is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The slots of one server.
pub struct Slots {
    slots: Arc<Semaphore>,
    /// Newcomers waiting for an evicted connection's slot (bounded: each holds a socket).
    waiting: Arc<Semaphore>,
    live: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, Live>,
}

struct Live {
    progress: Instant,
    trusted: bool,
    evict: Arc<Notify>,
}

/// What `admit` decided for a new connection.
pub enum Admission {
    /// A free slot.
    Now(Slot),
    /// Every slot was busy: the stalest connection is being closed; wait for its slot.
    AfterEviction(Waiter),
    /// Every slot busy and as many newcomers already waiting: close the connection.
    Refused,
}

/// A connection's slot; freed on drop.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evict: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
}

/// A newcomer waiting for a slot.
pub struct Waiter {
    slots: Arc<Slots>,
    _waiting: OwnedSemaphorePermit,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            slots: Arc::new(Semaphore::new(max)),
            waiting: Arc::new(Semaphore::new(max)),
            live: Mutex::new(Registry::default()),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let evict = Arc::new(Notify::new());
        let mut r = self.registry();
        let id = r.next_id;
        r.next_id += 1;
        r.conns.insert(
            id,
            Live {
                progress: Instant::now(),
                trusted: false,
                evict: Arc::clone(&evict),
            },
        );
        Slot {
            slots: Arc::clone(self),
            id,
            evict,
            _permit: permit,
        }
    }

    /// Admits a new connection, evicting the stalest one when every slot is busy.
    pub fn admit(self: &Arc<Self>) -> Admission {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Admission::Now(self.register(permit));
        }
        let Ok(waiting) = Arc::clone(&self.waiting).try_acquire_owned() else {
            return Admission::Refused;
        };
        let mut r = self.registry();
        let stalest = r
            .conns
            .iter()
            .min_by_key(|(_, l)| (l.trusted, l.progress))
            .map(|(&id, _)| id);
        // Removed from the registry so that the next newcomer picks another one.
        if let Some(live) = stalest.and_then(|id| r.conns.remove(&id)) {
            live.evict.notify_one();
        }
        Admission::AfterEviction(Waiter {
            slots: Arc::clone(self),
            _waiting: waiting,
        })
    }
}

impl Waiter {
    /// The slot the evicted connection frees, if it comes within `wait`.
    pub async fn slot(self, wait: Duration) -> Option<Slot> {
        let permit = tokio::time::timeout(wait, Arc::clone(&self.slots.slots).acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(self.slots.register(permit))
    }
}

impl Slot {
    /// A request began or was answered: the connection is in use, not stale.
    pub fn progress(&self) {
        if let Some(l) = self.slots.registry().conns.get_mut(&self.id) {
            l.progress = Instant::now();
        }
    }

    /// The peer proved who it is: evict it only when every other connection is trusted.
    pub fn trust(&self) {
        if let Some(l) = self.slots.registry().conns.get_mut(&self.id) {
            l.trusted = true;
        }
    }

    /// Whether `trust` was called (false once evicted: it is closing anyway).
    pub fn trusted(&self) -> bool {
        self.slots
            .registry()
            .conns
            .get(&self.id)
            .is_some_and(|l| l.trusted)
    }

    /// Resolves when a newcomer evicts this connection.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.registry().conns.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(a: Admission) -> Slot {
        match a {
            Admission::Now(s) => s,
            _ => panic!("expected a free slot"),
        }
    }

    #[tokio::test]
    async fn a_newcomer_evicts_the_stalest() {
        let slots = Slots::new(2);
        let old = now(slots.admit());
        let busy = now(slots.admit());
        busy.progress();
        let Admission::AfterEviction(waiter) = slots.admit() else {
            panic!("expected an eviction");
        };
        // The stalest (no answered request) is told to go; the other one is not.
        tokio::time::timeout(Duration::from_secs(5), old.evicted())
            .await
            .expect("stalest evicted");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), busy.evicted())
                .await
                .is_err()
        );
        drop(old);
        let fresh = waiter
            .slot(Duration::from_secs(5))
            .await
            .expect("the freed slot");
        // Next eviction: `busy` (older progress than the fresh one).
        let Admission::AfterEviction(_w) = slots.admit() else {
            panic!("expected an eviction");
        };
        tokio::time::timeout(Duration::from_secs(5), busy.evicted())
            .await
            .expect("busy evicted next");
        drop(fresh);
    }

    #[tokio::test]
    async fn trusted_connections_go_last() {
        let slots = Slots::new(2);
        let dovecot = now(slots.admit());
        dovecot.trust();
        let stranger = now(slots.admit());
        stranger.progress();
        let Admission::AfterEviction(_w) = slots.admit() else {
            panic!("expected an eviction");
        };
        tokio::time::timeout(Duration::from_secs(5), stranger.evicted())
            .await
            .expect("the untrusted connection goes, though it is fresher");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), dovecot.evicted())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn waiting_newcomers_are_bounded() {
        let slots = Slots::new(1);
        let _held = now(slots.admit());
        let Admission::AfterEviction(w) = slots.admit() else {
            panic!("expected an eviction");
        };
        assert!(matches!(slots.admit(), Admission::Refused));
        // The slot never frees (the holder ignores eviction): the waiter gives up.
        assert!(w.slot(Duration::from_millis(50)).await.is_none());
        assert!(matches!(slots.admit(), Admission::AfterEviction(_)));
    }
}
