//! `dovegate postlogin [--socket PATH] PROGRAM [ARGS...]`: a Dovecot script-login script.
//!
//! It hands `IP` and `USER` (set by script-login, which clears everything else, PATH too;
//! without `IP`, tcpserver's `TCPREMOTEIP`, as relay-ctrl-allow reads it) to the daemon's
//! push socket and then ALWAYS execs the rest of its arguments: a script
//! that exits instead would deny the login. The exchange runs on a helper thread and is
//! abandoned after 200 ms, so a stopped, stalled or missing daemon delays a login by at
//! most that and never fails it. Nothing is written to stdout (it is the IMAP/POP3
//! client); problems go to stderr, which Dovecot logs. No configuration is read. Nothing
//! before the exec may panic (a panic exits 101 and denies the login): stderr is written
//! with `say`, which ignores errors (eprintln! panics when stderr is a closed pipe).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::push::socket::request_line;

pub const DEFAULT_SOCKET: &str = "/run/dovegate/push";
/// The whole exchange (connect, send, answer) is given this long.
const BUDGET: Duration = Duration::from_millis(200);

/// The command as clap documents it (man page, --help); `main` runs it through `run`
/// before clap parses anything, so that no usage error can stop the exec.
#[derive(Debug, clap::Args)]
pub struct PostloginArgs {
    /// The daemon's push socket ([push] socket).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The next script and its arguments, as script-login passes them (always executed).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    program: Vec<OsString>,
}

impl PostloginArgs {
    pub fn into_args(self) -> Vec<OsString> {
        let mut v = vec![OsString::from("--socket"), self.socket.into_os_string()];
        v.extend(self.program);
        v
    }
}

/// The arguments after `postlogin` when this invocation is the hook: `dovegate postlogin
/// ...`, or the binary called through a link named `postlogin`.
pub fn hook_args(mut argv: Vec<OsString>) -> Option<Vec<OsString>> {
    let arg0 = argv.first()?;
    let name = std::path::Path::new(arg0).file_name()?;
    if name == "postlogin" {
        return Some(argv.split_off(1));
    }
    if argv.get(1).is_some_and(|a| a == "postlogin") {
        return Some(argv.split_off(2));
    }
    None
}

/// Runs the hook; returns only when the exec failed (or there is nothing to exec).
pub fn run(args: Vec<OsString>) -> ExitCode {
    let (socket, program) = split(args);
    let Some((prog, rest)) = program.split_first() else {
        say(format_args!("no program to execute: use it as `executable = script-login /usr/lib/dovegate/postlogin`"));
        return ExitCode::from(1);
    };
    notify(&socket);
    // Like execvp, but script-login cleared PATH: it passes absolute paths.
    let err = std::process::Command::new(prog).args(rest).exec();
    // A failed exec leaves SIGPIPE at its default (std resets it for the new program):
    // ignore it again, or the message below kills the hook on a closed stderr.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    say(format_args!(
        "cannot execute {}: {err}",
        prog.to_string_lossy()
    ));
    ExitCode::from(1)
}

/// One line on stderr; a closed or full stderr is ignored (never a panic before the exec).
fn say(what: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "dovegate postlogin: {what}");
}

/// `--socket PATH` / `--socket=PATH` first, then the program and its arguments verbatim.
fn split(mut args: Vec<OsString>) -> (PathBuf, Vec<OsString>) {
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let first = args.first().and_then(|a| a.to_str()).map(str::to_string);
    match first.as_deref() {
        Some("--socket") if args.len() >= 2 => {
            socket = PathBuf::from(args.remove(1));
            args.remove(0);
        }
        Some(a) if a.starts_with("--socket=") => {
            socket = PathBuf::from(&a["--socket=".len()..]);
            args.remove(0);
        }
        _ => {}
    }
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    (socket, args)
}

/// Pushes the login; every problem is one line on stderr, never a failure.
fn notify(socket: &std::path::Path) {
    // var_os: a non-UTF-8 USER is still pushed (lossily), never an error.
    let var = |name: &str| {
        std::env::var_os(name)
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    // script-login sets IP; a POP/IMAP server under tcpserver has TCPREMOTEIP instead
    // (relay-ctrl-allow's way).
    let ip = Some(var("IP"))
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| var("TCPREMOTEIP"));
    let user = var("USER");
    if ip.is_empty() {
        say(format_args!(
            "no IP (or TCPREMOTEIP) in the environment (not run by script-login?); nothing pushed"
        ));
        return;
    }
    let line = request_line(&ip, &user);
    let path = socket.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    // A helper thread, abandoned at exec if the daemon is slow: connect() itself may block
    // when the daemon is stopped with a full backlog.
    let spawned = std::thread::Builder::new().spawn(move || {
        let _ = tx.send(exchange(&path, &line));
    });
    let outcome = match spawned {
        Ok(_) => rx
            .recv_timeout(BUDGET)
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", BUDGET.as_millis()))),
        Err(e) => Err(format!("cannot start a thread: {e}")),
    };
    if let Err(why) = outcome {
        say(format_args!(
            "login of {} from {ip} not pushed to {}: {why} (is dovegate running with [push] socket set?)",
            user.escape_debug(),
            socket.display()
        ));
    }
}

fn exchange(path: &std::path::Path, line: &[u8]) -> Result<(), String> {
    let mut s = UnixStream::connect(path).map_err(|e| e.to_string())?;
    let _ = s.set_write_timeout(Some(BUDGET));
    let _ = s.set_read_timeout(Some(BUDGET));
    // A refused peer may be answered and closed before its line is written: the answer
    // still says why.
    let written = s.write_all(line).map_err(|e| e.to_string());
    let mut answer = [0u8; 64];
    let mut got = 0;
    while got < answer.len() {
        match s.read(&mut answer[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if answer[..got].contains(&b'\n') {
                    break;
                }
            }
            Err(e) => return Err(written.err().unwrap_or_else(|| e.to_string())),
        }
    }
    match &answer[..got] {
        b"OK\n" => written,
        b"" => Err(written.err().unwrap_or_else(|| "no answer".into())),
        other => Err(format!(
            "the daemon answered {:?}",
            String::from_utf8_lossy(other).trim_end()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            hook_args(os(&["/usr/bin/dovegate", "postlogin", "/x"])),
            Some(os(&["/x"]))
        );
        assert_eq!(
            hook_args(os(&["/usr/lib/dovegate/postlogin", "/x", "-d"])),
            Some(os(&["/x", "-d"]))
        );
        assert_eq!(hook_args(os(&["dovegate", "run"])), None);
        assert_eq!(hook_args(os(&["dovegate"])), None);
        let (s, p) = split(os(&["--socket", "/tmp/p", "/bin/a", "--socket"]));
        assert_eq!(
            (s, p),
            (PathBuf::from("/tmp/p"), os(&["/bin/a", "--socket"]))
        );
        let (s, p) = split(os(&["--socket=/tmp/q", "--", "/bin/a"]));
        assert_eq!((s, p), (PathBuf::from("/tmp/q"), os(&["/bin/a"])));
        let (s, p) = split(os(&["/bin/a", "b"]));
        assert_eq!(
            (s, p),
            (PathBuf::from(DEFAULT_SOCKET), os(&["/bin/a", "b"]))
        );
    }
}
