#!/usr/bin/env python3
"""An IMAP client that stays connected, as Thunderbird does (stdlib only).

Usage: idle.py PORT ADDRESS
Connects from the trusted source 127.0.0.9, forwards ADDRESS with ID x-originating-ip,
logs in as alice, selects INBOX and enters IDLE. Prints `idling` once in IDLE. Then reads
commands from stdin, one per line: `logout` ends IDLE and logs out (Dovecot logs
`Disconnected: Logged out`); end of input does the same. Exits 0 when done.
"""
import imaplib
import socket
import sys

PORT, ADDRESS = int(sys.argv[1]), sys.argv[2]


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(60)
        s.bind(("127.0.0.9", 0))
        s.connect((self.host, self.port))
        return s


c = Imap("127.0.0.1", PORT, timeout=60)
typ, data = c.xatom("ID", '("x-originating-ip" "%s" "x-originating-port" "40143")' % ADDRESS)
assert typ == "OK", (typ, data)
c.login("alice", "alice-pass")
c.select("INBOX")
c.send(b"i1 IDLE\r\n")
line = c.readline()
assert line.startswith(b"+"), line
print("idling", flush=True)
for cmd in sys.stdin:
    if cmd.strip() == "logout":
        break
c.send(b"DONE\r\n")
while not c.readline().startswith(b"i1 "):
    pass
# imaplib did not see the raw IDLE: finish with raw commands too.
c.send(b"i2 LOGOUT\r\n")
while True:
    line = c.readline()
    if not line or line.startswith(b"i2 "):
        break
c.shutdown()

