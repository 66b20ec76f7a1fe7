//! `dovegate test`: the patterns over saved logs, in the spirit of fail2ban-regex.
//! Reads plain or gzip files (or stdin) and changes nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::frame::{FrameParser, Framing};
use crate::grant::{key_text, Decision, Policy};
use crate::pattern::{IpVerdict, PatternSet};
use crate::scan::LineMatcher;
use crate::source::journal::{
    journalctl, spawn_journalctl, EntryJudge, EntryVerdict, JournalStart, JournalTarget,
};
use crate::source::lines::{Chunk, ChunkReader};
use crate::timefmt;

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Pattern directory replacing the embedded library.
    #[arg(long, value_name = "DIR")]
    patterns: Option<PathBuf>,
    /// One JSON object per input line on stdout, nothing else.
    #[arg(long)]
    json: bool,
    /// Print the lines that matched no pattern.
    #[arg(long)]
    print_missed: bool,
    /// Print lines that look like logins but matched no pattern.
    #[arg(long)]
    print_near_misses: bool,
    #[command(flatten)]
    journal: super::run::JournalArgs,
    /// With a journal: start at this time (RFC 3339, or a duration meaning that long ago,
    /// e.g. 2h). Default: the whole journal file or directory; the system journal's last ttl.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Saved logs (plain or .gz); `-` or none: standard input.
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct LineReport<'a> {
    file: &'a str,
    line: u64,
    matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dovecot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// Canonical text as Postfix looks it up; null when the captured address is invalid.
    #[serde(skip_serializing_if = "skip_ip")]
    ip: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(skip_serializing_if = "skip_ip")]
    excluded: Option<Option<String>>,
    /// Journal entries: true when the provenance check refused the sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    forged: Option<bool>,
}

fn skip_ip(v: &Option<Option<String>>) -> bool {
    v.is_none()
}

#[derive(Default)]
struct Totals {
    lines: u64,
    bytes: u64,
    matched: u64,
    per_pattern: BTreeMap<usize, u64>,
    per_framing: BTreeMap<Framing, u64>,
    excluded: BTreeMap<String, u64>,
    expired: u64,
    invalid_ip: u64,
    ambiguous_ip: u64,
    near_misses: u64,
    grants: BTreeMap<String, u64>,
    /// Journal entries refused by the provenance check, by reason.
    forged: BTreeMap<String, u64>,
}

/// Opens a saved log (gzip recognised by its magic bytes); returns it and its size on disk.
fn open_input(path: &PathBuf) -> Result<(Box<dyn Read>, u64), Failure> {
    if path.as_os_str() == "-" {
        return Ok((Box::new(io::stdin().lock()), 0));
    }
    let mut f = File::open(path)
        .map_err(|e| Failure::runtime(format!("{}: cannot read: {e}", path.display())))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(|e| Failure::runtime(format!("{}: {e}", path.display())))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let head = io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(f);
    if n == 2 && magic == [0x1f, 0x8b] {
        // Progress is unknown for compressed input (its size on disk is not its length).
        Ok((Box::new(flate2::read::MultiGzDecoder::new(chained)), 0))
    } else {
        Ok((Box::new(chained), size))
    }
}

/// A progress line on stderr for large inputs, only when stderr is a terminal.
struct Progress {
    name: String,
    size: u64,
    shown: bool,
    last: Instant,
    on: bool,
}

impl Progress {
    fn new(name: &str, size: u64) -> Progress {
        Progress {
            name: name.to_string(),
            size,
            shown: false,
            last: Instant::now(),
            on: size > 50_000_000 && io::IsTerminal::is_terminal(&io::stderr()),
        }
    }

    fn update(&mut self, file_bytes: u64) {
        if !self.on {
            return;
        }
        if self.last.elapsed().as_millis() < 200 {
            return;
        }
        self.last = Instant::now();
        self.shown = true;
        let done = file_bytes.min(self.size);
        let pct = done * 100 / self.size.max(1);
        let bar = "#".repeat((pct / 4) as usize);
        eprint!("\r{} [{bar:<25}] {pct:>3}%", self.name);
    }

    fn done(&self) {
        if self.shown {
            eprintln!("\r{} [{}] 100%", self.name, "#".repeat(25));
        }
    }
}

fn looks_like_login(line: &[u8]) -> bool {
    let m = |n: &[u8]| memchr::memmem::find(line, n).is_some();
    m(b"Login: ") || m(b"Logged in: ") || m(b"started proxying") || m(b"Started proxying")
}

struct Tester<'a> {
    matcher: LineMatcher,
    /// Line number within the current file (1-based in reports).
    file_line: u64,
    /// Lines that mention a login service: matched, or counted as near misses.
    login_finder: memchr::memmem::Finder<'static>,
    policy: &'a Policy,
    now: i64,
    totals: Totals,
    out: BufWriter<io::StdoutLock<'static>>,
    args: &'a TestArgs,
}

impl Tester<'_> {
    /// Every line, for --json and --print-*: one report per line.
    fn each_line(&mut self, file: &str, chunk: &[u8]) -> io::Result<()> {
        for line in chunk.split_inclusive(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            self.totals.lines += 1;
            self.file_line += 1;
            let n = self.file_line;
            let has_literal = self.login_finder.find(line).is_some();
            let found = if has_literal { self.one(line) } else { None };
            match found {
                Some(r) => {
                    if self.args.json {
                        let mut r = r;
                        r.file = file;
                        r.line = n;
                        serde_json::to_writer(&mut self.out, &r)?;
                        self.out.write_all(b"\n")?;
                    }
                }
                None => {
                    let near = has_literal && looks_like_login(line);
                    if near {
                        self.totals.near_misses += 1;
                    }
                    if self.args.json {
                        writeln!(
                            self.out,
                            "{{\"file\":{},\"line\":{n},\"matched\":false}}",
                            serde_json::to_string(file)?
                        )?;
                    } else if self.args.print_missed || (near && self.args.print_near_misses) {
                        let tag = if near { "near-miss" } else { "missed" };
                        writeln!(
                            self.out,
                            "{tag} {file}:{n}: {}",
                            String::from_utf8_lossy(line).escape_debug()
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Candidate lines only (fast path for the summary). Every line that mentions
    /// `-login: ` is looked at, so that near misses are counted too.
    fn candidates(&mut self, chunk: &[u8]) {
        self.totals.lines += memchr::memchr_iter(b'\n', chunk).count() as u64;
        let mut pos = 0;
        while let Some(i) = self.login_finder.find(&chunk[pos..]) {
            let hit = pos + i;
            let start = memchr::memrchr(b'\n', &chunk[pos..hit]).map_or(pos, |j| pos + j + 1);
            let end = memchr::memchr(b'\n', &chunk[hit..]).map_or(chunk.len(), |j| hit + j);
            let line = &chunk[start..end];
            if self.one(line).is_none() && looks_like_login(line) {
                self.totals.near_misses += 1;
            }
            pos = end + 1;
            if pos >= chunk.len() {
                break;
            }
        }
    }

    fn one(&mut self, line: &[u8]) -> Option<LineReport<'static>> {
        let (frame, login) = self.matcher.match_line(line, self.now)?;
        let (ip, excluded) = self.totals.record_login(
            login.pattern,
            frame.framing,
            &login.ip,
            frame.time,
            self.policy,
            self.now,
        );
        let def = &self.matcher.patterns().defs()[login.pattern];
        Some(login_report(
            def,
            String::from_utf8_lossy(login.service).into_owned(),
            login.user.map(|u| String::from_utf8_lossy(u).into_owned()),
            ip,
            excluded,
            frame.time,
        ))
    }
}

/// The report of a matched login (file and line are filled in by the caller).
fn login_report(
    def: &crate::pattern::PatternDef,
    protocol: String,
    user: Option<String>,
    ip: Option<String>,
    excluded: Option<String>,
    time: Option<i64>,
) -> LineReport<'static> {
    LineReport {
        file: "",
        line: 0,
        matched: true,
        pattern: Some(def.id.clone()),
        dovecot: Some(def.dovecot.clone()),
        protocol: Some(protocol),
        user,
        ip: Some(ip),
        time: time.map(timefmt::rfc3339),
        excluded: Some(excluded),
        forged: None,
    }
}

impl Totals {
    /// Counts a matched login and returns (the address as Postfix looks it up, why the
    /// policy would not grant it).
    fn record_login(
        &mut self,
        pattern: usize,
        framing: Framing,
        ip: &IpVerdict,
        time: Option<i64>,
        policy: &Policy,
        now: i64,
    ) -> (Option<String>, Option<String>) {
        self.matched += 1;
        *self.per_pattern.entry(pattern).or_default() += 1;
        *self.per_framing.entry(framing).or_default() += 1;
        match ip {
            IpVerdict::Valid(ip) => {
                let excluded = match policy.exclusion(*ip) {
                    Some(why) => {
                        *self.excluded.entry(why.to_string()).or_default() += 1;
                        Some(why.to_string())
                    }
                    None => {
                        // Old logins would not grant now; counted, but reported as grants.
                        if matches!(policy.decide(*ip, time, now), Decision::Expired) {
                            self.expired += 1;
                        }
                        *self.grants.entry(key_text(*ip)).or_default() += 1;
                        None
                    }
                };
                (Some(key_text(*ip)), excluded)
            }
            IpVerdict::Invalid(_) => {
                self.invalid_ip += 1;
                (None, Some("invalid-ip".to_string()))
            }
            IpVerdict::Ambiguous => {
                self.ambiguous_ip += 1;
                (None, Some("ambiguous-ip".to_string()))
            }
            IpVerdict::Missing => (None, Some("no-ip".to_string())),
        }
    }
}

pub fn run(args: TestArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |_| {})?;
    let patterns: Arc<PatternSet> = Arc::new(load_patterns(&settings, args.patterns.as_deref())?);
    let policy = Policy::new(settings.exclude.clone(), settings.ttl);
    let files = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files.clone()
    };
    if let Some(target) = args.journal.target(false) {
        return run_journal(&args, &settings, patterns, &policy, target);
    }
    let started = Instant::now();
    let per_line = args.json || args.print_missed || args.print_near_misses;
    let mut t = Tester {
        matcher: LineMatcher::new(
            FrameParser::new(&settings.syslog_idents),
            Arc::clone(&patterns),
        ),
        login_finder: memchr::memmem::Finder::new(b"-login: "),
        file_line: 0,
        policy: &policy,
        now: timefmt::now(),
        totals: Totals::default(),
        out: BufWriter::new(io::stdout().lock()),
        args: &args,
    };
    let io_err = |e: io::Error| Failure::runtime(format!("writing output: {e}"));
    for path in &files {
        let name = path.display().to_string();
        let (mut input, size) = open_input(path)?;
        let mut reader = ChunkReader::new(settings.max_line_bytes, 0);
        let mut progress = Progress::new(&name, size);
        let mut file_bytes = 0u64;
        t.file_line = 0;
        loop {
            let chunk = match reader
                .read_chunk(&mut input)
                .map_err(|e| Failure::runtime(format!("{name}: {e}")))?
            {
                Chunk::Partial => continue,
                Chunk::Lines(chunk, _) => chunk,
                // A saved log may end without a newline: its last line counts too.
                Chunk::Eof => match reader.take_last_line() {
                    Some(last) => last,
                    None => break,
                },
            };
            t.totals.bytes += chunk.len() as u64;
            file_bytes += chunk.len() as u64;
            progress.update(file_bytes);
            if per_line {
                t.each_line(&name, chunk).map_err(io_err)?;
            } else {
                t.candidates(chunk);
                if !chunk.ends_with(b"\n") {
                    t.totals.lines += 1;
                }
            }
        }
        progress.done();
    }
    let elapsed = started.elapsed();
    t.out.flush().map_err(io_err)?;
    if !args.json {
        print_summary(&t.totals, &patterns, elapsed.as_secs_f64());
    }
    Ok(())
}

fn print_summary(t: &Totals, patterns: &PatternSet, secs: f64) {
    println!("Patterns (enabled):");
    for (i, d) in patterns.defs().iter().enumerate() {
        println!(
            "  {:<20} Dovecot {:<14} hits {}",
            d.id,
            d.dovecot,
            t.per_pattern.get(&i).copied().unwrap_or(0)
        );
    }
    println!("Framings of matched lines:");
    for (f, n) in &t.per_framing {
        println!("  {:<20} {n}", f.name());
    }
    println!(
        "Lines: {} lines, {} matched, {} missed",
        t.lines,
        t.matched,
        t.lines - t.matched
    );
    println!(
        "Grants: {} distinct addresses from {} logins ({} older than the ttl)",
        t.grants.len(),
        t.grants.values().sum::<u64>(),
        t.expired
    );
    for (why, n) in &t.excluded {
        println!("Excluded: {n} ({why})");
    }
    println!("Invalid client address: {}", t.invalid_ip);
    println!("Conflicting rip= (forged?): {}", t.ambiguous_ip);
    println!(
        "Near misses (look like logins, matched nothing): {}",
        t.near_misses
    );
    if !t.forged.is_empty() {
        println!(
            "Forged (untrusted sender): {}",
            t.forged.values().sum::<u64>()
        );
        for (why, n) in &t.forged {
            println!("  {n} from {why}");
        }
    }
    let mb = t.bytes as f64 / 1e6;
    println!(
        "Time: {secs:.3} s, {mb:.1} MB, {:.1} MB/s, {:.0} lines/s",
        if secs > 0.0 { mb / secs } else { 0.0 },
        if secs > 0.0 {
            t.lines as f64 / secs
        } else {
            0.0
        }
    );
}

/// `--since`: RFC 3339, or a duration meaning that long ago.
fn parse_since(text: &str) -> Result<i64, Failure> {
    if let Some(t) = timefmt::parse_rfc3339(text) {
        return Ok(t);
    }
    let d = crate::config::parse_duration("--since", text).map_err(|e| Failure::config(e.0))?;
    Ok(timefmt::now() - i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
}

/// The same patterns and provenance check over a journal (journalctl, not following).
fn run_journal(
    args: &TestArgs,
    settings: &crate::config::Settings,
    patterns: Arc<PatternSet>,
    policy: &Policy,
    target: JournalTarget,
) -> Result<(), Failure> {
    let since = match (&args.since, &target) {
        (Some(s), _) => parse_since(s)?,
        (None, JournalTarget::System) => timefmt::now() - policy.ttl_secs(),
        (None, _) => 0,
    };
    let mut judge = EntryJudge {
        matcher: LineMatcher::new(
            FrameParser::new(&settings.syslog_idents),
            Arc::clone(&patterns),
        ),
        provenance: settings.provenance.clone(),
    };
    let mut child = spawn_journalctl(journalctl(&target, &JournalStart::Since(since), false))
        .map_err(|e| Failure::runtime(format!("cannot run journalctl: {e}")))?;
    let Some(mut stdout) = child.stdout.take() else {
        return Err(Failure::runtime("journalctl: no output"));
    };
    let started = Instant::now();
    let now = timefmt::now();
    let mut totals = Totals::default();
    let mut out = BufWriter::new(io::stdout().lock());
    let io_err = |e: io::Error| Failure::runtime(format!("writing output: {e}"));
    let mut reader = ChunkReader::new(settings.max_line_bytes.max(64 * 1024), 0);
    loop {
        let chunk = match reader
            .read_chunk(&mut stdout)
            .map_err(|e| Failure::runtime(format!("journalctl: {e}")))?
        {
            Chunk::Partial => continue,
            Chunk::Eof => break,
            Chunk::Lines(c, _) => c,
        };
        totals.bytes += chunk.len() as u64;
        for line in chunk.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            totals.lines += 1;
            let entry = judge.judge(line, now);
            let mut report = LineReport {
                file: "journal",
                line: totals.lines,
                matched: false,
                pattern: None,
                dovecot: None,
                protocol: None,
                user: None,
                ip: None,
                time: None,
                excluded: None,
                forged: None,
            };
            let ip_text = |ip: &IpVerdict| match ip {
                IpVerdict::Valid(ip) => Some(key_text(*ip)),
                _ => None,
            };
            match &entry.verdict {
                EntryVerdict::Other => {}
                EntryVerdict::Forged { ip, why } => {
                    *totals.forged.entry(why.clone()).or_default() += 1;
                    report.matched = true;
                    report.ip = Some(ip_text(ip));
                    report.forged = Some(true);
                }
                EntryVerdict::Login {
                    pattern,
                    service,
                    user,
                    ip,
                    time,
                } => {
                    let (ip, excluded) =
                        totals.record_login(*pattern, Framing::Journal, ip, *time, policy, now);
                    report = LineReport {
                        forged: Some(false),
                        file: "journal",
                        line: totals.lines,
                        ..login_report(
                            &patterns.defs()[*pattern],
                            service.clone(),
                            user.clone(),
                            ip,
                            excluded,
                            *time,
                        )
                    };
                }
            }
            if args.json {
                serde_json::to_writer(&mut out, &report).map_err(|e| io_err(e.into()))?;
                out.write_all(b"\n").map_err(io_err)?;
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| Failure::runtime(format!("journalctl: {e}")))?;
    out.flush().map_err(io_err)?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(Failure::runtime(format!(
            "journalctl failed ({status}): {}",
            err.trim()
        )));
    }
    if !args.json {
        print_summary(&totals, &patterns, started.elapsed().as_secs_f64());
    }
    Ok(())
}
