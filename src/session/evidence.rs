//! Evidence that a mail session is still open, for the hold (see `session`).
//!
//! A login line names its mail process (`mpid=`), but a forged line can name any pid: a
//! live process is evidence only when it is that session's, i.e. an `imap` process whose
//! title (Dovecot's `verbose_proctitle = yes`: `dovecot/imap [USER IP STATE]`) names the
//! session's user and client address, or one that `doveadm who` lists with them. Without
//! verbose_proctitle the title is a bare `dovecot/imap`; then only `doveadm who` can tell.
//!
//! `doveadm who` is a child process: it runs on its own thread, bounded in time and
//! output, and the probe reads its last answer, so a check never waits for it.

use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::model::saved::Evidence;

/// The session a probe is asked about.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub pid: u32,
    pub user: Option<&'a str>,
    pub ip: IpAddr,
}

/// Looks at this host for a session's mail process. `now` is the caller's clock.
pub trait Probe: Send {
    fn check(&mut self, claim: &Claim<'_>, now: i64) -> Evidence;
}

/// No process can be seen (`dovegate test`, logs from another host, unit tests).
pub struct NoProbe;

impl Probe for NoProbe {
    fn check(&mut self, _: &Claim<'_>, _: i64) -> Evidence {
        Evidence::None
    }
}

/// Longest process title read.
const MAX_TITLE: u64 = 4096;

/// The probe of this host: /proc, then `doveadm who`.
pub struct HostProbe {
    proc_root: PathBuf,
    who: Option<WhoRunner>,
}

impl HostProbe {
    /// `who`: the `doveadm who -1` command line (empty: not used); its answer is
    /// refreshed at most every `refresh`.
    pub fn new(who: &[String], refresh: Duration) -> HostProbe {
        HostProbe {
            proc_root: PathBuf::from("/proc"),
            who: (!who.is_empty()).then(|| WhoRunner::new(who.to_vec(), refresh)),
        }
    }
}

impl Probe for HostProbe {
    fn check(&mut self, claim: &Claim<'_>, _now: i64) -> Evidence {
        let dir = self.proc_root.join(claim.pid.to_string());
        let Some(title) = read_bounded(&dir.join("cmdline")) else {
            return Evidence::None;
        };
        let comm = read_bounded(&dir.join("comm")).unwrap_or_default();
        // The kernel's name of the executable, which the process title does not change.
        if comm.trim_end() != "imap" {
            return Evidence::None;
        }
        match title_names(&title, claim) {
            Some(true) => Evidence::Process,
            Some(false) => Evidence::None,
            None => match &self.who {
                Some(w) if w.lists(claim) => Evidence::DoveadmWho,
                _ => Evidence::None,
            },
        }
    }
}

fn read_bounded(path: &std::path::Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_TITLE).read_to_end(&mut buf).ok()?;
    if buf.is_empty() {
        return None;
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Whether an imap process title names the claim's user and address: Some(true) it does,
/// Some(false) it names another session, None it names none (verbose_proctitle off).
pub fn title_names(cmdline: &str, claim: &Claim<'_>) -> Option<bool> {
    let title = cmdline.split('\0').next().unwrap_or("");
    let (name, rest) = title.split_once(" [")?;
    if name != "imap" && !name.ends_with("/imap") {
        return Some(false);
    }
    let inner = rest.strip_suffix(']').unwrap_or(rest);
    let Some(user) = claim.user else {
        return Some(false);
    };
    // `[USER IP STATE]`: the user may hold spaces; the address follows it.
    let Some(after) = inner.strip_prefix(user).and_then(|r| r.strip_prefix(' ')) else {
        return Some(false);
    };
    let ip = after.split(' ').next().unwrap_or("");
    Some(ip.parse::<IpAddr>().is_ok_and(|a| same_ip(a, claim.ip)))
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// One line of `doveadm who -1`: `USER PROTO PID IP` (the user may hold spaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoEntry {
    pub user: String,
    pub proto: String,
    pub pid: u32,
    pub ip: Option<IpAddr>,
}

/// Parses `doveadm who -1` output; the header and odd lines are skipped. Dovecot 2.3 prints
/// `USER PROTO PID IP`; 2.4 adds `DEST_IP` and the `-f` passdb fields after IP (empty, or
/// `-` from 2.4.2 on, for a session that is not proxied), so the columns are found as the
/// last `PROTO PID IP` run (a number, then an address), not counted from the end.
pub fn parse_who(text: &str) -> Vec<WhoEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let found = (1..words.len().saturating_sub(2)).rev().find_map(|i| {
            let pid = words[i + 1].parse::<u32>().ok()?;
            let ip = words[i + 2].parse::<IpAddr>().ok()?;
            Some((i, pid, ip))
        });
        let Some((i, pid, ip)) = found else {
            continue;
        };
        out.push(WhoEntry {
            user: words[..i].join(" "),
            proto: words[i].to_string(),
            pid,
            ip: Some(ip),
        });
    }
    out
}

/// Longest `doveadm who` output read, and the longest it may run.
const MAX_WHO_OUTPUT: u64 = 16 << 20;
const WHO_TIMEOUT: Duration = Duration::from_secs(10);

struct WhoState {
    entries: Vec<WhoEntry>,
    /// When `entries` was read (None: never).
    at: Option<Instant>,
    running: bool,
    warned: bool,
}

/// Runs `doveadm who -1` on its own thread when its last answer is older than `refresh`.
pub struct WhoRunner {
    argv: Vec<String>,
    refresh: Duration,
    state: Arc<Mutex<WhoState>>,
}

impl WhoRunner {
    fn new(argv: Vec<String>, refresh: Duration) -> WhoRunner {
        WhoRunner {
            argv,
            refresh: refresh.max(Duration::from_secs(1)),
            state: Arc::new(Mutex::new(WhoState {
                entries: Vec::new(),
                at: None,
                running: false,
                warned: false,
            })),
        }
    }

    /// Whether the last answer (not older than twice the refresh) lists the claim; starts
    /// a refresh when one is due.
    fn lists(&self, claim: &Claim<'_>) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = st.at.is_some_and(|t| t.elapsed() < self.refresh);
        if !fresh && !st.running {
            st.running = true;
            let state = Arc::clone(&self.state);
            let argv = self.argv.clone();
            let spawned = std::thread::Builder::new()
                .name("doveadm-who".into())
                .spawn(move || refresh_who(&argv, &state));
            if spawned.is_err() {
                st.running = false;
            }
        }
        let usable = st.at.is_some_and(|t| t.elapsed() < self.refresh * 2);
        usable
            && st.entries.iter().any(|e| {
                e.pid == claim.pid
                    && e.proto == "imap"
                    && claim.user == Some(e.user.as_str())
                    && e.ip.is_some_and(|ip| same_ip(ip, claim.ip))
            })
    }
}

fn refresh_who(argv: &[String], state: &Mutex<WhoState>) {
    let result = run_who(argv);
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.running = false;
    match result {
        Ok(text) => {
            st.entries = parse_who(&text);
            st.at = Some(Instant::now());
            st.warned = false;
        }
        Err(e) => {
            st.entries.clear();
            st.at = None;
            if !st.warned {
                st.warned = true;
                tracing::warn!(command = %argv.join(" "), error = %e, "grant.session_who failed: sessions whose imap process title does not name them (verbose_proctitle = no) are held only ttl; set verbose_proctitle = yes in Dovecot, or let dovegate run doveadm who (see README)");
            }
        }
    }
}

/// Runs the command without a shell, with a deadline and bounded output.
fn run_who(argv: &[String]) -> Result<String, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.take(MAX_WHO_OUTPUT).read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + WHO_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}s", WHO_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let buf = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(user: &'a str, ip: &str) -> Claim<'a> {
        Claim {
            pid: 1,
            user: Some(user),
            ip: ip.parse().unwrap(),
        }
    }

    /// Titles as Dovecot 2.3.19 writes them (seen in /proc/PID/cmdline in the test rig).
    #[test]
    fn process_titles() {
        let c = claim("alice", "198.51.100.9");
        assert_eq!(
            title_names("dovecot/imap [alice 198.51.100.9 IDLE]\0", &c),
            Some(true)
        );
        assert_eq!(title_names("dovecot/imap\0", &c), None);
        assert_eq!(
            title_names("dovecot/imap [bob 198.51.100.9 IDLE]", &c),
            Some(false)
        );
        assert_eq!(
            title_names("dovecot/imap [alice 198.51.100.10 IDLE]", &c),
            Some(false)
        );
        assert_eq!(
            title_names("dovecot/pop3 [alice 198.51.100.9 ]", &c),
            Some(false)
        );
        let spaced = claim("al ice", "2001:db8::1");
        assert_eq!(
            title_names("dovecot/imap [al ice 2001:db8::1 IDLE]", &spaced),
            Some(true)
        );
        // A user named like a prefix of another does not match.
        assert_eq!(
            title_names("dovecot/imap [alice2 198.51.100.9 IDLE]", &c),
            Some(false)
        );
    }

    /// `doveadm who -1` of Dovecot 2.3.19 (the test rig).
    #[test]
    fn who_output() {
        let text = "username                        proto pid   ip          \n\
                    alice                           imap  30009 198.51.100.9\n\
                    al ice                          pop3  7 2001:db8::1\n";
        assert_eq!(
            parse_who(text),
            vec![
                WhoEntry {
                    user: "alice".into(),
                    proto: "imap".into(),
                    pid: 30009,
                    ip: "198.51.100.9".parse().ok()
                },
                WhoEntry {
                    user: "al ice".into(),
                    proto: "pop3".into(),
                    pid: 7,
                    ip: "2001:db8::1".parse().ok()
                },
            ]
        );
    }

    /// `doveadm who -1` of Dovecot 2.4 (doveadm-who.c: username, service, pid, ip, dest_ip,
    /// then one column per `-f` passdb field): 2.4.1 prints an unset dest_ip empty (the
    /// first two lines as 2.4.1 printed them for an IMAP session), 2.4.2 as `-`; a proxied
    /// session names its backend.
    #[test]
    fn who_output_24() {
        let text = "username                     service pid   ip        dest_ip\n\
                    alice                        imap    24563 127.0.0.1        \n\
                    bob      pop3    7     2001:db8::1  -          \n\
                    al ice   imap    8     192.0.2.1    10.0.0.2   x\n\
                    carol    imap    9     -            -          \n";
        let got: Vec<(String, String, u32, Option<IpAddr>)> = parse_who(text)
            .into_iter()
            .map(|e| (e.user, e.proto, e.pid, e.ip))
            .collect();
        let want = |u: &str, p: &str, pid: u32, ip: &str| {
            (u.to_string(), p.to_string(), pid, ip.parse().ok())
        };
        assert_eq!(
            got,
            vec![
                want("alice", "imap", 24563, "127.0.0.1"),
                want("bob", "pop3", 7, "2001:db8::1"),
                want("al ice", "imap", 8, "192.0.2.1"),
            ]
        );
    }

    /// The runner: a command's output, read off the caller's thread; a failing command
    /// lists nothing.
    #[test]
    fn who_runner() {
        let argv: Vec<String> = [
            "printf",
            "username proto pid ip\\nalice imap 7 192.0.2.1\\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(parse_who(&run_who(&argv).unwrap()).len(), 1);
        let w = WhoRunner::new(argv, Duration::from_secs(60));
        let alice = Claim {
            pid: 7,
            user: Some("alice"),
            ip: "192.0.2.1".parse().unwrap(),
        };
        let started = Instant::now();
        while !w.lists(&alice) {
            assert!(started.elapsed() < Duration::from_secs(20), "never listed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!w.lists(&Claim { pid: 8, ..alice }), "another pid");
        assert!(!w.lists(&Claim {
            user: Some("bob"),
            ..alice
        }));
        assert!(run_who(&["false".to_string()]).is_err());
    }

    #[test]
    fn host_probe_refuses_a_process_that_is_not_imap() {
        // This test's own process: alive, but not an imap process.
        let mut p = HostProbe::new(&[], Duration::from_secs(60));
        let me = Claim {
            pid: std::process::id(),
            user: Some("root"),
            ip: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(p.check(&me, 0), Evidence::None);
        let gone = Claim {
            pid: u32::MAX - 1,
            ..me
        };
        assert_eq!(p.check(&gone, 0), Evidence::None);
    }
}
