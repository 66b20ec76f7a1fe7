//! `dovegate relay-check` (relay-ctrl-check for ucspi-tcp chains): the environment PROGRAM
//! (`/usr/bin/env`) is given for each case, and the real chain: ucspi-tcp's `tcpserver`
//! (and `tcprules`) in front of `relay-check` and qpsmtpd, an SMTP server packaged in Debian
//! that honours `RELAYCLIENT` (its `relay` plugin: `$ENV{RELAYCLIENT}` makes the connection
//! a relay client, and `rcpt_ok` accepts any recipient for a relay client). qpsmtpd tests
//! the value as Perl does, so qmail's empty value counts as unset there: it needs
//! `--relayclient 1`. Debian's qpsmtpd 0.94 lacks a dependency of that plugin
//! (libnet-ip-perl; `scripts/deps test` installs both).

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dovegate::store::{AdminStore, LmdbMap, OpenMode};

/// A map with grants written as the daemon writes them (any address: the library does not
/// apply the exclusions that keep `dovegate grant` off loopback).
struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let rig = Rig { dir: tempdir() };
        let out = dovegate(&["init", "--map", &rig.map_arg()]);
        assert!(out.status.success(), "{out:?}");
        rig
    }

    fn map(&self) -> PathBuf {
        self.dir.path().join("relay")
    }

    fn map_arg(&self) -> String {
        self.map().display().to_string()
    }

    /// Grants `ip` until now + `secs` (negative: already expired), keyed for `/bits`.
    fn grant(&self, ip: &str, secs: i64, bits: u8) {
        let mut m = LmdbMap::open_keyed(&self.map(), "OK", OpenMode::Existing, bits).unwrap();
        let now = dovegate::timefmt::now();
        // Kept under the prefix for a /64 grant, as the daemon keeps it.
        let ip = dovegate::grant::widen(ip.parse::<IpAddr>().unwrap(), bits);
        m.set(ip, now + secs).unwrap();
    }

    /// A configuration with `grant.ipv6_prefix = bits` and this map.
    fn config(&self, bits: u8) -> String {
        let p = self.dir.path().join(format!("prefix{bits}.toml"));
        std::fs::write(
            &p,
            format!(
                "[source]\nlogs = []\n[grant]\nipv6_prefix = {bits}\n[map]\npath = {:?}\n",
                self.map_arg()
            ),
        )
        .unwrap();
        p.display().to_string()
    }
}

/// `dovegate relay-check ARGS /usr/bin/env` with exactly `env` as its environment.
fn check(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .arg("relay-check")
        .args(args)
        .arg("/usr/bin/env")
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run relay-check")
}

/// The environment `/usr/bin/env` printed, sorted; asserts it ran (exit 0).
fn printed(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{out:?}");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn granted_client_gets_relayclient_others_keep_their_environment() {
    let rig = Rig::new();
    rig.grant("192.0.2.7", 600, 128);
    let map = rig.map_arg();
    let base = [("TCPREMOTEIP", "192.0.2.7"), ("TCPLOCALPORT", "25")];
    let out = check(&["--map", &map], &base);
    assert_eq!(
        printed(&out),
        sorted(&["RELAYCLIENT=", "TCPREMOTEIP=192.0.2.7", "TCPLOCALPORT=25"])
    );
    assert_eq!(stderr(&out), "");
    // The value is configurable (qmail-smtpd appends it to each recipient).
    let out = check(&["--map", &map, "--relayclient", "@relay.example"], &base);
    assert!(printed(&out).contains(&"RELAYCLIENT=@relay.example".to_string()));
    // Another client: the environment exactly as it came, and nothing said.
    let other = [("TCPREMOTEIP", "192.0.2.8"), ("TCPLOCALPORT", "25")];
    let out = check(&["--map", &map], &other);
    assert_eq!(
        printed(&out),
        sorted(&["TCPREMOTEIP=192.0.2.8", "TCPLOCALPORT=25"])
    );
    assert_eq!(stderr(&out), "");
    // ucspi-tcp-ipv6 writes IPv4 clients as mapped addresses.
    let out = check(&["--map", &map], &[("TCPREMOTEIP", "::ffff:192.0.2.7")]);
    assert!(printed(&out).contains(&"RELAYCLIENT=".to_string()));
}

#[test]
fn relayclient_set_earlier_in_the_chain_is_kept() {
    let rig = Rig::new();
    rig.grant("192.0.2.7", 600, 128);
    let map = rig.map_arg();
    for ip in ["192.0.2.7", "192.0.2.8"] {
        let out = check(
            &["--map", &map, "--relayclient", "@mine"],
            &[("TCPREMOTEIP", ip), ("RELAYCLIENT", "@tcprules")],
        );
        assert_eq!(
            printed(&out),
            sorted(&["RELAYCLIENT=@tcprules", &format!("TCPREMOTEIP={ip}")]),
            "{ip}"
        );
    }
    // Set and empty (qmail's usual form) is set too.
    let out = check(
        &["--map", &map, "--relayclient", "@mine"],
        &[("TCPREMOTEIP", "192.0.2.8"), ("RELAYCLIENT", "")],
    );
    assert!(printed(&out).contains(&"RELAYCLIENT=".to_string()));
}

#[test]
fn expired_grants_do_not_count() {
    let rig = Rig::new();
    // A grant the daemon has not removed yet (it was stopped): Postfix would still read
    // OK; relay-check does not.
    rig.grant("192.0.2.9", -5, 128);
    let out = check(&["--map", &rig.map_arg()], &[("TCPREMOTEIP", "192.0.2.9")]);
    assert_eq!(printed(&out), sorted(&["TCPREMOTEIP=192.0.2.9"]));
    assert_eq!(stderr(&out), "");
}

#[test]
fn ipv6_clients_are_found_under_their_prefix_grant() {
    let rig = Rig::new();
    // A login from 2001:db8:1:2::7 with grant.ipv6_prefix = 64 grants the /64.
    rig.grant("2001:db8:1:2::7", 600, 64);
    let cfg = rig.config(64);
    for (ip, granted) in [
        ("2001:db8:1:2::7", true),
        ("2001:db8:1:2:aaaa::99", true),
        ("2001:db8:1:3::7", false),
    ] {
        let out = check(&["--config", &cfg], &[("TCPREMOTEIP", ip)]);
        assert_eq!(
            printed(&out).contains(&"RELAYCLIENT=".to_string()),
            granted,
            "{ip}: {out:?}"
        );
    }
    // Without the prefix setting the map's prefix key is not the address's.
    let out = check(
        &["--config", &rig.config(128)],
        &[("TCPREMOTEIP", "2001:db8:1:2::99")],
    );
    assert!(!printed(&out).iter().any(|l| l.starts_with("RELAYCLIENT")));
}

#[test]
fn no_usable_address_sets_nothing() {
    let rig = Rig::new();
    rig.grant("192.0.2.7", 600, 128);
    let map = rig.map_arg();
    let out = check(&["--map", &map], &[("PATH", "/usr/bin:/bin")]);
    assert_eq!(printed(&out), sorted(&["PATH=/usr/bin:/bin"]));
    assert!(stderr(&out).contains("no TCPREMOTEIP"), "{}", stderr(&out));
    let long = "1".repeat(5000);
    for bad in ["", "192.0.2.7x", "192.0.2.7/32", "unknown", &long] {
        let out = check(&["--map", &map], &[("TCPREMOTEIP", bad)]);
        assert!(
            !printed(&out).iter().any(|l| l.starts_with("RELAYCLIENT")),
            "{bad}"
        );
        let err = stderr(&out);
        assert!(err.contains("is not an IP address"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.len() < 200, "the address is cut short: {err}");
    }
}

/// A map it cannot read (missing, not LMDB, a bad configuration): nothing set, one line on
/// stderr naming the map and the error, and PROGRAM still runs.
#[test]
fn unreadable_map_fails_closed_and_still_execs() {
    let rig = Rig::new();
    rig.grant("192.0.2.7", 600, 128);
    let env = [("TCPREMOTEIP", "192.0.2.7")];
    let missing = rig.dir.path().join("missing");
    let garbage = rig.dir.path().join("garbage");
    std::fs::write(garbage.with_extension("lmdb"), vec![0x5a; 65536]).unwrap();
    let cases: [(PathBuf, &str); 2] = [
        (missing.clone(), "no such map"),
        (garbage.clone(), "MDB_INVALID"),
    ];
    for (map, why) in &cases {
        let out = check(&["--map", &map.display().to_string()], &env);
        assert_eq!(printed(&out), sorted(&["TCPREMOTEIP=192.0.2.7"]));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{}.lmdb", map.display())) && err.contains(why),
            "{err}"
        );
    }
    let bad = rig.dir.path().join("bad.toml");
    std::fs::write(&bad, "[grant]\nttl = \"forever\"\n").unwrap();
    let out = check(&["--config", &bad.display().to_string()], &env);
    assert_eq!(printed(&out), sorted(&["TCPREMOTEIP=192.0.2.7"]));
    assert!(stderr(&out).contains("not checked"), "{}", stderr(&out));
    // An unreadable map (mode 0640, another owner): a user other than root.
    let nobody = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(bin())
        .args(["relay-check", "--map", &rig.map_arg(), "/usr/bin/env"])
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert_eq!(printed(&nobody), sorted(&["TCPREMOTEIP=192.0.2.7"]));
    assert!(
        stderr(&nobody).contains("Permission denied"),
        "{}",
        stderr(&nobody)
    );
}

/// A process holding a write lock on the map (a stalled writer) delays the SMTP server by
/// at most relay-check's bound; then it runs without RELAYCLIENT.
#[test]
fn a_locked_map_is_waited_for_a_bounded_time() {
    let rig = Rig::new();
    rig.grant("192.0.2.7", 600, 128);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.map().with_extension("lmdb"))
        .unwrap();
    // The writers' protocol (store::lock): an OFD write lock on the whole file.
    // SAFETY: plain data; zeroed is the whole-file range.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid fd and flock for the call.
    assert_eq!(
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) },
        0
    );
    let start = Instant::now();
    let out = check(&["--map", &rig.map_arg()], &[("TCPREMOTEIP", "192.0.2.7")]);
    let took = start.elapsed();
    assert_eq!(printed(&out), sorted(&["TCPREMOTEIP=192.0.2.7"]));
    assert!(
        stderr(&out).contains("no answer within"),
        "{}",
        stderr(&out)
    );
    assert!(
        took < Duration::from_secs(3),
        "the bound is 1s; took {took:?}"
    );
    drop(file);
    let out = check(&["--map", &rig.map_arg()], &[("TCPREMOTEIP", "192.0.2.7")]);
    assert!(printed(&out).contains(&"RELAYCLIENT=".to_string()));
}

#[test]
fn a_program_that_cannot_run_exits_111() {
    let rig = Rig::new();
    let out = Command::new(bin())
        .args([
            "relay-check",
            "--map",
            &rig.map_arg(),
            "/nonexistent/qmail-smtpd",
        ])
        .env_clear()
        .env("TCPREMOTEIP", "192.0.2.7")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(111));
    assert!(
        stderr(&out).contains("cannot execute /nonexistent/qmail-smtpd"),
        "{}",
        stderr(&out)
    );
}

// ---- the real chain: tcpserver (ucspi-tcp) over loopback ----

/// `tcpserver` on 127.0.0.1:PORT running `ARGS` for each connection, with `env` added to
/// its environment; stopped (and waited for) on drop.
struct TcpServer {
    child: Child,
    port: u16,
}

impl TcpServer {
    fn start(pre: &[&str], args: &[&str], env: &[(&str, &str)]) -> TcpServer {
        let port = free_port();
        // -H -R -l0: no DNS or ident lookups (the environment is then only TCP*IP/PORT).
        let child = Command::new("tcpserver")
            .args(["-H", "-R", "-l", "0"])
            .args(pre)
            .args(["127.0.0.1", &port.to_string()])
            .args(args)
            .envs(env.iter().copied())
            // Not a git work tree: qpsmtpd runs `git describe` for its version.
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tcpserver (Debian package ucspi-tcp: scripts/deps test)");
        wait_for("tcpserver listening", PATIENCE, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TcpServer { child, port }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to 127.0.0.1:`port` from `src` (any 127/8 address is local).
fn connect_from(src: Ipv4Addr, port: u16) -> TcpStream {
    let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, and sockaddr_in values that live for each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let stream = TcpStream::from_raw_fd(fd);
        let from = sa(src, 0);
        assert_eq!(
            libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len),
            0,
            "bind {src}: {}",
            std::io::Error::last_os_error()
        );
        let to = sa(Ipv4Addr::LOCALHOST, port);
        assert_eq!(
            libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }
}

/// Everything PROGRAM wrote to the connection from `src`.
fn env_seen_from(src: Ipv4Addr, port: u16) -> Vec<String> {
    let mut s = connect_from(src, port);
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().map(str::to_string).collect()
}

fn relayclient(lines: &[String]) -> Option<&str> {
    lines.iter().find_map(|l| l.strip_prefix("RELAYCLIENT="))
}

/// `tcpserver ... dovegate relay-check --map M /usr/bin/env`, and tcprules setting
/// RELAYCLIENT for a local network before it.
#[test]
fn tcpserver_chain_sets_relayclient_for_granted_clients_only() {
    let rig = Rig::new();
    rig.grant("127.0.0.2", 600, 128);
    // tcprules: 127.0.0.4 is a "local network" (RELAYCLIENT from the rules), the rest allowed.
    let rules = rig.dir.path().join("rules");
    let mut tr = Command::new("tcprules")
        .arg(rules.with_extension("cdb"))
        .arg(rules.with_extension("tmp"))
        .stdin(Stdio::piped())
        .spawn()
        .expect("tcprules (ucspi-tcp)");
    tr.stdin
        .take()
        .unwrap()
        .write_all(b"127.0.0.4:allow,RELAYCLIENT=\"@local\"\n:allow\n")
        .unwrap();
    assert!(tr.wait().unwrap().success());
    let cdb = rules.with_extension("cdb").display().to_string();
    let map = rig.map_arg();
    let server = TcpServer::start(
        &["-x", &cdb],
        &[bin(), "relay-check", "--map", &map, "/usr/bin/env"],
        &[],
    );
    let granted = env_seen_from(Ipv4Addr::new(127, 0, 0, 2), server.port);
    assert_eq!(relayclient(&granted), Some(""), "{granted:?}");
    assert!(granted.contains(&"TCPREMOTEIP=127.0.0.2".to_string()));
    let other = env_seen_from(Ipv4Addr::new(127, 0, 0, 3), server.port);
    assert_eq!(relayclient(&other), None, "{other:?}");
    assert!(other.contains(&"TCPREMOTEIP=127.0.0.3".to_string()));
    let local = env_seen_from(Ipv4Addr::new(127, 0, 0, 4), server.port);
    assert_eq!(relayclient(&local), Some("@local"), "{local:?}");
}

/// qpsmtpd's tcpserver entry point: upstream's `qpsmtpd` script (its socket as a socket
/// object: qpsmtpd calls `connected` on it), which Debian's package does not install (it ships the forkserver and prefork daemons, which read no
/// environment per connection); the library it runs (Qpsmtpd::TcpServer) is the package's.
const QPSMTPD: &str = r#"#!/usr/bin/perl -w
use strict;
use Qpsmtpd::TcpServer;
use Qpsmtpd::Constants;
use IO::Socket::INET;
$| = 1;
my $qpsmtpd = Qpsmtpd::TcpServer->new();
$qpsmtpd->load_plugins();
$qpsmtpd->start_connection();
# tcpserver's socket is fd 0; qpsmtpd asks it whether the client is still connected.
$qpsmtpd->run(IO::Socket::INET->new_from_fd(0, "r+"));
$qpsmtpd->run_hooks("post-connection");
$qpsmtpd->connection->reset;
"#;

/// qpsmtpd's configuration directory: the `relay` plugin (RELAYCLIENT from the
/// environment, or relayclients) and `rcpt_ok` (local domains, or any for relay clients).
fn qpsmtpd_config(dir: &Path) -> PathBuf {
    let conf = dir.join("qpsmtpd");
    std::fs::create_dir_all(conf.join("spool")).unwrap();
    for (name, text) in [
        ("plugins", "relay\nrcpt_ok\n".to_string()),
        ("plugin_dirs", "/usr/share/qpsmtpd/plugins\n".to_string()),
        ("me", "mx.relay-check.test\n".to_string()),
        ("rcpthosts", "local.test\n".to_string()),
        ("loglevel", "4\n".to_string()),
        ("spool_dir", format!("{}\n", conf.join("spool").display())),
    ] {
        std::fs::write(conf.join(name), text).unwrap();
    }
    let script = dir.join("qpsmtpd-tcpserver");
    std::fs::write(&script, QPSMTPD).unwrap();
    set_mode(&script, 0o755);
    conf
}

/// An SMTP session from `src`: the RCPT replies for each recipient.
fn rcpt_replies(src: Ipv4Addr, port: u16, rcpts: &[&str]) -> Vec<String> {
    let s = connect_from(src, port);
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    let mut reply = || {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "the server closed the connection");
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return std::mem::take(&mut last) + line.trim_end();
            }
            last.clear();
        }
    };
    let greeting = reply();
    assert!(greeting.starts_with("220"), "{greeting}");
    let mut cmd = |line: &str, reply: &mut dyn FnMut() -> String| {
        writer.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        reply()
    };
    let r = cmd("HELO client.test", &mut reply);
    assert!(r.starts_with("250"), "HELO: {r}");
    let r = cmd("MAIL FROM:<user@local.test>", &mut reply);
    assert!(r.starts_with("250"), "MAIL: {r}");
    let out = rcpts
        .iter()
        .map(|to| cmd(&format!("RCPT TO:<{to}>"), &mut reply))
        .collect();
    let _ = cmd("QUIT", &mut reply);
    out
}

fn code(reply: &str) -> &str {
    reply.get(..3).unwrap_or(reply)
}

/// A real SMTP server behind the chain: relaying (RCPT to a foreign domain) is accepted
/// (250) for the granted client and refused (550) for others, who still reach local
/// recipients; the same with the map unreadable (refused, local mail still taken).
#[test]
fn qpsmtpd_behind_tcpserver_relays_for_granted_clients_only() {
    let rig = Rig::new();
    rig.grant("127.0.0.2", 600, 128);
    let conf = qpsmtpd_config(rig.dir.path());
    let script = rig
        .dir
        .path()
        .join("qpsmtpd-tcpserver")
        .display()
        .to_string();
    let conf_env = conf.display().to_string();
    let env = [("QPSMTPD_CONFIG", conf_env.as_str())];
    let map = rig.map_arg();
    let server = TcpServer::start(
        &[],
        &[
            bin(),
            "relay-check",
            "--map",
            &map,
            "--relayclient",
            "1",
            "/usr/bin/perl",
            &script,
        ],
        &env,
    );
    let rcpts = ["someone@elsewhere.example", "postmaster@local.test"];
    let granted = rcpt_replies(Ipv4Addr::new(127, 0, 0, 2), server.port, &rcpts);
    assert_eq!(
        granted.iter().map(|r| code(r)).collect::<Vec<_>>(),
        ["250", "250"],
        "{granted:?}"
    );
    let other = rcpt_replies(Ipv4Addr::new(127, 0, 0, 3), server.port, &rcpts);
    assert_eq!(
        other.iter().map(|r| code(r)).collect::<Vec<_>>(),
        ["550", "250"],
        "{other:?}"
    );
    drop(server);
    // The map missing (a wrong path): no relaying, local mail still accepted.
    let missing = rig.dir.path().join("missing").display().to_string();
    let server = TcpServer::start(
        &[],
        &[
            bin(),
            "relay-check",
            "--map",
            &missing,
            "--relayclient",
            "1",
            "/usr/bin/perl",
            &script,
        ],
        &env,
    );
    let granted = rcpt_replies(Ipv4Addr::new(127, 0, 0, 2), server.port, &rcpts);
    assert_eq!(
        granted.iter().map(|r| code(r)).collect::<Vec<_>>(),
        ["550", "250"],
        "{granted:?}"
    );
    drop(server);
    // qmail's empty RELAYCLIENT (the default) is no relay permission to qpsmtpd.
    let server = TcpServer::start(
        &[],
        &[
            bin(),
            "relay-check",
            "--map",
            &map,
            "/usr/bin/perl",
            &script,
        ],
        &env,
    );
    let granted = rcpt_replies(Ipv4Addr::new(127, 0, 0, 2), server.port, &rcpts);
    assert_eq!(
        granted.iter().map(|r| code(r)).collect::<Vec<_>>(),
        ["550", "250"],
        "{granted:?}"
    );
}

/// relay-ctrl's pair: the POP/IMAP server's chain runs `dovegate postlogin` (as
/// relay-ctrl-allow) with tcpserver's `TCPREMOTEIP` and no `IP`; the SMTP server's runs
/// `relay-check`. Dovecot's `IP` wins when both are set.
#[test]
fn postlogin_takes_tcpremoteip_and_relay_check_then_relays() {
    let rig = Rig::new();
    let push = rig.dir.path().join("push");
    let cfg = rig.dir.path().join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nlogs = []\n[map]\npath = {:?}\n[state]\ndir = {:?}\n\
             [push]\nsocket = {:?}\nusers = [0]\n",
            rig.map_arg(),
            rig.dir.path().join("state").display().to_string(),
            push.display().to_string()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(rig.dir.path(), &["--config", &cfg.display().to_string()]);
    wait_for("the push socket", PATIENCE, || push.exists());
    let hook = |env: &[(&str, &str)]| {
        let out = Command::new(bin())
            .args(["postlogin", "--socket", &push.display().to_string()])
            .arg("/usr/bin/env")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stderr(&out), "", "pushed");
        printed(&out)
    };
    // The hook execs its program with the environment untouched.
    let seen = hook(&[("TCPREMOTEIP", "192.0.2.44"), ("USER", "alice")]);
    assert_eq!(seen, sorted(&["TCPREMOTEIP=192.0.2.44", "USER=alice"]));
    hook(&[
        ("IP", "192.0.2.45"),
        ("TCPREMOTEIP", "192.0.2.46"),
        ("USER", "bob"),
    ]);
    let map = rig.map_arg();
    let relays = |ip: &str| {
        let out = check(&["--map", &map], &[("TCPREMOTEIP", ip)]);
        printed(&out).contains(&"RELAYCLIENT=".to_string())
    };
    wait_for("192.0.2.44 and .45 granted", PATIENCE, || {
        relays("192.0.2.44") && relays("192.0.2.45")
    });
    assert!(!relays("192.0.2.46"), "IP wins over TCPREMOTEIP");
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}
