//! The annotated corpus is the spec: every line in `fixtures/corpus/*.tsv` carries its
//! expected verdict (`login`/`nologin`) and the canonical IP Postfix would look up (`-`
//! when the line is a login whose address is invalid, or no login). Each is asserted.
//!
//! Lines go through the daemon's own [`Scanner`] (literal prefilter, line skipping, framing,
//! patterns), both as one buffer per file, as a followed log is read, and one line at a
//! time: a prefilter that skips a login line fails here, not only in production.
//!
//! Session ends: `end` lines are read as the end of a mail session (the ip column holds the
//! session id, or `user:NAME` for an end that names no session); `noend` lines are neither
//! a login nor an end (forged ends).

use std::path::Path;
use std::sync::Arc;

use dovegate::frame::{FrameParser, LocalZone};
use dovegate::grant::key_text;
use dovegate::pattern::{IpVerdict, PatternSet};
use dovegate::scan::{Line, Login, Scanner, Sink, Visit};
use dovegate::session::SessionEnd;

struct Row {
    file: String,
    number: usize,
    expected: String,
    ip: String,
    line: String,
}

fn rows(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut header = None;
    for (i, l) in text.lines().enumerate() {
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = l.splitn(7, '\t').collect();
        if header.is_none() {
            assert_eq!(cols[0], "expected", "{}: header first", path.display());
            header = Some(());
            continue;
        }
        assert_eq!(
            cols.len(),
            7,
            "{}:{}: 7 tab-separated columns",
            path.display(),
            i + 1
        );
        out.push(Row {
            file: path.display().to_string(),
            number: i + 1,
            expected: cols[0].to_string(),
            ip: cols[2].to_string(),
            line: cols[6].to_string(),
        });
    }
    out
}

/// Lines may spell bytes as `\xNN`, `\t`, `\0` and `\\` (for NULs, tabs, invalid UTF-8).
fn unescape_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'x' if i + 3 < b.len() => {
                    if let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                b't' => {
                    out.push(b'\t');
                    i += 2;
                    continue;
                }
                b'0' => {
                    out.push(0);
                    i += 2;
                    continue;
                }
                b'\\' => {
                    out.push(b'\\');
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Corpus timestamps are read as UTC, whatever the host's zone.
fn frames() -> FrameParser {
    FrameParser::new(&["dovecot"]).with_zone(LocalZone::utc())
}

/// Verdicts by line index: the canonical address, or `-` for a login line whose address
/// is invalid or ambiguous (a line with no address at all is a near miss: no login). Untimed lines (framing `message-only`) count as logins here:
/// whether they grant is the daemon sink's choice, not the scanner's.
#[derive(Default)]
struct Verdicts {
    logins: std::collections::HashMap<u64, String>,
    ends: std::collections::HashMap<u64, String>,
}

impl Verdicts {
    fn put(&mut self, line: Line<'_>, login: &Login<'_>) {
        let ip = match login.ip {
            IpVerdict::Valid(ip) => key_text(ip),
            _ => "-".to_string(),
        };
        let old = self.logins.insert(line.index, ip);
        assert!(old.is_none(), "line {} reported twice", line.index);
    }
}

impl Sink for Verdicts {
    fn login(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.put(line, login)
    }
    fn untimed(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.put(line, login)
    }
    fn bad_address(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.put(line, login)
    }
    fn session_end(&mut self, line: Line<'_>, end: &SessionEnd) {
        let closed = match &end.id {
            Some(id) => id.clone(),
            None => format!("user:{}", end.user.clone().unwrap_or_default()),
        };
        let old = self.ends.insert(line.index, closed);
        assert!(old.is_none(), "line {} ended twice", line.index);
    }
}

fn check(files: &[&str], enable: &[&str]) -> (usize, usize) {
    let enable: Vec<String> = enable.iter().map(|s| s.to_string()).collect();
    let services = ["imap".to_string(), "pop3".to_string()];
    let patterns = Arc::new(PatternSet::load(None, &services, &enable).unwrap());
    let mut scanner = Scanner::new(frames(), patterns, &services, 64 * 1024, Visit::Logins);
    let now = dovegate::timefmt::now();
    let (mut total, mut logins) = (0, 0);
    let mut failures = Vec::new();
    for f in files {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus");
        let rows = rows(&dir.join(f));
        let lines: Vec<Vec<u8>> = rows.iter().map(|r| unescape_bytes(&r.line)).collect();
        for l in &lines {
            assert!(!l.contains(&b'\n'), "{f}: a corpus line holds a newline");
        }
        // The whole file as one buffer, as the follower hands it to the scanner.
        let mut whole = Verdicts::default();
        scanner.scan(&lines.join(&b'\n'), now, &mut whole);
        for (i, row) in rows.iter().enumerate() {
            total += 1;
            let mut alone = Verdicts::default();
            scanner.scan(&lines[i], now, &mut alone);
            let got = whole.logins.get(&(i as u64)).cloned();
            let end = whole.ends.get(&(i as u64)).cloned();
            match row.expected.as_str() {
                "end" if end.as_deref() != Some(row.ip.as_str()) => failures.push(format!(
                    "{}:{}: want the end of {} got {end:?}: {}",
                    row.file, row.number, row.ip, row.line
                )),
                "noend" if end.is_some() => failures.push(format!(
                    "{}:{}: read as an end of {end:?}: {}",
                    row.file, row.number, row.line
                )),
                "login" | "nologin" | "end" | "noend" => {}
                other => failures.push(format!(
                    "{}:{}: unknown verdict {other}",
                    row.file, row.number
                )),
            }
            let want = (row.expected == "login").then(|| row.ip.clone());
            if row.expected == "login" {
                logins += 1;
            }
            if got != want {
                failures.push(format!(
                    "{}:{}: want {want:?} got {got:?}: {}",
                    row.file, row.number, row.line
                ));
            }
            let got_alone = alone.logins.get(&0).cloned();
            let end_alone = alone.ends.get(&0).cloned();
            if got_alone != got || end_alone != end {
                failures.push(format!(
                    "{}:{}: alone {got_alone:?} {end_alone:?}, in the file {got:?} {end:?}: {}",
                    row.file, row.number, row.line
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus lines wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    (total, logins)
}

#[test]
fn every_corpus_line_has_its_verdict() {
    let files = corpus_files(false);
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let (total, logins) = check(&names, &[]);
    assert!(total > 100 && logins > 10, "{total} lines, {logins} logins");
}

fn corpus_files(opt_in: bool) -> Vec<String> {
    let mut files: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tsv") && n.contains("opt-in") == opt_in)
            .collect();
    files.sort();
    files
}

/// Every enabled-by-default pattern is in the main library: no file needs an opt-in one.
#[test]
fn no_corpus_file_needs_an_opt_in_pattern() {
    assert_eq!(corpus_files(true), Vec::<String>::new());
    let p = PatternSet::load(None, &["imap".into(), "pop3".into()], &[]).unwrap();
    for id in [
        "dovecot-2.2-proxy",
        "dovecot-2.3-proxy",
        "dovecot-2.4-proxy",
    ] {
        assert!(p.defs().iter().any(|d| d.id == id), "{id} on by default");
    }
}
