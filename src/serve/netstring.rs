//! Netstrings (`<length>:<bytes>,`), the framing of the socketmap protocol.
//!
//! The decoder is incremental and bounded: it never buffers more than the configured
//! maximum, and any malformed input is an error that closes the connection.

/// Why a netstring was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetstringError {
    #[error("length is not a number")]
    BadLength,
    #[error("longer than {0} bytes")]
    TooLong(usize),
    #[error("missing ',' terminator")]
    BadTerminator,
}

/// Tries to take one netstring from the front of `buf`.
/// Ok(Some((payload, consumed))) when complete, Ok(None) when more bytes are needed.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, NetstringError> {
    let digits_max = max.to_string().len();
    let colon = match buf.iter().position(|&b| b == b':') {
        Some(c) => c,
        None if buf.len() > digits_max => return Err(NetstringError::BadLength),
        None if buf.iter().all(u8::is_ascii_digit) => return Ok(None),
        None => return Err(NetstringError::BadLength),
    };
    let digits = &buf[..colon];
    if digits.is_empty() || digits.len() > digits_max || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NetstringError::BadLength);
    }
    // Leading zeros are not canonical (RFC: no leading zeros except "0").
    if digits.len() > 1 && digits[0] == b'0' {
        return Err(NetstringError::BadLength);
    }
    let len: usize = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(NetstringError::BadLength)?;
    if len > max {
        return Err(NetstringError::TooLong(max));
    }
    let start = colon + 1;
    let end = start + len;
    if buf.len() <= end {
        return Ok(None);
    }
    if buf[end] != b',' {
        return Err(NetstringError::BadTerminator);
    }
    Ok(Some((&buf[start..end], end + 1)))
}

pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{}:", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.push(b',');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial() {
        let e = encode(b"relay 192.0.2.1");
        assert_eq!(e, b"15:relay 192.0.2.1,");
        assert_eq!(
            decode(&e, 100),
            Ok(Some((&b"relay 192.0.2.1"[..], e.len())))
        );
        for cut in 0..e.len() {
            assert_eq!(decode(&e[..cut], 100), Ok(None), "prefix {cut}");
        }
        assert_eq!(decode(b"0:,", 100), Ok(Some((&b""[..], 3))));
    }

    #[test]
    fn malformed() {
        assert_eq!(decode(b"x:abc,", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b":abc,", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b"03:abc,", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b"3:abcd", 100), Err(NetstringError::BadTerminator));
        assert_eq!(decode(b"101:", 100), Err(NetstringError::TooLong(100)));
        assert_eq!(
            decode(b"99999999999999999999", 100),
            Err(NetstringError::BadLength)
        );
        assert_eq!(decode(b"-1:a,", 100), Err(NetstringError::BadLength));
    }

    /// Fuzz-style: random and mutated inputs never panic, never report a payload beyond
    /// the bound, and never claim to consume more than they were given.
    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let len = (next() % 24) as usize;
            let alphabet = b"0123456789:,ab \xff";
            let buf: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            if let Ok(Some((payload, used))) = decode(&buf, 16) {
                assert!(payload.len() <= 16 && used <= buf.len());
            }
        }
    }
}
