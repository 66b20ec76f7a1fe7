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

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::checkpoint::{JournalCursor, Position};
use super::lines::{Chunk, ChunkReader};
use super::{Batch, SeenLogin, SourceStats};
use crate::pattern::IpVerdict;
use crate::scan::LineMatcher;

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

/// The trusted fields an entry must carry to be believed.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub units: Vec<String>,
    pub comms: Vec<String>,
    pub exes: Vec<String>,
    pub uids: Vec<u32>,
}

/// What one journal entry turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryVerdict {
    /// Not a login line of an enabled pattern.
    Other,
    /// A Dovecot login from a trusted sender.
    Login {
        pattern: usize,
        service: String,
        user: Option<String>,
        ip: IpVerdict,
        time: Option<i64>,
    },
    /// A login line from an untrusted sender (why it failed the check).
    Forged { ip: IpVerdict, why: String },
}

/// One processed entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub cursor: Option<String>,
    pub verdict: EntryVerdict,
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

/// Judges journalctl JSON lines: pattern match on MESSAGE, then provenance.
pub struct EntryJudge {
    pub matcher: LineMatcher,
    pub provenance: Provenance,
}

impl EntryJudge {
    pub fn judge(&mut self, line: &[u8], now: i64) -> Entry {
        if !self.matcher.patterns().prefilter().is_match(line) {
            return Entry {
                cursor: quick_cursor(line),
                verdict: EntryVerdict::Other,
            };
        }
        let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(line) else {
            return Entry {
                cursor: quick_cursor(line),
                verdict: EntryVerdict::Other,
            };
        };
        let cursor = text(&m, "__CURSOR").map(str::to_string);
        let Some(msg) = m.get("MESSAGE").and_then(message_bytes) else {
            return Entry {
                cursor,
                verdict: EntryVerdict::Other,
            };
        };
        let Some((frame, login)) = self.matcher.match_line(&msg, now) else {
            return Entry {
                cursor,
                verdict: EntryVerdict::Other,
            };
        };
        let time = text(&m, "_SOURCE_REALTIME_TIMESTAMP")
            .or_else(|| text(&m, "__REALTIME_TIMESTAMP"))
            .and_then(micros_to_secs)
            .or(frame.time);
        let verdict = match self.provenance.check(&m) {
            Some(why) => EntryVerdict::Forged { ip: login.ip, why },
            None => EntryVerdict::Login {
                pattern: login.pattern,
                service: String::from_utf8_lossy(login.service).into_owned(),
                user: login.user.map(|u| String::from_utf8_lossy(u).into_owned()),
                ip: login.ip,
                time,
            },
        };
        Entry { cursor, verdict }
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
}

/// Counts forged entries and logs them at most every ten seconds.
struct ForgedLog {
    since_last: u64,
    last: Option<Instant>,
}

impl ForgedLog {
    fn note(&mut self, why: &str, ip: &IpVerdict) {
        self.since_last += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(count = self.since_last, last_sender = why, last_ip = ?ip, "forged Dovecot login entries (not from a trusted sender) ignored");
            self.since_last = 0;
            self.last = Some(Instant::now());
        }
    }
}

/// Runs one journalctl to its end (or, following, until it exits), sending batches.
/// Returns the last cursor read, and whether the engine hung up.
fn pump(
    child: &mut Child,
    spec: &JournalSourceSpec,
    judge: &mut EntryJudge,
    tx: &tokio::sync::mpsc::Sender<Batch>,
    stats: &SourceStats,
    forged: &mut ForgedLog,
    mut cursor: Option<String>,
) -> (Option<String>, bool) {
    let Some(mut out) = child.stdout.take() else {
        return (cursor, false);
    };
    let mut reader = ChunkReader::new(spec.max_line, 0);
    let key = spec.target.key();
    loop {
        let chunk = match reader.read_chunk(&mut out) {
            Ok(Chunk::Lines(c, _)) => c,
            Ok(Chunk::Partial) => continue,
            Ok(Chunk::Eof) | Err(_) => return (cursor, false),
        };
        let now = crate::timefmt::now();
        let mut logins = Vec::new();
        for line in chunk.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let entry = judge.judge(line, now);
            if entry.cursor.is_some() {
                cursor = entry.cursor;
            }
            match entry.verdict {
                EntryVerdict::Other => {}
                EntryVerdict::Login {
                    ip: IpVerdict::Valid(ip),
                    time,
                    ..
                } => {
                    stats.logins.fetch_add(1, Ordering::Relaxed);
                    logins.push(SeenLogin { ip, time });
                }
                EntryVerdict::Login { ip, .. } => {
                    let counter = if ip == IpVerdict::Ambiguous {
                        &stats.ambiguous_ip
                    } else {
                        &stats.invalid_ip
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(journal = %key, ip = ?ip, "Dovecot login entry without a usable client address; not granted");
                }
                EntryVerdict::Forged { ip, why } => {
                    stats.forged.fetch_add(1, Ordering::Relaxed);
                    forged.note(&why, &ip);
                }
            }
        }
        stats.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        stats.lines.fetch_add(
            memchr::memchr_iter(b'\n', chunk).count() as u64,
            Ordering::Relaxed,
        );
        let Some(cur) = cursor.clone() else { continue };
        let batch = Batch {
            source: spec.index,
            logins,
            position: Some(Position::Journal(JournalCursor {
                journal: key.clone(),
                cursor: cur,
            })),
        };
        if tx.blocking_send(batch).is_err() {
            return (cursor, true);
        }
    }
}

/// Starts the thread following a journal; journalctl is restarted (with backoff) from the
/// last cursor whenever it exits.
pub fn spawn_journal_source(
    spec: JournalSourceSpec,
    mut judge: EntryJudge,
    tx: tokio::sync::mpsc::Sender<Batch>,
    stop: Arc<AtomicBool>,
    stats: Arc<SourceStats>,
    children: Arc<Mutex<Vec<u32>>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("journal-{}", spec.index))
        .spawn(move || {
            let mut cursor = match &spec.start {
                JournalStart::AfterCursor(c) => Some(c.clone()),
                JournalStart::Since(_) => None,
            };
            let mut forged = ForgedLog { since_last: 0, last: None };
            let mut backoff = Duration::from_millis(500);
            let mut follow = false;
            while !stop.load(Ordering::Relaxed) {
                let start = cursor.clone().map_or(spec.start.clone(), JournalStart::AfterCursor);
                let mut child = match spawn_journalctl(journalctl(&spec.target, &start, follow)) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot run journalctl; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                if let Ok(mut pids) = children.lock() {
                    pids.push(child.id());
                }
                watch_stderr(&mut child, spec.target.key());
                let began = Instant::now();
                let (last, hung_up) = pump(&mut child, &spec, &mut judge, &tx, &stats, &mut forged, cursor.clone());
                cursor = last;
                let _ = child.kill();
                let status = child.wait();
                if let Ok(mut pids) = children.lock() {
                    pids.retain(|&p| p != child.id());
                }
                if hung_up || stop.load(Ordering::Relaxed) {
                    return;
                }
                if !follow && status.as_ref().is_ok_and(|s| s.success()) {
                    // Caught up; now follow from the last cursor.
                    follow = true;
                    continue;
                }
                tracing::warn!(journal = %spec.target.key(), status = ?status.ok(), "journalctl exited; restarting from the last cursor");
                if began.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameParser;
    use crate::pattern::PatternSet;

    fn judge() -> EntryJudge {
        let p = PatternSet::load(None, &["imap".into(), "pop3".into()], &[]).unwrap();
        EntryJudge {
            matcher: LineMatcher::new(FrameParser::new(&["dovecot"]), Arc::new(p)),
            provenance: Provenance {
                units: vec!["dovecot.service".into()],
                ..Provenance::default()
            },
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

    #[test]
    fn trusted_unit_grants_and_everything_else_is_forged() {
        let mut j = judge();
        let e = j.judge(
            &line(&[("MESSAGE", MSG), ("_SYSTEMD_UNIT", "dovecot.service")]),
            1_795_256_900,
        );
        assert_eq!(e.cursor.as_deref(), Some("s=1;i=9"));
        assert!(
            matches!(
                e.verdict,
                EntryVerdict::Login {
                    ip: IpVerdict::Valid(_),
                    time: Some(1_795_256_894),
                    ..
                }
            ),
            "{:?}",
            e.verdict
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
            let e = j.judge(&line(&fields), 1_795_256_900);
            assert!(
                matches!(e.verdict, EntryVerdict::Forged { .. }),
                "{fields:?}: {:?}",
                e.verdict
            );
        }
        // Non-login entries take the fast path but still give their cursor.
        let e = j.judge(
            &line(&[
                ("MESSAGE", "postfix/smtpd: connect"),
                ("_SYSTEMD_UNIT", "postfix.service"),
            ]),
            0,
        );
        assert_eq!(
            (e.cursor.as_deref(), e.verdict),
            (Some("s=1;i=9"), EntryVerdict::Other)
        );
    }

    #[test]
    fn optional_trusted_fields() {
        let mut j = judge();
        j.provenance.comms = vec!["log".into()];
        j.provenance.uids = vec![0];
        let ok = line(&[
            ("MESSAGE", MSG),
            ("_SYSTEMD_UNIT", "dovecot.service"),
            ("_COMM", "log"),
            ("_UID", "0"),
        ]);
        assert!(matches!(
            j.judge(&ok, 0).verdict,
            EntryVerdict::Login { .. }
        ));
        let bad = line(&[
            ("MESSAGE", MSG),
            ("_SYSTEMD_UNIT", "dovecot.service"),
            ("_COMM", "bash"),
            ("_UID", "0"),
        ]);
        assert!(matches!(
            j.judge(&bad, 0).verdict,
            EntryVerdict::Forged { .. }
        ));
    }
}
