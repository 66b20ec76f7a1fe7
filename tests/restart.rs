//! Restarts: after SIGTERM or kill -9, dovegate resumes at its checkpoint. No login is
//! lost (even one written while it was down, or into a file rotated while it was down),
//! and an old login is not granted again past its time.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;

fn ip(block: usize, i: usize) -> String {
    format!("198.51.{}.{}", 100 + block, i % 250 + 1)
}

fn write_block(log: &Path, block: usize, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        // Sessionless: one shared session id would hold the last grant past the ttl.
        text.push_str(&sessionless_login_line(
            &ip(block, i),
            &format!("b{block}u{i}"),
        ));
    }
    append(log, &text);
}

fn all_granted(map: &Path, block: usize, n: usize) -> bool {
    let keys: std::collections::HashSet<String> =
        postmap_s(map).into_iter().map(|(k, _)| k).collect();
    (0..n).all(|i| keys.contains(&ip(block, i)))
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn start(&self, ttl: &str) -> Daemon {
        let (log, map, state) = (
            self.path("mail.log"),
            self.path("relay"),
            self.path("state"),
        );
        let d = Daemon::start(
            self.dir.path(),
            &[
                "--log",
                &log,
                "--map",
                &map,
                "--state-dir",
                &state,
                "--ttl",
                ttl,
            ],
        );
        d.wait_following(Path::new(&log));
        d
    }
}

#[test]
fn kill9_and_rotation_while_down_lose_nothing() {
    let s = Setup { dir: tempdir() };
    let log = s.dir.path().join("mail.log");
    let map = s.dir.path().join("relay");
    File::create(&log).unwrap();
    let mut d = s.start("1h");
    write_block(&log, 0, 200);
    wait_for("block 0 granted", PATIENCE, || all_granted(&map, 0, 200));
    d.kill9();
    assert!(
        std::fs::read_dir(s.dir.path().join("state/checkpoints"))
            .unwrap()
            .count()
            > 0,
        "a checkpoint was written"
    );

    // While down: more lines, then a rename rotation, then lines in the new file.
    write_block(&log, 1, 200);
    std::fs::rename(&log, s.dir.path().join("mail.log.1")).unwrap();
    write_block(&log, 2, 200);
    let mut d = s.start("1h");
    wait_for("blocks 1 and 2 granted after restart", PATIENCE, || {
        all_granted(&map, 1, 200) && all_granted(&map, 2, 200)
    });
    assert!(
        d.log().contains("reading the rest of a rotated file"),
        "{}",
        d.log()
    );

    // kill -9 in the middle of a stream of lines.
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for chunk in 0..20 {
                let mut text = String::new();
                for i in chunk * 10..chunk * 10 + 10 {
                    text.push_str(&login_line(&ip(3, i), "w"));
                }
                append(&log, &text);
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    // In the middle of the stream: the daemon has read some of it.
    wait_for("block 3 begun", PATIENCE, || {
        postmap_q(&map, &ip(3, 0)).is_some()
    });
    d.kill9();
    let mut d = s.start("1h");
    writer.join().unwrap();
    wait_for("block 3 granted across kill -9", PATIENCE, || {
        all_granted(&map, 3, 200)
    });
    assert_eq!(d.stop(), Some(0));

    // A clean restart reads nothing again: every login line was checkpointed. Once a line
    // written after the restart is granted, everything before it has been read.
    let mut d = s.start("1h");
    write_block(&log, 5, 1);
    wait_for("a line after the restart granted", PATIENCE, || {
        postmap_q(&map, &ip(5, 0)).is_some()
    });
    assert_eq!(d.stop(), Some(0));
    assert_eq!(d.summary("logins"), Some(1), "{}", d.log());
}

#[test]
fn expired_logins_are_not_granted_again_after_restart() {
    let s = Setup { dir: tempdir() };
    let log = s.dir.path().join("mail.log");
    let map = s.dir.path().join("relay");
    File::create(&log).unwrap();
    // A login from two hours ago grants nothing even with no checkpoint.
    let old = chrono::Local::now() - chrono::Duration::hours(2);
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(
        f,
        "{} mail dovecot: imap-login: Login: user=<old>, method=PLAIN, rip=203.0.113.99, lip=192.0.2.1, mpid=1, session=<a>",
        old.format("%b %e %H:%M:%S")
    )
    .unwrap();
    drop(f);
    let mut d = s.start("3s");
    write_block(&log, 4, 5);
    wait_for("fresh logins granted", PATIENCE, || all_granted(&map, 4, 5));
    assert_eq!(
        postmap_q(&map, "203.0.113.99"),
        None,
        "an old login never grants"
    );
    wait_for_scan("grants expired", &map, |keys| keys.is_empty());
    assert_eq!(d.stop(), Some(0));
    // Restart with no checkpoint at all: the file is read back only to now - ttl, and the
    // logins in it are past their time.
    std::fs::remove_dir_all(s.dir.path().join("state")).unwrap();
    // A fresh login written after the start is read after the old lines: once it is
    // granted, the old ones have been dealt with.
    let mut d = s.start("3s");
    write_block(&log, 6, 1);
    wait_for("a fresh login granted", PATIENCE, || {
        postmap_q(&map, &ip(6, 0)).is_some()
    });
    let keys: Vec<String> = postmap_s(&map).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![ip(6, 0)], "expired logins granted again");
    assert_eq!(d.stop(), Some(0));
}
