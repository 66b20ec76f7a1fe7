//! The Postfix LMDB map (`lmdb:PATH`, file `PATH.lmdb`).
//!
//! Rules from `shared/notes/postfix-lmdb.md`, all kept here: one file, `MDB_NOSUBDIR |
//! MDB_NOLOCK`, main database only, never `MDB_WRITEMAP`, default sync; every write
//! transaction inside an exclusive OFD lock on the whole file, own reads under a shared
//! one; created empty if missing and never replaced; grow on `MDB_MAP_FULL`, adopt another
//! writer's size on `MDB_MAP_RESIZED`.

use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lmdb::{Cursor, Database, Environment, EnvironmentFlags, Transaction, WriteFlags};

use super::damage;
use super::file::{self, FileFault, FileIdentity};
use super::lock::FileLock;
#[cfg(test)]
use super::value::key_bytes;
use super::value::{key_bytes_with, parse_expiry, parse_key_with, value_bytes, value_text};
use super::{AdminStore, Cause, CommitStore, ExpireOutcome, StoreError, StoredGrant};

const INITIAL_MAP_SIZE: usize = 16 << 20;
const MAX_MAP_SIZE: usize = 1 << 40;

/// An open map. Writes are serialised by `&mut self`; keep one per process.
pub struct LmdbMap {
    path: PathBuf,
    action: String,
    mode: OpenMode,
    env: Environment,
    db: Database,
    lock_file: File,
    map_size: usize,
    /// The file we opened; another one at `path` means the map was replaced.
    ident: FileIdentity,
    /// The longest length seen: LMDB never shrinks its file, so a shorter one was truncated.
    known_len: u64,
    /// The last transaction this process accounted for (its own commit or a full read).
    synced_txnid: usize,
    /// Another writer committed since the last full read (`snapshot`).
    others_wrote: bool,
    /// `grant.ipv6_prefix`: how IPv6 grants are keyed.
    ipv6_prefix: u8,
}

/// How to open the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read-write; create it empty if missing (the daemon).
    Create,
    /// Read-write; it must exist (administrator's grant and revoke).
    Existing,
    /// Read-only, shared locks only (lookup, list, status; any user who can read it).
    ReadOnly,
}

/// The file Postfix opens for `lmdb:map`.
pub fn file_path(map: &Path) -> PathBuf {
    let mut s = map.as_os_str().to_owned();
    s.push(".lmdb");
    PathBuf::from(s)
}

/// One opening of the file: what `LmdbMap` replaces when it reopens.
struct Opened {
    env: Environment,
    db: Database,
    lock_file: File,
    map_size: usize,
    ident: FileIdentity,
    known_len: u64,
    txnid: usize,
}

fn txnid(env: &Environment) -> usize {
    env.info().map(|i| i.last_txnid()).unwrap_or(0)
}

/// A failed lock on the map; a lock held too long (any user who can read the map can
/// hold one) says what it blocks and what to do.
fn lock_error(path: &Path, e: &std::io::Error) -> StoreError {
    let held = e.kind() == std::io::ErrorKind::WouldBlock;
    let what = if held {
        "cannot lock for writing"
    } else {
        "cannot lock"
    };
    let mut err = StoreError::io(path, what, e);
    if held {
        err.0.push_str(
            "; until it lets go, expired grants stay in the map and new logins are not committed: find the holder (lslocks, or the file's inode in /proc/locks) and stop it",
        );
    }
    err
}

/// Who may open the map: its owner (the daemon's user), root, and Postfix's group (smtpd
/// opens it as root, other Postfix programs may run as `postfix`). Nobody else: any user
/// who can open it can hold a read lock that stalls every write (issue 20).
const MAP_MODE: u32 = 0o640;

/// The group Postfix's programs run as.
const POSTFIX_GROUP: &str = "postfix";

fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Gives a map the daemon creates (or finds readable by every user) mode 0640 and Postfix's
/// group. A failure is reported, never fatal: smtpd opens the map as root anyway.
fn restrict(file: &File, path: &Path, created: bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return;
    };
    let open_to_all = meta.mode() & 0o007 != 0;
    if !created && !open_to_all {
        return;
    }
    if let Some(gid) = group_id(POSTFIX_GROUP).filter(|&g| g != meta.gid()) {
        if let Err(e) = std::os::unix::fs::fchown(file, None, Some(gid)) {
            tracing::warn!(
                map = %path.display(),
                error = %e,
                "cannot give the map to group {POSTFIX_GROUP}; as root: chgrp {POSTFIX_GROUP} {}",
                path.display()
            );
        }
    }
    if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(MAP_MODE)) {
        tracing::warn!(map = %path.display(), error = %e, "cannot chmod the map 0640; every local user can read-lock it and stall its writes: chmod 0640 {}", path.display());
    } else if open_to_all {
        tracing::warn!(
            map = %path.display(),
            "the map was readable by every local user (mode {:04o}), who could hold a read lock and stall expiries; changed it to 0640",
            meta.mode() & 0o7777
        );
    }
}

/// Opens `path` (the `.lmdb` file), creating it (empty, mode 0640, group postfix) when
/// `mode` says so.
fn open_file(path: &Path, mode: OpenMode) -> Result<Opened, StoreError> {
    let create = mode == OpenMode::Create;
    let writable = mode != OpenMode::ReadOnly;
    let io = |what: &str, e: &std::io::Error| StoreError::io(path, what, e);
    let lmdb = |what: &str, e: lmdb::Error| StoreError::lmdb(path, what, e);
    let existed = path.exists();
    if !existed && !create {
        return Err(StoreError::new(
            format!(
                "{}: no such map; check map.path (--map), or create it with `dovegate init`",
                path.display()
            ),
            Cause::Missing,
        ));
    }
    if !existed {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("cannot create directory", &e))?;
        }
    }
    let lock_file = OpenOptions::new()
        .read(true)
        .write(writable)
        .create(create)
        .mode(MAP_MODE)
        .open(path)
        .map_err(|e| io("cannot open", &e))?;
    if create {
        restrict(&lock_file, path, !existed);
    }
    let meta = lock_file.metadata().map_err(|e| io("cannot stat", &e))?;
    let ident = FileIdentity::of(&meta);
    let fresh = meta.len() == 0;
    let map_size = usize::try_from(meta.len())
        .unwrap_or(MAX_MAP_SIZE)
        .next_power_of_two()
        .max(INITIAL_MAP_SIZE);
    // Opening a new, empty file writes LMDB's meta pages: do it under the write lock so
    // no Postfix reader sees a half-initialised file.
    let guard = if writable {
        FileLock::exclusive(&lock_file)
    } else {
        FileLock::shared(&lock_file)
    }
    .map_err(|e| lock_error(path, &e))?;
    let mut flags = EnvironmentFlags::NO_SUB_DIR | EnvironmentFlags::NO_LOCK;
    if !writable {
        flags |= EnvironmentFlags::READ_ONLY;
    }
    let env = Environment::new()
        .set_flags(flags)
        .set_map_size(map_size)
        .open_with_permissions(path, MAP_MODE as libc::mode_t)
        .map_err(|e| lmdb("cannot open LMDB environment", e))?;
    let mut fd: lmdb_sys::mdb_filehandle_t = -1;
    // SAFETY: an open environment and a pointer to a local for the call's duration.
    if unsafe { lmdb_sys::mdb_env_get_fd(env.env(), &mut fd) } == 0 {
        file::set_cloexec(fd).map_err(|e| io("cannot set close-on-exec", &e))?;
    }
    let db = env
        .open_db(None)
        .map_err(|e| lmdb("cannot open main database", e))?;
    if fresh && writable {
        let txn = env.begin_rw_txn().map_err(|e| lmdb("cannot begin", e))?;
        txn.commit().map_err(|e| lmdb("cannot commit", e))?;
    }
    let known_len = lock_file.metadata().map(|m| m.len()).unwrap_or(0);
    let map_size = env.info().map_or(map_size, |i| i.map_size());
    let txnid = txnid(&env);
    drop(guard);
    Ok(Opened {
        env,
        db,
        lock_file,
        map_size,
        ident,
        known_len,
        txnid,
    })
}

impl LmdbMap {
    /// Opens the map, creating it (empty, mode 0640, group postfix) when `create` and it is
    /// missing.
    pub fn open(map: &Path, action: &str, mode: OpenMode) -> Result<LmdbMap, StoreError> {
        let path = file_path(map);
        let o = open_file(&path, mode)?;
        let m = LmdbMap {
            path,
            action: action.to_string(),
            mode,
            env: o.env,
            db: o.db,
            lock_file: o.lock_file,
            map_size: o.map_size,
            ident: o.ident,
            known_len: o.known_len,
            synced_txnid: o.txnid,
            others_wrote: false,
            ipv6_prefix: 128,
        };
        m.reserve();
        Ok(m)
    }

    /// The configured map (`map.path`, `map.action`), keyed as `grant.ipv6_prefix` says.
    pub fn open_configured(
        settings: &crate::config::Settings,
        mode: OpenMode,
    ) -> Result<LmdbMap, StoreError> {
        LmdbMap::open_keyed(
            &settings.map_path,
            &settings.action,
            mode,
            settings.ipv6_prefix,
        )
    }

    /// `open`, keyed for `grant.ipv6_prefix` (`with_ipv6_prefix`); removals are logged.
    pub fn open_keyed(
        map: &Path,
        action: &str,
        mode: OpenMode,
        bits: u8,
    ) -> Result<LmdbMap, StoreError> {
        let (m, removed) = LmdbMap::open(map, action, mode)?.with_ipv6_prefix(bits)?;
        if removed > 0 {
            tracing::warn!(
                removed,
                ipv6_prefix = bits,
                "removed grants keyed for another grant.ipv6_prefix"
            );
        }
        Ok(m)
    }

    /// Keys for IPv6 grants kept under their /`bits` network (`grant.ipv6_prefix`). A
    /// writer first removes dovegate's entries that only another setting would write
    /// (prefix keys of another length): nothing would ever expire them, and Postfix reads
    /// `OK expires=...` as OK whatever the date. Returns how many were removed.
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Result<(LmdbMap, usize), StoreError> {
        self.ipv6_prefix = bits;
        if self.mode == OpenMode::ReadOnly {
            return Ok((self, 0));
        }
        let removed = self.write(|txn, db| {
            let mut stale = Vec::new();
            {
                let mut cursor = txn.open_ro_cursor(db)?;
                for item in cursor.iter_start() {
                    let (k, v) = item?;
                    let ours = parse_expiry(v).is_some();
                    let other_setting = || {
                        crate::grant::IPV6_PREFIXES
                            .iter()
                            .any(|&b| parse_key_with(k, b).is_some())
                    };
                    if ours && parse_key_with(k, bits).is_none() && other_setting() {
                        stale.push(k.to_vec());
                    }
                }
            }
            for k in &stale {
                txn.del(db, k, None)?;
            }
            Ok(stale.len())
        })?;
        Ok((self, removed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The memory map's size (what the next growth doubles).
    pub fn map_size(&self) -> usize {
        self.map_size
    }

    fn lmdb_err(&self, what: &str, e: lmdb::Error) -> StoreError {
        StoreError::lmdb(&self.path, what, e)
    }

    fn lock_err(&self, e: std::io::Error) -> StoreError {
        lock_error(&self.path, &e)
    }

    /// An LMDB error; one that says the file is damaged makes a writer move the file aside,
    /// put a new map in its place and answer `Cause::Reopened` (the caller writes its live
    /// grants again), so that a damaged map never stops the daemon.
    fn failed(&mut self, what: &str, e: lmdb::Error) -> StoreError {
        if self.mode == OpenMode::ReadOnly || !damage::is_damage(&e) {
            return self.lmdb_err(what, e);
        }
        let why = format!("{what}: {e}");
        let replaced = damage::replace_damaged(
            &self.path,
            &self.action,
            &why,
            &[],
            128,
            crate::timefmt::now(),
        )
        .and_then(|_| self.reopen_file());
        match replaced {
            Ok(()) => StoreError::new(
                format!(
                    "{}: the map was damaged ({why}); replaced it",
                    self.path.display()
                ),
                Cause::Reopened,
            ),
            Err(err) => err,
        }
    }

    /// Reserves the disk blocks of the whole map size (see `file::reserve`); a failure is
    /// reported, never fatal: the map works, only a full disk would then stop expiries.
    fn reserve(&self) {
        if self.mode == OpenMode::ReadOnly {
            return;
        }
        if let Err(e) = file::reserve(&self.lock_file, self.map_size as u64) {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                tracing::debug!(map = %self.path.display(), "filesystem cannot reserve blocks");
            } else {
                tracing::error!(
                    map = %self.path.display(),
                    size = self.map_size,
                    error = %e,
                    "cannot reserve disk space for the map; free space on its filesystem, or expired grants may stay in the map when the disk fills"
                );
            }
        }
    }

    /// Before every transaction: the file must still be the one at the path, and not
    /// shorter than before (reading a page past the end is SIGBUS). A writer reopens the
    /// map (creating it empty when missing) and answers `Cause::Reopened`.
    fn check(&mut self) -> Result<(), StoreError> {
        let fault = file::check(&self.path, &self.lock_file, self.ident, &mut self.known_len)
            .map_err(|e| StoreError::io(&self.path, "cannot stat the map", &e))?;
        let Some(fault) = fault else {
            return Ok(());
        };
        if self.mode == OpenMode::ReadOnly {
            return Err(StoreError::other(format!(
                "{}: the map {fault} while it was being read; run the command again",
                self.path.display()
            )));
        }
        tracing::error!(
            map = %self.path.display(),
            "the map {fault} while dovegate had it open; reopening it (empty if missing) and writing the live grants again. Postfix obeys the file at this path: never delete, replace or truncate it (use dovegate grant/revoke); smtpd processes that found it missing answer 451 until `postfix reload`"
        );
        self.reopen(&fault)?;
        Err(StoreError::new(
            format!("{}: the map {fault}; reopened it", self.path.display()),
            Cause::Reopened,
        ))
    }

    fn reopen(&mut self, fault: &FileFault) -> Result<(), StoreError> {
        if let FileFault::Truncated { .. } = fault {
            // What is left may point at pages past the end: start over, empty, under the
            // write lock so that no Postfix reader sees it half-written.
            let guard = FileLock::exclusive(&self.lock_file).map_err(|e| self.lock_err(e))?;
            let cut = self.lock_file.set_len(0);
            drop(guard);
            cut.map_err(|e| StoreError::io(&self.path, "cannot truncate", &e))?;
        }
        self.reopen_file()
    }

    /// Opens the file at the path again (after it was replaced or cut).
    fn reopen_file(&mut self) -> Result<(), StoreError> {
        let o = open_file(&self.path, self.mode)?;
        self.env = o.env;
        self.db = o.db;
        self.lock_file = o.lock_file;
        self.map_size = o.map_size;
        self.ident = o.ident;
        self.known_len = o.known_len;
        self.synced_txnid = o.txnid;
        // Its content is not what we read last.
        self.others_wrote = true;
        self.reserve();
        Ok(())
    }

    /// Runs `work` in one write transaction under the exclusive lock, growing the map and
    /// retrying when it is full.
    fn write<T>(
        &mut self,
        mut work: impl FnMut(&mut lmdb::RwTransaction<'_>, Database) -> Result<T, lmdb::Error>,
    ) -> Result<T, StoreError> {
        if self.mode == OpenMode::ReadOnly {
            return Err(StoreError::other(format!(
                "{}: opened read-only",
                self.path.display()
            )));
        }
        self.check()?;
        loop {
            // The transaction borrows the environment: its outcome leaves this block
            // without it, so that a damaged map can be replaced below.
            let outcome = {
                let guard = FileLock::exclusive(&self.lock_file).map_err(|e| self.lock_err(e))?;
                if txnid(&self.env) != self.synced_txnid {
                    self.others_wrote = true;
                }
                match self.env.begin_rw_txn() {
                    Err(lmdb::Error::MapResized) => {
                        // Another writer grew the file: adopt its size and retry.
                        let adopted = self.env.set_map_size(0);
                        drop(guard);
                        adopted.map_err(|e| self.lmdb_err("cannot adopt new map size", e))?;
                        // The size LMDB adopted is the one the next growth doubles.
                        if let Ok(info) = self.env.info() {
                            self.map_size = info.map_size();
                        }
                        self.reserve();
                        continue;
                    }
                    Err(e) => Err(("cannot begin transaction", e)),
                    Ok(mut txn) => {
                        let result = work(&mut txn, self.db).and_then(|v| txn.commit().map(|()| v));
                        if result.is_ok() {
                            self.synced_txnid = txnid(&self.env);
                        }
                        result.map_err(|e| ("write failed", e))
                    }
                }
            };
            match outcome {
                Ok(v) => {
                    // Replaced between the check and the commit: what we wrote is in a file
                    // Postfix no longer reads; the caller writes it again.
                    self.check()?;
                    return Ok(v);
                }
                Err((_, lmdb::Error::MapFull)) if self.map_size < MAX_MAP_SIZE => {
                    self.map_size *= 2;
                    self.env
                        .set_map_size(self.map_size)
                        .map_err(|e| self.lmdb_err("cannot grow map", e))?;
                    self.reserve();
                    tracing::info!(map = %self.path.display(), size = self.map_size, "map grown");
                }
                Err((what, e)) => return Err(self.failed(what, e)),
            }
        }
    }

    /// Runs `work` in a read transaction under the shared lock; also returns the id of the
    /// transaction it read.
    fn read<T>(
        &mut self,
        work: impl FnOnce(&lmdb::RoTransaction<'_>, Database) -> Result<T, lmdb::Error>,
    ) -> Result<(T, usize), StoreError> {
        self.check()?;
        let mut work = Some(work);
        loop {
            let outcome = {
                let guard = FileLock::shared(&self.lock_file).map_err(|e| self.lock_err(e))?;
                match self.env.begin_ro_txn() {
                    Err(lmdb::Error::MapResized) => {
                        let adopted = self.env.set_map_size(0);
                        drop(guard);
                        adopted.map_err(|e| self.lmdb_err("cannot adopt new map size", e))?;
                        // The size LMDB adopted is the one the next growth doubles.
                        if let Ok(info) = self.env.info() {
                            self.map_size = info.map_size();
                        }
                        self.reserve();
                        continue;
                    }
                    Err(e) => Err(("cannot begin read", e)),
                    Ok(txn) => {
                        let Some(work) = work.take() else {
                            unreachable!("read work runs once");
                        };
                        let v = work(&txn, self.db);
                        let id = txnid(&self.env);
                        let ended = txn.commit();
                        match (v, ended) {
                            (Ok(v), Ok(())) => Ok((v, id)),
                            (Err(e), _) => Err(("read failed", e)),
                            (Ok(_), Err(e)) => Err(("cannot end read", e)),
                        }
                    }
                }
            };
            return outcome.map_err(|(what, e)| self.failed(what, e));
        }
    }
}

impl LmdbMap {
    /// Removes every entry in one transaction (the file and its inode stay: Postfix keeps
    /// reading it); returns how many there were.
    pub fn clear(&mut self) -> Result<usize, StoreError> {
        self.write(|txn, db| {
            let count = txn.open_ro_cursor(db)?.iter_start().count();
            txn.clear_db(db)?;
            Ok(count)
        })
    }
}

fn get_opt<'t>(
    txn: &'t impl Transaction,
    db: Database,
    key: &[u8],
) -> Result<Option<&'t [u8]>, lmdb::Error> {
    match txn.get(db, &key) {
        Ok(v) => Ok(Some(v)),
        Err(lmdb::Error::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

impl CommitStore for LmdbMap {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let bits = self.ipv6_prefix;
        let action = self.action.clone();
        self.write(|txn, db| {
            let mut out = Vec::with_capacity(grants.len());
            for &(ip, expires) in grants {
                let key = key_bytes_with(ip, bits);
                let stored = get_opt(txn, db, &key)?.and_then(parse_expiry);
                match stored {
                    Some(s) if s >= expires => out.push((ip, s)),
                    _ => {
                        txn.put(
                            db,
                            &key,
                            &value_bytes(&action, expires),
                            WriteFlags::empty(),
                        )?;
                        out.push((ip, expires));
                    }
                }
            }
            Ok(out)
        })
    }

    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        let bits = self.ipv6_prefix;
        self.write(|txn, db| {
            let mut out = ExpireOutcome::default();
            for &ip in ips {
                let key = key_bytes_with(ip, bits);
                let Some(value) = get_opt(txn, db, &key)? else {
                    continue;
                };
                match parse_expiry(value) {
                    Some(e) if e <= now => {
                        txn.del(db, &key, None)?;
                        out.removed.push(ip);
                    }
                    Some(e) => out.extended.push((ip, e)),
                    // An entry without expiry was written by someone else: leave it alone.
                    None => {}
                }
            }
            Ok(out)
        })
    }

    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        let expired: Vec<IpAddr> = self
            .list()?
            .into_iter()
            .filter(|g| g.expires.is_some_and(|e| e <= now))
            .map(|g| g.ip)
            .collect();
        Ok(self.expire(&expired, now)?.removed.len())
    }

    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let bits = self.ipv6_prefix;
        let (out, id) = self.read(|txn, db| {
            let mut cursor = txn.open_ro_cursor(db)?;
            let mut out = Vec::new();
            for item in cursor.iter_start() {
                let (k, v) = item?;
                if let (Some(ip), Some(e)) = (parse_key_with(k, bits), parse_expiry(v)) {
                    out.push((ip, e));
                }
            }
            Ok(out)
        })?;
        self.synced_txnid = id;
        self.others_wrote = false;
        file::release_mapped_pages(self.ident);
        Ok(out)
    }

    /// A look at the meta page (no listing, no lock: a torn read only means "changed").
    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        self.check()?;
        Ok(Some(
            self.others_wrote || txnid(&self.env) != self.synced_txnid,
        ))
    }

    /// In transactions of at most `CAP_BATCH` keys: LMDB keeps every page a transaction
    /// dirtied in its own free list for good, so one transaction over a whole large map
    /// (a clock fixed after a step forward) would pin the map's size in heap. Shortening
    /// is safe to commit piecemeal.
    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let bits = self.ipv6_prefix;
        const CAP_BATCH: usize = 1000;
        let value = value_bytes(&self.action, limit);
        let mut out = Vec::with_capacity(ips.len());
        for batch in ips.chunks(CAP_BATCH) {
            out.extend(self.write(|txn, db| {
                let mut out = Vec::with_capacity(batch.len());
                for &ip in batch {
                    let key = key_bytes_with(ip, bits);
                    match get_opt(txn, db, &key)?.and_then(parse_expiry) {
                        Some(e) if e > limit => {
                            txn.put(db, &key, &value, WriteFlags::empty())?;
                            out.push((ip, limit));
                        }
                        Some(e) => out.push((ip, e)),
                        None => {}
                    }
                }
                Ok(out)
            })?);
        }
        file::release_mapped_pages(self.ident);
        Ok(out)
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        let bits = self.ipv6_prefix;
        self.write(
            |txn, db| match txn.del(db, &key_bytes_with(ip, bits), None) {
                Ok(()) => Ok(true),
                Err(lmdb::Error::NotFound) => Ok(false),
                Err(e) => Err(e),
            },
        )
    }
}

impl AdminStore for LmdbMap {
    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
        let bits = self.ipv6_prefix;
        let (list, _) = self.read(|txn, db| {
            let mut cursor = txn.open_ro_cursor(db)?;
            let mut out = Vec::new();
            for item in cursor.iter_start() {
                let (k, v) = item?;
                if let Some(ip) = parse_key_with(k, bits) {
                    out.push(StoredGrant {
                        ip,
                        expires: parse_expiry(v),
                        value: value_text(v),
                    });
                }
            }
            Ok(out)
        })?;
        file::release_mapped_pages(self.ident);
        Ok(list)
    }

    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
        let bits = self.ipv6_prefix;
        let (v, _) =
            self.read(|txn, db| Ok(get_opt(txn, db, &key_bytes_with(ip, bits))?.map(value_text)))?;
        Ok(v)
    }

    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        let bits = self.ipv6_prefix;
        let value = value_bytes(&self.action, expires);
        self.write(|txn, db| txn.put(db, &key_bytes_with(ip, bits), &value, WriteFlags::empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_keys_and_a_changed_setting() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let open = |bits| {
            LmdbMap::open(&map, "OK", OpenMode::Create)
                .unwrap()
                .with_ipv6_prefix(bits)
                .unwrap()
        };
        let (mut m, removed) = open(64);
        assert_eq!(removed, 0);
        let net: IpAddr = "2001:db8:1:2::".parse().unwrap();
        let one: IpAddr = "2001:db8::7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        m.upsert(&[(net, 100), (one, 100), (v4, 100)]).unwrap();
        m.write(|txn, db| txn.put(db, b"2001:db8:5:6\0", b"OK\0", WriteFlags::empty()))
            .unwrap();
        let mut keys: Vec<IpAddr> = m.list().unwrap().into_iter().map(|g| g.ip).collect();
        keys.sort();
        assert_eq!(keys, vec![v4, one, net, "2001:db8:5:6::".parse().unwrap()]);
        assert!(m.get(net).unwrap().is_some());
        let out = m.expire(&[net], 150).unwrap();
        assert_eq!(out.removed, vec![net]);
        m.upsert(&[(net, 100)]).unwrap();
        drop(m);
        // Back to 128: the /64 key would never expire, so it goes; an administrator's entry
        // (no expiry) and per-address keys stay.
        let (mut m, removed) = open(128);
        assert_eq!(removed, 1);
        let mut keys: Vec<IpAddr> = m.list().unwrap().into_iter().map(|g| g.ip).collect();
        keys.sort();
        assert_eq!(keys, vec![v4, one]);
        let (_, removed) = open(64);
        assert_eq!(removed, 0);
    }

    #[test]
    fn create_upsert_expire() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("sub/relay");
        let mut m = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let meta = std::fs::metadata(file_path(&map)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert!(!dir.path().join("sub/relay.lmdb-lock").exists());
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            m.upsert(&[(a, 100), (b, 200)]).unwrap(),
            vec![(a, 100), (b, 200)]
        );
        // An earlier expiry never shortens a grant.
        assert_eq!(m.upsert(&[(a, 50)]).unwrap(), vec![(a, 100)]);
        assert_eq!(
            m.get(a).unwrap().as_deref(),
            Some("OK expires=1970-01-01T00:01:40Z")
        );
        let out = m.expire(&[a, b], 150).unwrap();
        assert_eq!(out.removed, vec![a]);
        assert_eq!(out.extended, vec![(b, 200)]);
        assert_eq!(m.list().unwrap().len(), 1);
        assert!(m.revoke(b).unwrap());
        assert!(!m.revoke(b).unwrap());
    }

    #[test]
    fn unreadable_expiries_are_expired_and_admin_entries_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = LmdbMap::open(&dir.path().join("relay"), "OK", OpenMode::Create).unwrap();
        let bad: [(IpAddr, &[u8]); 2] = [
            (
                "198.51.100.120".parse().unwrap(),
                b"OK expires=9215576668800\0",
            ),
            (
                "198.51.100.121".parse().unwrap(),
                b"OK expires=+10000-01-01T00:00:00Z\0",
            ),
        ];
        let admin: IpAddr = "192.0.2.9".parse().unwrap();
        m.write(|txn, db| {
            for (ip, v) in bad {
                txn.put(db, &key_bytes(ip), &v, WriteFlags::empty())?;
            }
            txn.put(db, &key_bytes(admin), b"OK\0", WriteFlags::empty())
        })
        .unwrap();
        // A login overwrites them.
        let (a, b) = (bad[0].0, bad[1].0);
        assert_eq!(m.upsert(&[(a, 1000)]).unwrap(), vec![(a, 1000)]);
        // Expiry removes them; the administrator's entry without expiry stays.
        assert_eq!(m.expire_all(500).unwrap(), 1);
        assert_eq!(m.get(b).unwrap(), None);
        assert_eq!(m.get(admin).unwrap().as_deref(), Some("OK"));
        // What cannot be read back is never written.
        m.set(b, i64::MAX).unwrap();
        assert_eq!(
            m.get(b).unwrap().as_deref(),
            Some("OK expires=9999-12-31T23:59:59Z")
        );
    }

    #[test]
    fn grows_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = LmdbMap::open(&dir.path().join("relay"), "OK", OpenMode::Create).unwrap();
        // ~200k keys do not fit in the initial 16 MiB.
        for chunk in 0..20u32 {
            let grants: Vec<(IpAddr, i64)> = (0..10_000u32)
                .map(|i| {
                    (
                        IpAddr::from(std::net::Ipv6Addr::from(
                            ((chunk as u128) << 64) | i as u128 | (0x2001_0db8u128 << 96),
                        )),
                        1_000,
                    )
                })
                .collect();
            m.upsert(&grants).unwrap();
        }
        assert_eq!(m.list().unwrap().len(), 200_000);
        assert!(m.map_size > INITIAL_MAP_SIZE);
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv6Addr::from(
            (0x2001_0db8u128 << 96) | i as u128,
        ))
    }

    /// Defect 17: after another writer grew the map, our size is the adopted one, so the
    /// next growth asks for more than the file holds.
    #[test]
    fn map_size_follows_another_writers_growth() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let mut a = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let mut b = LmdbMap::open(&map, "OK", OpenMode::Existing).unwrap();
        assert_eq!(a.map_size(), INITIAL_MAP_SIZE);
        let grants: Vec<(IpAddr, i64)> = (0..150_000).map(|i| (ip(i), 1000)).collect();
        b.upsert(&grants).unwrap();
        assert!(b.map_size() > INITIAL_MAP_SIZE);
        a.upsert(&[(ip(999_999), 1000)]).unwrap();
        assert_eq!(a.map_size(), b.map_size(), "adopted the grown size");
        assert_eq!(a.list().unwrap().len(), 150_001);
    }

    /// Capping a map larger than one batch: every over-long grant is shortened, the others
    /// are reported as they are, absent keys are left out.
    #[test]
    fn cap_covers_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let mut a = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let grants: Vec<(IpAddr, i64)> = (0..2500)
            .map(|i| (ip(i), if i % 2 == 0 { 5000 } else { 1000 }))
            .collect();
        a.upsert(&grants).unwrap();
        let mut asked: Vec<IpAddr> = grants.iter().map(|&(ip, _)| ip).collect();
        asked.push(ip(9_999_999));
        let capped = a.cap(&asked, 2000).unwrap();
        assert_eq!(capped.len(), 2500);
        for (ip, e) in &capped {
            let wrote = grants.iter().find(|g| g.0 == *ip).unwrap().1;
            assert_eq!(*e, wrote.min(2000), "{ip}");
        }
        let mut after = a.snapshot().unwrap();
        after.sort();
        let mut expected = capped.clone();
        expected.sort();
        assert_eq!(after, expected);
    }

    /// Defect 4: another writer's commit is seen by a look at the meta page; our own
    /// commits are not "changes".
    #[test]
    fn changed_tells_other_writers_from_our_commits() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let mut a = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        a.snapshot().unwrap();
        assert_eq!(a.changed().unwrap(), Some(false));
        a.upsert(&[(ip(1), 1000)]).unwrap();
        assert_eq!(a.changed().unwrap(), Some(false), "our own commit");
        let mut b = LmdbMap::open(&map, "OK", OpenMode::Existing).unwrap();
        b.revoke(ip(1)).unwrap();
        assert_eq!(a.changed().unwrap(), Some(true));
        // Our commit after theirs does not hide theirs.
        a.upsert(&[(ip(2), 1000)]).unwrap();
        assert_eq!(a.changed().unwrap(), Some(true));
        assert_eq!(a.snapshot().unwrap(), vec![(ip(2), 1000)]);
        assert_eq!(a.changed().unwrap(), Some(false));
    }

    fn reopened(r: Result<Vec<(IpAddr, i64)>, StoreError>) {
        match r {
            Err(e) => assert_eq!(e.cause(), Cause::Reopened, "{e}"),
            Ok(v) => panic!("not noticed: {v:?}"),
        }
    }

    /// Defects 9 and 15: deleted, replaced or truncated under us, the map is reopened
    /// (never a commit into a dead file, never SIGBUS) and the caller told to rewrite.
    #[test]
    fn deleted_replaced_or_truncated_map_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let file = file_path(&map);
        let mut m = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        m.upsert(&[(ip(1), 1000)]).unwrap();

        std::fs::remove_file(&file).unwrap();
        reopened(m.upsert(&[(ip(2), 1000)]));
        assert!(file.exists(), "recreated");
        m.upsert(&[(ip(2), 1000)]).unwrap();
        assert_eq!(m.snapshot().unwrap(), vec![(ip(2), 1000)]);

        let other = dir.path().join("other");
        LmdbMap::open(&other, "OK", OpenMode::Create)
            .unwrap()
            .upsert(&[(ip(7), 1000)])
            .unwrap();
        std::fs::rename(file_path(&other), &file).unwrap();
        reopened(m.upsert(&[(ip(3), 1000)]));
        m.upsert(&[(ip(3), 1000)]).unwrap();
        let mut keys: Vec<IpAddr> = m.snapshot().unwrap().into_iter().map(|g| g.0).collect();
        keys.sort();
        assert_eq!(keys, vec![ip(3), ip(7)], "wrote into the new file");

        for len in [0, 4096, 8192] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(len)
                .unwrap();
            assert!(matches!(m.changed(), Err(e) if e.cause() == Cause::Reopened));
            m.upsert(&[(ip(4), 1000)]).unwrap();
            assert_eq!(m.snapshot().unwrap(), vec![(ip(4), 1000)]);
        }
    }

    /// The map's descriptors do not leak into children (journalctl).
    #[test]
    fn descriptors_are_close_on_exec() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let _m = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let file = std::fs::canonicalize(file_path(&map)).unwrap();
        let out = std::process::Command::new("ls")
            .args(["-l", "/proc/self/fd/"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("/proc/"), "{text}");
        assert!(
            !text.contains(&file.display().to_string()),
            "map fd leaked into a child:\n{text}"
        );
    }

    /// Disk blocks for the whole map size are reserved (defect 5), the length unchanged.
    #[test]
    fn blocks_are_reserved() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let m = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let meta = std::fs::metadata(m.path()).unwrap();
        assert!(meta.len() < 1 << 20, "length unchanged: {}", meta.len());
        assert!(
            meta.blocks() * 512 >= INITIAL_MAP_SIZE as u64,
            "{} blocks",
            meta.blocks()
        );
    }
}
