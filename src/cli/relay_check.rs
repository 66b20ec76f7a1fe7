//! `dovegate relay-check [--config FILE] [--map PATH] [--relayclient VALUE] PROGRAM [ARGS...]`:
//! relay-ctrl-check for ucspi-tcp chains (`tcpserver ... dovegate relay-check qmail-smtpd`).
//!
//! It sets `RELAYCLIENT` when `$TCPREMOTEIP` (set by tcpserver) holds a live grant in the
//! map, and then ALWAYS execs PROGRAM, the SMTP server: whatever goes wrong (no map, a
//! damaged or unreadable one, a bad configuration, a writer stuck holding the map's lock),
//! the server still runs, without `RELAYCLIENT`, so it keeps taking local mail and never
//! relays for a client it could not check (it fails closed, never open). A `RELAYCLIENT`
//! set earlier in the chain (tcprules for local networks) is kept, and the map not read.
//! stdout is the SMTP client: nothing is written there; problems are one line on stderr
//! (tcpserver's log).
//!
//! The map is read in a forked child, given `BUDGET`: a shared lock waits for a writer's
//! transaction, and LMDB may crash on a damaged file (see `store::damage`); neither may
//! keep the SMTP server from starting.

use std::ffi::OsString;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{self, ForkResult, Pid};

use super::{load_settings, ConfigArgs};
use crate::config::Settings;
use crate::grant::parse_any_ip;

/// The longest the map lookup may take before PROGRAM runs without `RELAYCLIENT`.
pub const BUDGET: Duration = Duration::from_secs(1);
/// A `TCPREMOTEIP` longer than this is not an address (tcpserver writes at most 39 bytes).
const MAX_ADDRESS: usize = 64;
/// qmail's "temporary failure" exit code: tcpserver logs it, the client sees a closed
/// connection and retries later.
const EXEC_FAILED: u8 = 111;

#[derive(Debug, clap::Args)]
pub struct RelayCheckArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// The value RELAYCLIENT is set to for a granted client (qmail-smtpd appends it to
    /// every recipient address: the default, empty, is what qmail expects).
    #[arg(long, value_name = "VALUE", default_value = "")]
    relayclient: OsString,
    /// The SMTP server and its arguments (always executed, with RELAYCLIENT set or not).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    program: Vec<OsString>,
}

/// Runs the check; returns only when the exec failed.
pub fn run(args: RelayCheckArgs) -> ExitCode {
    let mut cmd = match args.program.split_first() {
        Some((prog, rest)) => {
            let mut c = std::process::Command::new(prog);
            c.args(rest);
            c
        }
        None => return ExitCode::from(EXEC_FAILED),
    };
    if decide(&args.cfg) {
        cmd.env("RELAYCLIENT", &args.relayclient);
    }
    let err = cmd.exec();
    say(format_args!(
        "cannot execute {}: {err}",
        args.program[0].to_string_lossy()
    ));
    ExitCode::from(EXEC_FAILED)
}

/// Whether to set RELAYCLIENT: only for a client whose grant was read and is live.
fn decide(cfg: &ConfigArgs) -> bool {
    if std::env::var_os("RELAYCLIENT").is_some() {
        // Set earlier in the chain (tcprules): it stays as it is.
        return false;
    }
    let Some(raw) = std::env::var_os("TCPREMOTEIP") else {
        say(format_args!(
            "no TCPREMOTEIP in the environment (not run by tcpserver?); RELAYCLIENT not set"
        ));
        return false;
    };
    let text = raw.to_string_lossy();
    let Some(ip) = Some(&*text)
        .filter(|t| t.len() <= MAX_ADDRESS)
        .and_then(parse_any_ip)
    else {
        say(format_args!(
            "TCPREMOTEIP {:?} is not an IP address; RELAYCLIENT not set",
            text.chars().take(MAX_ADDRESS).collect::<String>()
        ));
        return false;
    };
    let settings = match load_settings(cfg, |_| {}) {
        Ok((_, s)) => s,
        Err(f) => {
            say(format_args!(
                "{ip}: not checked, RELAYCLIENT not set: {}",
                f.message.lines().next().unwrap_or_default()
            ));
            return false;
        }
    };
    match lookup_in_child(&settings, ip, BUDGET) {
        Ok(granted) => granted,
        Err(why) => {
            say(format_args!(
                "{ip}: not checked, RELAYCLIENT not set: {why}"
            ));
            false
        }
    }
}

/// One line on stderr; a closed or full stderr is ignored (never a panic before the exec).
fn say(what: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "dovegate relay-check: {what}");
}

/// A stored value grants relay now: a dovegate grant whose expiry is still ahead, or an
/// entry without expiry (an administrator's own) whose action relays, as Postfix reads it.
/// An expired grant left behind by a stopped daemon does not.
pub fn is_live(value: &str, now: i64) -> bool {
    match crate::store::value::parse_expiry(value.as_bytes()) {
        Some(expires) => expires > now,
        None => value
            .split_whitespace()
            .next()
            .is_some_and(|a| a.eq_ignore_ascii_case("OK") || a.eq_ignore_ascii_case("RELAY")),
    }
}

/// Looks `ip` up in a forked child and waits at most `budget` for its answer: `Ok(true)`
/// when it holds a live grant, `Err` (naming the map) when the map could not be read in
/// time. A child that is late is killed.
fn lookup_in_child(settings: &Settings, ip: IpAddr, budget: Duration) -> Result<bool, String> {
    let map = crate::store::lmdb::file_path(&settings.map_path);
    let (rd, wr) = unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {}", std::io::Error::from(e)))?;
    // SAFETY: the process is single-threaded here (no thread is started before the exec),
    // so the child may run ordinary code; it leaves with _exit, running no destructor.
    let child = match unsafe { unistd::fork() } {
        Ok(ForkResult::Child) => {
            drop(rd);
            // /dev/null over stdin and stdout, so that a child stuck in the kernel (a hung
            // filesystem) does not keep the client's connection open.
            if let Ok(null) = nix::fcntl::open(
                "/dev/null",
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                let _ = unistd::dup2_stdin(&null);
                let _ = unistd::dup2_stdout(&null);
            }
            let answer = match super::admin::stored_value(settings, ip) {
                Ok(v) => match v.is_some_and(|v| is_live(&v, crate::timefmt::now())) {
                    true => b"Y".to_vec(),
                    false => b"N".to_vec(),
                },
                Err(e) => [b"E".as_slice(), e.0.as_bytes()].concat(),
            };
            let _ = unistd::write(&wr, &answer[..answer.len().min(4096)]);
            // SAFETY: _exit ends the forked child at once, running nothing of the parent's.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(format!("cannot fork: {}", std::io::Error::from(e))),
    };
    drop(wr);
    let (got, timed_out) = read_until_eof(&rd, budget);
    drop(rd);
    if timed_out {
        let _ = kill(child, Signal::SIGKILL);
    }
    let status = reap(child);
    if timed_out {
        return Err(format!(
            "{}: no answer within {} ms (a process holds a write lock on the map?)",
            map.display(),
            budget.as_millis()
        ));
    }
    match got.split_first() {
        Some((b'Y', _)) => Ok(true),
        Some((b'N', _)) => Ok(false),
        Some((b'E', why)) => Err(String::from_utf8_lossy(why).into_owned()),
        _ => Err(format!(
            "{}: the lookup failed ({})",
            map.display(),
            match status {
                Some(WaitStatus::Signaled(_, sig, _)) =>
                    format!("killed by signal {}: a damaged map?", sig as i32),
                Some(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
                _ => "no status".into(),
            }
        )),
    }
}

/// Reads `fd` until end of file or until `budget` has passed (then `true`).
fn read_until_eof(fd: &OwnedFd, budget: Duration) -> (Vec<u8>, bool) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = budget.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (out, true);
        }
        let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let wait =
            PollTimeout::try_from(left.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX);
        match poll(&mut pfd, wait) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return (out, false),
        }
        match unistd::read(fd, &mut buf) {
            Ok(0) => return (out, false),
            Ok(r) => {
                out.extend_from_slice(&buf[..r]);
                if out.len() > 8192 {
                    return (out, false);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return (out, false),
        }
    }
}

/// Collects the child's status. A killed child stuck in the kernel (a hung filesystem) is
/// not waited for: it is left to the program, which inherits it.
fn reap(pid: Pid) -> Option<WaitStatus> {
    let start = Instant::now();
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            Ok(status) => return Some(status),
            Err(_) => return None,
        }
        if start.elapsed() > Duration::from_millis(200) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_values() {
        let now = 1_795_257_000;
        assert!(is_live("OK expires=2026-11-21T10:30:01Z", now));
        assert!(!is_live("OK expires=2026-11-21T10:30:00Z", now));
        assert!(!is_live("OK expires=garbage", now));
        assert!(is_live("RELAY", now));
        assert!(is_live("ok", now));
        assert!(!is_live("REJECT", now));
        assert!(!is_live("", now));
    }
}
