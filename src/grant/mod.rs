//! The grant core: which client addresses may relay, under which key, until when.
//!
//! The only stage that decides. `Policy` sees a parsed login (address and time) and answers
//! with a grant (canonical address + expiry) or the reason there is none; it also bounds
//! every expiry read back from elsewhere (`Policy::admit`). `Ledger` is the one record of
//! committed grants with their deadlines, and `GrantsView` its read side for lookup
//! servers. No I/O.

pub mod ledger;
pub mod view;

pub use ledger::Ledger;
pub use view::{GrantsView, Lookup};

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

pub use crate::model::address::{
    canonical_net, check_ipv6_prefix, key_text, parse_any_ip, IPV6_PREFIXES,
};

use ipnet::IpNet;
use serde::Serialize;

/// Why an address is never granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exclusion {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    /// 0.0.0.0/8 ("this network", RFC 1122): a source address only while a host boots; never
    /// a remote client.
    ThisNetwork,
    /// 240.0.0.0/4 (reserved, RFC 1112): no host is numbered there.
    Reserved,
    /// Deprecated IPv4-compatible IPv6 (`::a.b.c.d`): no real client has one, and glibc and
    /// Rust print it differently, so no key could be relied upon.
    Ipv4Compatible,
    /// A configured `grant.exclude` network (or Postfix's mynetworks).
    Network(String),
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Loopback => f.write_str("loopback"),
            Exclusion::Unspecified => f.write_str("unspecified"),
            Exclusion::LinkLocal => f.write_str("link-local"),
            Exclusion::Multicast => f.write_str("multicast"),
            Exclusion::Broadcast => f.write_str("broadcast"),
            Exclusion::ThisNetwork => f.write_str("this-network 0.0.0.0/8"),
            Exclusion::Reserved => f.write_str("reserved 240.0.0.0/4"),
            Exclusion::Ipv4Compatible => f.write_str("ipv4-compatible"),
            Exclusion::Network(n) => write!(f, "excluded network {n}"),
        }
    }
}

/// The policy's answer for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Grant {
        ip: IpAddr,
        expires: i64,
    },
    Excluded(Exclusion),
    /// The login is older than the ttl: replaying it grants nothing.
    Expired,
}

/// Exclusions and ttl, built once from the settings.
#[derive(Debug, Clone)]
pub struct Policy {
    exclude: Vec<IpNet>,
    ttl_secs: i64,
    ipv6_prefix: u8,
}

impl Policy {
    /// IPv4-mapped networks in `exclude` (`::ffff:192.0.2.0/120`) are turned into the IPv4
    /// networks they mean: addresses are canonical by the time they are checked, so a
    /// mapped network would never contain one.
    pub fn new(exclude: Vec<IpNet>, ttl: Duration) -> Policy {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let exclude = exclude.into_iter().map(canonical_net).collect();
        Policy {
            exclude,
            ttl_secs,
            ipv6_prefix: 128,
        }
    }

    /// IPv6 logins grant their /`bits` prefix (`grant.ipv6_prefix`; 128: the address).
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Policy {
        self.ipv6_prefix = bits;
        self
    }

    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    /// Why `ip` (already canonical) must never be granted, if it must not.
    pub fn exclusion(&self, ip: IpAddr) -> Option<Exclusion> {
        let builtin = match ip {
            IpAddr::V4(v4) => {
                if v4.is_loopback() {
                    Some(Exclusion::Loopback)
                } else if v4.is_unspecified() {
                    Some(Exclusion::Unspecified)
                } else if v4.is_link_local() {
                    Some(Exclusion::LinkLocal)
                } else if v4.is_multicast() {
                    Some(Exclusion::Multicast)
                } else if v4.is_broadcast() {
                    Some(Exclusion::Broadcast)
                } else if v4.octets()[0] == 0 {
                    Some(Exclusion::ThisNetwork)
                } else if v4.octets()[0] >= 240 {
                    Some(Exclusion::Reserved)
                } else {
                    None
                }
            }
            IpAddr::V6(v6) => {
                if v6.is_loopback() {
                    Some(Exclusion::Loopback)
                } else if v6.is_unspecified() {
                    Some(Exclusion::Unspecified)
                } else if v6.is_unicast_link_local() {
                    Some(Exclusion::LinkLocal)
                } else if v6.is_multicast() {
                    Some(Exclusion::Multicast)
                } else if is_ipv4_compatible(&v6) {
                    Some(Exclusion::Ipv4Compatible)
                } else {
                    None
                }
            }
        };
        builtin.or_else(|| {
            self.exclude
                .iter()
                .find(|n| n.contains(&ip))
                .map(|n| Exclusion::Network(n.to_string()))
        })
    }

    /// The expiry a grant read back from elsewhere (a database row, a map another writer
    /// touched) may have here: capped at now + ttl; None when it must not be granted at all
    /// (expired, or an address dovegate never grants).
    pub fn admit(&self, ip: IpAddr, expires: i64, now: i64) -> Option<i64> {
        if self.exclusion(ip).is_some() {
            return None;
        }
        let e = expires.min(now.saturating_add(self.ttl_secs));
        (e > now).then_some(e)
    }

    /// The grant a database row (address in `key_text` form, expiry) makes here, if any. An
    /// address not written the way dovegate writes it grants nothing.
    pub fn admit_row(&self, address: &str, expires: i64, now: i64) -> Option<(IpAddr, i64)> {
        let ip = crate::model::address::parse_key_text(address)?;
        Some((ip, self.admit(ip, expires, now)?))
    }

    /// Decides one login seen at `login_time` (unix seconds; None = unknown, taken as now).
    /// A login time in the future is clamped to `now`.
    pub fn decide(&self, ip: IpAddr, login_time: Option<i64>, now: i64) -> Decision {
        let ip = ip.to_canonical();
        if let Some(why) = self.exclusion(ip) {
            return Decision::Excluded(why);
        }
        let at = login_time.unwrap_or(now).min(now);
        let expires = at.saturating_add(self.ttl_secs);
        if expires <= now {
            return Decision::Expired;
        }
        // Exclusions were checked on the login's own address: an excluded client never
        // opens its prefix.
        Decision::Grant {
            ip: widen(ip, self.ipv6_prefix),
            expires,
        }
    }
}

fn is_ipv4_compatible(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    s[..6].iter().all(|&g| g == 0) && !(s[6] == 0 && s[7] <= 1)
}

/// The access(5) key that Postfix's check_client_access finds for every address in the
/// /`bits` prefix of `v6`, or None when no single key can.
///
/// smtpd looks up the client's inet_ntop text (compressed, lower case), then drops one
/// `:`-separated part at a time from the right: `2001:db8:1:2::7`, `2001:db8:1:2:`,
/// `2001:db8:1:2`, `2001:db8:1`, ... The first k = bits/16 groups appear spelled out as
/// `g0:...:gk-1` (hex, no leading zeros) in EVERY address of the prefix only when no `::`
/// can fall inside them: no two adjacent zero groups among them (inet_ntop compresses runs
/// of two or more) and a last group that is not zero (else a host part starting with zeros
/// extends the run into the prefix). `2001:db8::/64` fails that: its addresses print as
/// `2001:db8::...` or `2001:db8:0:0:...` depending on the host part.
pub fn ipv6_prefix_key(v6: Ipv6Addr, bits: u8) -> Option<String> {
    if bits >= 128 {
        return Some(key_text(IpAddr::V6(v6)));
    }
    if bits % 16 != 0 || bits == 0 {
        return None;
    }
    let groups = &v6.segments()[..usize::from(bits / 16)];
    let adjacent_zeros = groups.windows(2).any(|w| w[0] == 0 && w[1] == 0);
    if adjacent_zeros || groups.last() == Some(&0) {
        return None;
    }
    let parts: Vec<String> = groups.iter().map(|g| format!("{g:x}")).collect();
    Some(parts.join(":"))
}

/// The address a grant for a login from `ip` is kept under: with `bits` < 128, an IPv6
/// address is widened to its /`bits` network when `ipv6_prefix_key` can name that prefix
/// (else it stays itself: a grant never reaches beyond the prefix). IPv4 is unchanged.
pub fn widen(ip: IpAddr, bits: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if bits < 128 && ipv6_prefix_key(v6, bits).is_some() => {
            IpAddr::V6(network(v6, bits))
        }
        other => other,
    }
}

fn network(v6: Ipv6Addr, bits: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(u32::from(128 - bits)).unwrap_or(0);
    Ipv6Addr::from(u128::from(v6) & mask)
}

/// The map key of a grant kept under `ip` (see `widen`) when IPv6 logins grant /`bits`:
/// the prefix key for a widened network, else the address's own key.
pub fn map_key(ip: IpAddr, bits: u8) -> String {
    if let IpAddr::V6(v6) = ip {
        if bits < 128 && network(v6, bits) == v6 {
            if let Some(k) = ipv6_prefix_key(v6, bits) {
                return k;
            }
        }
    }
    key_text(ip)
}

/// The inverse of `map_key` for the same `bits`: None for any text `map_key` does not
/// write (other case, another prefix length, not an address).
pub fn parse_map_key(text: &str, bits: u8) -> Option<IpAddr> {
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if bits < 128 && text.len() <= 39 => {
            let parts: Vec<&str> = text.split(':').collect();
            if parts.len() != usize::from(bits / 16) {
                return None;
            }
            let mut groups = [0u16; 8];
            for (g, p) in groups.iter_mut().zip(&parts) {
                if p.is_empty() || p.len() > 4 {
                    return None;
                }
                *g = u16::from_str_radix(p, 16).ok()?;
            }
            IpAddr::V6(Ipv6Addr::from(groups))
        }
        Err(_) => return None,
    };
    (map_key(ip, bits) == text).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_are_canonical_lower_case() {
        assert_eq!(key_text(ip("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(key_text(ip("2001:DB8:0:0:0:0:0:8")), "2001:db8::8");
        assert_eq!(key_text(ip("2001:db8:0:0:1:0:0:1")), "2001:db8::1:0:0:1");
        assert_eq!(parse_any_ip("[2001:DB8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_any_ip("::FFFF:1.2.3.4"), Some(ip("1.2.3.4")));
    }

    /// Every shortened form Postfix looks up for `addr` (smtpd_check.c's loop).
    fn postfix_lookups(addr: &str) -> Vec<String> {
        let mut a = addr.to_string();
        let mut out = vec![a.clone()];
        while let Some(i) = a.rfind(':') {
            a.truncate(i);
            out.push(a.clone());
        }
        out
    }

    #[test]
    fn ipv6_prefix_keys_are_what_postfix_looks_up() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            ipv6_prefix_key(v6("2001:DB8:1:2::7"), 64).as_deref(),
            Some("2001:db8:1:2")
        );
        assert_eq!(
            ipv6_prefix_key(v6("2001:db8:a:b:c::7"), 80).as_deref(),
            Some("2001:db8:a:b:c")
        );
        assert_eq!(
            ipv6_prefix_key(v6("2001:db8:0:1::7"), 64).as_deref(),
            Some("2001:db8:0:1"),
            "a single zero group is never compressed"
        );
        assert_eq!(
            ipv6_prefix_key(v6("2001:db8:1:2::7"), 128).as_deref(),
            Some("2001:db8:1:2::7")
        );
        assert_eq!(ipv6_prefix_key(v6("2001:db8::7"), 64), None);
        assert_eq!(ipv6_prefix_key(v6("2001:db8:1:0::7"), 64), None);
        assert_eq!(ipv6_prefix_key(v6("2001:db8:1:2::7"), 60), None);
        // The key is a shortened form of every address in the prefix (hosts with zero runs
        // of each length and place, printed as glibc does) and of none outside it.
        let key = ipv6_prefix_key(v6("2001:db8:0:2::7"), 64).unwrap();
        for host in [
            [0, 0, 0, 0],
            [0, 0, 0, 1],
            [1, 0, 0, 0],
            [1, 0, 0, 1],
            [0, 1, 0, 1],
            [1, 2, 3, 4],
            [0, 0, 1, 0],
            [0xffff, 0, 0, 0],
        ] {
            let mut s = v6("2001:db8:0:2::").segments();
            s[4..].copy_from_slice(&host);
            let text = key_text(IpAddr::V6(Ipv6Addr::from(s)));
            assert!(postfix_lookups(&text).contains(&key), "{text}");
        }
        for outside in [
            "2001:db8:0:3::1",
            "2001:db8::2:0:0:1",
            "2001:db8:0:20::1",
            "2001:db8:0:2",
        ] {
            let text = match outside.parse::<Ipv6Addr>() {
                Ok(a) => key_text(IpAddr::V6(a)),
                Err(_) => continue,
            };
            assert!(!postfix_lookups(&text).contains(&key), "{text}");
        }
    }

    #[test]
    fn prefix_grants_are_kept_under_their_network() {
        let p = Policy::new(
            vec!["2001:db8:1:2::66/128".parse().unwrap()],
            Duration::from_secs(60),
        )
        .with_ipv6_prefix(64);
        assert_eq!(
            p.decide(ip("2001:db8:1:2::7"), None, 0),
            Decision::Grant {
                ip: ip("2001:db8:1:2::"),
                expires: 60
            }
        );
        // Not expressible as one key: the address only. IPv4 and mapped: unchanged.
        for a in ["2001:db8::7", "192.0.2.7"] {
            assert_eq!(
                p.decide(ip(a), None, 0),
                Decision::Grant {
                    ip: ip(a),
                    expires: 60
                }
            );
        }
        assert_eq!(
            p.decide(ip("::ffff:192.0.2.7"), None, 0),
            Decision::Grant {
                ip: ip("192.0.2.7"),
                expires: 60
            }
        );
        assert!(matches!(
            p.decide(ip("2001:db8:1:2::66"), None, 0),
            Decision::Excluded(_)
        ));
        for (a, bits, key) in [
            ("2001:db8:1:2::", 64, "2001:db8:1:2"),
            ("2001:db8:1:2::7", 64, "2001:db8:1:2::7"),
            ("2001:db8::", 64, "2001:db8::"),
            ("2001:db8:1:2::", 128, "2001:db8:1:2::"),
            ("192.0.2.7", 64, "192.0.2.7"),
            ("2001:db8:1:2:3:4:5::", 112, "2001:db8:1:2:3:4:5"),
        ] {
            assert_eq!(map_key(ip(a), bits), key, "{a}/{bits}");
            assert_eq!(parse_map_key(key, bits), Some(ip(a)), "{key}/{bits}");
        }
        for (key, bits) in [
            ("2001:db8:1:2", 128),
            ("2001:db8:1:2", 80),
            ("2001:db8:1:02", 64),
            ("2001:DB8:1:2", 64),
            ("2001:db8:0:0", 64),
            ("2001:db8:1:2::", 64),
            ("unknown", 64),
        ] {
            assert_eq!(parse_map_key(key, bits), None, "{key}/{bits}");
        }
    }

    #[test]
    fn ipv6_prefix_setting_is_on_group_boundaries() {
        assert_eq!(check_ipv6_prefix(64), Ok(64));
        assert_eq!(check_ipv6_prefix(128), Ok(128));
        for bad in [0, 16, 32, 56, 65, 129, -1, 300] {
            assert!(check_ipv6_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builtin_exclusions() {
        let p = Policy::new(vec![], Duration::from_secs(60));
        for (a, why) in [
            ("127.0.0.1", Exclusion::Loopback),
            ("::1", Exclusion::Loopback),
            ("::ffff:127.0.0.1", Exclusion::Loopback),
            ("0.0.0.0", Exclusion::Unspecified),
            ("::", Exclusion::Unspecified),
            ("169.254.1.1", Exclusion::LinkLocal),
            ("fe80::1", Exclusion::LinkLocal),
            ("224.0.0.1", Exclusion::Multicast),
            ("ff02::1", Exclusion::Multicast),
            ("255.255.255.255", Exclusion::Broadcast),
            ("0.1.2.3", Exclusion::ThisNetwork),
            ("::ffff:0.0.0.9", Exclusion::ThisNetwork),
            ("240.0.0.1", Exclusion::Reserved),
            ("255.255.255.254", Exclusion::Reserved),
            ("::ffff:250.1.2.3", Exclusion::Reserved),
            ("::1.2.3.4", Exclusion::Ipv4Compatible),
        ] {
            assert_eq!(p.decide(ip(a), None, 1000), Decision::Excluded(why), "{a}");
        }
    }

    #[test]
    fn reserved_edges_stay_grantable() {
        let p = Policy::new(vec![], Duration::from_secs(60));
        for a in ["1.0.0.1", "223.255.255.254"] {
            let d = p.decide(ip(a), None, 1000);
            assert!(matches!(d, Decision::Grant { .. }), "{a}: {d:?}");
        }
        assert_eq!(
            p.exclusion(ip("239.255.255.255")),
            Some(Exclusion::Multicast)
        );
        assert_eq!(
            Exclusion::Reserved.to_string(),
            "reserved 240.0.0.0/4",
            "named for reports"
        );
        assert_eq!(Exclusion::ThisNetwork.to_string(), "this-network 0.0.0.0/8");
    }

    #[test]
    fn mapped_networks_exclude_canonical_addresses() {
        let nets = vec![
            "::ffff:203.0.113.0/120".parse().unwrap(),
            "::ffff:198.51.100.7/128".parse().unwrap(),
            // Shorter than /96: not a pure IPv4 network; kept as is.
            "::/64".parse().unwrap(),
        ];
        let p = Policy::new(nets, Duration::from_secs(60));
        for a in ["203.0.113.9", "::ffff:203.0.113.200", "198.51.100.7"] {
            assert!(
                matches!(
                    p.decide(ip(a), None, 0),
                    Decision::Excluded(Exclusion::Network(_))
                ),
                "{a}"
            );
        }
        assert_eq!(
            p.exclusion(ip("203.0.113.9")),
            Some(Exclusion::Network("203.0.113.0/24".into()))
        );
        assert!(matches!(
            p.decide(ip("198.51.100.8"), None, 0),
            Decision::Grant { .. }
        ));
        assert_eq!(
            canonical_net("::ffff:10.0.0.0/104".parse().unwrap()),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            canonical_net("::ffff:0:0/96".parse().unwrap()),
            "0.0.0.0/0".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn configured_networks_and_expiry() {
        let nets = vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let p = Policy::new(nets, Duration::from_secs(60));
        assert!(matches!(
            p.decide(ip("192.0.2.9"), None, 0),
            Decision::Excluded(Exclusion::Network(_))
        ));
        assert!(matches!(
            p.decide(ip("2001:db8::5"), None, 0),
            Decision::Excluded(Exclusion::Network(_))
        ));
        assert_eq!(
            p.decide(ip("198.51.100.1"), Some(900), 1000),
            Decision::Expired
        );
        assert_eq!(
            p.decide(ip("198.51.100.1"), Some(990), 1000),
            Decision::Grant {
                ip: ip("198.51.100.1"),
                expires: 1050
            }
        );
        // A future timestamp is clamped to now.
        assert_eq!(
            p.decide(ip("::ffff:198.51.100.1"), Some(5000), 1000),
            Decision::Grant {
                ip: ip("198.51.100.1"),
                expires: 1060
            }
        );
    }
}
