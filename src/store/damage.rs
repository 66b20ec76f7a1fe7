//! A damaged map (a foreign writer such as `postmap -i` without our lock, a torn disk
//! write) must never keep the daemon from running: damage found at start or by a failed
//! transaction moves the file aside as `MAP.lmdb.damaged-TIMESTAMP` (ERROR), a new map takes
//! its path (with the grants that could still be read), and the daemon goes on.
//!
//! liblmdb `abort()`s on some inconsistencies (`mdb.c:3155: Assertion 'pglast <=
//! env->me_pglast'` during a write), so at start the check runs in a child process
//! (`dovegate probe-map`, hidden) on a private copy: it walks the B-tree and the free list
//! and commits one trial write. A child killed by the abort, failing or hanging, means a
//! damaged map; the daemon itself never runs into the abort again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use lmdb::{Cursor, Environment, EnvironmentFlags, Transaction, WriteFlags};

use super::lock::FileLock;
use super::value::{parse_expiry, parse_key_with};
use super::StoreError;

/// The hidden subcommand that probes a copy.
pub const PROBE_COMMAND: &str = "probe-map";

/// How long the probe may take (a walk over a large map on a slow disk takes seconds).
const PROBE_LIMIT: Duration = Duration::from_secs(120);

/// LMDB errors that say the file itself is inconsistent.
pub fn is_damage(e: &lmdb::Error) -> bool {
    matches!(
        e,
        lmdb::Error::Corrupted
            | lmdb::Error::PageNotFound
            | lmdb::Error::Invalid
            | lmdb::Error::Panic
            | lmdb::Error::VersionMismatch
    )
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What the probe of the map file found.
#[derive(Debug)]
pub enum Probe {
    Sound,
    /// Why, and the grants (address, expiry) it could still read.
    Damaged(String, Vec<(IpAddr, i64)>),
}

/// At start, before the map is opened for writing: probes `path` (the `.lmdb` file) in a
/// child process and, when it is damaged, moves it aside and puts a new map holding the
/// grants still readable and live at `now` in its place. A missing or empty file is sound.
pub fn check_at_start(path: &Path, action: &str, bits: u8, now: i64) -> Result<(), StoreError> {
    match probe(path, bits)? {
        Probe::Sound => Ok(()),
        Probe::Damaged(why, grants) => {
            let live: Vec<_> = grants.into_iter().filter(|&(_, e)| e > now).collect();
            replace_damaged(path, action, &why, &live, bits, now).map(|_| ())
        }
    }
}

/// Copies the file under a shared lock (a consistent state: no writer follows our lock
/// protocol meanwhile) and probes the copy in a child process. Keys are read as written
/// under `grant.ipv6_prefix` = `bits` (128: whole addresses).
pub fn probe(path: &Path, bits: u8) -> Result<Probe, StoreError> {
    let io = |what: &str, e: &std::io::Error| StoreError::io(path, what, e);
    let src = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::Sound),
        Err(e) => return Err(io("cannot open to check it", &e)),
    };
    if src.metadata().map_err(|e| io("cannot stat", &e))?.len() == 0 {
        return Ok(Probe::Sound);
    }
    let copy = sibling(path, ".dovegate-probe");
    let out = sibling(path, ".dovegate-probe.out");
    let err = sibling(path, ".dovegate-probe.err");
    let result = (|| {
        {
            let mut dst = private_file(&copy).map_err(|e| io("cannot copy to check it", &e))?;
            let _guard = FileLock::shared(&src).map_err(|e| io("cannot lock", &e))?;
            std::io::copy(&mut &src, &mut dst).map_err(|e| io("cannot copy to check it", &e))?;
        }
        let exe =
            std::env::current_exe().map_err(|e| io("cannot find the dovegate program", &e))?;
        let mut child = Command::new(exe)
            .arg(PROBE_COMMAND)
            .arg(&copy)
            .env("DOVEGATE_LOG", "off")
            .stdin(Stdio::null())
            .stdout(private_file(&out).map_err(|e| io("cannot check", &e))?)
            .stderr(private_file(&err).map_err(|e| io("cannot check", &e))?)
            .spawn()
            .map_err(|e| io("cannot start the map check", &e))?;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| io("map check", &e))? {
                break Some(st);
            }
            if start.elapsed() > PROBE_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let said = std::fs::read_to_string(&err).unwrap_or_default();
        let said = said
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let why = match status {
            Some(st) if st.success() => return Ok(Probe::Sound),
            None => format!("checking it took over {}s", PROBE_LIMIT.as_secs()),
            Some(st) => match std::os::unix::process::ExitStatusExt::signal(&st) {
                Some(sig) => format!("liblmdb stopped with signal {sig} on it: {said}"),
                None => said.to_string(),
            },
        };
        Ok(Probe::Damaged(why, read_entries(&out, bits)))
    })();
    for p in [&copy, &out, &err] {
        let _ = std::fs::remove_file(p);
    }
    result
}

fn private_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The probe's output: `HEXKEY HEXVALUE` lines; grants only (prefix keys included: a
/// prefix grant lost here would end an IPv6 network's relay at a rebuild).
fn read_entries(out: &Path, bits: u8) -> Vec<(IpAddr, i64)> {
    let Ok(f) = File::open(out) else {
        return Vec::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            let (k, v) = (unhex(k)?, unhex(v)?);
            Some((parse_key_with(&k, bits)?, parse_expiry(&v)?))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The child: walks the copy at `copy` and commits a trial write into it. Prints every
/// entry read (before the trial write, which may abort). Exit 0: sound; 1: damaged (the
/// reason on stderr).
pub fn probe_child(copy: &Path) -> ExitCode {
    match walk_and_write(copy) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
    }
}

fn walk_and_write(copy: &Path) -> Result<(), String> {
    let len = std::fs::metadata(copy).map_err(|e| e.to_string())?.len();
    let size = usize::try_from(len)
        .unwrap_or(1 << 40)
        .next_power_of_two()
        .max(16 << 20);
    let env = Environment::new()
        .set_flags(EnvironmentFlags::NO_SUB_DIR | EnvironmentFlags::NO_LOCK)
        .set_map_size(size)
        .open(copy)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let db = env
        .open_db(None)
        .map_err(|e| format!("cannot open its main database: {e}"))?;
    let info = env.info().map_err(|e| e.to_string())?;
    {
        let txn = env
            .begin_ro_txn()
            .map_err(|e| format!("cannot read it: {e}"))?;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut count = 0usize;
        let mut cursor = txn.open_ro_cursor(db).map_err(|e| e.to_string())?;
        for item in cursor.iter_start() {
            let (k, v) = item.map_err(|e| format!("walking its entries: {e}"))?;
            let _ = writeln!(out, "{} {}", hex(k), hex(v));
            count += 1;
        }
        drop(cursor);
        let _ = out.flush();
        let stat = db_stat(&txn, db).map_err(|e| format!("cannot stat it: {e}"))?;
        if stat != count {
            return Err(format!(
                "its B-tree says {stat} entries but {count} were found"
            ));
        }
        free_list_sound(&txn, info.last_pgno(), info.last_txnid())?;
    }
    // The write path (page allocation, free-list save) is where liblmdb aborts.
    let mut txn = env
        .begin_rw_txn()
        .map_err(|e| format!("cannot begin a write: {e}"))?;
    let key = b"\0dovegate-probe";
    txn.put(db, key, b"x", WriteFlags::empty())
        .and_then(|()| txn.del(db, key, None))
        .map_err(|e| format!("a trial write failed: {e}"))?;
    txn.commit()
        .map_err(|e| format!("a trial commit failed: {e}"))?;
    Ok(())
}

fn db_stat(txn: &lmdb::RoTransaction<'_>, db: lmdb::Database) -> Result<usize, lmdb::Error> {
    // SAFETY: a live read transaction and an open database; `st` is written by the call.
    let mut st: lmdb_sys::MDB_stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { lmdb_sys::mdb_stat(txn.txn(), db.dbi(), &mut st) };
    if rc != 0 {
        return Err(lmdb::Error::from_err_code(rc));
    }
    Ok(st.ms_entries)
}

/// The free list (LMDB's database 0): keys are transaction ids no later than the last,
/// values `count, page...` with every page inside the file.
fn free_list_sound(
    txn: &lmdb::RoTransaction<'_>,
    last_pgno: usize,
    last_txnid: usize,
) -> Result<(), String> {
    let mut cur: *mut lmdb_sys::MDB_cursor = std::ptr::null_mut();
    // SAFETY: a live read transaction; dbi 0 is the free list, readable in a read txn.
    let rc = unsafe { lmdb_sys::mdb_cursor_open(txn.txn(), 0, &mut cur) };
    if rc != 0 {
        return Err(format!(
            "cannot open its free list: {}",
            lmdb::Error::from_err_code(rc)
        ));
    }
    let mut result = Ok(());
    loop {
        let mut key = lmdb_sys::MDB_val {
            mv_size: 0,
            mv_data: std::ptr::null_mut(),
        };
        let mut val = lmdb_sys::MDB_val {
            mv_size: 0,
            mv_data: std::ptr::null_mut(),
        };
        // SAFETY: an open cursor; LMDB points key and val into the map for the txn's life.
        let rc = unsafe { lmdb_sys::mdb_cursor_get(cur, &mut key, &mut val, lmdb_sys::MDB_NEXT) };
        if rc == lmdb_sys::MDB_NOTFOUND {
            break;
        }
        if rc != 0 {
            result = Err(format!(
                "walking its free list: {}",
                lmdb::Error::from_err_code(rc)
            ));
            break;
        }
        // SAFETY: LMDB returned these ranges inside the mapped file.
        let (k, v) = unsafe {
            (
                std::slice::from_raw_parts(key.mv_data as *const u8, key.mv_size),
                std::slice::from_raw_parts(val.mv_data as *const u8, val.mv_size),
            )
        };
        if let Err(why) = free_entry_sound(k, v, last_pgno, last_txnid) {
            result = Err(why);
            break;
        }
    }
    // SAFETY: the cursor opened above, closed once.
    unsafe { lmdb_sys::mdb_cursor_close(cur) };
    result
}

fn free_entry_sound(k: &[u8], v: &[u8], last_pgno: usize, last_txnid: usize) -> Result<(), String> {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| usize::from_ne_bytes(b.try_into().unwrap_or([0xff; W]));
    if k.len() != W || word(k) > last_txnid {
        return Err("its free list names a transaction after the last one".into());
    }
    if v.len() < W || v.len() % W != 0 || word(&v[..W]) != v.len() / W - 1 {
        return Err("its free list holds a malformed page list".into());
    }
    if v[W..].chunks(W).any(|p| word(p) > last_pgno) {
        return Err("its free list names a page past the end of the file".into());
    }
    Ok(())
}

/// Moves the damaged file at `path` aside (`PATH.damaged-TIMESTAMP`, the same inode, so
/// nothing is lost for inspection) and renames a new map holding `grants` into its place:
/// a file is at `path` at every moment (Postfix answers 451 while it is missing). Logs the
/// ERROR; returns the aside path.
pub fn replace_damaged(
    path: &Path,
    action: &str,
    why: &str,
    grants: &[(IpAddr, i64)],
    bits: u8,
    now: i64,
) -> Result<PathBuf, StoreError> {
    let io = |what: &str, e: &std::io::Error| StoreError::io(path, what, e);
    let stamp = chrono::DateTime::<chrono::Utc>::from_timestamp(now, 0)
        .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| now.to_string());
    let mut aside = sibling(path, &format!(".damaged-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = sibling(path, &format!(".damaged-{stamp}-{n}"));
    }
    let fresh = sibling(path, ".dovegate-new");
    let _ = std::fs::remove_file(&fresh);
    write_fresh(&fresh, action, grants, bits)?;
    if let Ok(old) = std::fs::metadata(path) {
        // The new map keeps the old one's owner, group and mode (who may read it).
        let _ = std::os::unix::fs::chown(&fresh, Some(old.uid()), Some(old.gid()));
        let _ =
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(old.mode() & 0o7777));
        std::fs::hard_link(path, &aside)
            .map_err(|e| io("cannot move the damaged map aside", &e))?;
    }
    std::fs::rename(&fresh, path).map_err(|e| io("cannot put a new map in place", &e))?;
    if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    tracing::error!(
        map = %path.display(),
        damaged = %aside.display(),
        grants = grants.len(),
        "the map is damaged ({why}); moved it aside to {} and put a new map in its place with the {} live grants that could still be read. Only `dovegate grant` and `dovegate revoke` may write the live map (`postmap -i` or any other writer on it damages it); inspect or remove {} when done",
        aside.display(),
        grants.len(),
        aside.display()
    );
    Ok(aside)
}

/// A new map file at `fresh` holding `grants`.
fn write_fresh(
    fresh: &Path,
    action: &str,
    grants: &[(IpAddr, i64)],
    bits: u8,
) -> Result<(), StoreError> {
    let lmdb = |what: &str, e: lmdb::Error| StoreError::lmdb(fresh, what, e);
    let env = Environment::new()
        .set_flags(EnvironmentFlags::NO_SUB_DIR | EnvironmentFlags::NO_LOCK)
        .set_map_size((16usize << 20).max((grants.len() * 256).next_power_of_two()))
        .open_with_permissions(fresh, 0o600)
        .map_err(|e| lmdb("cannot create", e))?;
    let db = env.open_db(None).map_err(|e| lmdb("cannot open", e))?;
    let mut txn = env.begin_rw_txn().map_err(|e| lmdb("cannot begin", e))?;
    for &(ip, e) in grants {
        txn.put(
            db,
            &super::value::key_bytes_with(ip, bits),
            &super::value::value_bytes(action, e),
            WriteFlags::empty(),
        )
        .map_err(|e| lmdb("cannot write", e))?;
    }
    txn.commit().map_err(|e| lmdb("cannot commit", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_entries() {
        let w = |x: usize| x.to_ne_bytes().to_vec();
        let list = |pages: &[usize]| {
            let mut v = w(pages.len());
            pages.iter().for_each(|&p| v.extend(w(p)));
            v
        };
        assert!(free_entry_sound(&w(3), &list(&[4, 5]), 10, 5).is_ok());
        assert!(free_entry_sound(&w(6), &list(&[4]), 10, 5).is_err());
        assert!(free_entry_sound(&w(3), &list(&[11]), 10, 5).is_err());
        let mut bad = list(&[4, 5]);
        bad[0] = 9;
        assert!(free_entry_sound(&w(3), &bad, 10, 5).is_err());
        assert!(free_entry_sound(&w(3), &[1, 2, 3], 10, 5).is_err());
    }

    /// Only a sound copy in-process: reading garbage pages can SIGBUS, which is why the
    /// daemon probes in a child (tests/map_damage.rs covers damaged files).
    #[test]
    fn sound_copy() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("m.lmdb");
        let grants: Vec<(IpAddr, i64)> = (1..=200)
            .map(|i| (format!("192.0.2.{i}").parse().unwrap(), 2_000_000_000 + i))
            .collect();
        write_fresh(&f, "OK", &grants, 128).unwrap();
        assert_eq!(walk_and_write(&f), Ok(()));
    }

    /// Grants kept under an IPv6 prefix (`grant.ipv6_prefix = 64`) survive a rebuild: read
    /// back from the probe's output and written under the same keys.
    #[test]
    fn prefix_grants_survive_a_rebuild() {
        let d = tempfile::tempdir().unwrap();
        let ip: IpAddr = "2001:db8:1:2::".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let out = d.path().join("out");
        let line = |ip: IpAddr, e: i64| {
            format!(
                "{} {}\n",
                hex(&super::super::value::key_bytes_with(ip, 64)),
                hex(&super::super::value::value_bytes("OK", e))
            )
        };
        std::fs::write(&out, line(ip, 2_000_000_000) + &line(v4, 2_000_000_001)).unwrap();
        let read = read_entries(&out, 64);
        assert_eq!(read, vec![(ip, 2_000_000_000), (v4, 2_000_000_001)]);
        assert!(
            read_entries(&out, 128).len() == 1,
            "whole-address keys only at 128"
        );
        let f = d.path().join("m.lmdb");
        write_fresh(&f, "OK", &read, 64).unwrap();
        let env = Environment::new()
            .set_flags(EnvironmentFlags::NO_SUB_DIR | EnvironmentFlags::NO_LOCK)
            .open(&f)
            .unwrap();
        let db = env.open_db(None).unwrap();
        let txn = env.begin_ro_txn().unwrap();
        let keys: Vec<String> = txn
            .open_ro_cursor(db)
            .unwrap()
            .iter_start()
            .map(|kv| String::from_utf8_lossy(kv.unwrap().0).into_owned())
            .collect();
        assert_eq!(keys, ["192.0.2.7\0", "2001:db8:1:2\0"]);
    }
}
