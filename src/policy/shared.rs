//! The policy state shared between hosts through the database (`[store]
//! postgres_url_file` or `mysql_url_file`; `store::policy_db::PolicyDb`): the users
//! blocked by a cap (`policy.block_on_cap`) and the users' cap counts.
//!
//! Every writer runs this, with or without a policy server: a user blocked on one host
//! loses the grants every other host gave it (each host knows the logins behind its own
//! grants; the revocations reach the replicas as tombstones), is refused at their
//! auth-policy endpoints, and `dovegate unblock USER` on any host lets it in everywhere.
//! Counts go to the database every round and the other hosts' come back, so a user's
//! caps hold across hosts, late by at most a round or two (`ROUND`): a cap is a brake on
//! a stolen password, not an exact quota.
//!
//! The database is outside input: rows are bounded and checked (`policy_db`), and a
//! database that cannot be reached changes nothing here (this host's caps and blocks
//! keep working alone; said, rate-limited, until it returns).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::blocks::Blocks;
use crate::engine::LoginsView;
use crate::policy::caps::{Caps, SHARED_BUCKET, SHARED_BUCKETS};
use crate::store::policy_db::PolicyDb;
use crate::telemetry::ratelimit::SharedLimit;
use crate::timefmt;

/// How often blocks and counts are exchanged.
pub const ROUND: Duration = Duration::from_secs(1);
/// The longest one statement may take before the connection is dropped and made again.
const STATEMENT: Duration = Duration::from_secs(10);
/// How often counts older than a day are deleted.
const CLEAN_EVERY: i64 = 600;

/// What the exchange needs from the daemon.
pub struct SharedPolicy<D> {
    pub db: D,
    /// This host's name, as the database records it (`blocked_by`, the counts' `host`).
    pub host: String,
    pub blocks: Blocks,
    pub logins: LoginsView,
    pub caps: Arc<Caps>,
}

/// Starts the exchange; it runs until `stop` is cancelled (at shutdown): a round in
/// progress is dropped, as the next start syncs again.
pub fn spawn<D: PolicyDb>(
    shared: SharedPolicy<D>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = shared.run() => {}
        }
    })
}

/// Why a round failed: the database's error (naming what was being done), or no answer.
#[derive(Debug, thiserror::Error)]
enum RoundError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Db(E),
    #[error("{what}: no answer within {secs}s; the database hangs or is overloaded")]
    Timeout { what: &'static str, secs: u64 },
}

async fn bounded<T, E: std::error::Error + 'static>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, RoundError<E>> {
    match tokio::time::timeout(STATEMENT, f).await {
        Ok(r) => r.map_err(RoundError::Db),
        Err(_) => Err(RoundError::Timeout {
            what,
            secs: STATEMENT.as_secs(),
        }),
    }
}

impl<D: PolicyDb> SharedPolicy<D> {
    async fn run(self) {
        let failed = SharedLimit::default();
        // Users known to be in the database's blocked set: one of them missing there
        // later was unblocked on some host.
        let mut synced: HashSet<String> = HashSet::new();
        let mut cleaned = 0;
        let mut backoff = ROUND;
        loop {
            let mut conn = match self.db.connect().await {
                Ok(c) => c,
                Err(e) => {
                    self.failed(&failed, &RoundError::Db(e));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = ROUND;
            loop {
                if let Err(e) = self.round(&mut conn, &mut synced, &mut cleaned).await {
                    self.failed(&failed, &e);
                    break;
                }
                tokio::time::sleep(ROUND).await;
            }
        }
    }

    fn failed(&self, limit: &SharedLimit, e: &RoundError<D::Error>) {
        if let Some(n) = limit.hit() {
            tracing::warn!(
                database = %self.db.describe(),
                error = %e,
                failures = n,
                "cannot share blocked users and cap counts with the other hosts; this host's caps and blocks still hold here"
            );
        }
    }

    /// One exchange: this host's new blocks out, every host's blocks in (blocking here
    /// who was blocked elsewhere, unblocking who was unblocked elsewhere), counts out and
    /// in.
    async fn round(
        &self,
        conn: &mut D::Conn,
        synced: &mut HashSet<String>,
        cleaned: &mut i64,
    ) -> Result<(), RoundError<D::Error>> {
        self.blocks.refresh();
        let fresh: Vec<(String, String)> = self
            .blocks
            .users()
            .into_iter()
            .filter(|(u, _)| !synced.contains(u))
            .collect();
        bounded(
            "recording blocked users",
            self.db.add_blocks(conn, &fresh, &self.host),
        )
        .await?;
        // Only what the database could hold: a name it refuses is not 'synced', or the next
        // round would find it gone from the database and unblock it here.
        synced.extend(
            fresh
                .into_iter()
                .map(|(u, _)| u)
                .filter(|u| crate::store::policy_db::user_name(u)),
        );
        let everywhere = bounded("reading blocked users", self.db.blocked(conn)).await?;
        let now = timefmt::now();
        let names: HashSet<&str> = everywhere.iter().map(|(u, _)| u.as_str()).collect();
        for (user, cap) in &everywhere {
            if self.blocks.is_blocked(user) {
                continue;
            }
            let addresses = self.logins.addresses_of(user);
            let count = addresses.len();
            if self.blocks.block(user, cap, addresses, now) {
                tracing::warn!(
                    user = %user.escape_debug(),
                    cap = %cap,
                    addresses = count,
                    "user blocked on another host (policy.block_on_cap): its grants here revoked, no new one until `dovegate unblock USER`"
                );
            }
        }
        let gone: Vec<String> = synced
            .iter()
            .filter(|u| !names.contains(u.as_str()))
            .cloned()
            .collect();
        for user in gone {
            match self.blocks.unblock(&user) {
                Ok(true) => tracing::info!(
                    user = %user.escape_debug(),
                    "user unblocked on another host (dovegate unblock): may log in and relay again"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    user = %user.escape_debug(),
                    error = %e,
                    "user unblocked on another host, but the blocked users file cannot be written: still blocked here until it can"
                ),
            }
        }
        *synced = names.iter().map(|u| u.to_string()).collect();

        let (out, dropped) = self.caps.take_outbox();
        if dropped > 0 {
            tracing::warn!(
                counts = dropped,
                "cap counts not shared with the other hosts: too many users counted at once (they still count here)"
            );
        }
        if let Err(e) = bounded(
            "recording cap counts",
            self.db.add_counts(conn, &self.host, &out),
        )
        .await
        {
            self.caps.requeue(out);
            return Err(e);
        }
        let bucket = now.div_euclid(SHARED_BUCKET);
        let others = bounded(
            "reading the other hosts' cap counts",
            self.db
                .other_counts(conn, &self.host, bucket - SHARED_BUCKETS + 1),
        )
        .await?;
        self.caps.set_remote(others);
        if now - *cleaned >= CLEAN_EVERY {
            bounded(
                "deleting old cap counts",
                self.db.clean_counts(conn, bucket - SHARED_BUCKETS - 12),
            )
            .await?;
            *cleaned = now;
        }
        Ok(())
    }
}
