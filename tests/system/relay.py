#!/usr/bin/env python3
"""Asks the container's real smtpd whether it relays for client addresses (stdlib only).

Usage: relay.py ADDR...   For each ADDR: connect from loopback (an authorised XCLIENT host),
XCLIENT ADDR=..., then RCPT TO a remote domain. Prints `ADDR CODE` per address (250: relay
allowed; 554: refused); the message is never sent (RSET).
"""
import smtplib
import sys

for addr in sys.argv[1:]:
    s = smtplib.SMTP("127.0.0.1", 25, timeout=20)
    s.ehlo("system-test.invalid")
    xaddr = f"IPV6:{addr}" if ":" in addr else addr
    code, msg = s.docmd("XCLIENT", f"ADDR={xaddr} NAME=[UNAVAILABLE]")
    if code != 220:
        print(f"{addr} XCLIENT-{code} {msg!r}")
        s.close()
        continue
    s.ehlo("system-test.invalid")
    s.mail("sender@example.org")
    code, msg = s.rcpt("someone@example.net")
    print(f"{addr} {code}" if code in (250, 554) else f"{addr} {code} {msg!r}")
    s.rset()
    s.quit()
