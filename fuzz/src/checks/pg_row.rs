//! What the replica reads from PostgreSQL: a grants row (address, expiry), as any role that
//! can write the table could shape it. NOTIFY payloads are no longer read (a notification
//! only says "read what changed"), so the first field, kept for the seed corpus's format,
//! is ignored.
//! Input: payload, NUL, address, NUL, 8 bytes of expiry, 8 bytes of "now".

use std::time::Duration;

use dovegate::grant::{key_text, Policy};

pub fn check(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let _payload = parts.next();
    let address = parts.next().unwrap_or_default();
    let numbers = parts.next().unwrap_or_default();
    let Ok(address) = std::str::from_utf8(address) else {
        return;
    };
    let mut n = [0u8; 16];
    let k = numbers.len().min(16);
    n[..k].copy_from_slice(&numbers[..k]);
    let expires = i64::from_le_bytes(n[..8].try_into().unwrap());
    // A plausible clock: the row's expiry is hostile, this host's time is not.
    let now = 1_700_000_000 + (u32::from_le_bytes(n[8..12].try_into().unwrap()) as i64);
    for ttl in [1u64, 3600, 86_400 * 365] {
        let policy = Policy::new(vec![], Duration::from_secs(ttl));
        if let Some((ip, e)) = policy.admit_row(address, expires, now) {
            // Only the canonical text dovegate writes, never an excluded address, never
            // expired, never longer than the ttl from now.
            assert_eq!(key_text(ip), address);
            assert!(policy.exclusion(ip).is_none());
            assert!(e > now && e <= now + ttl as i64 && e <= expires);
        }
    }
}
