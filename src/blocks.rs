//! Blocked users (`policy.block_on_cap`): a user who trips a sending cap loses every grant,
//! is granted nothing more and, where dovegate answers Dovecot's auth policy, may not log
//! in until `dovegate unblock USER`. Neutral (it imports only `telemetry` and `timefmt`):
//! the policy server writes it, the engine revokes from it, the auth-policy endpoint (a
//! source) reads it, all through one `Blocks`.
//!
//! The set lives in `STATE/policy-blocked.json` (read-modify-write under an fcntl lock on
//! `STATE/policy-blocked.lock`, by the daemon and by `dovegate unblock`); the daemon
//! re-reads it when it changes. Revocations wait here for the engine, which removes the
//! grants from the store on its next probe (within a quarter second). The auth-policy
//! endpoint asks `login` here before each IMAP/POP3 login it is consulted on.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::telemetry::ratelimit::SharedLimit;

/// The file of blocked users in the state directory.
pub const BLOCKED_FILE: &str = "policy-blocked.json";
const LOCK_FILE: &str = "policy-blocked.lock";
/// The most users blocked at once; past it nobody more is blocked (logged): the caps
/// still defer them.
pub const MAX_BLOCKED: usize = 10_000;

/// Why and since when a user is blocked, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockEntry {
    pub since: String,
    pub cap: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// Blocked users and the cap each tripped.
    users: HashMap<String, String>,
    revoke: Vec<(IpAddr, String)>,
    /// The file's identity (inode, modification time) when last read or written.
    seen: Option<(u64, SystemTime)>,
    /// Why the last re-read failed (None: it succeeded); the set read before stays.
    unreadable: Option<String>,
    blocked_total: u64,
}

/// What the blocks say about a login (`Blocks::login`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginCheck {
    Allowed,
    /// Blocked for tripping this cap.
    Blocked(String),
    /// The file cannot be read now (the reason): nobody is refused on a guess.
    Unreadable(String),
}

/// Shared by the policy server (blocks), the engine (refuses and revokes) and the file.
#[derive(Debug, Clone)]
pub struct Blocks {
    dir: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
    /// The WARN about users not blocked for the bound (every capped request could say it).
    full: Arc<SharedLimit>,
    /// The ERROR about an unreadable file (the engine re-reads it at every probe).
    unreadable: Arc<SharedLimit>,
}

/// Holds the fcntl OFD lock of the blocked file while alive.
struct FileLock(#[allow(dead_code)] std::fs::File);

fn lock(dir: &Path) -> io::Result<FileLock> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .custom_flags(libc::O_NOFOLLOW)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    crate::ofd::set(&file, crate::ofd::Kind::Exclusive, true)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(FileLock(file))
}

/// The blocked users in `dir`'s file (none when it does not exist).
pub fn read_blocked(dir: &Path) -> io::Result<BTreeMap<String, BlockEntry>> {
    let path = dir.join(BLOCKED_FILE);
    match std::fs::read(&path) {
        Ok(t) => serde_json::from_slice(&t).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e} (fix or remove the file)", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn write_blocked(dir: &Path, all: &BTreeMap<String, BlockEntry>) -> io::Result<()> {
    let path = dir.join(BLOCKED_FILE);
    let tmp = dir.join(format!("{BLOCKED_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(all).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Edits the file under its lock.
fn edit<T>(dir: &Path, f: impl FnOnce(&mut BTreeMap<String, BlockEntry>) -> T) -> io::Result<T> {
    std::fs::create_dir_all(dir)?;
    let _lock = lock(dir)?;
    let mut all = read_blocked(dir)?;
    let out = f(&mut all);
    write_blocked(dir, &all)?;
    Ok(out)
}

/// `dovegate unblock USER`: true when the user was blocked.
pub fn unblock(dir: &Path, user: &str) -> io::Result<bool> {
    edit(dir, |all| all.remove(user).is_some())
}

impl Blocks {
    /// Blocks kept in `dir` (None: in memory only, for tests), read now.
    pub fn new(dir: Option<&Path>) -> io::Result<Blocks> {
        let b = Blocks {
            dir: dir.map(Path::to_path_buf),
            inner: Arc::default(),
            full: Arc::default(),
            unreadable: Arc::default(),
        };
        b.reload()?;
        Ok(b)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_blocked(&self, user: &str) -> bool {
        self.lock().users.contains_key(user)
    }

    /// Whether `user` may log in (the auth-policy endpoint, before every login it is asked
    /// about): the file is re-read first when it changed (one stat otherwise), so an
    /// unblock counts at the very next login. While the file cannot be read, the answer is
    /// `Unreadable` whoever asks: refusing on the last set read (or everyone) would keep
    /// users out of their mail on a file nobody can check, while their grants stay revoked
    /// by the engine either way.
    pub fn login(&self, user: &str) -> LoginCheck {
        if let Ok(true) = self.reload() {
            tracing::info!(blocked = self.len(), "blocked users re-read");
        }
        let m = self.lock();
        if let Some(e) = &m.unreadable {
            return LoginCheck::Unreadable(e.clone());
        }
        match m.users.get(user) {
            Some(cap) => LoginCheck::Blocked(cap.clone()),
            None => LoginCheck::Allowed,
        }
    }

    pub fn blocked_total(&self) -> u64 {
        self.lock().blocked_total
    }

    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-reads the file when it changed (an unblock); returns whether the set changed.
    pub fn reload(&self) -> io::Result<bool> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let mtime = identity(dir);
        if mtime == self.lock().seen && mtime.is_some() {
            return Ok(false);
        }
        let users: HashMap<String, String> = match read_blocked(dir) {
            Ok(all) => all.into_iter().map(|(u, e)| (u, e.cap)).collect(),
            Err(e) => {
                self.lock().unreadable = Some(e.to_string());
                return Err(e);
            }
        };
        let mut m = self.lock();
        let changed = m.users != users;
        m.users = users;
        m.seen = mtime;
        m.unreadable = None;
        Ok(changed)
    }

    /// `reload` for the engine's probes: a change (an unblock) is logged, a failure too
    /// (rate-limited); the set read last stays.
    pub fn refresh(&self) {
        match self.reload() {
            Ok(true) => {
                tracing::info!(blocked = self.len(), "blocked users re-read")
            }
            Ok(false) => {}
            Err(e) => {
                if let Some(n) = self.unreadable.hit() {
                    tracing::error!(error = %e, failures = n, "cannot read the blocked users");
                }
            }
        }
    }

    /// Blocks `user` (who tripped `cap`) and queues the revocation of `addresses`.
    /// Returns false when the user was already blocked or the bound is reached.
    pub fn block(&self, user: &str, cap: &str, addresses: Vec<IpAddr>, now: i64) -> bool {
        {
            let mut m = self.lock();
            if m.users.contains_key(user) {
                m.revoke
                    .extend(addresses.into_iter().map(|ip| (ip, user.to_string())));
                return false;
            }
            if m.users.len() >= MAX_BLOCKED {
                self.full.warn(&format!(
                    "policy.block_on_cap: {MAX_BLOCKED} users blocked already; not blocking {} (the caps still defer them)",
                    user.escape_debug()
                ));
                return false;
            }
            m.users.insert(user.to_string(), cap.to_string());
            m.revoke
                .extend(addresses.into_iter().map(|ip| (ip, user.to_string())));
            m.blocked_total += 1;
        }
        if let Some(dir) = &self.dir {
            let entry = BlockEntry {
                since: crate::timefmt::rfc3339(now),
                cap: cap.to_string(),
            };
            let written = edit(dir, |all| {
                all.insert(user.to_string(), entry);
            });
            match written {
                Ok(()) => self.lock().seen = identity(dir),
                Err(e) => tracing::error!(
                    user = %user.escape_debug(),
                    error = %e,
                    "cannot record the blocked user: blocked until the daemon restarts only"
                ),
            }
        }
        true
    }

    /// Every blocked user with the cap it tripped.
    pub fn users(&self) -> Vec<(String, String)> {
        let m = self.lock();
        m.users
            .iter()
            .map(|(u, c)| (u.clone(), c.clone()))
            .collect()
    }

    /// Unblocks `user` (unblocked on another host): in memory and in the file. True when
    /// it was blocked.
    pub fn unblock(&self, user: &str) -> io::Result<bool> {
        let was = self.lock().users.remove(user).is_some();
        if let Some(dir) = &self.dir {
            edit(dir, |all| all.remove(user))?;
            self.lock().seen = identity(dir);
        }
        Ok(was)
    }

    /// The addresses whose grants must be revoked now.
    pub fn take_revocations(&self) -> Vec<(IpAddr, String)> {
        std::mem::take(&mut self.lock().revoke)
    }

    /// Revocations that failed, for the next try.
    pub fn requeue(&self, ips: Vec<(IpAddr, String)>) {
        self.lock().revoke.extend(ips);
    }
}

/// The blocked file's identity: every write replaces it (a new inode).
fn identity(dir: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(dir.join(BLOCKED_FILE)).ok()?;
    Some((m.ino(), m.modified().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a file, every probe reads "nothing": no change to report.
    #[test]
    fn no_file_is_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blocks::new(Some(dir.path())).unwrap();
        assert!(!b.reload().unwrap());
        assert!(!b.reload().unwrap());
    }

    #[test]
    fn block_persists_and_unblock_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blocks::new(Some(dir.path())).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(b.block("alice", "user_messages_per_hour", vec![ip], 0));
        assert!(!b.block("alice", "user_messages_per_hour", vec![], 0));
        assert!(b.is_blocked("alice"));
        assert_eq!(b.take_revocations(), vec![(ip, "alice".to_string())]);
        assert!(b.take_revocations().is_empty());
        // A restart reads it back.
        assert!(Blocks::new(Some(dir.path())).unwrap().is_blocked("alice"));
        assert!(unblock(dir.path(), "alice").unwrap());
        assert!(!unblock(dir.path(), "alice").unwrap());
        // The file was replaced (a new inode): the unblock is seen, once.
        assert!(b.reload().unwrap(), "the unblock is seen");
        assert!(!b.is_blocked("alice"));
        assert!(!b.reload().unwrap(), "nothing changed since");
        let fresh = Blocks::new(Some(dir.path())).unwrap();
        assert!(!fresh.is_blocked("alice"));
    }

    /// The endpoint's question: the cap of a blocked user, an unblock seen at once, and
    /// nobody refused while the file cannot be read.
    #[test]
    fn login_checks() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blocks::new(Some(dir.path())).unwrap();
        assert_eq!(b.login("alice"), LoginCheck::Allowed);
        assert!(b.block("alice", "user_messages_per_hour", vec![], 0));
        assert_eq!(
            b.login("alice"),
            LoginCheck::Blocked("user_messages_per_hour".into())
        );
        assert_eq!(b.login("bob"), LoginCheck::Allowed);
        // Another process (the daemon's policy server) blocks bob: seen at once.
        let other = Blocks::new(Some(dir.path())).unwrap();
        assert!(other.block("bob", "grant_messages", vec![], 0));
        assert_eq!(b.login("bob"), LoginCheck::Blocked("grant_messages".into()));
        assert!(unblock(dir.path(), "alice").unwrap());
        assert_eq!(b.login("alice"), LoginCheck::Allowed);
        // A broken file: nobody refused, the reason given, every time it is asked.
        // Replaced as every writer does (a new inode: a rewrite in place within the same
        // clock tick could keep the identity).
        let replace = |text: &[u8]| {
            let tmp = dir.path().join("t");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(BLOCKED_FILE)).unwrap();
        };
        replace(b"{ broken");
        for _ in 0..2 {
            match b.login("bob") {
                LoginCheck::Unreadable(e) => assert!(e.contains(BLOCKED_FILE), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        // The engine keeps the set it read last (its grants stay revoked).
        assert!(b.is_blocked("bob"));
        replace(b"{}");
        assert_eq!(b.login("bob"), LoginCheck::Allowed);
    }
}
