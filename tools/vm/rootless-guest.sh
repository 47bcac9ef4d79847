#!/bin/sh
# Inside the cgroup v2 guest, as root: the cgroupv2 selection again as an unprivileged user
# in a cgroup delegated to it as systemd would make it (Delegate=yes: the directory and the
# files of /sys/kernel/cgroup/delegate owned by the user, the controllers enabled above).
#
# Usage (by tools/rootless-tests.sh, through run-tests.sh --exec):
#   rootless-guest.sh WORK PYTEST-ARGS...
# WORK holds repo/ (a world-readable copy of the checkout) and venv/ (a virtualenv of
# /usr/bin/python3 with it installed), made on the host; the guest sees it read-only.
set -u
WORK=$1
shift
U=sk-v2rl
CG=/sys/fs/cgroup
SCOPE=$CG/sk-rootless.scope

useradd -m -s /bin/sh "$U" || exit 125
uid=$(id -u "$U")
grep -q "^$U:" /etc/subuid || echo "$U:200000:65536" >> /etc/subuid
grep -q "^$U:" /etc/subgid || echo "$U:200000:65536" >> /etc/subgid

for c in memory cpu pids; do echo "+$c" > "$CG/cgroup.subtree_control" || exit 125; done
mkdir -p "$SCOPE" || exit 125
chown "$U:" "$SCOPE" || exit 125
for f in $(cat /sys/kernel/cgroup/delegate 2>/dev/null || echo cgroup.procs cgroup.subtree_control cgroup.threads); do
    [ -e "$SCOPE/$f" ] && chown "$U:" "$SCOPE/$f"
done
echo $$ > "$SCOPE/cgroup.procs" || exit 125

cd "$WORK/repo" || exit 125
exec runuser -u "$U" -- env -i PATH=/usr/bin:/bin HOME="/home/$U" LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 SANDBOX_KERNEL_TEST_ROOTLESS=1 SANDBOX_KERNEL_IN_VM=1 \
    SANDBOX_KERNEL_CGROUP_MODE=v2 CI="${CI:-}" \
    "$WORK/venv/bin/python" -m pytest -m cgroupv2 -p no:cacheprovider "$@"
