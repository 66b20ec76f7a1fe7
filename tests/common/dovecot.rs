//! The Dovecot test rig (tests/support/dovecot.sh) and what the tests do with it: start and
//! stop it, an IMAP client in IDLE, a grant's expiry as Postfix sees it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

/// A file of tests/support.
pub fn support(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

/// `dovecot.sh ARGS` with `env` (DG_EXTRA_CONF, the push settings, ...); its stdout,
/// trimmed. Fails the test when the harness fails.
pub fn harness(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(support("dovecot.sh"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("dovecot.sh");
    assert!(
        out.status.success(),
        "dovecot.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `dovecot.sh ARGS` on drop (`down DIR`, `down24 DIR`, ...): stops what a test
/// started whatever happens.
pub struct Down(pub Vec<String>);

impl Down {
    /// `dovecot.sh down DIR`.
    pub fn dovecot(dir: &str) -> Down {
        Down(vec!["down".into(), dir.into()])
    }

    /// `dovecot.sh down24 DIR`.
    pub fn dovecot24(dir: &str) -> Down {
        Down(vec!["down24".into(), dir.into()])
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(support("dovecot.sh")).args(&self.0).output();
    }
}

/// Sends SIGCONT to a stopped daemon whatever happens (else it could not be stopped).
pub struct Cont(pub u32);

impl Drop for Cont {
    fn drop(&mut self) {
        super::signal(self.0, libc::SIGCONT);
    }
}

/// tests/support/idle.py: logged in and in IDLE until `logout`.
pub struct Idle {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Idle {
    pub fn start(port: u16, addr: &str) -> Idle {
        let mut child = Command::new("python3")
            .arg(support("idle.py"))
            .args([&port.to_string(), addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("idle.py");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "idling", "idle.py did not reach IDLE");
        Idle { child, stdin }
    }

    pub fn logout(mut self) {
        let mut stdin = self.stdin.take().unwrap();
        writeln!(stdin, "logout").unwrap();
        drop(stdin);
        assert!(self.child.wait().unwrap().success(), "idle.py logout");
    }

    /// The python client's pid (not Dovecot's).
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The expiry Postfix sees for `ip` (unix seconds), if it has a grant.
pub fn expiry(map: &Path, ip: &str) -> Option<i64> {
    let v = super::postmap_q(map, ip)?;
    let at = v
        .split_whitespace()
        .find_map(|w| w.strip_prefix("expires="))?;
    dovegate::timefmt::parse_rfc3339(at)
}

pub fn now() -> i64 {
    dovegate::timefmt::now()
}

/// The Debian 13 root with Dovecot 2.4 (`dovecot.sh trixie-root`: built once, cached),
/// and the uid of its `dovecot` user.
pub fn debian13_root(dv: &str) -> (String, u32) {
    let root = harness(&["trixie-root", dv], &[]);
    let passwd = std::fs::read_to_string(format!("{root}/etc/passwd")).unwrap();
    let uid = passwd
        .lines()
        .find_map(|l| l.strip_prefix("dovecot:x:"))
        .and_then(|r| r.split(':').next())
        .and_then(|u| u.parse().ok())
        .expect("a dovecot user in the root");
    (root, uid)
}

/// What tests/support/logins.py expects of its scenarios.
pub struct Expected {
    /// The successful public clients.
    pub granted: std::collections::BTreeSet<String>,
    /// The clients of failed, aborted or local logins.
    pub refused: Vec<String>,
}

/// tests/support/logins.py: every scenario must have its expected outcome (all
/// successful logins succeed).
pub fn run_logins(port_base: u16) -> Expected {
    let out = Command::new("python3")
        .arg(support("logins.py"))
        .arg(port_base.to_string())
        .output()
        .expect("python3 logins.py");
    assert!(
        out.status.success(),
        "logins.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("logins.py JSON");
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    Expected {
        granted: list("granted").into_iter().collect(),
        refused: list("refused"),
    }
}

/// `n` successful forwarded IMAP logins for `addr`; panics if one fails; their durations
/// (seconds).
pub fn timed_logins(port_base: u16, n: usize, addr: &str) -> Vec<f64> {
    let out = Command::new("python3")
        .arg(support("logins.py"))
        .args([&port_base.to_string(), "time", &n.to_string(), addr])
        .output()
        .expect("python3 logins.py");
    assert!(
        out.status.success(),
        "logins must succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("logins.py JSON");
    v["secs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One forwarded IMAP LOGIN (from the trusted 127.0.0.9, for `addr`); Dovecot's answer.
pub fn imap_login(port: u16, addr: &str, user: &str, password: &str) -> String {
    let script = r#"
import socket, sys
port, addr, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket(); s.settimeout(20); s.bind(("127.0.0.9", 0)); s.connect(("127.0.0.1", port))
f = s.makefile("rb")
def until(tag):
    while True:
        line = f.readline().decode()
        if not line or line.startswith(tag + " "):
            return line.strip()
f.readline()
s.sendall(('a ID ("x-originating-ip" "%s")\r\n' % addr).encode()); until("a")
s.sendall(('b LOGIN "%s" "%s"\r\n' % (user, password)).encode()); print(until("b"))
"#;
    login_script(script, port, addr, user, password)
}

/// One forwarded POP3 login (XCLIENT from the trusted 127.0.0.9, for `addr`); Dovecot's
/// answer to PASS.
pub fn pop3_login(port: u16, addr: &str, user: &str, password: &str) -> String {
    let script = r#"
import socket, sys
port, addr, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket(); s.settimeout(20); s.bind(("127.0.0.9", 0)); s.connect(("127.0.0.1", port))
f = s.makefile("rb")
f.readline()
for line in ("XCLIENT ADDR=" + addr, "USER " + user):
    s.sendall((line + "\r\n").encode())
    r = f.readline().decode()
    assert r.startswith("+OK"), r
s.sendall(("PASS %s\r\n" % password).encode()); print(f.readline().decode().strip())
s.sendall(b"QUIT\r\n"); f.readline()
"#;
    login_script(script, port, addr, user, password)
}

/// The keys of the LMDB map, as Postfix's `postmap -s` lists them.
pub fn map_keys(map: &Path) -> std::collections::BTreeSet<String> {
    super::postmap_s(map).into_iter().map(|(k, _)| k).collect()
}

/// The code block that follows the first README line containing `title`.
pub fn readme_block(title: &str) -> String {
    let readme = include_str!("../../README.md");
    let at = readme.find(title).expect("the README section");
    let rest = &readme[at..];
    let start = rest.find("```\n").expect("a code block") + 4;
    let len = rest[start..].find("```\n").expect("its end");
    rest[start..start + len].to_string()
}

/// The README's titles of its Dovecot snippets (for readme_block).
pub const README_EVENTS_23: &str = "Dovecot 2.3 (`/etc/dovecot/conf.d/95-dovegate-events.conf`";
pub const README_EVENTS_24: &str = "Dovecot 2.4 (the unix driver";
pub const README_POSTLOGIN_23: &str = "Dovecot 2.3 (`conf.d/10-master.conf`";
pub const README_POLICY_23: &str = "Dovecot 2.3 (`conf.d/10-auth.conf`";
pub const README_POLICY_24: &str = "Dovecot 2.4: the same settings, the attributes as a block";

/// The lines a Dovecot 2.4 configuration must start with.
pub const DOVECOT_24_HEADER: &str =
    "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n";

/// A Debian 13 root with Dovecot 2.4 already on this host (never built here).
pub fn trixie_root() -> Option<String> {
    let cache =
        std::env::var("DOVEGATE_TEST_CACHE").unwrap_or_else(|_| "/var/cache/dovegate-test".into());
    let mut roots: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.contains("trixie") && !n.ends_with(".lock") && !n.ends_with(".log")
            }) && p.join("usr/bin/doveconf").exists()
        })
        .collect();
    roots.sort();
    roots.pop().map(|p| p.display().to_string())
}

/// `doveconf -c FILE ARGS` of this host's Dovecot (2.3), FILE holding `conf`.
pub fn doveconf23(conf: &str, args: &[&str]) -> Output {
    let dir = super::tempdir();
    let file = dir.path().join("dovecot.conf");
    std::fs::write(&file, conf).unwrap();
    Command::new("doveconf")
        .arg("-c")
        .arg(&file)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("doveconf")
}

/// The same with Dovecot 2.4 from `root` (trixie_root). The root stays untouched: the
/// file's directory is bind-mounted on its /mnt in a private mount namespace.
pub fn doveconf24(root: &str, conf: &str, args: &[&str]) -> Output {
    let dir = super::tempdir();
    std::fs::write(dir.path().join("dovecot.conf"), conf).unwrap();
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2/mnt" && r=$2 && shift 2 && exec chroot "$r" doveconf -c /mnt/dovecot.conf "$@""#)
        .args(["sh", &dir.path().display().to_string(), root])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("unshare")
}

/// Runs a login `script` (python3: port, address, user, password); what it printed.
fn login_script(script: &str, port: u16, addr: &str, user: &str, password: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script, &port.to_string(), addr, user, password])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
