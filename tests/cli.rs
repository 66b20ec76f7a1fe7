//! The administrator's commands: lookup, list, grant, revoke, check-config, config.

mod common;

use common::*;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = dovegate(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grant_lookup_list_revoke() {
    let d = tempdir();
    let map = d.path().join("relay").display().to_string();
    // No map yet: a clear error, exit 2.
    let (code, _, err) = run(&["lookup", "--map", &map, "192.0.2.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("relay.lmdb"), "{err}");
    // The daemon creates the map; here a short run does it.
    let mut daemon = Daemon::start(
        d.path(),
        &[
            "--map",
            &map,
            "--log",
            &d.path().join("none.log").display().to_string(),
            "--state-dir",
            &d.path().join("s").display().to_string(),
        ],
    );
    wait_for("map created", PATIENCE, || {
        d.path().join("relay.lmdb").exists()
    });
    assert_eq!(daemon.stop(), Some(0));

    let (code, out, _) = run(&["grant", "--map", &map, "--ttl", "10m", "::FFFF:192.0.2.1"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("192.0.2.1\t20"), "{out}");
    let (code, _, _) = run(&["grant", "--map", &map, "2001:DB8:0:0:0:0:0:9"]);
    assert_eq!(code, Some(0));
    // Postfix finds both under their canonical keys.
    assert!(postmap_q(std::path::Path::new(&map), "192.0.2.1")
        .unwrap()
        .starts_with("OK expires="));
    assert!(postmap_q(std::path::Path::new(&map), "2001:db8::9").is_some());

    let (code, out, _) = run(&["lookup", "--map", &map, "[2001:db8::9]"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("OK expires="), "{out}");
    let (code, out, _) = run(&["lookup", "--map", &map, "192.0.2.2"]);
    assert_eq!((code, out.as_str()), (Some(1), ""));
    let (code, _, err) = run(&["lookup", "--map", &map, "not-an-ip"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not an IP address"));

    let (code, out, _) = run(&["list", "--map", &map, "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ips: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, vec!["192.0.2.1", "2001:db8::9"]);
    let (code, out, _) = run(&["list", "--map", &map]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().count() == 2 && out.contains("2001:db8::9\t20"),
        "{out}"
    );

    // Never loopback or link-local, even by hand.
    let (code, _, err) = run(&["grant", "--map", &map, "127.0.0.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("loopback"), "{err}");

    let (code, out, _) = run(&["revoke", "--map", &map, "192.0.2.1"]);
    assert_eq!((code, out.trim()), (Some(0), "revoked 192.0.2.1"));
    let (code, _, _) = run(&["revoke", "--map", &map, "192.0.2.1"]);
    assert_eq!(code, Some(1));
    assert_eq!(postmap_q(std::path::Path::new(&map), "192.0.2.1"), None);
}

#[test]
fn config_default_and_check_config() {
    let (code, default, _) = run(&["config", "--default"]);
    assert_eq!(code, Some(0));
    assert!(default.contains("[grant]") && default.contains("ttl = \"30m\""));
    let d = tempdir();
    let path = d.path().join("dovegate.toml");
    std::fs::write(&path, &default).unwrap();
    let (code, out, err) = run(&["check-config", "--config", &path.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("path = \"/var/lib/dovegate/relay\""), "{out}");
    // File mode warns that syslog lines can be forged; journal-only mode does not.
    let (_, _, err) = run(&["check-config", "--config", &path.display().to_string()]);
    assert!(err.contains("forge") && err.contains("journal"), "{err}");
    let postfix = d.path().join("postfix");
    std::fs::create_dir_all(&postfix).unwrap();
    std::fs::write(postfix.join("main.cf"), "compatibility_level = 3.6\n").unwrap();
    let journal_only = default
        .replace("journal = \"auto\"", "journal = true")
        .replace(
            "postfix_config_dir = \"\"",
            &format!("postfix_config_dir = \"{}\"", postfix.display()),
        );
    assert_ne!(journal_only, default);
    std::fs::write(&path, &journal_only).unwrap();
    let (code, _, err) = run(&["check-config", "--config", &path.display().to_string()]);
    assert_eq!(code, Some(0));
    assert!(!err.contains("warning"), "{err}");
    // --quiet (the unit's ExecStartPre and ExecReload): one line when all is well, no
    // configuration dump.
    let p = path.display().to_string();
    let (code, out, err) = run(&["check-config", "--quiet", "--config", &p]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "", "no configuration on stdout");
    assert_eq!(
        err,
        format!("dovegate: configuration {p}: ok\n"),
        "one line when all is well"
    );
    // An error: the error and a summary, still no dump, exit 2.
    std::fs::write(
        &path,
        journal_only.replace(
            "logs = []",
            &format!("logs = [{:?}]", d.path().display().to_string()),
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["check-config", "--quiet", "--config", &p]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(out, "");
    assert!(
        err.contains("is not a regular file") && err.contains(": 1 error(s)"),
        "{err}"
    );
    std::fs::write(&path, &default).unwrap();
    // Flags override the file.
    let (code, out, _) = run(&[
        "check-config",
        "--config",
        &path.display().to_string(),
        "--map",
        "/srv/relay",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("path = \"/srv/relay\""));
}

fn test_json(args: &[&str], stdin: Option<&[u8]>) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = std::process::Command::new(bin())
        .arg("test")
        .arg("--json")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn test_command_reads_plain_gzip_and_stdin() {
    let d = tempdir();
    let rig = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/rig/sample-syslog-rfc3339.log");
    let text = std::fs::read(&rig).unwrap();
    let gz = d.path().join("mail.log.gz");
    {
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut e, &text).unwrap();
        e.finish().unwrap();
    }
    let plain = test_json(&[&rig.display().to_string()], None);
    let zipped = test_json(&[&gz.display().to_string()], None);
    let piped = test_json(&["-"], Some(&text));
    assert_eq!(
        plain.len(),
        text.iter().filter(|&&b| b == b'\n').count(),
        "one object per line"
    );
    let logins = |v: &[serde_json::Value]| v.iter().filter(|o| o["matched"] == true).count();
    assert!(logins(&plain) > 5);
    assert_eq!(logins(&plain), logins(&zipped));
    assert_eq!(logins(&plain), logins(&piped));
    // Line numbers restart in each file; a last line without newline still counts.
    let two = test_json(
        &[&rig.display().to_string(), "-"],
        Some(b"imap-login: Login: user=<a>, rip=203.0.113.9, mpid=1, session=<s>"),
    );
    let last = two.last().unwrap();
    assert_eq!(
        (
            last["file"].as_str(),
            last["line"].as_u64(),
            last["ip"].as_str()
        ),
        (Some("-"), Some(1), Some("203.0.113.9"))
    );
    assert!(last["excluded"].is_null() && last["time"].is_null());
    assert_eq!(last["pattern"], "dovecot-2.2");
    // An unreadable file: clear message, non-zero exit.
    let (code, _, err) = run(&["test", "/nonexistent/mail.log"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/mail.log"), "{err}");
}

#[test]
fn test_command_uses_a_pattern_directory() {
    let d = tempdir();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("patterns");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "dovecot-2.4.toml" {
            std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
        }
    }
    let line: &[u8] = b"imap-login: Logged in: user=<a>, method=PLAIN, rip=203.0.113.9, lip=1.1.1.1, mpid=1, session=<s>\n";
    let embedded = test_json(&["-"], Some(line));
    assert_eq!(embedded[0]["pattern"], "dovecot-2.4");
    let without = test_json(
        &["--patterns", &d.path().display().to_string(), "-"],
        Some(line),
    );
    assert_eq!(without[0]["matched"], false);
    // A broken pattern file is named, exit 2.
    std::fs::write(d.path().join("broken.toml"), "id = 3\n").unwrap();
    let (code, _, err) = run(&["test", "--patterns", &d.path().display().to_string(), "-"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("broken.toml"), "{err}");
}

/// Runs `dovegate ARGS`, reads the first line of its stdout, then closes the pipe (as
/// `| head -1` does); returns that line, the exit status and stderr.
fn first_line_then_close(args: &[&str]) -> (String, std::process::ExitStatus, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    let o = child.wait_with_output().unwrap();
    (
        first,
        o.status,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Defect 18: `dovegate list | head -1` and `dovegate test FILE | head` end quietly (exit 0
/// or SIGPIPE's default), never with a panic (exit 101).
#[test]
fn a_closed_stdout_ends_printing_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempdir();
    let log = d.path().join("mail.log");
    // Enough output to overflow a pipe's buffer (64 KiB) many times.
    let text: String = (0..3000)
        .map(|i| login_line(&format!("198.18.{}.{}", i / 250, 1 + i % 250), "u"))
        .collect();
    std::fs::write(&log, &text).unwrap();
    let quiet =
        |st: std::process::ExitStatus| st.code() == Some(0) || st.signal() == Some(libc::SIGPIPE);
    let logs = log.display().to_string();
    for args in [
        vec!["test", "--json", &logs],
        vec!["test", "--print-missed", &logs, &logs, &logs],
    ] {
        let (first, st, err) = first_line_then_close(&args);
        assert!(!first.is_empty(), "{args:?}");
        assert!(
            quiet(st) && !err.contains("panicked"),
            "{args:?}: {st:?} {err}"
        );
    }
    let mut daemon = Daemon::follow(d.path(), &log, &[]);
    let map = d.path().join("relay");
    wait_for("3000 grants", PATIENCE, || postmap_s(&map).len() == 3000);
    assert_eq!(daemon.stop(), Some(0));
    let (first, st, err) = first_line_then_close(&["list", "--map", &map.display().to_string()]);
    assert!(first.starts_with("198.18."), "{first}");
    assert!(quiet(st) && !err.contains("panicked"), "{st:?} {err}");
}

/// `grant.exclude_mynetworks` is honoured by `grant` and `test` as by `run`: one place
/// builds the policy. Postfix's configuration comes from MAIL_CONFIG (a private main.cf).
#[test]
fn every_command_excludes_mynetworks() {
    let d = tempdir();
    let pf = d.path().join("postfix");
    std::fs::create_dir_all(&pf).unwrap();
    std::fs::write(
        pf.join("main.cf"),
        "compatibility_level = 3.6\nmynetworks = 127.0.0.0/8 198.51.100.0/24\n",
    )
    .unwrap();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[grant]\nexclude_mynetworks = true\n[map]\npath = {:?}\n",
            d.path().join("relay").display().to_string()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let with_pf = |args: &[&str], stdin: Option<&[u8]>| {
        use std::io::Write;
        let mut c = std::process::Command::new(bin())
            .args(args)
            .env("MAIL_CONFIG", &pf)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or_default()).unwrap();
        drop(input);
        c.wait_with_output().unwrap()
    };
    assert!(with_pf(&["init", "--config", &conf], None).status.success());
    let refused = with_pf(&["grant", "--config", &conf, "198.51.100.7"], None);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("198.51.100.0/24"));
    assert!(with_pf(&["grant", "--config", &conf, "203.0.113.7"], None)
        .status
        .success());
    let out = with_pf(
        &["test", "--config", &conf, "--json", "-"],
        Some(b"imap-login: Login: user=<a>, rip=198.51.100.7, mpid=1, session=<s>\n"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["excluded"], "excluded network 198.51.100.0/24", "{v}");
}

/// Defect 6: a followed file's lines without a timestamp never grant (re-reading the file
/// would revive its whole history), unless `source.untimed_lines_grant` says the source
/// has no timestamps; the refusal is counted.
#[test]
fn untimed_lines_grant_only_when_configured() {
    for allowed in [false, true] {
        let d = tempdir();
        let log = d.path().join("dovecot.log");
        let conf = d.path().join("dovegate.toml");
        std::fs::write(
            &conf,
            format!("[source]\nuntimed_lines_grant = {allowed}\n"),
        )
        .unwrap();
        std::fs::write(&log, "").unwrap();
        let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf.display().to_string()]);
        let map = d.path().join("relay");
        // A file met with no timestamp in it is started at its end: let the follower take
        // its position (a first timed login granted) before the untimed line comes.
        append(&log, &login_line("203.0.113.69", "first"));
        wait_for("the first grant", PATIENCE, || {
            postmap_q(&map, "203.0.113.69").is_some()
        });
        append(
            &log,
            "imap-login: Login: user=<old>, method=PLAIN, rip=203.0.113.70, lip=192.0.2.1, mpid=1, session=<a>\n",
        );
        append(&log, &login_line("203.0.113.71", "new"));
        wait_for("the timed line's grant", PATIENCE, || {
            postmap_q(&map, "203.0.113.71").is_some()
        });
        assert_eq!(
            postmap_q(&map, "203.0.113.70").is_some(),
            allowed,
            "untimed_lines_grant = {allowed}"
        );
        assert_eq!(daemon.stop(), Some(0));
        assert_eq!(
            daemon.summary("untimed"),
            Some(u64::from(!allowed)),
            "{}",
            daemon.log()
        );
    }
}

/// Issue 9: messages an administrator reads are in words, never Rust's Debug output
/// (`Valid(192.0.2.99)`, `Since(1795693923)`, `Some(ExitStatus(...))`).
#[test]
fn daemon_log_has_no_debug_output() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    append(&log, "");
    // Not a journal: journalctl exits with an error, and the daemon says how.
    let journal = d.path().join("missing.journal");
    let (logp, jp) = (log.display().to_string(), journal.display().to_string());
    let mut daemon = Daemon::with_map(d.path(), &["--log", &logp, "--journal-file", &jp]);
    append(&log, &login_line("198.423.11.235", "mallory"));
    append(&log, &login_line("192.0.2.99", "alice"));
    wait_for("grant", PATIENCE, || {
        postmap_q(&d.path().join("relay"), "192.0.2.99").is_some()
    });
    wait_for("invalid address warning", PATIENCE, || {
        daemon.log().contains("invalid client address")
    });
    wait_for("journalctl exit reported", PATIENCE, || {
        daemon.log().contains("journalctl exited")
    });
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    let text = daemon.log();
    for wanted in [
        "ip=198.423.11.235",
        "following the journal",
        "start=since 20",
        "logs=",
        "dovegate stopped",
    ] {
        assert!(text.contains(wanted), "missing {wanted}:\n{text}");
    }
    for debug in [
        "Valid(",
        "Since(",
        "Some(",
        "Unix(",
        "AfterCursor(",
        "Invalid(",
        "[\"",
    ] {
        assert!(!text.contains(debug), "Debug output {debug} in:\n{text}");
    }
}

/// `test --grants`: each canonical address once, its logins, in the order of its text.
#[test]
fn test_grants_lists_canonical_addresses_in_order() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let mut text = String::new();
    for (ip, user) in [
        ("203.0.113.9", "a"),
        ("::ffff:198.51.100.4", "b"),
        ("2001:DB8::7", "c"),
        ("198.51.100.4", "d"),
        ("203.0.113.9", "e"),
    ] {
        text.push_str(&sessionless_login_line(ip, user));
    }
    std::fs::write(&log, text).unwrap();
    let (code, out, err) = run(&["test", "--grants", &log.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<(&str, &str)> = out
        .lines()
        .skip_while(|l| !l.starts_with("Addresses granted"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let mut f = l.trim().split('\t');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("198.51.100.4", "2"),
            ("2001:db8::7", "1"),
            ("203.0.113.9", "2")
        ],
        "{out}"
    );
}

/// Issue 26: `dovegate config` prints the configuration in force (every key, the file's
/// values over the defaults), taking --config and --map like every command.
#[test]
fn config_prints_the_configuration_in_force() {
    let d = tempdir();
    let path = d.path().join("dovegate.toml");
    std::fs::write(&path, "[grant]\nttl = \"45m\"\n").unwrap();
    let p = path.display().to_string();
    let (code, out, err) = run(&["config", "--config", &p]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ttl = \"45m\""), "{out}");
    assert!(
        out.contains("[map]") && out.contains("path = \"/var/lib/dovegate/relay\""),
        "{out}"
    );
    assert!(err.contains(&format!("configuration {p}")), "{err}");
    // Valid TOML on stdout.
    assert!(out.parse::<toml::Table>().is_ok(), "{out}");
    let (code, out, _) = run(&["config", "--config", &p, "--map", "/srv/relay"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("path = \"/srv/relay\""), "{out}");
    // --default prints the embedded file and reads none: no --config with it.
    let (code, _, err) = run(&["config", "--default", "--config", &p]);
    assert_eq!(code, Some(2), "{err}");
    std::fs::write(&path, "[grant]\nttl = \"soon\"\n").unwrap();
    let (code, out, err) = run(&["config", "--config", &p]);
    assert_eq!(code, Some(2));
    assert_eq!(out, "");
    assert!(err.contains(&format!("{p}:2:")), "{err}");
}

/// A wrong `--map` is blamed on the option, for every command that takes it, not on the
/// configuration whose map.path it replaces (issue 26: "embedded default config:69:1").
#[test]
fn a_wrong_map_option_is_blamed_on_the_option() {
    for cmd in ["list", "status", "run", "replica", "init", "check-config"] {
        for (bad, why) in [
            ("relative/relay", "must be an absolute path"),
            ("/var/lib/dovegate/relay.lmdb", "without `.lmdb`"),
        ] {
            let (code, _, err) = run(&[cmd, "--map", bad]);
            assert_eq!(code, Some(2), "{cmd} --map {bad}: {err}");
            assert!(
                err.contains(&format!("'{bad}' for '--map <PATH>'")) && err.contains(why),
                "{cmd} --map {bad}: {err}"
            );
            assert!(!err.contains("config:"), "{cmd} --map {bad}: {err}");
        }
    }
}

/// `dovegate test` counts over-long lines (longer than source.max_line_bytes, or even
/// than the read buffer) as lines and prints how many were too long; line numbers after
/// them stay right (issue 26).
#[test]
fn test_command_counts_over_long_lines() {
    let d = tempdir();
    let log = d.path().join("long.log");
    let login = "2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<a>, rip=203.0.113.5, lip=192.0.2.1\n";
    let mut text = String::new();
    text.push_str(login);
    text.push_str(&"x".repeat(20_000)); // beyond max_line_bytes (16384), within the buffer
    text.push('\n');
    text.push_str(login);
    text.push_str(&"imap-login: ".repeat(250_000)); // 3 MB: beyond the read buffer
    text.push('\n');
    text.push_str(&login.replace("203.0.113.5", "203.0.113.6"));
    std::fs::write(&log, text).unwrap();
    let path = log.display().to_string();
    let (code, out, err) = run(&["test", &path]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Lines: 5 lines, 3 matched, 2 missed"), "{out}");
    assert!(
        out.contains("Too long (skipped, source.max_line_bytes): 2"),
        "{out}"
    );
    let lines = test_json(&[&path], None);
    let long: Vec<u64> = lines
        .iter()
        .filter(|o| o["too_long"] == true)
        .map(|o| o["line"].as_u64().unwrap())
        .collect();
    assert_eq!(long, [2, 4]);
    let last = lines.last().unwrap();
    assert_eq!(
        (last["line"].as_u64(), last["ip"].as_str()),
        (Some(5), Some("203.0.113.6"))
    );
}

/// `dovegate init` on an existing map succeeds for a user who may read it but not write
/// it (run as nobody), and changes nothing; a missing map it cannot create is an error
/// (issue 26: "creates ... if missing").
#[test]
fn init_on_an_existing_map_needs_only_read_access() {
    use std::os::unix::process::CommandExt;
    let d = tempdir();
    set_mode(d.path(), 0o755);
    let map = d.path().join("relay");
    let state = d.path().join("state");
    let m = map.display().to_string();
    let cfg = d.path().join("dovegate.toml");
    std::fs::write(&cfg, format!("[state]\ndir = \"{}\"\n", state.display())).unwrap();
    set_mode(&cfg, 0o644);
    let c = cfg.display().to_string();
    let (code, out, err) = run(&["init", "--config", &c, "--map", &m]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("{m}.lmdb"));
    let file = d.path().join("relay.lmdb");
    set_mode(&file, 0o644);
    let before = std::fs::read(&file).unwrap();
    let as_nobody = |map: &str| {
        std::process::Command::new(bin())
            .uid(65534)
            .gid(65534)
            .args(["init", "--config", &c, "--map", map])
            .output()
            .unwrap()
    };
    let out = as_nobody(&m);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{m}.lmdb")
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "unchanged");
    // A missing map in a directory nobody may write: init cannot create it, and says so.
    let out = as_nobody(&d.path().join("other").display().to_string());
    assert!(!out.status.success());
    assert!(!d.path().join("other.lmdb").exists());
}
