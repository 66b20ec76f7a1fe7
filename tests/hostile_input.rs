//! Forged and odd input grants nothing, never crashes or stalls the daemon, and memory
//! stays bounded. Bad configuration is refused with a clear message and exit 2.

mod common;

use std::fs::File;
use std::io::Write;

use common::*;

#[test]
fn garbage_forgeries_and_huge_lines_grant_nothing() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    File::create(&log).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    let ts = bsd_now();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let mut hostile: Vec<Vec<u8>> = vec![
        // Forged rip inside the user name, in several shapes.
        format!("{ts} mail dovecot: imap-login: Login: user=<x, rip=6.6.6.1>, method=PLAIN, rip=192.0.2.7, lip=10.0.0.1, mpid=1, session=<a>").into_bytes(),
        format!("{ts} mail dovecot: imap-login: Login: user=<x, rip=6.6.6.2, y>, method=PLAIN, lip=10.0.0.1, mpid=1, session=<a>").into_bytes(),
        format!("{ts} mail dovecot: imap-login: Login: user=<x, rip=6.6.6.3>").into_bytes(),
        format!("{ts} mail dovecot: imap-login: Login: user=<x>, rip=6.6.6.12, y>, method=PLAIN, rip=198.51.100.77, lip=10.0.0.1, mpid=1, session=<a>").into_bytes(),
        // Another program's line carrying Dovecot's text.
        format!("{ts} mail sshd[12]: imap-login: Login: user=<a>, method=PLAIN, rip=6.6.6.4, lip=1.1.1.1, mpid=1, session=<a>").into_bytes(),
        format!("{ts} mail postfix/smtpd[3]: NOQUEUE: reject: RCPT from x[1.2.3.4]: helo=<dovecot: imap-login: Login: user=<a>, rip=6.6.6.5, mpid=1, session=<a>>").into_bytes(),
        // Near misses.
        format!("{ts} mail dovecot: imap-login: Login failed: Plaintext authentication disabled: user=<>, rip=6.6.6.6, lip=1.1.1.1, session=<a>").into_bytes(),
        format!("{ts} mail dovecot: imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<a>, method=PLAIN, rip=6.6.6.7, lip=1.1.1.1, TLS, session=<a>").into_bytes(),
        format!("{ts} mail dovecot: imap-login: Login aborted: Connection closed (auth_failed): user=<a>, method=PLAIN, rip=6.6.6.8, lip=1.1.1.1, session=<a>").into_bytes(),
        // Invalid addresses.
        format!("{ts} mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=198.423.11.235, lip=1.1.1.1, mpid=1, session=<a>").into_bytes(),
        format!("{ts} mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=unknown, lip=1.1.1.1, mpid=1, session=<a>").into_bytes(),
        // Backtracking bait.
        format!("{ts} mail dovecot: imap-login: Disconnected: {}test no match", "a: ".repeat(5000)).into_bytes(),
        format!("{ts} mail dovecot: imap-login: Login: {}", "user=<, ".repeat(1500)).into_bytes(),
        // NUL bytes and invalid UTF-8 around a forged login.
        [format!("{ts} mail dovecot: imap-login: Login: user=<\0").into_bytes(), b"\xff\xfe, rip=6.6.6.9>, rip=6.6.6.10\x00, lip=1.1.1.1, mpid=1, session=<a>".to_vec()].concat(),
        b"\x00\x00\x00\xff\xfe garbage \x1b[31m imap-login: \xc3\x28".to_vec(),
    ];
    for _ in 0..200 {
        hostile.push((0..200).map(|i| (i * 37 % 256) as u8).collect());
    }
    for line in &hostile {
        f.write_all(line).unwrap();
        f.write_all(b"\n").unwrap();
    }
    // A 10 MiB line without newline, then its end, then a real login.
    let big = vec![b'A'; 10 << 20];
    f.write_all(format!("{ts} mail dovecot: imap-login: Login: user=<").as_bytes())
        .unwrap();
    f.write_all(&big).unwrap();
    f.flush().unwrap();
    // The daemon is inside the huge line (dropping it) before its end arrives.
    wait_for("the huge line dropped", PATIENCE, || {
        daemon.log().contains("longer than")
    });
    f.write_all(b">, method=PLAIN, rip=6.6.6.11, lip=1.1.1.1, mpid=1, session=<a>\n")
        .unwrap();
    f.write_all(login_line("203.0.113.200", "real").as_bytes())
        .unwrap();
    drop(f);

    // The daemon is neither dead nor stalled: the real login after all that is granted.
    wait_for("real login granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.200").is_some()
    });
    let mut keys: Vec<String> = postmap_s(&map).into_iter().map(|(k, _)| k).collect();
    keys.sort();
    // The first forged line is a real login from 192.0.2.7 whose user name holds a forged
    // rip: the real address is granted, no forged one ever is.
    assert_eq!(
        keys,
        vec!["192.0.2.7".to_string(), "203.0.113.200".to_string()]
    );
    let rss = daemon.peak_rss_kib();
    assert!(
        rss > 0 && rss < 64 * 1024,
        "peak RSS {rss} KiB: memory not bounded"
    );
    assert_eq!(daemon.stop(), Some(0));
    let log_text = daemon.log();
    assert!(log_text.contains("invalid client address"), "{log_text}");
    assert!(log_text.contains("conflicting rip="), "{log_text}");
    assert!(log_text.contains("longer than"), "{log_text}");
}

/// Issue 17: a first start while a huge line is being written (no timestamp in the file's
/// last bytes) began at the end and lost the timed login before it.
#[test]
fn first_start_mid_huge_line_reads_the_logins_before_it() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let ts = bsd_now();
    let head = format!("{ts} mail dovecot: imap-login: Login: user=<");
    let text = [login_line("192.0.2.8", "before"), head, "A".repeat(1 << 20)].concat();
    std::fs::write(&log, text).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    append(
        &log,
        &format!(">, rip=6.6.6.13\n{}", login_line("203.0.113.201", "after")),
    );
    wait_for("the login after the huge line granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.201").is_some()
    });
    assert!(postmap_q(&map, "192.0.2.8").is_some(), "{}", daemon.log());
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let d = tempdir();
    let cases: &[(&str, &str)] = &[
        ("[grant]\nttl = \"forever\"\n", "grant.ttl"),
        ("[grant]\nexclude = [\"10.0.0.0/33\"]\n", "grant.exclude[0]"),
        ("[grant]\ntll = \"5m\"\n", "tll"),
        ("[map]\npath = \"/x/relay.lmdb\"\n", "map.path"),
        (
            "[source]\nsyslog_idents = [\"dove cot\"]\n",
            "source.syslog_idents[0]",
        ),
        (
            "[patterns]\nservices = [\"smtp\"]\n",
            "patterns.services[0]",
        ),
        (
            "[patterns]\nenable = [\"no-such-pattern\"]\n",
            "patterns.enable",
        ),
        ("not toml at all [", "dovegate.toml"),
    ];
    let default = String::from_utf8(dovegate(&["config", "--default"]).stdout).unwrap();
    for (i, (edit, key)) in cases.iter().enumerate() {
        let path = d.path().join(format!("c{i}/dovegate.toml"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Replace the section the edit names, keeping the rest of the default.
        let text = merge(&default, edit);
        std::fs::write(&path, text).unwrap();
        for cmd in ["check-config", "run"] {
            let out = dovegate(&[cmd, "--config", &path.display().to_string()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} with {edit:?}: {err}");
            assert!(
                err.contains(key),
                "{cmd} with {edit:?} should name {key}: {err}"
            );
        }
    }
    let out = dovegate(&["check-config", "--config", "/nonexistent/dovegate.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dovegate.toml"));
    let out = dovegate(&["run", "--ttl", "0s", "--map", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The default config with the keys of `edit` set (a tiny TOML merge for tests).
fn merge(default: &str, edit: &str) -> String {
    if !edit.starts_with('[') {
        return edit.to_string();
    }
    let mut doc: toml::Table = default.parse().unwrap();
    let patch: toml::Table = edit.parse().unwrap();
    for (section, table) in patch {
        let target = doc
            .get_mut(&section)
            .and_then(|v| v.as_table_mut())
            .unwrap();
        for (k, v) in table.as_table().unwrap() {
            target.insert(k.clone(), v.clone());
        }
    }
    toml::to_string(&doc).unwrap()
}

/// Defect 10: a FIFO beside the log (opened blocking, it would hang the source thread when
/// the follower looks for a copytruncate copy) and special files as the log path (a
/// directory or /dev/zero: an error naming the fix, no endless reading).
#[test]
fn special_files_never_block_or_spin() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    let fifo = std::ffi::CString::new(format!("{}/aaa.fifo", d.path().display())).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    File::create(&log).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "1h"]);
    append(&log, &login_line("203.0.113.31", "a"));
    wait_for("first login granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.31").is_some()
    });
    // A truncation without a copy: the follower looks at every sibling for one.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, &login_line("203.0.113.30", "z"));
    wait_for("the login after a truncation granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.30").is_some()
    });
    // copytruncate: the follower searches the directory for the copy.
    append(&log, &login_line("203.0.113.32", "b"));
    std::fs::copy(&log, d.path().join("mail.log.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, &login_line("203.0.113.33", "c"));
    wait_for("logins around the copytruncate granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.32").is_some() && postmap_q(&map, "203.0.113.33").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));

    for (i, path) in [d.path().display().to_string(), "/dev/zero".to_string()]
        .iter()
        .enumerate()
    {
        // Refused at start (exit 2), naming the path; a path that turns special later is
        // an error the follower reports without reading (src/source/tailer tests).
        let sub = d.path().join(format!("special{i}"));
        std::fs::create_dir(&sub).unwrap();
        let out = dovegate(&[
            "run",
            "--log",
            path,
            "--map",
            &sub.join("relay").display().to_string(),
            "--state-dir",
            &sub.join("state").display().to_string(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("not a regular file") && err.contains(path.as_str()),
            "{err}"
        );
    }
}
