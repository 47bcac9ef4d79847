#!/usr/bin/env bash
# Prepare everything the cgroup v2 test guest needs (idempotent).
#
#   tools/vm/setup.sh                   install host packages (root), fetch the kernel, build the initramfs
#   tools/vm/setup.sh --initramfs-only  only (re)build the initramfs from tools/vm/guest-init.sh
#   tools/vm/setup.sh --print-kernel    print the kernel version that would be used
#
# Environment:
#   SANDBOX_KERNEL_VM_DIR     cache directory (default: <repo>/.vm, git-ignored)
#   SANDBOX_KERNEL_VM_KERNEL  Debian kernel ABI name, e.g. 6.1.0-56-amd64
#                             (default: what linux-image-amd64 depends on, else the newest cached one)
#   SANDBOX_KERNEL_VM_NO_APT  1 = never call apt-get install (packages are managed elsewhere)
#
# Layout of the cache (keyed by kernel version):
#   $VM_DIR/kernels/<kver>/vmlinuz
#   $VM_DIR/kernels/<kver>/modules/*.ko      the few modules the guest loads
#   $VM_DIR/kernels/<kver>/initramfs.cpio.gz busybox + modules + guest-init.sh as /init
#   $VM_DIR/kernels/<kver>/initramfs.stamp   sha256 of the inputs of the initramfs
#   $VM_DIR/current                          the kernel version run-tests.sh boots
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))"
VM_DIR="${SANDBOX_KERNEL_VM_DIR:-$REPO/.vm}"

# Load order matters: there is no modules.dep in the initramfs (busybox insmod, not modprobe).
# Debian's 9p needs netfs and fscache; ext4 (the guest's image store, on a loop file: root
# mode idmaps image layers, which 9p, the overlay root and tmpfs before 6.3 cannot) needs
# crc16, mbcache, jbd2 and a crc32c driver loaded first. quota_tree and quota_v2 give ext4
# its project quotas (the notebook-folder quota tests; the CI host's own kernel lacks them).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         netfs fscache 9pnet 9pnet_virtio 9p overlay
         crc16 mbcache jbd2 crc32c_generic ext4 loop quota_tree quota_v2)
HOST_PACKAGES=(qemu-system-x86 busybox-static cpio)

log() { printf 'vm-setup: %s\n' "$*" >&2; }
die() { printf 'vm-setup: error: %s\n' "$*" >&2; exit 1; }

install_host_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod \
        && file_is_static /bin/busybox || missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "${SANDBOX_KERNEL_VM_NO_APT:-0}" = 1 ] || [ "$(id -u)" != 0 ]; then
        die "missing host packages: ${missing[*]} (apt-get install --no-install-recommends ${HOST_PACKAGES[*]})"
    fi
    log "installing ${HOST_PACKAGES[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${HOST_PACKAGES[@]}" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "${HOST_PACKAGES[@]}" >&2; }
}

file_is_static() {
    # busybox-static's binary has no program interpreter; the dynamic busybox package would not work
    # in the initramfs (no libc there).
    [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1
}

pick_kernel() {
    if [ -n "${SANDBOX_KERNEL_VM_KERNEL:-}" ]; then echo "$SANDBOX_KERNEL_VM_KERNEL"; return; fi
    local dep
    # A fresh container may have no apt lists yet: fetch them once (root only).
    if ! apt-cache show linux-image-amd64 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
            && [ "${SANDBOX_KERNEL_VM_NO_APT:-0}" != 1 ] && [ ! -e "$VM_DIR/current" ]; then
        log "no apt lists: apt-get update"
        apt-get update -q >&2 || true
    fi
    dep="$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1 || true)"
    if [ -z "$dep" ]; then
        dep="$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' 2>/dev/null \
            | awk '{print $1}' | sed 's/^linux-image-//' | sort -V | tail -n1 || true)"
    fi
    if [ -z "$dep" ] && [ -e "$VM_DIR/current" ]; then dep="$(cat "$VM_DIR/current")"; fi
    [ -n "$dep" ] || die "cannot find a Debian kernel package (apt-get update? or set SANDBOX_KERNEL_VM_KERNEL)"
    echo "$dep"
}

fetch_kernel() {
    local kver="$1" kdir="$VM_DIR/kernels/$1"
    if [ -s "$kdir/vmlinuz" ] && [ -e "$kdir/modules/.complete" ] \
            && [ "$(cat "$kdir/modules/order")" = "$(printf '%s\n' "${MODULES[@]}")" ]; then
        return 0
    fi
    log "fetching linux-image-$kver"
    local tmp
    tmp="$(mktemp -d "$VM_DIR/.fetch.XXXXXX")"
    # (the cache dir is usually not writable by apt's _apt user: download as the caller)
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$kver" >&2) \
        || { rm -rf "$tmp"; die "apt-get download linux-image-$kver failed"; }
    dpkg -x "$tmp"/linux-image-"$kver"_*.deb "$tmp/x"
    mkdir -p "$kdir/modules"
    cp "$tmp/x/boot/vmlinuz-$kver" "$kdir/vmlinuz.new" && mv "$kdir/vmlinuz.new" "$kdir/vmlinuz"
    cp "$tmp/x/boot/config-$kver" "$kdir/config"
    local m f
    for m in "${MODULES[@]}"; do
        f="$(find "$tmp/x/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)"
        [ -n "$f" ] || { rm -rf "$tmp"; die "module $m not found in linux-image-$kver"; }
        case "$f" in
            *.ko.xz) xz -dc "$f" > "$kdir/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" > "$kdir/modules/$m.ko" ;;
            *) cp "$f" "$kdir/modules/$m.ko" ;;
        esac
    done
    printf '%s\n' "${MODULES[@]}" > "$kdir/modules/order"
    touch "$kdir/modules/.complete"
    rm -rf "$tmp"
}

initramfs_inputs_hash() {
    local kdir="$1"
    { sha256sum "$HERE/guest-init.sh" /bin/busybox; cat "$kdir/modules/order"; } | sha256sum | cut -d' ' -f1
}

build_initramfs() {
    local kver="$1" kdir="$VM_DIR/kernels/$1"
    local want
    want="$(initramfs_inputs_hash "$kdir")"
    if [ -s "$kdir/initramfs.cpio.gz" ] && [ "$(cat "$kdir/initramfs.stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log "building initramfs for $kver"
    local root
    root="$(mktemp -d "$VM_DIR/.initramfs.XXXXXX")"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,newroot,results,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"   # /init installs the other applets itself
    cp "$kdir"/modules/*.ko "$kdir/modules/order" "$root/lib/modules/"
    cp "$HERE/guest-init.sh" "$root/init"
    chmod 755 "$root/init"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet --owner 0:0) | gzip -1 > "$kdir/initramfs.cpio.gz.new"
    mv "$kdir/initramfs.cpio.gz.new" "$kdir/initramfs.cpio.gz"
    echo "$want" > "$kdir/initramfs.stamp"
    rm -rf "$root"
}

main() {
    local mode=full
    case "${1:-}" in
        --initramfs-only) mode=initramfs ;;
        --print-kernel) pick_kernel; return 0 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; return 0 ;;
        "") ;;
        *) die "unknown argument: $1" ;;
    esac
    mkdir -p "$VM_DIR/kernels"
    local kver
    if [ "$mode" = initramfs ]; then
        [ -e "$VM_DIR/current" ] || die "no kernel cached in $VM_DIR: run tools/vm/setup.sh"
        kver="$(cat "$VM_DIR/current")"
    else
        install_host_packages
        kver="$(pick_kernel)"
        fetch_kernel "$kver"
    fi
    file_is_static /bin/busybox || die "/bin/busybox is not static (apt-get install busybox-static)"
    build_initramfs "$kver"
    echo "$kver" > "$VM_DIR/current.new" && mv "$VM_DIR/current.new" "$VM_DIR/current"
    log "ready: kernel $kver in $VM_DIR"
}

main "$@"
