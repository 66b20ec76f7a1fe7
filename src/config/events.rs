//! `[events]`: Dovecot's event exporter's listener as written and validated (the server
//! is `events`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::listen::Listen;
use super::users::UserSpec;
use super::ConfigError;

/// The `[events]` section as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    pub listen: String,
    pub secret_file: String,
    pub users: Vec<UserSpec>,
}

/// Validated `[events]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EventsSettings {
    /// `Inet`: 2.3's (and 2.4's) `http-post` on loopback, `POST /SECRET`; `Unix`: 2.4's
    /// `driver = unix`, one JSON event per line, the peer's uid checked.
    pub listen: Option<Listen>,
    /// The path segment an HTTP post must carry (HTTP only).
    pub secret: Option<Vec<u8>>,
    /// Peers allowed on the unix socket (unix only).
    pub uids: Vec<u32>,
}

impl std::fmt::Debug for EventsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsSettings")
            .field("listen", &self.listen)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("uids", &self.uids)
            .finish()
    }
}

/// The shortest secret accepted: it is the only thing between a local user and a grant.
const MIN_SECRET: usize = 16;

impl EventsSettings {
    pub fn enabled(&self) -> bool {
        self.listen.is_some()
    }

    pub fn from_section(s: &EventsSection) -> Result<EventsSettings, ConfigError> {
        let err = |key: &str, m: String| ConfigError(format!("events.{key}: {m}"));
        let listen = match s.listen.trim() {
            "" => return Ok(EventsSettings::default()),
            // The other listeners' form, too.
            t if t.starts_with("unix:") || t.starts_with("inet:") => {
                Listen::parse(t).map_err(|e| err("listen", e.to_string()))?
            }
            p if p.starts_with('/') => Listen::Unix(PathBuf::from(p)),
            a => a.parse().map(Listen::Inet).map_err(|_| {
                err(
                    "listen",
                    format!("`{a}` is neither a unix socket path (absolute) nor 127.0.0.1:PORT"),
                )
            })?,
        };
        if let Listen::Inet(addr) = &listen {
            // The secret travels in clear text: never off this host.
            if !addr.ip().is_loopback() {
                return Err(err("listen", format!("`{addr}` is not a loopback address; Dovecot's http-post sends the secret in clear text: listen on 127.0.0.1:PORT")));
            }
        }
        let mut settings = EventsSettings {
            listen: Some(listen.clone()),
            ..Default::default()
        };
        match listen {
            Listen::Unix(_) => {
                if s.users.is_empty() {
                    return Err(err("users", "needs at least one user (Dovecot's internal user, usually dovecot: its stats process exports the events)".into()));
                }
                settings.uids = super::users::uids_of(&s.users)
                    .map_err(|e| ConfigError(format!("events.users{e}")))?;
            }
            Listen::Inet(_) => {
                let path = s.secret_file.trim();
                if path.is_empty() {
                    return Err(err("secret_file", "an HTTP listener needs a secret (any local user can reach it): a file holding the path segment Dovecot posts to, e.g. http://127.0.0.1:PORT/SECRET".into()));
                }
                let text = crate::fsread::read_text(
                    std::path::Path::new(path),
                    crate::fsread::SECRET_MAX,
                    crate::fsread::Links::Follow,
                )
                .map_err(|e| err("secret_file", e.to_string()))?;
                let secret = text.trim();
                if secret.len() < MIN_SECRET
                    || !secret
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
                {
                    return Err(err("secret_file", format!("{path}: the secret must be at least {MIN_SECRET} characters of A-Z a-z 0-9 - . _ ~ (it is a URL path segment), e.g. from `openssl rand -hex 24`")));
                }
                settings.secret = Some(secret.as_bytes().to_vec());
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(listen: &str) -> EventsSection {
        EventsSection {
            listen: listen.into(),
            secret_file: String::new(),
            users: vec![UserSpec::Name("root".into())],
        }
    }

    #[test]
    fn settings_name_their_key() {
        assert!(!EventsSettings::from_section(&section(""))
            .unwrap()
            .enabled());
        let s = EventsSettings::from_section(&section("/run/dovegate/events")).unwrap();
        assert_eq!(s.uids, vec![0]);
        let mut c = section("/run/dovegate/events");
        c.users = vec![];
        assert!(EventsSettings::from_section(&c)
            .unwrap_err()
            .0
            .starts_with("events.users"));
        c.users = vec![UserSpec::Name("no-such-user-here".into())];
        assert!(EventsSettings::from_section(&c)
            .unwrap_err()
            .0
            .starts_with("events.users[0]"));
        let e = EventsSettings::from_section(&section("127.0.0.1:8431"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("events.secret_file"), "{e}");
        let e = EventsSettings::from_section(&section("0.0.0.0:8431"))
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("events.listen") && e.contains("loopback"),
            "{e}"
        );
        let e = EventsSettings::from_section(&section("events.sock"))
            .unwrap_err()
            .0;
        assert!(e.starts_with("events.listen"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("secret");
        let mut c = section("127.0.0.1:8431");
        c.secret_file = file.display().to_string();
        let e = EventsSettings::from_section(&c).unwrap_err().0;
        assert!(
            e.starts_with("events.secret_file") && e.contains("cannot open"),
            "{e}"
        );
        for bad in ["short", "has/a/slash-0123456789", "has space 0123456789"] {
            std::fs::write(&file, bad).unwrap();
            let e = EventsSettings::from_section(&c).unwrap_err().0;
            assert!(e.contains("at least 16"), "{e}");
        }
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let s = EventsSettings::from_section(&c).unwrap();
        assert_eq!(s.secret.as_deref(), Some(&b"0123456789abcdef0123"[..]));
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }
}
