# Exim (Debian 12, exim4-daemon-heavy 4.96) asking dovegate's socketmap through
# ${readsocket} in acl_check_rcpt, with the README's ACL (sourced by scripts/system-test;
# runs in a subshell). No Dovecot and no network: the grants are made with `dovegate
# grant`, and `exim4 -bh ADDRESS` runs the ACLs of an SMTP session from that address
# (Debian's configuration, with the README's ACL file run first through MAIN_ACL_CHECK_RCPT).
# Then once through the running Exim daemon (its ACLs run as Debian-exim), from an
# address on the container's loopback. Then the README's PostgreSQL ACL, against a
# PostgreSQL in the container that dovegate writes its grants to.
EXIM_PKGS=(systemd systemd-sysv dbus exim4-daemon-heavy liblmdb0 python3 iproute2 postgresql)

# exim_rcpt NAME ADDRESS RCPT: the RCPT reply code for RCPT from a session from ADDRESS.
exim_rcpt() {
    printf 'HELO client.system-test.invalid\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<%s>\r\nQUIT\r\n' "$3" \
        | box "$1" exim4 -bh "$2" 2>/dev/null \
        | awk '/^[0-9][0-9][0-9] / {n++; if (n == 4) {print $1; exit}}'
}

suite_exim() {
    NAME=$1
    B() { box "$NAME" "$@"; }
    ok() { log "$NAME: ok: $*"; }
    local root R got want t0=$SECONDS
    root=$(root_cached bookworm "${EXIM_PKGS[@]}")
    box_up "$NAME" "$root"
    R="$RUN/$NAME/root"
    cp "$DEB1" "$R/root/dovegate-1.deb"; cp "$SYS/relay_from.py" "$R/root/"
    B dpkg -i /root/dovegate-1.deb > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: dpkg -i failed"; }
    printf '%s\n' '[source]' 'journal = true' 'logs = []' \
        '[serve]' 'socketmap = "unix:/run/dovegate/socketmap"' > "$R/etc/dovegate/dovegate.d/50-system-test.toml"
    # The README's ACL, taken from the README itself (from its first line to the fence).
    awk '/^# \/etc\/exim4\/dovegate-rcpt.acl/ {on=1} on && /^```/ {exit} on' "$REPO/README.md" > "$R/etc/exim4/dovegate-rcpt.acl"
    grep -q readsocket "$R/etc/exim4/dovegate-rcpt.acl" || die "$NAME: no ACL found in README.md"
    echo 'MAIN_ACL_CHECK_RCPT = /etc/exim4/dovegate-rcpt.acl' >> "$R/etc/exim4/exim4.conf.localmacros"
    B update-exim4.conf || die "$NAME: update-exim4.conf failed"
    B systemctl enable --now dovegate 2>/dev/null
    [ "$(B systemctl is-active dovegate)" = active ] || die "$NAME: dovegate not active"
    B dovegate grant 203.0.113.45 >/dev/null
    B dovegate grant 2001:db8::45 >/dev/null
    B systemctl restart dovegate   # the daemon reads the map at start (else within a minute)
    wait_until 30 "$NAME: socketmap" B test -S /run/dovegate/socketmap || die "$NAME: no socketmap socket"
    got="" want="250 250 550 550 250"
    for c in "203.0.113.45 someone@example.net" "2001:db8::45 someone@example.net" \
             "203.0.113.99 someone@example.net" "2001:db8::99 someone@example.net" \
             "203.0.113.99 postmaster@localhost"; do
        got="$got $(exim_rcpt "$NAME" $c)"
    done
    [ "${got# }" = "$want" ] || die "$NAME: exim -bh RCPT codes: got ${got# }, want $want (granted v4, v6; others v4, v6; local)"
    # The daemon's ACLs run as Debian-exim: a real SMTP session through it.
    B ip addr add 203.0.113.45/32 dev lo
    B ip addr add 203.0.113.99/32 dev lo
    B systemctl restart exim4
    wait_until 60 "$NAME: exim listening" B python3 -c 'import socket; socket.create_connection(("127.0.0.1", 25), 5)' \
        || die "$NAME: exim did not listen: $(B journalctl -u exim4 -n 10 --no-pager)"
    got=$(B python3 /root/relay_from.py 203.0.113.45 203.0.113.99 | tr '\n' ' ')
    [ "$got" = "203.0.113.45 250 203.0.113.99 550 " ] || die "$NAME: exim daemon: expected 250 for the granted and 550 for the other client: $got"
    B systemctl stop dovegate
    got="" want="451 451 250"
    for c in "203.0.113.45 someone@example.net" "203.0.113.99 someone@example.net" \
             "203.0.113.99 postmaster@localhost"; do
        got="$got $(exim_rcpt "$NAME" $c)"
    done
    [ "${got# }" = "$want" ] || die "$NAME: with dovegate stopped: got ${got# }, want $want (relay deferred, local accepted)"
    exim_pgsql "$NAME"
    ok "exim $(B dpkg-query -W -f='${Version}' exim4-daemon-heavy) via readsocket ACL: relay 250 for granted 203.0.113.45 and 2001:db8::45 (exim -bh and the daemon), 550 for others, local 250; dovegate stopped: relay 451, local 250 ($((SECONDS - t0))s)"
    box_down "$RUN/$NAME"
}

# exim_pgsql NAME: the README's pgsql ACL; dovegate writes to a PostgreSQL in the container
# (password over loopback TCP, so that root's `dovegate grant` and the daemon both log in),
# Exim reads with a role that may only SELECT.
exim_pgsql() {
    local NAME=$1 R="$RUN/$1/root" got want
    B() { box "$NAME" "$@"; }
    PSQL() { B runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qAt "$@"; }
    B systemctl start postgresql
    wait_until 60 "$NAME: postgresql" PSQL -c 'select 1' || die "$NAME: postgresql did not start"
    PSQL -c "CREATE ROLE dovegate LOGIN PASSWORD 'dg-secret'" -c 'CREATE DATABASE mail OWNER dovegate' \
        -c "CREATE ROLE exim_ro LOGIN PASSWORD 'ro-secret'" >/dev/null || die "$NAME: roles"
    printf 'postgresql://dovegate:dg-secret@127.0.0.1/mail\n' > "$R/etc/dovegate/postgres.url"
    B chown dovegate: /etc/dovegate/postgres.url
    B chmod 0600 /etc/dovegate/postgres.url
    printf '%s\n' '[store]' 'postgres_url_file = "/etc/dovegate/postgres.url"' \
        > "$R/etc/dovegate/dovegate.d/60-system-test-pgsql.toml"
    B systemctl start dovegate
    wait_until 60 "$NAME: dovegate's table" PSQL -d mail -c 'select 1 from public.dovegate_grants limit 1' \
        || die "$NAME: dovegate created no table: $(B journalctl -u dovegate -n 20 --no-pager)"
    PSQL -d mail -c 'GRANT SELECT ON public.dovegate_grants TO exim_ro' >/dev/null || die "$NAME: grant select"
    awk '/^# \/etc\/exim4\/dovegate-rcpt-pgsql\.acl/ {on=1} on && /^```/ {exit} on' "$REPO/README.md" \
        > "$R/etc/exim4/dovegate-rcpt-pgsql.acl"
    grep -q 'lookup pgsql' "$R/etc/exim4/dovegate-rcpt-pgsql.acl" || die "$NAME: no pgsql ACL found in README.md"
    sed -i '/^MAIN_ACL_CHECK_RCPT/d' "$R/etc/exim4/exim4.conf.localmacros"
    printf '%s\n' 'hide pgsql_servers = 127.0.0.1/mail/exim_ro/ro-secret' \
        'MAIN_ACL_CHECK_RCPT = /etc/exim4/dovegate-rcpt-pgsql.acl' >> "$R/etc/exim4/exim4.conf.localmacros"
    B update-exim4.conf || die "$NAME: update-exim4.conf (pgsql) failed"
    B dovegate grant 203.0.113.46 >/dev/null || die "$NAME: dovegate grant with [store]"
    [ "$(PSQL -d mail -c "select count(*) from public.dovegate_grants where address = '203.0.113.46'")" = 1 ] \
        || die "$NAME: the grant did not reach PostgreSQL"
    got="" want="250 550 250"
    for c in "203.0.113.46 someone@example.net" "203.0.113.99 someone@example.net" \
             "203.0.113.99 postmaster@localhost"; do
        got="$got $(exim_rcpt "$NAME" $c)"
    done
    [ "${got# }" = "$want" ] || die "$NAME: pgsql ACL: got ${got# }, want $want (granted, other, local)"
    B dovegate revoke 203.0.113.46 >/dev/null || die "$NAME: dovegate revoke with [store]"
    got=$(exim_rcpt "$NAME" 203.0.113.46 someone@example.net)
    [ "$got" = 550 ] || die "$NAME: pgsql ACL after dovegate revoke: got $got, want 550"
    B dovegate grant 203.0.113.46 >/dev/null
    # Debian's postgresql.service only groups the clusters: stop them, and wait until the
    # server no longer answers (the stop of postgresql@15-main is its own job).
    B systemctl stop postgresql 'postgresql@*'
    wait_until 60 "$NAME: postgresql stopped" B sh -c '! pg_isready -q -h 127.0.0.1' \
        || die "$NAME: postgresql still answers after its stop"
    got="" want="451 250"
    for c in "203.0.113.46 someone@example.net" "203.0.113.99 postmaster@localhost"; do
        got="$got $(exim_rcpt "$NAME" $c)"
    done
    [ "${got# }" = "$want" ] || die "$NAME: pgsql ACL with the database stopped: got ${got# }, want $want (relay deferred, local accepted)"
    log "$NAME: ok: exim via the README's pgsql ACL: 250 granted, 550 others and after revoke, 451 with PostgreSQL stopped"
}
