//! `dovegate run --dry-run`: grants kept in memory and printed instead of written, so that
//! dovegate can follow the logs beside the old daemon (pop-before-smtp's `--nowrite`)
//! without touching the map Postfix reads.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::{CommitStore, ExpireOutcome, StoreError};
use crate::model::{Batch, LoginDetail};
use crate::timefmt;

/// Most addresses whose last login detail is remembered (excluded logins are never
/// granted, so their details would otherwise pile up).
const MAX_DETAILS: usize = 65_536;

/// The last login seen per address, filled as batches pass to the engine.
#[derive(Clone, Default)]
pub struct Details(Arc<Mutex<HashMap<IpAddr, LoginDetail>>>);

impl Details {
    /// Remembers who logged in from each address of `batch` (the last login wins).
    pub fn record(&self, batch: &Batch) {
        let Ok(mut map) = self.0.lock() else { return };
        for login in &batch.logins {
            if map.len() >= MAX_DETAILS && !map.contains_key(&login.ip) {
                map.clear();
            }
            let detail = match &login.detail {
                Some(d) => (**d).clone(),
                None => LoginDetail {
                    user: None,
                    protocol: "-".into(),
                    session: None,
                    pattern: "-".into(),
                    source: "push".into(),
                },
            };
            map.insert(login.ip, detail);
        }
    }

    fn take(&self, ip: IpAddr) -> Option<LoginDetail> {
        self.0.lock().ok()?.remove(&ip)
    }
}

/// A `CommitStore` in memory that prints each grant and expiry on its output, one line each.
pub struct DryStore {
    grants: HashMap<IpAddr, i64>,
    details: Details,
    out: Box<dyn Write + Send>,
}

impl DryStore {
    pub fn new(details: Details, out: Box<dyn Write + Send>) -> DryStore {
        DryStore {
            grants: HashMap::new(),
            details,
            out,
        }
    }

    fn say(&mut self, line: &str) {
        // A closed stdout must not stop the dry run's reading; nothing else depends on it.
        let _ = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
    }
}

impl CommitStore for DryStore {
    fn upsert(&mut self, grants: &[(IpAddr, i64)]) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let mut out = Vec::with_capacity(grants.len());
        for &(ip, expires) in grants {
            let e = self.grants.entry(ip).or_insert(expires);
            *e = (*e).max(expires);
            let effective = *e;
            out.push((ip, effective));
            let d = self.details.take(ip);
            let why = match d {
                Some(d) => format!(
                    "user {}, protocol {}, pattern {}, source {}",
                    d.user.as_deref().unwrap_or("-"),
                    d.protocol,
                    d.pattern,
                    d.source
                ),
                None => "renewed".to_string(),
            };
            self.say(&format!(
                "would grant {ip} until {} ({why})",
                timefmt::rfc3339(effective)
            ));
        }
        Ok(out)
    }

    fn expire(&mut self, ips: &[IpAddr], now: i64) -> Result<ExpireOutcome, StoreError> {
        let mut outcome = ExpireOutcome::default();
        for &ip in ips {
            if self.grants.get(&ip).is_some_and(|&e| e <= now) {
                self.grants.remove(&ip);
                self.say(&format!("would expire {ip}"));
                outcome.removed.push(ip);
            }
        }
        Ok(outcome)
    }

    fn expire_all(&mut self, now: i64) -> Result<usize, StoreError> {
        let gone: Vec<IpAddr> = self
            .grants
            .iter()
            .filter(|(_, &e)| e <= now)
            .map(|(&ip, _)| ip)
            .collect();
        Ok(self.expire(&gone, now)?.removed.len())
    }

    fn revoke(&mut self, ip: IpAddr) -> Result<bool, StoreError> {
        Ok(self.grants.remove(&ip).is_some())
    }

    fn snapshot(&mut self) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        Ok(self.grants.iter().map(|(&ip, &e)| (ip, e)).collect())
    }

    fn changed(&mut self) -> Result<Option<bool>, StoreError> {
        // Nobody else writes this store.
        Ok(Some(false))
    }

    fn cap(&mut self, ips: &[IpAddr], limit: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        Ok(cap_in_memory(&mut self.grants, ips, limit))
    }
}

/// `CommitStore::cap` over grants held in memory (this store, the engine's test store).
pub fn cap_in_memory(
    grants: &mut HashMap<IpAddr, i64>,
    ips: &[IpAddr],
    limit: i64,
) -> Vec<(IpAddr, i64)> {
    ips.iter()
        .filter_map(|ip| {
            let e = grants.get_mut(ip)?;
            *e = (*e).min(limit);
            Some((*ip, *e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn prints_grants_and_expiries() {
        let buf = Buf::default();
        let details = Details::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        details.record(&Batch {
            source: 0,
            logins: vec![crate::model::SeenLogin {
                ip,
                time: Some(100),
                session: None,
                detail: Some(Box::new(LoginDetail {
                    user: Some("alice".into()),
                    protocol: "imap".into(),
                    session: None,
                    pattern: "dovecot-2.2".into(),
                    source: "/var/log/mail.log".into(),
                })),
            }],
            ends: vec![],
            position: None,
        });
        let mut s = DryStore::new(details, Box::new(buf.clone()));
        assert_eq!(s.upsert(&[(ip, 1000)]).unwrap(), vec![(ip, 1000)]);
        assert!(s.expire(&[ip], 999).unwrap().removed.is_empty());
        assert_eq!(s.expire(&[ip], 1000).unwrap().removed, vec![ip]);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "would grant 192.0.2.7 until 1970-01-01T00:16:40Z (user alice, protocol imap, pattern dovecot-2.2, source /var/log/mail.log)\nwould expire 192.0.2.7\n"
        );
    }
}
