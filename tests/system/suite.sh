# One release under real systemd (sourced by scripts/system-test; runs in a subshell).
# suite NAME SUITE DOVECOT_CONF: boots the cached root of SUITE as container NAME, installs
# the package and checks the service as an admin would run it. Output: one line per check.
PORT=10143   # Dovecot: imap, +1 imaps, +2 pop3, +3 pop3s (loopback of the container)
RELAY=lmdb:/var/lib/dovegate/relay

suite() {
    NAME=$1 CONF=$3; local suite=$2 conf=$3 root
    B() { box "$NAME" "$@"; }
    ok() { log "$NAME: ok: $*"; }
    root=$(root_cached "$suite" "${PKGS[@]}")
    box_up "$NAME" "$root"
    local R="$RUN/$NAME/root"
    ok "booted $suite: $(B systemctl --version | head -1), dovecot $(B dovecot --version)"

    # --- install, configure as the README says, start ----------------------------------
    cp "$DEB1" "$R/root/dovegate-1.deb"; cp "$DEB2" "$R/root/dovegate-2.deb"
    cp "$SYS"/login.py "$SYS"/relay.py "$REPO/tests/support/logins.py" "$R/root/"
    B dpkg -i /root/dovegate-1.deb > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: dpkg -i failed"; }
    ok "dpkg -i $(basename "$DEB1")"
    sed -e "s/@PORT@/$PORT/;s/@PORT1@/$((PORT + 1))/;s/@PORT2@/$((PORT + 2))/;s/@PORT3@/$((PORT + 3))/" \
        "$SYS/$conf" > "$R/etc/dovecot/dovecot.conf"
    printf 'alice:{PLAIN}alice-pass::::::\nbob:{PLAIN}bob-pass::::::\n' > "$R/etc/dovecot/users"
    chmod 0644 "$R/etc/dovecot/users"
    B sh -c 'mkdir -p /var/lib/dovegate-test-mail && chown nobody:nogroup /var/lib/dovegate-test-mail'
    B systemctl restart dovecot
    cp "$SYS/main.cf" "$R/etc/postfix/main.cf"
    B systemctl reset-failed
    B systemctl restart postfix
    wait_until 30 "$NAME: smtpd listening" B python3 -c 'import socket; socket.create_connection(("127.0.0.1", 25), 5)'
    installed_package_check
    # The settings in a drop-in, as an administrator (or a configuration tool) would: the
    # package's /etc/dovegate/dovegate.toml sets nothing.
    printf '%s\n' '[source]' 'journal = true' 'journal_give_up = "30s"' 'logs = []' \
        '[serve]' 'socketmap = "unix:/run/dovegate/socketmap"' \
        '[grant]' 'exclude_mynetworks = true' > "$R/etc/dovegate/dovegate.d/50-system-test.toml"
    B systemctl enable --now dovegate 2>/dev/null
    # Type=notify: `active` only after READY=1.
    [ "$(B systemctl is-active dovegate)" = active ] || die "$NAME: dovegate not active after start: $(B systemctl status dovegate --no-pager)"
    ok "systemctl enable --now dovegate: active (READY), status \"$(status_text)\""
    # ExecStartPre's check-config --quiet: one line, no configuration dump, and postconf works
    # under the sandbox (AF_NETLINK for getifaddrs).
    wait_until 10 "$NAME: check-config's line in the journal" quiet_check_logged \
        || die "$NAME: no 'configuration ...: ok' line: $(B journalctl -u dovegate -n 20 --no-pager)"
    out=$(B journalctl -u dovegate -o cat --no-pager)
    if grep -qE '^(\[map\]|path = |ttl = )|postconf.*failed' <<<"$out"; then
        die "$NAME: the unit's journal has a configuration dump or a postconf failure: $out"
    fi
    ok "ExecStartPre check-config --quiet: one line, no configuration dump, postconf works in the sandbox"
    local pid0; pid0=$(main_pid)
    journal_child_alive

    # --- live logins under every hardening option of the packaged unit -----------------
    local out granted refused a
    out=$(B python3 /root/logins.py "$PORT") || die "$NAME: logins.py: $out"
    granted=$(echo "$out" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["granted"]))')
    refused=$(echo "$out" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["refused"]))')
    for a in $granted; do wait_grant "$a"; done
    ok "live IMAP/POP3 logins (IPv4, IPv6, TLS, STARTTLS, ID/XCLIENT forwarding) granted: $granted"
    # mynetworks (read with postconf under the unit's sandbox) are excluded.
    B python3 /root/login.py "$PORT" imap 198.18.0.5
    B python3 /root/login.py "$PORT" pop3 203.0.113.101
    wait_grant 203.0.113.101
    for a in $refused 198.18.0.5; do no_grant "$a"; done
    ok "nothing granted for loopback, failed, aborted logins and mynetworks (postconf): $refused 198.18.0.5"
    # The audit line's text names the address, user, protocol and expiry (what `journalctl -u
    # dovegate` shows); its fields filter (the README's commands).
    wait_until 10 "$NAME: grant line for 203.0.113.101" grant_line_logged 203.0.113.101 \
        || die "$NAME: no readable grant line: $(B journalctl -u dovegate -n 10 --no-pager)"
    B journalctl -u dovegate -o cat --no-pager DOVEGATE_USER=alice DOVEGATE_ADDRESS=203.0.113.101 | grep -q '^grant 203\.0\.113\.101 ' \
        || die "$NAME: journalctl DOVEGATE_USER=alice DOVEGATE_ADDRESS=203.0.113.101 finds no grant"
    ok "journal: 'grant 203.0.113.101 user=alice pop3 until ...', found by DOVEGATE_USER= and DOVEGATE_ADDRESS="
    [ "$(main_pid)" = "$pid0" ] || die "$NAME: the daemon restarted during the logins"
    # The socketmap under /run/dovegate (RuntimeDirectory) answers from the same grants.
    local sm=socketmap:unix:/run/dovegate/socketmap:relay
    out=$(B postmap -q 203.0.113.45 $sm) || die "$NAME: socketmap: no answer for a granted address"
    case "$out" in OK*) ;; *) die "$NAME: socketmap answered '$out'" ;; esac
    if B postmap -q 203.0.113.99 $sm; then die "$NAME: socketmap granted 203.0.113.99"; fi
    ok "socketmap unix:/run/dovegate/socketmap: 203.0.113.45 -> $out, 203.0.113.99 -> not found"

    # --- the real smtpd judges relaying ------------------------------------------------
    out=$(B python3 /root/relay.py 203.0.113.45 2001:db8::25 203.0.113.99 198.51.100.66)
    echo "$out" | grep -qx '203.0.113.45 250' || die "$NAME: smtpd refused a granted client: $out"
    echo "$out" | grep -qx '2001:db8::25 250' || die "$NAME: smtpd refused a granted IPv6 client: $out"
    echo "$out" | grep -qx '203.0.113.99 554' || die "$NAME: smtpd did not refuse 203.0.113.99: $out"
    ok "smtpd (XCLIENT): relay 250 for granted 203.0.113.45 and 2001:db8::25, 554 for 203.0.113.99"

    # --- forged journal entries grant nothing ------------------------------------------
    B logger -t dovecot "imap-login: Login: user=<x>, method=PLAIN, rip=198.51.100.66, lip=127.0.0.1, mpid=1, session=<x>"
    B logger -t dovecot "imap-login: Info: Logged in: user=<x>, method=PLAIN, rip=198.51.100.67, lip=127.0.0.1, mpid=1, session=<y>"
    B python3 /root/login.py "$PORT" imap 203.0.113.102
    wait_grant 203.0.113.102
    no_grant 198.51.100.66; no_grant 198.51.100.67
    wait_until 30 "$NAME: the forged entries reported" forged_reported \
        || die "$NAME: no 'forged' warning: $(B journalctl -u dovegate -n 10 --no-pager)"
    out=$(B python3 /root/relay.py 198.51.100.66)
    [ "$out" = "198.51.100.66 554" ] || die "$NAME: forged entry: smtpd answered $out"
    ok "logger -t dovecot forged logins (198.51.100.66, .67) not granted, reported as forged, smtpd 554"

    # --- reload: good, then bad (refused, the old configuration keeps running) ---------
    # A drop-in read after 50-system-test.toml, honoured by the reload (ttl in its line).
    printf '%s\n' '[grant]' 'ttl = "31m"' > "$R/etc/dovegate/dovegate.d/60-ttl.toml"
    B systemctl reload dovegate || die "$NAME: reload of a good configuration failed"
    [ "$(main_pid)" = "$pid0" ] || die "$NAME: reload restarted the daemon"
    wait_until 10 "$NAME: reload with the drop-in's ttl" ttl_reloaded 31m \
        || die "$NAME: the drop-in's ttl was not taken: $(B journalctl -u dovegate -n 10 --no-pager)"
    B dovegate config 2>/dev/null | grep -qx 'ttl = "31m"' || die "$NAME: dovegate config does not show the drop-in's ttl"
    # A bad drop-in: refused, naming it.
    printf '%s\n' '[grant]' 'no_such_key = 1' > "$R/etc/dovegate/dovegate.d/70-bad.toml"
    if B systemctl reload dovegate 2>/dev/null; then die "$NAME: a bad configuration was accepted"; fi
    [ "$(B systemctl is-active dovegate)" = active ] && [ "$(main_pid)" = "$pid0" ] \
        || die "$NAME: the daemon did not survive a refused reload"
    B journalctl -u dovegate -o cat --no-pager | grep -q '/etc/dovegate/dovegate.d/70-bad.toml:2:1: grant.no_such_key: unknown key' \
        || die "$NAME: the refused reload does not name the drop-in: $(B journalctl -u dovegate -n 10 --no-pager)"
    B python3 /root/login.py "$PORT" pop3 203.0.113.103
    wait_grant 203.0.113.103
    rm -f "$R/etc/dovegate/dovegate.d/70-bad.toml"
    ok "systemctl reload: a good drop-in accepted (ttl 31m), a bad one refused naming its line, same pid $pid0, still granting"

    # --- kill -9: systemd restarts it, no login around it is lost ----------------------
    B python3 /root/login.py "$PORT" imap 203.0.113.110
    B sh -c 'kill -9 "$1"' - "$pid0"   # a shell builtin: Debian 12 has no /bin/kill
    B python3 /root/login.py "$PORT" pop3 203.0.113.111
    wait_until 30 "$NAME: dovegate restarted after kill -9" new_active_pid "$pid0"
    B python3 /root/login.py "$PORT" imap 203.0.113.112
    for a in 203.0.113.110 203.0.113.111 203.0.113.112 $granted; do wait_grant "$a"; done
    local pid1; pid1=$(main_pid)
    journal_child_alive
    ok "kill -9 $pid0: restarted by systemd as $pid1 (NRestarts=$(B systemctl show -P NRestarts dovegate)); logins before, during, after granted"

    # --- a journal source that keeps failing must not look healthy ---------------------
    failing_source_check

    # --- the watchdog: a stalled daemon (SIGSTOP) is killed and restarted ----------------
    watchdog_check

    # --- upgrade keeps the map and the position ----------------------------------------
    B python3 /root/login.py "$PORT" imap 203.0.113.120
    wait_grant 203.0.113.120
    B dpkg -i /root/dovegate-2.deb > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: upgrade failed"; }
    [ "$(B dpkg-query -W -f='${Version}' dovegate)" = "$VERSION2" ] || die "$NAME: not upgraded"
    wait_until 30 "$NAME: dovegate restarted by the upgrade" new_active_pid "$pid1"
    for a in 203.0.113.120 203.0.113.110 $granted; do wait_grant "$a"; done
    B journalctl -u dovegate -o json --no-pager | grep '"following the journal"' | tail -1 \
        | grep -q '"DOVEGATE_START":"after cursor' || die "$NAME: after the upgrade the daemon did not resume at its cursor"
    B python3 /root/login.py "$PORT" pop3 203.0.113.121
    wait_grant 203.0.113.121
    ok "upgrade to $VERSION2: map kept, resumed at its journal cursor, granting"

    # --- stop exits 0, purge keeps the map ---------------------------------------------
    local procs; procs=$(B systemctl status dovegate --no-pager 2>&1 | sed -n '/CGroup:/,/^$/p')
    B systemctl stop dovegate
    [ "$(B systemctl show -P ExecMainStatus dovegate)" = 0 ] || die "$NAME: stop: exit status $(B systemctl show -P ExecMainStatus dovegate)"
    [ "$(B systemctl show -P Result dovegate)" = success ] || die "$NAME: stop: result $(B systemctl show -P Result dovegate); processes before the stop: $procs; $(B journalctl -u dovegate -n 15 --no-pager)"
    ok "systemctl stop: exit 0, result success"
    proxy_check
    # --- removal leaves no grant Postfix obeys (issue 20); purge keeps the named map -----
    B postmap -q 203.0.113.45 "$RELAY" >/dev/null || die "$NAME: 203.0.113.45 not granted before the removal"
    B dpkg -r dovegate > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: dpkg -r failed"; }
    [ ! -e "$R/usr/bin/dovegate" ] && [ -e "$R/var/lib/dovegate/relay.lmdb" ] || die "$NAME: dpkg -r: binary left or map removed"
    if B postmap -q 203.0.113.45 "$RELAY" >/dev/null; then die "$NAME: dpkg -r left 203.0.113.45's grant in the map, with no daemon to expire it"; fi
    out=$(B python3 /root/relay.py 203.0.113.45)
    [ "$out" = "203.0.113.45 554" ] || die "$NAME: after dpkg -r: smtpd answered $out for the formerly granted 203.0.113.45"
    ok "dpkg -r: the map stays for Postfix, empty: smtpd 554 for the formerly granted 203.0.113.45"
    B dpkg --purge dovegate > "$RUN/$NAME.dpkg.log" 2>&1 || { cat "$RUN/$NAME.dpkg.log" >&2; die "$NAME: purge failed"; }
    [ -e "$R/var/lib/dovegate/relay.lmdb" ] || die "$NAME: purge removed the map main.cf still names"
    grep -q "main.cf still names" "$RUN/$NAME.dpkg.log" || die "$NAME: purge: no note about the main.cf line: $(cat "$RUN/$NAME.dpkg.log")"
    out=$(B python3 /root/relay.py 203.0.113.45)
    [ "$out" = "203.0.113.45 554" ] || die "$NAME: after purge: smtpd answered $out"
    ok "dpkg --purge: the empty map stays while main.cf names it (with a note); smtpd 554, not 451"
    mkdir -p "$LINES"
    B journalctl -u dovecot -o short-iso --no-pager > "$LINES/$NAME-dovecot-journal.log" || true
    box_down "$RUN/$NAME"
    ok "all checks passed (Dovecot's journal: $LINES/$NAME-dovecot-journal.log)"
}

quiet_check_logged() { B journalctl -u dovegate -o cat --no-pager | grep -qx 'dovegate: configuration /etc/dovegate/dovegate.toml + /etc/dovegate/dovegate.d/50-system-test.toml: ok.*'; }
ttl_reloaded() { B journalctl -u dovegate -o cat --no-pager "DOVEGATE_TTL=$1" | grep -q 'configuration reloaded'; }
grant_line_logged() { B journalctl -u dovegate -o cat --no-pager | grep -qF "grant $1 user=alice pop3 until 20"; }
forged_reported() { B journalctl -u dovegate -o cat --no-pager | grep -q '^forged Dovecot login entries'; }
main_pid() { B systemctl show -P MainPID dovegate; }
status_text() { B systemctl show -P StatusText dovegate; }
new_active_pid() {
    local p; p=$(main_pid)
    [ "$p" != 0 ] && [ "$p" != "$1" ] && [ "$(B systemctl is-active dovegate)" = active ]
}
wait_grant() {
    wait_until 30 "$NAME: grant for $1 in $RELAY" B postmap -q "$1" "$RELAY" \
        || die "$NAME: status \"$(status_text)\"; $(B journalctl -u dovegate -n 20 --no-pager)"
}
no_grant() {
    if B postmap -q "$1" "$RELAY" >/dev/null; then die "$NAME: $1 granted: $(B postmap -q "$1" "$RELAY")"; fi
}
# The unit's journalctl --follow child (the root has no procps).
follow_pid() {
    B sh -c 'for p in $(cat /proc/$1/task/*/children 2>/dev/null); do
        tr "\0" " " < /proc/$p/cmdline 2>/dev/null | grep -q "^journalctl .*--follow" && echo $p; done; true' - "$(main_pid)"
}
follow_child() { [ -n "$(follow_pid)" ]; }
# The follow child runs and keeps running (a child that exits at once shows as restarts).
journal_child_alive() {
    local pid1 pid2
    wait_until 20 "$NAME: journalctl --follow child" follow_child
    pid1=$(follow_pid)
    B python3 /root/login.py "$PORT" imap 203.0.113.$((RANDOM % 50 + 200)) >/dev/null
    pid2=$(follow_pid)
    [ "$pid1" = "$pid2" ] || die "$NAME: the journalctl --follow child is being restarted ($pid1 -> $pid2)"
    # Descriptors the child inherited that it should not have (reported, not fatal).
    local leaked; leaked=$(B sh -c 'ls -l /proc/$1/fd' - "$pid1" | { grep -o '/var/lib/dovegate/[^ ]*' || true; } | sort -u | tr '\n' ' ')
    [ -z "$leaked" ] || die "$NAME: the journalctl child holds inherited descriptors: $leaked"
}

# A journal that journalctl cannot follow (the old unit's ProcSubset=pid, as a drop-in):
# within a bounded time the unit must say so (STATUS= not the healthy text, or a restart,
# or failed). What the daemon showed is reported either way.
failing_source_check() {
    local R="$RUN/$NAME/root" restarts0 healthy='^[0-9]+ grants active, [0-9]+ lines read, [0-9]+ logins, [0-9]+ forged$'
    mkdir -p "$R/etc/systemd/system/dovegate.service.d"
    printf '[Service]\nProcSubset=pid\n' > "$R/etc/systemd/system/dovegate.service.d/broken-journal.conf"
    B systemctl daemon-reload
    B systemctl restart dovegate
    restarts0=$(B systemctl show -P NRestarts dovegate)
    if wait_until "${FAILING_SOURCE_LIMIT:-75}" "$NAME: a failing journal source reported" source_reported_failing "$restarts0" "$healthy"; then
        ok "failing journalctl: reported (status \"$(status_text)\", active=$(B systemctl is-active dovegate), NRestarts=$(B systemctl show -P NRestarts dovegate))"
    elif [ "${DOVEGATE_SYSTEM_TEST_STRICT_SOURCE:-1}" = 1 ]; then
        die "$NAME: journalctl keeps exiting but the unit looks healthy: \"$(status_text)\""
    else
        log "$NAME: KNOWN GAP: journalctl keeps exiting (\"$(B journalctl -u dovegate -n 1 -o cat --no-pager)\") but after ${FAILING_SOURCE_LIMIT:-75}s the unit is still active with status \"$(status_text)\" and NRestarts=$(B systemctl show -P NRestarts dovegate)"
    fi
    rm -f "$R/etc/systemd/system/dovegate.service.d/broken-journal.conf"
    B systemctl daemon-reload
    B systemctl reset-failed dovegate 2>/dev/null || true
    B systemctl restart dovegate
    [ "$(B systemctl is-active dovegate)" = active ] || die "$NAME: dovegate not active again"
    wait_until 20 "$NAME: journalctl --follow child" follow_child
}
# The packaged WatchdogSec=60s, shortened by a drop-in so that the check costs seconds: the
# engine loop stopped (SIGSTOP) sends no WATCHDOG=1; systemd kills and restarts it, and the
# logins made meanwhile are granted after the restart.
watchdog_check() {
    local R="$RUN/$NAME/root" pid restarts0
    mkdir -p "$R/etc/systemd/system/dovegate.service.d"
    printf '[Service]\nWatchdogSec=4s\n' > "$R/etc/systemd/system/dovegate.service.d/short-watchdog.conf"
    B systemctl daemon-reload
    B systemctl restart dovegate
    wait_until 30 "$NAME: dovegate active with the short watchdog" B systemctl is-active dovegate \
        || die "$NAME: dovegate not active with the short watchdog"
    pid=$(main_pid)
    restarts0=$(B systemctl show -P NRestarts dovegate)
    B sh -c 'kill -STOP "$1"' - "$pid"
    B python3 /root/login.py "$PORT" imap 203.0.113.130
    wait_until 60 "$NAME: the watchdog restarted the stalled daemon" new_active_pid "$pid" \
        || die "$NAME: a stalled daemon was not restarted by the watchdog"
    [ "$(B systemctl show -P NRestarts dovegate)" != "$restarts0" ] || die "$NAME: no restart counted"
    wait_grant 203.0.113.130
    rm -f "$R/etc/systemd/system/dovegate.service.d/short-watchdog.conf"
    B systemctl daemon-reload
    B systemctl restart dovegate
    wait_until 30 "$NAME: dovegate active again" B systemctl is-active dovegate \
        || die "$NAME: dovegate not active again after the watchdog check"
    ok "watchdog: the stalled daemon (SIGSTOP) was killed and restarted; the login made meanwhile granted"
}
source_reported_failing() {
    local st; st=$(status_text)
    [ "$(B systemctl is-active dovegate)" != active ] && return 0
    [ "$(B systemctl show -P NRestarts dovegate)" != "$1" ] && return 0
    [ -n "$st" ] && ! [[ "$st" =~ $2 ]]
}

# --- The installed package (issue 17: only these containers install it, never the host):
# its files, the system user and its groups, the empty map made before Postfix looks, the
# packaged configuration and unit. Run after dpkg -i, before dovegate is configured.
installed_package_check() {
    local f out uid groups g map score unit=/lib/systemd/system/dovegate.service
    for f in /usr/bin/dovegate $unit /etc/dovegate/dovegate.toml /usr/share/man/man8/dovegate.8.gz \
        /usr/share/man/man5/dovegate.toml.5.gz /usr/share/dovegate/patterns/dovecot-2.4.toml \
        /usr/lib/dovegate/postlogin; do
        B test -e "$f" || die "$NAME: $f not installed"
    done
    uid=$(B getent passwd dovegate | cut -d: -f3)
    [ -n "$uid" ] || die "$NAME: dpkg -i made no system user dovegate"
    groups=" $(B id -nG dovegate) "
    for g in dovegate adm systemd-journal; do
        [[ "$groups" == *" $g "* ]] || die "$NAME: user dovegate is not in group $g (groups:$groups)"
    done
    # Closed to other users (a reader can stall every write), readable by Postfix's group.
    group=dovegate
    if B getent group postfix >/dev/null; then group=postfix; fi
    map=$(B stat -c '%U %G %a' /var/lib/dovegate/relay.lmdb) || die "$NAME: no map after dpkg -i"
    [ "$map" = "dovegate $group 640" ] || die "$NAME: map owner, group and mode '$map', want 'dovegate $group 640'"
    out=$(B postmap -s "$RELAY" 2>&1) || die "$NAME: postmap -s $RELAY: $out"
    [ -z "$out" ] || die "$NAME: the new map is not empty: $out"
    out=$(B dovegate check-config --config /etc/dovegate/dovegate.toml 2>&1) || die "$NAME: check-config: $out"
    [[ "$out" == *'path = "/var/lib/dovegate/relay"'* ]] || die "$NAME: check-config shows another map: $out"
    out=$(B systemd-analyze verify --man=no $unit 2>&1) || die "$NAME: systemd-analyze verify: $out"
    out=$(B systemd-analyze security --offline=yes $unit 2>&1 || true)
    score=$(echo "$out" | sed -n 's/.*Overall exposure level for dovegate.service: *\([0-9.]*\).*/\1/p')
    [ -n "$score" ] || die "$NAME: no exposure score in: $out"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }' || die "$NAME: exposure $score > 2.5: $out"
    ok "installed: files, user dovegate (groups:$groups), empty map (uid mode: $map), check-config, unit verified (exposure $score)"
}
