//! Asking Postfix about itself with `postconf`: its mynetworks and its map types.
//!
//! One place for the call, so that `run` and `check-config` ask exactly the same question
//! (with the same configuration directory) and cannot disagree.

use std::path::Path;
use std::process::Command;

use ipnet::IpNet;

use crate::config::parse_net;

/// Runs `postconf [-c DIR] ARGS`; Err is one line saying what failed and what to do.
pub fn postconf(config_dir: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("postconf");
    if let Some(d) = config_dir {
        cmd.arg("-c").arg(d);
    }
    let shown = format!(
        "postconf {}{}",
        config_dir.map_or(String::new(), |d| format!("-c {} ", d.display())),
        args.join(" ")
    );
    let out = cmd.args(args).output().map_err(|e| {
        format!("cannot run `{shown}`: {e} (is Postfix installed? apt-get install postfix)")
    })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
        return Err(format!("`{shown}` failed: {why}{}", postconf_hint(&why)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What to do about a `postconf` failure, from Postfix's own words (empty: they say it).
fn postconf_hint(why: &str) -> &'static str {
    if why.contains("getifaddrs") || why.contains("Address family not supported") {
        // postconf lists the host's interfaces (over netlink) to expand its defaults.
        " (postconf lists the network interfaces over netlink: a systemd unit running dovegate needs AF_NETLINK in RestrictAddressFamilies=, as the packaged dovegate.service has)"
    } else if why.contains("main.cf") || why.contains("config_directory") {
        " (name Postfix's configuration directory with grant.postfix_config_dir, e.g. /etc/postfix-out for a second instance)"
    } else {
        ""
    }
}

/// Postfix's `mynetworks`, as literal networks.
pub fn mynetworks(config_dir: Option<&Path>) -> Result<Vec<IpNet>, String> {
    postconf(config_dir, &["-h", "mynetworks"]).map(|t| parse_mynetworks(&t))
}

/// The literal networks in a `mynetworks` value; tables and files are reported and skipped.
pub fn parse_mynetworks(text: &str) -> Vec<IpNet> {
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

/// None when Postfix (as `postconf -m` lists its map types) can read `lmdb:` maps; else
/// what to do.
pub fn lmdb_problem(map_types: &str) -> Option<String> {
    if map_types.split_whitespace().any(|t| t == "lmdb") {
        return None;
    }
    Some(
        "Postfix has no lmdb map type (`postconf -m` does not list it), so every lookup of the relay map fails and smtpd answers 451 to granted clients: apt-get install postfix-lmdb".into(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn postconf_hints_follow_postfix_words() {
        let h = super::postconf_hint(
            "postconf: fatal: getifaddrs: Address family not supported by protocol",
        );
        assert!(
            h.contains("AF_NETLINK") && !h.contains("postfix_config_dir"),
            "{h}"
        );
        let h = super::postconf_hint(
            "postconf: fatal: open /etc/postfix-out/main.cf: No such file or directory",
        );
        assert!(h.contains("grant.postfix_config_dir"), "{h}");
        assert_eq!(super::postconf_hint("postconf: fatal: out of memory"), "");
    }

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
                // IPv4-mapped networks mean their IPv4 network (defect 3).
                "127.0.0.0/8",
                "::1/128",
                "192.0.2.0/24",
                "10.1.2.3/32"
            ]
        );
    }

    #[test]
    fn lmdb_map_type() {
        assert_eq!(
            super::lmdb_problem("btree\ncidr\nhash\nlmdb\nsocketmap\n"),
            None
        );
        let p = super::lmdb_problem("btree\ncidr\nhash\n").unwrap();
        assert!(p.contains("apt-get install postfix-lmdb"), "{p}");
    }
}
