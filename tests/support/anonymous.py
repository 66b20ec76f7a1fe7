#!/usr/bin/env python3
"""Logs in with SASL ANONYMOUS (as a public-folders site allows), then logs out.

Usage: anonymous.py PORT ADDRESS
Connects from the trusted source 127.0.0.9 and forwards ADDRESS with ID
x-originating-ip, so Dovecot logs `method=ANONYMOUS, rip=ADDRESS`. Exits 0 when logged in.
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
typ, data = c.xatom("ID", '("x-originating-ip" "%s")' % ADDRESS)
assert typ == "OK", (typ, data)
typ, data = c.authenticate("ANONYMOUS", lambda challenge: b"guest")
assert typ == "OK", (typ, data)
c.logout()
