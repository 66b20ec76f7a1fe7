//! Which configuration every command reads, and how problems in it are reported.

mod common;

use common::*;
use std::process::Command;

fn dovegate_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("DOVEGATE_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run dovegate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn lookup_order_flag_then_environment_then_etc() {
    let d = tempdir();
    let env_conf = d.path().join("env.toml");
    std::fs::write(&env_conf, "[map]\npath = \"/srv/from-env/relay\"\n").unwrap();
    let flag_conf = d.path().join("flag.toml");
    std::fs::write(&flag_conf, "[map]\npath = \"/srv/from-flag/relay\"\n").unwrap();
    let env = [("DOVEGATE_CONFIG", env_conf.to_str().unwrap())];
    let cmd = "check-config";
    let out = dovegate_env(&[cmd], &env);
    assert!(
        text(&out.stdout).contains("/srv/from-env/relay"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains(env_conf.to_str().unwrap()));
    let flag = flag_conf.to_str().unwrap();
    let out = dovegate_env(&[cmd, "--config", flag], &env);
    assert!(text(&out.stdout).contains("/srv/from-flag/relay"));
    // Every map command reads it too: `lookup` names the map it was told about.
    let out = dovegate_env(&["lookup", "192.0.2.1"], &env);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/srv/from-env/relay.lmdb"),
        "{}",
        text(&out.stderr)
    );
    // A named file that does not exist is an error, never a silent fallback.
    let out = dovegate_env(
        &["check-config"],
        &[("DOVEGATE_CONFIG", "/nonexistent/x.toml")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/x.toml"));
}

/// /etc/dovegate/dovegate.toml is read when it exists: shown in a private mount namespace,
/// so the machine's /etc stays untouched.
#[test]
fn etc_file_is_read_when_present() {
    if !std::path::Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: no unshare");
        return;
    }
    let d = tempdir();
    // /etc seen through an overlay whose upper layer (a tmpfs) holds dovegate/: the host's
    // /etc gets no directory, not even for a moment.
    let script = format!(
        "mount -t tmpfs dgetc {d} && mkdir -p {d}/upper/dovegate {d}/work \
         && printf '[grant]\\nttl = \"7m\"\\n' > {d}/upper/dovegate/dovegate.toml \
         && mount -t overlay dgetc -o lowerdir=/etc,upperdir={d}/upper,workdir={d}/work /etc \
         && exec {} check-config",
        bin(),
        d = d.path().display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("DOVEGATE_CONFIG")
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("ttl = \"7m\""),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("/etc/dovegate/dovegate.toml"));
}

#[test]
fn problems_name_file_line_column_one_line_each() {
    let d = tempdir();
    let path = d.path().join("dovegate.toml");
    std::fs::write(
        &path,
        "[grant]\nttl = \"30m\"\ntll = \"5m\"\n\n[map]\naction = \"PERMT\"\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let out = dovegate_env(&["check-config", "--config", &p], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        vec![format!(
            "dovegate: {p}:3:1: grant.tll: unknown key (did you mean ttl?)"
        )]
    );
    std::fs::write(&path, "[map]\naction = \"PERMT\"\n").unwrap();
    let err = text(&dovegate_env(&["check-config", "--config", &p], &[]).stderr);
    assert!(
        err.starts_with(&format!("dovegate: {p}:2:1: map.action: ")),
        "{err}"
    );
    assert!(err.contains("OK or RELAY"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // run refuses the same file the same way.
    let out = dovegate_env(&["run", "--config", &p], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("map.action"));
}

#[test]
fn check_config_checks_log_files_as_the_service_user() {
    let d = tempdir();
    let log = d.path().join("dovecot.log");
    std::fs::write(&log, "x\n").unwrap();
    set_mode(&log, 0o600);
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\njournal = false\nlogs = [\"{}\"]\n",
            log.display()
        ),
    )
    .unwrap();
    let c = conf.display().to_string();
    let out = dovegate_env(&["check-config", "--config", &c, "--user", "nobody"], &[]);
    let err = text(&out.stderr);
    assert!(
        err.contains("is not readable by user nobody") && err.contains("mode 0600"),
        "{err}"
    );
    // The only source, unreadable: an error (the unit's ExecStartPre/ExecReload refuse it).
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no other source"), "{err}");
    // Issue 26: a root-group log is not fixed by joining group root.
    let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&log).unwrap());
    if gid == 0 {
        assert!(
            err.contains("chgrp adm") && !err.contains("adduser nobody root"),
            "{err}"
        );
    }
    // With the journal beside it, the same file is a warning.
    std::fs::write(
        &conf,
        format!("[source]\njournal = true\nlogs = [\"{}\"]\n", log.display()),
    )
    .unwrap();
    let out = dovegate_env(&["check-config", "--config", &c, "--user", "nobody"], &[]);
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: source.logs:") && err.contains("is not readable by user nobody"),
        "{err}"
    );
    assert!(!err.contains("no other source"), "{err}");
    // A directory where a log file should be: refused.
    std::fs::write(
        &conf,
        format!(
            "[source]\njournal = false\nlogs = [\"{}\"]\n",
            d.path().display()
        ),
    )
    .unwrap();
    let out = dovegate_env(&["check-config", "--config", &c], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a regular file"),
        "{}",
        text(&out.stderr)
    );
    // Missing: says where Dovecot logs and suggests the journal.
    std::fs::write(
        &conf,
        "[source]\njournal = false\nlogs = [\"/nonexistent/dovecot.log\"]\n",
    )
    .unwrap();
    let err = text(&dovegate_env(&["check-config", "--config", &c], &[]).stderr);
    assert!(
        err.contains("does not exist") && err.contains("journal"),
        "{err}"
    );
}

#[test]
fn exclude_mynetworks_uses_the_named_postfix_directory() {
    let d = tempdir();
    let postfix = d.path().join("postfix-out");
    std::fs::create_dir_all(&postfix).unwrap();
    std::fs::write(
        postfix.join("main.cf"),
        "compatibility_level = 3.6\nmynetworks = 192.0.2.0/24 [::ffff:198.51.100.0]/120\n",
    )
    .unwrap();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[grant]\nexclude_mynetworks = true\npostfix_config_dir = \"{}\"\n",
            postfix.display()
        ),
    )
    .unwrap();
    let c = conf.display().to_string();
    let out = dovegate_env(&["check-config", "--config", &c], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A directory Postfix has no configuration in: the same error from check-config and run.
    std::fs::write(
        &conf,
        format!(
            "[grant]\nexclude_mynetworks = true\npostfix_config_dir = \"{}\"\n",
            d.path().join("nope").display()
        ),
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let out = dovegate_env(&[cmd, "--config", &c, "--map", "/tmp/dg-unused-map"], &[]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("postconf -c"),
            "{cmd}: {}",
            text(&out.stderr)
        );
        // Postfix says main.cf is missing: the hint names the key that points elsewhere.
        assert!(
            text(&out.stderr).contains("with grant.postfix_config_dir"),
            "{cmd}: {}",
            text(&out.stderr)
        );
    }
}

/// A directory holding a fake `doveconf` that answers `log_path` as `log_path = ` the
/// contents of `DIR/log_path` (and an empty info_log_path), and refuses `-h` as Dovecot
/// 2.4 does for log_path; and the PATH that puts it first.
/// Why a fake: what is checked is how dovegate reads doveconf's answer; a real Dovecot
/// configured with a log file would need root-owned /etc/dovecot changes on the test
/// machine.
fn fake_doveconf(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let fake = bin_dir.join("doveconf");
    let answer = dir.join("log_path");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  -h) echo 'doveconf: Fatal: Multiple settings matched with -h parameter' >&2; exit 89 ;;\n  log_path) printf 'log_path = %s\\n' \"$(cat {})\" ;;\n  info_log_path) echo 'info_log_path = ' ;;\n  *) exit 1 ;;\nesac\n",
            answer.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (answer, path)
}

/// Journal mode while Dovecot writes its own log file: check-config says so, with the fix.
#[test]
fn check_config_warns_when_dovecot_logs_to_its_own_file_in_journal_mode() {
    let d = tempdir();
    let (answer, path) = fake_doveconf(d.path());
    let conf = d.path().join("dovegate.toml");
    let c = conf.display().to_string();
    let check = |config: &str, log_path: &str| {
        std::fs::write(&conf, config).unwrap();
        std::fs::write(&answer, format!("{log_path}\n")).unwrap();
        let out = dovegate_env(
            &[
                "check-config",
                "--config",
                &c,
                "--map",
                "/tmp/dg-unused-map",
            ],
            &[("PATH", &path)],
        );
        text(&out.stderr)
    };
    let journal = "[source]\njournal = true\n";
    let err = check(journal, "/var/log/dovecot.log");
    assert!(
        err.contains("Dovecot logs to /var/log/dovecot.log, not the journal")
            && err.contains("source.logs = [\"/var/log/dovecot.log\"]")
            && err.contains("log_path = syslog"),
        "{err}"
    );
    // Syslog reaches the journal; a followed file is seen: no warning.
    let err = check(journal, "syslog");
    assert!(!err.contains("not the journal"), "{err}");
    let both = "[source]\njournal = true\nlogs = [\"/var/log/dovecot.log\"]\n";
    let err = check(both, "/var/log/dovecot.log");
    assert!(!err.contains("not the journal"), "{err}");
    // Not in journal mode: the file is followed, nothing to say about the journal.
    let files = "[source]\njournal = false\nlogs = [\"/var/log/dovecot.log\"]\n";
    let err = check(files, "/var/log/dovecot.log");
    assert!(!err.contains("not the journal"), "{err}");
}

/// `run` in journal mode says the same at start-up (it would otherwise run granting nothing).
#[test]
fn run_warns_at_start_when_dovecot_logs_to_its_own_file_in_journal_mode() {
    let d = tempdir();
    let (answer, path) = fake_doveconf(d.path());
    std::fs::write(&answer, "/var/log/dovecot.log\n").unwrap();
    let journal_dir = d.path().join("journal");
    std::fs::create_dir_all(&journal_dir).unwrap();
    let stderr = d.path().join("run.stderr");
    let child = Command::new(bin())
        .args([
            "run",
            "--journal-dir",
            &journal_dir.display().to_string(),
            "--map",
            &d.path().join("relay").display().to_string(),
            "--state-dir",
            &d.path().join("state").display().to_string(),
        ])
        .env_remove("DOVEGATE_CONFIG")
        .env("PATH", &path)
        .env("DOVEGATE_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // SIGTERM on drop, also when an assertion fails.
    let mut daemon = Daemon { child, stderr };
    wait_for("start-up warning", PATIENCE, || {
        daemon
            .log()
            .contains("Dovecot logs to /var/log/dovecot.log, not the journal")
    });
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

/// Runs `dovegate ARGS` and fails the test (killing it) if it has not ended within `limit`.
fn dovegate_within(args: &[&str], limit: std::time::Duration) -> std::process::Output {
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("DOVEGATE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dovegate");
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dovegate {args:?} still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A configuration at /dev/zero ran out of memory; a FIFO blocked every command forever.
#[test]
fn a_configuration_that_is_not_a_regular_file_is_refused_promptly() {
    let d = tempdir();
    let fifo = d.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let zero = d.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for (path, kind) in [(&fifo, "FIFO"), (&zero, "character device")] {
        let out = dovegate_within(
            &["check-config", "--config", path.to_str().unwrap()],
            PATIENCE,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert!(
            err.contains(&format!("is a {kind}, not a regular file")),
            "{err}"
        );
    }
}

/// Issue 26: `dovegate.d/*.toml` beside the configuration file are read after it in name
/// order (a later key wins, key by key); check-config and config name them; a problem in
/// one names that drop-in and its line.
#[test]
fn dropins_beside_the_file_are_read_in_order() {
    let d = tempdir();
    let conf = d.path().join("dovegate.toml");
    std::fs::write(&conf, "[grant]\nttl = \"10m\"\nsession_hold = \"2h\"\n").unwrap();
    let dir = d.path().join("dovegate.d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("20-late.toml"), "[grant]\nttl = \"40m\"\n").unwrap();
    std::fs::write(dir.join("10-early.toml"), "[grant]\nttl = \"20m\"\n").unwrap();
    std::fs::write(
        dir.join("30-ignored.toml.dpkg-old"),
        "[grant]\nttl = \"1m\"\n",
    )
    .unwrap();
    let c = conf.display().to_string();
    let out = dovegate_env(&["config", "--config", &c], &[]);
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(stdout.contains("ttl = \"40m\""), "{stdout}");
    assert!(stdout.contains("session_hold = \"2h\""), "{stdout}");
    assert!(
        err.contains(&format!(
            "configuration {c} + {}, {}",
            dir.join("10-early.toml").display(),
            dir.join("20-late.toml").display()
        )),
        "{err}"
    );
    // A misspelt key in a drop-in: that file and line.
    std::fs::write(dir.join("20-late.toml"), "# late\n[grant]\ntll = \"40m\"\n").unwrap();
    let out = dovegate_env(&["check-config", "--config", &c], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:3:1: grant.tll: unknown key",
            dir.join("20-late.toml").display()
        )),
        "{err}"
    );
    // A bad value set by a drop-in is blamed on the drop-in, not the main file.
    std::fs::write(dir.join("20-late.toml"), "[grant]\nttl = \"soon\"\n").unwrap();
    let err = text(&dovegate_env(&["check-config", "--config", &c], &[]).stderr);
    assert!(
        err.contains(&format!(
            "{}:2:1: grant.ttl:",
            dir.join("20-late.toml").display()
        )),
        "{err}"
    );
}
