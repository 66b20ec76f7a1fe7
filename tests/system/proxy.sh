# Dovecot as a proxy in front of a second Dovecot (sourced by scripts/system-test): two more
# instances in the container, each with its own base_dir and log_path file; the proxy's
# passdb sends each user on with `proxy=y host=127.0.0.1 port=...`. Collects the real proxy
# success, failure and disconnect lines into $LINES/NAME-proxy.log (printed, for the corpus).
BACKEND=10243 PROXY=10343   # imap, +1 imaps, +2 pop3, +3 pop3s

proxy_conf() {   # proxy_conf TEMPLATE PORT DIR: the test's Dovecot configuration, moved
    sed -e "s/@PORT@/$2/;s/@PORT1@/$(($2 + 1))/;s/@PORT2@/$(($2 + 2))/;s/@PORT3@/$(($2 + 3))/" \
        -e "s|/etc/dovecot/users|$3/users|" \
        -e "s|^login_trusted_networks = .*|login_trusted_networks = 127.0.0.0/8|" "$SYS/$1"
    printf 'base_dir = %s/run\nstate_dir = %s/state\ninstance_name = %s\nlog_path = %s/dovecot.log\ninfo_log_path = %s/dovecot.log\n' \
        "$3" "$3" "$(basename "$3")" "$3" "$3"
}

proxy_check() {
    local R="$RUN/$NAME/root" conf=$CONF b p
    b=/root/proxy/backend p=/root/proxy/proxy
    mkdir -p "$R$b/run" "$R$b/state" "$R$p/run" "$R$p/state"
    proxy_conf "$conf" "$BACKEND" "$b" > "$R$b/dovecot.conf"
    proxy_conf "$conf" "$PROXY" "$p" > "$R$p/dovecot.conf"
    # The backend knows carol, dave and erin (with another password than the proxy's).
    printf 'carol:{PLAIN}carol-pass::::::\ndave:{PLAIN}dave-pass::::::\nerin:{PLAIN}erin-other::::::\n' > "$R$b/users"
    {
        echo "carol:{PLAIN}carol-pass::::::proxy=y host=127.0.0.1 port=$BACKEND"
        echo "dave:{PLAIN}dave-pass::::::proxy=y host=127.0.0.1 port=$((BACKEND + 2))"
        echo "erin:{PLAIN}erin-pass::::::proxy=y host=127.0.0.1 port=$BACKEND"
        echo "frank:{PLAIN}frank-pass::::::proxy=y host=127.0.0.1 port=10299"
    } > "$R$p/users"
    chmod 0644 "$R$b/users" "$R$p/users"
    chmod 0755 "$R/root" "$R/root/proxy" "$R$b" "$R$p"
    B dovecot -c "$b/dovecot.conf" || die "$NAME: backend Dovecot did not start: $(cat "$R$b/dovecot.log")"
    B dovecot -c "$p/dovecot.conf" || die "$NAME: proxy Dovecot did not start: $(cat "$R$p/dovecot.log")"
    wait_until 30 "$NAME: proxy listening" B python3 -c "import socket; socket.create_connection(('127.0.0.1', $((PROXY + 2))), 5)"
    B python3 /root/login.py "$PROXY" imap 203.0.113.130 carol carol-pass || die "$NAME: proxied IMAP login failed: $(tail -5 "$R$p/dovecot.log")"
    B python3 /root/login.py "$PROXY" pop3 2001:db8::130 dave dave-pass || die "$NAME: proxied POP3 login failed: $(tail -5 "$R$p/dovecot.log")"
    if B python3 /root/login.py "$PROXY" imap 203.0.113.131 erin erin-pass 2>/dev/null; then die "$NAME: proxy: backend auth failure succeeded"; fi
    if B python3 /root/login.py "$PROXY" imap 203.0.113.132 frank frank-pass 2>/dev/null; then die "$NAME: proxy: connect failure succeeded"; fi
    B dovecot -c "$p/dovecot.conf" stop || true
    B dovecot -c "$b/dovecot.conf" stop || true
    mkdir -p "$LINES"
    for f in proxy backend; do
        sed "s/^/$f: /" "$R/root/proxy/$f/dovecot.log"
    done > "$LINES/$NAME-proxy.log"
    grep -q '203.0.113.130' "$R$p/dovecot.log" || die "$NAME: no proxy line with the client address"
    ok "proxy (Dovecot in front of Dovecot): lines in $LINES/$NAME-proxy.log:"
    grep -v -e 'master: Info' -e 'starting up' "$LINES/$NAME-proxy.log" | sed "s/^/    $NAME /" >&2
}
