#!/usr/bin/env python3
"""Malformed and forged DRAC messages for tests/drac.rs, sent from inside its namespace.

    datagrams.py HOST PORT

Sends each message of CASES over UDP, then a NULL call; prints one line per reply,
`NAME HEX` (replies come back in order on loopback, and the NULL call's reply comes last,
so a message with no line got no reply). Then the same over TCP: a record per connection,
printing `tcp-NAME HEX` or `tcp-NAME closed`. Exits 0; the test judges the lines.
"""
import socket
import struct
import sys

PROG, VERS, ADD = 900101, 1, 1
GRANTED_IF_BROKEN = bytes([203, 0, 113, 66])


def call(xid, prog=PROG, vers=VERS, proc=ADD, args=GRANTED_IF_BROKEN, rpcvers=2, cred=b""):
    head = struct.pack(">IIIIII", xid, 0, rpcvers, prog, vers, proc)
    auth = struct.pack(">II", 0, len(cred)) + cred
    return head + auth + struct.pack(">II", 0, 0) + args


CASES = [
    ("version2", call(1, vers=2, args=bytes(16))),
    ("otherprog", call(2, prog=100003)),
    ("proc7", call(3, proc=7)),
    ("shortarg", call(4, args=b"\xcb\x00")),
    ("longarg", call(5, args=GRANTED_IF_BROKEN * 2)),
    ("rpcv3", call(6, rpcvers=3)),
    ("badcred", call(7)[:28] + struct.pack(">I", 4000) + GRANTED_IF_BROKEN),
    ("reply", struct.pack(">II", 8, 1) + call(8)[8:]),
    ("stub", b"\x00\x00"),
    ("junk", b"GET / HTTP/1.0\r\n\r\n" + GRANTED_IF_BROKEN),
    ("huge", call(9, args=GRANTED_IF_BROKEN * 400)),
]
NULL = ("null", call(99, proc=0, args=b""))


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(10)
    for _, msg in CASES + [NULL]:
        u.sendto(msg, (host, port))
    while True:
        data, _ = u.recvfrom(65536)
        xid = struct.unpack(">I", data[:4])[0]
        name = next((n for n, m in CASES + [NULL] if m[:4] == data[:4]), "?%d" % xid)
        print(name, data.hex(), flush=True)
        if name == "null":
            break
    for name, msg in CASES:
        t = socket.create_connection((host, port), timeout=10)
        t.sendall(struct.pack(">I", 0x80000000 | len(msg)) + msg)
        try:
            data = t.recv(65536)
        except ConnectionResetError:
            data = b""
        print("tcp-" + name, data.hex() if data else "closed", flush=True)
        t.close()


main()
