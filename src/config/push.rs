//! `[push]`: the post-login hook's socket and the auth-policy endpoint, as written and
//! validated (the servers are `push`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::listen::Listen;
use super::users::UserSpec;
use super::ConfigError;

/// The `[push]` section as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushSection {
    pub socket: String,
    pub users: Vec<UserSpec>,
    pub auth_policy: String,
    pub auth_policy_secret_file: String,
    pub auth_policy_protocols: Vec<String>,
}

/// The `auth_policy_server_api_header` Dovecot sends: `Name: value`, or a bare value sent
/// as `X-API-Key`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiHeader {
    pub name: hyper::header::HeaderName,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for ApiHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiHeader({}: <secret>)", self.name)
    }
}

impl ApiHeader {
    /// Parses the header exactly as Dovecot splits `auth_policy_server_api_header`.
    pub fn parse(text: &str) -> Result<ApiHeader, String> {
        let text = text.trim();
        let (name, value) = match text.split_once(':') {
            Some((n, v)) => (n.trim(), v.trim()),
            None => ("X-API-Key", text),
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not an HTTP header name"))?;
        Ok(ApiHeader {
            name,
            value: value.as_bytes().to_vec(),
        })
    }
}

/// Validated push settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushSettings {
    pub socket: Option<PathBuf>,
    /// Uids allowed to write to the socket.
    pub uids: Vec<u32>,
    pub auth_policy: Option<Listen>,
    pub secret: Option<ApiHeader>,
    pub protocols: Vec<String>,
}

impl PushSettings {
    pub fn enabled(&self) -> bool {
        self.socket.is_some() || self.auth_policy.is_some()
    }

    pub fn from_section(s: &PushSection) -> Result<PushSettings, ConfigError> {
        let err = |key: &str, m: String| ConfigError(format!("push.{key}: {m}"));
        let socket = match s.socket.trim() {
            "" => None,
            p if p.starts_with('/') => Some(PathBuf::from(p)),
            p => return Err(err("socket", format!("`{p}` must be an absolute path"))),
        };
        let mut uids = Vec::new();
        if socket.is_some() {
            if s.users.is_empty() {
                return Err(err(
                    "users",
                    "needs at least one user (Dovecot's internal user, usually dovecot)".into(),
                ));
            }
            uids = uids_of("push.users", &s.users)?;
        }
        let auth_policy = match s.auth_policy.trim() {
            "" => None,
            t => Some(Listen::parse(t).map_err(|m| err("auth_policy", m.to_string()))?),
        };
        let secret = match (s.auth_policy_secret_file.trim(), &auth_policy) {
            ("", _) | (_, None) => None,
            (path, Some(_)) => {
                let text = crate::fsread::read_text(
                    Path::new(path),
                    crate::fsread::SECRET_MAX,
                    crate::fsread::Links::Follow,
                )
                .map_err(|e| err("auth_policy_secret_file", e.to_string()))?;
                Some(ApiHeader::parse(&text).map_err(|m| {
                    err(
                        "auth_policy_secret_file",
                        format!("{path}: {m} (write the auth_policy_server_api_header value, e.g. `X-API-Key: SECRET`)"),
                    )
                })?)
            }
        };
        // Every local user can reach a TCP port, loopback too: without the secret anyone
        // could report a login and open the relay.
        if matches!(auth_policy, Some(Listen::Inet(_))) && secret.is_none() {
            return Err(err(
                "auth_policy_secret_file",
                "an inet: policy endpoint needs a secret (any local user can reach it); set auth_policy_server_api_header in Dovecot and its value in this file".into(),
            ));
        }
        for (i, p) in s.auth_policy_protocols.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(err(
                    &format!("auth_policy_protocols[{i}]"),
                    format!("`{p}` is not a Dovecot service name such as imap or pop3"),
                ));
            }
        }
        Ok(PushSettings {
            socket,
            uids,
            auth_policy,
            secret,
            protocols: s.auth_policy_protocols.clone(),
        })
    }
}

/// The uids of configured users (`key`: the setting, for errors), names resolved now.
pub(crate) fn uids_of(key: &str, users: &[UserSpec]) -> Result<Vec<u32>, ConfigError> {
    super::users::uids_of(users).map_err(|e| ConfigError(format!("{key}{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> PushSection {
        PushSection {
            socket: String::new(),
            users: vec![UserSpec::Name("root".into())],
            auth_policy: String::new(),
            auth_policy_secret_file: String::new(),
            auth_policy_protocols: vec!["imap".into(), "pop3".into()],
        }
    }

    #[test]
    fn api_header_as_dovecot_splits_it() {
        let h = ApiHeader::parse("X-API-Key: s3cret\n").unwrap();
        assert_eq!(h.name.as_str(), "x-api-key");
        assert_eq!(h.value, b"s3cret");
        let h = ApiHeader::parse("bare").unwrap();
        assert_eq!(h.name.as_str(), "x-api-key");
        assert_eq!(h.value, b"bare");
        assert!(ApiHeader::parse("X-Key:").is_err());
        assert!(ApiHeader::parse("Bad Name: x").is_err());
    }

    #[test]
    fn settings_name_their_key() {
        let s = PushSettings::from_section(&section()).unwrap();
        assert!(!s.enabled());
        let mut c = section();
        c.socket = "/run/dovegate/push".into();
        c.users = vec![
            UserSpec::Name("root".into()),
            UserSpec::Uid(65534),
            UserSpec::Name("101".into()),
        ];
        let s = PushSettings::from_section(&c).unwrap();
        assert_eq!(s.uids, vec![0, 65534, 101]);
        c.users = vec![UserSpec::Name("no-such-user-here".into())];
        let e = PushSettings::from_section(&c).unwrap_err().0;
        assert!(e.starts_with("push.users[0]: "), "{e}");
        c.users = vec![];
        assert!(PushSettings::from_section(&c).is_err());
        let mut c = section();
        c.auth_policy = "inet:127.0.0.1:8430".into();
        let e = PushSettings::from_section(&c).unwrap_err().0;
        assert!(e.starts_with("push.auth_policy_secret_file"), "{e}");
        c.auth_policy = "unix:/run/dovegate/auth-policy".into();
        assert!(PushSettings::from_section(&c).unwrap().secret.is_none());
        c.auth_policy = "tcp:1".into();
        assert!(PushSettings::from_section(&c)
            .unwrap_err()
            .0
            .starts_with("push.auth_policy:"));
        c.auth_policy = "inet:127.0.0.1:8430".into();
        c.auth_policy_secret_file = "/nonexistent/secret".into();
        assert!(PushSettings::from_section(&c)
            .unwrap_err()
            .0
            .contains("/nonexistent/secret"));
    }
}
