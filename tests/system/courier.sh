# A qmail-style chain with Courier's SMTP server (Debian 12, courier-mta): ucspi-tcp's
# tcpserver runs `dovegate relay-check` as the README writes it, before dropping to
# Courier's user, then courieresmtpd, which relays when RELAYCLIENT is present (Courier's
# esmtp module refuses other clients' foreign recipients: 513 Relaying denied). The
# default, empty RELAYCLIENT is what it is given. No Dovecot and no network: the grant is
# made with `dovegate grant` (relay-check reads the map; no daemon needed), and clients
# connect from addresses on the container's loopback. Sourced by scripts/system-test.
COURIER_PKGS=(systemd systemd-sysv dbus courier-mta ucspi-tcp liblmdb0 python3 iproute2)

suite_courier() {
    NAME=$1
    B() { box "$NAME" "$@"; }
    ok() { log "$NAME: ok: $*"; }
    local root R got t0=$SECONDS
    root=$(root_cached bookworm "${COURIER_PKGS[@]}")
    box_up "$NAME" "$root"
    R="$RUN/$NAME/root"
    cp "$DEB1" "$R/root/dovegate-1.deb"; cp "$SYS/relay_from.py" "$R/root/"
    B dpkg -i /root/dovegate-1.deb > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: dpkg -i failed"; }
    B dovegate grant 203.0.113.45 >/dev/null
    B ip addr add 203.0.113.45/32 dev lo
    B ip addr add 203.0.113.99/32 dev lo
    # courieresmtpd with Courier's own settings (couriertcpd exports /etc/courier/esmtpd the
    # same way), less the DNS checks (no network here), as Courier's user.
    cat > "$R/root/courieresmtpd-chain" <<'SH'
#!/bin/sh
set -a
. /etc/courier/esmtpd
BOFHCHECKDNS=0
TARPIT=0
exec setpriv --reuid=courier --regid=courier --init-groups /usr/sbin/courieresmtpd
SH
    chmod 755 "$R/root/courieresmtpd-chain"
    B systemd-run --unit=dg-smtp-chain --quiet tcpserver -H -R -l 0 127.0.0.1 2525 \
        dovegate relay-check /root/courieresmtpd-chain
    wait_until 30 "$NAME: tcpserver listening" B python3 -c 'import socket; socket.create_connection(("127.0.0.1", 2525), 5)' \
        || die "$NAME: tcpserver did not listen: $(B journalctl -u dg-smtp-chain -n 10 --no-pager)"
    got=$(B env SMTP_PORT=2525 python3 /root/relay_from.py 203.0.113.45 203.0.113.99 | tr '\n' ' ')
    case "$got" in
        "203.0.113.45 250 203.0.113.99 513 "*) ;;
        *) die "$NAME: courieresmtpd behind relay-check: expected 250 for the granted and 513 for the other client: $got $(B journalctl -u dg-smtp-chain -n 10 --no-pager)" ;;
    esac
    ok "courier $(B dpkg-query -W -f='${Version}' courier-mta): tcpserver + dovegate relay-check + courieresmtpd: relay 250 for the granted 203.0.113.45 (RELAYCLIENT empty), 513 for 203.0.113.99 ($((SECONDS - t0))s)"
    box_down "$RUN/$NAME"
}
