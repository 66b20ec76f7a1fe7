# Booted containers for the system test (sourced by scripts/system-test).
# box_up NAME ROOT   : an overlay working copy of the cached ROOT (the cache stays clean),
#                      booted with systemd-nspawn on a private network (loopback only);
#                      waits until systemd reports the system up.
# box NAME CMD...    : runs CMD inside (all namespaces of the container's init).
# box_down NAME      : stops the container, unmounts and deletes the working copy.
# Everything lives under $RUN/NAME; box_down_all stops every box of the run (for the trap).

box_up() {
    local name=$1 root=$2 d="$RUN/$1" pid init
    mkdir -p "$d/upper" "$d/work" "$d/root"
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$d/upper,workdir=$d/work" "$d/root"
    # A fresh machine id per run: journald and the boot id are the container's own.
    tr -d '-' < /proc/sys/kernel/random/uuid > "$d/root/etc/machine-id"
    ln -sf /dev/null "$d/root/etc/systemd/system/systemd-firstboot.service"
    # Nothing configures the private network's links: do not wait for them at boot.
    ln -sf /dev/null "$d/root/etc/systemd/system/systemd-networkd-wait-online.service"
    box_cgroups "$d" > "$d/cgroups"
    # In its own cgroup: without a host systemd, nspawn roots the container's cgroups at
    # its own (payload/), so two containers started from one shell would share
    # /payload/system.slice/dovegate.service, and one's `systemctl stop` would wait for the
    # other's processes.
    (
        while read -r c; do echo "$BASHPID" > "$c/cgroup.procs"; done < "$d/cgroups"
        exec systemd-nspawn -q -D "$d/root" -M "$name" --boot --register=no --keep-unit \
            --private-network --console=pipe
    ) </dev/null > "$d/console.log" 2>&1 &
    echo $! > "$d/nspawn.pid"
    pid=$!
    for _ in $(seq 1 300); do
        init=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null | awk '{print $1}')
        [ -n "$init" ] && [ "$(readlink "/proc/$init/exe" 2>/dev/null)" != "" ] \
            && [ "$(cat /proc/"$init"/comm 2>/dev/null)" = systemd ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$d/console.log" >&2; die "$name: nspawn exited"; }
        sleep 0.1
    done
    [ -n "$init" ] || die "$name: no init in the container"
    echo "$init" > "$d/init.pid"
    local state=""
    for _ in $(seq 1 600); do
        state=$(box "$name" systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.1
    done
    case "$state" in
        running) ;;
        degraded) box "$name" systemctl list-units --failed --no-legend >&2 ;;
        *) cat "$d/console.log" >&2; die "$name: systemd did not come up (state: $state)" ;;
    esac
}

# box_cgroups DIR: makes a fresh cgroup per hierarchy that tracks processes (cgroup2 and
# v1 name=systemd, as the host has them) under the current one; prints their paths.
box_cgroups() {
    local tag base rel
    tag="dovegate-test-$(basename "$1")-$$"
    while IFS=: read -r _ ctrl rel; do
        case "$ctrl" in
            "") base=$(findmnt -t cgroup2 -n -o TARGET | head -1) ;;
            name=systemd) base=$(findmnt -t cgroup -n -o TARGET,OPTIONS | awk '/name=systemd/ {print $1; exit}') ;;
            *) continue ;;
        esac
        [ -n "$base" ] || continue
        mkdir -p "$base$rel/$tag" && echo "$base${rel%/}/$tag"
    done < /proc/self/cgroup
}

box() {
    local name=$1; shift
    nsenter -t "$(cat "$RUN/$name/init.pid")" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

box_down() {
    local d=$1 pid
    if [ -s "$d/nspawn.pid" ]; then
        pid=$(cat "$d/nspawn.pid")
        if grep -qa systemd-nspawn "/proc/$pid/cmdline" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    fi
    mountpoint -q "$d/root" && umount -l "$d/root"
    local c
    if [ -s "$d/cgroups" ]; then
        while read -r c; do find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; done < "$d/cgroups"
    fi
    rm -rf "$d"
}

# Every box of this run (the suites run in subshells: find them on disk).
box_down_all() {
    local d
    for d in "$RUN"/*/; do [ -e "$d/nspawn.pid" ] && box_down "${d%/}"; done
    return 0
}
