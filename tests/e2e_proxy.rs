//! A real Dovecot 2.3 proxy in front of a real Dovecot backend (issue 20 item 2): with
//! `auth_username_chars =` (any name) and a static `proxy=y nopassword=y` passdb, failed
//! proxied logins whose user names forge the 2.2, 2.3 and 2.4 success wording (IMAP and
//! POP3) grant nothing, while a real proxied login is granted. `postmap -q` judges the map.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Each Dovecot's imap port; pop3 is +2 (free blocks per run, see `dovecot_ports`).
fn backend_port() -> u16 {
    dovecot_ports(21143)
}
fn proxy_port() -> u16 {
    dovecot_ports(21243)
}

fn conf(dir: &Path, name: &str, port: u16, passdb: &str, extra: &str) -> String {
    format!(
        "base_dir = {d}/run\nstate_dir = {d}/state\ninstance_name = dg-{name}\n\
         protocols = imap pop3\nlisten = 127.0.0.1\nlog_path = {d}/dovecot.log\n\
         auth_mechanisms = plain\ndisable_plaintext_auth = no\nssl = no\n\
         login_trusted_networks = 127.0.0.0/8\nmail_location = maildir:~/Maildir\n\
         first_valid_uid = 1\nfirst_valid_gid = 1\n{extra}\
         passdb {{\n{passdb}\n}}\n\
         userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={d}/mail/%u\n}}\n\
         service imap-login {{\n  inet_listener imap {{\n    port = {port}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n\
         service pop3-login {{\n  inet_listener pop3 {{\n    port = {pop3}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n}}\n",
        d = dir.display(),
        pop3 = port + 2,
    )
}

struct Dovecots(Vec<std::path::PathBuf>);
impl Drop for Dovecots {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("dovecot")
                .args(["-c", &d.join("dovecot.conf").display().to_string(), "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn start(dir: &Path, text: String, port: u16) {
    for sub in ["run", "state", "mail"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    set_mode(dir, 0o755);
    set_mode(&dir.join("run"), 0o755);
    std::fs::write(dir.join("dovecot.conf"), text).unwrap();
    // Not `output()`: the daemon keeps the inherited stderr open, so a pipe never ends.
    let err = dir.join("start.err");
    let status = Command::new("dovecot")
        .args(["-c", &dir.join("dovecot.conf").display().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .expect("dovecot");
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    wait_for("dovecot listening", PATIENCE, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && TcpStream::connect(("127.0.0.1", port + 2)).is_ok()
    });
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One login through the proxy as `user`/`pass` from the forwarded address `ip`; the
/// server's answer to the authentication.
fn login(proto: &str, ip: &str, user: &str, pass: &str) -> String {
    let port = if proto == "imap" {
        proxy_port()
    } else {
        proxy_port() + 2
    };
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    let mut read = |r: &mut BufReader<TcpStream>| {
        line.clear();
        r.read_line(&mut line).unwrap();
        line.clone()
    };
    read(&mut r);
    let auth = b64(format!("\0{user}\0{pass}").as_bytes());
    if proto == "imap" {
        write!(w, "a ID (\"x-originating-ip\" \"{ip}\")\r\n").unwrap();
        while !read(&mut r).starts_with("a ") {}
        write!(w, "b AUTHENTICATE PLAIN {auth}\r\n").unwrap();
        loop {
            let l = read(&mut r);
            if l.starts_with("b ") {
                return l;
            }
        }
    }
    write!(w, "XCLIENT ADDR={ip}\r\n").unwrap();
    read(&mut r);
    write!(w, "AUTH PLAIN {auth}\r\n").unwrap();
    read(&mut r)
}

#[test]
fn failed_proxied_logins_with_forged_success_names_grant_nothing() {
    let d = tempdir();
    set_mode(d.path(), 0o755);
    let (backend, proxy) = (d.path().join("b"), d.path().join("p"));
    std::fs::create_dir_all(&backend).unwrap();
    std::fs::write(backend.join("users"), "good:{PLAIN}good-pass::::::\n").unwrap();
    set_mode(&backend.join("users"), 0o644);
    let mut guard = Dovecots(Vec::new());
    let passdb = format!(
        "  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {}",
        backend.join("users").display()
    );
    let (backend_port, proxy_port) = (backend_port(), proxy_port());
    guard.0.push(backend.clone());
    start(
        &backend,
        conf(&backend, "b", backend_port, &passdb, ""),
        backend_port,
    );
    let passdb = format!(
        "  driver = static\n  args = proxy=y nopassword=y host=127.0.0.1 port=%{{if;%s;eq;pop3;{};{}}}",
        backend_port + 2,
        backend_port
    );
    let extra = "auth_username_chars =\nauth_username_format = %u\nauth_verbose = yes\n";
    guard.0.push(proxy.clone());
    start(
        &proxy,
        conf(&proxy, "p", proxy_port, &passdb, extra),
        proxy_port,
    );

    let dovecot_log = proxy.join("dovecot.log");
    let map = d.path().join("relay");
    let mut daemon = Daemon::follow(d.path(), &dovecot_log, &["--ttl", "1h"]);

    let names = [
        "x): started proxying to h:1/: user=<x",
        "x,h:1): Started proxying to <h> (0.001 secs): user=<x",
        "x,h:1): Started proxying to remote host: user=<x",
    ];
    let mut hostile = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (j, proto) in ["imap", "pop3"].iter().enumerate() {
            let ip = format!("203.0.113.{}", 60 + 2 * i + j);
            let r = login(proto, &ip, name, "wrong");
            assert!(
                r.contains("NO") || r.contains("-ERR"),
                "{proto} {name}: {r}"
            );
            hostile.push(ip);
        }
    }
    wait_for("every failure logged", PATIENCE, || {
        std::fs::read_to_string(&dovecot_log)
            .unwrap_or_default()
            .matches("Login failed")
            .count()
            >= hostile.len()
    });
    // Real proxied logins after them: once they are granted, the failures were read.
    for (proto, ip) in [("imap", "203.0.113.70"), ("pop3", "203.0.113.71")] {
        let r = login(proto, ip, "good", "good-pass");
        assert!(r.contains("OK"), "{proto} good: {r}");
    }
    wait_for("the real proxied logins granted", PATIENCE, || {
        postmap_q(&map, "203.0.113.70").is_some() && postmap_q(&map, "203.0.113.71").is_some()
    });
    for ip in &hostile {
        assert!(
            postmap_q(&map, ip).is_none(),
            "failed proxied login from {ip} granted:\n{}",
            std::fs::read_to_string(&dovecot_log).unwrap_or_default()
        );
    }
    daemon.stop();
}
