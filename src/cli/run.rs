//! `dovegate run`: the daemon's command line; the daemon itself is `crate::daemon`.

use std::path::PathBuf;

use super::{ConfigArgs, Failure};
pub use crate::setup::JournalArgs;

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
    /// Follow the sources and print what would be granted and expired, writing neither the
    /// map nor checkpoints (to run beside the old daemon before switching).
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    crate::daemon::run(crate::daemon::Options {
        cfg: args.cfg,
        logs: args.logs,
        ttl: args.ttl,
        state_dir: args.state_dir,
        patterns: args.patterns,
        journal: args.journal,
        dry_run: args.dry_run,
    })
}
