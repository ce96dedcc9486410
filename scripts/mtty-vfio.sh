#!/bin/bash
# Runs minivmm's kernel-VFIO backend on a real host against the kernel's mtty sample (a
# virtual dual-port 16550 PCI device behind VFIO's emulated IOMMU, so no hardware IOMMU is
# needed) and checks what the `mtty` guest reports, not only minivmm's exit code:
#   1. boot: the guest's reading of the config space (4348:3253, class 070002, the
#      "PCI Serial/UART" tag), INTx loopback rounds with exactly one interrupt each, UART
#      state read back;
#   2. migration (MIGRATE=1, default): a second mdev for a `minivmm receive` on this host,
#      the guest leaves bytes in both FIFOs and scratch values, migrates (pre-copy, or
#      PRE_COPY=off for stop-copy only) and reads them back on the destination, heartbeats
#      contiguous across both serial logs.
# The same checks run on every build machine against vfio-model, an LD_PRELOAD model of
# this kernel side (vmm/tests/kernel_vfio_model.rs); only this script meets the real one.
#
# Kernel: CONFIG_VFIO, CONFIG_VFIO_IOMMU_TYPE1, CONFIG_VFIO_MDEV, CONFIG_KVM_VFIO and
# CONFIG_SAMPLE_VFIO_MDEV_MTTY (=m; rarely shipped by distributions), Linux >= 6.7 (mtty's
# migration support). Needs root, /dev/kvm and /dev/vfio; refuses with a reason otherwise.
# Every mdev it creates is removed on exit, however the run ends.
#
# Usage: scripts/mtty-vfio.sh [extra minivmm run arguments...]
# Env:   MINIVMM=path/to/minivmm   (default: target/release or target/debug, else cargo build)
#        MTTY_TYPE=mtty-2          mdev type (the guest needs two ports)
#        MEMORY=256M
#        MIGRATE=1                 0: boot checks only
#        PRE_COPY=on               off: migrate the device in stop-copy only
#        KEEP=DIR                  keep serial logs and stderr in DIR
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
mtty_type=${MTTY_TYPE:-mtty-2}
memory=${MEMORY:-256M}
migrate=${MIGRATE:-1}
pre_copy=${PRE_COPY:-on}
uuids=()
pids=()
work=""

log() { echo "mtty-vfio: $*" >&2; }
die() {
    log "$*"
    exit 2
}
bad() {
    log "FAILED: $*"
    exit 1
}

cleanup() {
    local p u
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    for u in "${uuids[@]}"; do
        if [ -e "/sys/bus/mdev/devices/$u/remove" ]; then
            log "removing mdev $u"
            echo 1 >"/sys/bus/mdev/devices/$u/remove" || log "could not remove mdev $u"
        fi
    done
    if [ -n "$work" ] && [ -z "${KEEP:-}" ]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check_host() {
    [ "$(id -u)" = 0 ] || die "must run as root (creates mdevs and opens /dev/vfio)"
    [ -e /dev/kvm ] || die "no /dev/kvm on this host"
    # Usually loaded on demand; try, and let the checks below explain a failure.
    modprobe -q vfio_iommu_type1 2>/dev/null || true
    [ -d /dev/vfio ] || die "no /dev/vfio: this kernel or host has no VFIO (CONFIG_VFIO, CONFIG_VFIO_IOMMU_TYPE1)"
    [ -e /dev/vfio/vfio ] || die "no /dev/vfio/vfio container device (modprobe vfio_iommu_type1?)"
    local v
    v=$(uname -r)
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%[!0-9]*}
    if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 7 ]; }; then
        log "kernel $v is older than 6.7; mtty there has no migration support"
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

# Creates an mdev, checks its IOMMU group, prints its sysfs path.
create_mdev() {
    local types=/sys/class/mdev_bus/mtty/mdev_supported_types/$mtty_type avail uuid
    avail=$(cat "$types/available_instances")
    [ "$avail" -gt 0 ] || die "no $mtty_type instances left (remove unused mdevs first)"
    uuid=$(cat /proc/sys/kernel/random/uuid)
    echo "$uuid" >"$types/create"
    uuids+=("$uuid")
    local dev=/sys/bus/mdev/devices/$uuid
    [ -L "$dev/iommu_group" ] || die "mdev $uuid has no IOMMU group (is vfio_iommu_type1 loaded?)"
    local group
    group=$(basename "$(readlink "$dev/iommu_group")")
    [ -e "/dev/vfio/$group" ] || die "/dev/vfio/$group missing for mdev $uuid (group $group)"
    log "created mdev $uuid ($mtty_type), IOMMU group $group"
    echo "$dev"
}

wait_line() { # FILE REGEX SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    bad "no line matching '$2' in $1 within $3 s: $(tail -5 "$1" 2>/dev/null)"
}

field() { # LINE KEY: the value of KEY= in a guest line
    sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"
}

# Checks one INTx line: ROUNDS rounds, one interrupt each.
check_intx() { # FILE PREFIX ROUNDS
    local l
    l=$(grep -m1 "^$2" "$1") || bad "no '$2' line in $1"
    [ "$(field "$l" rounds)" = "$3" ] && [ "$(field "$l" irqs)" = "$3" ] ||
        bad "INTx: want $3 interrupts for $3 rounds: $l"
    log "ok: $l"
}

check_config() { # FILE
    local want="MTTY ids vendor=0x4348 device=0x3253 class=0x70002 rev=0x10 subsys=0x4348:0x3253 pin=1"
    grep -q "^$want line=" "$1" || bad "config space: $(grep -m1 '^MTTY ids' "$1" || echo 'no MTTY ids line')"
    grep -qx "MTTY tag PCI Serial/UART" "$1" || bad "vendor bytes at 0x60: $(grep -m1 '^MTTY tag' "$1")"
    log "ok: $(grep -m1 '^MTTY ids' "$1")"
}

check_clean() { # FILE...
    if grep -hE "BAD|PANIC" "$@"; then
        bad "the guest reported a problem"
    fi
}

state_ok="MTTY state ok fifo0=12:minivmm-mtty fifo1=5:state scr=0x5a,0xa5 lcr1=0x1b"

check_host
minivmm=$(find_minivmm)
work=${KEEP:-$(mktemp -d)}
mkdir -p "$work"

# 1. Boot.
src_dev=$(create_mdev)
log "booting the mtty guest with $src_dev passed through"
set +e
"$minivmm" run --guest mtty --memory "$memory" --vfio "$src_dev" --cmdline "rounds=16 after=4" \
    --serial "file:$work/boot.serial" "$@" 2>"$work/boot.stderr"
rc=$?
set -e
[ "$rc" = 0 ] || bad "minivmm exited with $rc: $(tail -5 "$work/boot.stderr")"
check_clean "$work/boot.serial"
check_config "$work/boot.serial"
check_intx "$work/boot.serial" "MTTY intx ok " 16
grep -qx "$state_ok" "$work/boot.serial" || bad "UART state: $(grep -m1 '^MTTY state' "$work/boot.serial")"
check_intx "$work/boot.serial" "MTTY intx after ok " 4
log "boot checks passed"
[ "$migrate" = 1 ] || exit 0

# 2. Live migration with the device's state to a second minivmm with its own mdev.
dst_dev=$(create_mdev)
port=$((20000 + RANDOM % 20000))
addr=127.0.0.1:$port
opts=""
[ "$pre_copy" = off ] && opts=",pre-copy=off"
"$minivmm" receive --listen "$addr" --vfio "$dst_dev" --serial "file:$work/dst.serial" \
    >"$work/dst.stdout" 2>"$work/dst.stderr" &
dst_pid=$!
pids+=("$dst_pid")
sleep 1
"$minivmm" run --guest mtty --memory "$memory" --vfio "$src_dev$opts" --api-sock "$work/src.sock" \
    --cmdline "rounds=8 after=8 hold_ms=10000 hb_ms=50" --serial "file:$work/src.serial" "$@" \
    >"$work/src.stdout" 2>"$work/src.stderr" &
src_pid=$!
pids+=("$src_pid")
wait_line "$work/src.serial" "^MTTY loaded " 60
log "guest holds its UART state; migrating to $addr (device pre-copy $pre_copy)"
"$minivmm" migrate --api-sock "$work/src.sock" --to "$addr" || bad "minivmm migrate failed"
set +e
wait "$src_pid"
src_rc=$?
wait "$dst_pid"
dst_rc=$?
set -e
pids=()
[ "$src_rc" = 0 ] || bad "source exited with $src_rc: $(tail -5 "$work/src.stderr")"
[ "$dst_rc" = 0 ] || bad "destination exited with $dst_rc: $(tail -5 "$work/dst.stderr")"
grep -qE '"status": *"completed"' "$work/src.stdout" || bad "migration statistics: $(cat "$work/src.stdout")"
check_clean "$work/src.serial" "$work/dst.serial"
check_config "$work/src.serial"
grep -q "^MTTY state" "$work/src.serial" && bad "the source read the state back: the hold ended before the migration"
grep -qx "$state_ok" "$work/dst.serial" || bad "state on the destination: $(grep -m1 '^MTTY state' "$work/dst.serial" || echo none)"
log "ok: $state_ok (on the destination)"
check_intx "$work/dst.serial" "MTTY intx after ok " 8
# Heartbeats count up by one across both logs (a line may be split at the switchover).
cat "$work/src.serial" "$work/dst.serial" | grep -aoE '^HB [0-9]+$' | awk '
    { if ($2 != n) { print "heartbeat " n " expected, got " $2; exit 1 } n++ }
    END { if (n < 2) { print "too few heartbeats"; exit 1 } }' || bad "heartbeats broken"
log "migration checks passed (device pre-copy $pre_copy)"
