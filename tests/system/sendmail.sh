# sendmail (Debian 12, sendmail-bin 8.17) asking dovegate's socketmap through the access map,
# with the README's .mc line (sourced by scripts/system-test; runs in a subshell). No
# Dovecot here: the grant is made with `dovegate grant`; clients connect from addresses
# configured on the container's loopback (sendmail has no XCLIENT).
SENDMAIL_PKGS=(systemd systemd-sysv dbus sendmail-bin sendmail-cf m4 python3 iproute2 liblmdb0)

suite_sendmail() {
    NAME=$1
    B() { box "$NAME" "$@"; }
    ok() { log "$NAME: ok: $*"; }
    local root R out
    root=$(root_cached bookworm "${SENDMAIL_PKGS[@]}")
    box_up "$NAME" "$root"
    R="$RUN/$NAME/root"
    cp "$DEB1" "$R/root/dovegate-1.deb"; cp "$SYS/relay_from.py" "$R/root/"
    B dpkg -i /root/dovegate-1.deb > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: dpkg -i failed"; }
    # The README's access map line; the rest only makes the test deterministic without DNS
    # (names from /etc/hosts, no interface probing: the test's client addresses are local).
    python3 - "$R/etc/mail/sendmail.mc" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r"^FEATURE\(`access_db'.*$", "FEATURE(`access_db', `socket -T<TMPF> unix:/run/dovegate/socketmap')dnl", s, count=1, flags=re.M)
extra = ("define(`confDOMAIN_NAME', `mx.system-test.invalid')dnl\n"
         "define(`confSERVICE_SWITCH_FILE', `/etc/mail/service.switch-nodns')dnl\n"
         "define(`confDONT_PROBE_INTERFACES', `True')dnl\n"
         "FEATURE(`accept_unresolvable_domains')dnl\n")
i = s.index("FEATURE(`access_db'")
open(p, "w").write(s[:i] + extra + s[i:])
PY
    printf '203.0.113.45 client45.system-test.invalid\n203.0.113.99 client99.system-test.invalid\n' >> "$R/etc/hosts"
    B sh -c 'cd /etc/mail && m4 sendmail.mc > sendmail.cf'
    grep -q '^Kaccess socket -T<TMPF> unix:/run/dovegate/socketmap' "$R/etc/mail/sendmail.cf" || die "$NAME: no Kaccess socket line in sendmail.cf"
    B ip addr add 203.0.113.45/32 dev lo
    B ip addr add 203.0.113.99/32 dev lo
    printf '%s\n' '[source]' 'journal = true' 'logs = []' \
        '[serve]' 'socketmap = "unix:/run/dovegate/socketmap"' > "$R/etc/dovegate/dovegate.d/50-system-test.toml"
    B systemctl enable --now dovegate 2>/dev/null
    [ "$(B systemctl is-active dovegate)" = active ] || die "$NAME: dovegate not active"
    B dovegate grant 203.0.113.45 >/dev/null
    B systemctl restart dovegate   # the daemon reads the map at start (else within a minute)
    B systemctl restart sendmail
    wait_until 60 "$NAME: sendmail listening" B python3 -c 'import socket; socket.create_connection(("127.0.0.1", 25), 5)' \
        || die "$NAME: sendmail did not listen: $(B journalctl -u sendmail -n 10 --no-pager)"
    out=$(B python3 /root/relay_from.py 203.0.113.45 203.0.113.99)
    echo "$out" | grep -qx '203.0.113.45 250' && echo "$out" | grep -qx '203.0.113.99 550' \
        || die "$NAME: sendmail: expected 250 for the granted and 550 for the other client: $out"
    B dovegate revoke 203.0.113.45 >/dev/null
    B systemctl restart dovegate
    out=$(B python3 /root/relay_from.py 203.0.113.45)
    [ "$out" = "203.0.113.45 550" ] || die "$NAME: sendmail relays after the revoke: $out"
    ok "sendmail $(B dpkg-query -W -f='${Version}' sendmail-bin) via socketmap access map: relay 250 for the granted 203.0.113.45, 550 for 203.0.113.99, 550 after revoke"
    box_down "$RUN/$NAME"
}
