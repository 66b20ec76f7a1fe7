//! DRAC's ONC RPC calls (`dovegate::drac`), as a UDP datagram or a TCP record from a peer
//! inside or outside `drac.allow`. The first byte chooses: bit 0 the peer (set: allowed),
//! bit 1 the transport (set: TCP, the rest read as record-marked bytes).
//!
//! Invariant: nothing but a well-formed DRACPROC_ADD call (RPC version 2, program 900101,
//! version 1, procedure 1, credentials within bounds, exactly one 4-byte argument) from an
//! allowed peer yields an address, and the address is that argument; every reply answers
//! the call's own xid; a reply or a stub is never answered.

use std::net::{IpAddr, Ipv4Addr};

use dovegate::config::drac::DracSettings;
use dovegate::drac::server::{record, Record};
use dovegate::drac::{decide, rpc, Decision};

fn word(m: &[u8], i: usize) -> Option<u32> {
    m.get(i..i + 4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// The argument of a well-formed ADD, read independently of `rpc::parse`.
fn well_formed_add(m: &[u8]) -> Option<Ipv4Addr> {
    if m.len() > rpc::MAX_MESSAGE {
        return None;
    }
    let head = [
        word(m, 4)?,
        word(m, 8)?,
        word(m, 12)?,
        word(m, 16)?,
        word(m, 20)?,
    ];
    if head != [0, 2, rpc::PROGRAM, rpc::VERSION, rpc::PROC_ADD] {
        return None;
    }
    let mut at = 24;
    for _ in 0..2 {
        let len = word(m, at + 4)? as usize;
        if len > 400 {
            return None;
        }
        at += 8 + len.div_ceil(4) * 4;
    }
    (m.len() == at + 4).then(|| Ipv4Addr::from(word(m, at).unwrap()))
}

pub fn check(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let settings = DracSettings {
        allow: vec!["192.0.2.0/24".parse().unwrap()],
        ..Default::default()
    };
    let peer: IpAddr = if choice & 1 == 1 {
        "192.0.2.5".parse().unwrap()
    } else {
        "203.0.113.1".parse().unwrap()
    };
    let msg = if choice & 2 == 2 {
        match record(rest) {
            Record::Whole { body, used } => {
                assert!(used <= rest.len() && body.len() <= rpc::MAX_MESSAGE);
                body
            }
            Record::Incomplete | Record::Malformed => return,
        }
    } else {
        rest.to_vec()
    };
    let add = well_formed_add(&msg);
    let xid = word(&msg, 0);
    match decide(&msg, peer, &settings) {
        Decision::Add { xid: x, ip } => {
            assert!(settings.allows(peer), "an add from outside drac.allow");
            assert_eq!(add, Some(ip), "an address from a malformed call");
            assert_eq!(Some(x), xid);
        }
        Decision::Denied(reply) => {
            assert!(!settings.allows(peer));
            assert!(add.is_some());
            assert_eq!(reply, rpc::success(xid.unwrap(), Some(rpc::AddStat::Perm)));
        }
        Decision::Reply(reply) => {
            // NULL: an empty success.
            assert_eq!(reply, rpc::success(xid.unwrap(), None));
            assert_eq!(word(&msg, 20), Some(0));
        }
        Decision::Error(reply) => {
            assert!(
                add.is_none(),
                "a well-formed add answered without a decision"
            );
            assert_eq!(word(&reply, 0), xid, "a reply to another xid");
            assert_eq!(word(&reply, 4), Some(1));
            assert_eq!(word(&msg, 4), Some(0), "a non-call answered");
        }
        Decision::Ignore => {
            assert!(add.is_none());
        }
    }
}
