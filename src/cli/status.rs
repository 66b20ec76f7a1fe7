//! `dovegate status`: the live state from the state directory and the map, read as any
//! other reader would (shared locks), without the daemon's cooperation: whether a daemon
//! holds the map, each configured source and where it stands, the PostgreSQL fleet status
//! files, and the open mail sessions.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::check::Account;
use super::{load_settings, ConfigArgs, Failure};
use crate::replica::ReplicaStatus;
use crate::session::OpenSession;
use crate::source::tailer::{open_regular, PathProblem};
use crate::state::{Checkpoint, CheckpointDir};
use crate::store::writer::{WriterStatus, MAX_SKEW_SECS};
use crate::store::{instance, AdminStore, OpenMode};
use crate::timefmt;

/// A status file not rewritten for this long means its writer stopped or is stuck (they
/// are rewritten every few seconds).
const STATUS_STALE_SECS: i64 = 30;
/// Sessions listed one per line in text output; `--json` lists all.
const SESSIONS_SHOWN: usize = 20;

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
    /// The user the daemon runs as, whose access to the log files is checked (default:
    /// dovegate when it exists, else the current user).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Every writer and replica as the shared database sees them (needs
    /// store.postgres_url_file): last report, clock skew, spill queue, lag.
    #[arg(long)]
    fleet: bool,
}

#[derive(Serialize)]
pub(super) struct MapStatus {
    file: String,
    grants: usize,
    next_expiry: Option<String>,
    /// When the map file was last written (its last commit).
    last_commit: Option<String>,
}

impl MapStatus {
    /// The map `file` holding `grants`, as of `now`.
    pub(super) fn of(file: &Path, grants: &[crate::store::StoredGrant], now: i64) -> MapStatus {
        MapStatus {
            file: file.display().to_string(),
            grants: grants.len(),
            next_expiry: grants
                .iter()
                .filter_map(|g| g.expires)
                .filter(|&e| e > now)
                .min()
                .map(timefmt::rfc3339),
            last_commit: mtime(file),
        }
    }

    pub(super) fn print(&self) {
        println!(
            "map {}: {} grant(s), next expiry {}, last commit {}",
            self.file,
            self.grants,
            self.next_expiry.as_deref().unwrap_or("-"),
            self.last_commit.as_deref().unwrap_or("-")
        );
    }
}

/// Whether a `dovegate run` holds the map (its single-instance lock).
#[derive(Serialize)]
struct DaemonStatus {
    /// null: could not tell.
    running: Option<bool>,
    pid: Option<u32>,
}

/// One generation of a followed file, as its checkpoint names it.
#[derive(Serialize)]
struct Generation {
    inode: u64,
    /// Bytes read and committed.
    offset: u64,
}

/// A followed file: configured or only checkpointed, its state now and its checkpoint.
#[derive(Serialize)]
struct FileStatus {
    path: String,
    /// In `source.logs` (false: only a checkpoint is left of it).
    configured: bool,
    /// `readable`, `missing`, `unreadable`, `not-regular` or `error`.
    state: &'static str,
    /// What the daemon says about it when not readable.
    problem: Option<String>,
    size: Option<u64>,
    /// Generations, oldest first (empty: no checkpoint yet).
    generations: Vec<Generation>,
    /// Bytes written after the committed offset (null: no checkpoint, or rotated since).
    behind_bytes: Option<u64>,
    saved: Option<String>,
}

#[derive(Serialize)]
struct JournalStatus {
    journal: String,
    /// `source.journal` is on (false: only a saved cursor is left).
    configured: bool,
    cursor: Option<String>,
}

/// `STATE/fleet.json`, times as RFC 3339.
#[derive(Serialize)]
struct DatabaseStatus {
    database: String,
    connected: bool,
    disconnected_since: Option<String>,
    last_error: Option<String>,
    last_commit: Option<String>,
    queue_len: usize,
    queue_max: usize,
    /// Some grants never reached the database (spill queue overflow).
    behind: bool,
    dropped_total: u64,
    /// This host's clock minus the database's, seconds.
    clock_skew_secs: Option<f64>,
    /// The database's schema is newer than this dovegate (not an outage: upgrade).
    newer_schema: Option<crate::store::postgres::NewerSchema>,
    updated: String,
    /// Not rewritten for 30 s: the daemon that writes it stopped or is stuck.
    stale_file: bool,
}

/// `STATE/replica.json`, times as RFC 3339.
#[derive(Serialize)]
struct ReplicaOut {
    database: String,
    connected: bool,
    disconnected_since: Option<String>,
    last_error: Option<String>,
    last_snapshot: Option<String>,
    last_snapshot_grants: usize,
    last_change: Option<String>,
    lag_secs: Option<f64>,
    grants: usize,
    newer_schema: Option<crate::store::postgres::NewerSchema>,
    updated: String,
    stale_file: bool,
}

#[derive(Serialize)]
struct SessionOut {
    id: String,
    ip: String,
    pid: Option<u32>,
    user: Option<String>,
    login: String,
    renewed: String,
    /// What the daemon's last check found (`none`: held only ttl).
    evidence: &'static str,
    /// The latest its grant can be held while the session stays open (login +
    /// `grant.session_hold`); with evidence gone it ends sooner.
    hold_until: String,
}

#[derive(Serialize)]
struct PushStatus {
    socket: Option<String>,
    auth_policy: Option<String>,
}

/// `[drac]`: who may add, and what rpcbind tells DRAC clients.
#[derive(Serialize)]
struct DracStatus {
    allow: Vec<String>,
    /// `netid address` of each registration (empty: clients cannot find dovegate).
    registered: Vec<String>,
    /// Why rpcbind could not be asked.
    error: Option<String>,
}

#[derive(Serialize)]
struct Status {
    /// The user whose access to the log files was checked (the daemon's).
    user: Option<String>,
    map: MapStatus,
    daemon: DaemonStatus,
    files: Vec<FileStatus>,
    journals: Vec<JournalStatus>,
    push: Option<PushStatus>,
    drac: Option<DracStatus>,
    database: Option<DatabaseStatus>,
    replica: Option<ReplicaOut>,
    /// null: no sessions file in the state directory.
    sessions: Option<Vec<SessionOut>>,
    /// What the daemon's session checks did (null: it saved nothing yet).
    session_stats: Option<crate::session::SessionStats>,
    /// The same warnings the text output prints.
    warnings: Vec<String>,
}

fn mtime(path: &Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(timefmt::rfc3339(i64::try_from(secs).ok()?))
}

fn file_status(
    path: &Path,
    configured: bool,
    cp: Option<&Checkpoint>,
    dir: &CheckpointDir,
    user: Option<&Account>,
) -> FileStatus {
    let (state, problem, size) = match open_regular(path) {
        // Opened by this process (often root): what counts is whether the daemon's user
        // may, by the file's and directories' modes and that user's groups.
        Ok((_, meta)) => match user.and_then(|u| u.read_problem(path)) {
            Some(p) => ("unreadable", Some(p), Some(meta.len())),
            None => ("readable", None, Some(meta.len())),
        },
        Err(p) => {
            let state = match p {
                PathProblem::Missing { .. } => "missing",
                PathProblem::Unreadable { .. } => "unreadable",
                PathProblem::NotRegular { .. } => "not-regular",
                PathProblem::Io { .. } => "error",
            };
            (state, Some(p.to_string()), None)
        }
    };
    FileStatus {
        path: path.display().to_string(),
        configured,
        state,
        problem,
        size,
        generations: cp.map_or_else(Vec::new, |c| {
            c.files
                .iter()
                .map(|f| Generation {
                    inode: f.id.ino,
                    offset: f.offset,
                })
                .collect()
        }),
        behind_bytes: cp.and_then(Checkpoint::lag),
        saved: cp.and_then(|c| mtime(&dir.file_for(&c.path))),
    }
}

fn stale_warning(file: &str, updated: i64, now: i64) -> Option<String> {
    let age = now - updated;
    (age > STATUS_STALE_SECS).then(|| {
        format!(
            "{file} was last updated {} ({age} s ago): the process that writes it is not running or is stuck",
            timefmt::rfc3339(updated)
        )
    })
}

/// The open sessions the daemon saved, if it saved any (a missing file is not an error).
fn load_sessions(state_dir: &Path, warnings: &mut Vec<String>) -> Option<Vec<OpenSession>> {
    use crate::fsread::{self, Links};
    // Where the daemon saves them (beside the checkpoints).
    let path = crate::state::CheckpointDir::new(state_dir).sessions_file();
    let bytes = match fsread::read(&path, fsread::SESSIONS_MAX, Links::Refuse) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return None,
        Err(e) => {
            warnings.push(e.to_string());
            return None;
        }
    };
    match crate::state::parse_sessions(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            warnings.push(format!("{}: not a list of sessions: {e}", path.display()));
            None
        }
    }
}

pub fn run(args: StatusArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(&args.cfg, |f| {
        if let Some(d) = &args.state_dir {
            f.state.dir = d.display().to_string();
        }
    })?;
    if args.fleet {
        return super::fleet_status::fleet(&settings, args.json);
    }
    if let Some(shown) = super::fleet_status::replica_host(&settings, args.json) {
        return shown;
    }
    let mut map = super::admin::open(&settings, OpenMode::ReadOnly)?;
    let grants = map.list().map_err(super::admin::store_failure)?;
    let mut warnings = Vec::new();
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
            warnings.push(format!(
                "{}: cannot tell whether a daemon holds the map: {e}",
                instance::map_lock_path(&settings.map_path).display()
            ));
            DaemonStatus {
                running: None,
                pid: None,
            }
        }
    };
    let file = map.path().to_path_buf();
    let now = timefmt::now();
    let checkpoints = CheckpointDir::new(&settings.state_dir);
    let saved = checkpoints.all();
    let account = Account::service_user(args.user.as_deref());
    if let (Some(name), None) = (&args.user, &account) {
        return Err(Failure::config(format!("--user: no user `{name}`")));
    }
    let user = account.as_ref();
    let mut files: Vec<FileStatus> = settings
        .logs
        .iter()
        .map(|p| {
            let cp = saved.iter().find(|c| &c.path == p);
            file_status(p, true, cp, &checkpoints, user)
        })
        .collect();
    for c in saved.iter().filter(|c| !settings.logs.contains(&c.path)) {
        files.push(file_status(&c.path, false, Some(c), &checkpoints, user));
    }
    let cursors = checkpoints.cursors();
    let mut journals = Vec::new();
    if settings.journal {
        let key = "system".to_string();
        journals.push(JournalStatus {
            cursor: cursors
                .iter()
                .find(|c| c.journal == key)
                .map(|c| c.cursor.clone()),
            journal: key,
            configured: true,
        });
    }
    for c in cursors {
        if !journals.iter().any(|j| j.journal == c.journal) {
            journals.push(JournalStatus {
                journal: c.journal,
                configured: false,
                cursor: Some(c.cursor),
            });
        }
    }
    let push = settings.push.enabled().then(|| PushStatus {
        socket: settings
            .push
            .socket
            .as_ref()
            .map(|p| p.display().to_string()),
        auth_policy: settings.push.auth_policy.as_ref().map(ToString::to_string),
    });
    let drac = settings.drac.enabled().then(|| {
        let socket = Path::new(crate::drac::rpcbind::SOCKET);
        let (registered, error) = match crate::drac::rpcbind::registrations(socket) {
            Ok(list) => (
                list.into_iter().map(|(n, a)| format!("{n} {a}")).collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(format!("rpcbind ({}): {e}", socket.display()))),
        };
        if daemon.running == Some(true) && registered.is_empty() {
            warnings.push(format!(
                "drac: DRAC is not registered with rpcbind{}: DRAC clients cannot find dovegate (see the daemon's log)",
                error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            ));
        }
        DracStatus {
            allow: settings.drac.allow.iter().map(ToString::to_string).collect(),
            registered,
            error,
        }
    });
    let database = WriterStatus::load(&settings.state_dir).map(|w| {
        let file = settings.state_dir.join(WriterStatus::FILE);
        let stale = stale_warning(&file.display().to_string(), w.updated, now);
        let stale_file = stale.is_some();
        warnings.extend(stale);
        DatabaseStatus {
            database: w.database,
            connected: w.connected,
            disconnected_since: w.disconnected_since.map(timefmt::rfc3339),
            last_error: w.last_error,
            last_commit: w.last_commit.map(timefmt::rfc3339),
            queue_len: w.queue_len,
            queue_max: w.queue_max,
            behind: w.behind,
            dropped_total: w.dropped_total,
            clock_skew_secs: w.clock_skew_secs,
            newer_schema: w.newer_schema,
            updated: timefmt::rfc3339(w.updated),
            stale_file,
        }
    });
    let replica = ReplicaStatus::load(&settings.state_dir).map(|r| {
        let file = settings.state_dir.join(ReplicaStatus::FILE);
        let stale = stale_warning(&file.display().to_string(), r.updated, now);
        let stale_file = stale.is_some();
        warnings.extend(stale);
        ReplicaOut {
            database: r.database,
            connected: r.connected,
            disconnected_since: r.disconnected_since.map(timefmt::rfc3339),
            last_error: r.last_error,
            last_snapshot: r.last_snapshot.map(timefmt::rfc3339),
            last_snapshot_grants: r.last_snapshot_grants,
            last_change: r.last_change.map(timefmt::rfc3339),
            lag_secs: r.lag_secs,
            grants: r.grants,
            newer_schema: r.newer_schema,
            updated: timefmt::rfc3339(r.updated),
            stale_file,
        }
    });
    let hold = i64::try_from(settings.session_hold.as_secs()).unwrap_or(i64::MAX);
    let sessions = load_sessions(&settings.state_dir, &mut warnings).map(|list| {
        list.into_iter()
            .map(|s| SessionOut {
                id: s.id,
                ip: s.ip.to_string(),
                pid: s.pid,
                user: s.user,
                login: timefmt::rfc3339(s.login),
                renewed: timefmt::rfc3339(s.renewed),
                evidence: s.evidence.name(),
                hold_until: timefmt::rfc3339(s.login.saturating_add(hold)),
            })
            .collect()
    });
    let session_stats =
        std::fs::read(crate::state::CheckpointDir::new(&settings.state_dir).session_stats_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let status = Status {
        user: account.map(|a| a.name),
        map: MapStatus::of(&file, &grants, now),
        daemon,
        files,
        journals,
        push,
        drac,
        database,
        replica,
        sessions,
        session_stats,
        warnings,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(());
    }
    print_text(&status, &settings.state_dir);
    for w in &status.warnings {
        eprintln!("dovegate: warning: {w}");
    }
    Ok(())
}

fn print_text(status: &Status, state_dir: &Path) {
    status.map.print();
    match (status.daemon.running, status.daemon.pid) {
        (Some(true), Some(pid)) => println!("daemon: running (pid {pid}), holds the map"),
        (Some(true), None) => println!(
            "daemon: the map's lock file is held, but not by a running dovegate that named itself (pid unknown)"
        ),
        (Some(false), _) => println!("daemon: none holds the map"),
        (None, _) => println!("daemon: unknown"),
    }
    for f in &status.files {
        let now = match (&f.problem, f.size) {
            (Some(p), _) => p.clone(),
            (None, Some(size)) => format!("readable, {size} bytes"),
            (None, None) => f.state.to_string(),
        };
        let position = if f.generations.is_empty() {
            "no checkpoint yet".to_string()
        } else {
            let gens: Vec<String> = f
                .generations
                .iter()
                .map(|g| format!("inode {} at {}", g.inode, g.offset))
                .collect();
            let behind = f
                .behind_bytes
                .map_or("unknown (rotated since)".to_string(), |b| {
                    format!("{b} bytes behind")
                });
            format!(
                "checkpoint {}; {behind}; saved {}",
                gens.join(", "),
                f.saved.as_deref().unwrap_or("-")
            )
        };
        let configured = if f.configured {
            ""
        } else {
            " (not configured)"
        };
        println!("file {}{configured}: {now}; {position}", f.path);
    }
    for j in &status.journals {
        let configured = if j.configured {
            ""
        } else {
            " (not configured)"
        };
        match &j.cursor {
            Some(c) => println!("journal {}{configured}: cursor {c}", j.journal),
            None => println!("journal {}{configured}: no cursor saved yet", j.journal),
        }
    }
    if status.files.is_empty() && status.journals.is_empty() {
        println!(
            "no source configured and no checkpoint in {}",
            state_dir.display()
        );
    }
    if let Some(d) = &status.drac {
        let registered = if d.registered.is_empty() {
            "not registered with rpcbind".to_string()
        } else {
            format!("registered with rpcbind: {}", d.registered.join(", "))
        };
        println!("drac: clients {}; {registered}", d.allow.join(", "));
    }
    if let Some(p) = &status.push {
        let parts: Vec<String> = [
            p.socket.as_ref().map(|s| format!("post-login socket {s}")),
            p.auth_policy.as_ref().map(|a| format!("auth policy {a}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        println!("push: {}", parts.join(", "));
    }
    if let Some(d) = &status.database {
        let state = if d.connected {
            format!(
                "connected, last commit {}",
                d.last_commit.as_deref().unwrap_or("-")
            )
        } else if let Some(newer) = d.newer_schema {
            format!(
                "NOT USED since {}: {newer}",
                d.disconnected_since.as_deref().unwrap_or("-")
            )
        } else {
            format!(
                "UNREACHABLE since {} ({})",
                d.disconnected_since.as_deref().unwrap_or("-"),
                d.last_error.as_deref().unwrap_or("no error recorded")
            )
        };
        println!(
            "database {}: {state}; spill queue {}/{}",
            d.database, d.queue_len, d.queue_max
        );
        if d.behind {
            println!(
                "database copy BEHIND: {} grants dropped from the full spill queue never reached it",
                d.dropped_total
            );
        }
        if let Some(skew) = d.clock_skew_secs.filter(|s| s.abs() > MAX_SKEW_SECS) {
            println!("clock: this host is {skew:+.0} s off the database's; run NTP");
        }
    }
    if let Some(r) = &status.replica {
        let state = if r.connected {
            let lag = r
                .lag_secs
                .map_or(String::new(), |l| format!(", lag {l:.3} s"));
            format!(
                "current, last snapshot {} ({} grants){lag}",
                r.last_snapshot.as_deref().unwrap_or("-"),
                r.last_snapshot_grants
            )
        } else if let Some(newer) = r.newer_schema {
            format!(
                "STALE since {}: {newer}",
                r.disconnected_since.as_deref().unwrap_or("-")
            )
        } else {
            format!(
                "STALE since {} ({})",
                r.disconnected_since.as_deref().unwrap_or("-"),
                r.last_error.as_deref().unwrap_or("no error recorded")
            )
        };
        println!("replica of {}: {state}; {} grant(s)", r.database, r.grants);
    }
    if let Some(sessions) = &status.sessions {
        println!("sessions: {} open", sessions.len());
        if let Some(st) = &status.session_stats {
            let by: Vec<String> = st
                .open_by_evidence
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(
                "  by evidence: {}; released for lack of evidence: {}, at the hold: {}, dropped: {}",
                if by.is_empty() { "-".to_string() } else { by.join(", ") },
                st.released_no_evidence,
                st.released_hold,
                st.dropped
            );
        }
        for s in sessions.iter().take(SESSIONS_SHOWN) {
            let pid = s.pid.map_or(String::new(), |p| format!(", pid {p}"));
            let user = s
                .user
                .as_ref()
                .map_or(String::new(), |u| format!(" user={u}"));
            println!(
                "  {} session {}{user} since {}{pid}, renewed {}, evidence {}, held at most until {}",
                s.ip, s.id, s.login, s.renewed, s.evidence, s.hold_until
            );
        }
        if sessions.len() > SESSIONS_SHOWN {
            println!(
                "  ... and {} more (--json lists all)",
                sessions.len() - SESSIONS_SHOWN
            );
        }
    }
}
