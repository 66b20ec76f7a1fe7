//! What the settings build for every command, in one place: the grant `Policy` (with
//! Postfix's `mynetworks` when `grant.exclude_mynetworks`) and the `Scanner`. `run`,
//! `test` and `grant` call these and nothing else, so they cannot disagree about who may
//! relay or which line is a login.

use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::Failure;
use crate::config::{parse_net, Settings};
use crate::frame::FrameParser;
use crate::grant::Policy;
use crate::pattern::PatternSet;
use crate::scan::{Scanner, Visit};

/// The networks that never get a grant: `grant.exclude`, plus `mynetworks` when asked.
pub fn exclusions(settings: &Settings) -> Result<Vec<IpNet>, Failure> {
    let mut exclude = settings.exclude.clone();
    if settings.exclude_mynetworks {
        exclude.extend(mynetworks()?);
    }
    Ok(exclude)
}

/// The grant policy with lifetime `ttl` (the configured one, or `grant --ttl`).
pub fn policy(settings: &Settings, ttl: Duration) -> Result<Policy, Failure> {
    Ok(Policy::new(exclusions(settings)?, ttl))
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
