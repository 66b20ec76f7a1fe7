//! What a writer reads from PostgreSQL for the policy state shared between hosts: blocked
//! users (name, cap) and the other hosts' cap counts, as any role that can write those
//! tables could shape them. A cap name is shown to the blocked user's mail client, so
//! only dovegate's own shape passes; counts only ever make a cap stricter.
//! Input: user, NUL, cap, NUL, then 17-byte count rows (1 kind, 8 bucket, 8 count).

use std::net::IpAddr;

use dovegate::model::UserCount;
use dovegate::policy::caps::{CapLimits, Caps};
use dovegate::store::policy_db::{cap_name, user_name};

pub fn check(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let user = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let cap = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let rows = parts.next().unwrap_or_default();
    let shown = cap_name(cap);
    assert!(shown == "unknown" || shown.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    assert!(shown.len() <= 64);
    if !user_name(&user) {
        return;
    }
    let counts: Vec<UserCount> = rows
        .chunks_exact(17)
        .map(|c| UserCount {
            user: user.clone(),
            recipients: c[0] & 1 == 1,
            bucket: i64::from_le_bytes(c[1..9].try_into().unwrap()),
            count: i64::from_le_bytes(c[9..17].try_into().unwrap()),
        })
        .collect();
    let limits = CapLimits {
        user_messages_per_hour: 5,
        user_messages_per_day: 50,
        user_recipients_per_hour: 20,
        user_recipients_per_day: 200,
        ..Default::default()
    };
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    let now = 1_700_000_000;
    let alone = Caps::default();
    let shared = Caps::default();
    shared.set_remote(counts);
    // Whatever the rows, a user refused alone is refused with them too.
    for i in 0..8 {
        let a = alone.recipient(&limits, ip, Some(&user), now + i).is_ok();
        let s = shared.recipient(&limits, ip, Some(&user), now + i).is_ok();
        assert!(a || !s, "remote counts made a cap looser");
        let a = alone.message(&limits, ip, Some(&user), now + i).is_ok();
        let s = shared.message(&limits, ip, Some(&user), now + i).is_ok();
        assert!(a || !s, "remote counts made a cap looser");
    }
}
