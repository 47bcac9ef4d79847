#!/usr/bin/env bash
# The rootless rerun (as runc does): the privileged runtime, provisioner and magics suites
# and the security suite run again with the server as an unprivileged user, once with a
# subordinate id range (newuidmap/newgidmap) and once without (a single-id map).
#
# As root, this script: makes a world-readable copy of the checkout and a virtualenv from
# /usr/bin/python3 (the python3 on PATH may live in a private home); creates two users
# (sk-rl-XXXX with a subordinate range, sk-rl1-XXXX without); delegates a cgroup to each
# (`sandbox-kernel delegate`, as an admin would); runs the suites as each user
# (SANDBOX_KERNEL_TEST_ROOTLESS=1: tests marked root_only are left out); then removes the
# users, their delegations and the copy, and checks that nothing of them is left.
#
# Then, when the cgroup v2 guest is set up (make vm-setup), the cgroupv2 selection runs in it
# as an unprivileged user in a cgroup delegated as systemd would (tools/vm/rootless-guest.sh);
# SANDBOX_KERNEL_ROOTLESS_VM=0 leaves that out.
#
# Usage: tools/rootless-tests.sh [PYTEST ARGS...]   (default: the suites below)
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
if [ "$(id -u)" -ne 0 ]; then
  echo "rootless-tests: run as root (it creates the test users)" >&2
  exit 1
fi
SUITES=(tests/privileged/test_runtime.py tests/privileged/test_provisioner.py
        tests/privileged/test_magics.py tests/privileged/test_rootless_images.py
        tests/security)
[ $# -gt 0 ] && SUITES=("$@")
tag=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
USERS=("sk-rl-$tag" "sk-rl1-$tag")
# not under /tmp: the cgroup v2 guest mounts a tmpfs there, and it reads this copy too
WORK=$(mktemp -d /var/tmp/sk-rootless-XXXXXX)
status=0

cleanup() {
  for u in "${USERS[@]}"; do
    if id "$u" >/dev/null 2>&1; then
      "$WORK/venv/bin/sandbox-kernel" delegate --remove "$u" >/dev/null 2>&1
      pkill -KILL -u "$u" 2>/dev/null
      userdel -r "$u" >/dev/null 2>&1
    fi
    sed -i "/^$u:/d" /etc/subuid /etc/subgid
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== rootless: copy of the checkout and a virtualenv in $WORK"
chmod 755 "$WORK"
mkdir -p "$WORK/repo"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/repo" \
  || exit 1
mkdir -p "$WORK/repo/sandbox_kernel/runtime/_bin"
cp sandbox_kernel/runtime/_bin/sk-runtime "$WORK/repo/sandbox_kernel/runtime/_bin/" || exit 1
/usr/bin/python3 -m venv "$WORK/venv" || exit 1
"$WORK/venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$WORK/venv/bin/python" -m pip install -q -e "$WORK/repo[test]" >/dev/null 2>&1 || {
  echo "rootless: pip install failed" >&2; exit 1; }
chmod -R a+rX "$WORK"

for u in "${USERS[@]}"; do
  useradd -m -s /bin/sh "$u" || exit 1
done
# the second user has no subordinate range: the single-id map
sed -i "/^${USERS[1]}:/d" /etc/subuid /etc/subgid
for u in "${USERS[@]}"; do
  "$WORK/venv/bin/sandbox-kernel" delegate "$u" --memory 16G --pids 8192 >/dev/null || exit 1
done

for u in "${USERS[@]}"; do
  home=$(getent passwd "$u" | cut -d: -f6)
  echo "== rootless: ${SUITES[*]} as $u ($(grep -c "^$u:" /etc/subuid) subordinate range(s))"
  nosub=0; grep -q "^$u:" /etc/subuid || nosub=1
  ( cd "$WORK/repo" && runuser -u "$u" -- env -i PATH=/usr/bin:/bin HOME="$home" \
      CI="${CI:-}" SANDBOX_KERNEL_TEST_ROOTLESS=1 SANDBOX_KERNEL_TEST_NO_SUBIDS=$nosub \
      "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "${SUITES[@]}" ) || status=1
done

# the cgroupv2 selection as an unprivileged user in the pure v2 guest, in a cgroup delegated
# as systemd would (when the guest is set up: make vm-setup)
if [ -s .vm/current ] && [ "${SANDBOX_KERNEL_ROOTLESS_VM:-1}" = 1 ]; then
  mapfile -t V2 < <(grep -rlwE --include='test_*.py' 'cgroupv2' tests/ | sort)
  echo "== rootless: the cgroupv2 selection in the v2 guest (${V2[*]})"
  SANDBOX_KERNEL_VM_VENV="$WORK/venv" bash tools/vm/run-tests.sh --exec /bin/sh \
    "$WORK/repo/tools/vm/rootless-guest.sh" "$WORK" "${V2[@]}" || status=1
fi

uids=()
for u in "${USERS[@]}"; do uids+=("$(id -u "$u")"); done
cleanup
trap - EXIT
# nothing of the test users is left: accounts, subordinate ranges, delegated cgroups
for i in "${!USERS[@]}"; do
  u=${USERS[$i]}
  if id "$u" >/dev/null 2>&1 || grep -q "^$u:" /etc/subuid /etc/subgid \
     || ls -d /sys/fs/cgroup/*/sandbox-kernel/user-"${uids[$i]}" \
              /sys/fs/cgroup/sandbox-kernel/user-"${uids[$i]}" >/dev/null 2>&1; then
    echo "rootless: $u left something behind" >&2
    status=1
  fi
done
exit $status
