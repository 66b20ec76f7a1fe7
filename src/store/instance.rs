//! One daemon per map and per state directory.
//!
//! A second `dovegate run` on the same map would fight the first over expiries and take
//! over its socketmap socket; on the same state directory it would move the first one's
//! checkpoints. Each running daemon holds an exclusive fcntl OFD lock on two small files:
//! `<map>.dovegate-lock` next to the map and `dovegate.lock` in the state directory. The
//! kernel drops the locks when the process dies, so a stale file never blocks a start.
//! (Not on the `.lmdb` file itself: Postfix takes whole-file read locks there for every
//! lookup. Never flock: the project uses fcntl OFD locks only.)
//!
//! The lock files are mode 0600: no other user can open them to hold a lock. A file left
//! open by another process (a 0644 file of an older version) is not trusted to mean "a
//! daemon runs": only a running dovegate whose pid the file names counts; any other holder
//! gets the file replaced under it (a new inode that it does not hold), and `status` never
//! names a pid that is not a running dovegate.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Cause, StoreError};
use crate::ofd::{self, Kind};

/// The lock file tied to a map (`lmdb:PATH` gives `PATH.dovegate-lock`).
pub fn map_lock_path(map: &Path) -> PathBuf {
    let mut s = map.as_os_str().to_owned();
    s.push(".dovegate-lock");
    PathBuf::from(s)
}

/// The lock file in a state directory.
pub fn state_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("dovegate.lock")
}

/// Held while the daemon runs; dropping it (or exiting) releases both locks.
#[derive(Debug)]
pub struct InstanceLock {
    _files: Vec<File>,
}

/// Takes the exclusive lock without waiting; false when someone else holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    match ofd::set(file, Kind::Exclusive, false) {
        Ok(()) => Ok(true),
        Err(e) if ofd::busy(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl InstanceLock {
    /// Locks the map's and the state directory's lock files, or says who holds them.
    pub fn acquire(map: &Path, state_dir: &Path) -> Result<InstanceLock, StoreError> {
        InstanceLock::take(&[
            (map_lock_path(map), "map"),
            (state_lock_path(state_dir), "state directory"),
        ])
    }

    /// The map's lock only: a replica owns its map (no daemon may write it), but shares
    /// the state directory with a writer on a host that runs both (`fleet.json` and
    /// `replica.json` side by side). `status` finds the replica's pid by it.
    pub fn acquire_map(map: &Path) -> Result<InstanceLock, StoreError> {
        InstanceLock::take(&[(map_lock_path(map), "map")])
    }

    fn take(locks: &[(PathBuf, &str)]) -> Result<InstanceLock, StoreError> {
        let mut files = Vec::new();
        for (path, what) in locks {
            let io =
                |e: &io::Error| StoreError::io(path, "cannot take the single-instance lock", e);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
            }
            let mut file = open_lock_file(path).map_err(|e| io(&e))?;
            if !try_lock(&file).map_err(|e| io(&e))? {
                // A starting dovegate writes its pid right after taking the lock.
                let mut pid = read_pid(&mut file);
                if pid.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    pid = read_pid(&mut file);
                }
                if let Some(pid) = pid.filter(|&p| is_dovegate(p)) {
                    return Err(StoreError::new(
                        format!(
                            "another dovegate (pid {pid}) already runs on this {what}: {} is locked; stop it first, or give this one its own map.path and state.dir",
                            path.display()
                        ),
                        Cause::Other,
                    ));
                }
                tracing::warn!(
                    file = %path.display(),
                    "the single-instance lock is held by a process that is not a running dovegate (another user's lock on an old world-readable lock file?); replacing the file with a new one (mode 0600)"
                );
                file = replace_lock_file(path).map_err(|e| io(&e))?;
                if !try_lock(&file).map_err(|e| io(&e))? {
                    return Err(StoreError::new(
                        format!(
                            "{}: the new single-instance lock file was locked at once by another process; check who opens it (lsof)",
                            path.display()
                        ),
                        Cause::Other,
                    ));
                }
            }
            file.set_len(0).map_err(|e| io(&e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| io(&e))?;
            files.push(file);
        }
        Ok(InstanceLock { _files: files })
    }
}

/// Opens (creating) a lock file, mode 0600 whatever its mode was.
fn open_lock_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A new lock file renamed over `path`: whoever holds the old one holds nothing we use.
fn replace_lock_file(path: &Path) -> io::Result<File> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let file = open_lock_file(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
}

/// Whether `pid` is a running dovegate process (its command name; /proc/PID/exe is not
/// readable for other users' processes).
fn is_dovegate(pid: u32) -> bool {
    pid == std::process::id()
        || std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("dovegate"))
}

/// Whether a daemon holds the map: Some(pid if known) or None.
pub fn map_holder(map: &Path) -> io::Result<Option<Option<u32>>> {
    holder(&map_lock_path(map))
}

fn holder(path: &Path) -> io::Result<Option<Option<u32>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if ofd::holder(&file)?.is_none() {
        return Ok(None);
    }
    // Never name a pid that is not a running dovegate (a stale file, a foreign holder).
    Ok(Some(read_pid(&mut file).filter(|&p| is_dovegate(p))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_instance_is_refused_until_the_first_stops() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("m/relay");
        let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
        assert_eq!(map_holder(&map).unwrap(), None);
        let first = InstanceLock::acquire(&map, &s1).unwrap();
        assert_eq!(map_holder(&map).unwrap(), Some(Some(std::process::id())));
        // Same map, other state directory; other map, same state directory.
        let e = InstanceLock::acquire(&map, &s2).unwrap_err();
        assert!(e.0.contains("already runs on this map"), "{e}");
        assert!(e.0.contains(&format!("pid {}", std::process::id())), "{e}");
        let e = InstanceLock::acquire(&dir.path().join("other"), &s1).unwrap_err();
        assert!(e.0.contains("state directory"), "{e}");
        drop(first);
        assert_eq!(map_holder(&map).unwrap(), None);
        let _again = InstanceLock::acquire(&map, &s2).unwrap();
    }

    /// Issue 20 item 4: the lock files are 0600; a holder that is not a running dovegate
    /// (here: a lock file naming a pid that does not run) is never named by `status`.
    #[test]
    fn lock_files_are_private_and_a_dead_pid_is_never_named() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("relay");
        let state = dir.path().join("state");
        let lock = InstanceLock::acquire(&map, &state).unwrap();
        for p in [map_lock_path(&map), state_lock_path(&state)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        drop(lock);
        // Held by a process that wrote a pid that is not running (pid_max is below this).
        let path = map_lock_path(&map);
        std::fs::write(&path, "4194999\n").unwrap();
        let held = File::open(&path).unwrap();
        ofd::set(&held, Kind::Shared, false).unwrap();
        assert_eq!(map_holder(&map).unwrap(), Some(None));
        drop(held);
    }
}
