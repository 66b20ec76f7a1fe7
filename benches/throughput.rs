//! Throughput, latency, first-start and memory benchmark (not a test). Run with
//! `scripts/bench`; it prints one table of results and ratios at the end.
//!
//! 1. Three log shapes (`DOVEGATE_BENCH_MB` each, default 500): `mixed` (about 1% logins
//!    among Postfix and Dovecot noise), `failed20` (20% failed-login lines) and `brute50`
//!    (50%, three Dovecot 2.x failure wordings). Each is replayed on one core through the
//!    daemon's matching path and `dovegate test`, and, in the same run on the same core,
//!    through `grep -cE` and a Perl matcher (pop-before-smtp's approach): the baselines.
//! 2. Latency from an appended login line to the grant visible to Postfix's `postmap -q`:
//!    on an idle map with 20 noise lines/s, and under 2,000 noise + 200 logins per second
//!    (with the commits per second that load causes).
//! 3. A first start on a 1 GB log spanning hours: time and bytes read, against a restart
//!    from a checkpoint.
//! 4. The daemon's RSS and idle CPU with 100k live grants.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovegate::frame::FrameParser;
use dovegate::pattern::PatternSet;
use dovegate::scan::{Scanned, Scanner, Visit};
use dovegate::source::lines::{Chunk, ChunkReader};
use dovegate::source::DaemonSink;

/// What the daemon finds with `grant.session_hold = 0`: successful logins.
const LOGIN: &str = "(imap|pop3)-login: (Info: )?(Login|Logged in): .*rip=";
/// What it finds by default: logins and the ends of mail sessions (issue 12's holds).
const SESSION_END: &str =
    ": (imap|pop3|imap-hibernate)\\(.*\\)<[0-9]+><[A-Za-z0-9+/=]+>: (Info: )?Disconnected";

/// Pins this thread (and the children it spawns) to the given cores.
fn pin_to(cores: std::ops::Range<usize>) {
    // SAFETY: plain libc calls on a zeroed cpu_set_t for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cores {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A small deterministic generator (xorshift), so every run replays the same log.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A log's mix: per mille of successful logins and of failed-login lines.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    logins: u64,
    failures: u64,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "mixed",
        logins: 10,
        failures: 30,
    },
    Shape {
        name: "failed20",
        logins: 10,
        failures: 200,
    },
    Shape {
        name: "brute50",
        logins: 10,
        failures: 500,
    },
];

/// Writes `mb` megabytes of log of `shape`; returns (lines, login lines, session ends).
fn generate(path: &Path, mb: u64, shape: Shape) -> (u64, u64, u64) {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).expect("create bench log"));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut bytes, mut lines, mut logins, mut ends) = (0u64, 0u64, 0u64, 0u64);
    let target = mb * 1_000_000;
    let mut line = String::with_capacity(512);
    while bytes < target {
        line.clear();
        // In order through one day, as a real log is (the hour's zone offset is cached).
        let secs = bytes * 86_399 / target;
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        let ts = format!("Nov 21 {h:02}:{m:02}:{s:02} mail");
        let ip = format!(
            "{}.{}.{}.{}",
            1 + rng.below(223),
            rng.below(256),
            rng.below(256),
            1 + rng.below(254)
        );
        let pid = 1000 + rng.below(60000);
        let qid = format!("{:X}", rng.next() & 0xFF_FFFF_FFFF);
        let roll = rng.below(1000);
        // Failures first, then logins, then the noise mix (kinds 40..1000).
        let kind = if roll < shape.failures {
            10 + roll % 30
        } else if roll < shape.failures + shape.logins {
            roll % 10
        } else {
            40 + rng.below(960)
        };
        use std::fmt::Write as _;
        let _ = match kind {
            0..=9 => {
                logins += 1;
                let svc = if kind % 2 == 0 { "imap" } else { "pop3" };
                writeln!(line, "{ts} dovecot: {svc}-login: Login: user=<user{}@example.com>, method=PLAIN, rip={ip}, lip=192.0.2.10, mpid={pid}, TLS, session=<{qid}AbCd+/12>", rng.below(5000))
            }
            10..=19 => writeln!(line, "{ts} dovecot: imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<user{}>, method=PLAIN, rip={ip}, lip=192.0.2.10, TLS, session=<{qid}>", rng.below(5000)),
            20..=29 => writeln!(line, "{ts} dovecot: pop3-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<admin{}>, method=PLAIN, rip={ip}, lip=192.0.2.10, session=<{qid}>", rng.below(5000)),
            30..=39 => writeln!(line, "{ts} dovecot: imap-login: Login aborted: Connection closed (auth failed, 3 attempts in 16 secs) (auth_failed): user=<info{}>, method=PLAIN, rip={ip}, lip=192.0.2.10, TLS, session=<{qid}>", rng.below(5000)),
            40..=69 => {
                ends += 1;
                writeln!(line, "{ts} dovecot: imap(user{}@example.com)<{pid}><{qid}>: Disconnected: Logged out in=120 out=2048 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0", rng.below(5000))
            }
            70..=299 => writeln!(line, "{ts} postfix/smtpd[{pid}]: connect from unknown[{ip}]"),
            300..=499 => writeln!(line, "{ts} postfix/smtpd[{pid}]: disconnect from unknown[{ip}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"),
            500..=649 => writeln!(line, "{ts} postfix/cleanup[{pid}]: {qid}: message-id=<{}.{}@example.com>", rng.next(), rng.below(99999)),
            650..=799 => writeln!(line, "{ts} postfix/smtp[{pid}]: {qid}: to=<someone{}@example.org>, relay=mx.example.org[{ip}]:25, delay=0.52, delays=0.1/0.01/0.2/0.21, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as {qid})", rng.below(9999)),
            800..=899 => writeln!(line, "{ts} postfix/qmgr[{pid}]: {qid}: from=<sender{}@example.net>, size={}, nrcpt=1 (queue active)", rng.below(9999), rng.below(100000)),
            900..=949 => writeln!(line, "{ts} postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 <x@example.org>: Relay access denied; from=<a@b.example> to=<x@example.org> proto=ESMTP helo=<client.example>"),
            _ => writeln!(line, "{ts} dovecot: auth: passwd-file(user{},{ip},<{qid}>): unknown user", rng.below(5000)),
        };
        out.write_all(line.as_bytes()).expect("write bench log");
        bytes += line.len() as u64;
        lines += 1;
    }
    out.flush().expect("flush");
    (lines, logins, ends)
}

/// dovegate's matching path over the whole file, with or without the session-end
/// patterns; returns (seconds, (logins found, session ends found)).
fn dovegate_pass(path: &Path, sessions: bool) -> (f64, (u64, u64)) {
    let services = ["imap".to_string(), "pop3".to_string()];
    let patterns =
        Arc::new(PatternSet::load_for(None, &services, &[], sessions).expect("patterns"));
    let mut scanner = Scanner::new(
        FrameParser::new(&["dovecot"]),
        patterns,
        &services,
        16384,
        Visit::Logins,
    );
    let mut sink = DaemonSink::new(dovegate::telemetry::Reporter::standalone("bench"), false);
    let now = dovegate::timefmt::now();
    let mut file = File::open(path).expect("open");
    let mut reader = ChunkReader::new(16384, 0);
    let (mut found, mut ends) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        match reader.read_chunk(&mut file).expect("read") {
            Chunk::Eof => break,
            Chunk::Partial => {}
            Chunk::Lines(chunk, _) => {
                let _: Scanned = scanner.scan(chunk, now, &mut sink);
                found += sink.take().len() as u64;
                ends += sink.take_ends().len() as u64;
            }
        }
    }
    (start.elapsed().as_secs_f64(), (found, ends))
}

/// Runs a baseline command pinned to core 0; returns (seconds, its stdout).
fn timed(cmd: &mut Command) -> (f64, String) {
    let start = Instant::now();
    let out = cmd.env("LC_ALL", "C").output().expect("baseline command");
    (
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn best_of<T>(n: usize, mut f: impl FnMut() -> (f64, T)) -> (f64, T) {
    let mut best = f();
    for _ in 1..n {
        let r = f();
        if r.0 < best.0 {
            best = r;
        }
    }
    best
}

/// The results table: one row per measurement, with its baseline and target.
#[derive(Default)]
struct Table(Vec<[String; 4]>);

impl Table {
    fn row(&mut self, what: &str, value: String, against: String, target: &str) {
        println!("  {what}: {value}  {against}");
        self.0
            .push([what.to_string(), value, against, target.to_string()]);
    }

    fn print(&self) {
        println!();
        println!("| measurement | dovegate | baseline / ratio | target |");
        println!("| --- | --- | --- | --- |");
        for [a, b, c, d] in &self.0 {
            println!("| {a} | {b} | {c} | {d} |");
        }
    }
}

fn postmap_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("pmconf");
    std::fs::create_dir_all(&conf).expect("pmconf");
    std::fs::write(conf.join("main.cf"), "compatibility_level = 3.6\n").expect("main.cf");
    conf
}

fn postmap_has(conf: &Path, map: &Path, ip: &str) -> bool {
    Command::new("postmap")
        .arg("-c")
        .arg(conf)
        .args(["-q", ip])
        .arg(format!("lmdb:{}", map.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `dovegate run` on its own log, map and state directory, stopped on drop.
struct Daemon {
    child: std::process::Child,
    dir: PathBuf,
    log: PathBuf,
    map: PathBuf,
}

impl Daemon {
    /// `fresh`: remove the map too (grants left by an earlier run would be "visible" at
    /// once); else keep a map the caller prepared.
    fn start(dir: &Path, fresh: bool, extra: &[&str]) -> Daemon {
        let log: Option<&Path> = None;
        if fresh {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(dir.join("state"));
        std::fs::create_dir_all(dir).expect("daemon dir");
        let log = log.map_or_else(|| dir.join("daemon.log"), Path::to_path_buf);
        if !log.exists() {
            File::create(&log).expect("log");
        }
        let map = dir.join("relay");
        let child = Command::new(env!("CARGO_BIN_EXE_dovegate"))
            .args(["run", "--log"])
            .arg(&log)
            .arg("--map")
            .arg(&map)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env_remove("DOVEGATE_CONFIG")
            .stderr(File::create(dir.join("daemon.stderr")).expect("stderr file"))
            .spawn()
            .expect("start dovegate run");
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
            log,
            map,
        };
        let start = Instant::now();
        while !d.dir.join("relay.lmdb").exists() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        d
    }

    fn append(&self, text: &str) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("append to log");
    }

    /// Stops it (SIGTERM) and returns its stderr.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.join("daemon.stderr")).unwrap_or_default()
    }

    fn proc_field(&self, file: &str, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn login_line(ip: &str) -> String {
    format!(
        "{} mail dovecot: imap-login: Login: user=<u>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, TLS, session=<x>\n",
        chrono::Local::now().format("%b %e %H:%M:%S")
    )
}

fn noise_line(i: u64) -> String {
    format!(
        "{} mail postfix/smtpd[{}]: connect from unknown[203.0.113.{}]\n",
        chrono::Local::now().format("%b %e %H:%M:%S"),
        1000 + i % 30000,
        1 + i % 250
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Append -> visible to `postmap -q`, 100 logins at random gaps, 20 noise lines/s beside.
fn latency_idle(dir: &Path) -> Vec<f64> {
    let conf = postmap_conf(dir);
    let d = Daemon::start(&dir.join("idle"), true, &[]);
    let _ = postmap_has(&conf, &d.map, "192.0.2.1");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let (stop, log) = (Arc::clone(&stop), d.log.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .and_then(|mut f| f.write_all(noise_line(i).as_bytes()));
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut samples = Vec::new();
    for i in 0..100 {
        let ip = format!("198.18.{}.{}", i / 200, i % 200 + 1);
        let start = Instant::now();
        d.append(&login_line(&ip));
        while !postmap_has(&conf, &d.map, &ip) {
            if start.elapsed() > Duration::from_secs(10) {
                eprintln!("grant for {ip} not visible after 10 s");
                break;
            }
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        // An idle map: the next login comes after the commit interval (250 ms) has run out.
        std::thread::sleep(Duration::from_millis(300 + rng.below(500)));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = noise.join();
    d.stop();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples
}

/// 2,000 noise + 200 logins per second for 10 s: latency of every 10th login (read with
/// the same fcntl-locked reader Postfix uses) and the commits the daemon made.
fn latency_load(dir: &Path) -> (Vec<f64>, f64) {
    let d = Daemon::start(&dir.join("load"), true, &[]);
    let seconds = 10u64;
    let watch: Arc<std::sync::Mutex<Vec<(String, Instant)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (watch, done, map) = (Arc::clone(&watch), Arc::clone(&done), d.map.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut m =
                dovegate::store::LmdbMap::open(&map, "OK", dovegate::store::OpenMode::ReadOnly)
                    .expect("open map");
            use dovegate::store::AdminStore;
            loop {
                let pending: Vec<(String, Instant)> = watch.lock().unwrap().clone();
                if pending.is_empty() && done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                for (ip, at) in pending {
                    let addr: std::net::IpAddr = ip.parse().unwrap();
                    if m.get(addr).ok().flatten().is_some() {
                        samples.push(at.elapsed().as_secs_f64() * 1000.0);
                        watch.lock().unwrap().retain(|(i, _)| *i != ip);
                    } else if at.elapsed() > Duration::from_secs(10) {
                        eprintln!("load: {ip} not visible after 10 s");
                        watch.lock().unwrap().retain(|(i, _)| *i != ip);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        })
    };
    let started = Instant::now();
    let mut n = 0u64;
    for tick in 0..seconds * 100 {
        let mut text = String::new();
        for j in 0..20 {
            text.push_str(&noise_line(tick * 20 + j));
        }
        let mut fresh = Vec::new();
        for j in 0..2 {
            n += 1;
            let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            text.push_str(&login_line(&ip));
            if (tick * 2 + j) % 10 == 0 {
                fresh.push(ip);
            }
        }
        d.append(&text);
        let now = Instant::now();
        watch
            .lock()
            .unwrap()
            .extend(fresh.into_iter().map(|ip| (ip, now)));
        let next = started + Duration::from_millis((tick + 1) * 10);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut samples = reader.join().unwrap_or_default();
    let log = d.stop();
    let commits: f64 = log
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("commits="))
        .filter_map(|v| v.parse().ok())
        .next_back()
        .unwrap_or(f64::NAN);
    samples.sort_by(|a, b| a.total_cmp(b));
    (samples, commits / elapsed)
}

/// A first start on a 1 GB log of 12 hours (ttl 30m): seconds until caught up and bytes
/// read; then a restart from the checkpoint.
fn first_start(dir: &Path) -> Option<(f64, u64, f64, u64)> {
    let dir = dir.join("first");
    std::fs::create_dir_all(&dir).ok()?;
    let log = dir.join("first.log");
    {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&log).ok()?);
        let now = dovegate::timefmt::now();
        let total: u64 = 1_000_000_000;
        let mut written = 0u64;
        let mut i = 0u64;
        while written < total {
            let t = now - 12 * 3600 + (12 * 3600 * written / total) as i64;
            let ts = chrono::DateTime::from_timestamp(t, 0)?.with_timezone(&chrono::Local);
            let line = format!(
                "{} mail postfix/smtpd[{}]: disconnect from unknown[203.0.113.{}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5\n",
                ts.format("%b %e %H:%M:%S"),
                1000 + i % 30000,
                1 + i % 250
            );
            out.write_all(line.as_bytes()).ok()?;
            written += line.len() as u64;
            i += 1;
        }
        out.flush().ok()?;
    }
    let size = std::fs::metadata(&log).ok()?.len();
    let _ = Command::new("cat").arg(&log).stdout(Stdio::null()).status();
    let mut results = Vec::new();
    let _ = std::fs::remove_dir_all(dir.join("state"));
    for _ in 0..2 {
        let started = Instant::now();
        // Not Daemon::start: the state (checkpoint) must survive for the second run.
        let child = Command::new(env!("CARGO_BIN_EXE_dovegate"))
            .args(["run", "--ttl", "30m", "--log"])
            .arg(&log)
            .arg("--map")
            .arg(dir.join("relay"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env_remove("DOVEGATE_CONFIG")
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let d = Daemon {
            child,
            dir: dir.clone(),
            log: log.clone(),
            map: dir.join("relay"),
        };
        // Caught up: the checkpoint names the end of the file.
        let caught_up = || {
            std::fs::read_dir(dir.join("state/checkpoints"))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .any(|t| t.contains(&format!("\"offset\": {size}")))
        };
        let mut rchar = 0;
        while !caught_up() && started.elapsed() < Duration::from_secs(120) {
            rchar = d.proc_field("io", "rchar:").unwrap_or(rchar);
            std::thread::sleep(Duration::from_millis(5));
        }
        rchar = d.proc_field("io", "rchar:").unwrap_or(rchar);
        results.push((started.elapsed().as_secs_f64(), rchar));
        d.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some((results[0].0, results[0].1, results[1].0, results[1].1))
}

/// The daemon's RSS and its anonymous part (kB), and idle CPU (% of one core over 20 s),
/// with 100k live grants.
fn memory_100k(dir: &Path) -> (u64, u64, f64) {
    let dir = dir.join("mem");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mem dir");
    {
        use dovegate::store::CommitStore;
        let mut m = dovegate::store::LmdbMap::open(
            &dir.join("relay"),
            "OK",
            dovegate::store::OpenMode::Create,
        )
        .expect("map");
        // Within the default ttl (30m): a longer expiry would be capped (rewritten) at start.
        let until = dovegate::timefmt::now() + 1500;
        let grants: Vec<(std::net::IpAddr, i64)> = (0..100_000u32)
            .map(|i| {
                (
                    std::net::IpAddr::from([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                    until,
                )
            })
            .collect();
        m.upsert(&grants).expect("fill map");
    }
    let d = Daemon::start(&dir, false, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let t0 = d.cpu_ticks();
    std::thread::sleep(Duration::from_secs(20));
    let ticks = d.cpu_ticks() - t0;
    let rss = d.proc_field("status", "VmRSS:").unwrap_or(0);
    let anon = d.proc_field("status", "RssAnon:").unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
    (rss, anon, ticks as f64 / hz / 20.0 * 100.0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs benches in test mode: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: run with `scripts/bench` (cargo bench --bench throughput)");
        return;
    }
    let mb: u64 = std::env::var("DOVEGATE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = PathBuf::from(
        std::env::var("DOVEGATE_BENCH_DIR").unwrap_or_else(|_| "/tmp/dovegate-bench".into()),
    );
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut table = Table::default();
    let bin = env!("CARGO_BIN_EXE_dovegate");
    // DOVEGATE_BENCH_ONLY=throughput,latency,first-start,memory: a part, while iterating.
    let only = std::env::var("DOVEGATE_BENCH_ONLY").ok();
    let run = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == part))
    };
    for shape in SHAPES.into_iter().filter(|_| run("throughput")) {
        let log = dir.join(format!("bench-{}-{mb}MB.log", shape.name));
        let t = Instant::now();
        let (lines, logins, ends) = generate(&log, mb, shape);
        let size = std::fs::metadata(&log).expect("stat").len() as f64 / 1e6;
        println!(
            "{}: {size:.0} MB, {lines} lines, {logins} logins, {ends} session ends, generated in {:.1}s",
            shape.name,
            t.elapsed().as_secs_f64()
        );
        let _ = Command::new("cat").arg(&log).stdout(Stdio::null()).status();
        pin_to(0..1);
        let (dg_secs, found) = best_of(3, || dovegate_pass(&log, true));
        assert_eq!(found, (logins, ends), "dovegate found every login and end");
        let (dg_off_secs, found) = best_of(3, || dovegate_pass(&log, false));
        assert_eq!(found, (logins, 0), "without sessions, only logins");
        let (test_secs, _) = best_of(3, || {
            timed(
                Command::new("taskset")
                    .args(["-c", "0", bin, "test"])
                    .arg(&log)
                    .env_remove("DOVEGATE_CONFIG"),
            )
        });
        // The baselines get one regex per alternative, as their users write them: `grep -e A
        // -e B`, Perl's `/A/ || /B/` (one alternation with `.*` makes Perl crawl at 25 MB/s).
        let grep = |regexes: &[&str], expect: u64| {
            let (secs, count) = best_of(3, || {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", "0", "grep", "-cE"]);
                for r in regexes {
                    cmd.args(["-e", r]);
                }
                timed(cmd.arg(&log))
            });
            assert_eq!(count, expect.to_string(), "grep -cE {regexes:?}");
            secs
        };
        let perl = |regexes: &[&str]| {
            let tests: Vec<String> = regexes
                .iter()
                .map(|r| {
                    let r = r
                        .replace('(', "(?:")
                        .replace("\\(?:", "\\(")
                        .replace('/', "\\/");
                    format!("/{r}/")
                })
                .collect();
            let prog = format!(
                "$n++ if {}; END {{ print $n+0, qq(\\n) }}",
                tests.join(" || ")
            );
            best_of(2, || {
                timed(
                    Command::new("taskset")
                        .args(["-c", "0", "perl", "-ne", &prog])
                        .arg(&log),
                )
            })
            .0
        };
        let (grep_eq, perl_eq) = (
            grep(&[LOGIN, SESSION_END], logins + ends),
            perl(&[LOGIN, SESSION_END]),
        );
        let (grep_login, perl_login) = (grep(&[LOGIN], logins), perl(&[LOGIN]));
        let mbs = |secs: f64| format!("{:.0} MB/s", size / secs);
        let against = |grep: f64, perl: f64, secs: f64| {
            format!(
                "grep -cE {} ({:.2}x), perl {} ({:.2}x)",
                mbs(grep),
                grep / secs,
                mbs(perl),
                perl / secs
            )
        };
        table.row(
            &format!(
                "{}: daemon matching path, default (logins + session ends)",
                shape.name
            ),
            mbs(dg_secs),
            against(grep_eq, perl_eq, dg_secs),
            ">= 1.5x grep, >= 3x perl",
        );
        table.row(
            &format!(
                "{}: daemon, grant.session_hold = 0 (logins only)",
                shape.name
            ),
            mbs(dg_off_secs),
            against(grep_login, perl_login, dg_off_secs),
            ">= 1.5x grep, >= 3x perl",
        );
        table.row(
            &format!("{}: dovegate test, default", shape.name),
            mbs(test_secs),
            format!(
                "{:.2}x grep, {:.2}x perl (logins + session ends)",
                grep_eq / test_secs,
                perl_eq / test_secs
            ),
            ">= 1.5x grep, >= 3x perl",
        );
        if std::env::var("DOVEGATE_BENCH_KEEP").is_err() {
            let _ = std::fs::remove_file(&log);
        }
    }
    // The daemon and the postmap readers get every core back, as in production.
    pin_to(0..std::thread::available_parallelism().map_or(1, |n| n.get()));
    if run("latency") {
        let idle = latency_idle(&dir);
        table.row(
            "append -> postmap -q, idle map, 20 noise lines/s (100 logins)",
            format!(
                "p50 {:.1} ms, p95 {:.1} ms, worst {:.1} ms",
                percentile(&idle, 0.5),
                percentile(&idle, 0.95),
                percentile(&idle, 1.0)
            ),
            String::new(),
            "p95 < 20 ms",
        );
        let (load, commits) = latency_load(&dir);
        table.row(
            "append -> visible, 2,000 noise + 200 logins/s (10 s)",
            format!(
                "p50 {:.0} ms, p95 {:.0} ms, worst {:.0} ms; {commits:.1} commits/s",
                percentile(&load, 0.5),
                percentile(&load, 0.95),
                percentile(&load, 1.0)
            ),
            format!("{} samples", load.len()),
            "p95 < 300 ms, <= 5 commits/s",
        );
    }
    let first = run("first-start").then(|| first_start(&dir)).flatten();
    if let Some((first, first_read, again, again_read)) = first {
        table.row(
            "first start, 1 GB log of 12 h, ttl 30m",
            format!("{first:.2} s, read {:.0} MB", first_read as f64 / 1e6),
            format!(
                "restart from checkpoint {again:.2} s, read {:.0} MB",
                again_read as f64 / 1e6
            ),
            "reads ~ the last ttl + one bisection",
        );
    }
    if run("memory") {
        let (rss, anon, cpu) = memory_100k(&dir);
        table.row(
            "daemon with 100k live grants",
            format!(
                "RSS {:.1} MB ({:.1} MB heap and stacks), idle CPU {cpu:.2}% of a core",
                rss as f64 / 1024.0,
                anon as f64 / 1024.0
            ),
            String::new(),
            "RSS <= 24 MB",
        );
    }
    table.print();
}
