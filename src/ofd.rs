//! Whole-file fcntl open-file-description (OFD) locks, through `nix`: the only lock kind
//! the project uses (Postfix locks its LMDB maps with fcntl, and OFD locks belong to the
//! open file, so two threads of one process exclude each other too). Never flock(2).

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};

/// What a lock call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Shared,
    Exclusive,
    Unlock,
}

impl Kind {
    fn raw(self) -> libc::c_short {
        (match self {
            Kind::Shared => libc::F_RDLCK,
            Kind::Exclusive => libc::F_WRLCK,
            Kind::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }
}

/// The whole file (start 0, length 0 = to the end), with l_pid 0 as OFD locks require.
fn whole_file(kind: Kind) -> libc::flock {
    libc::flock {
        l_type: kind.raw(),
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Takes (or releases) `kind` on the whole file; `wait`: block until it is free. Retried
/// on EINTR. Without `wait`, a lock held elsewhere fails with EAGAIN or EACCES (`busy`).
pub fn set(file: &File, kind: Kind, wait: bool) -> io::Result<()> {
    let fl = whole_file(kind);
    loop {
        let arg = if wait {
            FcntlArg::F_OFD_SETLKW(&fl)
        } else {
            FcntlArg::F_OFD_SETLK(&fl)
        };
        match fcntl(file, arg) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Whether `e` says that another holder has the lock.
pub fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}

/// Who holds a lock that conflicts with an exclusive one: None when nobody does; Some(pid)
/// when the kernel names a process (a classic POSIX lock), Some(None) for an OFD lock
/// (the kernel reports no pid for those).
pub fn holder(file: &File) -> io::Result<Option<Option<u32>>> {
    let mut fl = whole_file(Kind::Exclusive);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    if fl.l_type == Kind::Unlock.raw() {
        return Ok(None);
    }
    Ok(Some(u32::try_from(fl.l_pid).ok().filter(|&p| p > 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_another_open_file_of_this_process() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let a = File::options()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        let b = File::options()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        assert_eq!(holder(&b).unwrap(), None);
        set(&a, Kind::Exclusive, false).unwrap();
        let e = set(&b, Kind::Exclusive, false).unwrap_err();
        assert!(busy(&e), "{e}");
        assert_eq!(holder(&b).unwrap(), Some(None), "an OFD holder has no pid");
        set(&a, Kind::Unlock, false).unwrap();
        set(&b, Kind::Shared, true).unwrap();
        set(&a, Kind::Shared, false).unwrap();
    }
}
