//! Postfix's policy delegation protocol: a request is `name=value` lines ended by an empty
//! line; the reply is `action=ACTION` and an empty line (SMTPD_POLICY_README).
//!
//! `parse_request` is pure and takes any bytes (fuzzed by a property test): a request
//! that is not what Postfix sends is an error, and the connection is closed without a
//! reply (Postfix then applies the service's `default_action`).

use std::net::IpAddr;

/// The longest request accepted (Postfix's requests are well under 2 KiB; a recipient
/// address alone may reach `line_length_limit`).
pub const MAX_REQUEST: usize = 16 * 1024;
/// The longest line of a request.
pub const MAX_LINE: usize = 4096;
/// The most attributes in a request (Postfix 3.8 sends about 35).
pub const MAX_ATTRIBUTES: usize = 100;
/// Values kept (queue id, instance, user names) are cut to this length.
const MAX_VALUE: usize = 512;

/// The SMTP stage a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
    /// VRFY, ETRN, BDAT or a stage a later Postfix adds.
    Other,
}

impl Stage {
    fn parse(v: &str) -> Stage {
        match v {
            "CONNECT" => Stage::Connect,
            "EHLO" | "HELO" => Stage::Helo,
            "MAIL" => Stage::Mail,
            "RCPT" => Stage::Rcpt,
            "DATA" => Stage::Data,
            "END-OF-MESSAGE" => Stage::EndOfMessage,
            _ => Stage::Other,
        }
    }
}

/// What the policy server reads of one request; other attributes are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub stage: Stage,
    /// None: absent, `unknown`, or not an address.
    pub client_address: Option<IpAddr>,
    /// Empty before the message is queued.
    pub queue_id: String,
    /// The same for every request of one message.
    pub instance: String,
    pub recipient: String,
    pub sasl_username: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    #[error("line {0} is not name=value")]
    NotAttribute(usize),
    #[error("line {0} is not UTF-8 text")]
    NotText(usize),
    #[error("attribute `{0}` given twice")]
    Duplicate(&'static str),
    #[error("not a smtpd_access_policy request (request=... missing or other)")]
    NotPolicyRequest,
}

/// Where the request that begins `buf` ends (after its empty line), if it is complete.
pub fn request_end(buf: &[u8]) -> Option<usize> {
    if buf.first() == Some(&b'\n') {
        return Some(1);
    }
    memchr::memmem::find(buf, b"\n\n").map(|i| i + 2)
}

fn cut(v: &str) -> String {
    let mut end = v.len().min(MAX_VALUE);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_string()
}

/// Parses one request: its lines without or with the terminating empty line.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ParseError> {
    if bytes.len() > MAX_REQUEST {
        return Err(ParseError::TooLong);
    }
    let mut req = Request {
        stage: Stage::Other,
        client_address: None,
        queue_id: String::new(),
        instance: String::new(),
        recipient: String::new(),
        sasl_username: String::new(),
    };
    let mut is_policy = false;
    let mut seen = [false; 7];
    let mut count = 0;
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // The terminator, or the end of the input.
            continue;
        }
        if line.len() > MAX_LINE {
            return Err(ParseError::LineTooLong);
        }
        count += 1;
        if count > MAX_ATTRIBUTES {
            return Err(ParseError::TooManyAttributes);
        }
        let line = std::str::from_utf8(line).map_err(|_| ParseError::NotText(i + 1))?;
        let (name, value) = line
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or(ParseError::NotAttribute(i + 1))?;
        let slot = match name {
            "request" => 0,
            "protocol_state" => 1,
            "client_address" => 2,
            "queue_id" => 3,
            "instance" => 4,
            "recipient" => 5,
            "sasl_username" => 6,
            _ => continue,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(ParseError::Duplicate(
                [
                    "request",
                    "protocol_state",
                    "client_address",
                    "queue_id",
                    "instance",
                    "recipient",
                    "sasl_username",
                ][slot],
            ));
        }
        match slot {
            0 => is_policy = value == "smtpd_access_policy",
            1 => req.stage = Stage::parse(value),
            2 => req.client_address = crate::model::address::parse_any_ip(value),
            3 => req.queue_id = cut(value),
            4 => req.instance = cut(value),
            5 => req.recipient = cut(value),
            _ => req.sasl_username = cut(value),
        }
    }
    if !is_policy {
        return Err(ParseError::NotPolicyRequest);
    }
    Ok(req)
}

/// The reply line for an access(5) action (no newlines in it: they would end the reply).
pub fn format_reply(action: &str) -> Vec<u8> {
    let clean: String = action
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("action={clean}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RCPT: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
        client_address=203.0.113.45\nclient_name=unknown\nhelo_name=x\nsender=a@b\n\
        recipient=c@d\nrecipient_count=0\nqueue_id=\ninstance=12.34.5\nsize=0\n\
        some_future_attribute=whatever=with=equals\n\n";

    #[test]
    fn parses_what_postfix_sends() {
        let r = parse_request(RCPT).unwrap();
        assert_eq!(r.stage, Stage::Rcpt);
        assert_eq!(r.client_address, "203.0.113.45".parse().ok());
        assert_eq!(r.instance, "12.34.5");
        assert_eq!(r.recipient, "c@d");
        assert_eq!(r.queue_id, "");
        assert_eq!(request_end(RCPT), Some(RCPT.len()));
        let v6 = b"request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nclient_address=2001:DB8::7\nqueue_id=4ABC\n";
        let r = parse_request(v6).unwrap();
        assert_eq!(r.stage, Stage::EndOfMessage);
        assert_eq!(r.client_address, "2001:db8::7".parse().ok());
        assert_eq!(r.queue_id, "4ABC");
    }

    #[test]
    fn refuses_what_postfix_does_not_send() {
        assert_eq!(
            parse_request(b"protocol_state=RCPT\n\n"),
            Err(ParseError::NotPolicyRequest)
        );
        assert_eq!(
            parse_request(b"request=smtpd_access_policy\ngarbage\n\n"),
            Err(ParseError::NotAttribute(2))
        );
        assert_eq!(
            parse_request(
                b"request=smtpd_access_policy\nclient_address=1.2.3.4\nclient_address=5.6.7.8\n"
            ),
            Err(ParseError::Duplicate("client_address"))
        );
        let long = format!("request=smtpd_access_policy\nx={}\n", "a".repeat(MAX_LINE));
        assert_eq!(parse_request(long.as_bytes()), Err(ParseError::LineTooLong));
        let many = format!(
            "request=smtpd_access_policy\n{}",
            "a=b\n".repeat(MAX_ATTRIBUTES)
        );
        assert_eq!(
            parse_request(many.as_bytes()),
            Err(ParseError::TooManyAttributes)
        );
        assert_eq!(
            parse_request(&vec![b'a'; MAX_REQUEST + 1]),
            Err(ParseError::TooLong)
        );
        assert_eq!(
            parse_request(b"request=smtpd_access_policy\n\xff=1\n"),
            Err(ParseError::NotText(2))
        );
        let r = parse_request(b"request=smtpd_access_policy\nclient_address=unknown\n").unwrap();
        assert_eq!(r.client_address, None);
    }

    #[test]
    fn replies_are_one_line() {
        assert_eq!(format_reply("OK"), b"action=OK\n\n");
        assert_eq!(format_reply("DEFER a\nb"), b"action=DEFER a b\n\n");
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes);
            let _ = request_end(&bytes);
        }

        #[test]
        fn attribute_soup(lines in proptest::collection::vec("[a-z_]{1,12}=[ -~]{0,20}", 0..20)) {
            let text = format!("request=smtpd_access_policy\n{}\n\n", lines.join("\n"));
            let _ = parse_request(text.as_bytes());
        }
    }
}
