//! `dovegate why IP` and `dovegate trace QUEUEID`: the logins behind a grant and the
//! receipt of a relayed message, from the policy server's files in the state directory;
//! `dovegate unblock USER`.

use super::{load_settings, ConfigArgs, Failure};
use crate::grant::parse_any_ip;
use crate::policy::receipts::{find_grant, find_receipts, GRANTS_FILE};

/// Nothing found: exit 1 with a line saying where dovegate looked.
fn not_found(message: String) -> Failure {
    Failure::runtime(message)
}

pub fn why(cfg: &ConfigArgs, ip: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let ip =
        parse_any_ip(ip).ok_or_else(|| Failure::config(format!("`{ip}` is not an IP address")))?;
    let found =
        |ip| find_grant(&settings.state_dir, ip).map_err(|e| Failure::runtime(e.to_string()));
    // The address's own grant, else its IPv6 prefix's (grant.ipv6_prefix).
    let grant = match found(ip)? {
        Some(g) => Some(g),
        None => match crate::grant::widen(ip, settings.ipv6_prefix) {
            wide if wide != ip => found(wide)?,
            _ => None,
        },
    };
    match grant {
        Some(g) => {
            let mut users: Vec<&str> = g
                .logins
                .iter()
                .map(|l| l.user.as_str())
                .filter(|u| *u != "-")
                .collect();
            users.sort_unstable();
            users.dedup();
            if users.len() >= 2 {
                println!(
                    "{} granted_at={} shared users={}",
                    g.address,
                    g.granted_at,
                    users.join(",")
                );
            } else {
                println!("{} granted_at={}", g.address, g.granted_at);
            }
            for l in g.logins {
                println!(
                    "  login at={} user={} protocol={} session={}",
                    l.at, l.user, l.protocol, l.session
                );
            }
            Ok(())
        }
        None => Err(not_found(format!(
            "{ip}: no grant with known logins in {} (written by the daemon's policy server every \
             few seconds; grants written by hand or by another host have none)",
            settings.state_dir.join(GRANTS_FILE).display()
        ))),
    }
}

pub fn trace(cfg: &ConfigArgs, queue_id: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let found = find_receipts(&settings.state_dir, queue_id.trim())
        .map_err(|e| Failure::runtime(e.to_string()))?;
    if found.is_empty() {
        return Err(not_found(format!(
            "{queue_id}: no receipt in {} (receipts are kept for the last few ten thousand \
             messages relayed under a grant)",
            settings.state_dir.display()
        )));
    }
    for r in found {
        println!(
            "queue_id={} client={} user={} protocol={} session={} granted_at={} relayed_at={}",
            r.queue_id, r.client, r.user, r.protocol, r.session, r.granted_at, r.at
        );
    }
    Ok(())
}

/// Unblocks `user` here and, with PostgreSQL or MariaDB, on every host: the database first, since
/// a daemon sharing blocks would block the user here again while the database still
/// lists it.
pub fn unblock(cfg: &ConfigArgs, user: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let owned = user.to_string();
    let not_done = format!("{user}: not unblocked (on no host)");
    let everywhere = if settings.store.mysql_url_file.is_some() {
        super::admin::in_mysql(&settings, &not_done, move |c, _| {
            Box::pin(async move { crate::store::mysql::shared_policy::unblock(c, &owned).await })
        })?
    } else {
        super::admin::in_database(&settings, &not_done, move |c, t, _| {
            Box::pin(async move {
                crate::store::postgres::shared_policy::unblock(c, &t.blocked_users, &owned).await
            })
        })?
    };
    match crate::engine::unblock(&settings.state_dir, user) {
        Ok(here) if here || everywhere == Some(true) => {
            match everywhere {
                Some(_) => println!("unblocked {user} (every host sharing the database)"),
                None => println!("unblocked {user}"),
            }
            Ok(())
        }
        Ok(_) => Err(not_found(format!(
            "{user}: not blocked (see {})",
            settings
                .state_dir
                .join(crate::engine::BLOCKED_FILE)
                .display()
        ))),
        Err(e) => Err(Failure::runtime(e.to_string())),
    }
}
