//! Who may open the map and the lock files (issue 20 items 3 and 4): Postfix (its smtpd
//! still relays a granted client), root and the daemon's user; never another local user,
//! who could otherwise hold a read lock and stall every write, or keep the daemon from
//! starting. `status` never names a holder that is not a running dovegate.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// Whether `nobody` (no groups) can open `file` for reading.
fn nobody_can_open(file: &Path) -> bool {
    Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
        .args([
            "/usr/bin/python3",
            "-c",
            "import sys; open(sys.argv[1], 'rb')",
        ])
        .arg(file)
        .output()
        .expect("setpriv python3")
        .status
        .success()
}

fn postfix_gid() -> Option<u32> {
    let out = Command::new("getent")
        .args(["group", "postfix"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)?
        .trim()
        .parse()
        .ok()
}

#[test]
fn map_and_lock_files_are_closed_to_other_users_and_postfix_still_reads_the_map() {
    let d = tempdir();
    set_mode(d.path(), 0o755);
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let file = d.path().join("relay.lmdb");
    std::fs::write(&log, "").unwrap();
    std::fs::create_dir_all(d.path().join("state")).unwrap();
    set_mode(&d.path().join("state"), 0o755);
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    append(&log, &sessionless_login_line("192.0.2.77", "u"));
    wait_for("grant", PATIENCE, || {
        postmap_q(&map, "192.0.2.77").is_some()
    });

    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o640, "map mode");
    if let Some(gid) = postfix_gid() {
        assert_eq!(meta.gid(), gid, "map group postfix");
    }
    for f in [
        file.clone(),
        d.path().join("relay.dovegate-lock"),
        d.path().join("state/dovegate.lock"),
    ] {
        assert!(f.exists(), "{}", f.display());
        assert!(
            !nobody_can_open(&f),
            "nobody can open {} (mode {:o})",
            f.display(),
            std::fs::metadata(&f).unwrap().mode()
        );
    }

    // Postfix's smtpd reads the 0640 map: the granted client relays, another does not.
    let pf = Postfix::start(&d.path().join("pf"), &map);
    let r = Smtp::connect(pf.port).relay_as("192.0.2.77");
    assert!(r.starts_with("250"), "granted client: {r}");
    let r = Smtp::connect(pf.port).relay_as("192.0.2.78");
    assert!(r.starts_with("554"), "other client: {r}");
    drop(pf);
    daemon.stop();
}

/// A map left world-readable by an older version: check-config names the fix, and the
/// daemon closes it at start.
#[test]
fn a_world_readable_map_is_reported_and_closed() {
    let d = tempdir();
    set_mode(d.path(), 0o755);
    let map = d.path().join("relay");
    let file = d.path().join("relay.lmdb");
    let m = map.display().to_string();
    let out = dovegate(&["init", "--map", &m]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_mode(&file, 0o644);
    let out = dovegate(&["check-config", "--map", &m]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by every local user") && err.contains("chmod 0640"),
        "{err}"
    );
    let log = d.path().join("mail.log");
    std::fs::write(&log, "").unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &[]);
    wait_for("map closed to others", PATIENCE, || {
        std::fs::metadata(&file).is_ok_and(|m| m.mode() & 0o777 == 0o640)
    });
    assert!(!nobody_can_open(&file));
    daemon.stop();
}

/// A lock file held by another process that is not a dovegate: `status` names no pid, and
/// the daemon starts anyway (a new lock file replaces the held one).
#[test]
fn a_foreign_lock_holder_neither_blocks_the_start_nor_is_named() {
    let d = tempdir();
    set_mode(d.path(), 0o755);
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    std::fs::write(&log, "").unwrap();
    let lock = d.path().join("relay.dovegate-lock");
    // An old world-readable lock file naming a pid that does not run, held by `nobody`.
    std::fs::write(&lock, "4194999\n").unwrap();
    set_mode(&lock, 0o644);
    let mut holder = Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
        .args([
            "/usr/bin/python3",
            "-c",
            "import fcntl,sys\nf=open(sys.argv[1],'rb')\nfcntl.lockf(f,fcntl.LOCK_SH)\nprint('locked',flush=True)\nsys.stdin.read()\n",
        ])
        .arg(&lock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let m = map.display().to_string();
    let state = d.path().join("state").display().to_string();
    let out = dovegate(&["init", "--map", &m]);
    assert!(out.status.success());
    let out = dovegate(&["status", "--map", &m, "--state-dir", &state]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("4194999"), "status names a dead pid: {text}");

    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    append(&log, &sessionless_login_line("192.0.2.79", "u"));
    wait_for("the daemon runs and grants", PATIENCE, || {
        postmap_q(&map, "192.0.2.79").is_some()
    });
    let out = dovegate(&["status", "--map", &m, "--state-dir", &state]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("pid {}", daemon.child.id())),
        "status names the running daemon: {text}"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    daemon.stop();
}

/// What the package runs on removal (issue 20 item 1): every entry goes, the file (and
/// its inode, which Postfix has open) stays.
#[test]
fn revoke_all_empties_the_map_and_keeps_the_file() {
    let d = tempdir();
    let map = d.path().join("relay");
    let m = map.display().to_string();
    assert!(dovegate(&["init", "--map", &m]).status.success());
    for ip in ["192.0.2.80", "2001:db8::80"] {
        assert!(dovegate(&["grant", "--map", &m, ip]).status.success());
    }
    let before = std::fs::metadata(d.path().join("relay.lmdb"))
        .unwrap()
        .ino();
    assert!(postmap_q(&map, "192.0.2.80").is_some());
    let out = dovegate(&["revoke", "--all", "--map", &m]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(postmap_q(&map, "192.0.2.80").is_none());
    assert!(postmap_q(&map, "2001:db8::80").is_none());
    assert!(postmap_s(&map).is_empty());
    assert_eq!(
        std::fs::metadata(d.path().join("relay.lmdb"))
            .unwrap()
            .ino(),
        before
    );
}
