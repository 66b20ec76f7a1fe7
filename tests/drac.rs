//! DRAC clients (`[drac]`, issue 24): a real `dracauth()` client (tests/drac/, built with
//! rpcgen and gcc against libtirpc) finds dovegate through a real rpcbind and adds
//! addresses over UDP and TCP, as POP/IMAP servers with a DRAC patch or plugin did with
//! rpc.dracd; and a real Dovecot 2.3 loading a DRAC plugin (tests/drac/drac-plugin.c,
//! built against dovecot-dev) does so for IMAP and POP3 logins. rpcbind, dovegate,
//! Dovecot and the clients run in a private network and mount namespace (loopback with the
//! clients' addresses added, a tmpfs over /run for rpcbind's socket), so the host's
//! rpcbind, if any, is never touched. Root only (namespaces); every process started is
//! stopped by a guard, also when an assertion fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::dovecot::{expiry, now, support, Down};
use common::*;

/// An address of the namespace's loopback inside `drac.allow`, and one outside.
const ALLOWED: &str = "192.0.2.1";
const OUTSIDE: &str = "198.51.100.1";
/// Mail clients' addresses (on the namespace's loopback too), for the Dovecot plugin test.
const IMAP_CLIENT: &str = "203.0.113.50";
const POP3_CLIENT: &str = "203.0.113.51";

/// Compiles the vendored sources into `dir`: rpcgen's stubs from drac.x, then gcc with
/// `args` (the output and extra sources and flags).
fn build(dir: &Path, args: &[&str]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drac");
    for f in ["drac.x", "dracauth.c", "drac-plugin.c"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let run = |cmd: &mut Command| {
        let out = cmd.current_dir(dir).output().expect("run the build");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    for (flag, file) in [
        ("-h", "drac.h"),
        ("-l", "drac_clnt.c"),
        ("-c", "drac_xdr.c"),
    ] {
        let out = run(Command::new("rpcgen").args([flag, "drac.x"]));
        std::fs::write(dir.join(file), out.stdout).unwrap();
    }
    run(Command::new("gcc")
        .args(["-O1", "-I/usr/include/tirpc"])
        .args(args)
        .args(["drac_clnt.c", "drac_xdr.c", "-ltirpc"]));
}

/// The test client, built once per test process from tests/drac/.
fn client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(format!(
                "{}/drac-client-{}",
                env!("CARGO_TARGET_TMPDIR"),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            build(&dir, &["-o", "dracauth", "dracauth.c"]);
            dir.join("dracauth")
        })
        .clone()
}

/// A private network and mount namespace held open by a sleeping process, with rpcbind.
struct Netns {
    holder: Child,
    rpcbind: Option<Child>,
}

impl Netns {
    fn new(dir: &Path) -> Netns {
        let ready = dir.join("netns-ready");
        let holder = Command::new("unshare")
            .args(["--net", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs tmpfs /run && ip link set lo up && \
                 for a in {ALLOWED} {OUTSIDE} {IMAP_CLIENT} {POP3_CLIENT}; do \
                 ip addr add $a/32 dev lo; done && \
                 touch {} && exec sleep 600",
                ready.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let mut ns = Netns {
            holder,
            rpcbind: None,
        };
        wait_for("the namespace", PATIENCE, || {
            assert!(
                ns.holder.try_wait().unwrap().is_none(),
                "the namespace could not be set up"
            );
            ready.exists()
        });
        ns
    }

    /// A command run inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder.id().to_string(),
            "--net",
            "--mount",
            program,
        ]);
        c
    }

    fn start_rpcbind(&mut self) {
        let child = self
            .cmd("rpcbind")
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("rpcbind");
        self.rpcbind = Some(child);
        wait_for("rpcbind answers", PATIENCE, || {
            self.rpcinfo().status.success()
        });
    }

    /// `rpcinfo -p` inside the namespace.
    fn rpcinfo(&self) -> Output {
        self.cmd("rpcinfo")
            .args(["-p", "127.0.0.1"])
            .output()
            .expect("rpcinfo")
    }

    /// The `rpcinfo -p` lines of DRAC (program 900101).
    fn drac_lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.rpcinfo().stdout)
            .lines()
            .filter(|l| l.split_whitespace().next() == Some("900101"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// `dracauth SERVER IP NETTYPE` inside the namespace: its exit status and output.
    fn dracauth(&self, server: &str, ip: &str, nettype: &str) -> (i32, String) {
        let out = self
            .cmd(client().to_str().unwrap())
            .args([server, ip, nettype])
            .output()
            .expect("dracauth");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn dovegate(&self, dir: &Path, config: &Path) -> Daemon {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.id().to_string(), "--net", "--mount"]);
        Daemon::start_through(cmd, dir, &["--config", &config.display().to_string()])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in self.rpcbind.iter_mut().chain(Some(&mut self.holder)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn have_tools() -> bool {
    let missing: Vec<&str> = ["unshare", "nsenter", "rpcbind", "rpcinfo", "rpcgen", "gcc"]
        .into_iter()
        .filter(|t| {
            !["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(t).exists())
        })
        .collect();
    if !missing.is_empty() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and {missing:?} (scripts/deps test)");
        return false;
    }
    true
}

/// The configuration: no log followed, DRAC clients from 192.0.2.0/24, a 10-minute ttl.
fn config(dir: &Path) -> PathBuf {
    let cfg = dir.join("dovegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nlogs = []\njournal = false\n[grant]\nttl = \"10m\"\nexclude_mynetworks = false\n\
             [map]\npath = \"{}\"\n[state]\ndir = \"{}\"\n[drac]\nallow = [\"192.0.2.0/24\"]\n",
            dir.join("relay").display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn dracauth_clients_over_udp_and_tcp_with_rpcbind() {
    if !have_tools() {
        return;
    }
    client();
    let tmp = tempdir();
    let dir = tmp.path();
    let map = dir.join("relay");
    let mut ns = Netns::new(dir);
    ns.start_rpcbind();
    let mut d = ns.dovegate(dir, &config(dir));
    wait_for("DRAC registered with rpcbind", PATIENCE, || {
        ns.drac_lines().len() == 2
    });
    let lines = ns.drac_lines();
    let port = lines[0].split(' ').nth(3).unwrap().to_string();
    assert_eq!(
        lines,
        vec![
            format!("900101 1 udp {port}"),
            format!("900101 1 tcp {port}")
        ]
    );
    assert!(d
        .log()
        .contains("registered program 900101 version 1 with rpcbind"));
    // `dovegate status` says what rpcbind tells clients.
    let cfg = dir.join("dovegate.toml").display().to_string();
    let status = ns
        .cmd(bin())
        .args(["status", "--config", &cfg])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let p: u16 = port.parse().unwrap();
    let uaddr = format!("0.0.0.0.{}.{}", p >> 8, p & 0xff);
    assert!(
        status.contains(&format!(
            "drac: clients 192.0.2.0/24; registered with rpcbind: udp {uaddr}, tcp {uaddr}"
        )),
        "{status}"
    );

    // An allowed client over UDP (dracauth's own transport): ADD_SUCCESS, and the grant
    // with the ttl's expiry.
    let before = now();
    let (code, out) = ns.dracauth(ALLOWED, "203.0.113.10", "udp");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("add succeeded"), "{out}");
    wait_for("the UDP add in the map", PATIENCE, || {
        postmap_q(&map, "203.0.113.10").is_some()
    });
    let exp = expiry(&map, "203.0.113.10").expect("an expiry");
    assert!(
        (before + 600..=now() + 600).contains(&exp),
        "expiry {exp}, ttl 600 s from {before}"
    );
    let audit = "grant 203.0.113.10 ".to_string();
    wait_for("the audit line", PATIENCE, || d.log().contains(&audit));
    let line = d
        .log()
        .lines()
        .find(|l| l.contains(&audit))
        .unwrap()
        .to_string();
    assert!(line.contains(&format!("source=drac:{ALLOWED}")), "{line}");

    // Over TCP too.
    let (code, out) = ns.dracauth(ALLOWED, "203.0.113.11", "tcp");
    assert_eq!(code, 0, "{out}");
    wait_for("the TCP add in the map", PATIENCE, || {
        postmap_q(&map, "203.0.113.11").is_some()
    });

    // A client outside drac.allow: ADD_PERM, a warning naming it, nothing granted.
    for nettype in ["udp", "tcp"] {
        let (code, out) = ns.dracauth(OUTSIDE, "203.0.113.12", nettype);
        assert_eq!(code, 1, "{nettype}: {out}");
        assert!(out.contains("permission denied"), "{out}");
    }
    wait_for("the refusal logged", PATIENCE, || {
        d.log()
            .contains(&format!("drac: {OUTSIDE} is not in drac.allow"))
    });

    // Malformed and forged messages over UDP and TCP: RPC errors or silence, never a
    // grant, and the server answers afterwards.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drac/datagrams.py");
    let out = ns
        .cmd("python3")
        .arg(&script)
        .args([ALLOWED, &port])
        .output()
        .expect("datagrams.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_string)
    };
    let words = |w: &[u32]| w.iter().map(|w| format!("{w:08x}")).collect::<String>();
    // xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier, then the accept status.
    let accepted = |xid: u32, stat: u32| words(&[xid, 1, 0, 0, 0, stat]);
    let expected = [
        // PROG_MISMATCH 1..1: DRAC's IPv6 version 2 is not served.
        ("version2", words(&[1, 1, 0, 0, 0, 2, 1, 1])),
        ("otherprog", accepted(2, 1)),
        ("proc7", accepted(3, 3)),
        ("shortarg", accepted(4, 4)),
        ("longarg", accepted(5, 4)),
        // MSG_DENIED RPC_MISMATCH 2..2
        ("rpcv3", words(&[6, 1, 1, 0, 2, 2])),
        // MSG_DENIED AUTH_ERROR AUTH_BADCRED
        ("badcred", words(&[7, 1, 1, 1, 1])),
    ];
    for (name, want) in &expected {
        assert_eq!(reply(name).as_ref(), Some(want), "{name}: {text}");
        // Over TCP, as one last fragment.
        let marker = format!("{:08x}", 0x8000_0000u32 | (want.len() / 2) as u32);
        assert_eq!(
            reply(&format!("tcp-{name}")),
            Some(format!("{marker}{want}")),
            "tcp-{name}: {text}"
        );
    }
    for silent in ["reply", "stub", "junk", "huge"] {
        assert_eq!(reply(silent), None, "{silent}: {text}");
        assert_eq!(
            reply(&format!("tcp-{silent}")).as_deref(),
            Some("closed"),
            "{text}"
        );
    }
    assert_eq!(reply("null"), Some(accepted(99, 0)), "{text}");

    // Still serving, and nothing of the above granted (judged after a later grant is in).
    let (code, out) = ns.dracauth(ALLOWED, "203.0.113.13", "udp");
    assert_eq!(code, 0, "{out}");
    wait_for("the last add in the map", PATIENCE, || {
        postmap_q(&map, "203.0.113.13").is_some()
    });
    let keys: Vec<String> = postmap_s(&map).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        vec!["203.0.113.10", "203.0.113.11", "203.0.113.13"],
        "only the allowed adds"
    );

    // A reload keeps the port (drac.port = 0: the previous one is taken again).
    signal(d.child.id(), libc::SIGHUP);
    wait_for("the reload", PATIENCE, || {
        d.log().contains("configuration reloaded")
    });
    wait_for("registered again", PATIENCE, || ns.drac_lines() == lines);
    let (code, out) = ns.dracauth(ALLOWED, "203.0.113.14", "tcp");
    assert_eq!(code, 0, "{out}");

    // Stopped: the registration is gone.
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(ns.drac_lines().is_empty(), "{:?}", ns.drac_lines());
    assert!(d
        .log()
        .contains("drac: stopped; registration removed from rpcbind"));
}

#[test]
fn registration_fails_loudly_then_succeeds_once_rpcbind_runs() {
    if !have_tools() {
        return;
    }
    client();
    let tmp = tempdir();
    let dir = tmp.path();
    let mut ns = Netns::new(dir);
    let cfg = config(dir);
    let d = ns.dovegate(dir, &cfg);
    wait_for("the failure said", PATIENCE, || {
        d.log().contains("drac: cannot register with rpcbind")
    });
    // The daemon runs on (other sources would still grant) and registers once it can.
    let start = Instant::now();
    ns.start_rpcbind();
    wait_for(
        "registered after the retry",
        Duration::from_secs(40),
        || ns.drac_lines().len() == 2,
    );
    assert!(start.elapsed() < Duration::from_secs(40));
    wait_for("the recovery said", PATIENCE, || {
        d.log().contains("registered with rpcbind")
    });
    let (code, out) = ns.dracauth(ALLOWED, "203.0.113.20", "udp");
    assert_eq!(code, 0, "{out}");

    // A reload that drops [drac] (a log file is followed instead) removes the
    // registration while the daemon runs on.
    let log = dir.join("mail.log");
    std::fs::write(&log, "").unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .split("[drac]")
        .next()
        .unwrap()
        .replace("logs = []", &format!("logs = [\"{}\"]", log.display()));
    std::fs::write(&cfg, text).unwrap();
    signal(d.child.id(), libc::SIGHUP);
    wait_for("the reload", PATIENCE, || {
        d.log().contains("configuration reloaded")
    });
    wait_for("the registration removed", PATIENCE, || {
        ns.drac_lines().is_empty()
    });
    let (code, _) = ns.dracauth(ALLOWED, "203.0.113.21", "udp");
    assert_eq!(code, 10, "no DRAC server registered any more");
}

/// IMAP and POP3 logins from `client` (bound on the namespace's loopback) to the
/// Dovecot listening on 127.0.0.1:`port` inside the namespace.
const LOGIN: &str = r#"
import socket, sys
kind, client, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(client, 0))
f = s.makefile("rwb")
def say(line):
    f.write(line + b"\r\n"); f.flush()
def until(prefix):
    while True:
        l = f.readline()
        if not l: sys.exit("closed before " + prefix.decode())
        if l.startswith(prefix): return l
f.readline()
if kind == "imap":
    say(b"a LOGIN alice alice-pass"); l = until(b"a ")
    ok = l.startswith(b"a OK")
    say(b"b LOGOUT"); until(b"b ")
else:
    say(b"USER alice"); f.readline()
    say(b"PASS alice-pass"); l = f.readline()
    ok = l.startswith(b"+OK")
    say(b"QUIT"); f.readline()
sys.exit(0 if ok else "login failed: " + l.decode())
"#;

#[test]
fn dovecot_with_a_drac_plugin_grants_imap_and_pop3_logins() {
    if !have_tools() {
        return;
    }
    if !Path::new("/usr/include/dovecot/mail-user.h").exists()
        || !Path::new("/usr/sbin/dovecot").exists()
    {
        eprintln!("skipped: needs dovecot-core and dovecot-dev (scripts/deps test)");
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path();
    // The plugin, as Dovecot loads it (lib<N>_<name>_plugin.so in mail_plugin_dir).
    let modules = dir.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    set_mode(&modules, 0o755);
    build(
        &modules,
        &[
            "-shared",
            "-fPIC",
            "-DHAVE_CONFIG_H",
            "-DDRACAUTH_NO_MAIN",
            "-I/usr/include/dovecot",
            "-o",
            "lib90_drac_plugin.so",
            "drac-plugin.c",
            "dracauth.c",
        ],
    );
    let map = dir.join("relay");
    let mut ns = Netns::new(dir);
    ns.start_rpcbind();
    let d = ns.dovegate(dir, &config(dir));
    wait_for("DRAC registered with rpcbind", PATIENCE, || {
        ns.drac_lines().len() == 2
    });
    let dv = dir.join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    let dv = dv.display().to_string();
    let _down = Down::dovecot(&dv);
    let extra = format!(
        "mail_plugin_dir = {}\nmail_plugins = $mail_plugins drac\nplugin {{\n  dracdserver = {ALLOWED}\n}}",
        modules.display()
    );
    let out = ns
        .cmd(support("dovecot.sh").to_str().unwrap())
        .args(["up", &dv, "file", "10143"])
        .env("DG_EXTRA_CONF", &extra)
        .output()
        .expect("dovecot.sh up");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = now();
    for (kind, client, port) in [
        ("imap", IMAP_CLIENT, "10143"),
        ("pop3", POP3_CLIENT, "10145"),
    ] {
        let out = ns
            .cmd("python3")
            .args(["-c", LOGIN, kind, client, port])
            .output()
            .expect("login");
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(&format!("the {kind} client granted"), PATIENCE, || {
            postmap_q(&map, client).is_some()
        });
        let exp = expiry(&map, client).unwrap();
        assert!((before + 600..=now() + 600).contains(&exp), "{kind}: {exp}");
    }
    let log = std::fs::read_to_string(format!("{dv}/dovecot.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("drac: {IMAP_CLIENT} added on {ALLOWED}")),
        "{log}"
    );
    wait_for("the audit lines", PATIENCE, || {
        d.log()
            .lines()
            .filter(|l| l.contains(&format!("source=drac:{ALLOWED}")))
            .count()
            == 2
    });
}
