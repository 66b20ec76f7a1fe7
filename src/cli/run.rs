//! `dovegate run`: wires sources, engine and map together and runs until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::Command as Process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::config::{parse_net, Settings};
use crate::engine::{self, Engine};
use crate::frame::FrameParser;
use crate::grant::Policy;
use crate::scan::LineMatcher;
use crate::source::checkpoint::CheckpointDir;
use crate::source::journal::{
    spawn_journal_source, EntryJudge, JournalSourceSpec, JournalStart, JournalTarget,
};
use crate::source::{spawn_file_source, FileSourceSpec, SourceStats};
use crate::store::{LmdbMap, OpenMode};
use crate::timefmt;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Log file to follow (repeatable; replaces source.logs).
    #[arg(long = "log", value_name = "PATH")]
    logs: Vec<PathBuf>,
    /// Grant lifetime after the last login, e.g. 30m (overrides grant.ttl).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Where checkpoints are kept (overrides state.dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Pattern directory replacing the embedded library (overrides patterns.dir).
    #[arg(long, value_name = "DIR")]
    patterns: Option<PathBuf>,
    #[command(flatten)]
    journal: JournalArgs,
}

/// Journal selection, shared by `run` and `test`.
#[derive(Debug, clap::Args, Default, Clone)]
pub struct JournalArgs {
    /// Follow the system journal (source.journal = true). Without --log, files are not followed.
    #[arg(long)]
    pub journal: bool,
    /// Read the journal in this directory instead of the system one (containers, tests).
    #[arg(long, value_name = "DIR", conflicts_with = "journal_file")]
    pub journal_dir: Option<PathBuf>,
    /// Read this journal file.
    #[arg(long, value_name = "FILE")]
    pub journal_file: Option<PathBuf>,
}

impl JournalArgs {
    /// Any journal flag given on the command line.
    pub fn given(&self) -> bool {
        self.journal || self.journal_dir.is_some() || self.journal_file.is_some()
    }

    /// The journal to read, if journal mode is on (flags, else `source.journal`).
    pub fn target(&self, configured: bool) -> Option<JournalTarget> {
        if let Some(f) = &self.journal_file {
            Some(JournalTarget::File(f.clone()))
        } else if let Some(d) = &self.journal_dir {
            Some(JournalTarget::Directory(d.clone()))
        } else if self.journal || configured {
            Some(JournalTarget::System)
        } else {
            None
        }
    }
}

/// Postfix's mynetworks as networks; entries that are not literal networks (tables,
/// files) are reported and skipped.
fn mynetworks() -> Result<Vec<IpNet>, Failure> {
    let out = Process::new("postconf")
        .args(["-h", "mynetworks"])
        .output()
        .map_err(|e| {
            Failure::config(format!(
                "grant.exclude_mynetworks: cannot run `postconf -h mynetworks`: {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(Failure::config(format!(
            "grant.exclude_mynetworks: `postconf -h mynetworks` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut nets = Vec::new();
    for item in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
    {
        // Postfix writes IPv6 networks as [2001:db8::]/32.
        let plain = item.replacen('[', "", 1).replacen(']', "", 1);
        match parse_net(&plain) {
            Ok(n) => nets.push(n),
            Err(_) => tracing::warn!(
                entry = item,
                "mynetworks entry is not a literal network; not excluded"
            ),
        }
    }
    Ok(nets)
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    // Signal handlers first: a SIGTERM during start-up must still mean a clean stop.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))?;
    let signals = runtime
        .block_on(async { Signals::install() })
        .map_err(|e| Failure::runtime(format!("cannot install signal handlers: {e}")))?;
    let (_, settings) = load_settings(&args.cfg, |f| {
        if !args.logs.is_empty() {
            f.source.logs = args.logs.iter().map(|p| p.display().to_string()).collect();
        } else if args.journal.given() {
            // Journal flags alone mean: the journal only.
            f.source.logs.clear();
        }
        if let Some(t) = &args.ttl {
            f.grant.ttl = t.clone();
        }
        if let Some(d) = &args.state_dir {
            f.state.dir = d.display().to_string();
        }
    })?;
    let patterns = Arc::new(load_patterns(&settings, args.patterns.as_deref())?);
    let mut exclude = settings.exclude.clone();
    if settings.exclude_mynetworks {
        exclude.extend(mynetworks()?);
    }
    let journal = args.journal.target(settings.journal);
    if settings.logs.is_empty() && journal.is_none() {
        return Err(Failure::config(
            "source.logs: no log file to follow and the journal is off (source.journal)",
        ));
    }
    std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
        Failure::runtime(format!(
            "{}: cannot create state directory: {e}",
            settings.state_dir.display()
        ))
    })?;
    let map = LmdbMap::open(&settings.map_path, &settings.action, OpenMode::Create)
        .map_err(|e| Failure::runtime(e.0))?;
    let checkpoints = CheckpointDir::new(&settings.state_dir);
    let policy = Policy::new(exclude, settings.ttl);
    let now = timefmt::now();
    let mut engine =
        Engine::new(map, policy, checkpoints.clone(), now).map_err(|e| Failure::runtime(e.0))?;
    tracing::info!(
        map = %settings.map_path.display(),
        grants = engine.active(),
        logs = ?settings.logs,
        ttl = %humantime::format_duration(settings.ttl),
        "dovegate started"
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(SourceStats::default());
    let cutoff = now - i64::try_from(settings.ttl.as_secs()).unwrap_or(i64::MAX / 2);
    for (index, path) in settings.logs.iter().enumerate() {
        let spec = FileSourceSpec {
            index,
            path: path.clone(),
            checkpoint: checkpoints.load(path),
            max_line: settings.max_line_bytes,
            poll_interval: settings.poll_interval,
            cutoff,
        };
        let matcher = LineMatcher::new(
            FrameParser::new(&settings.syslog_idents),
            Arc::clone(&patterns),
        );
        spawn_file_source(
            spec,
            matcher,
            tx.clone(),
            Arc::clone(&stop),
            Arc::clone(&stats),
        )
        .map_err(|e| Failure::runtime(format!("cannot start source thread: {e}")))?;
    }
    let journal_children = Arc::new(Mutex::new(Vec::new()));
    if let Some(target) = journal {
        let start = match checkpoints.load_cursor(&target.key()) {
            Some(c) => JournalStart::AfterCursor(c),
            None => JournalStart::Since(cutoff),
        };
        tracing::info!(journal = %target.key(), start = ?start, units = ?settings.provenance.units, "following the journal");
        let spec = JournalSourceSpec {
            index: settings.logs.len(),
            target,
            start,
            max_line: settings.max_line_bytes.max(64 * 1024),
        };
        let judge = EntryJudge {
            matcher: LineMatcher::new(
                FrameParser::new(&settings.syslog_idents),
                Arc::clone(&patterns),
            ),
            provenance: settings.provenance.clone(),
        };
        spawn_journal_source(
            spec,
            judge,
            tx.clone(),
            Arc::clone(&stop),
            Arc::clone(&stats),
            Arc::clone(&journal_children),
        )
        .map_err(|e| Failure::runtime(format!("cannot start journal thread: {e}")))?;
    }
    drop(tx);
    let commit_interval = settings.commit_interval;
    let result = runtime.block_on(async {
        engine::run(&mut engine, &mut rx, commit_interval, signals.shutdown()).await
    });
    stop.store(true, Ordering::Relaxed);
    if let Ok(pids) = journal_children.lock() {
        for &pid in pids.iter() {
            // SAFETY: signalling our own journalctl child.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    log_summary(&settings, &engine, &stats);
    result.map_err(|e| Failure::runtime(e.0))
}

fn log_summary(settings: &Settings, engine: &Engine<LmdbMap>, stats: &SourceStats) {
    let c = &engine.counters;
    tracing::info!(
        map = %settings.map_path.display(),
        bytes = stats.bytes.load(Ordering::Relaxed),
        logins = stats.logins.load(Ordering::Relaxed),
        invalid_ip = stats.invalid_ip.load(Ordering::Relaxed),
        ambiguous_ip = stats.ambiguous_ip.load(Ordering::Relaxed),
        forged = stats.forged.load(Ordering::Relaxed),
        granted = c.granted,
        excluded = c.excluded,
        commits = c.commits,
        removed = c.removed,
        active = engine.active(),
        "dovegate stopped"
    );
}

/// SIGTERM and SIGINT, registered before anything else starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn shutdown(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        tracing::info!("shutting down: committing pending grants");
    }
}
