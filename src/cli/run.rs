//! `dovegate run`: wires sources, engine and map together and runs until SIGTERM/SIGINT;
//! SIGHUP reloads the configuration (a bad one is refused and the running one stays).

use std::path::PathBuf;
use std::process::Command as Process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::config::{parse_net, Settings};
use crate::engine::{self, Engine, Exit};
use crate::frame::FrameParser;
use crate::grant::Policy;
use crate::pattern::PatternSet;
use crate::scan::LineMatcher;
use crate::serve::metrics::MetricsSource;
use crate::source::checkpoint::CheckpointDir;
use crate::source::journal::{
    spawn_journal_source, EntryJudge, JournalSourceSpec, JournalStart, JournalTarget,
};
use crate::source::{spawn_file_source, Batch, FileSourceSpec, StatsRegistry};
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
    Ok(parse_mynetworks(&String::from_utf8_lossy(&out.stdout)))
}

/// The literal networks in a `mynetworks` value; tables and files are reported and skipped.
fn parse_mynetworks(text: &str) -> Vec<IpNet> {
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
    nets
}

/// Everything a (re)loaded configuration decides.
struct Effective {
    settings: Settings,
    patterns: Arc<PatternSet>,
    exclude: Vec<IpNet>,
    journal: Option<JournalTarget>,
}

impl Effective {
    fn load(args: &RunArgs) -> Result<Effective, Failure> {
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
        Ok(Effective {
            settings,
            patterns,
            exclude,
            journal,
        })
    }

    fn policy(&self) -> Policy {
        Policy::new(self.exclude.clone(), self.settings.ttl)
    }

    fn matcher(&self) -> LineMatcher {
        LineMatcher::new(
            FrameParser::new(&self.settings.syslog_idents),
            Arc::clone(&self.patterns),
        )
    }
}

/// One generation of sources: their threads, journalctl children and channel. A reload
/// stops them (after the engine committed what they sent) and starts new ones from the
/// saved checkpoints; lines read in between are read again, never lost.
struct Sources {
    stop: Arc<AtomicBool>,
    children: Arc<Mutex<Vec<u32>>>,
    rx: tokio::sync::mpsc::Receiver<Batch>,
}

impl Sources {
    fn start(
        cfg: &Effective,
        checkpoints: &CheckpointDir,
        stats: &StatsRegistry,
    ) -> Result<Sources, Failure> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let stop = Arc::new(AtomicBool::new(false));
        let children = Arc::new(Mutex::new(Vec::new()));
        let settings = &cfg.settings;
        let cutoff = timefmt::now() - i64::try_from(settings.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        for (index, path) in settings.logs.iter().enumerate() {
            let spec = FileSourceSpec {
                index,
                path: path.clone(),
                checkpoint: checkpoints.load(path),
                max_line: settings.max_line_bytes,
                poll_interval: settings.poll_interval,
                cutoff,
            };
            spawn_file_source(
                spec,
                cfg.matcher(),
                tx.clone(),
                Arc::clone(&stop),
                stats.for_source(&path.display().to_string()),
            )
            .map_err(|e| Failure::runtime(format!("cannot start source thread: {e}")))?;
        }
        if let Some(target) = &cfg.journal {
            let start = match checkpoints.load_cursor(&target.key()) {
                Some(c) => JournalStart::AfterCursor(c),
                None => JournalStart::Since(cutoff),
            };
            tracing::info!(journal = %target.key(), start = ?start, units = ?settings.provenance.units, "following the journal");
            let spec = JournalSourceSpec {
                index: settings.logs.len(),
                target: target.clone(),
                start,
                max_line: settings.max_line_bytes.max(64 * 1024),
            };
            let judge = EntryJudge {
                matcher: cfg.matcher(),
                provenance: settings.provenance.clone(),
            };
            spawn_journal_source(
                spec,
                judge,
                tx.clone(),
                Arc::clone(&stop),
                stats.for_source(&target.key()),
                Arc::clone(&children),
            )
            .map_err(|e| Failure::runtime(format!("cannot start journal thread: {e}")))?;
        }
        Ok(Sources { stop, children, rx })
    }

    /// Stops the threads (they exit at their next wake-up or send) and journalctl.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(pids) = self.children.lock() {
            for &pid in pids.iter() {
                // SAFETY: signalling our own journalctl child.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
        }
    }
}

fn status_line(engine: &Engine<LmdbMap>, stats: &StatsRegistry) -> String {
    let t = stats.totals();
    format!(
        "{} grants active, {} lines read, {} logins, {} forged",
        engine.active(),
        t.lines,
        t.logins,
        t.forged
    )
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    // Signal handlers first: a SIGTERM during start-up must still mean a clean stop.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))?;
    let mut signals = runtime
        .block_on(async { Signals::install() })
        .map_err(|e| Failure::runtime(format!("cannot install signal handlers: {e}")))?;
    let mut cfg = Effective::load(&args)?;
    let settings = cfg.settings.clone();
    std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
        Failure::runtime(format!(
            "{}: cannot create state directory: {e}",
            settings.state_dir.display()
        ))
    })?;
    // One daemon per map and state directory, before anything touches either.
    let _instance =
        crate::store::instance::InstanceLock::acquire(&settings.map_path, &settings.state_dir)
            .map_err(|e| Failure::runtime(e.0))?;
    let map = LmdbMap::open(&settings.map_path, &settings.action, OpenMode::Create)
        .map_err(|e| Failure::runtime(e.0))?;
    let checkpoints = CheckpointDir::new(&settings.state_dir);
    let mut engine = Engine::new(map, cfg.policy(), checkpoints.clone(), timefmt::now())
        .map_err(|e| Failure::runtime(e.0))?;
    let stats = Arc::new(StatsRegistry::default());
    if let Some(sm) = settings.socketmap.clone() {
        let listen = format!("{:?}", sm.listen);
        runtime
            .block_on(crate::serve::socketmap::spawn(sm, engine.view()))
            .map_err(|e| {
                Failure::runtime(format!("serve.socketmap: cannot listen on {listen}: {e}"))
            })?;
    }
    let counters = Arc::new(Mutex::new(engine.counters.clone()));
    if let Some(addr) = settings.metrics {
        let src = Arc::new(MetricsSource {
            stats: Arc::clone(&stats),
            engine: Arc::clone(&counters),
            view: engine.view(),
            checkpoints: checkpoints.clone(),
        });
        runtime
            .block_on(crate::serve::metrics::spawn(addr, src))
            .map_err(|e| {
                Failure::runtime(format!("serve.metrics: cannot listen on {addr}: {e}"))
            })?;
    }
    let mut sources = Sources::start(&cfg, &checkpoints, &stats)?;
    tracing::info!(
        map = %settings.map_path.display(),
        grants = engine.active(),
        logs = ?settings.logs,
        journal = ?cfg.journal.as_ref().map(JournalTarget::key),
        ttl = %humantime::format_duration(settings.ttl),
        "dovegate started"
    );
    crate::notify::ready(&status_line(&engine, &stats));
    let mut heartbeat = {
        let stats = Arc::clone(&stats);
        let counters = Arc::clone(&counters);
        move |e: &Engine<LmdbMap>| {
            crate::notify::status(&status_line(e, &stats));
            crate::notify::watchdog();
            if let Ok(mut c) = counters.lock() {
                *c = e.counters.clone();
            }
        }
    };
    let result = loop {
        let exit = runtime.block_on(engine::run(
            &mut engine,
            &mut sources.rx,
            cfg.settings.commit_interval,
            signals.next(),
            &mut heartbeat,
        ));
        match exit {
            Ok(Exit::Reload) => {
                crate::notify::reloading();
                match Effective::load(&args) {
                    Ok(mut new) => {
                        if new.settings.map_path != settings.map_path
                            || new.settings.state_dir != settings.state_dir
                        {
                            tracing::warn!(
                                "map.path and state.dir changes take effect at the next restart"
                            );
                            new.settings.map_path = settings.map_path.clone();
                            new.settings.state_dir = settings.state_dir.clone();
                        }
                        sources.stop();
                        engine.set_policy(new.policy());
                        cfg = new;
                        sources = Sources::start(&cfg, &checkpoints, &stats)?;
                        tracing::info!(logs = ?cfg.settings.logs, ttl = %humantime::format_duration(cfg.settings.ttl), "configuration reloaded");
                    }
                    Err(f) => tracing::error!(
                        "reload refused, the running configuration stays: {}",
                        f.message
                    ),
                }
                crate::notify::ready(&status_line(&engine, &stats));
            }
            Ok(Exit::Shutdown) | Ok(Exit::SourcesGone) => break Ok(()),
            Err(e) => break Err(Failure::runtime(e.0)),
        }
    };
    crate::notify::stopping();
    sources.stop();
    log_summary(&cfg.settings, &engine, &stats);
    result
}

fn log_summary(settings: &Settings, engine: &Engine<LmdbMap>, stats: &StatsRegistry) {
    let c = &engine.counters;
    let t = stats.totals();
    tracing::info!(
        map = %settings.map_path.display(),
        bytes = t.bytes,
        lines = t.lines,
        logins = t.logins,
        invalid_ip = t.invalid_ip,
        ambiguous_ip = t.ambiguous_ip,
        forged = t.forged,
        granted = c.granted,
        excluded = c.excluded,
        commits = c.commits,
        removed = c.removed,
        active = engine.active(),
        "dovegate stopped"
    );
}

/// SIGTERM, SIGINT and SIGHUP, registered before anything else starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Exit {
        let exit = tokio::select! {
            _ = self.term.recv() => Exit::Shutdown,
            _ = self.int.recv() => Exit::Shutdown,
            _ = self.hup.recv() => Exit::Reload,
        };
        match exit {
            Exit::Reload => tracing::info!("SIGHUP: reloading the configuration"),
            _ => tracing::info!("shutting down: committing pending grants"),
        }
        exit
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mynetworks_forms() {
        let nets = super::parse_mynetworks(
            "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128, 192.0.2.0/24\n hash:/etc/postfix/network_table 10.1.2.3",
        );
        let text: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "127.0.0.0/8",
                "::ffff:127.0.0.0/104",
                "::1/128",
                "192.0.2.0/24",
                "10.1.2.3/32"
            ]
        );
    }
}
