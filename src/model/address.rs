//! The canonical text of a client address: what the map keys, the databases and every
//! log line use, and how outside text (a pushed login, an event, a policy request, an
//! administrator's argument) becomes an address. Neutral: every stage imports it.

use std::net::IpAddr;

use ipnet::IpNet;

/// The map key for an address: canonical (`::ffff:a.b.c.d` becomes `a.b.c.d`), IPv6
/// compressed and lower case, exactly as Postfix's smtpd prints the client address.
pub fn key_text(ip: IpAddr) -> String {
    ip.to_canonical().to_string().to_ascii_lowercase()
}

/// An address exactly as `key_text` writes it (canonical, lower case); anything else a
/// hostile or mistaken row may hold (`1.2.3`, `unknown`, a hostname) is refused.
pub fn parse_key_text(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.parse().ok()?;
    (key_text(ip) == text).then_some(ip)
}

/// Parses any textual address form (`::FFFF:1.2.3.4`, `[2001:db8::1]`) into its canonical
/// address; for administrators' commands.
pub fn parse_any_ip(text: &str) -> Option<IpAddr> {
    let t = text.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(t);
    let t = t
        .strip_prefix("ipv6:")
        .or_else(|| t.strip_prefix("IPv6:"))
        .unwrap_or(t);
    t.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// An IPv4-mapped IPv6 network with a prefix of at least 96 as the IPv4 network it covers
/// (`::ffff:203.0.113.0/120` is `203.0.113.0/24`); any other network unchanged. A mapped
/// network shorter than /96 also covers non-mapped IPv6 addresses and is left alone.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n.trunc());
            }
        }
    }
    net
}

/// The prefix lengths `grant.ipv6_prefix` accepts: Postfix shortens an IPv6 client address
/// only at `:` (smtpd_check.c, check_addr_access: `split_at_right(addr, ':')`), so a key can
/// name a prefix only on a 16-bit group boundary; shorter than /48 would open a whole site
/// or provider to one login.
pub const IPV6_PREFIXES: [u8; 6] = [48, 64, 80, 96, 112, 128];

/// Checks a configured `grant.ipv6_prefix`; the error is one line for the key's message.
pub fn check_ipv6_prefix(bits: i64) -> Result<u8, String> {
    match u8::try_from(bits) {
        Ok(b) if IPV6_PREFIXES.contains(&b) => Ok(b),
        _ => Err(format!(
            "{bits} is not one of 48, 64, 80, 96, 112, 128 (Postfix shortens IPv6 keys only at 16-bit `:` groups; 128 = the address itself)"
        )),
    }
}
