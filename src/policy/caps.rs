//! Sending caps: messages and recipients per grant (client address) and per user (every
//! address the user logged in from), per hour and per day.
//!
//! Each count is a sliding window of fixed buckets (an hour in 12 five-minute buckets, a
//! day in 24 one-hour buckets): about 300 bytes per address or user, whatever the
//! traffic. The windows slide by whole buckets, so a cap frees up to one bucket early.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

pub use crate::config::policy::CapLimits;
use crate::model::UserCount;

/// A window of `N` buckets of `WIDTH` seconds, the last one being bucket `last`
/// (time / WIDTH); older buckets are cleared as time moves on.
#[derive(Debug, Clone, Copy)]
struct Window<const N: usize, const WIDTH: i64> {
    last: i64,
    count: [u32; N],
}

impl<const N: usize, const WIDTH: i64> Default for Window<N, WIDTH> {
    fn default() -> Self {
        Window {
            last: i64::MIN,
            count: [0; N],
        }
    }
}

impl<const N: usize, const WIDTH: i64> Window<N, WIDTH> {
    fn slot(bucket: i64) -> usize {
        bucket.rem_euclid(N as i64) as usize
    }

    /// The count of buckets `current - N + 1 ..= current` as of `last`.
    fn total(&self, now: i64) -> u32 {
        let current = now.div_euclid(WIDTH);
        if self.last == i64::MIN || current - self.last >= N as i64 {
            return 0;
        }
        // Buckets after `last` are empty; those before current - N + 1 are out.
        let oldest = current - N as i64 + 1;
        (oldest.max(self.last - N as i64 + 1)..=self.last.min(current))
            .map(|b| self.count[Self::slot(b)])
            .fold(0u32, u32::saturating_add)
    }

    fn add(&mut self, now: i64) {
        let current = now.div_euclid(WIDTH);
        if self.last == i64::MIN || current - self.last >= N as i64 {
            self.count = [0; N];
        } else if current > self.last {
            for b in self.last + 1..=current {
                self.count[Self::slot(b)] = 0;
            }
        }
        // A clock step back counts in the latest bucket.
        self.last = self.last.max(current);
        let slot = Self::slot(self.last);
        self.count[slot] = self.count[slot].saturating_add(1);
    }

    fn idle(&self, now: i64) -> bool {
        self.total(now) == 0
    }
}

type Hour = Window<12, 300>;
type Day = Window<24, 3600>;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    messages_hour: Hour,
    messages_day: Day,
    recipients_hour: Hour,
    recipients_day: Day,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Grant(IpAddr),
    User(String),
}

/// Addresses and users counted at most; past it, idle entries are dropped, and when none
/// is idle new ones are refused a count (deferred: never an uncounted relay).
const MAX_KEYS: usize = 200_000;

/// The four totals a cap compares, for one grant or user.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    messages_hour: u32,
    messages_day: u32,
    recipients_hour: u32,
    recipients_day: u32,
}

impl Counts {
    fn totals(&self, now: i64) -> Totals {
        Totals {
            messages_hour: self.messages_hour.total(now),
            messages_day: self.messages_day.total(now),
            recipients_hour: self.recipients_hour.total(now),
            recipients_day: self.recipients_day.total(now),
        }
    }
}

impl Totals {
    fn plus(self, o: Totals) -> Totals {
        Totals {
            messages_hour: self.messages_hour.saturating_add(o.messages_hour),
            messages_day: self.messages_day.saturating_add(o.messages_day),
            recipients_hour: self.recipients_hour.saturating_add(o.recipients_hour),
            recipients_day: self.recipients_day.saturating_add(o.recipients_day),
        }
    }
}

/// The width of a shared count's bucket (`UserCount::bucket` is Unix time / this).
pub const SHARED_BUCKET: i64 = 300;
/// Buckets in a day: the oldest shared count that still counts.
pub const SHARED_BUCKETS: i64 = 24 * 3600 / SHARED_BUCKET;

/// The user counts shared with other hosts (PostgreSQL): what was counted here and not
/// sent yet, and what the others counted, as last read.
#[derive(Debug, Default)]
struct Shared {
    on: bool,
    outbox: HashMap<(String, bool, i64), i64>,
    /// Counts not shared because the outbox was full (said by the sender).
    dropped: u64,
    remote: HashMap<String, Vec<(bool, i64, i64)>>,
}

/// The counts, kept across restarts of the policy server (a reload that changes the caps
/// keeps what was counted); the limits are the caller's.
#[derive(Debug, Default)]
pub struct Caps {
    table: Mutex<HashMap<Key, Counts>>,
    shared: Mutex<Shared>,
}

/// Why a cap refused: its configuration key.
pub type CapName = &'static str;

impl Caps {
    /// Counts one recipient for `ip` and `user`, unless that would pass a recipient cap or
    /// a message cap is already reached (the message could not end anyway).
    pub fn recipient(
        &self,
        l: &CapLimits,
        ip: IpAddr,
        user: Option<&str>,
        now: i64,
    ) -> Result<(), CapName> {
        self.count(
            ip,
            user,
            now,
            true,
            |c, grant| {
                let (mh, md, rh, rd) = if grant {
                    (
                        ("grant_messages_per_hour", l.grant_messages_per_hour),
                        ("grant_messages_per_day", l.grant_messages_per_day),
                        ("grant_recipients_per_hour", l.grant_recipients_per_hour),
                        ("grant_recipients_per_day", l.grant_recipients_per_day),
                    )
                } else {
                    (
                        ("user_messages_per_hour", l.user_messages_per_hour),
                        ("user_messages_per_day", l.user_messages_per_day),
                        ("user_recipients_per_hour", l.user_recipients_per_hour),
                        ("user_recipients_per_day", l.user_recipients_per_day),
                    )
                };
                over(mh, c.messages_hour)?;
                over(md, c.messages_day)?;
                over(rh, c.recipients_hour)?;
                over(rd, c.recipients_day)?;
                Ok(())
            },
            |c, now| {
                c.recipients_hour.add(now);
                c.recipients_day.add(now);
            },
        )
    }

    /// Counts one message for `ip` and `user`, unless that would pass a message cap.
    pub fn message(
        &self,
        l: &CapLimits,
        ip: IpAddr,
        user: Option<&str>,
        now: i64,
    ) -> Result<(), CapName> {
        self.count(
            ip,
            user,
            now,
            false,
            |c, grant| {
                let (mh, md) = if grant {
                    (
                        ("grant_messages_per_hour", l.grant_messages_per_hour),
                        ("grant_messages_per_day", l.grant_messages_per_day),
                    )
                } else {
                    (
                        ("user_messages_per_hour", l.user_messages_per_hour),
                        ("user_messages_per_day", l.user_messages_per_day),
                    )
                };
                over(mh, c.messages_hour)?;
                over(md, c.messages_day)?;
                Ok(())
            },
            |c, now| {
                c.messages_hour.add(now);
                c.messages_day.add(now);
            },
        )
    }

    /// Checks the grant's and the user's counts (the user's with what other hosts
    /// counted) with `check`, then adds to both with `add`.
    fn count(
        &self,
        ip: IpAddr,
        user: Option<&str>,
        now: i64,
        recipients: bool,
        check: impl Fn(&Totals, bool) -> Result<(), CapName>,
        add: impl Fn(&mut Counts, i64),
    ) -> Result<(), CapName> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<(Key, bool)> = std::iter::once((Key::Grant(ip.to_canonical()), true))
            .chain(user.map(|u| (Key::User(u.to_string()), false)))
            .collect();
        let remote = user.map_or_else(Totals::default, |u| self.remote_totals(u, now));
        for (k, grant) in &keys {
            let local = table.get(k).map_or_else(Totals::default, |c| c.totals(now));
            let t = if *grant { local } else { local.plus(remote) };
            check(&t, *grant)?;
        }
        let missing = keys.iter().filter(|(k, _)| !table.contains_key(k)).count();
        if missing > 0 && table.len() + missing > MAX_KEYS {
            table.retain(|_, c| !(c.messages_day.idle(now) && c.recipients_day.idle(now)));
            if table.len() + missing > MAX_KEYS {
                return Err("cap table full");
            }
        }
        for (k, _) in keys {
            add(table.entry(k).or_default(), now);
        }
        drop(table);
        if let Some(u) = user {
            self.share_one(u, recipients, now);
        }
        Ok(())
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, user counts are kept for other hosts too (`take_outbox`).
    pub fn share(&self) {
        self.shared().on = true;
    }

    fn share_one(&self, user: &str, recipients: bool, now: i64) {
        let mut s = self.shared();
        if !s.on {
            return;
        }
        let key = (user.to_string(), recipients, now.div_euclid(SHARED_BUCKET));
        if s.outbox.len() >= MAX_KEYS && !s.outbox.contains_key(&key) {
            s.dropped += 1;
            return;
        }
        *s.outbox.entry(key).or_default() += 1;
    }

    /// The user counts made here since the last call, for the other hosts, and how many
    /// could not be kept for them (the outbox was full).
    pub fn take_outbox(&self) -> (Vec<UserCount>, u64) {
        let mut s = self.shared();
        let rows = std::mem::take(&mut s.outbox)
            .into_iter()
            .map(|((user, recipients, bucket), count)| UserCount {
                user,
                recipients,
                bucket,
                count,
            })
            .collect();
        (rows, std::mem::take(&mut s.dropped))
    }

    /// Counts `take_outbox` gave that could not be sent, for the next try.
    pub fn requeue(&self, rows: Vec<UserCount>) {
        let mut s = self.shared();
        for r in rows {
            *s.outbox
                .entry((r.user, r.recipients, r.bucket))
                .or_default() += r.count;
        }
    }

    /// What the other hosts counted in the last day (replaces what was read before).
    pub fn set_remote(&self, rows: Vec<UserCount>) {
        let mut remote: HashMap<String, Vec<(bool, i64, i64)>> = HashMap::new();
        for r in rows {
            remote
                .entry(r.user)
                .or_default()
                .push((r.recipients, r.bucket, r.count));
        }
        self.shared().remote = remote;
    }

    /// Users with counts from other hosts (as last read).
    pub fn remote_users(&self) -> usize {
        self.shared().remote.len()
    }

    fn remote_totals(&self, user: &str, now: i64) -> Totals {
        let s = self.shared();
        let Some(rows) = s.remote.get(user) else {
            return Totals::default();
        };
        let current = now.div_euclid(SHARED_BUCKET);
        let hour = current - 3600 / SHARED_BUCKET + 1;
        let day = current - SHARED_BUCKETS + 1;
        let mut t = Totals::default();
        let clamp = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        for &(recipients, bucket, n) in rows {
            let n = clamp(n);
            let (h, d) = if recipients {
                (&mut t.recipients_hour, &mut t.recipients_day)
            } else {
                (&mut t.messages_hour, &mut t.messages_day)
            };
            // A bucket in the future (another host's clock ahead) counts now.
            if bucket >= hour {
                *h = h.saturating_add(n);
            }
            if bucket >= day {
                *d = d.saturating_add(n);
            }
        }
        t
    }
}

/// Err(name) when a count has reached its cap (0: off).
fn over((name, limit): (CapName, u32), count: u32) -> Result<(), CapName> {
    if limit > 0 && count >= limit {
        Err(name)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_recipient_over_the_cap_is_refused_and_the_window_slides() {
        let l = CapLimits {
            user_recipients_per_hour: 3,
            ..Default::default()
        };
        let caps = Caps::default();
        let t = 1_000_000;
        for i in 0..3 {
            assert_eq!(
                caps.recipient(&l, ip("192.0.2.1"), Some("alice"), t + i),
                Ok(())
            );
        }
        // Same user, other address: the cap is the user's.
        assert_eq!(
            caps.recipient(&l, ip("192.0.2.2"), Some("alice"), t + 5),
            Err("user_recipients_per_hour")
        );
        assert_eq!(
            caps.recipient(&l, ip("192.0.2.1"), Some("bob"), t + 5),
            Ok(())
        );
        // An hour (plus a bucket) later it has slid out.
        assert_eq!(
            caps.recipient(&l, ip("192.0.2.2"), Some("alice"), t + 3600 + 300),
            Ok(())
        );
    }

    #[test]
    fn grant_caps_and_message_caps() {
        let l = CapLimits {
            grant_messages_per_day: 2,
            ..Default::default()
        };
        let caps = Caps::default();
        let a = ip("198.51.100.1");
        assert_eq!(caps.message(&l, a, None, 0), Ok(()));
        assert_eq!(caps.message(&l, a, Some("x"), 10), Ok(()));
        assert_eq!(
            caps.message(&l, a, Some("y"), 20),
            Err("grant_messages_per_day")
        );
        // A reached message cap refuses the next message's recipients at once.
        assert_eq!(
            caps.recipient(&l, a, Some("y"), 30),
            Err("grant_messages_per_day")
        );
        assert_eq!(caps.message(&l, a, None, 86_400 + 3600), Ok(()));
    }

    /// With sharing on, a user's counts go to the outbox, and what other hosts counted
    /// adds to the user's caps (not the grant's), for an hour or a day as the bucket says.
    #[test]
    fn user_caps_add_what_other_hosts_counted() {
        let l = CapLimits {
            user_messages_per_hour: 3,
            user_recipients_per_day: 10,
            grant_messages_per_hour: 3,
            ..Default::default()
        };
        let caps = Caps::default();
        let t = 1_000_000 * SHARED_BUCKET;
        assert_eq!(caps.message(&l, ip("192.0.2.1"), Some("alice"), t), Ok(()));
        assert_eq!(caps.take_outbox(), (vec![], 0), "not shared until asked");
        caps.share();
        assert_eq!(
            caps.message(&l, ip("192.0.2.1"), Some("alice"), t + 1),
            Ok(())
        );
        let (rows, dropped) = caps.take_outbox();
        assert_eq!(dropped, 0);
        assert_eq!(
            rows,
            vec![UserCount {
                user: "alice".into(),
                recipients: false,
                bucket: t / SHARED_BUCKET,
                count: 1
            }]
        );
        caps.requeue(rows.clone());
        assert_eq!(caps.take_outbox().0, rows);
        // Another host counted one message for alice two buckets ago, and 10 recipients
        // for carol 23 hours ago.
        let b = t / SHARED_BUCKET;
        caps.set_remote(vec![
            UserCount {
                user: "alice".into(),
                recipients: false,
                bucket: b - 2,
                count: 1,
            },
            UserCount {
                user: "carol".into(),
                recipients: true,
                bucket: b - 23 * 12,
                count: 10,
            },
        ]);
        assert_eq!(caps.remote_users(), 2);
        assert_eq!(
            caps.message(&l, ip("192.0.2.9"), Some("alice"), t + 2),
            Err("user_messages_per_hour"),
            "2 here + 1 elsewhere"
        );
        assert_eq!(
            caps.recipient(&l, ip("192.0.2.9"), Some("carol"), t + 2),
            Err("user_recipients_per_day")
        );
        // Bob is not alice; the grant caps count this host only.
        assert_eq!(
            caps.message(&l, ip("192.0.2.1"), Some("bob"), t + 3),
            Ok(())
        );
        // An hour later the remote message is out of the hour, the recipients a day later.
        assert_eq!(
            caps.message(&l, ip("192.0.2.9"), Some("alice"), t + 3600),
            Ok(())
        );
        assert_eq!(
            caps.recipient(&l, ip("192.0.2.9"), Some("carol"), t + 3600 * 2),
            Ok(())
        );
    }

    #[test]
    fn windows_count_by_bucket() {
        let mut w = Hour::default();
        w.add(0);
        w.add(299);
        w.add(300);
        assert_eq!(w.total(300), 3);
        assert_eq!(w.total(3599), 3);
        assert_eq!(w.total(3600), 1, "the first bucket slid out");
        assert_eq!(w.total(3900), 0);
        assert!(w.idle(4000));
        // Reused after a gap: nothing old survives.
        w.add(10_000);
        assert_eq!(w.total(10_000), 1);
        let mut d = Day::default();
        for h in 0..30 {
            d.add(h * 3600);
        }
        assert_eq!(d.total(29 * 3600), 24);
        assert_eq!(d.total(29 * 3600 + 23 * 3600), 1);
        assert_eq!(
            std::mem::size_of::<Counts>(),
            2 * (8 + 12 * 4) + 2 * (8 + 24 * 4)
        );
    }
}
