//! Following the systemd journal, trusting only entries that really come from Dovecot.
//!
//! Read through a supervised `journalctl -o json` child rather than libsystemd: it is the
//! same reader code, it gives exact cursors, it reads journal files without a running
//! journald, and dovegate needs no libsystemd-dev at build time (on Debian 12 that package
//! would also upgrade the system's libsystemd0). Each start first catches up without
//! `--follow` (which only shows the current boot), then follows from the last cursor.
//!
//! Provenance: an entry can grant only if its TRUSTED fields, set by journald and not by the
//! sender, say it came from Dovecot: `_SYSTEMD_UNIT` in a list (default `dovecot.service`),
//! optionally `_COMM`, `_EXE`, `_UID`. `SYSLOG_IDENTIFIER`, `UNIT=` and the message text are
//! the sender's choice and never suffice. A login-looking entry that fails the check is
//! counted and logged (rate limited) as forged.

pub use crate::config::journal::Provenance;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::handle::{install_child, take_child, Deaths, SourceCtl, SourceHandle};
use super::lines::{Chunk, ChunkReader};
use super::quiet::{has_unit_entry, spawn_watcher, unit_markers, QuietWatch};
use super::{DaemonSink, SourceError};
use crate::model::Batch;
use crate::scan::{Scanned, Scanner, Sink};
use crate::state::{JournalCursor, Position};
use crate::telemetry::{Report, SourceStats};

/// Which journal to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalTarget {
    System,
    Directory(PathBuf),
    File(PathBuf),
}

impl JournalTarget {
    /// The key its cursor is saved under.
    pub fn key(&self) -> String {
        match self {
            JournalTarget::System => "system".into(),
            JournalTarget::Directory(d) => format!("dir:{}", d.display()),
            JournalTarget::File(f) => format!("file:{}", f.display()),
        }
    }
}

/// Where reading starts.
#[derive(Debug, Clone)]
pub enum JournalStart {
    AfterCursor(String),
    /// Unix seconds: with no cursor, now - ttl (older logins cannot hold a grant).
    Since(i64),
}

/// For logs: `after cursor C` or `since 2026-11-21T10:00:00Z`.
impl std::fmt::Display for JournalStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalStart::AfterCursor(c) => write!(f, "after cursor {c}"),
            JournalStart::Since(t) => write!(f, "since {}", crate::timefmt::rfc3339(*t)),
        }
    }
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// MESSAGE as bytes: journalctl writes non-UTF-8 messages as an array of byte values.
fn message_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Array(a) => a
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect(),
        _ => None,
    }
}

fn micros_to_secs(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().map(|us| us / 1_000_000)
}

/// The cursor of a journalctl JSON line without parsing it (the fast path for the entries
/// that contain no pattern literal). Cursors hold no quotes or escapes.
fn quick_cursor(line: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"__CURSOR\":\"";
    let at = memchr::memmem::find(line, KEY)? + KEY.len();
    let end = memchr::memchr(b'"', &line[at..])? + at;
    std::str::from_utf8(&line[at..end]).ok().map(str::to_string)
}

impl Provenance {
    /// None when the entry is trusted; else why not.
    pub fn check(&self, m: &Map<String, Value>) -> Option<String> {
        let unit = text(m, "_SYSTEMD_UNIT");
        if !unit.is_some_and(|u| self.units.iter().any(|x| x == u)) {
            return Some(format!("_SYSTEMD_UNIT={}", unit.unwrap_or("(none)")));
        }
        if !self.comms.is_empty()
            && !text(m, "_COMM").is_some_and(|c| self.comms.iter().any(|x| x == c))
        {
            return Some(format!("_COMM={}", text(m, "_COMM").unwrap_or("(none)")));
        }
        if !self.exes.is_empty()
            && !text(m, "_EXE").is_some_and(|e| self.exes.iter().any(|x| x == e))
        {
            return Some(format!("_EXE={}", text(m, "_EXE").unwrap_or("(none)")));
        }
        if !self.uids.is_empty() {
            let uid = text(m, "_UID").and_then(|u| u.parse::<u32>().ok());
            if !uid.is_some_and(|u| self.uids.contains(&u)) {
                return Some(format!("_UID={}", text(m, "_UID").unwrap_or("(none)")));
            }
        }
        None
    }
}

/// The journal adapter: turns each journalctl JSON entry of `chunk` into (MESSAGE, trusted
/// time, provenance verdict) and feeds it to the same [`Scanner`] as log files. Entries
/// count as lines; `cursor` follows the last entry read.
pub fn scan_entries(
    scanner: &mut Scanner,
    provenance: &Provenance,
    chunk: &[u8],
    now: i64,
    sink: &mut impl Sink,
    cursor: &mut Option<String>,
) -> Scanned {
    let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
    let mut index = 0;
    for line in body.split(|&b| b == b'\n') {
        index += 1;
        let i = index - 1;
        // The fast path: most entries hold no literal and are not parsed.
        let parsed = match scanner.may_match(line) {
            true => serde_json::from_slice::<Value>(line).ok(),
            false => None,
        };
        let Some(Value::Object(m)) = parsed else {
            if let Some(c) = quick_cursor(line) {
                *cursor = Some(c);
            }
            scanner.skip_entry(i, line, sink);
            continue;
        };
        if let Some(c) = text(&m, "__CURSOR") {
            *cursor = Some(c.to_string());
        }
        let Some(msg) = m.get("MESSAGE").and_then(message_bytes) else {
            scanner.skip_entry(i, line, sink);
            continue;
        };
        let time = text(&m, "_SOURCE_REALTIME_TIMESTAMP")
            .or_else(|| text(&m, "__REALTIME_TIMESTAMP"))
            .and_then(micros_to_secs);
        let untrusted = provenance.check(&m);
        let verdict = match &untrusted {
            Some(why) => Err(why.as_str()),
            None => Ok(()),
        };
        scanner.scan_message(i, &msg, time, verdict, now, sink);
    }
    Scanned {
        lines: index,
        bytes: chunk.len() as u64,
    }
}

/// The journalctl command line for a target and start.
pub fn journalctl(target: &JournalTarget, start: &JournalStart, follow: bool) -> Command {
    let mut c = Command::new("journalctl");
    c.args(["-o", "json", "--all", "--no-pager", "--quiet"]);
    c.arg("--output-fields=MESSAGE,_SYSTEMD_UNIT,_COMM,_EXE,_UID,_SOURCE_REALTIME_TIMESTAMP");
    match target {
        JournalTarget::System => {}
        JournalTarget::Directory(d) => {
            c.arg("--directory").arg(d);
        }
        JournalTarget::File(f) => {
            c.arg(format!("--file={}", f.display()));
        }
    }
    match start {
        JournalStart::AfterCursor(cur) => {
            c.arg(format!("--after-cursor={cur}"));
        }
        JournalStart::Since(t) => {
            c.arg(format!("--since=@{t}"));
        }
    }
    if follow {
        c.arg("--follow");
    }
    c
}

/// Starts journalctl with piped output; it dies with dovegate (PR_SET_PDEATHSIG).
pub fn spawn_journalctl(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Logs journalctl's stderr, turning the permission hint into a clear error.
fn watch_stderr(child: &mut Child, target: String) {
    let Some(err) = child.stderr.take() else {
        return;
    };
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok).take(1000) {
            if line.contains("not seeing messages from other users")
                || line.contains("insufficient permissions")
            {
                tracing::error!(journal = %target, "cannot read the whole journal: run dovegate as a member of group systemd-journal (or adm); journalctl says: {line}");
            } else if !line.trim().is_empty() {
                tracing::warn!(journal = %target, "journalctl: {line}");
            }
        }
    });
}

/// How a journal source begins.
pub struct JournalSourceSpec {
    pub index: usize,
    pub target: JournalTarget,
    pub start: JournalStart,
    pub max_line: usize,
    /// journalctl failing for this long without a working run ends the source (and the
    /// daemon, non-zero): a restart, and the admin, must see it.
    pub give_up: Duration,
    /// The daemon's other sources, named for the report while journalctl fails: what
    /// still delivers logins.
    pub others: Vec<String>,
}

/// Follows a journal through journalctl, restarted (with backoff) from the last cursor
/// whenever it exits; sends batches until stopped or the engine hangs up.
pub struct JournalSource {
    pub spec: JournalSourceSpec,
    pub scanner: Scanner,
    pub provenance: Provenance,
    pub sink: DaemonSink,
    pub tx: tokio::sync::mpsc::Sender<Batch>,
}

impl JournalSource {
    /// Starts it on its own thread.
    pub fn spawn(self, deaths: Deaths) -> std::io::Result<SourceHandle> {
        let reporter = self.sink.reporter().clone();
        SourceHandle::spawn(reporter, deaths, move |ctl| self.run(ctl))
    }

    pub fn run(mut self, ctl: SourceCtl) -> Result<(), SourceError> {
        let (stop, slot) = (ctl.stop, ctl.child);
        let mut cursor = match &self.spec.start {
            JournalStart::AfterCursor(c) => Some(c.clone()),
            JournalStart::Since(_) => None,
        };
        let mut backoff = Duration::from_millis(500);
        let mut follow = false;
        // Since when journalctl has been failing (None: the last run worked).
        let mut failing_since: Option<Instant> = None;
        // The watcher stops when `_quiet_done` drops with this function.
        let quiet = Arc::new(QuietWatch::new(crate::timefmt::now()));
        let markers = unit_markers(&self.provenance.units);
        let (_quiet_done, done) = std::sync::mpsc::channel();
        if let Err(e) = spawn_watcher(
            Arc::clone(&quiet),
            self.sink.reporter().clone(),
            self.provenance.units.clone(),
            done,
        ) {
            tracing::warn!(error = %e, "cannot start the quiet-journal watcher; a journal without Dovecot entries goes unreported");
        }
        while !stop.is_set() {
            let start = cursor
                .clone()
                .map_or(self.spec.start.clone(), JournalStart::AfterCursor);
            let mut child = match spawn_journalctl(journalctl(&self.spec.target, &start, follow)) {
                Ok(c) => c,
                // No journalctl will appear by waiting: the source is dead.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SourceError::NoJournalctl(e));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot run journalctl; retrying");
                    let _ = ctl.wake_rx.recv_timeout(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            watch_stderr(&mut child, self.spec.target.key());
            let out = child.stdout.take();
            let began = Instant::now();
            let hung_up = match (out, install_child(&slot, &stop, child)) {
                (Some(mut out), true) => self.pump(&mut out, &mut cursor, (&quiet, &markers)),
                _ => false,
            };
            let status = take_child(&slot).map(|mut c| {
                let _ = c.kill();
                c.wait()
            });
            if hung_up || stop.is_set() {
                return Ok(());
            }
            let ok = matches!(&status, Some(Ok(s)) if s.success());
            if !follow && ok {
                // Caught up; now follow from the last cursor.
                self.readable();
                follow = true;
                continue;
            }
            let status_text = status
                .and_then(Result::ok)
                .map_or_else(|| "unknown".to_string(), |s| s.to_string());
            // Said when it starts and reminded while it lasts (not at every restart); the
            // metrics and systemd's status line show it until journalctl reads again.
            self.sink.reporter().report(Report::Unreadable {
                problem: format!(
                    "journalctl exited ({status_text}); restarting it from the last cursor"
                ),
                still: self.spec.others.clone(),
            });
            if began.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(500);
                failing_since = None;
            }
            let since = *failing_since.get_or_insert(began);
            if since.elapsed() >= self.spec.give_up {
                return Err(SourceError::JournalctlFailing {
                    lasted: since.elapsed(),
                    last_status: status_text,
                });
            }
            let _ = ctl.wake_rx.recv_timeout(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        Ok(())
    }

    /// journalctl reads: a failure on record is over.
    fn readable(&self) {
        let reporter = self.sink.reporter();
        if reporter.stats().has_problem() {
            reporter.report(Report::Readable);
        }
    }

    /// Reads one journalctl's output to its end, sending a batch per chunk. True when the
    /// engine hung up.
    fn pump(
        &mut self,
        out: &mut impl std::io::Read,
        cursor: &mut Option<String>,
        (quiet, markers): (&QuietWatch, &[Vec<u8>]),
    ) -> bool {
        let mut reader = ChunkReader::new(self.spec.max_line, 0);
        let key = self.spec.target.key();
        loop {
            let chunk = match reader.read_chunk(out) {
                Ok(Chunk::Lines(c, _)) => c,
                Ok(Chunk::Partial) => continue,
                Ok(Chunk::Eof) | Err(_) => return false,
            };
            let now = crate::timefmt::now();
            self.readable();
            if has_unit_entry(chunk, markers) {
                quiet.seen(now);
            }
            let n = scan_entries(
                &mut self.scanner,
                &self.provenance,
                chunk,
                now,
                &mut self.sink,
                cursor,
            );
            SourceStats::add(&self.sink.stats().bytes, n.bytes);
            SourceStats::add(&self.sink.stats().lines, n.lines);
            let Some(cur) = cursor.clone() else { continue };
            let batch = Batch {
                source: self.spec.index,
                logins: self.sink.take(),
                ends: self.sink.take_ends(),
                position: Some(Position::Journal(JournalCursor {
                    journal: key.clone(),
                    cursor: cur,
                })),
            };
            if self.tx.blocking_send(batch).is_err() {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{Line, Login, Visit};

    fn scanner() -> Scanner {
        crate::scan::test_scanner(Visit::Logins, 16384)
    }

    fn dovecot_only() -> Provenance {
        Provenance {
            units: vec!["dovecot.service".into()],
            ..Provenance::default()
        }
    }

    /// Records (entry index, verdict).
    #[derive(Default)]
    struct Record(Vec<(u64, String)>);
    impl Sink for Record {
        fn login(&mut self, line: Line<'_>, login: &Login<'_>) {
            self.0
                .push((line.index, format!("login {:?} {:?}", login.ip, login.time)));
        }
        fn forged(&mut self, line: Line<'_>, _: &Login<'_>, why: &str) {
            self.0.push((line.index, format!("forged {why}")));
        }
    }

    const MSG: &str = "imap-login: Login: user=<a>, method=PLAIN, rip=203.0.113.5, lip=192.0.2.1, mpid=1, session=<x>";

    fn line(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("__CURSOR".into(), Value::String("s=1;i=9".into()));
        m.insert(
            "__REALTIME_TIMESTAMP".into(),
            Value::String("1795256894146773".into()),
        );
        for (k, v) in fields {
            m.insert((*k).into(), Value::String((*v).into()));
        }
        serde_json::to_vec(&Value::Object(m)).unwrap()
    }

    fn judge(p: &Provenance, entry: &[u8]) -> (Vec<(u64, String)>, Option<String>) {
        let mut r = Record::default();
        let mut cursor = None;
        let mut chunk = entry.to_vec();
        chunk.push(b'\n');
        let n = scan_entries(
            &mut scanner(),
            p,
            &chunk,
            1_795_256_900,
            &mut r,
            &mut cursor,
        );
        assert_eq!(n.lines, 1);
        (r.0, cursor)
    }

    #[test]
    fn trusted_unit_grants_and_everything_else_is_forged() {
        let p = dovecot_only();
        let (ev, cursor) = judge(
            &p,
            &line(&[("MESSAGE", MSG), ("_SYSTEMD_UNIT", "dovecot.service")]),
        );
        assert_eq!(cursor.as_deref(), Some("s=1;i=9"));
        assert_eq!(
            ev,
            vec![(0, "login Valid(203.0.113.5) Some(1795256894)".to_string())]
        );
        for fields in [
            vec![
                ("MESSAGE", MSG),
                ("_SYSTEMD_UNIT", "user@1000.service"),
                ("SYSLOG_IDENTIFIER", "dovecot"),
            ],
            vec![
                ("MESSAGE", MSG),
                ("SYSLOG_IDENTIFIER", "dovecot"),
                ("UNIT", "dovecot.service"),
            ],
            vec![("MESSAGE", MSG)],
        ] {
            let (ev, _) = judge(&p, &line(&fields));
            assert!(
                ev.len() == 1 && ev[0].1.starts_with("forged _SYSTEMD_UNIT="),
                "{fields:?}: {ev:?}"
            );
        }
        // Non-login entries take the fast path but still give their cursor.
        let (ev, cursor) = judge(
            &p,
            &line(&[
                ("MESSAGE", "postfix/smtpd: connect"),
                ("_SYSTEMD_UNIT", "postfix.service"),
            ]),
        );
        assert_eq!((ev, cursor.as_deref()), (vec![], Some("s=1;i=9")));
    }

    #[test]
    fn optional_trusted_fields() {
        let mut p = dovecot_only();
        p.comms = vec!["log".into()];
        p.uids = vec![0];
        let ok = line(&[
            ("MESSAGE", MSG),
            ("_SYSTEMD_UNIT", "dovecot.service"),
            ("_COMM", "log"),
            ("_UID", "0"),
        ]);
        assert!(judge(&p, &ok).0[0].1.starts_with("login"));
        let bad = line(&[
            ("MESSAGE", MSG),
            ("_SYSTEMD_UNIT", "dovecot.service"),
            ("_COMM", "bash"),
            ("_UID", "0"),
        ]);
        assert_eq!(judge(&p, &bad).0[0].1, "forged _COMM=bash");
    }
}
