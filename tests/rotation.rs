//! Log rotation while lines are being written: every login line lands exactly once.
//! "Exactly once" is checked two ways: every address is in the map (none lost), and the
//! daemon's count of login lines read equals the number written (none read twice).

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Rotation {
    RenameCreate,
    CopyTruncate,
    DeleteRecreate,
}

const LINES: usize = 3000;

fn ip(i: usize) -> String {
    format!("198.18.{}.{}", i / 250, i % 250 + 1)
}

fn open_append(p: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .expect("open log")
}

/// Writes LINES login lines, rotating twice on the way, the way each tool does it. Before
/// each rotation it waits until dovegate has read into the current generation: a
/// generation rotated away twice (or deleted, or truncated and refilled) before dovegate
/// ever read from it cannot be found by anyone, and real rotations are hours apart, not
/// milliseconds. Lines keep being written around and during each rotation.
fn write_with_rotations(log: &Path, map: &Path, how: Rotation) {
    let mut out = open_append(log);
    let mut pending_switch: Option<usize> = None;
    for i in 0..LINES {
        // Lines of other programs between the logins, as in a real mail.log.
        if i % 7 == 0 {
            writeln!(
                out,
                "{} mail postfix/qmgr[77]: 4F1A2B3C: removed",
                bsd_now()
            )
            .unwrap();
        }
        out.write_all(login_line(&ip(i), &format!("u{i}")).as_bytes())
            .unwrap();
        if i == LINES / 3 || i == 2 * LINES / 3 {
            wait_for("dovegate read the current generation", PATIENCE, || {
                postmap_q(map, &ip(i)).is_some()
            });
            match how {
                Rotation::RenameCreate => {
                    let _ =
                        std::fs::rename(log.with_extension("log.1"), log.with_extension("log.2"));
                    std::fs::rename(log, log.with_extension("log.1")).unwrap();
                    // The writer keeps writing to the renamed file until it reopens.
                    pending_switch = Some(i + 50);
                }
                Rotation::CopyTruncate => {
                    out.flush().unwrap();
                    let _ =
                        std::fs::rename(log.with_extension("log.1"), log.with_extension("log.2"));
                    std::fs::copy(log, log.with_extension("log.1")).unwrap();
                    out.set_len(0).unwrap();
                }
                Rotation::DeleteRecreate => {
                    std::fs::remove_file(log).unwrap();
                    pending_switch = Some(i + 20);
                }
            }
        }
        if pending_switch == Some(i) {
            out = open_append(log);
            pending_switch = None;
        }
        if i % 100 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

fn scenario(how: Rotation) {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    File::create(&log).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    write_with_rotations(&log, &map, how);
    // Poll single keys: a back-to-back `postmap -s` scan takes a shared lock per record
    // and can starve the daemon's writer (fcntl locks are not fair). One scan at the end.
    for i in (0..LINES)
        .step_by(97)
        .chain([LINES / 3, 2 * LINES / 3, LINES - 1])
    {
        let start = std::time::Instant::now();
        while postmap_q(&map, &ip(i)).is_none() {
            assert!(
                start.elapsed() < PATIENCE,
                "{how:?}: {} never granted; daemon log:\n{}",
                ip(i),
                daemon.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let keys: std::collections::HashSet<String> =
        postmap_s(&map).into_iter().map(|(k, _)| k).collect();
    for i in 0..LINES {
        assert!(keys.contains(&ip(i)), "{how:?}: {} missing", ip(i));
    }
    assert_eq!(keys.len(), LINES);
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        daemon.summary("logins"),
        Some(LINES as u64),
        "{how:?}: login lines read:\n{}",
        daemon.log()
    );
}

#[test]
fn rename_and_create() {
    scenario(Rotation::RenameCreate);
}

#[test]
fn copytruncate() {
    scenario(Rotation::CopyTruncate);
}

#[test]
fn delete_and_recreate() {
    scenario(Rotation::DeleteRecreate);
}
