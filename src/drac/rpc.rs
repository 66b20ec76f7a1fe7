//! ONC RPC (RFC 5531) as DRAC speaks it, without I/O: one call message in, what to answer
//! and whether it grants out. Only what `rpc.dracd` serves is understood: program 900101
//! (`DRACPROG`) version 1, procedures 0 (NULL) and 1 (`DRACPROC_ADD`, one XDR unsigned int:
//! the IPv4 address to authorise, in network order). Everything else is ignored or
//! answered with the RPC error a libtirpc server would send; nothing but a well-formed ADD
//! from an allowed peer yields an address.
//!
//! Hand-written rather than a crate: the messages are a dozen 4-byte words, every length
//! is checked against the bytes present, and the fuzz target `drac_rpc` holds the parser
//! to that. (The `onc-rpc` crate parses whole messages too, but refuses a call of another
//! RPC version without its xid, which the `RPC_MISMATCH` reply needs, and brings `bytes`
//! and `byteorder` for what is here a few lines.)

use std::net::Ipv4Addr;

/// `DRACPROG`.
pub const PROGRAM: u32 = 900_101;
/// `DRACVERS`.
pub const VERSION: u32 = 1;
/// `DRACPROC_ADD`.
pub const PROC_ADD: u32 = 1;
/// The longest call accepted (a UDP datagram or a TCP record): a header, two credentials
/// of at most 400 bytes each (RFC 5531's bound) and the argument fit well within.
pub const MAX_MESSAGE: usize = 1024;
/// The longest opaque authentication body (RFC 5531 `opaque body<400>`).
const MAX_AUTH: usize = 400;

const CALL: u32 = 0;
const REPLY: u32 = 1;
const RPC_VERSION: u32 = 2;
const MSG_ACCEPTED: u32 = 0;
const MSG_DENIED: u32 = 1;

/// `enum addstat` of `drac.x` (the misspelling is DRAC's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddStat {
    Success = 0,
    Perm = 1,
    SysErr = 2,
}

/// What a call asks, once its header is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Procedure 0: answered with an empty success (clients use it to ping).
    Null,
    /// `DRACPROC_ADD` with the address to authorise.
    Add(Ipv4Addr),
}

/// The answer to a message that is not a well-formed call of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not worth an answer: too short to carry a call header, or not a call at all (a
    /// reply, which answering could bounce between two servers forever).
    Ignore,
    /// `MSG_DENIED RPC_MISMATCH 2 2`: an RPC version other than 2.
    RpcMismatch,
    /// `MSG_DENIED AUTH_ERROR AUTH_BADCRED`: a credential or verifier whose length runs
    /// past the message or beyond 400 bytes.
    BadCred,
    /// `PROG_UNAVAIL`: another program.
    ProgUnavail,
    /// `PROG_MISMATCH 1 1`: another version of DRAC (version 2 is an IPv6 extension some
    /// forks added; DRAC is served for IPv4 only).
    ProgMismatch,
    /// `PROC_UNAVAIL`: a procedure other than 0 and 1.
    ProcUnavail,
    /// `GARBAGE_ARGS`: arguments that are not exactly what the procedure takes.
    GarbageArgs,
}

/// A parsed call: its transaction id (echoed in the reply) and what it asks or why it is
/// refused. `xid` is None only for `Refusal::Ignore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub xid: Option<u32>,
    pub call: Result<Call, Refusal>,
}

/// Reads big-endian words from a slice, never past its end.
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (w, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_be_bytes(*w))
    }

    /// Skips an `opaque_auth`: flavor, then a body of at most 400 bytes padded to 4.
    fn auth(&mut self) -> Option<()> {
        let _flavor = self.u32()?;
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_AUTH {
            return None;
        }
        let padded = len.div_ceil(4) * 4;
        self.rest = self.rest.get(padded..)?;
        Some(())
    }
}

/// Parses one call message (a UDP datagram, or one TCP record without its marker).
pub fn parse(msg: &[u8]) -> Parsed {
    let ignore = Parsed {
        xid: None,
        call: Err(Refusal::Ignore),
    };
    if msg.len() > MAX_MESSAGE {
        return ignore;
    }
    let mut w = Words { rest: msg };
    let (Some(xid), Some(CALL)) = (w.u32(), w.u32()) else {
        return ignore;
    };
    let (Some(rpcvers), Some(prog), Some(vers), Some(proc)) = (w.u32(), w.u32(), w.u32(), w.u32())
    else {
        return ignore;
    };
    let answer = |call| Parsed {
        xid: Some(xid),
        call,
    };
    if rpcvers != RPC_VERSION {
        return answer(Err(Refusal::RpcMismatch));
    }
    if w.auth().is_none() || w.auth().is_none() {
        return answer(Err(Refusal::BadCred));
    }
    if prog != PROGRAM {
        return answer(Err(Refusal::ProgUnavail));
    }
    if vers != VERSION {
        return answer(Err(Refusal::ProgMismatch));
    }
    match proc {
        0 if w.rest.is_empty() => answer(Ok(Call::Null)),
        PROC_ADD if w.rest.len() == 4 => {
            let ip = w.u32().map(Ipv4Addr::from);
            answer(ip.map(Call::Add).ok_or(Refusal::GarbageArgs))
        }
        0 | PROC_ADD => answer(Err(Refusal::GarbageArgs)),
        _ => answer(Err(Refusal::ProcUnavail)),
    }
}

/// The reply header up to (not including) the accept status: xid, REPLY, MSG_ACCEPTED and
/// an empty AUTH_NONE verifier.
fn accepted(xid: u32, accept_stat: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for w in [xid, REPLY, MSG_ACCEPTED, 0, 0, accept_stat] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// The reply to a NULL call or an ADD (`Some(status)`).
pub fn success(xid: u32, status: Option<AddStat>) -> Vec<u8> {
    let mut out = accepted(xid, 0);
    if let Some(s) = status {
        out.extend_from_slice(&(s as u32).to_be_bytes());
    }
    out
}

/// The error reply to a refused call (None: no reply at all).
pub fn refusal(xid: Option<u32>, why: Refusal) -> Option<Vec<u8>> {
    let xid = xid?;
    let words: Vec<u32> = match why {
        Refusal::Ignore => return None,
        // MSG_DENIED RPC_MISMATCH low high
        Refusal::RpcMismatch => vec![xid, REPLY, MSG_DENIED, 0, RPC_VERSION, RPC_VERSION],
        // MSG_DENIED AUTH_ERROR AUTH_BADCRED
        Refusal::BadCred => vec![xid, REPLY, MSG_DENIED, 1, 1],
        Refusal::ProgUnavail => return Some(accepted(xid, 1)),
        Refusal::ProgMismatch => {
            let mut out = accepted(xid, 2);
            out.extend_from_slice(&VERSION.to_be_bytes());
            out.extend_from_slice(&VERSION.to_be_bytes());
            return Some(out);
        }
        Refusal::ProcUnavail => return Some(accepted(xid, 3)),
        Refusal::GarbageArgs => return Some(accepted(xid, 4)),
    };
    Some(words.iter().flat_map(|w| w.to_be_bytes()).collect())
}

/// A call message as a client sends it (AUTH_NONE credentials), for tests and the fuzz
/// seeds.
pub fn call(xid: u32, prog: u32, vers: u32, proc: u32, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + args.len());
    for w in [xid, CALL, RPC_VERSION, prog, vers, proc, 0, 0, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(args);
    out
}

/// The TCP record marker bit: the last fragment of a record.
pub const LAST_FRAGMENT: u32 = 0x8000_0000;

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ip: [u8; 4]) -> Vec<u8> {
        call(7, PROGRAM, VERSION, PROC_ADD, &ip)
    }

    #[test]
    fn add_and_null() {
        assert_eq!(
            parse(&add([192, 0, 2, 9])),
            Parsed {
                xid: Some(7),
                call: Ok(Call::Add(Ipv4Addr::new(192, 0, 2, 9)))
            }
        );
        assert_eq!(
            parse(&call(8, PROGRAM, VERSION, 0, &[])).call,
            Ok(Call::Null)
        );
        // AUTH_SYS credentials (flavor 1, a 24-byte body) are skipped whole.
        let mut m = Vec::new();
        for w in [9u32, 0, 2, PROGRAM, 1, 1, 1, 24] {
            m.extend_from_slice(&w.to_be_bytes());
        }
        m.extend_from_slice(&[0; 24]);
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&[10, 0, 0, 1]);
        assert_eq!(parse(&m).call, Ok(Call::Add(Ipv4Addr::new(10, 0, 0, 1))));
    }

    #[test]
    fn refusals() {
        let r = |m: &[u8]| parse(m).call.unwrap_err();
        assert_eq!(
            r(&call(1, PROGRAM, 2, PROC_ADD, &[0; 16])),
            Refusal::ProgMismatch
        );
        assert_eq!(r(&call(1, 100000, 2, 0, &[])), Refusal::ProgUnavail);
        assert_eq!(r(&call(1, PROGRAM, 1, 2, &[])), Refusal::ProcUnavail);
        assert_eq!(r(&call(1, PROGRAM, 1, 1, &[1, 2, 3])), Refusal::GarbageArgs);
        assert_eq!(r(&call(1, PROGRAM, 1, 1, &[1; 8])), Refusal::GarbageArgs);
        assert_eq!(r(&call(1, PROGRAM, 1, 0, &[1; 4])), Refusal::GarbageArgs);
        let mut v3 = call(1, PROGRAM, 1, 1, &[1; 4]);
        v3[11] = 3;
        assert_eq!(r(&v3), Refusal::RpcMismatch);
        // A credential longer than the message, or than 400 bytes.
        let mut bad = call(1, PROGRAM, 1, 1, &[1; 4]);
        bad[31] = 200;
        assert_eq!(r(&bad), Refusal::BadCred);
        let mut big = call(1, PROGRAM, 1, 1, &[]);
        big[30] = 2; // 512 bytes
        big.extend_from_slice(&[0; 520]);
        assert_eq!(r(&big), Refusal::BadCred);
        // A reply, a stub, an oversized message: silence.
        let mut reply = add([1, 2, 3, 4]);
        reply[7] = 1;
        for m in [reply, vec![0; 7], vec![0; 20], vec![0; MAX_MESSAGE + 1]] {
            assert_eq!(parse(&m).call, Err(Refusal::Ignore));
            assert_eq!(refusal(parse(&m).xid, Refusal::Ignore), None);
        }
    }

    #[test]
    fn replies_as_libtirpc_reads_them() {
        assert_eq!(
            success(5, Some(AddStat::Perm)),
            [0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(success(5, None).len(), 24);
        let m = refusal(Some(5), Refusal::ProgMismatch).unwrap();
        assert_eq!(&m[20..], &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1]);
        let d = refusal(Some(5), Refusal::RpcMismatch).unwrap();
        assert_eq!(d.len(), 24);
    }
}
