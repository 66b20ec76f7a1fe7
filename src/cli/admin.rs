//! Administrator commands on the map: lookup, list, grant, revoke. With `[store]
//! postgres_url_file` set, `grant` and `revoke` reach the database too, so that they hold
//! on every host (a revoke leaves a tombstone there: see `store::postgres`).

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use super::{load_settings, ConfigArgs, Failure};
use crate::config::{parse_duration, Settings};
use crate::grant::{key_text, parse_any_ip, Decision, Policy};
use crate::store::postgres::{self, Tables, Target};
use crate::store::shared::Origin;
use crate::store::{AdminStore, Cause, CommitStore, LmdbMap, OpenMode, StoreError};
use crate::timefmt;

/// Exit codes by cause: a map that does not exist is a configuration mistake (2: wrong
/// `map.path`); permission, disk and LMDB errors are runtime failures (1), and their
/// message names the file and the fix.
pub(super) fn store_failure(e: StoreError) -> Failure {
    match e.cause() {
        Cause::Missing => Failure::config(e.0),
        _ => Failure::runtime(e.0),
    }
}

/// The configured map, keyed as `grant.ipv6_prefix` says.
pub(super) fn open(settings: &Settings, mode: OpenMode) -> Result<LmdbMap, Failure> {
    LmdbMap::open_configured(settings, mode).map_err(store_failure)
}

/// A runtime for one command's database or network work.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))
}

/// The longest `--ttl` a manual grant may have: the configuration's bound on `grant.ttl`.
const MAX_TTL: Duration = Duration::from_secs(31 * 24 * 3600);

fn ttl_arg(text: &str) -> Result<Duration, Failure> {
    let ttl = parse_duration("--ttl", text).map_err(|e| Failure::config(e.to_string()))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(Failure::config(format!(
            "--ttl: `{text}` must be between 1s and 31 days (like grant.ttl)"
        )));
    }
    Ok(ttl)
}

fn ip_arg(text: &str) -> Result<IpAddr, Failure> {
    parse_any_ip(text).ok_or_else(|| Failure::config(format!("`{text}` is not an IP address")))
}

pub fn lookup(cfg: &ConfigArgs, ip: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let ip = ip_arg(ip)?;
    match stored_value(&settings, ip).map_err(store_failure)? {
        Some(v) => {
            println!("{v}");
            Ok(())
        }
        None => Err(Failure {
            code: 1,
            message: String::new(),
        }),
    }
}

/// The stored value an address relays by: its own grant, else its prefix's
/// (grant.ipv6_prefix), as Postfix finds it. The map is opened read-only (shared locks).
/// `lookup` and `relay-check` share it.
pub(super) fn stored_value(settings: &Settings, ip: IpAddr) -> Result<Option<String>, StoreError> {
    let mut map = LmdbMap::open_configured(settings, OpenMode::ReadOnly)?;
    if let Some(v) = map.get(ip)? {
        return Ok(Some(v));
    }
    let wide = crate::grant::widen(ip, settings.ipv6_prefix);
    match wide != ip {
        true => map.get(wide),
        false => Ok(None),
    }
}

#[derive(Serialize)]
struct ListEntry {
    ip: String,
    expires: Option<String>,
    remaining_secs: Option<i64>,
    value: String,
}

pub fn list(cfg: &ConfigArgs, json: bool) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let mut map = open(&settings, OpenMode::ReadOnly)?;
    let now = timefmt::now();
    let mut grants = map.list().map_err(store_failure)?;
    grants.sort_by_key(|g| (g.expires, g.ip));
    let entries: Vec<ListEntry> = grants
        .into_iter()
        .map(|g| ListEntry {
            ip: crate::grant::map_key(g.ip, settings.ipv6_prefix),
            expires: g.expires.map(timefmt::rfc3339),
            remaining_secs: g.expires.map(|e| (e - now).max(0)),
            value: g.value,
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
        let expires = e.expires.as_deref().unwrap_or("never");
        let left = e.remaining_secs.map_or(String::from("-"), |s| {
            format!(
                "{}",
                humantime::format_duration(std::time::Duration::from_secs(s as u64))
            )
        });
        println!("{}\t{}\t{}", e.ip, expires, left);
    }
    eprintln!("{} grant(s)", entries.len());
    Ok(())
}

pub fn grant(cfg: &ConfigArgs, ttl: Option<&str>, ip: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let ip = ip_arg(ip)?;
    let ttl = match ttl {
        Some(t) => ttl_arg(t)?,
        None => settings.ttl,
    };
    if ttl > settings.ttl {
        // The running daemon shortens any grant to now + grant.ttl (a longer one is what a
        // wrong clock leaves behind), so a longer manual grant would not last.
        return Err(Failure::config(format!(
            "--ttl: {} is longer than grant.ttl ({}); raise grant.ttl, or for a lasting exception use Postfix's mynetworks or a static access map",
            humantime::format_duration(ttl),
            humantime::format_duration(settings.ttl)
        )));
    }
    let policy: Policy = super::build::policy(&settings, ttl)?;
    // A grant by hand is a login now, through the same rules: exclusions, ttl, and the
    // IPv6 prefix a login from `ip` would be granted under.
    let (ip, expires) = match policy.decide(ip, None, timefmt::now()) {
        Decision::Grant { ip, expires } => (ip, expires),
        Decision::Excluded(why) => {
            return Err(Failure::config(format!("refusing to grant {ip}: {why}")))
        }
        Decision::Expired => {
            return Err(Failure::config(format!(
                "refusing to grant {ip}: a ttl this short expires at once"
            )))
        }
    };
    let mut map = open(&settings, OpenMode::Existing)?;
    map.set(ip, expires).map_err(store_failure)?;
    println!("{}\t{}", key_text(ip), timefmt::rfc3339(expires));
    let max_ttl = i64::try_from(settings.ttl.as_secs()).unwrap_or(i64::MAX / 4);
    in_database(&settings, "granted here only", |c, t, origin| {
        Box::pin(async move {
            postgres::set(c, &t.grants, ip, expires, max_ttl, &origin).await?;
            Ok(true)
        })
    })?;
    in_mysql(&settings, "granted here only", |c, origin| {
        Box::pin(async move {
            crate::store::mysql::set(c, ip, expires, max_ttl, &origin).await?;
            Ok(true)
        })
    })?;
    Ok(())
}

pub fn revoke(cfg: &ConfigArgs, ip: &str) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let ip = ip_arg(ip)?;
    // An address inside a prefix grant (grant.ipv6_prefix) loses it: the grant it relays by.
    let wide = crate::grant::widen(ip, settings.ipv6_prefix);
    let wiki = settings
        .store
        .popbsmtp
        .clone()
        .map(crate::store::mysql::Popbsmtp::new);
    let mut map = open(&settings, OpenMode::Existing)?;
    let mut here = map.revoke(ip).map_err(store_failure)?;
    if wide != ip {
        here |= map.revoke(wide).map_err(store_failure)?;
        let there = in_database(&settings, "revoked here only", |c, t, _| {
            Box::pin(async move { postgres::revoke(c, &t, wide).await })
        })?;
        here |= there == Some(true);
        let there = in_mysql(&settings, "revoked here only", |c, _| {
            let w = wiki.clone();
            Box::pin(async move { crate::store::mysql::revoke(c, wide, w.as_ref()).await })
        })?;
        here |= there == Some(true);
    }
    let there = match in_database(&settings, "revoked here only", |c, t, _| {
        Box::pin(async move { postgres::revoke(c, &t, ip).await })
    })? {
        Some(v) => Some(v),
        None => in_mysql(&settings, "revoked here only", |c, _| {
            let w = wiki.clone();
            Box::pin(async move { crate::store::mysql::revoke(c, ip, w.as_ref()).await })
        })?,
    };
    if here || there == Some(true) {
        let everywhere = if there.is_some() {
            " (here and in the database: every host)"
        } else {
            ""
        };
        println!("revoked {}{everywhere}", key_text(ip));
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("{} has no grant", key_text(ip)),
        })
    }
}

/// `dovegate revoke --all`: empties the map in one transaction; the file stays.
pub fn revoke_all(cfg: &ConfigArgs) -> Result<(), Failure> {
    let (_, settings) = load_settings(cfg, |_| {})?;
    let mut map = open(&settings, OpenMode::Existing)?;
    let removed = map.clear().map_err(store_failure)?;
    println!(
        "revoked every entry ({removed}) of {}",
        map.path().display()
    );
    Ok(())
}

pub(super) type DbFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, tokio_postgres::Error>> + 'a>>;

/// Runs `op` on the database when `[store] postgres_url_file` is set (None when it is not).
/// A failure says what was done here only (`done_here`) and exits 1.
pub(super) fn in_database(
    settings: &Settings,
    done_here: &str,
    op: impl for<'a> FnOnce(&'a tokio_postgres::Client, Tables, Origin) -> DbFuture<'a>,
) -> Result<Option<bool>, Failure> {
    let Some(url_file) = &settings.store.url_file else {
        return Ok(None);
    };
    let target = Target::load(url_file, &settings.store.schema)
        .map_err(|e| Failure::config(e.to_string()))?;
    let fail = |e: String| {
        Failure {
        code: 1,
        message: format!(
            "{done_here}: the database {}: {e}; the other hosts are not changed: run the command again when the database is reachable",
            target.describe()
        ),
    }
    };
    let runtime = runtime()?;
    runtime.block_on(async {
        let client = target
            .connect(None)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let origin = Origin::this_host(postgres::ADMIN_SOURCE);
        tokio::time::timeout(ADMIN_TIMEOUT, op(&client, target.tables(), origin))
            .await
            .map_err(|_| fail(format!("no answer within {}s", ADMIN_TIMEOUT.as_secs())))?
            .map(Some)
            .map_err(|e| fail(postgres::error_text(&e)))
    })
}

pub(super) type MyFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, mysql_async::Error>> + 'a>>;

/// As `in_database`, on MariaDB when `[store] mysql_url_file` is set.
pub(super) fn in_mysql(
    settings: &Settings,
    done_here: &str,
    op: impl for<'a> FnOnce(&'a mut mysql_async::Conn, Origin) -> MyFuture<'a>,
) -> Result<Option<bool>, Failure> {
    use crate::store::mysql;
    let Some(url_file) = &settings.store.mysql_url_file else {
        return Ok(None);
    };
    let target = mysql::Target::load(url_file).map_err(|e| Failure::config(e.to_string()))?;
    let fail = |e: String| {
        Failure {
        code: 1,
        message: format!(
            "{done_here}: the database {}: {e}; the other hosts are not changed: run the command again when the database is reachable",
            target.describe()
        ),
    }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start runtime: {e}")))?;
    runtime.block_on(async {
        let mut conn = target.connect().await.map_err(|e| fail(e.to_string()))?;
        let origin = Origin::this_host("dovegate-admin");
        let r = tokio::time::timeout(ADMIN_TIMEOUT, op(&mut conn, origin))
            .await
            .map_err(|_| fail(format!("no answer within {}s", ADMIN_TIMEOUT.as_secs())))?
            .map(Some)
            .map_err(|e| fail(e.to_string()));
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
        r
    })
}

/// The longest `grant`/`revoke` waits for the database statement.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
