//! `dovegate test`: the patterns over saved logs, in the spirit of fail2ban-regex.
//! Reads plain or gzip files (or stdin) and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::frame::Framing;
use crate::grant::{key_text, Decision, Policy};
use crate::pattern::{IpVerdict, PatternSet};
use crate::scan::{Line, Login, NearMiss, Scanner, Sink, Visit};
use crate::source::journal::{
    journalctl, scan_entries, spawn_journalctl, JournalStart, JournalTarget,
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
    /// After the summary, list every address it would grant, with its logins and how
    /// long it would be held (sessions included).
    #[arg(long)]
    grants: bool,
    /// Saved logs (plain or .gz, also on stdin); `-`: standard input. None: the configured
    /// sources (source.logs, and the journal when source.journal is on).
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
    /// Why a login-looking line grants nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    near_miss: Option<NearMiss>,
    /// Longer than source.max_line_bytes: skipped unread.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    too_long: bool,
    /// Read as the end of a mail session.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    session_end: bool,
    /// The session it closed (null: none open it could be tied to).
    #[serde(skip_serializing_if = "skip_ip")]
    closed_session: Option<Option<String>>,
}

fn skip_ip(v: &Option<Option<String>>) -> bool {
    v.is_none()
}

#[derive(Default)]
struct Totals {
    lines: u64,
    bytes: u64,
    matched: u64,
    per_pattern: BTreeMap<String, u64>,
    per_framing: BTreeMap<Framing, u64>,
    excluded: BTreeMap<String, u64>,
    expired: u64,
    invalid_ip: u64,
    ambiguous_ip: u64,
    near_misses: BTreeMap<NearMiss, u64>,
    too_long: u64,
    /// Keyed by canonical address (a string per login cost a tenth of a scan); printed
    /// in the order of their text.
    grants: HashMap<IpAddr, u64>,
    /// Journal entries refused by the provenance check, by reason.
    forged: BTreeMap<String, u64>,
    /// Until when each granted address would be held (logins and sessions).
    held_until: HashMap<IpAddr, i64>,
    sessions_opened: u64,
    sessions_closed: u64,
}

/// Opens a saved log (gzip recognised by its magic bytes); returns it and its size on disk.
fn open_input(path: &PathBuf) -> Result<(Box<dyn Read>, u64), Failure> {
    let (mut f, size): (Box<dyn Read>, u64) = if path.as_os_str() == "-" {
        (Box::new(io::stdin().lock()), 0)
    } else {
        let f = File::open(path)
            .map_err(|e| Failure::runtime(format!("{}: cannot read: {e}", path.display())))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        (Box::new(f), size)
    };
    let mut magic = [0u8; 2];
    let mut n = 0;
    // Two bytes even from a pipe that delivers one at a time.
    while n < 2 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::runtime(format!("{}: {e}", path.display()))),
        }
    }
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

/// `dovegate test`'s sink: counts everything for the summary and, per line, writes the
/// JSON object or the `--print-*` line.
struct Report<'a> {
    args: &'a TestArgs,
    policy: &'a Policy,
    now: i64,
    totals: Totals,
    out: BufWriter<io::StdoutLock<'static>>,
    /// The file being read, and the number of its lines before the current chunk.
    file: String,
    base: u64,
    journal: bool,
    /// The first write error (a closed stdout ends the command).
    error: Option<io::Error>,
    /// Mail sessions, dated by the lines themselves.
    sessions: crate::session::Sessions,
    /// The latest line time seen (where the input ends, for the sessions still open).
    last_time: i64,
    /// source.max_line_bytes: longer lines are skipped (and counted as too long).
    max_line: usize,
}

impl Report<'_> {
    /// Lines the reader dropped whole (longer than its buffer): counted as lines and as
    /// too long, and reported as such, so that line numbers after them stay right.
    fn dropped(&mut self, count: u64) {
        for _ in 0..count {
            self.totals.lines += 1;
            self.totals.too_long += 1;
            let r = LineReport {
                too_long: true,
                ..self.blank(Line {
                    index: 0,
                    text: b"",
                })
            };
            if self.args.json {
                let file = std::mem::take(&mut self.file);
                self.write(&LineReport { file: &file, ..r });
                self.file = file;
            } else if self.args.print_missed && self.error.is_none() {
                let n = self.base + 1;
                if let Err(e) = writeln!(
                    self.out,
                    "too-long {}:{n}: (longer than the read buffer; not shown)",
                    self.file
                ) {
                    self.error = Some(e);
                }
            }
            self.base += 1;
        }
    }

    fn number(&self, line: Line<'_>) -> u64 {
        self.base + line.index + 1
    }

    fn write(&mut self, r: &LineReport<'_>) {
        if self.error.is_some() || !self.args.json {
            return;
        }
        let res = serde_json::to_writer(&mut self.out, r)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = res {
            self.error = Some(e);
        }
    }

    fn print(&mut self, tag: &str, line: Line<'_>) {
        if self.error.is_some() {
            return;
        }
        let n = self.number(line);
        let res = writeln!(
            self.out,
            "{tag} {}:{n}: {}",
            self.file,
            String::from_utf8_lossy(line.text).escape_debug()
        );
        if let Err(e) = res {
            self.error = Some(e);
        }
    }

    fn blank(&self, line: Line<'_>) -> LineReport<'static> {
        LineReport {
            file: "",
            line: self.number(line),
            matched: false,
            pattern: None,
            dovecot: None,
            protocol: None,
            user: None,
            ip: None,
            time: None,
            excluded: None,
            forged: None,
            near_miss: None,
            too_long: false,
            session_end: false,
            closed_session: None,
        }
    }

    fn matched(&mut self, line: Line<'_>, login: &Login<'_>) {
        let (ip, excluded) = self.totals.record_login(login, self.policy, self.now);
        if let (Some(key), None, IpVerdict::Valid(addr), Some(t)) =
            (ip, &excluded, &login.ip, login.time)
        {
            self.hold(key, t);
            self.last_time = self.last_time.max(t);
            if let Some(start) = crate::source::session_start(login, &self.file) {
                if self.sessions.opened(*addr, t, &start, t) {
                    self.totals.sessions_opened += 1;
                }
            }
        }
        // The report line costs five strings: only `--json` prints it.
        if !self.args.json {
            return;
        }
        let file = std::mem::take(&mut self.file);
        let r = LineReport {
            file: &file,
            line: self.number(line),
            forged: self.journal.then_some(false),
            ..login_report(login, ip.map(key_text), excluded)
        };
        self.write(&r);
        self.file = file;
    }

    fn unmatched(&mut self, line: Line<'_>, r: LineReport<'_>, tag: Option<&str>) {
        if self.args.json {
            let file = std::mem::take(&mut self.file);
            self.write(&LineReport { file: &file, ..r });
            self.file = file;
        } else if let Some(tag) = tag {
            self.print(tag, line);
        }
    }
}

impl Report<'_> {
    /// A grant as if the address logged in at `time`: held until time + ttl, or later.
    fn hold(&mut self, key: IpAddr, time: i64) {
        let until = time.saturating_add(self.policy.ttl_secs());
        let e = self.totals.held_until.entry(key).or_insert(until);
        *e = (*e).max(until);
    }
}

impl Sink for Report<'_> {
    fn login(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.matched(line, login);
    }

    fn session_end(&mut self, line: Line<'_>, end: &crate::model::SessionEnd) {
        let t = end.time.unwrap_or(self.now);
        self.last_time = self.last_time.max(t);
        let mut end = end.clone();
        end.source = self.file.clone();
        let closed = crate::model::ends_held(&end.service)
            .then(|| self.sessions.closed(&end, t))
            .flatten();
        if let Some(c) = &closed {
            self.totals.sessions_closed += 1;
            self.hold(c.renewal.ip.to_canonical(), c.renewal.time);
        }
        let r = LineReport {
            session_end: true,
            closed_session: Some(closed.map(|c| c.id)),
            ..self.blank(line)
        };
        self.unmatched(line, r, None);
    }

    /// Reported like any login: the summary counts framings, `message-only` included.
    fn untimed(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.matched(line, login);
    }

    fn bad_address(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.matched(line, login);
    }

    fn forged(&mut self, line: Line<'_>, login: &Login<'_>, why: &str) {
        *self.totals.forged.entry(why.to_string()).or_default() += 1;
        let r = LineReport {
            matched: true,
            ip: Some(ip_text(&login.ip)),
            forged: Some(true),
            ..self.blank(line)
        };
        self.unmatched(line, r, None);
    }

    fn too_long(&mut self, line: Line<'_>) {
        // Files count their long lines by chunk (`long_lines`): most never reach the sink.
        if self.journal {
            self.totals.too_long += 1;
        }
        let r = LineReport {
            too_long: true,
            ..self.blank(line)
        };
        let tag = self.args.print_missed.then_some("too-long");
        self.unmatched(line, r, tag);
    }

    fn near_miss(&mut self, line: Line<'_>, why: NearMiss) {
        *self.totals.near_misses.entry(why).or_default() += 1;
        let r = LineReport {
            near_miss: Some(why),
            ..self.blank(line)
        };
        let tag = format!("near-miss({})", why.name());
        let show = self.args.print_missed || self.args.print_near_misses;
        self.unmatched(line, r, show.then_some(tag.as_str()));
    }

    fn other(&mut self, line: Line<'_>) {
        if line.text.len() > self.max_line {
            return Sink::too_long(self, line);
        }
        let r = self.blank(line);
        let tag = self.args.print_missed.then_some("missed");
        self.unmatched(line, r, tag);
    }
}

fn ip_text(ip: &IpVerdict) -> Option<String> {
    match ip {
        IpVerdict::Valid(ip) => Some(key_text(*ip)),
        _ => None,
    }
}

/// The report of a matched login (file and line are filled in by the caller).
fn login_report(
    login: &Login<'_>,
    ip: Option<String>,
    excluded: Option<String>,
) -> LineReport<'static> {
    LineReport {
        file: "",
        line: 0,
        matched: true,
        pattern: Some(login.pattern.id.clone()),
        dovecot: Some(login.pattern.dovecot.clone()),
        protocol: Some(String::from_utf8_lossy(login.service).into_owned()),
        user: login.user.map(|u| String::from_utf8_lossy(u).into_owned()),
        ip: Some(ip),
        time: login.time.map(timefmt::rfc3339),
        excluded: Some(excluded),
        forged: None,
        near_miss: None,
        too_long: false,
        session_end: false,
        closed_session: None,
    }
}

impl Totals {
    /// Counts a matched login and returns (the address as Postfix looks it up, why the
    /// policy would not grant it).
    fn record_login(
        &mut self,
        login: &Login<'_>,
        policy: &Policy,
        now: i64,
    ) -> (Option<IpAddr>, Option<String>) {
        self.matched += 1;
        match self.per_pattern.get_mut(&login.pattern.id) {
            Some(n) => *n += 1,
            None => {
                self.per_pattern.insert(login.pattern.id.clone(), 1);
            }
        }
        *self.per_framing.entry(login.framing).or_default() += 1;
        let time = login.time;
        match &login.ip {
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
                        *self.grants.entry(ip.to_canonical()).or_default() += 1;
                        None
                    }
                };
                (Some(ip.to_canonical()), excluded)
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

/// What `test` prints per line decides how much the scanner visits.
fn visit(args: &TestArgs) -> Visit {
    if args.json || args.print_missed || args.print_near_misses {
        Visit::EveryLine
    } else {
        Visit::NearMisses
    }
}

pub fn run(args: TestArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |_| {})?;
    let patterns: Arc<PatternSet> = Arc::new(load_patterns(&settings, args.patterns.as_deref())?);
    let policy = super::build::policy(&settings, settings.ttl)?;
    let scanner = super::build::scanner(&settings, &patterns, visit(&args));
    let hold = i64::try_from(settings.session_hold.as_secs()).unwrap_or(i64::MAX / 4);
    let mut report = Report {
        args: &args,
        policy: &policy,
        now: timefmt::now(),
        totals: Totals::default(),
        out: BufWriter::new(io::stdout().lock()),
        file: String::new(),
        base: 0,
        journal: false,
        error: None,
        sessions: crate::session::Sessions::new(policy.ttl_secs(), hold),
        last_time: 0,
        max_line: settings.max_line_bytes,
    };
    let started = Instant::now();
    let result = match args.journal.target(false) {
        Some(target) => run_journal(&args, &settings, scanner, &mut report, target),
        // No file: what `run` would follow.
        None if args.files.is_empty() => {
            let files = settings.logs.clone();
            if settings.journal {
                run_journal(
                    &args,
                    &settings,
                    scanner,
                    &mut report,
                    JournalTarget::System,
                )
            } else if files.is_empty() {
                Err(Failure::config(
                    "no FILE given and no source configured (source.logs, source.journal); `-` reads standard input",
                ))
            } else {
                run_files(&files, &settings, scanner, &mut report)
            }
        }
        None => run_files(&args.files, &settings, scanner, &mut report),
    };
    result?;
    // Sessions still open at the end of the input, by the daemon's rules where no process
    // can be seen: held until their cap only when their source ties end lines.
    for r in report.sessions.held_at_the_end(report.last_time) {
        report.hold(r.ip.to_canonical(), r.time);
    }
    let flushed = report.out.flush();
    if let Some(e) = report.error.take().or(flushed.err()) {
        return Err(output_error(e));
    }
    if !args.json {
        print_summary(&report.totals, &patterns, started.elapsed().as_secs_f64())
            .map_err(output_error)?;
        if args.grants {
            print_grants(&report.totals).map_err(output_error)?;
        }
    }
    Ok(())
}

/// A closed stdout (`| head`) ends the command quietly; other write errors are reported.
fn output_error(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure {
            code: 0,
            message: String::new(),
        }
    } else {
        Failure::runtime(format!("writing output: {e}"))
    }
}

fn run_files(
    files: &[PathBuf],
    settings: &crate::config::Settings,
    mut scanner: Scanner,
    report: &mut Report<'_>,
) -> Result<(), Failure> {
    for path in files {
        let name = path.display().to_string();
        let (mut input, size) = open_input(path)?;
        let mut reader = ChunkReader::new(settings.max_line_bytes, 0);
        let mut progress = Progress::new(&name, size);
        let mut file_bytes = 0u64;
        report.file = name.clone();
        report.base = 0;
        let mut dropped = 0;
        loop {
            // Lines dropped by the last read come before those of the next chunk.
            report.dropped(reader.dropped_long_lines - dropped);
            dropped = reader.dropped_long_lines;
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
            file_bytes += chunk.len() as u64;
            progress.update(file_bytes);
            report.totals.too_long += long_lines(chunk, report.max_line);
            let n = scanner.scan(chunk, report.now, report);
            report.base += n.lines;
            report.totals.lines += n.lines;
            report.totals.bytes += n.bytes;
            if report.error.is_some() {
                return Ok(());
            }
        }
        report.dropped(reader.dropped_long_lines - dropped);
        progress.done();
    }
    Ok(())
}

fn print_summary(t: &Totals, patterns: &PatternSet, secs: f64) -> io::Result<()> {
    let mut o = io::stdout().lock();
    writeln!(o, "Patterns (enabled):")?;
    for d in patterns.defs() {
        writeln!(
            o,
            "  {:<20} Dovecot {:<14} hits {}",
            d.id,
            d.dovecot,
            t.per_pattern.get(&d.id).copied().unwrap_or(0)
        )?;
    }
    writeln!(o, "Framings of matched lines:")?;
    for (f, n) in &t.per_framing {
        writeln!(o, "  {:<20} {n}", f.name())?;
    }
    if t.per_framing.contains_key(&Framing::MessageOnly) {
        writeln!(o, "  (message-only lines have no timestamp: `run` grants them only with source.untimed_lines_grant = true)")?;
    }
    writeln!(
        o,
        "Lines: {} lines, {} matched, {} missed",
        t.lines,
        t.matched,
        t.lines - t.matched
    )?;
    writeln!(
        o,
        "Grants: {} distinct addresses from {} logins ({} older than the ttl)",
        t.grants.len(),
        t.grants.values().sum::<u64>(),
        t.expired
    )?;
    for (why, n) in &t.excluded {
        writeln!(o, "Excluded: {n} ({why})")?;
    }
    writeln!(o, "Invalid client address: {}", t.invalid_ip)?;
    writeln!(o, "Conflicting rip= (forged?): {}", t.ambiguous_ip)?;
    writeln!(
        o,
        "Near misses (look like logins, matched nothing): {}",
        t.near_misses.values().sum::<u64>()
    )?;
    for (why, n) in &t.near_misses {
        writeln!(o, "  {n} {}", why.name())?;
    }
    if t.sessions_opened > 0 || t.sessions_closed > 0 {
        writeln!(
            o,
            "Sessions: {} opened, {} closed (a grant is held while its session is open, up to grant.session_hold)",
            t.sessions_opened, t.sessions_closed
        )?;
    }
    if t.too_long > 0 {
        writeln!(
            o,
            "Too long (skipped, source.max_line_bytes): {}",
            t.too_long
        )?;
    }
    if !t.forged.is_empty() {
        writeln!(
            o,
            "Forged (untrusted sender): {}",
            t.forged.values().sum::<u64>()
        )?;
        for (why, n) in &t.forged {
            writeln!(o, "  {n} from {why}")?;
        }
    }
    let mb = t.bytes as f64 / 1e6;
    writeln!(
        o,
        "Time: {secs:.3} s, {mb:.1} MB, {:.1} MB/s, {:.0} lines/s",
        if secs > 0.0 { mb / secs } else { 0.0 },
        if secs > 0.0 {
            t.lines as f64 / secs
        } else {
            0.0
        }
    )
}

/// Lines of `chunk` longer than `max` bytes (without their newline), as the scanner
/// measures them.
fn long_lines(chunk: &[u8], max: usize) -> u64 {
    if chunk.len() <= max {
        return 0;
    }
    let mut n = 0;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', chunk) {
        n += u64::from(end - start > max);
        start = end + 1;
    }
    n + u64::from(chunk.len() - start > max)
}

/// `--grants`: every address that would be granted, its logins and how long it is held.
fn print_grants(t: &Totals) -> io::Result<()> {
    let mut o = io::stdout().lock();
    writeln!(o, "Addresses granted (logins, held until):")?;
    let mut rows: Vec<(String, &u64, Option<&i64>)> = t
        .grants
        .iter()
        .map(|(ip, n)| (key_text(*ip), n, t.held_until.get(ip)))
        .collect();
    rows.sort_unstable();
    for (ip, n, until) in rows {
        let until = until.map_or_else(|| "-".to_string(), |&u| timefmt::rfc3339(u));
        writeln!(o, "  {ip}\t{n}\t{until}")?;
    }
    Ok(())
}

/// `--since`: RFC 3339, or a duration meaning that long ago.
fn parse_since(text: &str) -> Result<i64, Failure> {
    if let Some(t) = timefmt::parse_rfc3339(text) {
        return Ok(t);
    }
    let d = crate::config::parse_duration("--since", text)
        .map_err(|e| Failure::config(e.to_string()))?;
    Ok(timefmt::now() - i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
}

/// The same patterns and provenance check over a journal (journalctl, not following).
fn run_journal(
    args: &TestArgs,
    settings: &crate::config::Settings,
    mut scanner: Scanner,
    report: &mut Report<'_>,
    target: JournalTarget,
) -> Result<(), Failure> {
    let since = match (&args.since, &target) {
        (Some(s), _) => parse_since(s)?,
        (None, JournalTarget::System) => timefmt::now() - report.policy.ttl_secs(),
        (None, _) => 0,
    };
    let mut child = spawn_journalctl(journalctl(&target, &JournalStart::Since(since), false))
        .map_err(|e| Failure::runtime(format!("cannot run journalctl: {e}")))?;
    let Some(mut stdout) = child.stdout.take() else {
        return Err(Failure::runtime("journalctl: no output"));
    };
    report.file = "journal".into();
    report.journal = true;
    let mut reader = ChunkReader::new(settings.max_line_bytes.max(64 * 1024), 0);
    let mut cursor = None;
    let mut dropped = 0;
    loop {
        report.dropped(reader.dropped_long_lines - dropped);
        dropped = reader.dropped_long_lines;
        let chunk = match reader
            .read_chunk(&mut stdout)
            .map_err(|e| Failure::runtime(format!("journalctl: {e}")))?
        {
            Chunk::Partial => continue,
            Chunk::Eof => break,
            Chunk::Lines(c, _) => c,
        };
        let n = scan_entries(
            &mut scanner,
            &settings.provenance,
            chunk,
            report.now,
            report,
            &mut cursor,
        );
        report.base += n.lines;
        report.totals.lines += n.lines;
        report.totals.bytes += n.bytes;
        if report.error.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
    }
    let status = child
        .wait()
        .map_err(|e| Failure::runtime(format!("journalctl: {e}")))?;
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
    Ok(())
}
