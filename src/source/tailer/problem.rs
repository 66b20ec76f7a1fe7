//! Opening a followed path safely, and saying in words what is wrong with it.
//!
//! A log path can name something that must never be opened blindly: a FIFO blocks open(2)
//! until a writer appears (the source thread would hang forever), a directory or
//! `/dev/zero` reads garbage or nothing in a busy loop. So the type is checked first, and
//! the open itself is non-blocking. When the daemon cannot read the file, the reason is a
//! `PathProblem` whose `Display` tells the administrator what to do (issue 9: no silent
//! no-op; Dovecot recreates its own `log_path` 0600 root after `doveadm log reopen`).

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::state::FileId;

/// Why a followed path cannot be read right now. Typed so that the caller can warn at a
/// bounded rate while it lasts and say when it clears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProblem {
    /// Nothing at the path (not created yet, or between a rotation's rename and create).
    Missing { path: PathBuf },
    /// The file exists but this process may not open it (`owner` is `u32::MAX` when even
    /// its metadata cannot be read: a directory on the way is not searchable).
    Unreadable {
        path: PathBuf,
        uid: u32,
        owner: u32,
        group: u32,
        mode: u32,
    },
    /// A directory, FIFO, socket or device: never followed.
    NotRegular { path: PathBuf, kind: &'static str },
    /// Any other I/O error.
    Io { path: PathBuf, message: String },
}

impl PathProblem {
    /// The `io::ErrorKind` that best matches, for callers that only see an `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            PathProblem::Missing { .. } => io::ErrorKind::NotFound,
            PathProblem::Unreadable { .. } => io::ErrorKind::PermissionDenied,
            PathProblem::NotRegular { .. } => io::ErrorKind::InvalidInput,
            PathProblem::Io { .. } => io::ErrorKind::Other,
        }
    }

    /// The path at fault.
    pub fn path(&self) -> &Path {
        match self {
            PathProblem::Missing { path }
            | PathProblem::Unreadable { path, .. }
            | PathProblem::NotRegular { path, .. }
            | PathProblem::Io { path, .. } => path,
        }
    }

    /// Classifies an error met while looking at or opening `path`.
    pub fn from_io(path: &Path, e: &io::Error) -> PathProblem {
        let path = path.to_path_buf();
        match e.kind() {
            io::ErrorKind::NotFound => PathProblem::Missing { path },
            io::ErrorKind::PermissionDenied => {
                // stat(2) needs no read permission on the file itself.
                let meta = std::fs::metadata(&path).ok();
                PathProblem::Unreadable {
                    uid: effective_uid(),
                    owner: meta.as_ref().map_or(u32::MAX, |m| m.uid()),
                    group: meta.as_ref().map_or(u32::MAX, |m| m.gid()),
                    mode: meta.as_ref().map_or(0, |m| m.mode() & 0o7777),
                    path,
                }
            }
            _ => PathProblem::Io {
                path,
                message: e.to_string(),
            },
        }
    }

    /// As an `io::Error` (kept inside: `get_ref()` + `downcast_ref` gives it back).
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.kind(), self)
    }

    /// The problem carried by an `io::Error` made by `into_io`, if any.
    pub fn of(e: &io::Error) -> Option<&PathProblem> {
        e.get_ref().and_then(|i| i.downcast_ref::<PathProblem>())
    }
}

impl std::error::Error for PathProblem {}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathProblem::Missing { path } => write!(
                f,
                "log file {} does not exist (yet); waiting for it. Check where Dovecot logs \
                 (`doveconf log_path`, or the syslog file for facility mail), or use journal mode",
                path.display()
            ),
            PathProblem::Unreadable {
                path,
                uid,
                owner,
                group,
                mode,
            } if *owner == u32::MAX => write!(
                f,
                "log file {} cannot be looked at by uid {uid} ({}): a directory on its path is not \
                 searchable; give the directories mode o+x (or the user's group g+x), or use journal mode",
                path.display(),
                user_name(*uid),
            ),
            PathProblem::Unreadable {
                path,
                uid,
                owner,
                group,
                mode,
            } => {
                let user = user_name(*uid);
                let group_name = group_name(*group);
                write!(
                    f,
                    "log file {} is not readable by uid {uid} ({user}) (owner {}, group {group_name}, mode {mode:04o}): ",
                    path.display(),
                    user_name(*owner),
                )?;
                // Never "join group root": a root-group file is regrouped to adm instead.
                if mode & 0o040 != 0 && *group != 0 {
                    write!(
                        f,
                        "add the user to group {group_name} (`usermod -aG {group_name} {user}`), or use journal mode"
                    )
                } else {
                    write!(
                        f,
                        "make the file group-readable by adm (logrotate `create 0640 root adm`) and add the \
                         user to group adm, or use journal mode; if this is Dovecot's own log_path, \
                         `doveadm log reopen` recreates it 0600 root after every rotation: use journal \
                         mode (Dovecot's default log_path = syslog) instead"
                    )
                }
            }
            PathProblem::NotRegular { path, kind } => write!(
                f,
                "log path {} is a {kind}, not a regular file: it is not read; name the log file \
                 itself in the configuration",
                path.display()
            ),
            PathProblem::Io { path, message } => {
                write!(f, "cannot read log file {}: {message}", path.display())
            }
        }
    }
}

/// What kind of non-regular file `meta` describes, in words.
pub fn kind_of(meta: &Metadata) -> &'static str {
    crate::fsread::kind_of(meta.file_type())
}

/// Opens `path` only if it is a regular file: its type is checked before the open (stat
/// does not block, open of a FIFO does), the open is non-blocking in case the path was
/// swapped in between, and the opened file is checked again.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), PathProblem> {
    let before = std::fs::metadata(path).map_err(|e| PathProblem::from_io(path, &e))?;
    if !before.is_file() {
        return Err(PathProblem::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&before),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| PathProblem::from_io(path, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| PathProblem::from_io(path, &e))?;
    if !meta.is_file() {
        return Err(PathProblem::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&meta),
        });
    }
    Ok((file, meta))
}

/// Opens `p` when it is a regular file whose stat satisfies `pre` (checked before any open,
/// so that siblings of the wrong identity or type are never opened).
pub fn open_if(p: &Path, pre: impl Fn(&Metadata) -> bool) -> Option<(File, Metadata)> {
    let m = std::fs::metadata(p).ok()?;
    if !m.is_file() || !pre(&m) {
        return None;
    }
    let (f, meta) = open_regular(p).ok()?;
    // The same file that passed `pre` (not one renamed into place meanwhile).
    (FileId::of(&meta) == FileId::of(&m)).then_some((f, meta))
}

fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The name of uid `id` from /etc/passwd, else the number.
fn user_name(id: u32) -> String {
    name_in("/etc/passwd", id)
}

/// The name of gid `id` from /etc/group, else the number.
fn group_name(id: u32) -> String {
    name_in("/etc/group", id)
}

/// `name:x:ID:...` lookup, bounded (an error message must not read a huge file).
fn name_in(db: &str, id: u32) -> String {
    use std::io::Read;
    let mut text = String::new();
    let _ = File::open(db).and_then(|f| f.take(1 << 20).read_to_string(&mut text));
    text.lines()
        .find_map(|l| {
            let mut it = l.split(':');
            let name = it.next()?;
            (it.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_string())
        })
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_fix() {
        let p = PathProblem::Unreadable {
            path: "/var/log/dovecot.log".into(),
            uid: 0,
            owner: 0,
            group: 0,
            mode: 0o600,
        };
        let s = p.to_string();
        assert!(s.contains("/var/log/dovecot.log"), "{s}");
        assert!(s.contains("uid 0 (root)"), "{s}");
        assert!(s.contains("mode 0600"), "{s}");
        assert!(s.contains("journal mode"), "{s}");
        let e = p.clone().into_io();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(PathProblem::of(&e), Some(&p));
        assert_eq!(e.to_string(), s);
    }

    #[test]
    fn refuses_special_files_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (p, kind) in [
            (fifo.as_path(), "FIFO"),
            (d.path(), "directory"),
            (Path::new("/dev/zero"), "character device"),
        ] {
            match open_regular(p) {
                Err(PathProblem::NotRegular { kind: k, .. }) => assert!(k.contains(kind)),
                other => panic!("{}: {other:?}", p.display()),
            }
        }
        assert!(matches!(
            open_regular(&d.path().join("none")),
            Err(PathProblem::Missing { .. })
        ));
    }
}
