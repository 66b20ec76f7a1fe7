//! Logins and session ends from Dovecot's event exporter, with a real Dovecot 2.3 (the
//! Debian 12 packages) configured with the README's snippet (`[events]`, no log, no
//! journal): successful IMAP and POP3 logins grant (IPv4, IPv6, forwarded by ID and
//! XCLIENT), failures, proxied and nologin authentications and posts without the secret
//! do not; IDLE keeps the grant past three times the ttl and LOGOUT ends it ttl later;
//! a stopped or stalled dovegate never delays a login; events and the log together make
//! one grant and one audit line. tests/dovecot_config.rs checks the README's snippets with
//! real `doveconf`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::dovecot::*;
use common::*;

const SECRET: &str = "events-test-secret-0123456789";

/// A traversable rig: the test's files, `dv` for the Dovecot harness, the events port.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    dv: String,
    port: u16,
    /// The README's exporter settings for this rig (the harness's DG_EXTRA_CONF).
    exporter: String,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::Builder::new()
            .prefix("dge")
            .tempdir_in("/tmp")
            .unwrap();
        set_mode(tmp.path(), 0o755);
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("dv")).unwrap();
        std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
        // The README's snippet, with this rig's port.
        let port = free_port();
        let conf = readme_block(README_EVENTS_23)
            .replace("8431", &port.to_string())
            .replace("/SECRET", &format!("/{SECRET}"));
        let dv = dir.join("dv").display().to_string();
        Rig {
            _tmp: tmp,
            dir,
            dv,
            port,
            exporter: conf,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn map(&self) -> PathBuf {
        self.dir.join("relay")
    }

    /// `dovegate run` with `[events]` over HTTP only (no log, no journal) plus `extra`.
    fn daemon(&self, extra: &str, args: &[&str]) -> Daemon {
        let events = format!(
            "listen = \"127.0.0.1:{}\"\nsecret_file = \"{}\"\n",
            self.port,
            self.path("secret")
        );
        self.daemon_with(&events, extra, args)
    }

    /// `dovegate run` with the `[events]` keys given, no log, no journal, plus `extra`.
    fn daemon_with(&self, events: &str, extra: &str, args: &[&str]) -> Daemon {
        let cfg = self.dir.join("dovegate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[source]\nlogs = []\njournal = false\n[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n[events]\n{events}{extra}",
                self.map().display(),
                self.path("state"),
            ),
        )
        .unwrap();
        let mut all = vec!["--config".to_string(), cfg.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let d = Daemon::start(&self.dir, &all);
        wait_for("dovegate started", PATIENCE, || {
            d.log().contains("dovegate started")
        });
        d
    }

    /// Dovecot 2.3 with the README's exporter on `base`. With proxied and nologin users
    /// (carol, dave): the harness adds them with an auth policy URL, here a closed port
    /// (reports only, which fail without effect).
    fn dovecot(&self, base: u16) -> Down {
        let down = Down::dovecot(&self.dv);
        harness(
            &["up", &self.dv, "file", &base.to_string()],
            &[
                ("DG_EXTRA_CONF", &self.exporter),
                ("DG_POLICY_URL", "http://127.0.0.1:9/"),
                ("DG_POLICY_CHECKS", "no"),
            ],
        );
        down
    }

    fn dovecot_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dv/dovecot.log")).unwrap_or_default()
    }
}

/// One HTTP/1.1 POST on a fresh connection; the status code.
fn post(port: u16, path: &str, body: &str) -> u16 {
    http(port, &format!("POST {path} HTTP/1.1"), body)
}

/// A master-login event as Dovecot 2.3 posts it, for `ip`.
fn login_event(ip: &str) -> String {
    format!(
        r#"{{"event":"auth_master_client_login_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.570469Z","end_time":"2026-12-07T06:19:59.570568Z","categories":["auth-client","service:imap"],"fields":{{"duration":67,"user":"alice","id":1,"local_ip":"127.0.0.1","local_port":143,"remote_ip":"{ip}","remote_port":40143}}}}"#
    )
}

#[test]
fn dovecot_23_events_grant_logins_and_nothing_else() {
    let rig = Rig::new();
    let mut daemon = rig.daemon("", &[]);
    let base = dovecot_ports(24143);
    let _down = rig.dovecot(base);
    // erin, proxied to this Dovecot itself. Added now, not just before her login: Dovecot
    // 2.3 stats its passwd-file at most once a second, so a line appended in the second
    // of the last lookup stayed unseen (seen failing under parallel tests).
    let mut users = std::fs::OpenOptions::new()
        .append(true)
        .open(rig.dir.join("dv/users"))
        .unwrap();
    writeln!(
        users,
        "erin:::::::proxy=y host=127.0.0.1 port={base} destuser=alice pass=alice-pass nopassword=y"
    )
    .unwrap();
    drop(users);
    let Expected {
        mut granted,
        refused,
    } = run_logins(base);
    assert_eq!(granted.len(), 5, "{granted:?}");
    // Authenticated, but not logged in here: proxied elsewhere (a closed port), nologin.
    let carol = imap_login(base, "203.0.113.200", "carol", "any");
    let dave = imap_login(base, "203.0.113.201", "dave", "dave-pass");
    assert!(carol.starts_with("b NO"), "{carol}");
    assert!(dave.starts_with("b NO"), "{dave}");
    // Proxied by this Dovecot to itself (as alice, added at the start: see below): the
    // proxy grants the client.
    let erin = imap_login(base, "203.0.113.210", "erin", "any");
    assert!(erin.starts_with("b OK"), "{erin}\n{}", rig.dovecot_log());
    granted.insert("203.0.113.210".into());
    wait_for("Dovecot logged carol's proxying", PATIENCE, || {
        rig.dovecot_log().contains("proxy(carol")
    });
    // Forged posts: without the secret (refused), and with it but not an event.
    let forged = login_event("203.0.113.99");
    assert_eq!(post(rig.port, "/", &forged), 404);
    assert_eq!(post(rig.port, "/wrong-secret-0123456789", &forged), 404);
    assert_eq!(post(rig.port, &format!("/{SECRET}x"), &forged), 404);
    assert_eq!(post(rig.port, &format!("/{SECRET}"), "{\"event\":"), 200);
    // A login after all of them: once it is granted, the events before it were handled.
    timed_logins(base, 1, "203.0.113.250");
    granted.insert("203.0.113.250".into());
    for ip in &granted {
        wait_for(&format!("grant for {ip}"), PATIENCE, || {
            postmap_q(&rig.map(), ip).is_some()
        });
    }
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(map_keys(&rig.map()), granted, "{}", daemon.log());
    for ip in
        refused
            .iter()
            .map(String::as_str)
            .chain(["203.0.113.99", "203.0.113.200", "203.0.113.201"])
    {
        assert_eq!(postmap_q(&rig.map(), ip), None, "{ip} must not be granted");
    }
    assert!(
        daemon.summary("forged").unwrap_or(0) >= 3,
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("without the secret path"));
}

/// Events only: the session opened by the login event stays held while the client idles
/// (evidence `pushed`: the events deliver exact ends), and its end event closes it (the
/// grant lasts ttl from the LOGOUT, then goes).
#[test]
fn idle_keeps_the_grant_and_logout_ends_it_ttl_later() {
    let rig = Rig::new();
    let map = rig.map();
    let mut daemon = rig.daemon("[grant]\nttl = \"4s\"\nsession_hold = \"2m\"\n", &[]);
    let base = dovecot_ports(25143);
    let _down = rig.dovecot(base);
    let addr = "198.51.100.51";
    let idle = Idle::start(base, addr);
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, addr).is_some()
    });
    // Another client's session ends: the events have shown an exact end, so a missing
    // one means open (evidence `pushed`); without that the hold would last ttl only.
    let other = imap_login(base, "198.51.100.52", "alice", "alice-pass");
    assert!(other.starts_with("b OK"), "{other}");
    let sessions = rig.dir.join("state/checkpoints/sessions.json");
    wait_for(
        "the open session saved, held by the events",
        PATIENCE,
        || {
            std::fs::read_to_string(&sessions).is_ok_and(|t| {
                t.contains(addr) && t.contains("\"pushed\"") && !t.contains("198.51.100.52")
            })
        },
    );
    while now() < login + 13 {
        let e = expiry(&map, addr);
        assert!(
            e.is_some_and(|e| e > now()),
            "relay lapsed while the session is open: {e:?}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    idle.logout();
    let out = now();
    wait_for("grant extended past the logout", PATIENCE, || {
        expiry(&map, addr).is_some_and(|e| e >= out + 3)
    });
    wait_for("grant gone ttl after the logout", PATIENCE, || {
        expiry(&map, addr).is_none()
    });
    assert!(now() >= out + 3, "removed before ttl after the logout");
    assert_eq!(daemon.stop(), Some(0));
}

/// Dovecot's stats process exports on its own: logins take as long with dovegate
/// running, stopped or stalled (SIGSTOP), never the exporter's timeout more.
#[test]
fn a_stopped_or_stalled_dovegate_never_delays_a_login() {
    let rig = Rig::new();
    let base = dovecot_ports(26143);
    let _down = rig.dovecot(base);
    let mut daemon = rig.daemon("", &[]);
    let running = timed_logins(base, 5, "203.0.113.121");
    wait_for("grant while running", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.121").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    let stopped = timed_logins(base, 5, "203.0.113.122");
    let mut daemon = rig.daemon("", &[]);
    signal(daemon.child.id(), libc::SIGSTOP);
    let cont = Cont(daemon.child.id());
    let stalled = timed_logins(base, 5, "203.0.113.123");
    drop(cont);
    // Running again: new logins grant.
    timed_logins(base, 1, "203.0.113.124");
    wait_for("grant after SIGCONT", PATIENCE, || {
        postmap_q(&rig.map(), "203.0.113.124").is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    eprintln!("login secs: running {running:.3?}, stopped {stopped:.3?}, stalled {stalled:.3?}");
    // The README's transport_timeout is 500 ms.
    for (what, v) in [("stopped", &stopped), ("stalled", &stalled)] {
        assert!(
            median(v.clone()) < median(running.clone()) + 0.5,
            "{what}: {v:?} against {running:?}"
        );
    }
}

#[test]
fn events_and_the_log_make_one_grant_and_one_audit_line() {
    let rig = Rig::new();
    let mport = free_port();
    let log = rig.dir.join("dv/dovecot.log");
    let base = dovecot_ports(27143);
    let _down = rig.dovecot(base);
    let mut daemon = rig.daemon(
        &format!("[serve]\nmetrics = \"127.0.0.1:{mport}\"\n"),
        &["--log", &log.display().to_string()],
    );
    let addr = "203.0.113.150";
    timed_logins(base, 1, addr);
    let counted = |text: &str, source: &str| {
        text.contains(&format!(
            "dovegate_source_logins_total{{source=\"{source}\"}} 1\n"
        ))
    };
    let logsrc = log.display().to_string();
    wait_for("the login counted by both sources", PATIENCE, || {
        let m = metrics(mport);
        counted(&m, "events") && counted(&m, &logsrc)
    });
    wait_for("the grant", PATIENCE, || {
        postmap_q(&rig.map(), addr).is_some()
    });
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        map_keys(&rig.map()),
        BTreeSet::from([addr.to_string()]),
        "one login, one map entry"
    );
    let audit: Vec<String> = daemon
        .log()
        .lines()
        .filter(|l| l.contains(addr) && l.contains(" grant"))
        .map(str::to_string)
        .collect();
    assert_eq!(audit.len(), 1, "one audit line: {audit:?}");
}

/// Dovecot 2.4.1 with the README's unix driver snippet: logins grant; a peer of another
/// uid on the socket is refused and grants nothing.
#[test]
fn dovecot_24_unix_driver_grants_and_refuses_other_uids() {
    let rig = Rig::new();
    let (root, dovecot_uid) = debian13_root(&rig.dv);
    // The socket in the rig, which the chroot sees as /rig.
    let socket = rig.dir.join("dv/events");
    let mut daemon = rig.daemon_with(
        &format!(
            "listen = \"{}\"\nusers = [{dovecot_uid}]\n",
            socket.display()
        ),
        "",
        &[],
    );
    let _down = Down::dovecot24(&rig.dv);
    let exporter = readme_block(README_EVENTS_24).replace("/run/dovegate/events", "/rig/events");
    let base = dovecot_ports(28143);
    harness(
        &["up24", &rig.dv, &root, &base.to_string()],
        &[("DG_EXTRA_CONF", &exporter)],
    );
    let Expected {
        mut granted,
        refused,
    } = run_logins(base);
    assert_eq!(granted.len(), 5, "{granted:?}");
    // Another user writes a login event to the socket.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\n"); s.recv(1)
except OSError:
    pass  # closed at once: refused
"#;
    let out = Command::new("/usr/sbin/runuser")
        .args(["-u", "nobody", "--", "python3", "-c", script])
        .arg(&socket)
        .arg(login_event("203.0.113.98"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the other uid refused", PATIENCE, || {
        daemon.log().contains("is not in events.users")
    });
    timed_logins(base, 1, "203.0.113.251");
    granted.insert("203.0.113.251".into());
    for ip in &granted {
        wait_for(&format!("grant for {ip}"), PATIENCE, || {
            postmap_q(&rig.map(), ip).is_some()
        });
    }
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(map_keys(&rig.map()), granted, "{}", daemon.log());
    for ip in refused.iter().map(String::as_str).chain(["203.0.113.98"]) {
        assert_eq!(postmap_q(&rig.map(), ip), None, "{ip} must not be granted");
    }
}

/// The reference configuration (and so the dovegate.toml(5) man page generated from it)
/// carries the README's Dovecot snippets, commented, line for line: the README's are the
/// ones checked against real doveconf (tests/dovecot_config.rs).
#[test]
fn the_reference_config_carries_the_readme_snippets() {
    let reference = include_str!("../packaging/dovegate.toml");
    for title in [README_EVENTS_23, README_EVENTS_24] {
        let commented: String = readme_block(title)
            .lines()
            .map(|l| format!("# {l}").trim_end().to_string() + "\n")
            .collect();
        assert!(
            reference.contains(&commented),
            "packaging/dovegate.toml lacks the README's snippet `{title}`:\n{commented}"
        );
    }
}
