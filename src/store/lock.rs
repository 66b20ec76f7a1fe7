//! Whole-file fcntl OFD locks, the protocol Postfix's LMDB readers follow.
//!
//! Postfix takes `fcntl(F_SETLKW, F_RDLCK)` on the whole `.lmdb` file for every lookup and
//! ignores LMDB's lock file. flock() does not conflict with fcntl locks on Linux, and a
//! classic POSIX lock is dropped when any fd of the file closes (LMDB closes its own), so
//! an open-file-description lock on a dedicated fd is the one that works.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub struct FileLock<'a> {
    file: &'a File,
}

fn ofd(file: &File, kind: libc::c_short) -> io::Result<()> {
    // The range argument of fcntl(2) record locks (not the BSD whole-file lock call).
    // SAFETY: plain data; zeroed is the "whole file" range (start 0, len 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // SAFETY: valid fd and a pointer to an initialised flock for the call's duration.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl<'a> FileLock<'a> {
    /// Waits for an exclusive lock (writers).
    pub fn exclusive(file: &'a File) -> io::Result<FileLock<'a>> {
        ofd(file, libc::F_WRLCK as libc::c_short)?;
        Ok(FileLock { file })
    }

    /// Waits for a shared lock (readers).
    pub fn shared(file: &'a File) -> io::Result<FileLock<'a>> {
        ofd(file, libc::F_RDLCK as libc::c_short)?;
        Ok(FileLock { file })
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = ofd(self.file, libc::F_UNLCK as libc::c_short);
    }
}
