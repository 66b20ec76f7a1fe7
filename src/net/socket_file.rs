//! The unix socket file: claimed only when nobody serves it, removed only while it is ours.
//!
//! A socket file left by a crashed run must be removed before `bind`, but the file of a
//! live server looks just the same: unlinking it would leave that server listening on a
//! name nobody can reach, and every MTA lookup (or pushed login) would fail. So a socket
//! file is removed only when connecting to it is refused (nobody listens), and at shutdown
//! only when the path still names the socket this process bound (same device and inode;
//! the inode is held open meanwhile, so its number cannot pass to another file).
//! Two instances starting at once could both find the file stale; a lock on `PATH.lock`,
//! held while serving, makes the check and the bind one step.
//!
//! The directory must be one only root or the daemon's user can write to: anyone else
//! could replace the socket (with a symlink say) between bind and chmod, or under the
//! daemon afterwards.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::stat::{fchmodat, FchmodatFlags, Mode};
use tokio::net::{UnixListener, UnixStream};

/// How long a connection attempt to an existing socket may take before its server is
/// taken to be alive but busy (a full backlog).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What to claim and how to name it in messages.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub path: &'a Path,
    /// The socket's mode: who may connect.
    pub mode: u32,
    /// The server, for log lines ("socketmap", "push").
    pub name: &'static str,
    /// The configuration key of the path, for what to do ("serve.socketmap").
    pub key: &'static str,
}

/// The socket file this process bound, by identity; removed (if still ours) on drop.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    name: &'static str,
    /// The socket's inode, held open (O_PATH) so that its number cannot be handed to
    /// another file while we live (tmpfs reuses freed inode numbers at once).
    inode: std::fs::File,
    /// Holds an exclusive fcntl OFD lock on `PATH.lock` while this server lives.
    _lock: std::fs::File,
}

fn another_instance(c: &Claim) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "another dovegate is serving {}; stop it first (or choose another {} path)",
            c.path.display(),
            c.key
        ),
    )
}

/// Takes the lock on `PATH.lock` without waiting. The lock file is never removed: removing
/// it would let two processes hold "the" lock on two different files.
fn lock(c: &Claim) -> io::Result<std::fs::File> {
    let mut name = c.path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .custom_flags(libc::O_NOFOLLOW)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", Path::new(&name).display())))?;
    // An fcntl OFD lock, like every lock of the project (flock and fcntl locks do not see
    // each other); it lives as long as `file`'s open file description. Start 0, length 0:
    // the whole file.
    let whole = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match fcntl(&file, FcntlArg::F_OFD_SETLK(&whole)) {
        Ok(_) => Ok(file),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Err(another_instance(c)),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: cannot lock: {e}", Path::new(&name).display()),
        )),
    }
}

/// Whether something accepts connections on the socket at `path`: Ok(false) only when the
/// kernel refuses the connection (a stale file).
async fn accepting(path: &Path) -> io::Result<bool> {
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) => Ok(true),
        // Refused: nobody listens. Not found: removed since we looked.
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        // A full backlog: alive, only busy.
        Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(_) => Ok(true),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!(
                "{}: cannot tell whether another process serves this socket: {e}",
                path.display()
            ),
        )),
    }
}

/// Creates the socket's directory if missing and refuses one that another user could
/// write to: its owner must be root or the daemon's user and it must not be group- or
/// world-writable unless sticky (like /tmp).
pub fn prepare_dir(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::metadata(dir)?;
    let euid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let problem = if meta.uid() != 0 && meta.uid() != euid {
        Some(format!("is owned by uid {}", meta.uid()))
    } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        Some(format!(
            "is writable by other users (mode {mode:04o}) without the sticky bit"
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(io::Error::other(format!(
            "the directory {} {p}: another user could replace the socket; use a directory only root or the daemon's user can write to (e.g. /run/dovegate, mode 0755)",
            dir.display()
        ))),
    }
}

/// Sets a freshly bound socket's mode without following a symlink at its path (glibc does
/// it through an O_PATH descriptor). fchmod on the listener would not do: on Linux it
/// changes the socket's own inode, not the file bind created.
pub fn chmod_socket(path: &Path, mode: u32) -> io::Result<()> {
    fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        Mode::from_bits_truncate(mode as libc::mode_t),
        FchmodatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Binds a listener at the claimed path, removing a stale socket file first; refuses when
/// another server accepts connections there or the path is not a socket.
pub async fn bind(c: Claim<'_>) -> io::Result<(UnixListener, SocketFile)> {
    let path = c.path;
    prepare_dir(path)?;
    let lock = lock(&c)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it or choose another {} path",
                    path.display(),
                    c.key
                ),
            ))
        }
        Ok(_) => {
            if accepting(path).await? {
                return Err(another_instance(&c));
            }
            tracing::info!(socket = %path.display(), "removing a stale {} socket (nobody accepts on it)", c.name);
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    // A process that does not take the lock may have bound the path meanwhile.
    let listener = UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            another_instance(&c)
        } else {
            e
        }
    })?;
    let inode = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        name: c.name,
        inode,
        _lock: lock,
    };
    // From here on, an error drops `file`: the socket just bound is removed.
    chmod_socket(path, c.mode)?;
    Ok((listener, file))
}

impl SocketFile {
    /// Removes the socket file if the path still names the socket this process bound.
    fn remove_if_ours(&self) {
        let Ok(ours) = self.inode.metadata() else {
            return;
        };
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (ours.dev(), ours.ino()) => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), "cannot remove the {} socket: {e}", self.name);
                }
            }
            Ok(_) => tracing::info!(
                socket = %self.path.display(),
                "the {} socket was replaced by another process; leaving it",
                self.name
            ),
            Err(_) => {}
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove_if_ours();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_dirs_others_can_write_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let sock = dir.join("push");
        prepare_dir(&sock).unwrap();
        assert!(dir.is_dir());
        let set = |m: u32| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m));
        for bad in [0o777, 0o775, 0o757] {
            set(bad).unwrap();
            let e = prepare_dir(&sock).unwrap_err().to_string();
            assert!(
                e.contains(&dir.display().to_string()) && e.contains("sticky"),
                "{e}"
            );
        }
        for good in [0o1777, 0o755, 0o700] {
            set(good).unwrap();
            prepare_dir(&sock).unwrap();
        }
    }

    #[test]
    fn socket_mode_is_set_on_the_socket_never_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        chmod_socket(&sock, 0o666).unwrap();
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o666
        );
        let target = tmp.path().join("target");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(chmod_socket(&link, 0o666).is_err());
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
