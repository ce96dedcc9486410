#!/bin/bash
# Boots a minivmm guest with a kernel-VFIO device passed through, using the kernel's mtty
# sample (a virtual dual-port 16550 PCI device; CONFIG_SAMPLE_VFIO_MDEV_MTTY, Linux >= 6.7 for
# the mdev/vfio layout this relies on). Needs root, /dev/vfio and the mtty module; refuses
# with a reason otherwise. The mdev it creates is removed on exit, however the run ends.
#
# Usage: scripts/mtty-vfio.sh [extra minivmm run arguments...]
# Env:   MINIVMM=path/to/minivmm   (default: target/release or target/debug, else cargo build)
#        GUEST=hello               embedded test guest to boot
#        MTTY_TYPE=mtty-2          mdev type (mtty-1: one port, mtty-2: two ports)
#        MEMORY=256M
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
guest=${GUEST:-hello}
mtty_type=${MTTY_TYPE:-mtty-2}
memory=${MEMORY:-256M}
uuid=""

log() { echo "mtty-vfio: $*" >&2; }
die() {
    log "$*"
    exit 2
}

cleanup() {
    if [ -n "$uuid" ] && [ -e "/sys/bus/mdev/devices/$uuid/remove" ]; then
        log "removing mdev $uuid"
        echo 1 >"/sys/bus/mdev/devices/$uuid/remove" || log "could not remove mdev $uuid"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check_host() {
    [ "$(id -u)" = 0 ] || die "must run as root (creates an mdev and opens /dev/vfio)"
    [ -e /dev/kvm ] || die "no /dev/kvm on this host"
    # Usually loaded on demand; try, and let the checks below explain a failure.
    modprobe -q vfio_iommu_type1 2>/dev/null || true
    [ -d /dev/vfio ] || die "no /dev/vfio: this kernel or host has no VFIO (load vfio, vfio_iommu_type1)"
    [ -e /dev/vfio/vfio ] || die "no /dev/vfio/vfio container device (modprobe vfio_iommu_type1?)"
    local v
    v=$(uname -r)
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%[!0-9]*}
    if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 7 ]; }; then
        log "kernel $v is older than 6.7; the mtty sample may not work there"
    fi
    if [ ! -d /sys/class/mdev_bus/mtty ]; then
        modprobe mtty 2>/dev/null ||
            die "cannot load the mtty module: this kernel lacks CONFIG_SAMPLE_VFIO_MDEV_MTTY"
    fi
    [ -d "/sys/class/mdev_bus/mtty/mdev_supported_types/$mtty_type" ] ||
        die "mdev type $mtty_type not offered by mtty (see /sys/class/mdev_bus/mtty/mdev_supported_types)"
}

find_minivmm() {
    if [ -n "${MINIVMM:-}" ]; then
        [ -x "$MINIVMM" ] || die "MINIVMM=$MINIVMM is not executable"
        echo "$MINIVMM"
        return
    fi
    for b in "$root/target/release/minivmm" "$root/target/debug/minivmm"; do
        if [ -x "$b" ]; then
            echo "$b"
            return
        fi
    done
    log "building minivmm"
    (cd "$root" && cargo build --release -p minivmm >&2)
    echo "$root/target/release/minivmm"
}

create_mdev() {
    local avail
    avail=$(cat "/sys/class/mdev_bus/mtty/mdev_supported_types/$mtty_type/available_instances")
    [ "$avail" -gt 0 ] || die "no $mtty_type instances left (remove unused mdevs first)"
    uuid=$(cat /proc/sys/kernel/random/uuid)
    echo "$uuid" >"/sys/class/mdev_bus/mtty/mdev_supported_types/$mtty_type/create"
    log "created mdev $uuid ($mtty_type)"
}

check_group() {
    local dev=/sys/bus/mdev/devices/$uuid
    [ -L "$dev/iommu_group" ] || die "mdev $uuid has no IOMMU group (is vfio_iommu_type1 loaded?)"
    local group
    group=$(basename "$(readlink "$dev/iommu_group")")
    [ -e "/dev/vfio/$group" ] || die "/dev/vfio/$group missing for mdev $uuid (group $group)"
    log "mdev $uuid is in IOMMU group $group (/dev/vfio/$group)"
}

check_host
minivmm=$(find_minivmm)
create_mdev
check_group
log "booting guest '$guest' with /sys/bus/mdev/devices/$uuid passed through"
# Not exec: the EXIT trap must still remove the mdev when minivmm ends.
set +e
"$minivmm" run --guest "$guest" --memory "$memory" --vfio "/sys/bus/mdev/devices/$uuid" "$@"
rc=$?
set -e
log "minivmm exited with $rc"
exit "$rc"
