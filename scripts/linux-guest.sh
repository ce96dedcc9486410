#!/bin/bash
# Builds the Linux guest kit for minivmm from Debian packages:
#   <cache>/bzImage            a Debian cloud kernel (linux-image-*-cloud-amd64)
#   <cache>/initramfs.cpio.gz  busybox + an /init that greets on the console and reboots
# Usage: scripts/linux-guest.sh [CACHE_DIR]   (default: <repo>/.cache/linux-guest)
# Env:   LINUX_PKG=linux-image-...  to pick another kernel package.
# Idempotent: when both files exist it only prints their paths.
# Progress goes to stderr; stdout gets exactly two lines: the bzImage and initramfs paths.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$root/.cache/linux-guest}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
kernel=$cache/bzImage
initramfs=$cache/initramfs.cpio.gz

log() { echo "linux-guest: $*" >&2; }

done_already() {
    [ -s "$kernel" ] && [ -s "$initramfs" ]
}

# Refreshes the package lists, at most once per run: they may be missing (fresh machine) or
# stale (a download 404s).
apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# The cloud metapackage depends on the current kernel ABI package, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_package() {
    if [ -n "${LINUX_PKG:-}" ]; then
        echo "$LINUX_PKG"
        return
    fi
    if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        apt_update
    fi
    apt-cache depends linux-image-cloud-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | sort -V | tail -n1
}

download() { # download DIR PKG
    (cd "$1" && apt-get download -q "$2" >&2) && return
    [ "$apt_updated" = 0 ] || return 1
    apt_update
    (cd "$1" && apt-get download -q "$2" >&2)
}

extract_kernel() { # extract_kernel WORK PKG
    local deb vmlinuz
    deb=$(ls "$1"/"$2"_*.deb)
    dpkg-deb -x "$deb" "$1/kernel"
    vmlinuz=$(ls "$1"/kernel/boot/vmlinuz-* | head -n1)
    [ -f "$vmlinuz" ] || { log "no /boot/vmlinuz-* in $deb"; exit 1; }
    cp "$vmlinuz" "$1/bzImage"
}

write_init() { # write_init ROOTFS
    cat >"$1/init" <<'EOF'
#!/bin/sh
# Kernels without a built-in /dev/console start init with no stdio: take the console from devtmpfs.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "minivmm-init: hello from Linux"
# Without ACPI, poweroff only halts the CPU; reboot goes through the i8042 (0xFE to port 0x64),
# which minivmm turns into a clean exit, or a triple fault.
reboot -f
poweroff -f
EOF
    chmod 755 "$1/init"
}

build_initramfs() { # build_initramfs WORK
    local deb rootfs=$1/rootfs bb applet
    deb=$(ls "$1"/busybox-static_*.deb)
    dpkg-deb -x "$deb" "$1/busybox"
    mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp}
    cp "$1/busybox/bin/busybox" "$rootfs/bin/busybox"
    for applet in sh mount echo reboot poweroff cat ls dmesg; do
        ln -s busybox "$rootfs/bin/$applet"
    done
    write_init "$rootfs"
    bb=$rootfs/bin/busybox
    # No cpio on a fresh Debian: busybox's own applet writes newc archives.
    (cd "$rootfs" && find . -mindepth 1 | sed "s|^\./||" | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) |
        gzip -9 >"$1/initramfs.cpio.gz"
}

build() {
    local pkg
    for tool in apt-get apt-cache dpkg-deb gzip; do
        command -v "$tool" >/dev/null || { log "needs $tool (Debian/Ubuntu)"; exit 1; }
    done
    # Global, not local: the EXIT trap runs after this function has returned.
    work=$(mktemp -d "$cache/.work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    pkg=$(kernel_package)
    [ -n "$pkg" ] || { log "no linux-image-*-cloud-amd64 package found"; exit 1; }
    log "downloading $pkg and busybox-static"
    download "$work" "$pkg"
    download "$work" busybox-static
    extract_kernel "$work" "$pkg"
    build_initramfs "$work"
    echo "$pkg" >"$work/kernel-package"
    # Rename into place last so an interrupted run never leaves a half-built kit that looks done.
    mv "$work/kernel-package" "$cache/kernel-package"
    mv "$work/initramfs.cpio.gz" "$initramfs"
    mv "$work/bzImage" "$kernel"
    log "built from $pkg"
}

if done_already; then
    log "cached in $cache"
else
    build
fi
echo "$kernel"
echo "$initramfs"
