//! The follower against real files: special files, and rotations whose new file cannot be
//! opened yet.

use std::io::Write;
use std::path::Path;

use super::*;

fn append(p: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Polls once; returns the lines handed out and the result.
fn poll(f: &mut FileFollower) -> (String, io::Result<()>) {
    let mut out = String::new();
    let r = f.poll(&mut |chunk, _| out.push_str(std::str::from_utf8(chunk).unwrap()));
    (out, r)
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on another thread and fails if it does not finish: a FIFO opened blocking
/// would hang the test forever instead of failing it.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the follower blocked")
}

#[test]
fn fifo_sibling_never_blocks_copytruncate_or_resume() {
    bounded(|| {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("mail.log");
        mkfifo(&d.path().join("aaa.fifo"));
        append(&log, "one\ntwo\n");
        let mut f = FileFollower::new(&log, 4096, Start::Beginning);
        assert_eq!(poll(&mut f).0, "one\ntwo\n");
        // A truncation without a copy: every sibling is looked at.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "zero\n");
        assert_eq!(poll(&mut f).0, "zero\n");
        // copytruncate makes the follower search the siblings for the copy.
        append(&log, "three\n");
        std::fs::copy(&log, d.path().join("mail.log.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "four\n");
        let (out, r) = poll(&mut f);
        r.unwrap();
        assert_eq!(out, "three\nfour\n");
        // Resuming searches the siblings for rotated generations.
        let cp = f.checkpoint();
        std::fs::rename(&log, d.path().join("mail.log.2")).unwrap();
        append(&log, "five\n");
        let mut f = FileFollower::resume(&log, 4096, &cp);
        assert_eq!(poll(&mut f).0, "five\n");
    });
}

#[test]
fn special_paths_are_errors_not_reads() {
    bounded(|| {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        for p in [fifo.as_path(), d.path(), Path::new("/dev/zero")] {
            let mut f = FileFollower::new(p, 4096, Start::Beginning);
            for _ in 0..3 {
                let (out, r) = poll(&mut f);
                assert_eq!(out, "", "{}", p.display());
                let e = r.expect_err("a special file is an error");
                assert!(
                    matches!(PathProblem::of(&e), Some(PathProblem::NotRegular { .. })),
                    "{}: {e}",
                    p.display()
                );
                assert!(e.to_string().contains("not a regular file"), "{e}");
                assert!(matches!(f.problem(), Some(PathProblem::NotRegular { .. })));
            }
        }
    });
}

#[test]
fn missing_then_created_reads_from_start_and_clears() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("mail.log");
    let mut f = FileFollower::new(&log, 4096, Start::Beginning);
    let (out, r) = poll(&mut f);
    r.unwrap();
    assert_eq!(out, "");
    assert!(matches!(f.problem(), Some(PathProblem::Missing { .. })));
    assert!(f.problem().unwrap().to_string().contains("journal mode"));
    append(&log, "a\n");
    assert_eq!(poll(&mut f).0, "a\n");
    assert_eq!(f.problem(), None);
}

/// Defect 13: after a rename, the path names something that cannot be opened (here a
/// directory; in production EACCES or a vanished file). The old generation's unread tail
/// is still delivered, and the new file is read once it is usable.
#[test]
fn old_generation_is_drained_when_the_new_file_cannot_be_opened() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("mail.log");
    append(&log, "a\n");
    let mut f = FileFollower::new(&log, 4096, Start::Beginning);
    assert_eq!(poll(&mut f).0, "a\n");
    append(&log, "b\n");
    std::fs::rename(&log, d.path().join("mail.log.1")).unwrap();
    append(&d.path().join("mail.log.1"), "c\n");
    std::fs::create_dir(&log).unwrap();
    let (out, r) = poll(&mut f);
    assert_eq!(out, "b\nc\n");
    assert!(r.is_err());
    assert!(matches!(f.problem(), Some(PathProblem::NotRegular { .. })));
    // The path missing for a while: the old file is still drained.
    std::fs::remove_dir(&log).unwrap();
    append(&d.path().join("mail.log.1"), "d\n");
    let (out, r) = poll(&mut f);
    r.unwrap();
    assert_eq!(out, "d\n");
    append(&log, "e\n");
    let (out, r) = poll(&mut f);
    r.unwrap();
    assert_eq!(out, "e\n");
    assert_eq!(f.problem(), None);
}

/// Drops every capability of the calling thread (capabilities are per thread on Linux), so
/// that root is refused a mode 0000 file like anybody else.
fn drop_thread_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a valid header and two data elements, as version 3 requires.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", io::Error::last_os_error());
}

/// Defect 13 with EACCES (a new file created 0000, as Dovecot recreates its log_path 0600
/// root): the old generation's tail is delivered, the problem names the mode and the fix,
/// and it clears once the file is readable.
#[test]
fn unreadable_new_file_after_rotation() {
    std::thread::spawn(|| {
        use std::os::unix::fs::PermissionsExt;
        drop_thread_capabilities();
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("mail.log");
        append(&log, "a\n");
        let mut f = FileFollower::new(&log, 4096, Start::Beginning);
        assert_eq!(poll(&mut f).0, "a\n");
        append(&log, "b\n");
        std::fs::rename(&log, d.path().join("mail.log.1")).unwrap();
        append(&log, "c\n");
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o000)).unwrap();
        let (out, r) = poll(&mut f);
        assert_eq!(out, "b\n");
        let e = r.expect_err("an unreadable file is an error");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        match f.problem() {
            Some(PathProblem::Unreadable { mode: 0, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("mode 0000"), "{e}");
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (out, r) = poll(&mut f);
        r.unwrap();
        assert_eq!(out, "c\n");
        assert_eq!(f.problem(), None);
        // A directory on the way that may not be searched.
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        append(&sub.join("mail.log"), "x\n");
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o000)).unwrap();
        let mut f = FileFollower::new(&sub.join("mail.log"), 4096, Start::Beginning);
        let (out, r) = poll(&mut f);
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(out, "");
        let e = r.expect_err("an unreachable file is an error");
        assert!(e.to_string().contains("not searchable"), "{e}");
    })
    .join()
    .unwrap();
}

/// A new generation is handed out with its checkpoint before any line is read from it:
/// a crash right after a rotation must not resume from a checkpoint that does not know it.
#[test]
fn a_new_empty_generation_is_checkpointed_at_once() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("mail.log");
    append(&log, "a\n");
    let mut f = FileFollower::new(&log, 4096, Start::Beginning);
    assert_eq!(poll(&mut f).0, "a\n");
    std::fs::rename(&log, d.path().join("mail.log.1")).unwrap();
    append(&log, "");
    let mut handed = Vec::new();
    f.poll(&mut |chunk, cp| handed.push((chunk.len(), cp.clone())))
        .unwrap();
    let (len, cp) = handed.last().expect("a checkpoint was handed out");
    assert_eq!(*len, 0);
    assert_eq!(cp, &f.checkpoint());
    assert_eq!(cp.files.len(), 2, "{cp:?}");
    // Nothing changed: nothing handed out.
    let mut calls = 0;
    f.poll(&mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, 0);
}
