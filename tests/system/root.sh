# Cached Debian roots for the system test (sourced by scripts/system-test).
# root_cached SUITE PKG... : prints the path of a complete cached root for SUITE with PKGs
# installed, building it first when missing. The cache key is the suite and the package
# list (and this recipe's version); a root is built under a temporary name and renamed only
# when complete, so an interrupted build is never used.
ROOT_RECIPE=1
CACHE=${DOVEGATE_TEST_CACHE:-/var/cache/dovegate-test}

debian_mirror() {
    local m
    m=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    [ -n "$m" ] || m=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    echo "${m:-http://deb.debian.org/debian}"
}

root_cached() {
    local suite=$1; shift
    local key dir tmp mirror
    key=$(printf '%s\n' "$ROOT_RECIPE" "$suite" "$@" | sha256sum | cut -c1-12)
    dir="$CACHE/root-$suite-$key"
    if [ -e "$dir/.complete" ]; then echo "$dir"; return 0; fi
    mirror=$(debian_mirror)
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/.building-$suite-XXXXXX")
    # It becomes the chroot's /: mktemp's 0700 would keep a package script that drops root
    # from reading /etc/passwd (exim4-config's check: "user mail was not found").
    chmod 0755 "$tmp"
    log "building the $suite root in $tmp (mirror $mirror; cached as $dir)"
    # First stage: a minimal base. Then the packages with apt inside, daemons never started.
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$tmp" "$mirror" \
        > "$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; return 1; }
    printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
    chmod +x "$tmp/usr/sbin/policy-rc.d"
    echo "postfix postfix/main_mailer_type select No configuration" > "$tmp/tmp/preseed"
    mount -t proc proc "$tmp/proc"
    if ! chroot "$tmp" /bin/sh -c "debconf-set-selections /tmp/preseed && apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $* \
            && apt-get clean" >> "$tmp.log" 2>&1; then
        umount "$tmp/proc"; tail -20 "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; return 1
    fi
    umount "$tmp/proc"
    rm -f "$tmp/usr/sbin/policy-rc.d" "$tmp/tmp/preseed"
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp.log"
    touch "$tmp/.complete"
    # Another run may have finished the same root meanwhile: keep the first.
    mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
    echo "$dir"
}
