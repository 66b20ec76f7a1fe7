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

use super::lock::FileLock;
use super::value::{key_bytes, parse_expiry, parse_key, value_bytes, value_text};
use super::{ExpireOutcome, GrantStore, StoreError, StoredGrant};

const INITIAL_MAP_SIZE: usize = 16 << 20;
const MAX_MAP_SIZE: usize = 1 << 40;

/// An open map. Writes are serialised by `&mut self`; keep one per process.
pub struct LmdbMap {
    path: PathBuf,
    env: Environment,
    db: Database,
    lock_file: File,
    action: String,
    map_size: usize,
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

impl LmdbMap {
    /// Opens the map, creating it (empty, mode 0644) when `create` and it is missing.
    pub fn open(map: &Path, action: &str, mode: OpenMode) -> Result<LmdbMap, StoreError> {
        let create = mode == OpenMode::Create;
        let writable = mode != OpenMode::ReadOnly;
        let path = file_path(map);
        let err = |what: &str, e: &dyn std::fmt::Display| {
            StoreError(format!("{}: {what}: {e}", path.display()))
        };
        let existed = path.exists();
        if !existed && !create {
            return Err(StoreError(format!("{}: no such map", path.display())));
        }
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| err("cannot create directory", &e))?;
            }
        }
        let lock_file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(create)
            .mode(0o644)
            .open(&path)
            .map_err(|e| err("cannot open", &e))?;
        if !existed {
            // Umask must not hide the map from Postfix, which opens it as root before chroot
            // but may run lookups as another user.
            lock_file
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| err("cannot chmod", &e))?;
        }
        let file_len = lock_file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let map_size = file_len.next_power_of_two().max(INITIAL_MAP_SIZE);
        // Opening a new, empty file writes LMDB's meta pages: do it under the write lock so
        // no Postfix reader sees a half-initialised file.
        let guard = if writable {
            FileLock::exclusive(&lock_file)
        } else {
            FileLock::shared(&lock_file)
        }
        .map_err(|e| err("cannot lock", &e))?;
        let mut flags = EnvironmentFlags::NO_SUB_DIR | EnvironmentFlags::NO_LOCK;
        if !writable {
            flags |= EnvironmentFlags::READ_ONLY;
        }
        let env = Environment::new()
            .set_flags(flags)
            .set_map_size(map_size)
            .open_with_permissions(&path, 0o644)
            .map_err(|e| err("cannot open LMDB environment", &e))?;
        let db = env
            .open_db(None)
            .map_err(|e| err("cannot open main database", &e))?;
        if !existed {
            let txn = env.begin_rw_txn().map_err(|e| err("cannot begin", &e))?;
            txn.commit().map_err(|e| err("cannot commit", &e))?;
        }
        drop(guard);
        Ok(LmdbMap {
            path,
            env,
            db,
            lock_file,
            action: action.to_string(),
            map_size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError(format!("{}: {what}: {e}", self.path.display()))
    }

    /// Runs `work` in one write transaction under the exclusive lock, growing the map and
    /// retrying when it is full.
    fn write<T>(
        &mut self,
        mut work: impl FnMut(&mut lmdb::RwTransaction<'_>, Database) -> Result<T, lmdb::Error>,
    ) -> Result<T, StoreError> {
        loop {
            let guard =
                FileLock::exclusive(&self.lock_file).map_err(|e| self.err("cannot lock", e))?;
            let txn = match self.env.begin_rw_txn() {
                Err(lmdb::Error::MapResized) => {
                    // Another writer grew the file: adopt its size and retry.
                    self.env
                        .set_map_size(0)
                        .map_err(|e| self.err("cannot adopt new map size", e))?;
                    drop(guard);
                    continue;
                }
                other => other.map_err(|e| self.err("cannot begin transaction", e))?,
            };
            let mut txn = txn;
            let result = work(&mut txn, self.db).and_then(|v| txn.commit().map(|()| v));
            drop(guard);
            match result {
                Ok(v) => return Ok(v),
                Err(lmdb::Error::MapFull) if self.map_size < MAX_MAP_SIZE => {
                    self.map_size *= 2;
                    self.env
                        .set_map_size(self.map_size)
                        .map_err(|e| self.err("cannot grow map", e))?;
                    tracing::info!(map = %self.path.display(), size = self.map_size, "map grown");
                }
                Err(e) => return Err(self.err("write failed", e)),
            }
        }
    }

    /// Runs `work` in a read transaction under the shared lock.
    fn read<T>(
        &mut self,
        work: impl FnOnce(&lmdb::RoTransaction<'_>, Database) -> Result<T, lmdb::Error>,
    ) -> Result<T, StoreError> {
        let _guard = FileLock::shared(&self.lock_file).map_err(|e| self.err("cannot lock", e))?;
        let txn = match self.env.begin_ro_txn() {
            Err(lmdb::Error::MapResized) => {
                self.env
                    .set_map_size(0)
                    .map_err(|e| self.err("cannot adopt new map size", e))?;
                self.env.begin_ro_txn()
            }
            other => other,
        }
        .map_err(|e| self.err("cannot begin read", e))?;
        let v = work(&txn, self.db).map_err(|e| self.err("read failed", e))?;
        txn.commit().map_err(|e| self.err("cannot end read", e))?;
        Ok(v)
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

impl GrantStore for LmdbMap {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let action = self.action.clone();
        self.write(|txn, db| {
            let mut out = Vec::with_capacity(grants.len());
            for &(ip, expires) in grants {
                let key = key_bytes(ip);
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
        self.write(|txn, db| {
            let mut out = ExpireOutcome::default();
            for &ip in ips {
                let key = key_bytes(ip);
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

    fn list(&mut self) -> Result<Vec<StoredGrant>, StoreError> {
        self.read(|txn, db| {
            let mut cursor = txn.open_ro_cursor(db)?;
            let mut out = Vec::new();
            for item in cursor.iter_start() {
                let (k, v) = item?;
                if let Some(ip) = parse_key(k) {
                    out.push(StoredGrant {
                        ip,
                        expires: parse_expiry(v),
                        value: value_text(v),
                    });
                }
            }
            Ok(out)
        })
    }

    fn get(&mut self, ip: IpAddr) -> Result<Option<String>, StoreError> {
        self.read(|txn, db| Ok(get_opt(txn, db, &key_bytes(ip))?.map(value_text)))
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        self.write(|txn, db| match txn.del(db, &key_bytes(ip), None) {
            Ok(()) => Ok(true),
            Err(lmdb::Error::NotFound) => Ok(false),
            Err(e) => Err(e),
        })
    }

    fn set(&mut self, ip: IpAddr, expires: i64) -> Result<(), StoreError> {
        let value = value_bytes(&self.action, expires);
        self.write(|txn, db| txn.put(db, &key_bytes(ip), &value, WriteFlags::empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_upsert_expire() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("sub/relay");
        let mut m = LmdbMap::open(&map, "OK", OpenMode::Create).unwrap();
        let meta = std::fs::metadata(file_path(&map)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
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
