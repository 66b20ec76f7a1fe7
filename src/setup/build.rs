//! What the settings build for every command, in one place: the grant `Policy` (with
//! Postfix's `mynetworks` when `grant.exclude_mynetworks`) and the `Scanner`. `run`,
//! `test` and `grant` call these and nothing else, so they cannot disagree about who may
//! relay or which line is a login.

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::Failure;
use crate::config::Settings;
use crate::frame::FrameParser;
use crate::grant::Policy;
use crate::pattern::PatternSet;
use crate::scan::{Scanner, Visit};

/// The networks that never get a grant: `grant.exclude`, plus `mynetworks` when asked.
pub fn exclusions(settings: &Settings) -> Result<Vec<IpNet>, Failure> {
    let mut exclude = settings.exclude.clone();
    if settings.exclude_mynetworks {
        let dir = settings.postfix_config_dir.as_deref();
        exclude.extend(
            crate::postfix::mynetworks(dir)
                .map_err(|e| Failure::config(format!("grant.exclude_mynetworks: {e}")))?,
        );
    }
    Ok(exclude)
}

/// The grant policy with lifetime `ttl` (the configured one, or `grant --ttl`).
pub fn policy(settings: &Settings, ttl: Duration) -> Result<Policy, Failure> {
    Ok(Policy::new(exclusions(settings)?, ttl).with_ipv6_prefix(settings.ipv6_prefix))
}

/// A scanner for these settings and patterns.
pub fn scanner(settings: &Settings, patterns: &Arc<PatternSet>, visit: Visit) -> Scanner {
    Scanner::new(
        FrameParser::new(&settings.syslog_idents),
        Arc::clone(patterns),
        &settings.services,
        settings.max_line_bytes,
        visit,
    )
}
