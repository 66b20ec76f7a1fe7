#!/usr/bin/env python3
"""Asks the container's real MTA on 127.0.0.1:25 ($SMTP_PORT) whether it relays, connecting FROM each
client address (configured on the container's loopback). Prints `ADDR CODE` per address
(250: relay allowed; 550: refused). The message is never sent (RSET). stdlib only."""
import os
import smtplib
import sys

port = int(os.environ.get("SMTP_PORT", "25"))

for addr in sys.argv[1:]:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(addr, 0))
    s.ehlo("system-test.invalid")
    s.mail("sender@example.org")
    code, msg = s.rcpt("someone@example.net")
    print(f"{addr} {code}" if code in (250, 550) else f"{addr} {code} {msg!r}")
    s.rset()
    s.quit()
