//! Login lines as Dovecot writes them, with a hostile user name (and hostile extra
//! elements): whatever the user name holds (`>`, `, rip=`, quotes, another address), a
//! grant is only ever the line's real client address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};

use super::super::{patterns, scanner, visit_of, Checked};
use arbitrary::Arbitrary;
use dovegate::pattern::PatternSet;

static PATTERNS: OnceLock<Arc<PatternSet>> = OnceLock::new();

/// The framings of fixtures/corpus (one each).
const PREFIXES: &[&str] = &[
    "Nov 21 09:30:01 mail dovecot: ",
    "Nov  1 09:30:01 mail dovecot[1234]: ",
    "2026-11-21T09:30:01.889064+01:00 mail dovecot: ",
    "Nov 21 09:30:01 ",
    "2026-11-21 09:30:01 ",
    "@400000004c91b044077a9e94 ",
    "<38>1 2026-11-21T09:30:01.123456+01:00 mail dovecot 123 - - ",
    "<38>Nov 21 09:30:01 mail dovecot[123]: ",
    "",
];
const SERVICES: &[&str] = &["imap", "pop3", "submission", "managesieve", "lmtp"];
const WORDINGS: &[&str] = &["Login: ", "Logged in: "];

#[derive(Arbitrary, Debug)]
pub struct Forge {
    visit: u8,
    prefix: u8,
    service: u8,
    wording: u8,
    info: bool,
    real: Addr,
    forged: Addr,
    /// The user name, and where in it the forged `rip=` goes (if at all).
    user: Vec<u8>,
    forge_at: Option<u8>,
    forge_style: u8,
    /// Elements written before and after the real `rip=`.
    before: Vec<(Key, Vec<u8>)>,
    after: Vec<(Key, Vec<u8>)>,
}

#[derive(Arbitrary, Debug)]
enum Addr {
    V4([u8; 4]),
    V6([u16; 8]),
    Mapped([u8; 4]),
}

impl Addr {
    fn text(&self) -> String {
        match self {
            Addr::V4(o) => Ipv4Addr::from(*o).to_string(),
            Addr::V6(s) => Ipv6Addr::from(*s).to_string(),
            Addr::Mapped(o) => format!("::ffff:{}", Ipv4Addr::from(*o)),
        }
    }
    fn ip(&self) -> IpAddr {
        self.text().parse::<IpAddr>().unwrap().to_canonical()
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Method,
    Lip,
    Mpid,
    Session,
    Tls,
    Other(u8),
}

fn element(key: &Key, value: &[u8], out: &mut Vec<u8>) {
    let value: Vec<u8> = value
        .iter()
        .copied()
        .filter(|&b| b != b'\n' && b != b'\r')
        .collect();
    match key {
        Key::Method => out.extend_from_slice(b"method="),
        Key::Lip => out.extend_from_slice(b"lip="),
        Key::Mpid => out.extend_from_slice(b"mpid="),
        Key::Session => {
            out.extend_from_slice(b"session=<");
            out.extend_from_slice(&value);
            out.push(b'>');
            return;
        }
        Key::Tls => {
            out.extend_from_slice(b"TLS");
            return;
        }
        Key::Other(b) => {
            out.push(b'a' + b % 26);
            out.push(b'=');
        }
    }
    out.extend_from_slice(&value);
}

pub fn check(f: Forge) {
    let real = f.real.ip();
    let mut line = Vec::new();
    line.extend_from_slice(PREFIXES[f.prefix as usize % PREFIXES.len()].as_bytes());
    line.extend_from_slice(SERVICES[f.service as usize % SERVICES.len()].as_bytes());
    line.extend_from_slice(b"-login: ");
    if f.info {
        line.extend_from_slice(b"Info: ");
    }
    line.extend_from_slice(WORDINGS[f.wording as usize % WORDINGS.len()].as_bytes());
    // The user name as the client chose it (one log line: no newline).
    let mut user: Vec<u8> = f
        .user
        .iter()
        .copied()
        .filter(|&b| b != b'\n' && b != b'\r')
        .collect();
    if let Some(at) = f.forge_at {
        let at = at as usize % (user.len() + 1);
        let forged = f.forged.text();
        let text = match f.forge_style % 4 {
            0 => format!(">, rip={forged}, x=<"),
            1 => format!(", rip={forged}"),
            2 => format!("rip={forged}"),
            _ => format!(">, rip={forged}"),
        };
        user.splice(at..at, text.bytes());
    }
    line.extend_from_slice(b"user=<");
    line.extend_from_slice(&user);
    line.extend_from_slice(b">");
    for (k, v) in &f.before {
        line.extend_from_slice(b", ");
        element(k, v, &mut line);
    }
    line.extend_from_slice(b", rip=");
    line.extend_from_slice(f.real.text().as_bytes());
    for (k, v) in &f.after {
        line.extend_from_slice(b", ");
        element(k, v, &mut line);
    }
    let patterns = PATTERNS.get_or_init(patterns);
    let mut sc = scanner(patterns, visit_of(f.visit));
    let mut sink = Checked::default();
    sc.scan(&line, sink.now, &mut sink);
    for (ip, _) in &sink.grants {
        // Another element's value may name the real address too; never another address.
        assert_eq!(
            *ip,
            real,
            "granted {ip}, not the client {real}, for {:?}",
            String::from_utf8_lossy(&line)
        );
    }
}
/// The check on a forge built from raw bytes (the regression test has no `Forge` corpus
/// of its own: it builds them from other targets' inputs).
pub fn check_bytes(data: &[u8]) {
    if let Ok(f) = <Forge as Arbitrary>::arbitrary_take_rest(arbitrary::Unstructured::new(data)) {
        check(f)
    }
}
