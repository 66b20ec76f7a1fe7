//! Where a server listens, parsed once from the configuration's text.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A unix socket path or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Inet(SocketAddr),
}

/// Why a listen address was refused (the text is in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    #[error("`{0}`: the unix socket path must be absolute")]
    RelativePath(String),
    #[error("`{0}`: expected inet:127.0.0.1:PORT or inet:[::1]:PORT")]
    BadAddress(String),
    #[error("`{0}`: expected unix:/path or inet:ADDRESS:PORT")]
    NoScheme(String),
}

impl Listen {
    /// `unix:/run/dovegate/socketmap` or `inet:127.0.0.1:PORT` (`inet:[::1]:PORT`).
    pub fn parse(text: &str) -> Result<Listen, ListenError> {
        if let Some(p) = text.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(ListenError::RelativePath(text.into()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = text.strip_prefix("inet:") {
            return a
                .parse()
                .map(Listen::Inet)
                .map_err(|_| ListenError::BadAddress(text.into()));
        }
        Err(ListenError::NoScheme(text.into()))
    }
}

/// As written in the configuration, for messages.
impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Inet(a) => write!(f, "inet:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            Listen::parse("unix:/run/dovegate/socketmap"),
            Ok(Listen::Unix("/run/dovegate/socketmap".into()))
        );
        assert!(matches!(
            Listen::parse("inet:127.0.0.1:8099"),
            Ok(Listen::Inet(_))
        ));
        assert!(matches!(
            Listen::parse("inet:[::1]:8099"),
            Ok(Listen::Inet(_))
        ));
        assert!(matches!(
            Listen::parse("unix:relative"),
            Err(ListenError::RelativePath(_))
        ));
        assert!(matches!(
            Listen::parse("inet:localhost:1"),
            Err(ListenError::BadAddress(_))
        ));
        assert!(matches!(
            Listen::parse("tcp:1"),
            Err(ListenError::NoScheme(_))
        ));
        let text = "inet:[::1]:8099";
        assert_eq!(Listen::parse(text).unwrap().to_string(), text);
    }
}
