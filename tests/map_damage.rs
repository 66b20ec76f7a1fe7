//! A damaged map never crash-loops the daemon (issue 20 item 5): damage found at start (or
//! after a failed transaction) moves the file aside as `relay.lmdb.damaged-TIMESTAMP` with
//! an ERROR, a new map is created with the grants that could still be read, and the daemon
//! serves. Postfix's `postmap -q` judges the new map.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use common::*;

fn damaged_copies(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("relay.lmdb.damaged-"))
        .collect()
}

/// Overwrites every page after LMDB's two meta pages (the B-tree and the free list) with
/// garbage, as a foreign writer's torn pages would leave them.
fn overwrite_pages(file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    assert!(len > 3 * 4096, "a map of several pages: {len} bytes");
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(2 * 4096)).unwrap();
    let junk: Vec<u8> = (0..len - 2 * 4096).map(|i| (i * 7 + 3) as u8).collect();
    f.write_all(&junk).unwrap();
    f.sync_all().unwrap();
}

fn logins(n: usize) -> String {
    (0..n)
        .map(|i| {
            let ip = format!(
                "{}.{}",
                ["192.0.2", "198.51.100", "203.0.113"][i % 3],
                1 + i / 3
            );
            sessionless_login_line(&ip, "u")
        })
        .collect()
}

#[test]
fn damaged_map_is_moved_aside_at_start_and_the_daemon_serves() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let file = d.path().join("relay.lmdb");
    std::fs::write(&log, logins(600)).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    wait_for("600 grants", PATIENCE, || {
        postmap_q(&map, "203.0.113.200").is_some()
    });
    daemon.stop();

    overwrite_pages(&file);
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    wait_for("damaged map moved aside", PATIENCE, || {
        damaged_copies(d.path()).len() == 1
    });
    append(&log, &sessionless_login_line("192.0.2.250", "u"));
    wait_for("new login granted in the new map", PATIENCE, || {
        postmap_q(&map, "192.0.2.250").is_some()
    });
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "daemon exited: {}",
        daemon.log()
    );
    let text = daemon.log();
    let aside = &damaged_copies(d.path())[0];
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("damaged") && l.contains(aside.as_str())),
        "one ERROR naming the damaged copy: {text}"
    );
    // A restart finds the new map sound: nothing more is moved aside.
    daemon.stop();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    append(&log, &sessionless_login_line("192.0.2.251", "u"));
    wait_for("next login granted", PATIENCE, || {
        postmap_q(&map, "192.0.2.251").is_some()
    });
    assert_eq!(damaged_copies(d.path()).len(), 1, "{}", daemon.log());
    assert!(postmap_q(&map, "192.0.2.250").is_some());
    daemon.stop();
}

/// Zeroes every page after the two meta pages: LMDB then finds a root page that is neither
/// a branch nor a leaf (MDB_CORRUPTED), without reading past a page.
fn zero_pages(file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(2 * 4096)).unwrap();
    f.write_all(&vec![0u8; (len - 2 * 4096) as usize]).unwrap();
    f.sync_all().unwrap();
}

/// Damage found by a failed transaction while running: the map is moved aside, a new one
/// takes its path, and the daemon writes its live grants into it again.
#[test]
fn damage_found_by_a_transaction_is_moved_aside_and_the_live_grants_written_again() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let file = d.path().join("relay.lmdb");
    std::fs::write(&log, logins(300)).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    wait_for("300 grants", PATIENCE, || {
        postmap_q(&map, "203.0.113.100").is_some()
    });
    zero_pages(&file);
    append(&log, &sessionless_login_line("192.0.2.252", "u"));
    wait_for("damaged map moved aside", PATIENCE, || {
        damaged_copies(d.path()).len() == 1
    });
    wait_for(
        "live grants written again, the new login too",
        PATIENCE,
        || postmap_q(&map, "192.0.2.252").is_some() && postmap_q(&map, "203.0.113.100").is_some(),
    );
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "daemon exited: {}",
        daemon.log()
    );
    daemon.stop();
}
