#!/usr/bin/env bash
# Test harness: a private Dovecot (and rsyslogd) on loopback, started and stopped by the
# end-to-end tests. Nothing system-wide is touched: own config, base_dir, ports, log.
#   dovecot.sh up DIR file|syslog PORTBASE   imap PORTBASE, imaps +1, pop3 +2, pop3s +3
#   dovecot.sh down DIR
#   dovecot.sh trixie-root DIR               a Debian 13 root with Dovecot 2.4 (debootstrap,
#                                            cached in /var/cache/dovegate-test/push-trixie
#                                            (DOVEGATE_TEST_CACHE, as the system test),
#                                            else the system test's root-trixie-*);
#                                            prints its path
#   dovecot.sh up24 DIR ROOT PORTBASE        Dovecot 2.4 from ROOT, chrooted, with DIR mounted
#                                            at /rig inside (a private mount namespace); the
#                                            same ports, users and push settings as `up`
#                                            (DG_POSTLOGIN paths as seen inside: /rig/...)
#   dovecot.sh down24 DIR
#   dovecot.sh rsyslog-up DIR                socket DIR/syslog/dev-log; writes
#                                            DIR/syslog/traditional.log and rfc3339.log
#   dovecot.sh rsyslog-down DIR
#   dovecot.sh journald-up DIR               the real systemd-journald in a private mount
#                                            namespace: sockets in DIR/journal/sock, journal
#                                            files in DIR/journal/runlog/journal
#   dovecot.sh journald-down DIR
#   dovecot.sh cgroup-up DIR | cgroup-down DIR   a cgroup2 system.slice/dovecot.service,
#                                            so journald stamps _SYSTEMD_UNIT=dovecot.service
# Environment for `up`: DG_SYSLOG_SOCK (syslog socket, default DIR/syslog/dev-log),
# DG_CGROUP (a cgroup directory to start Dovecot in), DG_EXTRA_CONF (lines appended to
# dovecot.conf, also for up24); the push paths, configured as the
# README says: DG_POSTLOGIN (the post-login script and its arguments, run by script-login
# for imap and pop3), DG_POLICY_URL and DG_POLICY_HEADER (auth_policy_server_url and
# auth_policy_server_api_header), DG_POLICY_CHECKS=no (auth_policy_check_before_auth and
# _after_auth off: reports only; =after: only _after_auth, the kill switch's setting),
# DG_POLICY_ATTRIBUTES=default (Dovecot's default auth_policy_request_attributes, without
# the proxy and nologin ones dovegate requires).
# With DG_POLICY_URL, `up` adds the users carol (proxy=y to a closed port, any password)
# and dave (nologin), whose authentications succeed but who never log in.
# Dovecot runs as root here (the master must: it binds, chroots, drops privileges); the
# mail processes run as nobody. In syslog mode Dovecot runs in a private mount namespace
# whose /dev/log is the test rsyslogd's socket (glibc always logs to /dev/log).
set -euo pipefail
export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
die() { echo "dovecot.sh: $*" >&2; exit 1; }
cmd=${1:?usage}; DIR=${2:?usage}

listening() { ss -ltnH "sport = :$1" 2>/dev/null | wc -l; }

up() {
    local mode=$1 base=$2
    [ "${#DIR}" -le 78 ] || die "DIR too long for Dovecot's socket paths: $DIR"
    mkdir -p "$DIR/run" "$DIR/state" "$DIR/ssl" "$DIR/mail"
    chmod 0755 "$DIR" "$DIR/run" "$DIR/state"
    chown nobody:nogroup "$DIR/mail"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
        -keyout "$DIR/ssl/key.pem" -out "$DIR/ssl/cert.pem" >/dev/null 2>&1
    printf 'alice:{PLAIN}alice-pass::::::\nbob:{PLAIN}bob-pass::::::\n' > "$DIR/users"
    chmod 0644 "$DIR/users"
    local logconf
    if [ "$mode" = file ]; then
        logconf="log_path = $DIR/dovecot.log
info_log_path = $DIR/dovecot.log"
        : > "$DIR/dovecot.log"
    else
        logconf="log_path = syslog
info_log_path =
syslog_facility = mail"
    fi
    cat > "$DIR/dovecot.conf" <<CONF
base_dir = $DIR/run
state_dir = $DIR/state
protocols = imap pop3
listen = 127.0.0.1, ::1
$logconf
auth_mechanisms = plain login
disable_plaintext_auth = no
login_trusted_networks = 127.0.0.9/32
ssl = yes
ssl_cert = <$DIR/ssl/cert.pem
ssl_key = <$DIR/ssl/key.pem
mail_location = maildir:~/Maildir
first_valid_uid = 1
first_valid_gid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DIR/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$DIR/mail/%u
}
service imap-login {
  inet_listener imap {
    port = $base
  }
  inet_listener imaps {
    port = $((base + 1))
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    port = $((base + 2))
  }
  inet_listener pop3s {
    port = $((base + 3))
    ssl = yes
  }
}
CONF
    if [ -n "${DG_POSTLOGIN:-}" ]; then
        local proto
        for proto in imap pop3; do
            cat >> "$DIR/dovecot.conf" <<CONF
service $proto {
  executable = $proto $proto-postlogin
}
service $proto-postlogin {
  executable = script-login $DG_POSTLOGIN
  user = \$default_internal_user
  unix_listener $proto-postlogin {
  }
}
CONF
        done
    fi
    if [ -n "${DG_POLICY_URL:-}" ]; then
        # Dovecot's default attributes plus proxy and nologin, as the README says
        # (DG_POLICY_ATTRIBUTES=default: Dovecot's defaults, a site that missed the step).
        local attrs='login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} device_id=%{client_id} protocol=%s session_id=%{session} proxy=%{passdb:proxy:-} nologin=%{passdb:nologin:-}'
        [ "${DG_POLICY_ATTRIBUTES:-}" != default ] || attrs='login=%{requested_username} pwhash=%{hashed_password} remote=%{rip} device_id=%{client_id} protocol=%s session_id=%{session}'
        cat >> "$DIR/dovecot.conf" <<CONF
auth_policy_server_url = $DG_POLICY_URL
auth_policy_server_api_header = ${DG_POLICY_HEADER:-}
auth_policy_hash_nonce = $(openssl rand -hex 16)
auth_policy_report_after_auth = yes
auth_policy_request_attributes = $attrs
CONF
        [ "${DG_POLICY_CHECKS:-}" != no ] || printf 'auth_policy_check_before_auth = no\nauth_policy_check_after_auth = no\n' >> "$DIR/dovecot.conf"
        [ "${DG_POLICY_CHECKS:-}" != after ] || printf 'auth_policy_check_before_auth = no\nauth_policy_check_after_auth = yes\n' >> "$DIR/dovecot.conf"
        # Authentications that are not logins here: carol is proxied elsewhere (a closed
        # port: the login fails), dave may not log in; both authenticate successfully.
        printf 'carol:::::::proxy=y host=127.0.0.1 port=9 nopassword=y\ndave:{PLAIN}dave-pass::::::nologin reason=moved\n' >> "$DIR/users"
    fi
    # DG_EXTRA_CONF: settings appended as they are (verbose_proctitle, anonymous login).
    [ -z "${DG_EXTRA_CONF:-}" ] || printf '%s\n' "$DG_EXTRA_CONF" >> "$DIR/dovecot.conf"
    for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
        [ "$(listening $p)" = 0 ] || die "port $p is in use"
    done
    if [ "$mode" = file ]; then
        dovecot -c "$DIR/dovecot.conf" </dev/null >>"$DIR/dovecot.stderr" 2>&1
    else
        [ -z "${DG_CGROUP:-}" ] || echo $$ > "$DG_CGROUP/cgroup.procs"
        DG_DIR="$DIR" DG_SOCK="${DG_SYSLOG_SOCK:-$DIR/syslog/dev-log}" unshare --mount --propagation private bash -c '
            set -e
            mkdir -p "$DG_DIR/.hostdev"
            mount --bind /dev "$DG_DIR/.hostdev"
            mount -t tmpfs -o mode=0755,size=1m dgdev /dev
            for n in null zero full random urandom tty; do
                [ -e "$DG_DIR/.hostdev/$n" ] || continue
                : > "/dev/$n"; mount --bind "$DG_DIR/.hostdev/$n" "/dev/$n"
            done
            ln -s /proc/self/fd /dev/fd
            ln -s "$DG_SOCK" /dev/log
            umount -l "$DG_DIR/.hostdev"
            exec dovecot -c "$DG_DIR/dovecot.conf"
        ' </dev/null >>"$DIR/dovecot.stderr" 2>&1
    fi || { cat "$DIR/dovecot.stderr" >&2; die "dovecot failed to start"; }
    for _ in $(seq 1 300); do
        local ok=1
        for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
            [ "$(listening $p)" -ge 2 ] || ok=0
        done
        [ $ok = 1 ] && return 0
        sleep 0.1
    done
    cat "$DIR/dovecot.stderr" >&2
    die "dovecot did not listen within 30 s"
}

# The Debian 13 root, built once (flock: parallel tests wait for the first build).
trixie_root() {
    local cache=${DOVEGATE_TEST_CACHE:-/var/cache/dovegate-test}
    local root=$cache/push-trixie
    mkdir -p "$cache"
    # Without it, a Debian 13 root the system test cached (no network needed); used
    # through an overlay (see up24), never changed.
    if [ ! -d "$root" ]; then
        local cached
        # (|| true: no such root is not an error here; pipefail would end the script.)
        cached=$(ls -d "$cache"/root-trixie-*/usr/sbin/dovecot 2>/dev/null | tail -1 || true)
        [ -z "$cached" ] || { echo "${cached%/usr/sbin/dovecot}"; return 0; }
    fi
    local mirror
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    flock "$cache/push-trixie.lock" bash -c '
        set -e
        [ -d "$1" ] && exit 0
        rm -rf "$1.tmp"
        debootstrap --variant=minbase --include=dovecot-core,dovecot-imapd,dovecot-pop3d,liblmdb0 \
            trixie "$1.tmp" "$2" >"$1.log" 2>&1 || { tail -20 "$1.log" >&2; exit 1; }
        mkdir -p "$1.tmp/rig"
        mv "$1.tmp" "$1"
    ' _ "$root" "${mirror:-http://deb.debian.org/debian}" || die "debootstrap trixie failed"
    echo "$root"
}

# Dovecot 2.4 syntax for the same rig as `up` (paths as seen inside the chroot: /rig).
up24() {
    local root=$1 base=$2
    [ -x "$root/usr/sbin/dovecot" ] || die "no Dovecot in $root"
    mkdir -p "$DIR/run" "$DIR/state" "$DIR/ssl" "$DIR/mail" "$DIR/.root/upper" "$DIR/.root/work" "$DIR/.root/merged"
    chmod 0755 "$DIR/.root/upper"
    chmod 0755 "$DIR" "$DIR/run" "$DIR/state"
    chown 65534:65534 "$DIR/mail"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
        -keyout "$DIR/ssl/key.pem" -out "$DIR/ssl/cert.pem" >/dev/null 2>&1
    printf 'alice:{PLAIN}alice-pass::::::\nbob:{PLAIN}bob-pass::::::\n' > "$DIR/users"
    chmod 0644 "$DIR/users"
    : > "$DIR/dovecot.log"
    cat > "$DIR/dovecot.conf" <<CONF
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = /rig/run
state_dir = /rig/state
protocols = imap pop3
listen = 127.0.0.1, ::1
log_path = /rig/dovecot.log
info_log_path = /rig/dovecot.log
auth_mechanisms = plain login
auth_allow_cleartext = yes
login_trusted_networks = 127.0.0.9/32
ssl = yes
ssl_server_cert_file = /rig/ssl/cert.pem
ssl_server_key_file = /rig/ssl/key.pem
mail_driver = maildir
mail_path = ~/Maildir
first_valid_uid = 1
first_valid_gid = 1
passdb passwd-file {
  passwd_file_path = /rig/users
}
userdb static {
  fields {
    uid = 65534
    gid = 65534
    home = /rig/mail/%{user}
  }
}
service imap-login {
  inet_listener imap {
    port = $base
  }
  inet_listener imaps {
    port = $((base + 1))
    ssl = yes
  }
}
service pop3-login {
  inet_listener pop3 {
    port = $((base + 2))
  }
  inet_listener pop3s {
    port = $((base + 3))
    ssl = yes
  }
}
CONF
    if [ -n "${DG_POSTLOGIN:-}" ]; then
        local proto
        for proto in imap pop3; do
            cat >> "$DIR/dovecot.conf" <<CONF
service $proto {
  executable = $proto $proto-postlogin
}
service $proto-postlogin {
  executable = script-login $DG_POSTLOGIN
  user = \$SET:default_internal_user
  unix_listener $proto-postlogin {
  }
}
CONF
        done
    fi
    if [ -n "${DG_POLICY_URL:-}" ]; then
        cat >> "$DIR/dovecot.conf" <<CONF
auth_policy_server_url = $DG_POLICY_URL
auth_policy_server_api_header = ${DG_POLICY_HEADER:-}
auth_policy_hash_nonce = $(openssl rand -hex 16)
auth_policy_report_after_auth = yes
auth_policy_request_attributes {
  proxy = %{passdb:proxy | default('-')}
  nologin = %{passdb:nologin | default('-')}
}
CONF
        [ "${DG_POLICY_CHECKS:-}" != no ] || printf 'auth_policy_check_before_auth = no\nauth_policy_check_after_auth = no\n' >> "$DIR/dovecot.conf"
        [ "${DG_POLICY_CHECKS:-}" != after ] || printf 'auth_policy_check_before_auth = no\nauth_policy_check_after_auth = yes\n' >> "$DIR/dovecot.conf"
    fi
    # DG_EXTRA_CONF: settings appended as they are (verbose_proctitle, anonymous login).
    [ -z "${DG_EXTRA_CONF:-}" ] || printf '%s\n' "$DG_EXTRA_CONF" >> "$DIR/dovecot.conf"
    for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
        [ "$(listening $p)" = 0 ] || die "port $p is in use"
    done
    DG_DIR="$DIR" DG_ROOT="$root" unshare --mount --propagation private bash -c '
        set -e
        # The root seen through an overlay: it stays as cached (a root only root may
        # enter, mode 0700, is entered by Dovecot'"'"'s users through the upper layer'"'"'s 0755).
        mount -t overlay dgroot -o "lowerdir=$DG_ROOT,upperdir=$DG_DIR/.root/upper,workdir=$DG_DIR/.root/work" "$DG_DIR/.root/merged"
        DG_ROOT="$DG_DIR/.root/merged"
        mkdir -p "$DG_ROOT/rig"
        mount --bind "$DG_DIR" "$DG_ROOT/rig"
        mount --bind /dev "$DG_ROOT/dev"
        mount -t proc proc "$DG_ROOT/proc"
        exec chroot "$DG_ROOT" /usr/sbin/dovecot -c /rig/dovecot.conf
    ' </dev/null >>"$DIR/dovecot.stderr" 2>&1 || { cat "$DIR/dovecot.stderr" >&2; die "dovecot 2.4 failed to start"; }
    for _ in $(seq 1 300); do
        local ok=1
        for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
            [ "$(listening $p)" -ge 2 ] || ok=0
        done
        [ $ok = 1 ] && return 0
        sleep 0.1
    done
    cat "$DIR/dovecot.stderr" "$DIR/dovecot.log" >&2
    die "dovecot 2.4 did not listen within 30 s"
}

# stop_pidfile PIDFILE TEXT: SIGTERM the pid in PIDFILE (only if its command line contains
# TEXT: never another process that reused the pid), wait up to 10 s, then SIGKILL.
stop_pidfile() {
    local pidf=$1 text=$2 pid
    [ -s "$pidf" ] || return 0
    pid=$(cat "$pidf")
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$text" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

down() { stop_pidfile "$DIR/run/master.pid" "$DIR/dovecot.conf"; }

rsyslog_up() {
    local S="$DIR/syslog"
    mkdir -p "$S/work"
    chmod 0755 "$DIR" "$S"
    cat > "$S/rsyslog.conf" <<CONF
global(workDirectory="$S/work")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="$S/dev-log" CreatePath="on")
mail.*  action(type="omfile" file="$S/traditional.log" template="RSYSLOG_TraditionalFileFormat")
mail.*  action(type="omfile" file="$S/rfc3339.log" template="RSYSLOG_FileFormat")
CONF
    setsid rsyslogd -n -f "$S/rsyslog.conf" -i "$S/rsyslogd.pid" </dev/null >>"$S/rsyslogd.out" 2>&1 &
    for _ in $(seq 1 100); do
        [ -S "$S/dev-log" ] && [ -s "$S/rsyslogd.pid" ] && { chmod 0666 "$S/dev-log"; return 0; }
        sleep 0.1
    done
    cat "$S/rsyslogd.out" >&2
    die "rsyslogd did not start"
}

rsyslog_down() { stop_pidfile "$DIR/syslog/rsyslogd.pid" "$DIR/syslog/rsyslog.conf"; }

journald_up() {
    local J="$DIR/journal"
    [ -s /etc/machine-id ] || die "/etc/machine-id missing: journald needs a machine id"
    mkdir -p "$J/sock" "$J/runlog"
    chmod 0755 "$DIR" "$J" "$J/sock"
    printf '[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\nRateLimitIntervalSec=0\nRateLimitBurst=0\n' > "$J/journald.conf"
    DG_J="$J" setsid unshare --mount --propagation private bash -c '
        set -e
        mkdir -p /run/log
        mount --bind "$DG_J/runlog" /run/log
        mount -t tmpfs -o mode=0755,size=1m dgrun /run/systemd
        mkdir -p /run/systemd/journal
        mount --bind "$DG_J/sock" /run/systemd/journal
        mount -t tmpfs -o mode=0755,size=1m dgetc /etc/systemd
        cp "$DG_J/journald.conf" /etc/systemd/journald.conf
        exec /lib/systemd/systemd-journald
    ' </dev/null >>"$J/journald.out" 2>&1 &
    echo $! > "$J/journald.pid"
    for _ in $(seq 1 100); do
        [ -S "$J/sock/dev-log" ] && ls "$J"/runlog/journal/*/system.journal >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$J/journald.out" >&2
    die "journald did not start"
}

journald_down() { stop_pidfile "$DIR/journal/journald.pid" systemd-journald; }

# cgroup2 mount point with a writable system.slice/dovecot.service; prints its path.
# Only the directories it made are removed again (listed in DIR/cgroups-made).
cgroup_up() {
    local base d
    : > "$DIR/cgroups-made"
    for base in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        [ "$(stat -fc %T "$base" 2>/dev/null)" = cgroup2fs ] || continue
        for d in "$base/system.slice" "$base/system.slice/dovecot.service"; do
            [ -d "$d" ] || { mkdir "$d" 2>/dev/null && echo "$d" >> "$DIR/cgroups-made"; }
        done
        [ -w "$base/system.slice/dovecot.service/cgroup.procs" ] || continue
        echo "$base/system.slice/dovecot.service"
        return 0
    done
    return 1
}

cgroup_down() {
    [ -s "$DIR/cgroups-made" ] || return 0
    # Dovecot's children may take a moment to leave the cgroup after the master exits.
    tac "$DIR/cgroups-made" | while read -r d; do
        for _ in $(seq 1 30); do rmdir "$d" 2>/dev/null && break; sleep 0.1; done
    done
    rm -f "$DIR/cgroups-made"
}

case "$cmd" in
    up) up "${3:?mode}" "${4:?portbase}" ;;
    down) down ;;
    trixie-root) trixie_root ;;
    up24) up24 "${3:?root}" "${4:?portbase}" ;;
    down24) stop_pidfile "$DIR/run/master.pid" /rig/dovecot.conf ;;
    rsyslog-up) rsyslog_up ;;
    rsyslog-down) rsyslog_down ;;
    journald-up) journald_up ;;
    journald-down) journald_down ;;
    cgroup-up) cgroup_up ;;
    cgroup-down) cgroup_down ;;
    *) die "unknown command $cmd" ;;
esac
