//! The canonical text of a client address: what the map keys, the databases and every
//! log line use, and how outside text (a pushed login, an event, a policy request, an
//! administrator's argument) becomes an address. Neutral: every stage imports it.

use std::net::IpAddr;

/// The map key for an address: canonical (`::ffff:a.b.c.d` becomes `a.b.c.d`), IPv6
/// compressed and lower case, exactly as Postfix's smtpd prints the client address.
pub fn key_text(ip: IpAddr) -> String {
    ip.to_canonical().to_string().to_ascii_lowercase()
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
