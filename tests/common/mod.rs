//! Helpers for the end-to-end tests: the dovegate binary as a daemon, Postfix's own
//! `postmap`, a private Postfix instance on loopback, an SMTP client, log lines.
#![allow(dead_code)]

pub mod dovecot;
pub mod fleet;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dovegate")
}

pub fn dovegate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run dovegate")
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The metrics text from `[serve] metrics` on `port`.
pub fn metrics(port: u16) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A temporary directory under /tmp that other users (Postfix, Dovecot) can traverse.
pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    set_mode(d.path(), 0o755);
    d
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Waits until `f` holds; panics with `what` after `limit`. Waiting is generous: tests
/// assert behaviour, the benchmark measures latency.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const PATIENCE: Duration = Duration::from_secs(20);

/// A config directory for postmap: Debian's "No configuration" Postfix has no main.cf, and
/// the system one must stay untouched. One directory under cargo's target/tmp for every
/// test process (nothing left in /tmp); written by rename, so processes racing to write it
/// each see a whole file.
pub fn postmap_conf() -> &'static str {
    static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = format!("{}/postmap-conf", env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).expect("mkdir postmap conf");
        let tmp = format!("{dir}/main.cf.{}", std::process::id());
        std::fs::write(&tmp, "compatibility_level = 3.6\n").expect("main.cf");
        std::fs::rename(&tmp, format!("{dir}/main.cf")).expect("main.cf");
        dir
    })
}

/// `postmap -q KEY lmdb:MAP`: Some(value) or None (exit 1). Panics on any other failure.
pub fn postmap_q(map: &Path, key: &str) -> Option<String> {
    postmap_table(&format!("lmdb:{}", map.display()), key)
}

/// Postfix's `postmap` with the test configuration directory, as run.
pub fn postmap(args: &[&str]) -> Output {
    Command::new("postmap")
        .args(["-c", postmap_conf()])
        .args(args)
        .output()
        .expect("run postmap")
}

/// `postmap -q KEY TABLE` as run (TABLE like `lmdb:PATH` or `socketmap:unix:PATH:NAME`).
pub fn postmap_query(table: &str, key: &str) -> Output {
    postmap(&["-q", key, table])
}

/// `postmap -q KEY TABLE`: Some(value) or None (exit 1). Panics on any other failure.
pub fn postmap_table(table: &str, key: &str) -> Option<String> {
    let out = postmap_query(table, key);
    match out.status.code() {
        Some(0) => Some(String::from_utf8_lossy(&out.stdout).trim_end().to_string()),
        Some(1) => None,
        _ => panic!(
            "postmap -q {key} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `postmap -s lmdb:MAP` as (key, value) pairs.
pub fn postmap_s(map: &Path) -> Vec<(String, String)> {
    let out = postmap(&["-s", &format!("lmdb:{}", map.display())]);
    assert!(
        out.status.success(),
        "postmap -s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until the whole map (`postmap -s`) satisfies `pred`, scanning at most four times
/// a second: a back-to-back scan locks every record and can starve the daemon's writer
/// (fcntl locks are not fair).
pub fn wait_for_scan(what: &str, map: &Path, pred: impl Fn(&[(String, String)]) -> bool) {
    wait_for(what, PATIENCE, || {
        let ok = pred(&postmap_s(map));
        if !ok {
            std::thread::sleep(Duration::from_millis(250));
        }
        ok
    });
}

/// A running `dovegate run`; SIGTERM on drop. Its stderr goes to a file.
pub struct Daemon {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Daemon {
    /// `dovegate run ARGS`; its log level is `info` (the tests read the summary line), or
    /// DG_TEST_LOG (e.g. `debug`) when chasing a failure.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        let stderr = dir.join(format!("dovegate-{:x}.stderr", rand_u64()));
        Daemon::spawn(Command::new(bin()), args, stderr)
    }

    /// `dovegate run ARGS` as if on the host `host`: in its own UTS namespace (root only),
    /// so two daemons on this machine tell the database different host names.
    pub fn start_as_host(dir: &Path, host: &str, args: &[&str]) -> Daemon {
        let mut cmd = Command::new("unshare");
        cmd.args(["--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\""])
            .arg(host)
            .arg(bin());
        Daemon::spawn(cmd, args, dir.join(format!("dovegate-{host}.stderr")))
    }

    /// `dovegate run ARGS` through `cmd`, a wrapper that execs the binary (it is given
    /// the binary's path as its last argument), e.g. `nsenter` into a namespace.
    pub fn start_through(mut cmd: Command, dir: &Path, args: &[&str]) -> Daemon {
        cmd.arg(bin());
        let stderr = dir.join(format!("dovegate-{:x}.stderr", rand_u64()));
        Daemon::spawn(cmd, args, stderr)
    }

    /// `CMD run ARGS` (CMD: the binary, or a wrapper that execs it) with stderr to `stderr`.
    fn spawn(mut cmd: Command, args: &[&str], stderr: PathBuf) -> Daemon {
        let child = cmd
            .arg("run")
            .args(args)
            .env(
                "DOVEGATE_LOG",
                std::env::var("DG_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn dovegate run");
        Daemon { child, stderr }
    }

    /// `dovegate run` following `log`, with the map `DIR/relay` and state `DIR/state`, plus
    /// `extra` arguments; returns once the map exists.
    pub fn follow(dir: &Path, log: &Path, extra: &[&str]) -> Daemon {
        let log = log.display().to_string();
        let mut args = vec!["--log", log.as_str()];
        args.extend_from_slice(extra);
        Daemon::with_map(dir, &args)
    }

    /// `dovegate run ARGS` with the map `DIR/relay` and state `DIR/state`; returns once the
    /// map exists and each `--log` file is followed (lines written after that are read).
    pub fn with_map(dir: &Path, args: &[&str]) -> Daemon {
        let (map, state) = (
            dir.join("relay").display().to_string(),
            dir.join("state").display().to_string(),
        );
        let mut all = vec!["--map", map.as_str(), "--state-dir", state.as_str()];
        all.extend_from_slice(args);
        let d = Daemon::start(dir, &all);
        wait_for("map created", PATIENCE, || dir.join("relay.lmdb").exists());
        for pair in args.windows(2).filter(|p| p[0] == "--log") {
            d.wait_following(Path::new(pair[1]));
        }
        d
    }

    /// Waits until the daemon says it follows `log` (from which offset, or from its start
    /// once it appears).
    pub fn wait_following(&self, log: &Path) {
        let said = format!("following {} ", log.display());
        wait_for(&said, PATIENCE, || self.log().contains(&said));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                start.elapsed() < PATIENCE,
                "dovegate did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The number after `key=` in the shutdown summary line.
    pub fn summary(&self, key: &str) -> Option<u64> {
        let log = self.log();
        let line = log.lines().rev().find(|l| l.contains("dovegate stopped"))?;
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a child we own.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// `Nov 21 09:30:01` for now, in local time (what syslog writes).
pub fn bsd_now() -> String {
    chrono::Local::now().format("%b %e %H:%M:%S").to_string()
}

/// A Dovecot 2.3 syslog login line for `ip`.
pub fn login_line(ip: &str, user: &str) -> String {
    format!(
        "{} mail dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=4242, TLS, session=<abcdEFGH1234>\n",
        bsd_now()
    )
}

/// A Dovecot 2.0-style login line for `ip`: no `session=`, so no mail session holds the
/// grant past its ttl (for tests about expiry).
pub fn sessionless_login_line(ip: &str, user: &str) -> String {
    format!(
        "{} mail dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=4242, TLS\n",
        bsd_now()
    )
}

pub fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log");
    f.write_all(text.as_bytes()).expect("append");
}

/// Four loopback ports (Dovecot's imap, imaps, pop3, pop3s; a Postfix's smtpd) standing
/// for a test's nominal base port: the same block for the same `nominal` within this process, free on 127.0.0.1
/// and ::1 when first asked for. Fixed ports collided with whatever else used them on the
/// machine (another checkout's tests: "port 14143 is in use").
pub fn dovecot_ports(nominal: u16) -> u16 {
    static BLOCKS: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    // Above the ephemeral range (32768-60999) and the Postfix ports below.
    const FIRST: u32 = 61_000;
    const COUNT: u32 = 1_100;
    let mut blocks = BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, base)) = blocks.iter().find(|(n, _)| *n == nominal) {
        return base;
    }
    let free = |p: u16| {
        std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("::1", p)).is_ok()
    };
    let start = (rand_u64() % u64::from(COUNT)) as u32;
    for i in 0..COUNT {
        let base = (FIRST + (start + i) % COUNT * 4) as u16;
        if blocks.iter().all(|&(_, b)| b != base) && (base..base + 4).all(free) {
            blocks.push((nominal, base));
            return base;
        }
    }
    panic!("no 4 free loopback ports from {FIRST}");
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A private Postfix instance: own config, queue and log, smtpd on 127.0.0.1 and ::1 at
/// a high port, `check_client_access lmdb:MAP`. Stopped on drop.
pub struct Postfix {
    pub dir: PathBuf,
    pub port: u16,
}

impl Postfix {
    pub fn start(dir: &Path, map: &Path) -> Postfix {
        let relay = format!(
            "check_client_access lmdb:{}, reject_unauth_destination",
            map.display()
        );
        Postfix::start_with(dir, &relay, "")
    }

    /// A private instance with `relay_restrictions` as smtpd_relay_restrictions and
    /// `extra` main.cf lines.
    pub fn start_with(dir: &Path, relay_restrictions: &str, extra: &str) -> Postfix {
        // A block checked free on 127.0.0.1 and ::1 now: a port derived from the pid
        // collided with another test's Dovecot under load ("bind 127.0.0.1 port 28145:
        // Address already in use", seen by scripts/stress-test).
        let port = dovecot_ports(u16::MAX - NEXT_PORT.fetch_add(1, Ordering::SeqCst));
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        set_mode(dir, 0o755);
        Command::new("chown")
            .args(["postfix", &dir.join("data").display().to_string()])
            .status()
            .expect("chown");
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
             maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\nsyslog_name = dovegate-test\n\
             inet_interfaces = loopback-only\ninet_protocols = all\nmynetworks = 127.0.0.2/32\n\
             mydestination = localhost\nsmtpd_authorized_xclient_hosts = 127.0.0.1, [::1]\n\
             smtpd_relay_restrictions = {relay_restrictions}\n\
             smtpd_banner = $myhostname ESMTP test\n{extra}",
            d = dir.display(),
        );
        std::fs::write(conf.join("main.cf"), main_cf).expect("main.cf");
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("master.cf");
        let master: String = master
            .lines()
            .map(|l| {
                if l.starts_with("smtp ") && l.contains(" inet ") {
                    format!("127.0.0.1:{port} inet n - n - - smtpd\n[::1]:{port} inet n - n - - smtpd\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(conf.join("master.cf"), master).expect("master.cf");
        let out = Command::new("postfix")
            .args(["-c", &conf.display().to_string(), "start"])
            .output()
            .expect("postfix start");
        let pf = Postfix {
            dir: dir.to_path_buf(),
            port,
        };
        assert!(
            out.status.success(),
            "postfix start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("maillog")).unwrap_or_default()
        );
        wait_for("postfix smtpd listening", PATIENCE, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        pf
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .args(["-c", &self.dir.join("conf").display().to_string(), "stop"])
            .output();
    }
}

/// One SMTP session with the test Postfix.
pub struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    pub fn connect(port: u16) -> Smtp {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect smtpd");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut c = Smtp {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        };
        let greeting = c.reply();
        assert!(greeting.starts_with("220"), "greeting: {greeting}");
        c
    }

    /// The full (possibly multi-line) reply; returns its last line.
    pub fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("read reply");
            assert!(!line.is_empty(), "smtpd closed the connection");
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.trim_end().to_string();
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("send");
        self.reply()
    }

    /// XCLIENT as `addr` (IPv6 as `IPV6:...`), then a relay attempt; returns the RCPT reply.
    pub fn relay_as(&mut self, addr: &str) -> String {
        let xaddr = if addr.contains(':') {
            format!("IPV6:{addr}")
        } else {
            addr.to_string()
        };
        let r = self.cmd(&format!("XCLIENT ADDR={xaddr} NAME=[UNAVAILABLE]"));
        assert!(r.starts_with("220"), "XCLIENT: {r}");
        let r = self.cmd("EHLO client.example");
        assert!(r.starts_with("250"), "EHLO: {r}");
        let r = self.cmd("MAIL FROM:<user@example.com>");
        assert!(r.starts_with("250"), "MAIL: {r}");
        let rcpt = self.cmd("RCPT TO:<someone@elsewhere.example>");
        let r = self.cmd("RSET");
        assert!(r.starts_with("250"), "RSET: {r}");
        rcpt
    }
}

/// The whole scrape must parse with Prometheus's own parser (`promtool check metrics`,
/// Debian package `prometheus`, installed by `scripts/deps test`): one bad line and
/// Prometheus rejects every sample of the scrape.
pub fn promtool_accepts(dir: &Path, response: &str) {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .expect("HTTP body");
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(
            std::fs::File::open({
                let f = dir.join("scrape.txt");
                std::fs::write(&f, body).unwrap();
                f
            })
            .unwrap(),
        )
        .output()
        .expect("promtool (Debian package prometheus; run scripts/deps test)");
    assert!(
        out.status.success(),
        "promtool rejects the scrape: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /metrics` over HTTP/1.0; the whole response ("" when refused or closed).
pub fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One HTTP/1.1 request on a fresh connection; the status code.
pub fn http(port: u16, head: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "{head}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
