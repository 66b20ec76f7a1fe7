#!/usr/bin/env python3
"""Drives real IMAP and POP3 sessions against the test Dovecot (stdlib only).

Usage: logins.py PORTBASE   (imap PORTBASE, imaps +1, pop3 +2, pop3s +3)
       logins.py PORTBASE time N ADDRESS   N successful IMAP logins forwarded for ADDRESS;
                                           prints {"secs": [...per login...]}

Successful logins from loopback (127.0.0.1, ::1: the policy excludes them) and, from the
trusted source 127.0.0.9, as public clients: IMAP `ID ("x-originating-ip" ...)` and POP3
`XCLIENT ADDR=...` make Dovecot log the forwarded address as rip=. Also failed and aborted
attempts from other forwarded addresses, which must grant nothing. Prints one JSON object:
{"granted": [...addresses that must be granted...], "refused": [...], "failures": N}.
Exits 1 if any scenario had an unexpected outcome.
"""
import imaplib
import json
import poplib
import socket
import ssl
import sys

BASE = int(sys.argv[1])
IMAP, IMAPS, POP3, POP3S = BASE, BASE + 1, BASE + 2, BASE + 3
TRUSTED = "127.0.0.9"
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


def connect_from(host, port, source):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(20)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


class Imap(imaplib.IMAP4):
    def __init__(self, host, port, source=None):
        self._source = source
        super().__init__(host, port, timeout=20)

    def _create_socket(self, timeout):
        return connect_from(self.host, self.port, self._source)


class ImapTls(imaplib.IMAP4_SSL):
    def __init__(self, host, port, source=None):
        self._source = source
        super().__init__(host, port, ssl_context=CTX, timeout=20)

    def _create_socket(self, timeout):
        return CTX.wrap_socket(connect_from(self.host, self.port, self._source), server_hostname=self.host)


class Pop(poplib.POP3):
    def __init__(self, host, port, source=None):
        self._source = source
        super().__init__(host, port, timeout=20)

    def _create_socket(self, timeout):
        return connect_from(self.host, self.port, self._source)


def imap_id(conn, forwarded):
    typ, data = conn.xatom("ID", '("x-originating-ip" "%s" "x-originating-port" "40143")' % forwarded)
    assert typ == "OK", (typ, data)


def login_ok(fn):
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - any failure is a wrong outcome
        print(f"scenario {fn.__name__} failed: {e!r}", file=sys.stderr)
        return False


if len(sys.argv) > 2 and sys.argv[2] == "time":
    import time
    secs = []
    for _ in range(int(sys.argv[3])):
        t = time.monotonic()
        c = Imap("127.0.0.1", IMAP, TRUSTED)
        imap_id(c, sys.argv[4])
        c.login("alice", "alice-pass")
        c.logout()
        secs.append(time.monotonic() - t)
    print(json.dumps({"secs": secs}))
    sys.exit(0)

granted, refused, wrong = [], [], 0


def expect(ok, name):
    global wrong
    if not ok:
        wrong += 1
        print(f"unexpected outcome: {name}", file=sys.stderr)


# --- successful logins that the policy must exclude (loopback) ---------------------------
def imap_loopback_v4():
    c = Imap("127.0.0.1", IMAP)
    c.login("alice", "alice-pass")
    c.logout()


def imap_authenticate_plain_v6():
    c = Imap("::1", IMAP)
    c.authenticate("PLAIN", lambda _: b"\0bob\0bob-pass")
    c.logout()


def pop3_loopback_v6():
    c = Pop("::1", POP3)
    c.user("bob")
    c.pass_("bob-pass")
    c.quit()


def imaps_loopback():
    c = ImapTls("127.0.0.1", IMAPS)
    c.login("alice", "alice-pass")
    c.logout()


for f in (imap_loopback_v4, imap_authenticate_plain_v6, pop3_loopback_v6, imaps_loopback):
    expect(login_ok(f), f.__name__)
refused += ["127.0.0.1", "::1"]


# --- forwarded public clients: must be granted --------------------------------------------
def forwarded_imap(addr, tls=False, starttls=False, user="alice", password="alice-pass"):
    def run():
        if tls:
            c = ImapTls("127.0.0.1", IMAPS, TRUSTED)
        else:
            c = Imap("127.0.0.1", IMAP, TRUSTED)
            if starttls:
                c.starttls(ssl_context=CTX)
        imap_id(c, addr)
        c.login(user, password)
        c.logout()
    run.__name__ = f"imap_forwarded_{addr}"
    return run


def forwarded_pop3(addr, user="bob", password="bob-pass", tls=False):
    def run():
        c = Pop("127.0.0.1", POP3, TRUSTED)
        resp = c._shortcmd(f"XCLIENT ADDR={addr} PORT=40110")
        assert resp.startswith(b"+OK"), resp
        if tls:
            c.stls(CTX)
        c.user(user)
        c.pass_(password)
        c.quit()
    run.__name__ = f"pop3_forwarded_{addr}"
    return run


for addr, f in [
    ("203.0.113.45", forwarded_imap("203.0.113.45")),
    ("2001:db8::25", forwarded_imap("2001:db8::25", tls=True)),
    ("192.0.2.200", forwarded_imap("192.0.2.200", starttls=True)),
    ("198.51.100.23", forwarded_pop3("198.51.100.23")),
    ("2001:db8:1:2::7", forwarded_pop3("2001:db8:1:2::7", tls=True)),
]:
    expect(login_ok(f), f.__name__)
    granted.append(addr)


# --- failed and aborted attempts: must grant nothing ----------------------------------------
def expect_failure(fn, name):
    try:
        fn()
        expect(False, name + " (login unexpectedly succeeded)")
    except (imaplib.IMAP4.error, poplib.error_proto):
        pass


expect_failure(forwarded_imap("203.0.113.66", password="wrong"), "imap wrong password")
expect_failure(forwarded_pop3("2001:db8:bad::1", password="wrong"), "pop3 wrong password")
expect_failure(forwarded_imap("203.0.113.67", user="nobody-here"), "imap unknown user")
refused += ["203.0.113.66", "2001:db8:bad::1", "203.0.113.67"]


def aborted_after_id():
    c = Imap("127.0.0.1", IMAP, TRUSTED)
    imap_id(c, "203.0.113.77")
    c.shutdown()


def aborted_pop3_greeting():
    c = Pop("127.0.0.1", POP3, TRUSTED)
    c._shortcmd("XCLIENT ADDR=198.51.100.78 PORT=1")
    c.close()


def aborted_tls_handshake():
    s = connect_from("127.0.0.1", IMAPS, TRUSTED)
    s.close()


for f in (aborted_after_id, aborted_pop3_greeting, aborted_tls_handshake):
    expect(login_ok(f), f.__name__)
refused += ["203.0.113.77", "198.51.100.78"]

print(json.dumps({"granted": granted, "refused": refused, "failures": 3}))
sys.exit(1 if wrong else 0)
