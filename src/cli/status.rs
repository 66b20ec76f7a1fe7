//! `dovegate status`: the live state from the state directory and the map, read as any
//! other reader would (shared locks), without the daemon's cooperation.

use std::path::PathBuf;

use serde::Serialize;

use super::{load_settings, ConfigArgs, Failure};
use crate::source::checkpoint::CheckpointDir;
use crate::store::{instance, GrantStore, LmdbMap, OpenMode};
use crate::timefmt;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Where checkpoints are kept (overrides state.dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct MapStatus {
    file: String,
    grants: usize,
    next_expiry: Option<String>,
    /// When the map file was last written (its last commit).
    last_commit: Option<String>,
}

/// Whether a `dovegate run` holds the map (its single-instance lock).
#[derive(Serialize)]
struct DaemonStatus {
    /// null: could not tell.
    running: Option<bool>,
    pid: Option<u32>,
}

#[derive(Serialize)]
struct FileStatus {
    path: String,
    /// Generations, oldest first: inode and committed offset.
    files: Vec<(u64, u64)>,
    /// Bytes written after the committed offset (null: rotated since or gone).
    behind_bytes: Option<u64>,
    saved: Option<String>,
}

#[derive(Serialize)]
struct JournalStatus {
    journal: String,
    cursor: String,
}

#[derive(Serialize)]
struct Status {
    map: MapStatus,
    daemon: DaemonStatus,
    files: Vec<FileStatus>,
    journals: Vec<JournalStatus>,
}

fn mtime(path: &std::path::Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(timefmt::rfc3339(i64::try_from(secs).ok()?))
}

pub fn run(args: StatusArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |f| {
        if let Some(d) = &args.state_dir {
            f.state.dir = d.display().to_string();
        }
    })?;
    let mut map = LmdbMap::open(&settings.map_path, &settings.action, OpenMode::ReadOnly)
        .map_err(super::admin::store_failure)?;
    let grants = map.list().map_err(super::admin::store_failure)?;
    let daemon = match instance::map_holder(&settings.map_path) {
        Ok(Some(pid)) => DaemonStatus {
            running: Some(true),
            pid,
        },
        Ok(None) => DaemonStatus {
            running: Some(false),
            pid: None,
        },
        Err(e) => {
            eprintln!(
                "dovegate: {}: cannot tell whether a daemon holds the map: {e}",
                instance::map_lock_path(&settings.map_path).display()
            );
            DaemonStatus {
                running: None,
                pid: None,
            }
        }
    };
    let file = map.path().to_path_buf();
    let now = timefmt::now();
    let next = grants
        .iter()
        .filter_map(|g| g.expires)
        .filter(|&e| e > now)
        .min();
    let checkpoints = CheckpointDir::new(&settings.state_dir);
    let status = Status {
        map: MapStatus {
            file: file.display().to_string(),
            grants: grants.len(),
            next_expiry: next.map(timefmt::rfc3339),
            last_commit: mtime(&file),
        },
        daemon,
        files: checkpoints
            .all()
            .into_iter()
            .map(|c| FileStatus {
                path: c.path.display().to_string(),
                files: c.files.iter().map(|f| (f.id.ino, f.offset)).collect(),
                behind_bytes: c.lag(),
                saved: mtime(&checkpoints.file_for(&c.path)),
            })
            .collect(),
        journals: checkpoints
            .cursors()
            .into_iter()
            .map(|j| JournalStatus {
                journal: j.journal,
                cursor: j.cursor,
            })
            .collect(),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(());
    }
    let m = &status.map;
    println!(
        "map {}: {} grant(s), next expiry {}, last commit {}",
        m.file,
        m.grants,
        m.next_expiry.as_deref().unwrap_or("-"),
        m.last_commit.as_deref().unwrap_or("-")
    );
    match (status.daemon.running, status.daemon.pid) {
        (Some(true), Some(pid)) => println!("daemon: running (pid {pid}), holds the map"),
        (Some(true), None) => println!("daemon: running, holds the map"),
        (Some(false), _) => println!("daemon: none holds the map"),
        (None, _) => println!("daemon: unknown"),
    }
    for f in &status.files {
        let gens: Vec<String> = f
            .files
            .iter()
            .map(|(ino, off)| format!("inode {ino} at {off}"))
            .collect();
        let behind = f
            .behind_bytes
            .map_or("unknown (rotated since)".to_string(), |b| {
                format!("{b} bytes behind")
            });
        println!(
            "file {}: {}; {behind}; saved {}",
            f.path,
            gens.join(", "),
            f.saved.as_deref().unwrap_or("-")
        );
    }
    for j in &status.journals {
        println!("journal {}: cursor {}", j.journal, j.cursor);
    }
    if status.files.is_empty() && status.journals.is_empty() {
        println!("no source checkpoint in {}", settings.state_dir.display());
    }
    Ok(())
}
