//! Receipts: for each message relayed under a grant, which login allowed it. One INFO log
//! line, and a line in a bounded file in the state directory that `dovegate trace` reads;
//! and the logins behind the live grants in a second file that `dovegate why` reads.
//!
//! The files are JSON written by the daemon alone; their readers treat any line they
//! cannot read as absent.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::engine::{Behind, LoginsView};
use crate::telemetry::ratelimit::SharedLimit;
use crate::timefmt;

/// The receipts file in the state directory; `.1` holds the previous one.
pub const RECEIPTS_FILE: &str = "policy-receipts";
/// The logins behind the live grants.
pub const GRANTS_FILE: &str = "policy-grants.json";
/// The receipts file is rotated past this size (one previous file kept: about 40,000
/// receipts in all).
pub const MAX_RECEIPTS_BYTES: u64 = 4 * 1024 * 1024;

/// One relayed message and the login behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub queue_id: String,
    pub client: String,
    pub user: String,
    pub protocol: String,
    pub session: String,
    pub granted_at: String,
    pub at: String,
}

impl Receipt {
    /// The receipt of a message from `client` whose grant has the logins `behind`.
    pub fn new(queue_id: &str, client: IpAddr, behind: Option<&Behind>, now: i64) -> Receipt {
        let latest = behind.and_then(|b| b.latest());
        Receipt {
            queue_id: printable(queue_id),
            client: client.to_string(),
            user: printable(latest.and_then(|l| l.user.as_deref()).unwrap_or("-")),
            protocol: printable(latest.map_or("-", |l| l.protocol.as_str())),
            session: printable(latest.and_then(|l| l.session.as_deref()).unwrap_or("-")),
            granted_at: behind.map_or_else(|| "-".into(), |b| timefmt::rfc3339(b.began)),
            at: timefmt::rfc3339(now),
        }
    }

    /// The header text for `PREPEND` (the name included).
    pub fn header(&self) -> String {
        format!(
            "X-Dovegate-Relay: client={} user={} protocol={} session={} granted_at={}",
            self.client, self.user, self.protocol, self.session, self.granted_at
        )
    }
}

/// Text from logs or clients, safe for a log line or a header: printable ASCII without
/// spaces, cut to 256 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// The receipts file, appended by the daemon.
#[derive(Debug)]
pub struct ReceiptLog {
    path: Option<PathBuf>,
    /// Serialises appends and rotation.
    lock: Mutex<()>,
    /// The WARN about receipts not written (each relayed message would say it again).
    failed: SharedLimit,
}

impl ReceiptLog {
    /// Receipts in `state_dir`, or only in the log (None).
    pub fn new(state_dir: Option<&Path>) -> ReceiptLog {
        ReceiptLog {
            path: state_dir.map(|d| d.join(RECEIPTS_FILE)),
            lock: Mutex::new(()),
            failed: SharedLimit::default(),
        }
    }

    /// Logs the receipt and appends it to the file (a failure is logged: the message is
    /// relayed either way, its receipt is in the log).
    pub fn record(&self, r: &Receipt) {
        tracing::info!(
            queue_id = %r.queue_id,
            client = %r.client,
            user = %r.user,
            protocol = %r.protocol,
            session = %r.session,
            granted_at = %r.granted_at,
            "relayed"
        );
        let Some(path) = &self.path else { return };
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = append(path, r) {
            self.failed.warn(&format!(
                "cannot write receipts to {}: {e} (they are in the log)",
                path.display()
            ));
        }
    }
}

fn append(path: &Path, r: &Receipt) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_RECEIPTS_BYTES) {
        std::fs::rename(path, path.with_extension("1"))?;
    }
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)
}

/// The receipts of `queue_id` in `state_dir`'s receipts files, oldest first.
pub fn find_receipts(state_dir: &Path, queue_id: &str) -> std::io::Result<Vec<Receipt>> {
    let current = state_dir.join(RECEIPTS_FILE);
    let mut found = Vec::new();
    for path in [current.with_extension("1"), current] {
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ))
            }
        };
        for line in std::io::BufReader::new(f).split(b'\n') {
            let line = line?;
            if let Ok(r) = serde_json::from_slice::<Receipt>(&line) {
                if r.queue_id == queue_id {
                    found.push(r);
                }
            }
        }
    }
    Ok(found)
}

/// One login behind a grant, as `dovegate why` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginEntry {
    pub user: String,
    pub protocol: String,
    pub session: String,
    pub at: String,
    /// `at` in unix seconds (read back at start).
    #[serde(default)]
    pub at_unix: i64,
}

/// The logins behind one grant, as written to the grants file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantEntry {
    pub address: IpAddr,
    pub granted_at: String,
    /// `granted_at` in unix seconds (read back at start).
    #[serde(default)]
    pub granted_at_unix: i64,
    pub logins: Vec<LoginEntry>,
}

fn entries(all: Vec<(IpAddr, Behind)>) -> Vec<GrantEntry> {
    all.into_iter()
        .map(|(address, b)| GrantEntry {
            address,
            granted_at: timefmt::rfc3339(b.began),
            granted_at_unix: b.began,
            logins: b
                .logins
                .iter()
                .map(|l| LoginEntry {
                    user: printable(l.user.as_deref().unwrap_or("-")),
                    protocol: printable(&l.protocol),
                    session: printable(l.session.as_deref().unwrap_or("-")),
                    at: timefmt::rfc3339(l.at),
                    at_unix: l.at,
                })
                .collect(),
        })
        .collect()
}

/// Rewrites the grants file (atomically) when the logins changed since `written`; returns
/// the version written.
pub fn write_grants(state_dir: &Path, logins: &LoginsView, written: u64) -> std::io::Result<u64> {
    if logins.version() == written {
        return Ok(written);
    }
    let (version, all) = logins.snapshot();
    let text = serde_json::to_vec(&entries(all)).map_err(std::io::Error::other)?;
    let path = state_dir.join(GRANTS_FILE);
    let tmp = state_dir.join(format!("{GRANTS_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(version)
}

/// The logins behind the grants as the daemon last wrote them (none when the file is
/// missing or unreadable: they are detail for receipts, caps and `why`).
pub fn read_grants(state_dir: &Path) -> Vec<(IpAddr, Behind)> {
    let Ok(text) = std::fs::read(state_dir.join(GRANTS_FILE)) else {
        return Vec::new();
    };
    let all: Vec<GrantEntry> = serde_json::from_slice(&text).unwrap_or_default();
    let opt = |s: &str| (s != "-").then(|| s.to_string());
    all.into_iter()
        .map(|g| {
            let logins = g
                .logins
                .into_iter()
                .map(|l| crate::engine::LoginRecord {
                    user: opt(&l.user),
                    protocol: l.protocol,
                    session: opt(&l.session),
                    at: l.at_unix,
                })
                .collect();
            (
                g.address,
                Behind {
                    began: g.granted_at_unix,
                    logins,
                },
            )
        })
        .collect()
}

/// The logins behind `ip`'s grant, from the grants file.
pub fn find_grant(state_dir: &Path, ip: IpAddr) -> std::io::Result<Option<GrantEntry>> {
    let path = state_dir.join(GRANTS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        }
    };
    let all: Vec<GrantEntry> = serde_json::from_slice(&text).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    let ip = ip.to_canonical();
    Ok(all.into_iter().find(|g| g.address == ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_found_across_rotation_and_hostile_text_is_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let log = ReceiptLog::new(Some(dir.path()));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut r = Receipt::new("ABC123", ip, None, 0);
        r.user = printable("evil\nuser name");
        assert_eq!(r.user, "evil?user?name");
        log.record(&r);
        std::fs::rename(
            dir.path().join(RECEIPTS_FILE),
            dir.path().join(RECEIPTS_FILE).with_extension("1"),
        )
        .unwrap();
        log.record(&Receipt::new("DEF456", ip, None, 0));
        assert_eq!(find_receipts(dir.path(), "ABC123").unwrap(), vec![r]);
        assert_eq!(find_receipts(dir.path(), "DEF456").unwrap().len(), 1);
        assert!(find_receipts(dir.path(), "NOPE").unwrap().is_empty());
    }

    #[test]
    fn the_grants_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let logins = LoginsView::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let b = Behind {
            began: 100,
            logins: [crate::engine::LoginRecord {
                user: Some("alice".into()),
                protocol: "imap".into(),
                session: None,
                at: 100,
            }]
            .into(),
        };
        logins.restore(vec![(ip, b.clone())]);
        write_grants(dir.path(), &logins, u64::MAX).unwrap();
        assert_eq!(read_grants(dir.path()), vec![(ip, b)]);
        assert_eq!(
            find_grant(dir.path(), ip).unwrap().unwrap().logins[0].user,
            "alice"
        );
    }
}
