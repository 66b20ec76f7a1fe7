//! Registration with the host's rpcbind, which `dracauth()` asks for DRAC's port: RPCBIND
//! version 4 `SET` and `UNSET` (program 100000) over rpcbind's own unix socket. rpcbind
//! accepts SET and UNSET only from there (its `is_loopback` refuses every inet caller
//! unless it runs with `-L` or `-i`), and records the caller's uid as the owner, so a
//! daemon running as `dovegate` can replace and remove its own registrations.
//!
//! Blocking, with short timeouts: it runs on the blocking pool (registration, retries) or
//! once at stop.

use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::rpc;

/// rpcbind's socket (libtirpc's `_PATH_RPCBINDSOCK`).
pub const SOCKET: &str = "/run/rpcbind.sock";
/// How long one exchange with rpcbind may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The longest reply read from rpcbind (its whole list, on a busy NFS server a few KiB).
const MAX_REPLY: usize = 256 * 1024;

const RPCBPROG: u32 = 100_000;
const RPCBVERS4: u32 = 4;
const RPCBPROC_SET: u32 = 1;
const RPCBPROC_UNSET: u32 = 2;
const RPCBPROC_DUMP: u32 = 4;

/// The transports DRAC is registered for.
pub const NETIDS: [&str; 2] = ["udp", "tcp"];

/// An XDR string: its length, its bytes, padding to 4.
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// `struct rpcb { r_prog, r_vers, r_netid, r_addr, r_owner }`.
fn rpcb(netid: &str, addr: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&rpc::PROGRAM.to_be_bytes());
    out.extend_from_slice(&rpc::VERSION.to_be_bytes());
    string(&mut out, netid);
    string(&mut out, addr);
    // rpcbind takes the owner from the socket's credentials, not from here.
    string(&mut out, "dovegate");
    out
}

/// The universal address of an IPv4 socket: `h1.h2.h3.h4.p1.p2`.
pub fn uaddr(addr: SocketAddrV4) -> String {
    let p = addr.port();
    format!("{}.{}.{}", addr.ip(), p >> 8, p & 0xff)
}

/// One call over the unix socket (record marking), returning the result bytes after an
/// accepted, successful reply header.
fn exchange(socket: &Path, xid: u32, proc: u32, args: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let call = rpc::call(xid, RPCBPROG, RPCBVERS4, proc, args);
    let mut msg = (rpc::LAST_FRAGMENT | call.len() as u32)
        .to_be_bytes()
        .to_vec();
    msg.extend_from_slice(&call);
    s.write_all(&msg)?;
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut reply = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark)?;
        let mark = u32::from_be_bytes(mark);
        let len = (mark & !rpc::LAST_FRAGMENT) as usize;
        if reply.len() + len > MAX_REPLY {
            return Err(bad("rpcbind's reply is too long"));
        }
        let start = reply.len();
        reply.resize(start + len, 0);
        s.read_exact(&mut reply[start..])?;
        if mark & rpc::LAST_FRAGMENT != 0 {
            break;
        }
    }
    // xid, REPLY, MSG_ACCEPTED, verifier (flavor, empty body), SUCCESS.
    let word = |i: usize| {
        reply
            .get(i * 4..i * 4 + 4)
            .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
    };
    if word(0) != Some(xid) || word(1) != Some(1) {
        return Err(bad("rpcbind's reply does not answer the call"));
    }
    if word(2) != Some(0) || word(4) != Some(0) || word(5) != Some(0) {
        return Err(bad("rpcbind refused the call"));
    }
    Ok(reply[24..].to_vec())
}

fn xid() -> u32 {
    // Any value will do on a connection of our own; varied for rpcbind's logs.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos())
}

/// A boolean result (SET, UNSET).
fn yes(result: &[u8]) -> bool {
    result.get(..4) == Some(&[0, 0, 0, 1])
}

/// Registers DRAC for `netid` at `addr`, replacing any earlier registration of it (a
/// daemon that died without its UNSET leaves one behind, as `rpc.dracd` did).
pub fn register(socket: &Path, netid: &str, addr: SocketAddrV4) -> io::Result<()> {
    let args = rpcb(netid, &uaddr(addr));
    // Refused when nothing is registered, or another user's registration: SET says.
    exchange(socket, xid(), RPCBPROC_UNSET, &rpcb(netid, ""))?;
    if yes(&exchange(socket, xid(), RPCBPROC_SET, &args)?) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "rpcbind refused to register program {} version {} over {netid}: another user's program holds it (is rpc.dracd still running? stop it)",
            rpc::PROGRAM,
            rpc::VERSION
        )))
    }
}

/// Removes DRAC's registration for `netid`.
pub fn unregister(socket: &Path, netid: &str) -> io::Result<bool> {
    Ok(yes(&exchange(
        socket,
        xid(),
        RPCBPROC_UNSET,
        &rpcb(netid, ""),
    )?))
}

/// Whether rpcbind's list (DUMP) has DRAC registered for `netid` at exactly `uaddr`.
/// (GETADDR would not do: over the unix socket it answers for the `local` transport.)
pub fn registered(socket: &Path, netid: &str, uaddr: &str) -> io::Result<bool> {
    Ok(registrations(socket)?
        .iter()
        .any(|(n, a)| n == netid && a == uaddr))
}

/// DRAC's registrations in rpcbind's list: (netid, universal address) of each.
pub fn registrations(socket: &Path) -> io::Result<Vec<(String, String)>> {
    let r = exchange(socket, xid(), RPCBPROC_DUMP, &[])?;
    Ok(dump(&r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed DUMP reply"))?
        .into_iter()
        .filter(|e| e.0 == rpc::PROGRAM && e.1 == rpc::VERSION)
        .map(|e| (e.2, e.3))
        .collect())
}

/// rpcbind's list: (program, version, netid, address) of each entry.
fn dump(mut r: &[u8]) -> Option<Vec<(u32, u32, String, String)>> {
    fn word(r: &mut &[u8]) -> Option<u32> {
        let (w, rest) = r.split_first_chunk::<4>()?;
        *r = rest;
        Some(u32::from_be_bytes(*w))
    }
    fn text(r: &mut &[u8]) -> Option<String> {
        let len = word(r)? as usize;
        let bytes = r.get(..len)?;
        let s = String::from_utf8_lossy(bytes).into_owned();
        *r = r.get(len.div_ceil(4) * 4..)?;
        Some(s)
    }
    let mut out = Vec::new();
    while word(&mut r)? == 1 {
        let (prog, vers) = (word(&mut r)?, word(&mut r)?);
        let (netid, addr, _owner) = (text(&mut r)?, text(&mut r)?, text(&mut r)?);
        out.push((prog, vers, netid, addr));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_as_rpcbind_decodes_them() {
        assert_eq!(uaddr("0.0.0.0:2049".parse().unwrap()), "0.0.0.0.8.1");
        let a = rpcb("udp", "0.0.0.0.8.1");
        // prog, vers, "udp" (3 + 1 pad), "0.0.0.0.8.1" (11 + 1), "dovegate" (8)
        assert_eq!(a.len(), 8 + 8 + 16 + 12);
        assert_eq!(&a[..8], &[0, 0x0d, 0xbc, 0x05, 0, 0, 0, 1]);
        assert_eq!(&a[8..16], &[0, 0, 0, 3, b'u', b'd', b'p', 0]);
        let mut list = vec![0, 0, 0, 1];
        list.extend_from_slice(&a);
        list.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            dump(&list),
            Some(vec![(rpc::PROGRAM, 1, "udp".into(), "0.0.0.0.8.1".into())])
        );
        assert_eq!(dump(&list[..20]), None);
    }
}
