//! The daemon's core: turns batches of logins into map commits, expires grants on time,
//! and advances checkpoints only behind commits.
//!
//! `Engine` is plain synchronous state with time as an argument (testable with values);
//! `driver` runs it from tokio with its clock and heartbeat as arguments; `view` is the
//! committed grants shared with lookup servers; `alarm` keeps failure logs to state
//! changes.

mod alarm;
mod counters;
mod driver;
mod logins;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

pub use crate::blocks::{read_blocked, unblock, BlockEntry, Blocks, LoginCheck, BLOCKED_FILE};
pub use crate::grant::{GrantsView, Lookup};
pub use counters::{CommitLatency, Counters, COMMIT_BUCKETS};
pub use driver::{drive, run, Clock, Exit, Pace, SystemClock};
pub use logins::{Behind, LoginRecord, LoginsView, MAX_LOGINS_PER_GRANT};

use crate::blocks;
use crate::grant::{Decision, Ledger, Policy};
use crate::model::Batch;
use crate::session::{Probe, Sessions};
use crate::state::{CheckpointDir, Position};
use crate::store::{Cause, CommitStore, StoreError};
use crate::timefmt;

/// Grants known to be in the store, pending writes, and checkpoints waiting for a commit.
pub struct Engine<S: CommitStore> {
    store: S,
    policy: Policy,
    /// The longest lifetime a grant may have beyond the ttl's (a later hold feature sets
    /// it); expiries read from the map are capped at now + the longer of the two.
    longest_hold: i64,
    /// Each grant as committed, with its deadline (its view is shared with lookup servers).
    grants: Ledger,
    /// The logins behind the committed grants, and grants ended recently (policy server).
    logins: LoginsView,
    /// Users blocked by `policy.block_on_cap` (None: off).
    blocks: Option<Blocks>,
    /// Addresses revoked for a blocked user: their open sessions renew nothing while the
    /// user stays blocked.
    blocked_ips: HashMap<IpAddr, String>,
    pending: HashMap<IpAddr, i64>,
    pending_checkpoints: BTreeMap<usize, Position>,
    checkpoints: CheckpointDir,
    /// A login that moves an expiry by less than this is not written again.
    slack: i64,
    /// The map must be re-read (reopened, policy changed, or a re-read failed).
    resync_due: bool,
    /// Open mail sessions: their grants are renewed while evidence shows them open.
    sessions: Sessions,
    /// Looks for that evidence on this host (see `session::evidence`).
    probe: Box<dyn Probe>,
    /// The map has been read once (at start).
    read_once: bool,
    /// The sessions changed since they were last saved.
    sessions_dirty: bool,
    pub counters: Counters,
}

impl<S: CommitStore> Engine<S> {
    /// Loads the grants the store holds (the map is the source of truth for expiry) after
    /// removing those already expired, and caps expiries the configuration does not allow.
    pub fn new(
        store: S,
        policy: Policy,
        checkpoints: CheckpointDir,
        now: i64,
    ) -> Result<Engine<S>, StoreError> {
        let slack = slack(&policy);
        let policy_ttl = policy.ttl_secs();
        let grants = Ledger::with_ipv6_prefix(policy.ipv6_prefix());
        let mut engine = Engine {
            store,
            policy,
            longest_hold: 0,
            grants,
            logins: LoginsView::default(),
            blocks: None,
            blocked_ips: HashMap::new(),
            pending: HashMap::new(),
            pending_checkpoints: BTreeMap::new(),
            checkpoints,
            slack,
            resync_due: true,
            sessions: Sessions::new(policy_ttl, 0),
            probe: Box::new(crate::session::evidence::NoProbe),
            read_once: false,
            sessions_dirty: false,
            counters: Counters::default(),
        };
        let removed = engine.recovering(now, |e| e.store.expire_all(now))?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed grants that expired while dovegate was not running"
            );
        }
        engine.counters.removed = removed as u64;
        engine.recovering(now, |e| e.resync_once(now))?;
        Ok(engine)
    }

    /// The longest lifetime a grant may have: expiries beyond now + this are shortened.
    pub fn max_lifetime(&self) -> i64 {
        self.policy.ttl_secs().max(self.longest_hold)
    }

    /// Allows grants to live up to `secs` even when the ttl is shorter (a later feature's
    /// hold); the next re-read caps with it.
    pub fn set_longest_hold(&mut self, secs: i64) {
        self.longest_hold = secs.max(0);
        self.resync_due = true;
    }

    /// Turns session holding on (`hold` > 0: the longest a session holds its grant after
    /// its login) and restores the sessions saved beside the checkpoints, but for those of
    /// a source not in `sources` (no longer configured).
    pub fn set_session_hold(&mut self, hold: i64, sources: &[String], now: i64) {
        let first = self.sessions.is_empty() && !self.sessions_dirty;
        self.sessions.set_limits(self.policy.ttl_secs(), hold);
        self.sessions.keep_sources(sources);
        if first && hold > 0 {
            self.checkpoints.prepare_session_drops();
            let dropped = self
                .sessions
                .restore(self.checkpoints.load_sessions(), now, sources);
            if dropped > 0 {
                self.sessions_dirty = true;
                tracing::warn!(
                    dropped,
                    "saved mail sessions of sources no longer configured were dropped"
                );
            }
            self.apply_session_drops();
            if !self.sessions.is_empty() {
                tracing::info!(open = self.sessions.len(), "open mail sessions restored");
            }
        }
        self.count_sessions();
    }

    /// How sessions are shown open (`probe`) and how often that is checked again.
    pub fn set_session_evidence(&mut self, probe: Box<dyn Probe>, recheck: i64) {
        self.probe = probe;
        self.sessions.set_recheck(recheck);
    }

    fn count_sessions(&mut self) {
        self.counters.sessions_open = self.sessions.len() as u64;
        self.counters.sessions_by_evidence = self.sessions.by_evidence();
        let r = self.sessions.released();
        self.counters.sessions_released_no_evidence = r.no_evidence;
        self.counters.sessions_released_hold = r.hold;
    }

    /// When an open session must next be checked.
    pub fn next_session_due(&self) -> Option<i64> {
        self.sessions.next_due()
    }

    /// Checks the open sessions that are due for evidence, writes again the grants of
    /// those that have it (as logins at `now`), and drops the others once their grant has
    /// run out, and those past their hold. A revoke by another writer is looked for first,
    /// so that no renewal writes a revoked grant back.
    pub fn renew_sessions(&mut self, now: i64) {
        self.apply_session_drops();
        if let Err(e) = self.poll(now, false) {
            tracing::debug!(error = %e, "re-reading the map before session renewals failed");
        }
        let before = self.counters.sessions_released_hold;
        for r in self.sessions.renewals(now, self.probe.as_mut()) {
            if self.held_by_blocked(crate::grant::widen(r.ip, self.policy.ipv6_prefix())) {
                continue;
            }
            self.counters.session_renewals += 1;
            let renewed = self.consider(r.ip, Some(r.time), now);
            if let Some((ip, false)) = renewed {
                // An ordinary renewal (a few per session per hour): the debug log only.
                tracing::debug!(address = %ip, "grant {ip} renewed for an open mail session");
            }
            if let Some((ip, true)) = renewed {
                // A renewal that writes a grant the map no longer has: say so.
                if let Some(&until) = self.pending.get(&ip) {
                    let until = timefmt::rfc3339(until);
                    tracing::info!(address = %ip, until = %until, "grant {ip} renewed until {until}: written again for an open mail session");
                }
            }
        }
        self.sessions_dirty = true;
        self.count_sessions();
        let held = self.counters.sessions_released_hold - before;
        if held > 0 {
            tracing::info!(
                closed = held,
                "mail sessions held until grant.session_hold no longer renew"
            );
        }
    }

    /// The administrator's `dovegate sessions drop` requests.
    fn apply_session_drops(&mut self) {
        for id in self.checkpoints.take_session_drops() {
            if !self.drop_session(&id) {
                tracing::warn!(session = %id, "dovegate sessions drop: no such open session");
            }
        }
    }

    /// Forgets one open session (`dovegate sessions drop`); its grant runs out ttl after
    /// its last renewal.
    pub fn drop_session(&mut self, id: &str) -> bool {
        let Some(s) = self.sessions.drop_session(id) else {
            return false;
        };
        tracing::info!(session = %s.id, address = %s.ip, "mail session {} of {} dropped by the administrator; it renews nothing", s.id, s.ip);
        self.sessions_dirty = true;
        self.counters.sessions_dropped += 1;
        self.count_sessions();
        true
    }

    /// Grants or checkpoints wait for a flush.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.pending_checkpoints.is_empty() || self.sessions_dirty
    }

    /// Grants wait for a map commit (checkpoints alone do not).
    pub fn has_pending_grants(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn active(&self) -> usize {
        self.grants.len()
    }

    /// The live grants, for lookup servers.
    pub fn view(&self) -> GrantsView {
        self.grants.view()
    }

    /// Refuses logins of blocked users and revokes what the policy server asks.
    pub fn set_blocks(&mut self, blocks: Blocks) {
        self.blocks = Some(blocks);
    }

    /// Who logged in behind the live grants, for the policy server.
    pub fn logins(&self) -> LoginsView {
        self.logins.clone()
    }

    /// Replaces the policy (a reloaded configuration); committed grants keep their expiry
    /// unless it is beyond what the new policy allows (capped at the next re-read).
    pub fn set_policy(&mut self, policy: Policy) {
        // The store's bounds follow (a shared database's rows and revoke checks).
        self.store.set_ttl(policy.ttl_secs());
        self.slack = slack(&policy);
        self.policy = policy;
        self.resync_due = true;
    }

    /// Applies policy to a batch; grants wait for the next flush with their checkpoint.
    /// A login that names a mail session opens it; a session's end grants ttl from then.
    pub fn accept(&mut self, batch: Batch, now: i64) {
        for login in batch.logins {
            if let (Some(b), Some(user)) = (
                &self.blocks,
                login.detail.as_ref().and_then(|d| d.user.as_deref()),
            ) {
                if b.is_blocked(user) {
                    self.counters.excluded += 1;
                    tracing::info!(address = %login.ip, user = %user.escape_debug(), "login of a blocked user not granted (dovegate unblock USER)");
                    continue;
                }
            }
            // Blocked grants are kept by the address the grant is under (a prefix).
            let bits = self.policy.ipv6_prefix();
            self.blocked_ips
                .remove(&crate::grant::widen(login.ip, bits));
            let granted = self.consider(login.ip, login.time, now);
            if let Some((ip, true)) = granted {
                self.audit_new(ip, login.detail.as_deref());
            }
            if let (Some((ip, _)), Some(d)) = (granted, &login.detail) {
                self.logins.pending(
                    ip,
                    LoginRecord {
                        user: d.user.clone(),
                        protocol: d.protocol.clone(),
                        session: d.session.clone(),
                        at: login.time.unwrap_or(now).min(now),
                    },
                );
            }
            if let (Some(_), Some(start)) = (granted, &login.session) {
                let at = login.time.unwrap_or(now).min(now);
                // The session under the login's own address: its evidence (process title,
                // doveadm who) names that address; renewals widen it again.
                if self
                    .sessions
                    .opened(login.ip.to_canonical(), at, start, now)
                {
                    self.sessions_dirty = true;
                }
            }
        }
        for end in &batch.ends {
            if let Some(c) = self.sessions.closed(end, now) {
                self.sessions_dirty = true;
                if !self.held_by_blocked(c.renewal.ip) {
                    self.consider(c.renewal.ip, Some(c.renewal.time), now);
                }
            }
        }
        self.count_sessions();
        if let Some(position) = batch.position {
            self.pending_checkpoints.insert(batch.source, position);
        }
    }

    /// The audit trail: one INFO line when an address gets a grant it did not have (its
    /// extensions are not logged), with who and what logged in. The text carries what an
    /// administrator reads in `journalctl -u dovegate`; the fields (DOVEGATE_ADDRESS, ...)
    /// stay for filtering.
    fn audit_new(&self, ip: IpAddr, detail: Option<&crate::model::LoginDetail>) {
        let Some(&until) = self.pending.get(&ip) else {
            return;
        };
        let until = timefmt::rfc3339(until);
        match detail {
            Some(d) => {
                let user = d.user.as_deref().unwrap_or("-").escape_debug().to_string();
                tracing::info!(
                    address = %ip,
                    user = %user,
                    protocol = %d.protocol,
                    pattern = %d.pattern,
                    source = %d.source,
                    until = %until,
                    "grant {ip} user={user} {} until {until}",
                    d.protocol
                )
            }
            None => {
                tracing::info!(address = %ip, source = "push", until = %until, "grant {ip} pushed until {until}")
            }
        }
    }

    /// One login of `ip` at `time` through the policy; Some((canonical address, whether the
    /// address had no grant before)) when it grants (the write waits for the next flush).
    fn consider(&mut self, ip: IpAddr, time: Option<i64>, now: i64) -> Option<(IpAddr, bool)> {
        match self.policy.decide(ip, time, now) {
            Decision::Grant { ip, expires } => {
                let known = match self.pending.get(&ip) {
                    Some(&e) => Some(e),
                    None => self.grants.get(ip),
                };
                if known.is_none_or(|k| expires > k + self.slack) {
                    self.pending.insert(ip, expires.max(known.unwrap_or(0)));
                }
                self.counters.granted += 1;
                Some((ip, known.is_none()))
            }
            Decision::Excluded(why) => {
                self.counters.excluded += 1;
                tracing::debug!(ip = %ip, reason = %why, "login not granted");
                None
            }
            Decision::Expired => {
                self.counters.expired_logins += 1;
                None
            }
        }
    }

    /// Commits pending grants in one transaction, then writes the checkpoints they cover.
    /// On error nothing is forgotten: the next flush retries, and no checkpoint moves.
    pub fn flush(&mut self, now: i64) -> Result<(), StoreError> {
        self.recovering(now, |e| e.flush_once())
    }

    fn flush_once(&mut self) -> Result<(), StoreError> {
        if !self.pending.is_empty() {
            let grants: Vec<(IpAddr, i64)> = self.pending.iter().map(|(&ip, &e)| (ip, e)).collect();
            let started = std::time::Instant::now();
            let effective = self.store.upsert(&grants)?;
            self.counters
                .commit_latency
                .record(started.elapsed().as_secs_f64());
            self.counters.commits += 1;
            self.grants.commit(effective);
            self.pending.clear();
        }
        self.logins.commit_pending();
        // Sessions first: after a crash between the two, the logins behind the old
        // checkpoints are read again and reopen their sessions (idempotent by id).
        if self.sessions_dirty {
            let c = &self.counters;
            let stats = crate::session::SessionStats {
                open_by_evidence: c
                    .sessions_by_evidence
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                released_no_evidence: c.sessions_released_no_evidence,
                released_hold: c.sessions_released_hold,
                dropped: c.sessions_dropped,
            };
            // For `dovegate status` only: a failure is no reason to hold the checkpoints.
            if let Err(e) = self.checkpoints.save_session_stats(&stats) {
                tracing::debug!(error = %e, "cannot save session statistics");
            }
            self.checkpoints
                .save_sessions(&self.sessions.snapshot())
                .map_err(|e| {
                    StoreError::new(
                        format!("cannot save open sessions: {e}"),
                        Cause::Io(e.kind()),
                    )
                })?;
            self.sessions_dirty = false;
        }
        while let Some((source, cp)) = self.pending_checkpoints.pop_first() {
            if let Err(e) = self.checkpoints.save_position(&cp) {
                self.pending_checkpoints.insert(source, cp);
                return Err(StoreError::new(
                    format!("cannot save checkpoint: {e}"),
                    Cause::Io(e.kind()),
                ));
            }
        }
        Ok(())
    }

    /// Runs a store operation; when the store had to be reopened (the map file deleted,
    /// replaced or truncated), first writes every live grant into it again, then retries
    /// once. Checkpoints move only after that rewrite committed.
    fn recovering<T>(
        &mut self,
        now: i64,
        mut op: impl FnMut(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match op(self) {
            Err(e) if e.cause() == Cause::Reopened => {
                let live = self.grants.live(now);
                let count = live.len();
                for (ip, e) in live {
                    let p = self.pending.entry(ip).or_insert(e);
                    *p = (*p).max(e);
                }
                self.resync_due = true;
                self.flush_once()?;
                tracing::warn!(count, "wrote the live grants into the reopened map");
                op(self)
            }
            r => r,
        }
    }

    /// Checks whether another writer changed the store (a cheap look for the LMDB map)
    /// and re-reads it when it did, when a re-read is due, or, for a store that cannot
    /// tell, when `periodic`. Returns whether it re-read. While a needed re-read fails,
    /// lookups in the view answer unsure.
    pub fn poll(&mut self, now: i64, periodic: bool) -> Result<bool, StoreError> {
        self.revoke_blocked()?;
        let result = self.recovering(now, |e| {
            let changed = e.store.changed()?;
            // The clock stepped back (a fault fixed while running): our own grants now
            // expire later than allowed; the re-read caps them in the map.
            let too_late = e
                .grants
                .last_deadline()
                .is_some_and(|x| x > now.saturating_add(e.max_lifetime()));
            let due = e.resync_due || too_late || changed.unwrap_or(periodic);
            if due {
                e.resync_once(now)?;
            }
            Ok(due)
        });
        if result.is_err() {
            self.resync_due = true;
            self.grants.set_stale(true);
        }
        result
    }

    /// Re-reads the store now: picks up grants written by others (`dovegate grant`,
    /// another host) so that they expire on time, and forgets revoked ones.
    pub fn resync(&mut self, now: i64) -> Result<(), StoreError> {
        self.resync_due = true;
        self.poll(now, true).map(|_| ())
    }

    /// Whether `ip` was revoked for a user who is still blocked (its session must not
    /// renew the grant).
    fn held_by_blocked(&mut self, ip: IpAddr) -> bool {
        let Some(user) = self.blocked_ips.get(&ip) else {
            return false;
        };
        if self.blocks.as_ref().is_some_and(|b| b.is_blocked(user)) {
            return true;
        }
        self.blocked_ips.remove(&ip);
        false
    }

    /// Revokes the grants of users the policy server blocked, and picks up unblocks.
    fn revoke_blocked(&mut self) -> Result<(), StoreError> {
        let Some(blocks) = self.blocks.clone() else {
            return Ok(());
        };
        blocks.refresh();
        let mut ips = blocks.take_revocations();
        while let Some((ip, user)) = ips.pop() {
            self.pending.remove(&ip);
            if let Err(e) = self.store.revoke(ip) {
                ips.push((ip, user));
                blocks.requeue(ips);
                return Err(e);
            }
            self.grants.remove(ip);
            self.logins.forget(ip);
            let user = user.escape_debug().to_string();
            tracing::warn!(address = %ip, user = %user, "grant {ip} revoked: its user {user} is blocked (policy.block_on_cap)");
            if self.blocked_ips.len() < blocks::MAX_BLOCKED * 8 {
                self.blocked_ips.insert(ip, user);
            }
        }
        Ok(())
    }

    fn resync_once(&mut self, now: i64) -> Result<(), StoreError> {
        let mut fresh = self.store.snapshot()?;
        let limit = now.saturating_add(self.max_lifetime());
        let over: Vec<IpAddr> = fresh
            .iter()
            .filter(|&&(_, e)| e > limit)
            .map(|&(ip, _)| ip)
            .collect();
        if !over.is_empty() {
            // Postfix obeys the map, not our memory: the map itself is rewritten.
            let capped: HashMap<IpAddr, i64> = self.store.cap(&over, limit)?.into_iter().collect();
            tracing::warn!(
                count = over.len(),
                limit = %timefmt::rfc3339(limit),
                "grants in the map expired later than the configuration allows (written under a wrong clock or a longer ttl); shortened them to now + ttl"
            );
            fresh.retain_mut(|(ip, e)| {
                if *e <= limit {
                    return true;
                }
                match capped.get(ip) {
                    Some(&c) => {
                        *e = c;
                        true
                    }
                    None => false,
                }
            });
        }
        let fresh: HashMap<IpAddr, i64> = fresh.into_iter().collect();
        self.audit_other_writers(&fresh);
        self.grants.replace(fresh);
        self.resync_due = false;
        // A full read builds and drops tables the size of the map; give the freed memory
        // back so that idle RSS follows the live grants, not the last re-read's peak.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only walks glibc's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(())
    }

    /// The audit trail of changes made outside the daemon (`dovegate grant` and `revoke` on
    /// this host; revokes from the database): at most a hundred lines per re-read, then a
    /// count. Other hosts' grants never reach this map (replicas copy them into their own).
    fn audit_other_writers(&mut self, fresh: &HashMap<IpAddr, i64>) {
        if !self.read_once {
            // The first read at start: the map's grants are not news.
            self.read_once = true;
            return;
        }
        let (added, removed) = self.grants.read(|old| {
            let added: Vec<(IpAddr, i64)> = fresh
                .iter()
                .filter(|(ip, _)| !old.contains_key(ip))
                .map(|(&ip, &e)| (ip, e))
                .collect();
            let removed: Vec<IpAddr> = old
                .keys()
                .filter(|ip| !fresh.contains_key(ip))
                .copied()
                .collect();
            (added, removed)
        });
        for (i, (ip, e)) in added.iter().enumerate() {
            if i < 100 {
                let until = timefmt::rfc3339(*e);
                tracing::info!(address = %ip, until = %until, "grant {ip} until {until} written by hand on this host (dovegate grant): only it writes this map besides the daemon");
            }
        }
        for (i, ip) in removed.iter().enumerate() {
            self.logins.forget(*ip);
            if i < 100 {
                tracing::info!(address = %ip, "grant {ip} removed outside the daemon (dovegate revoke on this host, or a revoke recorded in the database)");
            }
            // A revoke sticks: the address's open sessions renew nothing from now on.
            let ended = self.sessions.revoke_grant(*ip, self.policy.ipv6_prefix());
            if ended > 0 {
                self.sessions_dirty = true;
                self.counters.sessions_dropped += ended as u64;
                tracing::info!(address = %ip, sessions = ended, "{ended} open mail session(s) of revoked {ip} ended; a new login grants again");
            }
        }
        if !removed.is_empty() {
            self.count_sessions();
        }
        if added.len() + removed.len() > 200 {
            tracing::info!(
                added = added.len(),
                removed = removed.len(),
                "other writers changed many grants"
            );
        }
    }

    /// The earliest expiry among committed grants.
    pub fn next_deadline(&self) -> Option<i64> {
        self.grants.next_deadline()
    }

    /// Removes grants whose deadline has come. Another writer may have extended some
    /// (the store checks); those get their new deadline.
    pub fn expire_due(&mut self, now: i64) -> Result<usize, StoreError> {
        self.recovering(now, |e| e.expire_due_once(now))
    }

    fn expire_due_once(&mut self, now: i64) -> Result<usize, StoreError> {
        let due = self.grants.due(now);
        if due.is_empty() {
            return Ok(0);
        }
        let out = self.store.expire(&due, now)?;
        for ip in &due {
            self.grants.remove(*ip);
        }
        // Extended meanwhile by another writer: kept, with the new deadline.
        self.grants.commit(out.extended);
        self.counters.removed += out.removed.len() as u64;
        for ip in &out.removed {
            self.logins.expired(*ip, now);
            tracing::info!(address = %ip, "grant expired {ip}");
        }
        Ok(out.removed.len())
    }
}

fn slack(policy: &Policy) -> i64 {
    (policy.ttl_secs() / 30).clamp(0, 60)
}

#[cfg(test)]
mod tests;
