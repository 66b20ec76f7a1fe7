//! `dovegate sessions`: the open mail sessions that hold grants, and dropping one.
//!
//! The daemon saves its open sessions beside the checkpoints at every flush; a drop is a
//! small request file the daemon reads at its next session check (within
//! grant.session_recheck), or at its next start.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{load_settings, ConfigArgs, Failure};
use crate::source::checkpoint::CheckpointDir;
use crate::timefmt;

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// One JSON array instead of lines.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<SessionsAction>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionsAction {
    /// Ask the running daemon to drop an open session (it then renews nothing; its grant
    /// runs out ttl after its last renewal). Waits until the daemon did, or says it will.
    Drop {
        /// The session id (`session=<ID>` of its login line), as `dovegate sessions` lists.
        id: String,
    },
}

#[derive(Serialize)]
struct Entry {
    id: String,
    address: String,
    user: Option<String>,
    pid: Option<u32>,
    source: String,
    login: String,
    renewed: String,
    evidence: &'static str,
}

pub fn run(args: SessionsArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |_| {})?;
    let dir = CheckpointDir::new(&settings.state_dir);
    match args.action {
        None => list(&dir, args.json),
        Some(SessionsAction::Drop { id }) => drop(&dir, &id, &settings),
    }
}

fn list(dir: &CheckpointDir, json: bool) -> Result<(), Failure> {
    let entries: Vec<Entry> = dir
        .load_sessions()
        .into_iter()
        .map(|s| Entry {
            id: s.id,
            address: crate::grant::key_text(s.ip),
            user: s.user,
            pid: s.pid,
            source: s.source,
            login: timefmt::rfc3339(s.login),
            renewed: timefmt::rfc3339(s.renewed),
            evidence: s.evidence.name(),
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).unwrap_or_default()
        );
        return Ok(());
    }
    for e in &entries {
        println!(
            "{}\t{}\t{}\t{}\tlogin {}\trenewed {}\t{}",
            e.id,
            e.address,
            e.user.as_deref().unwrap_or("-").escape_debug(),
            e.evidence,
            e.login,
            e.renewed,
            e.source
        );
    }
    eprintln!(
        "{} open session(s) (as the daemon last saved them)",
        entries.len()
    );
    Ok(())
}

fn drop(dir: &CheckpointDir, id: &str, settings: &crate::config::Settings) -> Result<(), Failure> {
    if !crate::session::valid_id(id) {
        return Err(Failure::config(format!(
            "`{}` is not a session id (base64, as `dovegate sessions` lists)",
            id.escape_debug()
        )));
    }
    let open = |dir: &CheckpointDir| dir.load_sessions().iter().any(|s| s.id == id);
    if !open(dir) {
        return Err(Failure {
            code: 1,
            message: format!("no open session {id}"),
        });
    }
    let request = dir.request_session_drop(id).map_err(|e| {
        Failure::runtime(format!(
            "{}: cannot leave the drop request: {e} (run as root or the daemon's user)",
            dir.session_drops_dir().display()
        ))
    })?;
    // The daemon reads requests at its next session check, then saves the sessions.
    let patience = settings.session_recheck + settings.commit_interval + Duration::from_secs(5);
    let started = Instant::now();
    while started.elapsed() < patience {
        if !request.exists() && !open(dir) {
            println!("dropped session {id}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "requested: the daemon drops session {id} at its next session check, or at its next start ({})",
        request.display()
    );
    Ok(())
}
