//! `[drac]`: DRAC clients (`dracauth()` in a POP/IMAP server's DRAC patch or plugin) add
//! their users' addresses over ONC RPC, as they did to `rpc.dracd`. The settings live here
//! (config owns them); `crate::drac` serves them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The `[drac]` section as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DracSection {
    pub allow: Vec<String>,
    pub listen: String,
    pub port: i64,
}

/// Validated `[drac]`; off while `allow` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DracSettings {
    /// The client networks that may add (rpc.dracd's `dracd.allow`).
    pub allow: Vec<Ipv4Net>,
    /// The address the UDP and TCP sockets listen on.
    pub listen: Ipv4Addr,
    /// 0: a free port, published through rpcbind (clients ask rpcbind, never a port).
    pub port: u16,
}

impl Default for DracSettings {
    fn default() -> DracSettings {
        DracSettings {
            allow: Vec::new(),
            listen: Ipv4Addr::UNSPECIFIED,
            port: 0,
        }
    }
}

impl DracSettings {
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Whether a request from `peer` may add (IPv4 only: DRAC is IPv4).
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        match peer.to_canonical() {
            std::net::IpAddr::V4(v4) => self.allow.iter().any(|n| n.contains(&v4)),
            std::net::IpAddr::V6(_) => false,
        }
    }

    pub fn from_section(s: &DracSection) -> Result<DracSettings, ConfigError> {
        let err = |key: &str, m: String| ConfigError::key(format!("drac.{key}"), m);
        let mut allow = Vec::new();
        for (i, text) in s.allow.iter().enumerate() {
            let key = format!("allow[{i}]");
            match super::parse_net(text).map_err(|m| err(&key, m))? {
                ipnet::IpNet::V4(n) => allow.push(n),
                ipnet::IpNet::V6(_) => {
                    return Err(err(
                        &key,
                        format!("`{text}` is an IPv6 network; DRAC clients speak IPv4 only"),
                    ))
                }
            }
        }
        let listen = s.listen.trim().parse::<Ipv4Addr>().map_err(|_| {
            err(
                "listen",
                format!(
                    "`{}` is not an IPv4 address such as 0.0.0.0 (DRAC is IPv4 only)",
                    s.listen
                ),
            )
        })?;
        let port = u16::try_from(s.port)
            .map_err(|_| err("port", format!("{} is not a port (0-65535)", s.port)))?;
        Ok(DracSettings {
            allow,
            listen,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> DracSection {
        DracSection {
            allow: vec![],
            listen: "0.0.0.0".into(),
            port: 0,
        }
    }

    #[test]
    fn settings_name_their_key() {
        assert!(!DracSettings::from_section(&section()).unwrap().enabled());
        let mut c = section();
        c.allow = vec!["192.0.2.0/24".into(), "198.51.100.7".into()];
        let s = DracSettings::from_section(&c).unwrap();
        assert!(s.enabled());
        assert!(s.allows("192.0.2.200".parse().unwrap()));
        assert!(s.allows("::ffff:198.51.100.7".parse().unwrap()));
        assert!(!s.allows("198.51.100.8".parse().unwrap()));
        assert!(!s.allows("2001:db8::1".parse().unwrap()));
        c.allow = vec!["2001:db8::/32".into()];
        let e = DracSettings::from_section(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("drac.allow[0]: ") && e.contains("IPv4"),
            "{e}"
        );
        c.allow = vec!["not-a-net".into()];
        assert!(DracSettings::from_section(&c)
            .unwrap_err()
            .to_string()
            .starts_with("drac.allow[0]: "));
        let mut c = section();
        c.listen = "::".into();
        assert!(DracSettings::from_section(&c)
            .unwrap_err()
            .to_string()
            .starts_with("drac.listen: "));
        let mut c = section();
        c.port = 70000;
        assert!(DracSettings::from_section(&c)
            .unwrap_err()
            .to_string()
            .starts_with("drac.port: "));
    }
}
