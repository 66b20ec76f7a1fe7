//! Logins pushed by a real Dovecot 2.3 (the Debian 12 packages), configured as the README
//! says: the post-login hook (`script-login` running `dovegate postlogin`) for imap and
//! pop3, and the auth-policy endpoint. Each path alone (no log is followed) must grant the
//! successful public clients (IPv4, IPv6, forwarded through login_trusted_networks) and
//! nothing else; logins must still succeed with the daemon stopped or stalled; another
//! user on the push socket and a policy request without the secret grant nothing; with
//! file mode and both push paths on, one login is one grant.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::dovecot::*;
use common::*;

/// A traversable rig directory: the test's files, and `dv` for the Dovecot harness.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    dv: String,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::Builder::new()
            .prefix("dgp")
            .tempdir_in("/tmp")
            .unwrap();
        set_mode(tmp.path(), 0o755);
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("dv")).unwrap();
        // The hook as the package ships it: a link named postlogin to the binary.
        std::os::unix::fs::symlink(bin(), dir.join("postlogin")).unwrap();
        let dv = dir.join("dv").display().to_string();
        Rig { _tmp: tmp, dir, dv }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn map(&self) -> PathBuf {
        self.dir.join("relay")
    }

    /// The harness's `DG_POSTLOGIN`: the hook and its socket.
    fn hook(&self) -> String {
        format!("{} --socket {}", self.path("postlogin"), self.path("push"))
    }

    /// `dovegate run --config` with `[push]` (and more) as given, map and state in the rig.
    fn daemon(&self, extra_toml: &str) -> Daemon {
        let cfg = self.dir.join("dovegate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[source]\nlogs = []\n[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n{extra_toml}",
                self.map().display(),
                self.path("state")
            ),
        )
        .unwrap();
        let d = Daemon::start(&self.dir, &["--config", &cfg.display().to_string()]);
        wait_for("dovegate started", PATIENCE, || {
            d.log().contains("dovegate started")
        });
        d
    }

    fn dovecot_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dv/dovecot.log")).unwrap_or_default()
    }

    /// Waits until Dovecot has logged every failed and aborted attempt of logins.py.
    fn wait_for_failures(&self) {
        wait_for("Dovecot logged the failures", PATIENCE, || {
            let text = self.dovecot_log();
            text.matches("auth failed").count() >= 3
                && text.matches("no auth attempts").count() >= 2
        });
    }
}

/// The successful public clients are granted, then (after Dovecot logged the failures)
/// nothing else is.
fn check_grants(rig: &Rig, want: &Expected, daemon: &mut Daemon) {
    let map = rig.map();
    for ip in &want.granted {
        wait_for(&format!("grant for {ip}"), PATIENCE, || {
            postmap_q(&map, ip).is_some()
        });
    }
    rig.wait_for_failures();
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(map_keys(&map), want.granted, "{}", daemon.log());
    for ip in &want.refused {
        assert_eq!(postmap_q(&map, ip), None, "{ip} must not be granted");
    }
}

/// A successful report as Dovecot sends it with the README's attributes.
fn report(remote: &str, protocol: &str) -> String {
    format!(
        r#"{{"login":"x","nologin":"-","proxy":"-","remote":"{remote}","protocol":"{protocol}","success":true,"policy_reject":false}}"#
    )
}

#[test]
fn postlogin_hook_grants_and_never_blocks_a_login() {
    let rig = Rig::new();
    let push = format!(
        "[push]\nsocket = \"{}\"\nusers = [\"dovecot\"]\n",
        rig.path("push")
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot(&rig.dv);
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(14143).to_string()],
        &[("DG_POSTLOGIN", &rig.hook())],
    );
    let want = run_logins(dovecot_ports(14143));
    assert_eq!(want.granted.len(), 5);

    // Another user writes to the socket: refused, nothing granted, and the hook still
    // execs its program.
    let out = Command::new("/usr/sbin/runuser")
        .args(["-u", "nobody", "--", &rig.path("postlogin")])
        .args(["--socket", &rig.path("push"), "/bin/echo", "executed"])
        .env_clear()
        .env("IP", "203.0.113.99")
        .env("USER", "mallory")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "executed\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not allowed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the refused peer logged", PATIENCE, || {
        daemon.log().contains("is not in push.users")
    });
    check_grants(&rig, &want, &mut daemon);
    assert_eq!(postmap_q(&rig.map(), "203.0.113.99"), None);
    assert!(daemon.summary("forged").unwrap_or(0) >= 1);

    // The daemon stopped: logins succeed, the hook says why in Dovecot's log.
    let stopped = timed_logins(dovecot_ports(14143), 3, "203.0.113.101");
    wait_for("the hook's complaint in Dovecot's log", PATIENCE, || {
        rig.dovecot_log().contains("dovegate postlogin: login of")
    });

    // The daemon stalled (SIGSTOP): logins succeed; the logins queued on the socket are
    // granted once it runs again.
    let mut daemon = rig.daemon(&push);
    let running = timed_logins(dovecot_ports(14143), 3, "203.0.113.102");
    signal(daemon.child.id(), libc::SIGSTOP);
    let cont = Cont(daemon.child.id());
    let stalled = timed_logins(dovecot_ports(14143), 3, "203.0.113.103");
    drop(cont);
    wait_for("grant after SIGCONT", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.103").is_some()
    });
    assert!(postmap_q(&rig.map(), "203.0.113.102").is_some());
    assert_eq!(daemon.stop(), Some(0));
    eprintln!(
        "login secs, daemon running {running:.3?}, stopped {stopped:.3?}, stalled {stalled:.3?}"
    );
}

#[test]
fn auth_policy_grants_only_with_the_secret() {
    let rig = Rig::new();
    let port = free_port();
    std::fs::write(rig.dir.join("secret"), "X-API-Key: s3cret-for-tests\n").unwrap();
    let push = format!(
        "[push]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n",
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot(&rig.dv);
    let url = format!("http://127.0.0.1:{port}/");
    let dovecot_env = [
        ("DG_POLICY_URL", url.as_str()),
        ("DG_POLICY_HEADER", "X-API-Key: s3cret-for-tests"),
    ];
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(15143).to_string()],
        &dovecot_env,
    );
    let want = run_logins(dovecot_ports(15143));
    assert_eq!(want.granted.len(), 5);

    // Forged reports: no secret, a wrong one; an SMTP report (not configured) with it.
    let post = "POST /?command=report HTTP/1.1";
    assert_eq!(http(port, post, &report("203.0.113.98", "imap")), 401);
    assert_eq!(
        http(
            port,
            &format!("{post}\r\nX-API-Key: wrong"),
            &report("203.0.113.98", "imap")
        ),
        401
    );
    let with_secret = format!("{post}\r\nX-API-Key: s3cret-for-tests");
    assert_eq!(
        http(port, &with_secret, &report("203.0.113.96", "smtp")),
        200
    );
    let big = "x".repeat(64 * 1024);
    assert_ne!(
        http(port, &with_secret, &big),
        200,
        "oversized body refused"
    );
    // A genuine report, last: once it is granted, the ones before were judged.
    assert_eq!(
        http(port, &with_secret, &report("203.0.113.97", "pop3")),
        200
    );
    wait_for("the genuine report granted", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.97").is_some()
    });
    let mut want = want;
    want.granted.insert("203.0.113.97".into());
    want.refused
        .extend(["203.0.113.98".into(), "203.0.113.96".into()]);
    check_grants(&rig, &want, &mut daemon);
    assert!(daemon.summary("forged").unwrap_or(0) >= 2);

    // The daemon stopped, then stalled: logins succeed (Dovecot's policy check gives up
    // after its own 2 s timeout per request when stalled).
    let stopped = timed_logins(dovecot_ports(15143), 2, "203.0.113.111");
    let mut daemon = rig.daemon(&push);
    let running = timed_logins(dovecot_ports(15143), 2, "203.0.113.112");
    signal(daemon.child.id(), libc::SIGSTOP);
    let cont = Cont(daemon.child.id());
    let stalled = timed_logins(dovecot_ports(15143), 2, "203.0.113.113");
    drop(cont);
    wait_for("grant after SIGCONT", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.112").is_some()
    });
    // With the allow checks off (reports only), a stalled daemon costs nothing.
    harness(&["down", &rig.dv], &[]);
    let mut reports_only = dovecot_env.to_vec();
    reports_only.push(("DG_POLICY_CHECKS", "no"));
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(15143).to_string()],
        &reports_only,
    );
    signal(daemon.child.id(), libc::SIGSTOP);
    let cont = Cont(daemon.child.id());
    let stalled_reports_only = timed_logins(dovecot_ports(15143), 2, "203.0.113.114");
    drop(cont);
    assert_eq!(daemon.stop(), Some(0));
    eprintln!(
        "login secs, daemon running {running:.3?}, stopped {stopped:.3?}, stalled {stalled:.3?}, stalled with checks off {stalled_reports_only:.3?}"
    );
}

#[test]
fn log_and_both_push_paths_make_one_grant() {
    let rig = Rig::new();
    let (port, mport) = (free_port(), free_port());
    let log = rig.dir.join("dv/dovecot.log");
    std::fs::write(rig.dir.join("secret"), "X-API-Key: all-on\n").unwrap();
    let cfg = format!(
        "[push]\nsocket = \"{}\"\nusers = [\"dovecot\"]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n[serve]\nmetrics = \"127.0.0.1:{mport}\"\n",
        rig.path("push"),
        rig.path("secret")
    );
    // File mode too: the config's empty logs, replaced by --log.
    let cfg_path = rig.dir.join("all.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n{cfg}",
            rig.map().display(),
            rig.path("state")
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &rig.dir,
        &[
            "--config",
            &cfg_path.display().to_string(),
            "--log",
            &log.display().to_string(),
        ],
    );
    wait_for("dovegate started", PATIENCE, || {
        daemon.log().contains("dovegate started")
    });
    let _down = Down::dovecot(&rig.dv);
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(16143).to_string()],
        &[
            ("DG_POSTLOGIN", &rig.hook()),
            ("DG_POLICY_URL", &format!("http://127.0.0.1:{port}/")),
            ("DG_POLICY_HEADER", "X-API-Key: all-on"),
        ],
    );
    timed_logins(dovecot_ports(16143), 1, "203.0.113.150");
    let counted = |text: &str, source: &str| {
        text.contains(&format!(
            "dovegate_source_logins_total{{source=\"{source}\"}} 1\n"
        ))
    };
    let logsrc = log.display().to_string();
    wait_for("the login counted by all three sources", PATIENCE, || {
        let m = metrics(mport);
        counted(&m, "push") && counted(&m, "auth-policy") && counted(&m, &logsrc)
    });
    wait_for("the grant", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.150").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        postmap_s(&rig.map()).len(),
        1,
        "one login, one map entry: {:?}",
        postmap_s(&rig.map())
    );
    assert_eq!(daemon.summary("commits"), Some(1), "{}", daemon.log());
}

/// Not a behaviour test: the login latency the hook adds (median of 100 forwarded IMAP
/// logins through a Dovecot with the hook, against 100 through one without, interleaved).
/// `cargo test --test e2e_push -- --ignored --nocapture`; DG_HOOK_BIN=target/release/dovegate
/// measures another build of the hook.
#[test]
#[ignore]
fn hook_latency() {
    let rig = Rig::new();
    if let Ok(hook) = std::env::var("DG_HOOK_BIN") {
        let link = rig.dir.join("postlogin");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(std::fs::canonicalize(hook).unwrap(), link).unwrap();
    }
    let plain = Rig::new();
    let push = format!(
        "[push]\nsocket = \"{}\"\nusers = [\"dovecot\"]\n",
        rig.path("push")
    );
    let mut daemon = rig.daemon(&push);
    let _down = (Down::dovecot(&rig.dv), Down::dovecot(&plain.dv));
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(17143).to_string()],
        &[("DG_POSTLOGIN", &rig.hook())],
    );
    harness(
        &["up", &plain.dv, "file", &dovecot_ports(18143).to_string()],
        &[],
    );
    // What script-login itself costs: the same set-up with a script that only execs.
    let sh = Rig::new();
    let _down_sh = Down::dovecot(&sh.dv);
    let script = sh.dir.join("exec-only");
    std::fs::write(&script, "#!/bin/sh\nexec \"$@\"\n").unwrap();
    set_mode(&script, 0o755);
    harness(
        &["up", &sh.dv, "file", &dovecot_ports(19143).to_string()],
        &[("DG_POSTLOGIN", &script.display().to_string())],
    );
    let (mut with, mut without, mut exec_only) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        with.extend(timed_logins(dovecot_ports(17143), 10, "203.0.113.160"));
        without.extend(timed_logins(dovecot_ports(18143), 10, "203.0.113.161"));
        exec_only.extend(timed_logins(dovecot_ports(19143), 10, "203.0.113.162"));
    }
    assert_eq!(daemon.stop(), Some(0));
    let (w, wo, e) = (median(with), median(without), median(exec_only));
    eprintln!(
        "median login: with hook {:.1} ms, without {:.1} ms, added {:.1} ms; with an exec-only sh script {:.1} ms (100 each)",
        w * 1e3,
        wo * 1e3,
        (w - wo) * 1e3,
        e * 1e3
    );
}

#[test]
fn dovecot_24_through_each_path() {
    // Post-login hook: the binary inside the rig, which the chroot sees as /rig.
    let rig = Rig::new();
    let (root, dovecot_uid) = debian13_root(&rig.dv);
    std::fs::hard_link(bin(), rig.dir.join("dv/dovegate"))
        .or_else(|_| std::fs::copy(bin(), rig.dir.join("dv/dovegate")).map(|_| ()))
        .unwrap();
    std::os::unix::fs::symlink("dovegate", rig.dir.join("dv/postlogin")).unwrap();
    let push = format!(
        "[push]\nsocket = \"{}\"\nusers = [{dovecot_uid}]\n",
        rig.dir.join("dv/push").display()
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot24(&rig.dv);
    harness(
        &["up24", &rig.dv, &root, &dovecot_ports(21143).to_string()],
        &[("DG_POSTLOGIN", "/rig/postlogin --socket /rig/push")],
    );
    assert!(rig.dovecot_log().contains("v2.4"), "{}", rig.dovecot_log());
    let want = run_logins(dovecot_ports(21143));
    assert_eq!(want.granted.len(), 5);
    check_grants(&rig, &want, &mut daemon);

    // Auth policy, as the README says (reports only).
    let rig = Rig::new();
    let port = free_port();
    std::fs::write(rig.dir.join("secret"), "X-API-Key: s3cret-24\n").unwrap();
    let push = format!(
        "[push]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n",
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot24(&rig.dv);
    harness(
        &["up24", &rig.dv, &root, &dovecot_ports(22143).to_string()],
        &[
            ("DG_POLICY_URL", &format!("http://127.0.0.1:{port}/")),
            ("DG_POLICY_HEADER", "X-API-Key: s3cret-24"),
            ("DG_POLICY_CHECKS", "no"),
        ],
    );
    let want = run_logins(dovecot_ports(22143));
    check_grants(&rig, &want, &mut daemon);
}

/// One request line on the push socket; the answer ("" when the daemon just closed).
fn push_line(socket: &Path, line: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(line);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The hook as root (uid 0 is allowed in this test): exits 0 after running /bin/true.
fn hook_as_root(rig: &Rig, ip: &str) {
    let st = Command::new(rig.dir.join("postlogin"))
        .args(["--socket", &rig.path("push"), "/bin/true"])
        .env_clear()
        .env("IP", ip)
        .env("USER", "alice")
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn odd_pushes_grant_nothing_stall_nothing_and_survive_a_reload() {
    let rig = Rig::new();
    let port = free_port();
    std::fs::write(rig.dir.join("secret"), "X-Secret: k\n").unwrap();
    let push = format!(
        "[push]\nsocket = \"{}\"\nusers = [0]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n",
        rig.path("push"),
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    let sock = rig.dir.join("push");
    // Idle connections on both endpoints, held open across what follows.
    let idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(
        b"POST /?command=report HTTP/1.1\r\nHost: x\r\nX-Secret: k\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    for line in [
        &b"not-an-address\talice\n"[..],
        b"203.0.113.200 alice\n",
        b"\xff\xfe\t\x00\n",
        &[b'7'; 4096][..],
    ] {
        assert_ne!(push_line(&sock, line), "OK\n", "{line:?}");
    }
    assert_eq!(push_line(&sock, b"198.51.100.70\tbob\n"), "OK\n");
    hook_as_root(&rig, "198.51.100.77");
    let secret = "POST /?command=report HTTP/1.1\r\nX-Secret: k";
    assert_eq!(http(port, secret, &report("198.51.100.79", "imap")), 200);
    for ip in ["198.51.100.70", "198.51.100.77", "198.51.100.79"] {
        wait_for(&format!("grant for {ip}"), PATIENCE, || {
            postmap_q(&rig.map(), ip).is_some()
        });
    }
    // A reload that changes neither server keeps both serving (a login Dovecot pushes
    // during a reload is not refused): the same socket file, never started again.
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap());
    let before = inode();
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("reloaded", PATIENCE, || {
        daemon.log().contains("configuration reloaded")
    });
    assert_eq!(
        inode(),
        before,
        "the push socket was re-created by the reload"
    );
    let started = "push socket: logins accepted";
    assert_eq!(daemon.log().matches(started).count(), 1, "{}", daemon.log());
    hook_as_root(&rig, "198.51.100.78");
    assert_eq!(http(port, secret, &report("2001:db8::79", "pop3")), 200);
    for ip in ["198.51.100.78", "2001:db8::79"] {
        wait_for(
            &format!("grant for {ip} after the reload"),
            PATIENCE,
            || postmap_q(&rig.map(), ip).is_some(),
        );
    }
    drop((idle, slow));
    // A reload that changes [push] restarts it with the new settings.
    assert_eq!(push_line(&sock, b"198.51.100.71\tcarol\n"), "OK\n");
    let cfg = rig.dir.join("dovegate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("users = [0]", "users = [0, 65534]")).unwrap();
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("push restarted", PATIENCE, || {
        let log = daemon.log();
        log.contains("[push] restarted with its new settings")
            && log.matches("configuration reloaded").count() == 2
    });
    hook_as_root(&rig, "198.51.100.72");
    wait_for("grant after [push] restarted", PATIENCE, || {
        postmap_q(&rig.map(), "198.51.100.72").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        map_keys(&rig.map()),
        [
            "198.51.100.70",
            "198.51.100.71",
            "198.51.100.72",
            "198.51.100.77",
            "198.51.100.78",
            "198.51.100.79",
            "2001:db8::79"
        ]
        .into_iter()
        .map(String::from)
        .collect::<BTreeSet<_>>()
    );
    assert!(
        daemon.summary("invalid_ip").unwrap_or(0) >= 4,
        "{}",
        daemon.log()
    );
}

/// The counter `name{labels}` in the metrics text (0 when absent).
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn auth_policy_grants_no_proxied_or_nologin_authentication() {
    let rig = Rig::new();
    let (port, mport) = (free_port(), free_port());
    std::fs::write(rig.dir.join("secret"), "X-API-Key: px\n").unwrap();
    let push = format!(
        "[push]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n[serve]\nmetrics = \"127.0.0.1:{mport}\"\n",
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot(&rig.dv);
    let url = format!("http://127.0.0.1:{port}/");
    let mut env = vec![
        ("DG_POLICY_URL", url.as_str()),
        ("DG_POLICY_HEADER", "X-API-Key: px"),
        ("DG_POLICY_CHECKS", "no"),
    ];
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(23143).to_string()],
        &env,
    );
    // carol is proxied elsewhere (proxy=y, any password: a Dovecot proxy's usual passdb),
    // dave has `nologin`: Dovecot reports both as successful, neither logs in here.
    let carol = imap_login(
        dovecot_ports(23143),
        "203.0.113.181",
        "carol",
        "any-password",
    );
    let dave = imap_login(dovecot_ports(23143), "203.0.113.182", "dave", "dave-pass");
    assert!(
        !carol.starts_with("b OK") && !dave.starts_with("b OK"),
        "{carol} / {dave}"
    );
    let series = |reason: &str| {
        format!("dovegate_near_misses_total{{source=\"auth-policy\",reason=\"{reason}\"}}")
    };
    wait_for("both reports judged", PATIENCE, || {
        let m = metrics(mport);
        counter(&m, &series("proxied")) >= 1 && counter(&m, &series("nologin")) >= 1
    });
    // A real login through the same configuration grants.
    timed_logins(dovecot_ports(23143), 1, "203.0.113.183");
    wait_for("the real login granted", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.183").is_some()
    });

    // A site that kept Dovecot's default attributes: its reports are refused, loudly.
    harness(&["down", &rig.dv], &[]);
    env.push(("DG_POLICY_ATTRIBUTES", "default"));
    harness(
        &["up", &rig.dv, "file", &dovecot_ports(23143).to_string()],
        &env,
    );
    timed_logins(dovecot_ports(23143), 1, "203.0.113.184");
    wait_for("the report without attributes refused", PATIENCE, || {
        counter(&metrics(mport), &series("no-proxy-attributes")) >= 1
    });
    assert_eq!(daemon.stop(), Some(0));
    assert!(
        daemon.log().contains("auth_policy_request_attributes"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        map_keys(&rig.map()),
        BTreeSet::from(["203.0.113.183".to_string()])
    );
}

#[test]
fn auth_policy_slots_cannot_be_held_without_the_secret() {
    let rig = Rig::new();
    let port = free_port();
    std::fs::write(rig.dir.join("secret"), "X-API-Key: slots\n").unwrap();
    let push = format!(
        "[push]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n",
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    // More idle connections than there are slots, then a genuine report.
    let idle: Vec<_> = (0..130)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let post = "POST /?command=report HTTP/1.1\r\nX-API-Key: slots";
    assert_eq!(http(port, post, &report("198.51.100.90", "imap")), 200);
    wait_for("the genuine report granted", PATIENCE, || {
        postmap_q(&rig.map(), "198.51.100.90").is_some()
    });
    // The idle connections are closed, not held.
    let mut first = &idle[0];
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(first.read(&mut buf), Ok(0) | Err(_)),
        "an idle connection without the secret is closed"
    );
    let mut last = &idle[129];
    last.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(matches!(last.read(&mut buf), Ok(0)));
    drop(idle);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn postlogin_execs_with_stderr_a_closed_pipe() {
    let rig = Rig::new();
    for (ip, program) in [
        // Not pushed (no daemon): a warning on the closed stderr, then the exec.
        (Some("192.0.2.1"), "ran-1"),
        // No IP: another warning.
        (None, "ran-2"),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mark = rig.dir.join(program);
        let mut cmd = Command::new(rig.dir.join("postlogin"));
        cmd.args(["--socket", &rig.path("no-daemon"), "/bin/sh", "-c"])
            .arg(format!("echo ran > {}", mark.display()))
            .env_clear()
            .env("USER", "alice")
            .stderr(writer);
        if let Some(ip) = ip {
            cmd.env("IP", ip);
        }
        let st = cmd.status().unwrap();
        assert!(st.success(), "{program}: {st:?}");
        assert!(mark.exists(), "{program}: the program ran");
    }
    // Nothing to exec: exit 1 (no panic's 101) with stderr closed.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let st = Command::new(rig.dir.join("postlogin"))
        .arg(rig.path("no-such-program"))
        .env_clear()
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1));
}

#[test]
fn push_socket_in_a_directory_others_can_write_is_refused() {
    let rig = Rig::new();
    let open = rig.dir.join("open");
    std::fs::create_dir(&open).unwrap();
    set_mode(&open, 0o777);
    let push = format!(
        "[push]\nsocket = \"{}\"\nusers = [0]\n",
        open.join("push").display()
    );
    let cfg = rig.dir.join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nlogs = []\n[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n{push}",
            rig.map().display(),
            rig.path("state")
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&rig.dir, &["--config", &cfg.display().to_string()]);
    let mut status = None;
    wait_for("the daemon refuses to start", PATIENCE, || {
        status = d.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    let log = d.log();
    assert!(
        log.contains(&open.display().to_string()) && log.contains("sticky"),
        "{log}"
    );
    assert!(!open.join("push").exists());
    // Sticky (like /tmp): accepted, and the socket is 0666.
    set_mode(&open, 0o1777);
    let mut d = Daemon::start(&rig.dir, &["--config", &cfg.display().to_string()]);
    wait_for("dovegate started", PATIENCE, || {
        d.log().contains("dovegate started")
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(open.join("push"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    assert_eq!(d.stop(), Some(0));
}

/// Blocks `user` exactly as the policy server does when it trips a cap (the same code,
/// the same file), as another process would: the daemon must see it from the file.
fn block(state: &Path, user: &str, cap: &str) {
    let b = dovegate::blocks::Blocks::new(Some(state)).unwrap();
    assert!(b.block(user, cap, Vec::new(), now()));
}

/// The kill switch at login (issue 22): with `auth_policy_check_after_auth = yes`, a user
/// `policy.block_on_cap` blocked is refused by Dovecot itself at IMAP and POP3 login, with
/// the cap named; others log in; `dovegate unblock` lets the next login through; a
/// blocked-users file that cannot be read refuses nobody (and says so).
#[test]
fn auth_policy_refuses_a_blocked_users_logins_until_unblocked() {
    let rig = Rig::new();
    let (port, mport) = (free_port(), free_port());
    std::fs::write(rig.dir.join("secret"), "X-API-Key: kill\n").unwrap();
    let state = rig.dir.join("state");
    block(&state, "alice", "user_messages_per_hour");
    let push = format!(
        "[push]\nauth_policy = \"inet:127.0.0.1:{port}\"\nauth_policy_secret_file = \"{}\"\n[serve]\nmetrics = \"127.0.0.1:{mport}\"\n",
        rig.path("secret")
    );
    let mut daemon = rig.daemon(&push);
    let _down = Down::dovecot(&rig.dv);
    let url = format!("http://127.0.0.1:{port}/");
    let base = dovecot_ports(29143);
    harness(
        &["up", &rig.dv, "file", &base.to_string()],
        &[
            ("DG_POLICY_URL", url.as_str()),
            ("DG_POLICY_HEADER", "X-API-Key: kill"),
            ("DG_POLICY_CHECKS", "after"),
        ],
    );
    let refused = "blocked by dovegate: cap user_messages_per_hour tripped; ask the administrator";
    // Each attempt from its own address: Dovecot delays an address's failed attempts.
    let imap = imap_login(base, "203.0.113.201", "alice", "alice-pass");
    assert!(imap.starts_with("b NO") && imap.contains(refused), "{imap}");
    let pop = pop3_login(base + 2, "203.0.113.202", "alice", "alice-pass");
    assert!(pop.starts_with("-ERR") && pop.contains(refused), "{pop}");
    // A wrong password is refused as any other (the block is not shown to a guesser).
    let guess = imap_login(base, "203.0.113.203", "alice", "wrong");
    assert!(!guess.contains("dovegate"), "{guess}");
    // Others log in and are granted.
    assert!(imap_login(base, "203.0.113.204", "bob", "bob-pass").starts_with("b OK"));
    assert!(pop3_login(base + 2, "203.0.113.205", "bob", "bob-pass").starts_with("+OK"));
    for ip in ["203.0.113.204", "203.0.113.205"] {
        wait_for(&format!("{ip} granted"), PATIENCE, || {
            postmap_q(&rig.map(), ip).is_some()
        });
    }
    let blocked = r#"dovegate_near_misses_total{source="auth-policy",reason="blocked-user"}"#;
    assert_eq!(
        counter(&metrics(mport), blocked),
        2,
        "one per refused login"
    );
    let log = daemon.log();
    assert!(
        log.contains(r#"auth policy: login of user "alice" from 203.0.113.201 refused"#),
        "{log}"
    );

    // Unblocked: the very next login succeeds and grants.
    let cfg = rig.path("dovegate.toml");
    let out = dovegate(&["unblock", "--config", &cfg, "alice"]);
    assert!(out.status.success(), "{out:?}");
    assert!(imap_login(base, "203.0.113.206", "alice", "alice-pass").starts_with("b OK"));
    assert!(pop3_login(base + 2, "203.0.113.207", "alice", "alice-pass").starts_with("+OK"));
    for ip in ["203.0.113.206", "203.0.113.207"] {
        wait_for(&format!("{ip} granted"), PATIENCE, || {
            postmap_q(&rig.map(), ip).is_some()
        });
    }

    // Blocked again, then the file damaged: nobody is refused, and the daemon says why.
    block(&state, "alice", "grant_messages_per_day");
    let imap = imap_login(base, "203.0.113.208", "alice", "alice-pass");
    assert!(
        imap.contains("cap grant_messages_per_day tripped"),
        "{imap}"
    );
    let tmp = state.join("damaged");
    std::fs::write(&tmp, "{ not json").unwrap();
    std::fs::rename(&tmp, state.join("policy-blocked.json")).unwrap();
    assert!(imap_login(base, "203.0.113.209", "alice", "alice-pass").starts_with("b OK"));
    assert!(imap_login(base, "203.0.113.210", "bob", "bob-pass").starts_with("b OK"));
    assert_eq!(counter(&metrics(mport), blocked), 3);
    assert_eq!(daemon.stop(), Some(0));
    let log = daemon.log();
    assert!(
        log.contains("auth policy: cannot read the blocked users")
            && log.contains("logins are not refused until it can be read"),
        "{log}"
    );
}

/// A reload refused because one pushed server cannot start (its port is taken) changes
/// nothing: the push socket already moved to its new path goes back to the old one, which
/// keeps taking logins, and no socket is left at the new path.
#[test]
fn a_refused_reload_puts_every_pushed_server_back() {
    let rig = Rig::new();
    let mut daemon = rig.daemon(&format!(
        "[push]\nsocket = \"{}\"\nusers = [0]\n",
        rig.path("push")
    ));
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(rig.dir.join("events-secret"), "0123456789abcdef0123\n").unwrap();
    let cfg = rig.dir.join("dovegate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("socket = \"{}\"", rig.path("push")),
        &format!("socket = \"{}\"", rig.path("push2")),
    );
    std::fs::write(
        &cfg,
        format!(
            "{text}[events]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
            rig.path("events-secret")
        ),
    )
    .unwrap();
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("reload refused", PATIENCE, || {
        daemon.log().contains("reload refused")
    });
    assert!(
        !rig.dir.join("push2").exists(),
        "a socket left at the new path"
    );
    assert_eq!(
        push_line(&rig.dir.join("push"), b"198.51.100.90\tdave\n"),
        "OK\n"
    );
    wait_for("grant after the refused reload", PATIENCE, || {
        postmap_q(&rig.map(), "198.51.100.90").is_some()
    });
    drop(busy);
    assert_eq!(daemon.stop(), Some(0));
}
