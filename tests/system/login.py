#!/usr/bin/env python3
"""One successful login for a forwarded client address (stdlib only).

Usage: login.py PORTBASE imap|pop3 ADDR [USER PASS]  (imap PORTBASE, pop3 PORTBASE + 2) From the trusted proxy address 127.0.0.9:
IMAP `ID ("x-originating-ip" ADDR)` or POP3 `XCLIENT ADDR=...`, then a login as alice.
Exits 1 if the login fails.
"""
import imaplib
import poplib
import socket
import sys

proto, addr = sys.argv[2], sys.argv[3]
port = int(sys.argv[1]) + (2 if proto == "pop3" else 0)
user, password = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ("alice", "alice-pass")


def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    s.bind(("127.0.0.9", 0))
    s.connect(("127.0.0.1", port))
    return s


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return sock()


class Pop(poplib.POP3):
    def _create_socket(self, timeout):
        return sock()


if proto == "imap":
    c = Imap("127.0.0.1", port, timeout=20)
    typ, data = c.xatom("ID", '("x-originating-ip" "%s" "x-originating-port" "40143")' % addr)
    assert typ == "OK", (typ, data)
    c.login(user, password)
    c.logout()
else:
    c = Pop("127.0.0.1", port, timeout=20)
    resp = c._shortcmd(f"XCLIENT ADDR={addr} PORT=40110")
    assert resp.startswith(b"+OK"), resp
    c.user(user)
    c.pass_(password)
    c.quit()
