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
# Then the teaching hub (tests/hub): a real JupyterHub as root, with configurable-http-proxy
# (npm), spawns both users' servers as themselves; the product's pre_spawn_hook delegates
# their cgroups from a policy file. --hub runs only that phase.
#
# With --bench, the same users and copy serve the rootless benchmarks instead
# (benchmarks/rootless.py, as root, driving a worker as the first user) and the hub
# benchmark (benchmarks/hub.py: login to a ready kernel through JupyterHub): no suites.
#
# Usage: tools/rootless-tests.sh [PYTEST ARGS...]   (default: the suites below)
#        tools/rootless-tests.sh --hub
#        tools/rootless-tests.sh --bench [--rounds N] [--setups N] [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
if [ "$(id -u)" -ne 0 ]; then
  echo "rootless-tests: run as root (it creates the test users)" >&2
  exit 1
fi
SUITES=(tests/privileged/test_runtime.py tests/privileged/test_provisioner.py
        tests/privileged/test_magics.py tests/privileged/test_rootless_images.py
        tests/privileged/test_grading.py tests/privileged/test_soak.py
        tests/privileged/test_folder_quota.py tests/privileged/test_pool.py
        tests/privileged/test_output_flood.py tests/privileged/test_network_rootless.py
        tests/security)
BENCH=()
HUB_ONLY=0
if [ "${1:-}" = --bench ]; then
  shift
  BENCH=(--out "$SRC/benchmarks/results" "$@")
elif [ "${1:-}" = --hub ]; then
  HUB_ONLY=1
elif [ $# -gt 0 ]; then
  SUITES=("$@")
fi
tag=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
USERS=("sk-rl-$tag" "sk-rl1-$tag")
# not under /tmp: the cgroup v2 guest mounts a tmpfs there, and it reads this copy too
WORK=$(mktemp -d /var/tmp/sk-rootless-XXXXXX)
status=0

# where the test users' servers and tests write besides their homes: the private run root
# /tmp/sk-UID, pytest's temp dirs, the runtime tests' output files
SHARED_TMP=(/tmp /var/tmp /dev/shm)
declare -A UIDS=()

owned_by() {  # the top-level entries of the shared temp dirs owned by uid $1
  find "${SHARED_TMP[@]}" -xdev -mindepth 1 -maxdepth 1 -uid "$1" 2>/dev/null
}

# network nat without root: the upstream host of tests/privileged/test_network_rootless.py
# (a namespace on 198.19.9.0/24 joined to the host: a user cannot make one), and
# /dev/net/tun open to every user as Debian's udev rules make it (restored after)
UPSTREAM_PID=""
TUN_MODE=$(stat -c %a /dev/net/tun 2>/dev/null)
cleanup() {
  if [ -n "$UPSTREAM_PID" ]; then
    kill "$UPSTREAM_PID" 2>/dev/null; wait "$UPSTREAM_PID" 2>/dev/null; UPSTREAM_PID=""
  fi
  [ -n "$TUN_MODE" ] && chmod "$TUN_MODE" /dev/net/tun 2>/dev/null
  for u in "${USERS[@]}"; do
    if id "$u" >/dev/null 2>&1; then
      "$WORK/venv/bin/sandbox-kernel" delegate --remove "$u" >/dev/null 2>&1
      pkill -KILL -u "$u" 2>/dev/null
      userdel -r "$u" >/dev/null 2>&1
    fi
    getent group "$u" >/dev/null && groupdel "$u" >/dev/null 2>&1
    sed -i "/^$u:/d" /etc/subuid /etc/subgid
    # everything the user left in the shared temp dirs (the uid is this run's own)
    if [ -n "${UIDS[$u]:-}" ]; then
      owned_by "${UIDS[$u]}" | xargs -r -d '\n' rm -rf --
    fi
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
# the virtualenv as the system-wide install makes it (`make install`, JupyterLab included: the
# hub test opens it in a browser), editable, with the test extras
bash tools/install-system.sh --editable "$WORK/venv" "" "$WORK/repo[test,hub]" \
    >"$WORK/install.log" 2>&1 \
  || { tail -30 "$WORK/install.log" >&2; echo "rootless: the install failed" >&2; exit 1; }
chmod -R a+rX "$WORK"

# a uid no account has and that owns nothing in the shared temp dirs (what an earlier
# account with that uid left is not this run's to remove, nor to be mixed up with its own)
free_uid() {
  local uid
  for _ in $(seq 100); do
    uid=$((50000 + RANDOM % 9000))
    if ! getent passwd "$uid" >/dev/null && ! getent group "$uid" >/dev/null \
       && [ -z "$(owned_by "$uid")" ]; then
      echo "$uid"; return 0
    fi
  done
  return 1
}
for u in "${USERS[@]}"; do
  uid=$(free_uid) || { echo "rootless: no free uid for $u" >&2; exit 1; }
  groupadd -g "$uid" "$u" && useradd -m -u "$uid" -g "$uid" -s /bin/sh "$u" || exit 1
  UIDS[$u]=$uid
done
# the second user has no subordinate range: the single-id map
sed -i "/^${USERS[1]}:/d" /etc/subuid /etc/subgid
for u in "${USERS[@]}"; do
  "$WORK/venv/bin/sandbox-kernel" delegate "$u" --memory 16G --pids 8192 >/dev/null || exit 1
done

# configurable-http-proxy (npm) for the hub tests and the hub benchmark
install_proxy() {
  command -v npm >/dev/null || bash tools/install-deps.sh nodejs npm || return 1
  npm install --no-audit --no-fund --loglevel=error --prefix "$WORK/proxy" \
      configurable-http-proxy@4 >"$WORK/npm.log" 2>&1 \
    || { tail -20 "$WORK/npm.log" >&2; echo "hub: installing configurable-http-proxy failed" >&2; return 1; }
}
PROXY_BIN="$WORK/proxy/node_modules/.bin/configurable-http-proxy"
hub_bench() {  # benchmarks/hub.py as root against the first user's server; $@: its options
  ( cd "$WORK/repo" && "$WORK/venv/bin/python" -m benchmarks.hub --user "${USERS[0]}" \
      --prefix "$WORK/venv" --proxy "$PROXY_BIN" "$@" )
}

if [ ${#BENCH[@]} -gt 0 ]; then
  echo "== rootless: benchmarks, root mode against ${USERS[0]}'s rootless server"
  ( cd "$WORK/repo" && "$WORK/venv/bin/python" -m benchmarks.rootless --user "${USERS[0]}" \
      "${BENCH[@]}" ) || status=1
  echo "== hub: benchmarks, login to a ready kernel through JupyterHub as ${USERS[0]}"
  # the rootless options (--rounds, --setups) are not the hub benchmark's: only --quick and --out
  hub_opts=(--out "$SRC/benchmarks/results")
  for a in "${BENCH[@]}"; do [ "$a" = --quick ] && hub_opts+=(--quick); done
  { install_proxy && hub_bench "${hub_opts[@]}"; } || status=1
  cleanup
  trap - EXIT
  exit $status
fi

if [ $HUB_ONLY = 0 ]; then
  [ -n "$TUN_MODE" ] && chmod 0666 /dev/net/tun
  # the upstream ends (its namespace and veth removed) on SIGTERM
  ( cd "$WORK/repo" && exec "$WORK/venv/bin/python" -m tests.netupstream --rootless \
      </dev/null >"$WORK/upstream.log" 2>&1 ) &
  UPSTREAM_PID=$!
  for _ in $(seq 100); do grep -q ready "$WORK/upstream.log" 2>/dev/null && break; sleep 0.1; done
  grep -q ready "$WORK/upstream.log" || { cat "$WORK/upstream.log" >&2; echo "rootless: no upstream" >&2; status=1; }
fi
for u in "${USERS[@]}"; do
  [ $HUB_ONLY = 1 ] && break
  home=$(getent passwd "$u" | cut -d: -f6)
  echo "== rootless: ${SUITES[*]} as $u ($(grep -c "^$u:" /etc/subuid) subordinate range(s))"
  nosub=0; grep -q "^$u:" /etc/subuid || nosub=1
  ( cd "$WORK/repo" && runuser -u "$u" -- env -i PATH=/usr/bin:/bin HOME="$home" \
      CI="${CI:-}" SANDBOX_KERNEL_TEST_ROOTLESS=1 SANDBOX_KERNEL_TEST_NO_SUBIDS=$nosub \
      "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "${SUITES[@]}" ) || status=1
  # the README's rootless quick path, as written: the user's own id inside, its files its own
  got=$(cd "$home" && runuser -u "$u" -- env -i PATH=/usr/bin:/bin HOME="$home" \
      "$WORK/venv/bin/sandbox-kernel" run --volume "$home:/work:rw" --workdir /work host -- \
      /bin/sh -c 'id -u; touch /work/quickpath' 2>"$WORK/quickpath.err")
  if [ "$got" != "${UIDS[$u]}" ] || [ "$(stat -c %u "$home/quickpath" 2>/dev/null)" != "${UIDS[$u]}" ]; then
    echo "rootless: the quick path as $u: got '$got'; $(cat "$WORK/quickpath.err")" >&2
    status=1
  fi
done

# the teaching hub: JupyterHub as root spawns both users' servers as themselves
echo "== hub: tests/hub, JupyterHub spawning ${USERS[*]}"
if install_proxy; then
  ( cd "$WORK/repo" && env CI="${CI:-}" SANDBOX_KERNEL_HUB_USERS="${USERS[*]}" \
      SANDBOX_KERNEL_HUB_PREFIX="$WORK/venv" SANDBOX_KERNEL_HUB_KEEP_LOG="${SANDBOX_KERNEL_HUB_KEEP_LOG:-}" \
      SANDBOX_KERNEL_HUB_PROXY="$PROXY_BIN" \
      "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/hub ) || status=1
  # the hub benchmark's smoke run (its figures come from --bench on an idle machine)
  echo "== hub: benchmark smoke run (benchmarks/hub.py --quick) as ${USERS[0]}"
  hub_bench --quick --out "$WORK/bench" >/dev/null \
    || { echo "hub: the benchmark failed" >&2; status=1; }
else
  status=1
fi

# the rootless benchmark runs (a smoke run: its figures come from --bench on an idle machine)
if [ $HUB_ONLY = 0 ]; then
echo "== rootless: benchmark smoke run (benchmarks/rootless.py --quick) as ${USERS[0]}"
( cd "$WORK/repo" && "$WORK/venv/bin/python" -m benchmarks.rootless --user "${USERS[0]}" \
    --quick --out "$WORK/bench" >/dev/null ) || { echo "rootless: the benchmark failed" >&2; status=1; }
fi

# the cgroupv2 selection as an unprivileged user in the pure v2 guest, in a cgroup delegated
# as systemd would (when the guest is set up: make vm-setup)
if [ $HUB_ONLY = 0 ] && [ -s .vm/current ] && [ "${SANDBOX_KERNEL_ROOTLESS_VM:-1}" = 1 ]; then
  mapfile -t V2 < <(grep -rlwE --include='test_*.py' 'cgroupv2' tests/ | sort)
  echo "== rootless: the cgroupv2 selection in the v2 guest (${V2[*]})"
  SANDBOX_KERNEL_VM_VENV="$WORK/venv" bash tools/vm/run-tests.sh --exec /bin/sh \
    "$WORK/repo/tools/vm/rootless-guest.sh" "$WORK" "${V2[@]}" || status=1
fi

cleanup
trap - EXIT
# nothing of the test users is left: accounts, subordinate ranges, delegated cgroups, files
for u in "${USERS[@]}"; do
  uid=${UIDS[$u]}
  if id "$u" >/dev/null 2>&1 || getent group "$u" >/dev/null \
     || grep -q "^$u:" /etc/subuid /etc/subgid \
     || ls -d /sys/fs/cgroup/*/sandbox-kernel/user-"$uid" \
              /sys/fs/cgroup/sandbox-kernel/user-"$uid" >/dev/null 2>&1 \
     || [ -n "$(owned_by "$uid")" ]; then
    echo "rootless: $u left something behind" >&2
    status=1
  fi
done
exit $status
