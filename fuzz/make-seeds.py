#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) from the repository's fixtures.

Run from anywhere: python3 fuzz/make-seeds.py. Seeds are named by their SHA-1, like
libFuzzer's own corpus files, so re-running adds nothing twice.
"""
import glob, hashlib, json, os, struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def unescape(s):
    # The corpus escapes: \xNN, \t, \0, \\.
    out, i = bytearray(), 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n == "x" and i + 3 < len(s) + 1:
                out.append(int(s[i + 2:i + 4], 16)); i += 4; continue
            out += {"t": b"\t", "0": b"\0", "\\": b"\\"}.get(n, ("\\" + n).encode()); i += 2; continue
        out += c.encode(); i += 1
    return bytes(out)


lines = []
for tsv in sorted(glob.glob(os.path.join(ROOT, "fixtures", "corpus", "*.tsv"))):
    header = None
    for raw in open(tsv, encoding="utf-8"):
        raw = raw.rstrip("\n")
        if not raw or raw.startswith("#"):
            continue
        cols = raw.split("\t")
        if header is None:
            header = cols
            continue
        if "line" in header and len(cols) > header.index("line"):
            lines.append(unescape("\t".join(cols[header.index("line"):])))

# scan: each corpus line alone (visit mode varies), and the sample logs in pieces.
for i, l in enumerate(lines):
    put("scan", bytes([i % 3]) + l + b"\n")
for log in sorted(glob.glob(os.path.join(ROOT, "fixtures", "rig", "*.log"))):
    data = open(log, "rb").read().split(b"\n")
    for k in range(0, len(data), 20):
        put("scan", bytes([k % 3]) + b"\n".join(data[k:k + 20]))

# journal: the sample export as journalctl -o json lines, and corpus lines as entries.
def export_entries(path):
    entry = {}
    for raw in open(path, "rb").read().split(b"\n"):
        if not raw:
            if entry:
                yield entry
            entry = {}
            continue
        k, _, v = raw.partition(b"=")
        entry[k.decode()] = v.decode("utf-8", "replace")
    if entry:
        yield entry

entries = list(export_entries(os.path.join(ROOT, "fixtures", "rig", "sample-journal.export")))
for k in range(0, len(entries), 8):
    chunk = b"".join(json.dumps(e).encode() + b"\n" for e in entries[k:k + 8])
    put("journal", bytes([k % 3]) + chunk)
for i, l in enumerate(lines[:200]):
    e = {"__CURSOR": "s=1;i=%x" % i, "__REALTIME_TIMESTAMP": "1795255100000000",
         "_SYSTEMD_UNIT": "dovecot.service", "_COMM": "imap-login", "_UID": "0",
         "MESSAGE": l.decode("utf-8", "replace").split("dovecot: ", 1)[-1]}
    if i % 5 == 0:
        e["MESSAGE"] = list(l)
    put("journal", bytes([i % 3]) + json.dumps(e).encode() + b"\n")

# socketmap: requests as Postfix sends them.
def ns(b):
    return str(len(b)).encode() + b":" + b + b","
for req in [b"access connect:192.0.2.1", b"relay 192.0.2.1", b"access connect:ipv6:2001:DB8::7",
            b"access 192.0.2.2", b"access", b"x unknown"]:
    put("socketmap", ns(req))
put("socketmap", ns(b"access connect:192.0.2.1") * 3 + b"5:abc")
put("socketmap", b"01:a,")

# policy_request: Postfix policy delegation requests (SMTPD_POLICY_README's attributes).
def policy(**kv):
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "client_address": "192.0.2.1",
            "client_name": "mail.example.org", "helo_name": "mail.example.org",
            "sender": "a@example.org", "recipient": "b@example.net", "recipient_count": "0",
            "queue_id": "", "instance": "123.456.7", "size": "0", "sasl_username": "alice"}
    base.update(kv)
    return "".join(f"{k}={v}\n" for k, v in base.items() if v is not None).encode() + b"\n"
put("policy_request", policy())
put("policy_request", policy(protocol_state="END-OF-MESSAGE", queue_id="4Xyz1Q2abc") + policy(protocol_state="DATA"))
put("policy_request", policy(client_address="2001:DB8::7", sasl_username=""))
put("policy_request", policy(client_address="::ffff:192.0.2.9"))
put("policy_request", policy(client_address="unknown"))
put("policy_request", policy(request="other"))
put("policy_request", policy(protocol_state="CONNECT", recipient=None) + b"not an attribute\n\n")
put("policy_request", b"request=smtpd_access_policy\nrequest=smtpd_access_policy\n\n")
put("policy_request", b"request=smtpd_access_policy\r\nclient_address=192.0.2.1\r\n\r\n")

# events: the real Dovecot 2.3 and 2.4 events the parser's tests hold (one per seed, and all
# of them as one 2.4 unix-driver stream).
import re
events = re.findall(r'r#"(\{"event".*?\})"#', open(os.path.join(ROOT, "src/events/parse.rs")).read())
for e in events:
    put("events", e.encode())
put("events", "\n".join(events).encode() + b"\n")

# push_socket: the hook's request lines.
for req in [b"192.0.2.7\talice", b"::ffff:192.0.2.7\t", b"2001:DB8::1\tbob", b"example.org\tx",
            b"1.2.3.4 x\ty", b"192.0.2.7\tuser\twith\ttabs"]:
    put("push_socket", req + b"\n")

# auth_policy: query NUL body, as Dovecot 2.3/2.4 send them.
body = {"login": "alice", "pwhash": "ab", "remote": "192.0.2.7", "device_id": "",
        "protocol": "imap", "session_id": "abc", "proxy": "-", "nologin": "-", "success": True,
        "policy_reject": False, "tried_password": True}
for q, b in [("command=report", body), ("command=allow", body),
             ("command=report", dict(body, success=False)),
             ("command=report", dict(body, proxy="y")),
             ("command=report", dict(body, remote="::ffff:192.0.2.7")),
             ("x=1&command=report", {k: v for k, v in body.items() if k != "nologin"})]:
    put("auth_policy", q.encode() + b"\0" + json.dumps(b).encode())

# pg_row: payload NUL address NUL expiry(le i64) now(le u32).
for p, a, e in [('{"a":"192.0.2.7","e":1795258800}', "192.0.2.7", 1_700_003_600),
                ('{"a":"2001:db8::1","e":null}', "2001:db8::1", 1_700_000_100),
                ('{"a":"2001:DB8::1"}', "2001:DB8::1", 2**62), ("x", "::ffff:192.0.2.7", 1_700_000_000),
                ('{"a":"127.0.0.1"}', "127.0.0.1", 1_800_000_000)]:
    put("pg_row", p.encode() + b"\0" + a.encode() + b"\0" + struct.pack("<qI", e, 100))

# policy_rows: user NUL cap NUL rows of (kind u8, bucket le i64, count le i64).
b = 1_700_000_000 // 300
for u, c, rows in [("alice", "user_messages_per_hour", [(0, b, 3), (1, b - 200, 10)]),
                   ("bob", "x\"}{", [(0, b + 10**6, 2**62), (1, -2**63, -5)]),
                   ("c" * 300, "", [])]:
    put("policy_rows", u.encode() + b"\0" + c.encode() + b"\0" +
        b"".join(struct.pack("<Bqq", k, bb, n) for k, bb, n in rows))

# state_files: kind byte (0 checkpoint, 1 journal cursor, 2 sessions) and the file.
put("state_files", b"\0" + json.dumps({"path": "/var/log/mail.log", "files": [
    {"id": {"dev": 2049, "ino": 1234}, "offset": 4096, "fingerprint": {"len": 64, "hash": 99}}]}).encode())
put("state_files", b"\1" + json.dumps({"journal": "system", "cursor": "s=1;i=2"}).encode())
put("state_files", b"\2" + json.dumps([
    {"id": "abcDEF123+/x", "ip": "192.0.2.7", "pid": 2001, "login": 1795255000, "renewed": 1795255000},
    {"id": "zz", "ip": "2001:db8::1", "pid": None, "login": 1795200000, "renewed": 1795250000}]).encode())
put("state_files", b"\2[]")

# config: the packaged configuration and small variants.
conf = open(os.path.join(ROOT, "packaging", "dovegate.toml"), "rb").read()
put("config", conf)
for extra in [b'[grant]\nttl = "30m"\nsession_hold = "12h"\nexclude = ["10.0.0.0/8"]\n',
              b'[source]\njournal = "auto"\nlogs = ["/var/log/mail.log"]\n',
              b'[serve]\nsocketmap = "unix:/run/dovegate/socketmap"\n',
              b'[grant]\ntll = "5m"\n']:
    put("config", extra)

# drac_rpc: first byte: bit 0 the peer is allowed, bit 1 TCP (record-marked); then a call.
def drac_call(xid, prog=900101, vers=1, proc=1, args=bytes([203, 0, 113, 9]), cred=b""):
    pad = cred + b"\0" * (-len(cred) % 4)
    return (struct.pack(">IIIIII", xid, 0, 2, prog, vers, proc) + struct.pack(">II", 1 if cred else 0, len(cred)) + pad
            + struct.pack(">II", 0, 0) + args)


def marked(msg, last=True):
    return struct.pack(">I", (0x80000000 if last else 0) | len(msg)) + msg


for peer in (0, 1):
    put("drac_rpc", bytes([peer]) + drac_call(1))
    put("drac_rpc", bytes([peer | 2]) + marked(drac_call(2)))
put("drac_rpc", b"\1" + drac_call(3, cred=bytes(24)))
put("drac_rpc", b"\1" + drac_call(4, proc=0, args=b""))
put("drac_rpc", b"\1" + drac_call(5, vers=2, args=bytes(16)))
put("drac_rpc", b"\1" + drac_call(6, args=b"\1\2"))
put("drac_rpc", b"\3" + marked(drac_call(7)[:20], last=False) + marked(drac_call(7)[20:]))
put("drac_rpc", b"\1" + struct.pack(">II", 8, 1) + drac_call(8)[8:])
put("drac_rpc", b"\1GET / HTTP/1.0\r\n\r\n")
