#!/bin/sh
# PID 1 of the cgroup v2 test guest (busybox sh in the initramfs built by tools/vm/setup.sh).
#
# Stage 1 (initramfs):
# 1. load virtio/9p/overlay modules (fixed order, no modules.dep);
# 2. mount the writable results share (tag sk-results) and source its params.sh, written by
#    run-tests.sh: SK_CGROUP (cgroup to run the command in), SK_COLLECT (guest files to bring
#    back) and `set -- <command argv>`;
# 3. build the guest root: the host's / over 9p (tag sk-hostroot, read-only) with a tmpfs overlay,
#    then proc, sys, devtmpfs, devpts, /dev/shm, /tmp and /run as tmpfs, the image store
#    /var/lib/sandbox-kernel as ext4 on a loop file, cgroup2 at /sys/fs/cgroup;
# 4. switch_root into it (a chroot would do for most things, but unshare(CLONE_NEWUSER) refuses
#    chrooted callers), re-running this script from /.sk-vm as stage 2.
# Stage 2 (guest root): run the command, output in /.sk-vm/results/output.log, exit status in
# /.sk-vm/results/status (the host's only trusted completion signal), then power off.
# Anything that goes wrong before the command runs is written to guest-error in the results.

if [ "$1" = stage2 ]; then
    PATH=/.sk-vm/bin
    RES=/.sk-vm/results
else
    PATH=/bin
    RES=/results
    /bin/busybox --install -s /bin
fi
export PATH

RESULTS_UP=0
log() { echo "sk-vm-guest: $*"; }
fail() {
    log "error: $*"
    if [ "$RESULTS_UP" = 1 ]; then
        echo "$*" > "$RES/guest-error"
        dmesg > "$RES/dmesg.log" 2>/dev/null
        sync
    fi
    poweroff -f
    sleep 5
    exit 1
}

run_command() {
    log "running: $*"
    # The command gets a fresh environment (params.sh passes it through `env -i`).
    sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sk "/sys/fs/cgroup$SK_CGROUP" "$@" \
        > "$RES/output.log" 2>&1 < /dev/null
    status=$?
    log "command exited with status $status"

    for f in $SK_COLLECT; do
        [ -e "$f" ] && cp "$f" "$RES/"
    done
    dmesg > "$RES/dmesg.log" 2>/dev/null
    echo "$status" > "$RES/status.tmp" && mv "$RES/status.tmp" "$RES/status"
    sync
    umount "$RES" 2>/dev/null
    poweroff -f
    sleep 5
}

if [ "$1" = stage2 ]; then
    RESULTS_UP=1
    SK_CGROUP=/
    . "$RES/params.sh"
    [ $# -gt 0 ] || fail "params.sh gave no command"
    run_command "$@"
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

P9OPTS=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$P9OPTS" sk-results /results || fail "cannot mount the results share"
RESULTS_UP=1
[ -r /results/params.sh ] || fail "no /results/params.sh"
SK_CGROUP=/
SK_REPO=
. /results/params.sh

# The host's root, read-only; its files do not change during a run, so let the guest cache them.
mkdir -p /mnt/lower /mnt/rw
mount -t 9p -o "ro,$P9OPTS,cache=loose" sk-hostroot /mnt/lower || fail "cannot mount the host root share"
mount -t tmpfs -o mode=755 sk-rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work sk-root /newroot \
    || fail "cannot mount the overlay root"

R=/newroot
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm $R/dev/shm
# devtmpfs lacks the symlinks udev/systemd would add (bash process substitution needs /dev/fd)
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
ln -sf /proc/kcore $R/dev/core
rm -f $R/dev/ptmx && ln -s pts/ptmx $R/dev/ptmx
# A checkout under /tmp or /run (a CI clone, say) would vanish under the guest's own tmpfs
# there: hold it aside and mount it back at the same path.
case "$SK_REPO" in
    /tmp/*|/run/*)
        mkdir -p /mnt/repo && mount --bind "$R$SK_REPO" /mnt/repo || fail "cannot hold $SK_REPO" ;;
esac
mount -t tmpfs -o mode=1777,nosuid,nodev tmp $R/tmp || fail "mount /tmp"
mount -t tmpfs -o mode=755,nosuid,nodev run $R/run || fail "mount /run"
case "$SK_REPO" in
    /tmp/*|/run/*)
        mkdir -p "$R$SK_REPO" && mount --bind /mnt/repo "$R$SK_REPO" || fail "cannot mount $SK_REPO back" ;;
esac
# The image store on ext4, as on a real host: root mode idmaps the image layers, which
# neither 9p, the overlay root nor tmpfs (before Linux 6.3) allow. A sparse loop file on a
# tmpfs of its own; mkfs is the host's.
mkdir -p $R/.sk-vm/store $R/var/lib/sandbox-kernel
mount -t tmpfs -o mode=700 sk-store $R/.sk-vm/store || fail "mount the store's tmpfs"
dd if=/dev/zero of=$R/.sk-vm/store/ext4.img bs=1M count=0 seek=1024 2>/dev/null \
    || fail "make the store's loop file"
chroot $R /sbin/mkfs.ext4 -q -F /.sk-vm/store/ext4.img || fail "mkfs.ext4 the store"
mount -t ext4 -o loop $R/.sk-vm/store/ext4.img $R/var/lib/sandbox-kernel \
    || fail "mount the store (ext4 on loop)"
# Same options systemd uses on a unified host.
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup \
    || mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
# /etc/mtab etc. come from the host; give the guest its own hostname.
echo sk-vm > /proc/sys/kernel/hostname

# Stage 2 needs busybox, this script and the results share inside the new root.
mkdir -p $R/.sk-vm/bin $R/.sk-vm/results
cp /bin/busybox $R/.sk-vm/bin/busybox
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/.sk-vm/bin/$a"; done
cp /init $R/.sk-vm/init
mount --move /results $R/.sk-vm/results || fail "cannot move the results share"
RES=$R/.sk-vm/results
RESULTS_UP=1

# Optionally run the command in a non-root cgroup with the controllers enabled down to it,
# like a process in a systemd unit on a real host (SANDBOX_KERNEL_VM_CGROUP on the host).
CG=$R/sys/fs/cgroup
if [ "$SK_CGROUP" != / ]; then
    path=""
    for part in $(echo "$SK_CGROUP" | tr / ' '); do
        for c in $(cat "$CG$path/cgroup.controllers"); do
            echo "+$c" > "$CG$path/cgroup.subtree_control" 2>/dev/null
        done
        path="$path/$part"
        mkdir -p "$CG$path" || fail "cannot create cgroup $path"
    done
fi

umount /proc /sys /dev 2>/dev/null
exec switch_root $R /.sk-vm/bin/sh /.sk-vm/init stage2
