//! The Postfix policy server's request parser: what any client of the policy socket sends
//! (Postfix, or whoever reaches a listener). Requests are cut where the server cuts them,
//! then parsed; a parsed request keeps only bounded values and a canonical address.

use dovegate::policy::protocol::{parse_request, request_end, MAX_REQUEST};

pub fn check(data: &[u8]) {
    let mut rest = data;
    while let Some(end) = request_end(rest) {
        assert!(end >= 1 && end <= rest.len());
        let (one, tail) = rest.split_at(end);
        rest = tail;
        let Ok(req) = parse_request(one) else {
            continue;
        };
        assert!(one.len() <= MAX_REQUEST);
        // Only a request that says it is one is answered.
        assert!(one.windows(27).any(|w| w == b"request=smtpd_access_policy"));
        if let Some(ip) = req.client_address {
            assert_eq!(ip, ip.to_canonical());
        }
        for v in [
            &req.queue_id,
            &req.instance,
            &req.recipient,
            &req.sasl_username,
        ] {
            assert!(v.len() <= 512, "value of {} bytes kept", v.len());
        }
    }
    // A request without its terminating empty line parses the same way (the server's
    // last request before a close).
    let _ = parse_request(rest);
}
