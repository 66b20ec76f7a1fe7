//! The map under faults while the daemon runs: deleted, replaced, truncated, a full disk,
//! grants from a wrong clock, manual changes, a second daemon. Postfix's `postmap` judges
//! what the map holds.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn map_arg(d: &Path) -> String {
    d.join("relay").display().to_string()
}

/// A login line that opens no mail session: its grant runs out ttl after the login
/// (`login_line`'s shared session id would be renewed up to grant.session_hold).
fn sessionless_login(ip: &str) -> String {
    login_line(ip, "u").replace(", mpid=4242, TLS, session=<abcdEFGH1234>", ", TLS")
}

fn running(daemon: &mut Daemon) -> bool {
    matches!(daemon.child.try_wait(), Ok(None))
}

/// Logs `ip` in and waits until Postfix sees its grant.
fn login_and_see(log: &Path, map: &Path, ip: &str) {
    append(log, &sessionless_login(ip));
    wait_for(&format!("postmap -q {ip}"), PATIENCE, || {
        postmap_q(map, ip).is_some()
    });
}

/// Defects 9 and 15: the map deleted, replaced (rename over it) or truncated under the
/// running daemon. It notices before its next commit, logs an ERROR, reopens (creating it
/// when missing), writes its live grants again, and keeps granting; never SIGBUS.
#[test]
fn deleted_replaced_or_truncated_map_is_reopened_and_refilled() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let file = d.path().join("relay.lmdb");
    std::fs::write(&log, "").unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    login_and_see(&log, &map, "192.0.2.1");

    std::fs::remove_file(&file).unwrap();
    wait_for(
        "deleted map recreated with the live grant",
        PATIENCE,
        || file.exists() && postmap_q(&map, "192.0.2.1").is_some(),
    );
    login_and_see(&log, &map, "192.0.2.2");

    // A replacement built by Postfix's own postmap from an empty source.
    let src = d.path().join("replacement");
    std::fs::write(&src, "").unwrap();
    let out = postmap(&[&format!("lmdb:{}", src.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(d.path().join("replacement.lmdb"), &file).unwrap();
    wait_for("replaced map refilled", PATIENCE, || {
        postmap_q(&map, "192.0.2.1").is_some() && postmap_q(&map, "192.0.2.2").is_some()
    });
    login_and_see(&log, &map, "192.0.2.3");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    wait_for("truncated map refilled", PATIENCE, || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
            && postmap_q(&map, "192.0.2.3").is_some()
    });
    login_and_see(&log, &map, "192.0.2.4");
    assert!(
        running(&mut daemon),
        "the daemon survived: {}",
        daemon.log()
    );
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"] {
        assert!(
            postmap_q(&map, ip).is_some(),
            "{ip} in the map Postfix opens"
        );
    }
    let text = daemon.log();
    for fault in ["was deleted", "was replaced", "was truncated"] {
        assert!(
            text.lines()
                .any(|l| l.contains("ERROR") && l.contains(fault)),
            "an ERROR says the map {fault}:\n{text}"
        );
    }
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

/// Defect 4: `dovegate revoke` and `dovegate grant` reach the running daemon's socketmap
/// answers at once (before: up to 60 s).
#[test]
fn manual_changes_reach_the_socketmap_at_once() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let sock = d.path().join("socketmap");
    std::fs::write(&log, "").unwrap();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[map]\npath = {:?}\n[state]\ndir = {:?}\n[serve]\nsocketmap = \"unix:{}\"\n",
            log.display().to_string(),
            map_arg(d.path()),
            d.path().join("state").display().to_string(),
            sock.display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(d.path(), &["--config", &conf.display().to_string()]);
    wait_for("socketmap socket", PATIENCE, || sock.exists());
    let table = format!("socketmap:unix:{}:relay", sock.display());
    append(&log, &login_line("192.0.2.10", "u"));
    wait_for("socketmap grant", PATIENCE, || {
        postmap_table(&table, "192.0.2.10").is_some()
    });
    let out = dovegate(&["revoke", "--map", &map_arg(d.path()), "192.0.2.10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("revoke seen by the socketmap", PATIENCE, || {
        postmap_table(&table, "192.0.2.10").is_none()
    });
    let out = dovegate(&["grant", "--map", &map_arg(d.path()), "198.51.100.20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("manual grant seen by the socketmap", PATIENCE, || {
        postmap_table(&table, "198.51.100.20").is_some()
    });
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

fn postmap_insert(map: &Path, lines: &str) {
    let mut child = Command::new("postmap")
        .args([
            "-c",
            postmap_conf(),
            "-i",
            &format!("lmdb:{}", map.display()),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// The expiry in a map value `OK expires=...`.
fn expiry_of(value: &str) -> i64 {
    let t = value.split("expires=").nth(1).expect("expiry in value");
    chrono::DateTime::parse_from_rfc3339(t.trim())
        .unwrap()
        .timestamp()
}

/// Defect 1: a grant written under a wrong clock (expiring in 2099) is shortened in the
/// map itself to now + ttl: at start, and when another writer adds one while it runs.
#[test]
fn far_future_expiries_are_capped_in_the_map() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    std::fs::write(&log, "").unwrap();
    postmap_insert(&map, "192.0.2.77 OK expires=2099-01-01T00:00:00Z\n");
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "30m"]);
    let limit = || chrono::Utc::now().timestamp() + 1800;
    wait_for("capped at start", PATIENCE, || {
        postmap_q(&map, "192.0.2.77").is_some_and(|v| expiry_of(&v) <= limit())
    });
    postmap_insert(&map, "192.0.2.78 OK expires=2099-01-01T00:00:00Z\n");
    wait_for("capped while running", PATIENCE, || {
        postmap_q(&map, "192.0.2.78").is_some_and(|v| expiry_of(&v) <= limit())
    });
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

/// Defect 16: a second `run` on the same map or state directory is refused with a clear
/// message, and the first keeps its map; `dovegate status` says which daemon holds it.
#[test]
fn second_daemon_is_refused_and_status_names_the_first() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    std::fs::write(&log, "").unwrap();
    let mut first = Daemon::follow(d.path(), &log, &[]);
    let logs = log.display().to_string();
    let other_state = d.path().join("state2").display().to_string();
    let other_map = d.path().join("relay2").display().to_string();
    let state = d.path().join("state").display().to_string();
    for (map, state, what) in [
        (map_arg(d.path()), other_state, "map"),
        (other_map, state.clone(), "state directory"),
    ] {
        let out = Command::new(bin())
            .args(["run", "--log", &logs, "--map", &map, "--state-dir", &state])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("already runs on this {what}"))
                && err.contains(&format!("pid {}", first.child.id())),
            "{err}"
        );
    }
    login_and_see(&log, &d.path().join("relay"), "192.0.2.30");
    let status = |json: bool| {
        let map = map_arg(d.path());
        let mut args = vec!["status", "--map", &map, "--state-dir", &state];
        if json {
            args.push("--json");
        }
        let out = dovegate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(v["daemon"]["running"], true);
    assert_eq!(v["daemon"]["pid"], first.child.id());
    assert!(status(false).contains(&format!("daemon: running (pid {})", first.child.id())));
    assert_eq!(first.stop(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(v["daemon"]["running"], false);
}

/// `grant --ttl` is bounded like grant.ttl; a map the user may not write is a runtime
/// failure (exit 1) naming the file and the fix, not a configuration error.
#[test]
fn grant_ttl_bounds_and_permission_errors() {
    let d = tempdir();
    let map = map_arg(d.path());
    // Created by Postfix's postmap (`dovegate init` would also create the default state
    // directory).
    postmap_insert(&d.path().join("relay"), "");
    for ttl in ["32d", "0s", "31m"] {
        let out = dovegate(&["grant", "--map", &map, "--ttl", ttl, "192.0.2.5"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
    }
    let out = dovegate(&["grant", "--map", &map, "--ttl", "30m", "192.0.2.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            bin(),
            "revoke",
            "--map",
            &map,
            "192.0.2.5",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("relay.lmdb") && err.contains("owner"), "{err}");
    let out = dovegate(&[
        "revoke",
        "--map",
        &d.path().join("nothere").display().to_string(),
        "192.0.2.5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a wrong map path is a configuration error"
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let d = tempdir();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (needs root)");
        Tmpfs(d)
    }

    fn path(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Defect 5: on a full disk, expired grants still leave the map Postfix obeys (the map's
/// blocks are reserved, and deletes need no new ones).
#[test]
fn grants_expire_on_a_full_disk() {
    let d = tempdir();
    let fs = Tmpfs::mount("20m");
    let log = d.path().join("mail.log");
    let map = fs.path().join("relay");
    std::fs::write(&log, "").unwrap();
    let mut daemon = Daemon::start(
        d.path(),
        &[
            "--log",
            &log.display().to_string(),
            "--map",
            &map.display().to_string(),
            "--state-dir",
            &d.path().join("state").display().to_string(),
            "--ttl",
            "4s",
        ],
    );
    wait_for("map created", PATIENCE, || {
        fs.path().join("relay.lmdb").exists()
    });
    // Many grants in one commit: their deletion must copy pages the free list cannot give.
    let ips: Vec<String> = (0..3000)
        .map(|i| format!("2001:db8:{:x}::{:x}", i / 200 + 1, i % 200 + 1))
        .collect();
    let text: String = ips.iter().map(|ip| sessionless_login(ip)).collect();
    append(&log, &text);
    wait_for_scan("all granted", &map, |keys| keys.len() == ips.len());
    // Fill the filesystem.
    let mut filler = std::fs::File::create(fs.path().join("filler")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while filler.write_all(&chunk).is_ok() {}
    drop(filler);
    assert!(
        std::fs::File::create(fs.path().join("x"))
            .and_then(|mut f| f.write_all(&chunk))
            .is_err(),
        "the disk is full"
    );
    wait_for_scan("expired on a full disk", &map, |keys| keys.is_empty());
    assert!(running(&mut daemon));
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

/// A process of Postfix's group holding a lock on the map (no other user can open it:
/// map_access.rs), killed and reaped on drop.
struct LockHolder(std::process::Child);

impl LockHolder {
    /// User `postfix` opens the map read-only and holds a shared lock until stdin closes;
    /// `ofd` picks an open-file-description lock (its pid is hidden from F_GETLK and
    /// /proc/locks) over a classic POSIX one.
    fn start(file: &Path, ofd: bool) -> LockHolder {
        let script = if ofd {
            // struct flock on Linux x86_64/aarch64: type, whence, start, len, pid.
            "import fcntl,struct,sys\nf=open(sys.argv[1],'rb')\nfcntl.fcntl(f,fcntl.F_OFD_SETLKW,struct.pack('hhxxxxqqixxxx',fcntl.F_RDLCK,0,0,0,0))\nprint('locked',flush=True)\nsys.stdin.read()\n"
        } else {
            "import fcntl,sys\nf=open(sys.argv[1],'rb')\nfcntl.lockf(f,fcntl.LOCK_SH)\nprint('locked',flush=True)\nsys.stdin.read()\n"
        };
        let mut child = Command::new("setpriv")
            .args(["--reuid", "postfix", "--regid", "postfix", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", script])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the lock holder (setpriv, python3)");
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        let holder = LockHolder(child);
        assert_eq!(line.trim(), "locked", "the holder took its lock");
        holder
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Review finding 1: a reader (now only root, dovegate or Postfix's group) can hold a
/// shared lock on the map forever. The
/// daemon does not stall silently: within seconds an ERROR names the map and the holder's
/// pid, it keeps running, and once the holder is gone the expired grant leaves the map and
/// new logins are committed.
#[test]
fn a_reader_holding_the_lock_is_named_and_expiry_resumes_after_it() {
    for ofd in [false, true] {
        let d = tempdir();
        let log = d.path().join("mail.log");
        let map = d.path().join("relay");
        let file = d.path().join("relay.lmdb");
        std::fs::write(&log, "").unwrap();
        let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "4s"]);
        login_and_see(&log, &map, "192.0.2.1");
        let holder = LockHolder::start(&file, ofd);
        append(&log, &sessionless_login("192.0.2.2"));
        let pid = format!("pid {}", holder.pid());
        wait_for("an ERROR naming the map and the holder", PATIENCE, || {
            daemon.log().lines().any(|l| {
                l.contains("ERROR")
                    && l.contains("relay.lmdb")
                    && l.contains("cannot lock for writing")
                    && l.contains(&pid)
            })
        });
        assert!(running(&mut daemon), "ofd={ofd}: {}", daemon.log());
        drop(holder);
        wait_for("the expired grant removed", PATIENCE, || {
            postmap_q(&map, "192.0.2.1").is_none()
        });
        login_and_see(&log, &map, "192.0.2.3");
        assert!(running(&mut daemon), "ofd={ofd}: {}", daemon.log());
        let text = daemon.log();
        assert!(
            text.contains("works again"),
            "ofd={ofd}: recovery said:\n{text}"
        );
        assert_eq!(daemon.stop(), Some(0), "{text}");
    }
}
