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
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a pointer to two ints for the call's duration.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot create a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the process is single-threaded here (no thread is started before the exec),
    // so the child may run ordinary code; it leaves with _exit, running no destructor.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: our own descriptors; /dev/null over stdin and stdout, so that a child
        // stuck in the kernel (a hung filesystem) does not keep the client's connection open.
        unsafe {
            libc::close(rd);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::close(null);
            }
        }
        let answer = match super::admin::stored_value(settings, ip) {
            Ok(v) => match v.is_some_and(|v| is_live(&v, crate::timefmt::now())) {
                true => b"Y".to_vec(),
                false => b"N".to_vec(),
            },
            Err(e) => [b"E".as_slice(), e.0.as_bytes()].concat(),
        };
        // SAFETY: a valid buffer, our descriptor; _exit ends the child at once.
        unsafe {
            libc::write(wr, answer.as_ptr().cast(), answer.len().min(4096));
            libc::_exit(0);
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(wr) };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: our own descriptor.
        unsafe { libc::close(rd) };
        return Err(format!("cannot fork: {e}"));
    }
    let (got, timed_out) = read_until_eof(rd, budget);
    // SAFETY: our own descriptor.
    unsafe { libc::close(rd) };
    if timed_out {
        // SAFETY: the child we forked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = reap(pid);
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
                Some(s) if libc::WIFSIGNALED(s) =>
                    format!("killed by signal {}: a damaged map?", libc::WTERMSIG(s)),
                Some(s) => format!("exit status {}", libc::WEXITSTATUS(s)),
                None => "no status".into(),
            }
        )),
    }
}

/// Reads `fd` until end of file or until `budget` has passed (then `true`).
fn read_until_eof(fd: libc::c_int, budget: Duration) -> (Vec<u8>, bool) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = budget.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (out, true);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return (out, false);
        }
        if n == 0 {
            continue;
        }
        // SAFETY: a valid buffer of that length, our descriptor.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match r {
            0 => return (out, false),
            r if r > 0 => {
                out.extend_from_slice(&buf[..r as usize]);
                if out.len() > 8192 {
                    return (out, false);
                }
            }
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return (out, false),
        }
    }
}

/// Collects the child's status. A killed child stuck in the kernel (a hung filesystem) is
/// not waited for: it is left to the program, which inherits it.
fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: our own child; a pointer to a local int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
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
