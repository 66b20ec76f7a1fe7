//! `cli`: the command line. Parses arguments, loads settings, and wires the stages.

mod admin;
mod check;
mod docs;
mod fleet_status;
pub mod postlogin;
mod receipts;
pub mod relay_check;
mod replica;
pub mod run;
mod sessions;
mod status;
mod test_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Settings, DEFAULT_CONFIG};
// What the commands share with the daemon lives in `setup`, which both import.
pub use crate::setup::{build, load_patterns, load_settings, ConfigArgs, Failure};

#[derive(Debug, Parser)]
#[command(
    name = "dovegate",
    version,
    about = "POP/IMAP-before-SMTP: grants relay to clients that logged in to Dovecot, through a Postfix LMDB map"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Follow Dovecot's logs and keep the relay map (the daemon).
    Run(run::RunArgs),
    /// Print the stored value for an address; exit 1 when it has no grant.
    Lookup {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Any textual address form; it is canonicalised as Postfix looks it up.
        ip: String,
    },
    /// List every grant with its expiry.
    List {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Grant an address by hand (until now + ttl); in the shared database too when configured.
    Grant {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// How long (default: grant.ttl), e.g. 30m, 2h.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// The client address (any textual form; stored canonical).
        ip: String,
    },
    /// Remove an address's grant, on every host when a shared database is configured; with
    /// --all, every entry of this host's map only (the package does this when it is removed,
    /// so that no grant outlives the daemon that would expire it).
    Revoke {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Empty the map (the file stays, so Postfix's main.cf keeps working).
        #[arg(long, conflicts_with = "ip")]
        all: bool,
        /// The client address whose grant to remove.
        #[arg(required_unless_present = "all")]
        ip: Option<String>,
    },
    /// Validate the configuration and print it; exit 2 on any error.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The user the service runs as, for the permission checks (default: dovegate when
        /// it exists, else the current user).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Print the problems only, and one line when there is none (for the unit's
        /// ExecStartPre and ExecReload), instead of the effective configuration.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print the configuration in force (every key, after --config and its defaults); with
    /// --default, the embedded default with its comments.
    Config {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The embedded default configuration, with its comments (no file is read).
        #[arg(long, conflicts_with_all = ["config", "map"])]
        default: bool,
    },
    /// Run the patterns over saved logs and report what would be granted (changes nothing).
    // The journal options are `run`'s (JournalArgs): here they read once, not follow.
    #[command(
        mut_arg("journal", |a| a.help("Read the system journal once instead of FILEs (from --since, default the last grant.ttl), reporting forged entries separately; nothing is followed")),
        mut_arg("journal_dir", |a| a.help("Read the journal in this directory instead of FILEs (all of it, or from --since)")),
        mut_arg("journal_file", |a| a.help("Read this journal file instead of FILEs (all of it, or from --since)")),
    )]
    Test(test_cmd::TestArgs),
    /// Copy the grants shared in PostgreSQL or MariaDB into the local map (MTA hosts).
    Replica(replica::ReplicaArgs),
    /// Show the live state (map, sources, positions) from the map and the state directory.
    Status(status::StatusArgs),
    /// List the open mail sessions that hold grants; `sessions drop ID` ends one.
    Sessions(sessions::SessionsArgs),
    /// Create the map (empty) and the state directory if missing; for package scripts.
    Init {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Name the logins behind an address's grant (policy server).
    Why {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The client address.
        ip: String,
    },
    /// Find the receipt of a relayed message: the login that allowed it (policy server).
    Trace {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Postfix's queue id of the message.
        queue_id: String,
    },
    /// Lift the block of a user who tripped a cap (policy.block_on_cap).
    Unblock {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The login user name.
        user: String,
    },
    /// Dovecot post-login hook: push IP and USER to the daemon, then exec the rest.
    Postlogin(postlogin::PostloginArgs),
    /// ucspi-tcp chains (relay-ctrl-check): set RELAYCLIENT when $TCPREMOTEIP holds a live
    /// grant, then exec the SMTP server (always; a map it cannot read sets nothing).
    RelayCheck(relay_check::RelayCheckArgs),
    /// Write the man pages and shell completions into DIR (packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Check a private copy of a map file (the daemon runs it at start: see store::damage).
    #[command(hide = true)]
    ProbeMap { file: PathBuf },
}

/// Logs go to the journal with native fields when systemd connected stderr to it
/// (JOURNAL_STREAM), else to stderr as text.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("DOVEGATE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(layer) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter())
                // Fields as DOVEGATE_ADDRESS=, DOVEGATE_USER=, ... for `journalctl -u
                // dovegate DOVEGATE_USER=alice` (the crate's default prefix is a bare F_).
                .with(
                    layer
                        .with_syslog_identifier("dovegate".into())
                        .with_field_prefix(Some("DOVEGATE".into())),
                )
                .try_init();
            return;
        }
    }
    let filter = filter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

pub fn main() -> ExitCode {
    // The post-login hook must exec whatever happens: no clap, no logging set-up first.
    if let Some(args) = postlogin::hook_args(std::env::args_os().collect()) {
        return postlogin::run(args);
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        die_quietly_on_closed_stdout();
    }
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Lookup { cfg, ip } => admin::lookup(&cfg, &ip),
        Command::List { cfg, json } => admin::list(&cfg, json),
        Command::Grant { cfg, ttl, ip } => admin::grant(&cfg, ttl.as_deref(), &ip),
        Command::Revoke { cfg, all: true, .. } => admin::revoke_all(&cfg),
        Command::Revoke { cfg, ip, .. } => admin::revoke(&cfg, ip.as_deref().unwrap_or_default()),
        Command::CheckConfig { cfg, user, quiet } => check::run(&cfg, user.as_deref(), quiet),
        Command::Config { default: true, .. } => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Config { cfg, .. } => print_config(&cfg),
        Command::Test(args) => test_cmd::run(args),
        Command::Status(args) => status::run(args),
        Command::Sessions(args) => sessions::run(args),
        Command::Replica(args) => replica::run(args),
        Command::Init { cfg } => init(&cfg),
        Command::Why { cfg, ip } => receipts::why(&cfg, &ip),
        Command::Trace { cfg, queue_id } => receipts::trace(&cfg, &queue_id),
        Command::Unblock { cfg, user } => receipts::unblock(&cfg, &user),
        Command::GenerateDocs { dir } => docs::generate(&dir),
        Command::Postlogin(args) => return postlogin::run(args.into_args()),
        Command::RelayCheck(args) => return relay_check::run(args),
        Command::ProbeMap { file } => return crate::store::damage::probe_child(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line per problem, each naming the program.
            for line in f.message.lines().filter(|l| !l.is_empty()) {
                eprintln!("dovegate: {line}");
            }
            ExitCode::from(f.code)
        }
    }
}

/// A printing command whose reader went away (`dovegate list | head -1`) ends quietly, as
/// `cat` does: SIGPIPE's default action instead of Rust's panic on EPIPE. The daemon keeps
/// ignoring SIGPIPE (a socketmap client hanging up must not kill it).
fn die_quietly_on_closed_stdout() {
    // SAFETY: restores a signal's default action before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `dovegate config`: the configuration in force, validated, every key with its value;
/// which file it came from on stderr (stdout stays valid TOML).
fn print_config(cfg: &ConfigArgs) -> Result<(), Failure> {
    let (file, _) = load_settings(cfg, |_| {})?;
    eprintln!("dovegate: configuration {}", file.describe());
    print!("{}", file.to_toml());
    Ok(())
}

/// `dovegate init`: the map exists (empty) before Postfix ever looks, and the state
/// directory exists; nothing that exists is changed. An existing map is only opened for
/// reading (checked valid), so that a user who may read it but not write it succeeds.
fn init(cfg: &ConfigArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
        Failure::runtime(format!(
            "{}: cannot create state directory: {e}",
            settings.state_dir.display()
        ))
    })?;
    let exists = crate::store::lmdb::file_path(&settings.map_path).exists();
    let mode = if exists {
        crate::store::OpenMode::ReadOnly
    } else {
        crate::store::OpenMode::Create
    };
    let map = crate::store::LmdbMap::open_configured(&settings, mode)
        .map_err(|e| Failure::runtime(e.0))?;
    println!("{}", map.path().display());
    Ok(())
}

/// Dovecot's own log files (`doveconf log_path`, `info_log_path`), when doveconf runs.
pub(crate) fn dovecot_log_files() -> Vec<PathBuf> {
    ["log_path", "info_log_path"]
        .iter()
        .filter_map(|k| crate::setup::dovecot::doveconf(k))
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// File mode cannot tell a forged syslog line from a real one: warn for every followed file
/// that is not Dovecot's own log file.
pub(crate) fn file_mode_warnings(settings: &Settings) -> Vec<String> {
    if settings.logs.is_empty() {
        return Vec::new();
    }
    let own = dovecot_log_files();
    settings
        .logs
        .iter()
        .filter(|p| !own.contains(p))
        .map(|p| {
            format!(
                "source.logs: {} is not Dovecot's own log_path; if syslog writes it, any local user can forge a Dovecot login line there (logger -t dovecot ...). Prefer journal mode (source.journal = true), or Dovecot's log_path in a file only Dovecot writes.",
                p.display()
            )
        })
        .collect()
}
