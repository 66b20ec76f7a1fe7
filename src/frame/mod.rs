//! The `frame` stage: splits one log line into its timestamp and the Dovecot message.
//!
//! A syslog line counts only when its tag is one of the trusted Dovecot idents: another
//! program's message that merely contains `imap-login: Login:` (a HELO, a user name) is
//! never handed on. The message returned starts where Dovecot's own text starts
//! (`imap-login: ...`), with a leading level word (`Info: `) of old log_path files removed.

pub mod rfc5424;
pub mod time;

use serde::Serialize;

pub use time::LocalZone;

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
    /// `<38>1 2026-11-26T10:00:00.123456+01:00 host dovecot 123 - - imap-login: ...`
    SyslogRfc5424,
    /// `<38>Nov 21 09:30:01 host dovecot[123]: ...` (raw syslog with its priority).
    SyslogBsdPri,
    /// `<38>2026-11-21T09:30:01+01:00 host dovecot: ...`
    SyslogRfc3339Pri,
}

impl Framing {
    /// Whether lines of this framing can only come from Dovecot: its own log_path, or a
    /// journal entry from a trusted sender. A syslog line can be written by any local user
    /// (`logger -t dovecot`), so its session end lines prove nothing.
    pub fn only_dovecot(self) -> bool {
        matches!(
            self,
            Framing::LogPath | Framing::LogPathIso | Framing::Tai64n | Framing::Journal
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Framing::SyslogBsd => "syslog-bsd",
            Framing::SyslogRfc3339 => "syslog-rfc3339",
            Framing::LogPath => "log-path",
            Framing::LogPathIso => "log-path-iso",
            Framing::Tai64n => "tai64n",
            Framing::MessageOnly => "message-only",
            Framing::Journal => "journal",
            Framing::SyslogRfc5424 => "syslog-rfc5424",
            Framing::SyslogBsdPri => "syslog-bsd-pri",
            Framing::SyslogRfc3339Pri => "syslog-rfc3339-pri",
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

/// Knows the trusted syslog idents and the zone of local timestamps; parses lines.
#[derive(Debug, Clone)]
pub struct FrameParser {
    idents: Vec<Vec<u8>>,
    zone: LocalZone,
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
    let name = msg
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .unwrap_or(msg.len());
    // `imap-login: ...`, or a mail process's `imap(user)<PID><SESSION>: ...`.
    name > 0
        && match msg.get(name) {
            Some(b':') => msg.get(name + 1) == Some(&b' '),
            Some(b'(') => memchr::memmem::find(&msg[name..], b": ").is_some(),
            _ => false,
        }
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
    /// Local timestamps are read in the host's zone; see `with_zone`.
    pub fn new<S: AsRef<str>>(idents: &[S]) -> FrameParser {
        FrameParser {
            idents: idents
                .iter()
                .map(|s| s.as_ref().as_bytes().to_vec())
                .collect(),
            zone: LocalZone::system(),
        }
    }

    /// Reads timestamps without a zone (BSD syslog, log_path) in `zone`.
    pub fn with_zone(mut self, zone: LocalZone) -> FrameParser {
        self.zone = zone;
        self
    }

    pub fn zone(&self) -> &LocalZone {
        &self.zone
    }

    fn trusted(&self, name: &[u8]) -> bool {
        self.idents.iter().any(|i| i.as_slice() == name)
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
        if self.trusted(name) {
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
        Some(self.unnest(msg, now))
    }

    /// A container logging to syslog with its own prefix again:
    /// `dovecot[12]: May 23 17:44:04 imap-login: Info: ...`.
    fn unnest<'a>(&self, msg: &'a [u8], now: i64) -> &'a [u8] {
        if let Some((_, n)) = time::parse_bsd(msg, now, &self.zone) {
            if starts_with_service(&msg[n..]) {
                return strip_level(&msg[n..]);
            }
        }
        msg
    }

    /// After a `<PRI>`: an RFC 5424 header, or a BSD or RFC 3339 syslog line, the host name
    /// optional (lines as sent to `/dev/log` carry none).
    fn parse_pri<'a>(&self, rest: &'a [u8], now: i64) -> Option<Frame<'a>> {
        if rest.starts_with(b"1 ") {
            let h = rfc5424::parse_header(rest)?;
            if !self.trusted(h.app_name) {
                return None;
            }
            let time = match h.timestamp {
                Some(ts) => Some(time::parse_rfc3339_field(ts)?),
                None => None,
            };
            let msg = self.unnest(h.msg, now);
            return starts_with_service(msg).then(|| self.frame(Framing::SyslogRfc5424, time, msg));
        }
        let (framing, t, n) = if let Some((t, n)) = time::parse_bsd(rest, now, &self.zone) {
            (Framing::SyslogBsdPri, t, n)
        } else {
            let (t, n) = time::parse_rfc3339(rest)?;
            (Framing::SyslogRfc3339Pri, t, n)
        };
        let body = &rest[n..];
        let msg = match self.strip_tag(body) {
            Some(msg) => self.unnest(msg, now),
            None => self.syslog_body(body, now)?,
        };
        Some(self.frame(framing, Some(t), msg))
    }

    /// Frames one line (without its newline). None: not a trusted Dovecot line.
    pub fn parse<'a>(&self, line: &'a [u8], now: i64) -> Option<Frame<'a>> {
        let line = strip_container_prefix(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(n) = rfc5424::pri_len(line) {
            return self.parse_pri(&line[n..], now);
        }
        if let Some((t, n)) = time::parse_bsd(line, now, &self.zone) {
            let rest = &line[n..];
            // Syslog without a host field (`Jun  1 12:00:00 dovecot: imap-login: ...`, as
            // some syslogds write local messages): the trusted tag right after the time.
            if let Some(msg) = self.strip_tag(rest).map(|m| self.unnest(m, now)) {
                if starts_with_service(msg) {
                    return Some(self.frame(Framing::SyslogBsd, Some(t), msg));
                }
            }
            return if starts_with_service(rest) {
                Some(self.frame(Framing::LogPath, Some(t), strip_level(rest)))
            } else {
                let msg = self.syslog_body(rest, now)?;
                Some(self.frame(Framing::SyslogBsd, Some(t), msg))
            };
        }
        if let Some((t, n)) = time::parse_rfc3339(line) {
            let rest = &line[n..];
            let msg = match self.strip_tag(rest).map(|m| self.unnest(m, now)) {
                Some(msg) if starts_with_service(msg) => msg,
                _ => self.syslog_body(rest, now)?,
            };
            return Some(self.frame(Framing::SyslogRfc3339, Some(t), msg));
        }
        if let Some((t, n)) = time::parse_iso_local(line, &self.zone) {
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
            if let Some((t, n)) = time::parse_iso_local(rest, &self.zone)
                .or_else(|| time::parse_bsd(rest, now, &self.zone))
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
/// reading a file: other programs' lines tell the time as well as Dovecot's). Local
/// timestamps in the host's zone; `line_time_in` takes the zone.
pub fn line_time(line: &[u8], now: i64) -> Option<i64> {
    line_time_in(line, now, &LocalZone::system())
}

/// `line_time` with local timestamps read in `zone`.
pub fn line_time_in(line: &[u8], now: i64, zone: &LocalZone) -> Option<i64> {
    let line = strip_container_prefix(line);
    if let Some(n) = rfc5424::pri_len(line) {
        let rest = &line[n..];
        if rest.starts_with(b"1 ") {
            let ts = rfc5424::parse_header(rest)?.timestamp?;
            return time::parse_rfc3339_field(ts);
        }
        return time::parse_bsd(rest, now, zone)
            .or_else(|| time::parse_rfc3339(rest))
            .map(|(t, _)| t);
    }
    time::parse_bsd(line, now, zone)
        .or_else(|| time::parse_rfc3339(line))
        .or_else(|| time::parse_iso_local(line, zone))
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
        FrameParser::new(&["dovecot", "dovecot-edge"]).with_zone(LocalZone::utc())
    }

    fn msg(line: &str) -> Option<(Framing, String)> {
        // The level after the service name is the pattern's business, not the frame's.
        fp().parse(line.as_bytes(), NOW).map(|f| {
            let m =
                String::from_utf8_lossy(f.message).replace("imap-login: Info: ", "imap-login: ");
            (f.framing, m)
        })
    }

    /// Some syslogds write local messages without a host field.
    #[test]
    fn syslog_without_a_host_field() {
        let m = "imap-login: Login: user=<a>";
        for line in [
            "Jun  1 12:00:00 dovecot: imap-login: Login: user=<a>",
            "Jun  1 12:00:00 dovecot[12]: imap-login: Login: user=<a>",
            "2026-06-01T12:00:00+00:00 dovecot: imap-login: Login: user=<a>",
        ] {
            let (framing, got) = msg(line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(got, m, "{line}");
            assert!(
                matches!(framing, Framing::SyslogBsd | Framing::SyslogRfc3339),
                "{line}"
            );
        }
        // Another program's tag is still not trusted: its line never frames as the login.
        for line in [
            "Jun  1 12:00:00 sshd: imap-login: Login: user=<a>",
            "2026-06-01T12:00:00+00:00 sshd: imap-login: Login: user=<a>",
        ] {
            assert_ne!(msg(line).map(|(_, got)| got).as_deref(), Some(m), "{line}");
        }
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
            (
                "<38>1 2026-11-21T10:00:00.123456+01:00 vm dovecot 123 - - imap-login: Login: user=<a>",
                Framing::SyslogRfc5424,
            ),
            (
                "<38>1 - - dovecot - - - imap-login: Login: user=<a>",
                Framing::SyslogRfc5424,
            ),
            (
                "<22>1 2026-11-21T09:00:00Z vm dovecot - ID1 [origin ip=\"192.0.2.1\"][x@1 y=\"a]b\\\"]\"] imap-login: Login: user=<a>",
                Framing::SyslogRfc5424,
            ),
            (
                "<38>Nov 21 09:30:01 vm dovecot[12]: imap-login: Login: user=<a>",
                Framing::SyslogBsdPri,
            ),
            (
                "<38>Nov 21 09:30:01 dovecot[12]: imap-login: Login: user=<a>",
                Framing::SyslogBsdPri,
            ),
            (
                "<38>2026-11-21T09:56:55.783926+00:00 vm dovecot: imap-login: Login: user=<a>",
                Framing::SyslogRfc3339Pri,
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
            "<38>1 2026-11-21T10:00:00+01:00 vm sshd 123 - - imap-login: Login: user=<a>",
            "<38>1 2026-11-21T10:00:00+01:00 vm - 123 - - imap-login: Login: user=<a>",
            "<38>1 2026-11-21T10:00:00+01:00 vm dovecotx 1 - - imap-login: Login: user=<a>",
            "<38>1 yesterday vm dovecot 123 - - imap-login: Login: user=<a>",
            "<38>Nov 21 09:30:01 vm sshd[12]: imap-login: Login: user=<a>",
            "<38>imap-login: Login: user=<a>",
            "<999>Nov 21 09:30:01 vm dovecot: imap-login: Login: user=<a>",
        ] {
            assert_eq!(msg(line), None, "{line}");
        }
    }

    #[test]
    fn pri_and_rfc5424_times() {
        let f = fp();
        let t = |line: &str| f.parse(line.as_bytes(), NOW).and_then(|f| f.time);
        assert_eq!(
            t("<38>1 2026-11-21T10:56:55.406029+01:00 vm dovecot 1 - - imap-login: x"),
            Some(1_795_255_015)
        );
        assert_eq!(t("<38>1 - vm dovecot 1 - - imap-login: x"), None);
        assert_eq!(
            t("<38>Nov 21 09:56:55 vm dovecot: imap-login: x"),
            Some(1_795_255_015)
        );
        assert_eq!(
            line_time_in(b"<38>1 2026-11-21T09:56:55Z vm x - - - y", NOW, f.zone()),
            Some(1_795_255_015)
        );
        assert_eq!(
            line_time_in(b"<13>Nov 21 09:56:55 vm x: y", NOW, f.zone()),
            Some(1_795_255_015)
        );
    }

    #[test]
    fn local_timestamps_use_the_parser_zone() {
        let plus1 = FrameParser::new(&["dovecot"]).with_zone(LocalZone::fixed(3600));
        let f = plus1
            .parse(b"Nov 21 10:56:55 vm dovecot: imap-login: x", NOW)
            .unwrap();
        assert_eq!(f.time, Some(1_795_255_015));
        let f = plus1
            .parse(b"2026-11-21 10:56:55 imap-login: Info: x", NOW)
            .unwrap();
        assert_eq!(f.time, Some(1_795_255_015));
    }
}
