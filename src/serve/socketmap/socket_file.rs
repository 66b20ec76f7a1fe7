//! The unix socket file: claimed only when nobody serves it, removed only while it is ours.
//!
//! A socket file left by a crashed run must be removed before `bind`, but the file of a
//! live server looks just the same: unlinking it would leave that server listening on a
//! name nobody can reach, and every MTA lookup would fail (451). So a socket file is
//! removed only when connecting to it is refused (nobody listens), and at shutdown only
//! when the path still names the socket this process bound (same device and inode; the
//! inode is held open meanwhile, so its number cannot pass to another file).
//! Two instances starting at once could both find the file stale; a lock on `PATH.lock`,
//! held while serving, makes the check and the bind one step.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

/// How long a connection attempt to an existing socket may take before its server is
/// taken to be alive but busy (a full backlog).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket file this process bound, by identity.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// The socket's inode, held open (O_PATH) so that its number cannot be handed to
    /// another file while we live (tmpfs reuses freed inode numbers at once).
    inode: std::fs::File,
    /// Holds an exclusive fcntl OFD lock on `PATH.lock` while this server lives.
    _lock: std::fs::File,
}

fn another_instance(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "another dovegate is serving {}; stop it first (or choose another serve.socketmap path)",
            path.display()
        ),
    )
}

/// Takes the lock on `PATH.lock` without waiting. The lock file is never removed: removing
/// it would let two processes hold "the" lock on two different files.
fn lock(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .custom_flags(libc::O_NOFOLLOW)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", Path::new(&name).display())))?;
    // An fcntl OFD lock, like every lock of the project (flock and fcntl locks do not see
    // each other); it lives as long as `file`'s open file description.
    // SAFETY: plain data; zeroed is the "whole file" range (start 0, len 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a descriptor we own and an initialised lock description.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        let e = io::Error::last_os_error();
        return Err(
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                another_instance(path)
            } else {
                io::Error::new(
                    e.kind(),
                    format!("{}: cannot lock: {e}", Path::new(&name).display()),
                )
            },
        );
    }
    Ok(file)
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

/// Binds a listener at `path` (mode 0666), removing a stale socket file first; refuses
/// when another server accepts connections there or the path is not a socket.
pub async fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock = lock(path)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                "{} exists and is not a socket; remove it or choose another serve.socketmap path",
                path.display()
            ),
            ))
        }
        Ok(_) => {
            if accepting(path).await? {
                return Err(another_instance(path));
            }
            tracing::info!(socket = %path.display(), "removing a stale socketmap socket (nobody accepts on it)");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    // A process that does not take the lock may have bound the path meanwhile.
    let listener = UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            another_instance(path)
        } else {
            e
        }
    })?;
    // smtpd and sendmail query as their own users; lookups reveal only grants.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let inode = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        inode,
        _lock: lock,
    };
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
                    tracing::warn!(socket = %self.path.display(), "cannot remove the socketmap socket: {e}");
                }
            }
            Ok(_) => tracing::info!(
                socket = %self.path.display(),
                "the socketmap socket was replaced by another process; leaving it"
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
