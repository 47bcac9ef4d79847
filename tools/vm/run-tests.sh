#!/usr/bin/env bash
# Run the cgroup v2 test selection (pytest -m 'cgroupv2 or vmkernel') on a pure cgroup v2 kernel
# (vmkernel: tests that need what Debian's stock kernel has and the CI host's lacks).
#
#   tools/vm/run-tests.sh [PYTEST ARGS...]           in a QEMU guest (TCG), from any host
#   tools/vm/run-tests.sh --native [PYTEST ARGS...]  directly, on a host that is already pure v2
#   tools/vm/run-tests.sh --exec CMD [ARGS...]       run CMD in the guest instead of pytest (debugging;
#                                                    cwd = repo, same environment as the tests)
#   tools/vm/run-tests.sh --print-params [...]       print the guest's params.sh and exit (no boot)
#
# Default PYTEST ARGS: the test modules under tests/ that mention either marker (the same tests as
# `tests/ -m 'cgroupv2 or vmkernel'`, without importing the others). The selection is always narrowed
# by that -m.
# Exit status: pytest's, or 124 if the guest did not finish in time, 125 if it did not report.
#
# Environment (all optional):
#   SANDBOX_KERNEL_VM_DIR      cache dir from tools/vm/setup.sh (default <repo>/.vm)
#   SANDBOX_KERNEL_VM_VENV     virtualenv to run pytest with (default <repo>/.venv)
#   SANDBOX_KERNEL_VM_TIMEOUT  seconds before the guest is given up on (default 600)
#   SANDBOX_KERNEL_VM_MEMORY   guest memory in MiB (default 2048)
#   SANDBOX_KERNEL_VM_CPUS     guest vCPUs (default 2)
#   SANDBOX_KERNEL_VM_ACCEL    QEMU accelerator (default tcg,thread=multi; KVM does not work here)
#   SANDBOX_KERNEL_VM_QEMU_CPU QEMU CPU model (default max: RDRAND seeds the guest's RNG at once)
#   SANDBOX_KERNEL_VM_CGROUP   cgroup the tests run in (default /; e.g. /system.slice/ci.service
#                              puts them in a leaf with controllers enabled above it, as systemd does)
#   SANDBOX_KERNEL_VM_RESULTS  host dir for status, output.log, junit.xml, console.log, dmesg.log
#                              (default: a fresh dir under $SANDBOX_KERNEL_VM_DIR/runs, kept a day)
#   SANDBOX_KERNEL_VM_VERBOSE  1 = stream the guest console (and kernel messages) live
# Variables named SANDBOX_KERNEL_* (other than SANDBOX_KERNEL_VM_*), PYTEST_ADDOPTS and CI are passed
# to the tests; SANDBOX_KERNEL_CGROUP_MODE=v2 and SANDBOX_KERNEL_IN_VM=1 are always set in the guest.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))"
VM_DIR="${SANDBOX_KERNEL_VM_DIR:-$REPO/.vm}"
VENV="${SANDBOX_KERNEL_VM_VENV:-$REPO/.venv}"
TIMEOUT="${SANDBOX_KERNEL_VM_TIMEOUT:-600}"
MEMORY="${SANDBOX_KERNEL_VM_MEMORY:-2048}"
CPUS="${SANDBOX_KERNEL_VM_CPUS:-2}"
ACCEL="${SANDBOX_KERNEL_VM_ACCEL:-tcg,thread=multi}"
CGROUP="${SANDBOX_KERNEL_VM_CGROUP:-/}"
GUEST_JUNIT=/tmp/sk-vm-junit.xml

log() { printf 'vm-tests: %s\n' "$*" >&2; }
die() { printf 'vm-tests: error: %s\n' "$1" >&2; exit "${2:-125}"; }

NATIVE=0 EXEC=0 PRINT=0
while [ $# -gt 0 ]; do
    case "$1" in
        --native) NATIVE=1; shift ;;
        --exec) EXEC=1; shift; break ;;
        --print-params) PRINT=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) break ;;
    esac
done
if [ "$EXEC" = 1 ]; then
    [ $# -gt 0 ] || die "--exec needs a command" 2
    [ "$NATIVE" = 0 ] || die "--exec and --native do not mix" 2
elif [ $# -eq 0 ]; then
    # Same selection as `tests/ -m "$SELECTION"`, but only the test modules that mention a marker are
    # collected: importing every test module costs minutes under TCG. A test marked only through a
    # conftest hook is not found this way: pass tests/ explicitly for that.
    mapfile -t DEFAULT < <(cd "$REPO" && grep -rlwE --include='test_*.py' --include='*_test.py' \
        'cgroupv2|vmkernel' tests/ 2>/dev/null | sort)
    if [ ${#DEFAULT[@]} -gt 0 ]; then set -- "${DEFAULT[@]}"; else set -- tests/; fi
fi

PY="$VENV/bin/python"
[ -x "$PY" ] || die "no python in the virtualenv $VENV (set SANDBOX_KERNEL_VM_VENV)" 2
[ -x "$REPO/sandbox_kernel/runtime/_bin/sk-runtime" ] \
    || log "warning: $REPO/sandbox_kernel/runtime/_bin/sk-runtime is not built; tests that start containers will fail"
SELECTION='cgroupv2 or vmkernel'
PYTEST=(-m pytest -m "$SELECTION" -p no:cacheprovider)

# Environment the tests get (in both modes).
test_env() {
    local v
    while IFS= read -r v; do
        case "$v" in SANDBOX_KERNEL_VM_*|SANDBOX_KERNEL_CGROUP_MODE|SANDBOX_KERNEL_IN_VM) continue ;; esac
        printf '%s=%s\n' "$v" "${!v}"
    done < <(compgen -e | grep -E '^(SANDBOX_KERNEL_[A-Z0-9_]+|PYTEST_ADDOPTS|CI)$' || true)
    echo SANDBOX_KERNEL_CGROUP_MODE=v2
}

if [ "$NATIVE" = 1 ]; then
    fstype="$(stat -f -c %T /sys/fs/cgroup 2>/dev/null || true)"
    [ "$fstype" = cgroup2fs ] || die "--native needs a pure cgroup v2 host (/sys/fs/cgroup is '${fstype:-missing}', not cgroup2fs); run without --native to use the QEMU guest" 2
    [ "$(id -u)" = 0 ] || log "warning: not root; most cgroupv2 tests need root and will be skipped"
    mapfile -t ENVS < <(test_env)
    cd "$REPO"
    exec env "${ENVS[@]}" "$PY" "${PYTEST[@]}" "$@"
fi

mapfile -t ENVS < <(test_env)
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }   # POSIX single-quoting for the guest's busybox sh
write_params() {
    local cmd a
    if [ "$EXEC" = 1 ]; then cmd=("$@"); else cmd=("$PY" "${PYTEST[@]}" "--junitxml=$GUEST_JUNIT" "$@"); fi
    echo "# written by tools/vm/run-tests.sh"
    echo "SK_CGROUP=$(q "$CGROUP")"
    echo "SK_REPO=$(q "$REPO")"
    echo "SK_COLLECT=$(q "$GUEST_JUNIT")"
    printf 'set --'
    # The guest's PID 1 runs: env -i -C <repo> VARS... python -m pytest ...
    for a in /usr/bin/env -i -C "$REPO" \
            PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
            HOME=/root LANG=C.UTF-8 TERM=dumb COLUMNS=120 TMPDIR=/tmp VIRTUAL_ENV="$VENV" \
            SANDBOX_KERNEL_IN_VM=1 "${ENVS[@]}" "${cmd[@]}"; do
        printf ' %s' "$(q "$a")"
    done
    echo
}
if [ "$PRINT" = 1 ]; then write_params "$@"; exit 0; fi

# ---- QEMU guest -------------------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run tools/vm/setup.sh" 2
[ -s "$VM_DIR/current" ] || die "no guest kernel in $VM_DIR: run tools/vm/setup.sh" 2
KVER="$(cat "$VM_DIR/current")"
KDIR="$VM_DIR/kernels/$KVER"
[ -s "$KDIR/vmlinuz" ] || die "$KDIR/vmlinuz missing: run tools/vm/setup.sh" 2
# The initramfs embeds guest-init.sh: rebuild it (about a second, no network) if that changed.
SANDBOX_KERNEL_VM_DIR="$VM_DIR" "$HERE/setup.sh" --initramfs-only 2>/dev/null \
    || SANDBOX_KERNEL_VM_DIR="$VM_DIR" "$HERE/setup.sh" --initramfs-only

if [ -n "${SANDBOX_KERNEL_VM_RESULTS:-}" ]; then
    RESULTS="$SANDBOX_KERNEL_VM_RESULTS"
    mkdir -p "$RESULTS"
    rm -f "$RESULTS"/{status,status.tmp,output.log,junit.xml,console.log,dmesg.log,guest-error,params.sh}
else
    mkdir -p "$VM_DIR/runs"
    # drop runs older than a day (never a recent one: another run may be using it)
    find "$VM_DIR/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
    RESULTS="$(mktemp -d "$VM_DIR/runs/run.XXXXXX")"
fi
RESULTS="$(cd "$RESULTS" && pwd)"
write_params "$@" > "$RESULTS/params.sh"


APPEND="console=ttyS0 quiet loglevel=3 panic=-1 cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"
APPEND+=" random.trust_cpu=on mitigations=off tsc=reliable"
if [ "${SANDBOX_KERNEL_VM_VERBOSE:-0}" = 1 ]; then
    CONSOLE=(-chardev "stdio,id=con,signal=off,logfile=$RESULTS/console.log" -serial chardev:con)
    APPEND="${APPEND/ quiet loglevel=3/}"
else
    CONSOLE=(-serial "file:$RESULTS/console.log")
fi
QEMU=(qemu-system-x86_64 -name sk-vm -nodefaults -no-user-config -no-reboot
      -accel "$ACCEL" -cpu "${SANDBOX_KERNEL_VM_QEMU_CPU:-max}" -smp "$CPUS" -m "$MEMORY"
      -display none -monitor none "${CONSOLE[@]}"
      -kernel "$KDIR/vmlinuz" -initrd "$KDIR/initramfs.cpio.gz" -append "$APPEND"
      -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
      -device virtio-9p-pci,fsdev=hostroot,mount_tag=sk-hostroot
      -fsdev "local,id=results,path=$RESULTS,security_model=none,multidevs=remap"
      -device virtio-9p-pci,fsdev=results,mount_tag=sk-results)

if [ "$EXEC" = 1 ]; then what="$*"; else what="pytest -m '$SELECTION' $*"; fi
log "booting $KVER (${ACCEL%%,*}, ${CPUS} vCPUs, ${MEMORY} MiB, timeout ${TIMEOUT}s): $what"
log "results: $RESULTS"
start=$SECONDS
set +e
timeout --kill-after=15 "$TIMEOUT" "${QEMU[@]}" < /dev/null
qrc=$?
set -e
elapsed=$((SECONDS - start))

show_failure() {
    if [ -s "$RESULTS/guest-error" ]; then log "guest error: $(cat "$RESULTS/guest-error")"; fi
    if [ -s "$RESULTS/output.log" ]; then
        log "---- last lines of the test output ----"; tail -n 60 "$RESULTS/output.log" >&2
    fi
    if [ -s "$RESULTS/console.log" ]; then
        log "---- last lines of the guest console ----"; tail -n 40 "$RESULTS/console.log" >&2
    fi
}

if [ ! -s "$RESULTS/status" ]; then
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
        show_failure
        die "the guest did not come back within ${TIMEOUT}s (SANDBOX_KERNEL_VM_TIMEOUT); results in $RESULTS" 124
    fi
    show_failure
    die "the guest stopped after ${elapsed}s without reporting a test status (qemu exit $qrc); results in $RESULTS" 125
fi

status="$(cat "$RESULTS/status")"
cat "$RESULTS/output.log"
[ -e "$RESULTS/sk-vm-junit.xml" ] && mv "$RESULTS/sk-vm-junit.xml" "$RESULTS/junit.xml"
log "guest ${what%% *} exited with status $status after ${elapsed}s; results in $RESULTS"
case "$status" in ''|*[!0-9]*) die "unreadable status '$status'" 125 ;; esac
exit "$status"
