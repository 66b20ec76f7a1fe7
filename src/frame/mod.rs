//! The `frame` stage: splits one log line into its timestamp and the Dovecot message.
//!
//! A syslog line counts only when its tag is one of the trusted Dovecot idents: another
//! program's message that merely contains `imap-login: Login:` (a HELO, a user name) is
//! never handed on. The message returned starts where Dovecot's own text starts
//! (`imap-login: ...`), with a leading level word (`Info: `) of old log_path files removed.

pub mod time;

use serde::Serialize;

/// How the line was framed; reported by `dovegate test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// `Nov 21 09:30:01 host dovecot[123]: ...`
    SyslogBsd,
    /// `2026-11-21T09:30:01.889064+01:00 host dovecot: ...`
    SyslogRfc3339,
    /// Dovecot's own log_path: `Nov 21 09:30:01 imap-login: Info: ...` (also 1.x order).
    LogPath,
    /// log_path with `log_timestamp = "%Y-%m-%d %H:%M:%S "`.
    LogPathIso,
    /// daemontools multilog: `@4000... imap-login: Info: ...`
    Tai64n,
    /// The bare message (journal MESSAGE, stdin), optionally behind `dovecot: `.
    MessageOnly,
    /// A journal entry: MESSAGE with the time from the entry's trusted timestamp.
    Journal,
}

impl Framing {
    pub fn name(self) -> &'static str {
        match self {
            Framing::SyslogBsd => "syslog-bsd",
            Framing::SyslogRfc3339 => "syslog-rfc3339",
            Framing::LogPath => "log-path",
            Framing::LogPathIso => "log-path-iso",
            Framing::Tai64n => "tai64n",
            Framing::MessageOnly => "message-only",
            Framing::Journal => "journal",
        }
    }
}

/// One framed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub framing: Framing,
    /// Unix seconds, when the framing carries a time.
    pub time: Option<i64>,
    pub message: &'a [u8],
}

/// Knows the trusted syslog idents; parses lines.
#[derive(Debug, Clone)]
pub struct FrameParser {
    idents: Vec<Vec<u8>>,
}

const LEVELS: [&[u8]; 6] = [
    b"Info: ",
    b"Warning: ",
    b"Error: ",
    b"Fatal: ",
    b"Panic: ",
    b"Debug: ",
];

fn strip_level(msg: &[u8]) -> &[u8] {
    for l in LEVELS {
        if let Some(rest) = msg.strip_prefix(l) {
            return rest;
        }
    }
    msg
}

/// `name:` as the first token: a Dovecot process/service name such as `imap-login:`.
fn starts_with_service(msg: &[u8]) -> bool {
    let end = msg.iter().position(|&b| b == b':').unwrap_or(0);
    end > 0
        && msg.get(end + 1) == Some(&b' ')
        && msg[..end]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `mail_1    | rest` (docker-compose) prefixes.
fn strip_container_prefix(line: &[u8]) -> &[u8] {
    let name_end = line
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        .unwrap_or(0);
    if name_end == 0 {
        return line;
    }
    let mut i = name_end;
    while line.get(i) == Some(&b' ') {
        i += 1;
    }
    if i > name_end && line.get(i) == Some(&b'|') && line.get(i + 1) == Some(&b' ') {
        return &line[i + 2..];
    }
    line
}

fn token(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = memchr::memchr(b' ', line)?;
    Some((&line[..sp], &line[sp + 1..]))
}

impl FrameParser {
    pub fn new<S: AsRef<str>>(idents: &[S]) -> FrameParser {
        FrameParser {
            idents: idents
                .iter()
                .map(|s| s.as_ref().as_bytes().to_vec())
                .collect(),
        }
    }

    /// `dovecot:` or `dovecot[123]:` with a trusted ident; returns the rest after `: `.
    fn strip_tag<'a>(&self, rest: &'a [u8]) -> Option<&'a [u8]> {
        let colon = memchr::memchr(b':', rest)?;
        if rest.get(colon + 1) != Some(&b' ') {
            return None;
        }
        let tag = &rest[..colon];
        let name = match memchr::memchr(b'[', tag) {
            Some(b) => {
                let pid = tag[b + 1..].strip_suffix(b"]")?;
                if pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                &tag[..b]
            }
            None => tag,
        };
        if self.idents.iter().any(|i| i.as_slice() == name) {
            Some(&rest[colon + 2..])
        } else {
            None
        }
    }

    /// After a syslog timestamp: `[<fac.lvl> ]host [<fac.lvl> ]tag: message`.
    fn syslog_body<'a>(&self, rest: &'a [u8], now: i64) -> Option<&'a [u8]> {
        let rest = skip_priority(rest);
        let (host, rest) = token(rest)?;
        if host.is_empty() || host.ends_with(b":") {
            return None;
        }
        let rest = skip_priority(rest);
        let msg = self.strip_tag(rest)?;
        // A container logging to syslog with its own prefix again:
        // `dovecot[12]: May 23 17:44:04 imap-login: Info: ...`.
        if let Some((_, n)) = time::parse_bsd(msg, now) {
            if starts_with_service(&msg[n..]) {
                return Some(strip_level(&msg[n..]));
            }
        }
        Some(msg)
    }

    /// Frames one line (without its newline). None: not a trusted Dovecot line.
    pub fn parse<'a>(&self, line: &'a [u8], now: i64) -> Option<Frame<'a>> {
        let line = strip_container_prefix(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some((t, n)) = time::parse_bsd(line, now) {
            let rest = &line[n..];
            return if starts_with_service(rest) {
                Some(self.frame(Framing::LogPath, Some(t), strip_level(rest)))
            } else {
                let msg = self.syslog_body(rest, now)?;
                Some(self.frame(Framing::SyslogBsd, Some(t), msg))
            };
        }
        if let Some((t, n)) = time::parse_rfc3339(line) {
            let msg = self.syslog_body(&line[n..], now)?;
            return Some(self.frame(Framing::SyslogRfc3339, Some(t), msg));
        }
        if let Some((t, n)) = time::parse_iso_local(line) {
            let rest = &line[n..];
            if !starts_with_service(rest) {
                return None;
            }
            return Some(self.frame(Framing::LogPathIso, Some(t), strip_level(rest)));
        }
        if let Some((t, n)) = time::parse_tai64n(line) {
            let rest = &line[n..];
            if !starts_with_service(rest) {
                return None;
            }
            return Some(self.frame(Framing::Tai64n, Some(t), strip_level(rest)));
        }
        // `dovecot: ...`: Dovecot 1.x log_path prefix (`dovecot: 2008-10-02 23:34:07 Info:
        // pop3-login: ...`) or an ident with no syslog header.
        if let Some(rest) = self.strip_tag(line) {
            if let Some((t, n)) = time::parse_iso_local(rest).or_else(|| time::parse_bsd(rest, now))
            {
                let msg = strip_level(&rest[n..]);
                return starts_with_service(msg)
                    .then(|| self.frame(Framing::LogPath, Some(t), msg));
            }
            return starts_with_service(rest)
                .then(|| self.frame(Framing::MessageOnly, None, strip_level(rest)));
        }
        starts_with_service(line).then(|| self.frame(Framing::MessageOnly, None, line))
    }

    fn frame<'a>(&self, framing: Framing, time: Option<i64>, message: &'a [u8]) -> Frame<'a> {
        Frame {
            framing,
            time,
            message,
        }
    }
}

/// The timestamp at the start of any line, whoever wrote it (for finding where to start
/// reading a file: other programs' lines tell the time as well as Dovecot's).
pub fn line_time(line: &[u8], now: i64) -> Option<i64> {
    let line = strip_container_prefix(line);
    time::parse_bsd(line, now)
        .or_else(|| time::parse_rfc3339(line))
        .or_else(|| time::parse_iso_local(line))
        .or_else(|| time::parse_tai64n(line))
        .map(|(t, _)| t)
}

/// FreeBSD `syslogd -v` writes `<mail.info> ` beside the host name.
fn skip_priority(rest: &[u8]) -> &[u8] {
    if rest.first() == Some(&b'<') {
        if let Some(end) = memchr::memchr(b'>', rest) {
            if rest.get(end + 1) == Some(&b' ')
                && rest[1..end]
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'.')
            {
                return &rest[end + 2..];
            }
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_255_027;

    fn fp() -> FrameParser {
        std::env::set_var("TZ", "UTC");
        FrameParser::new(&["dovecot", "dovecot-edge"])
    }

    fn msg(line: &str) -> Option<(Framing, String)> {
        // The level after the service name is the pattern's business, not the frame's.
        fp().parse(line.as_bytes(), NOW).map(|f| {
            let m =
                String::from_utf8_lossy(f.message).replace("imap-login: Info: ", "imap-login: ");
            (f.framing, m)
        })
    }

    #[test]
    fn framings() {
        let m = "imap-login: Login: user=<a>";
        for (line, framing) in [
            (
                "Nov 21 09:30:01 vm dovecot: imap-login: Login: user=<a>",
                Framing::SyslogBsd,
            ),
            (
                "Nov 21 09:30:01 vm dovecot[12]: imap-login: Login: user=<a>",
                Framing::SyslogBsd,
            ),
            (
                "Nov 21 09:30:01 vm dovecot-edge: imap-login: Login: user=<a>",
                Framing::SyslogBsd,
            ),
            (
                "Nov 21 09:30:01 <mail.info> vm dovecot: imap-login: Login: user=<a>",
                Framing::SyslogBsd,
            ),
            (
                "2026-11-21T09:56:55.783926+00:00 vm dovecot: imap-login: Login: user=<a>",
                Framing::SyslogRfc3339,
            ),
            (
                "Nov 21 09:30:01 imap-login: Info: Login: user=<a>",
                Framing::LogPath,
            ),
            (
                "Jun 23 15:04:05 Info: imap-login: Login: user=<a>",
                Framing::LogPath,
            ),
            (
                "dovecot: 2008-10-02 23:34:07 Info: imap-login: Login: user=<a>",
                Framing::LogPath,
            ),
            (
                "2026-11-21 09:55:44 imap-login: Info: Login: user=<a>",
                Framing::LogPathIso,
            ),
            (
                "@400000004c91b044077a9e94 imap-login: Info: Login: user=<a>",
                Framing::Tai64n,
            ),
            ("imap-login: Login: user=<a>", Framing::MessageOnly),
            ("dovecot: imap-login: Login: user=<a>", Framing::MessageOnly),
            (
                "mail_1  | Nov 21 09:30:01 vm dovecot: imap-login: Login: user=<a>",
                Framing::SyslogBsd,
            ),
            (
                "Nov 21 09:30:01 vm dovecot[12]: May 23 17:44:04 imap-login: Info: Login: user=<a>",
                Framing::SyslogBsd,
            ),
        ] {
            assert_eq!(msg(line), Some((framing, m.to_string())), "{line}");
        }
    }

    #[test]
    fn other_programs_never_frame() {
        for line in [
            "Nov 21 09:30:01 vm sshd[12]: imap-login: Login: user=<a>, rip=6.6.6.6",
            "Nov 21 09:30:01 vm postfix/smtpd[1]: dovecot: imap-login: Login: user=<a>",
            "Nov 21 09:30:01 vm vm dovecot: imap-login: Login: user=<a>",
            "Nov 21 09:30:01 vm dovecot[x]: imap-login: Login: user=<a>",
            "Nov 21 09:30:01 vm imap-login: Login: user=<a>, rip=6.6.6.6",
            "garbage imap-login: Login: user=<a>",
        ] {
            assert_eq!(msg(line), None, "{line}");
        }
    }
}
