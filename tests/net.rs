//! The network layer seen from outside: a second daemon never takes a live server's push
//! socket, auth-policy socket, policy server socket or events socket; idle connections
//! cannot block a metrics scrape; a reload that changes `[serve]`, `[push]`, `[policy]` or
//! `[events]` serves on the new addresses.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::*;

/// `dovegate run --config` in `dir` (its own map and state) with `extra` TOML.
fn daemon(dir: &Path, extra: &str) -> (Daemon, PathBuf) {
    let cfg = dir.join("dovegate.toml");
    write_config(dir, &cfg, extra);
    (
        Daemon::start(dir, &["--config", &cfg.display().to_string()]),
        cfg,
    )
}

fn write_config(dir: &Path, cfg: &Path, extra: &str) {
    std::fs::write(
        cfg,
        format!(
            "[source]\nlogs = []\n[map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n{extra}",
            dir.join("relay").display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
}

fn started(d: &Daemon) {
    wait_for("dovegate started", PATIENCE, || {
        d.log().contains("dovegate started")
    });
}

/// A push request line; the reply ("" when closed without one).
fn push(sock: &Path, ip: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(format!("{ip}\talice\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Whether `command=allow` on the auth-policy unix socket is answered 200.
fn policy_allows(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(
        b"POST /?command=allow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200 ")
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).map(|m| m.ino()).unwrap_or(0)
}

fn euid() -> u32 {
    // SAFETY: geteuid takes no pointers and cannot fail.
    unsafe { libc::geteuid() }
}

/// Waits until `d` exits or starts; asserts it exited with an error and returns its log.
/// One that started is stopped (as the administrator would), which is what used to leave
/// the first daemon without its sockets.
fn refused(d: &mut Daemon) -> String {
    let mut status = None;
    wait_for("the daemon starts or refuses", PATIENCE, || {
        status = d.child.try_wait().unwrap();
        status.is_some() || d.log().contains("dovegate started")
    });
    if status.is_none() {
        d.stop();
    }
    let text = d.log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a daemon started on live push sockets:\n{text}"
    );
    text
}

#[test]
fn a_second_daemon_never_takes_the_push_sockets() {
    let (d1, d2) = (tempdir(), tempdir());
    let run = tempdir();
    let (sock, policy) = (run.path().join("push"), run.path().join("policy"));
    let push_toml = format!(
        "[push]\nsocket = \"{}\"\nusers = [{}]\nauth_policy = \"unix:{}\"\n",
        sock.display(),
        euid(),
        policy.display()
    );
    let (mut first, _) = daemon(d1.path(), &push_toml);
    started(&first);
    assert_eq!(push(&sock, "198.51.100.1"), "OK\n");
    assert!(policy_allows(&policy));
    let inodes = (inode(&sock), inode(&policy));

    // Its own map and state: only the sockets are shared.
    let (mut second, _) = daemon(d2.path(), &push_toml);
    let text = refused(&mut second);
    assert!(
        text.contains(&format!("another dovegate is serving {}", sock.display())),
        "{text}"
    );
    assert_eq!((inode(&sock), inode(&policy)), inodes, "sockets replaced");
    assert_eq!(
        push(&sock, "198.51.100.2"),
        "OK\n",
        "the first still serves"
    );

    // The auth-policy socket alone (no push socket) is refused the same way.
    let policy_only = format!("[push]\nauth_policy = \"unix:{}\"\n", policy.display());
    let (mut third, _) = daemon(d2.path(), &policy_only);
    assert!(
        refused(&mut third).contains(&format!("another dovegate is serving {}", policy.display()))
    );
    assert_eq!(inode(&policy), inodes.1);
    assert!(policy_allows(&policy), "the first still serves");
    assert_eq!(push(&sock, "198.51.100.3"), "OK\n");

    // A clean stop removes the sockets it bound.
    assert_eq!(first.stop(), Some(0));
    assert!(!sock.exists() && !policy.exists(), "{}", first.log());
}

#[test]
fn idle_connections_do_not_block_a_metrics_scrape() {
    let d = tempdir();
    let port = free_port();
    // The policy endpoint only as a source of logins: a daemon needs one.
    let (mut daemon, _) = daemon(
        d.path(),
        &format!(
            "[push]\nauth_policy = \"unix:{}\"\n[serve]\nmetrics = \"127.0.0.1:{port}\"\n",
            d.path().join("policy").display()
        ),
    );
    started(&daemon);
    assert!(scrape(port).contains("dovegate_grants_active"));
    let idle = 16;
    let held: Vec<_> = (0..idle)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // At once: not after the idle ones time out.
    let text = scrape(port);
    assert!(
        text.starts_with("HTTP/1.0 200") && text.contains("dovegate_grants_active"),
        "scrape behind {idle} idle connections: {text:?}"
    );
    drop(held);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /other HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 404"), "{out}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_reload_serves_changed_serve_and_push_addresses() {
    let d = tempdir();
    let (a, b) = (free_port(), free_port());
    let (sm1, sm2) = (d.path().join("sm1"), d.path().join("sm2"));
    let (p1, p2) = (d.path().join("push1"), d.path().join("push2"));
    let toml = |port: u16, sm: &Path, push: &Path| {
        format!(
            "[push]\nsocket = \"{}\"\nusers = [{}]\n[serve]\nmetrics = \"127.0.0.1:{port}\"\nsocketmap = \"unix:{}\"\n",
            push.display(),
            euid(),
            sm.display()
        )
    };
    let (mut daemon, cfg) = daemon(d.path(), &toml(a, &sm1, &p1));
    started(&daemon);
    assert!(scrape(a).contains("dovegate_grants_active"));
    assert!(sm1.exists());
    write_config(d.path(), &cfg, &toml(b, &sm2, &p2));
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("reloaded", PATIENCE, || {
        daemon.log().contains("configuration reloaded")
    });
    assert!(
        scrape(b).contains("dovegate_grants_active"),
        "metrics on the new address:\n{}",
        daemon.log()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", a)).is_err(),
        "the old metrics address is released"
    );
    let mut s = UnixStream::connect(&sm2).expect("socketmap on the new path");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"15:relay 192.0.2.1,").unwrap();
    let mut got = [0u8; 32];
    let n = s.read(&mut got).unwrap();
    assert_eq!(&got[..n], b"9:NOTFOUND ,");
    assert!(!sm1.exists(), "the old socketmap socket is removed");
    assert_eq!(push(&p2, "198.51.100.9"), "OK\n");
    assert!(!p1.exists());
    // The same address with other settings: restarted in place.
    let limits = format!("{}socketmap_max_connections = 8\n", toml(b, &sm2, &p2));
    write_config(d.path(), &cfg, &limits);
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("reloaded twice", PATIENCE, || {
        daemon.log().matches("configuration reloaded").count() == 2
    });
    assert!(sm2.exists());
    assert!(scrape(b).contains("dovegate_grants_active"));
    assert_eq!(daemon.stop(), Some(0));
    assert!(!sm2.exists() && !p2.exists());
}

#[test]
fn a_reload_onto_a_live_push_socket_keeps_the_running_configuration() {
    let d = tempdir();
    let (mine, theirs) = (d.path().join("push"), d.path().join("theirs"));
    let other = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    let toml = |sock: &Path| {
        format!(
            "[push]\nsocket = \"{}\"\nusers = [{}]\n",
            sock.display(),
            euid()
        )
    };
    let theirs_ino = inode(&theirs);
    let (mut daemon, cfg) = daemon(d.path(), &toml(&mine));
    started(&daemon);
    write_config(d.path(), &cfg, &toml(&theirs));
    signal(daemon.child.id(), libc::SIGHUP);
    wait_for("the reload refused", PATIENCE, || {
        daemon.log().contains("reload refused")
    });
    let text = daemon.log();
    assert!(
        text.contains(&format!("another dovegate is serving {}", theirs.display())),
        "{text}"
    );
    assert_eq!(
        push(&mine, "198.51.100.20"),
        "OK\n",
        "still serving:\n{text}"
    );
    assert_eq!(
        inode(&theirs),
        theirs_ino,
        "the other socket is never replaced"
    );
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(inode(&theirs), theirs_ino);
    drop(other);
}

/// One RCPT request on the policy server's socket; the reply ("" when closed without one).
fn policy_ask(sock: &Path, ip: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(
        format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={ip}\ninstance=1\n\n"
        )
        .as_bytes(),
    );
    let mut out = Vec::new();
    let mut b = [0u8; 256];
    while !out.ends_with(b"\n\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_policy_server_is_never_taken_over_and_follows_reloads() {
    let (d1, d2) = (tempdir(), tempdir());
    let port = free_port();
    let (p1, p2) = (d1.path().join("policy1"), d1.path().join("policy2"));
    let metrics = format!("[serve]\nmetrics = \"127.0.0.1:{port}\"\n");
    let policy = |sock: &Path| {
        format!(
            "[policy]\nlisten = \"{}\"\nusers = [{}]\n",
            sock.display(),
            euid()
        )
    };
    let (mut first, cfg) = daemon(d1.path(), &format!("{metrics}{}", policy(&p1)));
    started(&first);
    assert_eq!(policy_ask(&p1, "192.0.2.1"), "action=DUNNO\n\n");
    let ino = inode(&p1);

    // Its own map and state: only the policy socket is shared.
    let (mut second, _) = daemon(d2.path(), &policy(&p1));
    let text = refused(&mut second);
    assert!(
        text.contains(&format!("another dovegate is serving {}", p1.display())),
        "{text}"
    );
    assert_eq!(inode(&p1), ino, "socket replaced");
    assert_eq!(
        policy_ask(&p1, "192.0.2.1"),
        "action=DUNNO\n\n",
        "the first still serves"
    );

    // A reload moves it; its counters go on.
    write_config(d1.path(), &cfg, &format!("{metrics}{}", policy(&p2)));
    signal(first.child.id(), libc::SIGHUP);
    wait_for("reloaded", PATIENCE, || {
        first.log().contains("configuration reloaded")
    });
    assert_eq!(policy_ask(&p2, "192.0.2.1"), "action=DUNNO\n\n");
    assert!(!p1.exists(), "the old socket is removed");
    let m = scrape(port);
    assert!(
        m.contains("dovegate_policy_answers_total{action=\"dunno\"} 3"),
        "{m}"
    );
    promtool_accepts(d1.path(), &m);

    // Turned off: the socket and the metrics go.
    write_config(d1.path(), &cfg, &metrics);
    signal(first.child.id(), libc::SIGHUP);
    wait_for("reloaded twice", PATIENCE, || {
        first.log().matches("configuration reloaded").count() == 2
    });
    assert!(!p2.exists(), "{}", first.log());
    assert!(!scrape(port).contains("dovegate_policy"));
    assert_eq!(first.stop(), Some(0));
}

/// Dovecot 2.4's login event, as its unix driver writes it (one line).
fn login_event(ip: &str) -> String {
    format!(
        r#"{{"event":"auth_master_client_login_finished","categories":["auth-client","service:imap"],"fields":{{"user":"alice","local_ip":"127.0.0.1","local_port":143,"remote_ip":"{ip}","remote_port":40143}}}}"#
    )
}

/// Writes one event line to the events socket; false when nobody serves it.
fn send_event(sock: &Path, ip: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    s.write_all(format!("{}\n", login_event(ip)).as_bytes())
        .is_ok()
}

/// The events socket is a `net` server like the others: a second daemon never takes it,
/// a reload moves it (the old file removed), a stop removes it.
#[test]
fn the_events_socket_is_claimed_moved_and_removed_like_the_others() {
    let (d1, d2) = (tempdir(), tempdir());
    let run = tempdir();
    let (s1, s2) = (run.path().join("events1"), run.path().join("events2"));
    let toml = |sock: &Path| {
        format!(
            "[events]\nlisten = \"{}\"\nusers = [{}]\n",
            sock.display(),
            euid()
        )
    };
    let map = d1.path().join("relay");
    let (mut first, cfg) = daemon(d1.path(), &toml(&s1));
    started(&first);
    assert!(send_event(&s1, "198.51.100.31"));
    wait_for("the pushed login granted", PATIENCE, || {
        postmap_q(&map, "198.51.100.31").is_some()
    });
    let ino = inode(&s1);

    let (mut second, _) = daemon(d2.path(), &toml(&s1));
    let text = refused(&mut second);
    assert!(
        text.contains(&format!("another dovegate is serving {}", s1.display())),
        "{text}"
    );
    assert_eq!(inode(&s1), ino, "socket replaced");

    write_config(d1.path(), &cfg, &toml(&s2));
    signal(first.child.id(), libc::SIGHUP);
    wait_for("reloaded", PATIENCE, || {
        first.log().contains("configuration reloaded")
    });
    assert!(!s1.exists(), "the old events socket is removed");
    assert!(send_event(&s2, "198.51.100.32"));
    wait_for("a login on the new socket granted", PATIENCE, || {
        postmap_q(&map, "198.51.100.32").is_some()
    });
    assert_eq!(first.stop(), Some(0));
    assert!(!s2.exists(), "{}", first.log());
}
