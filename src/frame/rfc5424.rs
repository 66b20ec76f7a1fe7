//! RFC 5424 syslog headers and the `<PRI>` prefix that raw syslog (network receivers,
//! `syslog-ng` templates, some containers) leaves in front of a line.
//!
//! `<38>1 2026-11-26T10:00:00.123456+01:00 host dovecot 123 - - imap-login: Login: ...`:
//! PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID, STRUCTURED-DATA, MSG. Any
//! field but the version may be the NILVALUE `-`; the app name is what the frame checks
//! against the trusted idents, exactly like a BSD tag.

/// Length of a leading `<PRI>` (`<0>` to `<191>`), if the line has one.
pub fn pri_len(line: &[u8]) -> Option<usize> {
    if line.first() != Some(&b'<') {
        return None;
    }
    let end = line.iter().take(5).position(|&b| b == b'>')?;
    let digits = &line[1..end];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (value <= 191).then_some(end + 1)
}

/// The fields of an RFC 5424 header that the frame needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// The TIMESTAMP field, None for `-`.
    pub timestamp: Option<&'a [u8]>,
    pub app_name: &'a [u8],
    /// Everything after STRUCTURED-DATA and its space (a UTF-8 BOM removed).
    pub msg: &'a [u8],
}

fn field(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = memchr::memchr(b' ', rest)?;
    let f = &rest[..sp];
    (!f.is_empty()).then(|| (f, &rest[sp + 1..]))
}

/// Length of STRUCTURED-DATA: `-` or one or more `[id param="value" ...]` elements, where a
/// value may hold spaces and escaped `\]`, `\"`, `\\`.
fn structured_data_len(rest: &[u8]) -> Option<usize> {
    if rest.first() == Some(&b'-') {
        return Some(1);
    }
    let mut i = 0;
    while rest.get(i) == Some(&b'[') {
        i += 1;
        let mut quoted = false;
        loop {
            match *rest.get(i)? {
                b'\\' if quoted => i += 2,
                b'"' => {
                    quoted = !quoted;
                    i += 1;
                }
                b']' if !quoted => {
                    i += 1;
                    break;
                }
                _ => i += 1,
            }
        }
    }
    (i > 0).then_some(i)
}

/// Parses the header after `<PRI>`; `rest` starts at the version.
pub fn parse_header(rest: &[u8]) -> Option<Header<'_>> {
    let rest = rest.strip_prefix(b"1 ")?;
    let (timestamp, rest) = field(rest)?;
    let (_host, rest) = field(rest)?;
    let (app_name, rest) = field(rest)?;
    let (_procid, rest) = field(rest)?;
    let (_msgid, rest) = field(rest)?;
    let sd = structured_data_len(rest)?;
    let msg = match rest.get(sd) {
        None => &rest[sd..],
        Some(b' ') => &rest[sd + 1..],
        Some(_) => return None,
    };
    let msg = msg.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(msg);
    Some(Header {
        timestamp: (timestamp != b"-").then_some(timestamp),
        app_name,
        msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pri() {
        assert_eq!(pri_len(b"<38>1 x"), Some(4));
        assert_eq!(pri_len(b"<0>Nov"), Some(3));
        assert_eq!(pri_len(b"<191>x"), Some(5));
        for bad in [
            &b"<192>x"[..],
            b"<>x",
            b"<3a>x",
            b"<mail.info> x",
            b"38>x",
            b"<1234>x",
        ] {
            assert_eq!(pri_len(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn headers() {
        let h =
            parse_header(b"1 2026-11-26T10:00:00.123456+01:00 host dovecot 123 - - imap-login: x")
                .unwrap();
        assert_eq!(h.timestamp, Some(&b"2026-11-26T10:00:00.123456+01:00"[..]));
        assert_eq!(h.app_name, b"dovecot");
        assert_eq!(h.msg, b"imap-login: x");
        let h = parse_header(b"1 - - dovecot - - - imap-login: x").unwrap();
        assert_eq!((h.timestamp, h.msg), (None, &b"imap-login: x"[..]));
        let h = parse_header(
            b"1 2026-11-26T10:00:00Z h dovecot 1 ID47 [ex@32473 a=\"x ] \\\" y\"][b c=\"d\"] \xEF\xBB\xBFimap-login: x",
        )
        .unwrap();
        assert_eq!(h.msg, b"imap-login: x");
        for bad in [
            &b"2 2026-11-26T10:00:00Z h dovecot 1 - - m"[..],
            b"1 2026-11-26T10:00:00Z h dovecot 1 - [unterminated m",
            b"1 2026-11-26T10:00:00Z h dovecot 1 - x m",
            b"1 2026-11-26T10:00:00Z h  dovecot 1 - - m",
        ] {
            assert_eq!(parse_header(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
