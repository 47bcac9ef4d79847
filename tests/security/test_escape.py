"""Adversarial suite: real escape attempts made from inside running containers.

Every case starts a container of the built-in ``host`` pseudo-image (host /usr and /etc,
read-only), runs one attempt of ``escape_probes.py`` inside it (as the unprivileged kernel
user 65534 and, where the product allows it, as container root with every capability
dropped) and asserts the exact way the attempt fails: an errno name, an absence, a
signal. Each case names the attack class or CVE it covers; ``README.md`` lists them.

The probe code refuses to run outside a sandbox (exit 99): PID 1 must be ``sk-runtime``,
no_new_privs set, no effective capability and the hostname the unique one chosen here.
It is never run on the host. After each case the host is checked: hostname, mount table,
the executor binary, host-global knobs (core_pattern, modprobe, release_agent).

A case that fails here is a sandbox hole and a release blocker: do not relax it, fix the
layer that should have stopped it.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import RuntimeStartError, SandboxError, SpecError
from sandbox_kernel.paths import new_container_id, run_dir, state_dir
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container, ExitResult
from sandbox_kernel.runtime.executor import runtime_binary
from sandbox_kernel.runtime.spec import (
    DEFAULT_MASKED_PATHS,
    DEFAULT_READONLY_PATHS,
    Bind,
    ContainerSpec,
    Limits,
)
from tests.hostmounts import host_mounts

MIB = 1024 * 1024
PY = "/usr/bin/python3"
PROBES = Path(__file__).with_name("escape_probes.py")
PROBE_SOURCE = PROBES.read_text()
REFUSED = 99

USERS: dict[str, dict[str, Any]] = {
    "nobody": {"user": 65534, "group": 65534},
    "root": {"user": 0, "group": 0, "allow_root": True},
}
#: Rootless with a single-id map: only the caller's own ids exist, and they own what init
#: makes (there is no root inside: the rootless conftest leaves the root cases out).
SINGLE_MAP = not userns.for_caller().has_root
if SINGLE_MAP:
    USERS["nobody"] = {"user": os.geteuid(), "group": os.getegid()}
#: What the unprivileged user gets where a single-id map makes it the owner: the write
#: still fails, for want of a capability (EPERM) or because the mount is read-only.
OWNER_DENIED = {"EACCES", "EPERM", "EROFS"} if SINGLE_MAP else {"EACCES"}

# ---- helpers (own copies: the privileged runtime tests are not imported) ------------------


def make_spec(command: list[str], **kw: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=tuple(command),
        mounts=hostimage.binds(),
        hostname="esc-" + secrets.token_hex(4),
        **USERS["nobody"],
    )
    if "mounts" in kw:
        kw["mounts"] = (*hostimage.binds(), *kw["mounts"])
    base.update(kw)
    # the product's default: a user namespace (root mode as root, rootless otherwise)
    return userns.for_caller().apply(ContainerSpec(**base))


def probe_spec(
    attempt: str, args: dict[str, Any] | None = None, *, who: str = "nobody", **kw: Any
) -> ContainerSpec:
    """A spec running one attempt of escape_probes.py, with the guard's unique hostname."""
    hostname = "esc-" + secrets.token_hex(6)
    env = (("SK_PROBE_HOSTNAME", hostname), ("SK_PROBE_ARGS", json.dumps(args or {})))
    return make_spec(
        [PY, "-c", PROBE_SOURCE, attempt], hostname=hostname, env=env, **USERS[who], **kw
    )


def parse(text: str) -> dict[str, str] | None:
    if "REFUSED: not in a sandbox" in text:
        pytest.fail(f"the probe's guard refused to run inside the container: {text}")
    for line in reversed(text.splitlines()):
        if line.startswith("SK-RESULT "):
            result: dict[str, str] = json.loads(line[len("SK-RESULT ") :])
            return result
    return None


def probe(
    attempt: str,
    args: dict[str, Any] | None = None,
    *,
    who: str = "nobody",
    timeout: float = 90,
    **kw: Any,
) -> tuple[ExitResult, dict[str, str] | None, str]:
    spec = probe_spec(attempt, args, who=who, **kw)
    out_path = Path(f"/tmp/{spec.id}.out")
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            result = c.wait(timeout)
            out.seek(0)
            text = out.read()
    finally:
        out_path.unlink(missing_ok=True)
    return result, parse(text), text


def probe_ok(attempt: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, str]:
    result, data, text = probe(attempt, args, **kw)
    assert result.status == 0 and data is not None, (
        f"probe {attempt} did not report ({result.reason()}): {text}"
    )
    return data


def check(data: dict[str, str], expected: dict[str, set[str]]) -> None:
    """Every operation failed in one of its stated ways; the same operations were tried."""
    assert set(data) == set(expected), f"operations differ: {sorted(data)} != {sorted(expected)}"
    wrong = {op: got for op, got in data.items() if got not in expected[op]}
    assert not wrong, "HOLE or unexpected outcome: " + "; ".join(
        f"{op}: got {got}, expected {sorted(expected[op])}" for op, got in wrong.items()
    )


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")


def _host_knobs() -> dict[str, Any]:
    knobs: dict[str, Any] = {"hostname": socket.gethostname(), "mountinfo": host_mounts()}
    for path in (
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/etc/shadow",
    ):
        knobs[path] = _read(path)
    for d in sorted(Path("/sys/fs/cgroup").glob("*/release_agent")):
        knobs[str(d)] = _read(str(d))
    layer = hostimage.layer_dir()  # the image's lower layer: container writes go to the upper
    knobs["host-layer"] = sorted(str(p.relative_to(layer)) for p in layer.rglob("*"))
    return knobs


def _executor_identity() -> tuple[int | None, str | None]:
    try:
        path = runtime_binary()
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_ino, hashlib.sha256(f.read()).hexdigest()
    except (OSError, SandboxError):
        return None, None


@pytest.fixture(autouse=True)
def host_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each case the host is as it was: hostname, mounts, executor binary, global knobs."""
    if os.geteuid() != 0 or "privileged" not in request.keywords:
        yield
        return
    before = _host_knobs()
    exe_before = _executor_identity()
    yield
    after = _host_knobs()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after.get(k)}
    exe_after = _executor_identity()
    # CVE-2019-5736 overwrites the executor in place (same inode); a rebuild by `make native`
    # (other suites run concurrently) writes a new file and is not a finding
    if exe_before[0] == exe_after[0] and exe_before[0] is not None and exe_before != exe_after:
        changed["executor binary"] = (exe_before, exe_after)
    assert not changed, f"the host changed: {changed}"


def both_users(cases: list[Case]) -> list[Any]:
    params = []
    for case in cases:
        for who in ("nobody", "root"):
            expected = case.nobody if who == "nobody" else case.root
            if expected is None:
                continue
            params.append(pytest.param(case, who, expected, id=f"{case.id}-{who}"))
    return params


# ---- cases that are one attempt each, with fixed outcomes ----------------------------------

EPERM = {"EPERM"}
EACCES = {"EACCES"}
EROFS = {"EROFS"}
#: What container root gets on a read-only host file: EROFS, or first EACCES, since in its
#: user namespace the host's files are not root's.
ROOT_RO = {"EROFS", "EACCES"}
ENOENT = {"ENOENT"}
EAFNO = {"EAFNOSUPPORT"}


@dataclass(frozen=True)
class Case:
    id: str
    attack: str  # attack class / CVE
    attempt: str
    nobody: dict[str, set[str]]
    root: dict[str, set[str]] | None = None  # None: only as the kernel user
    args: dict[str, Any] = field(default_factory=dict)
    kw: dict[str, Any] = field(default_factory=dict)


def same(d: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return d, d


NS_FLAGS = {
    "mnt": 0x00020000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "net": 0x40000000,
    "pid": 0x20000000,
    "cgroup": 0x02000000,
    "user": 0x10000000,
    "time": 0x00000080,
}


def if_host_has(path: str, present: set[str], absent: set[str]) -> set[str]:
    """The host kernel decides whether some /proc and /sys files exist at all."""
    return present if os.path.exists(path) else absent


PROC1 = {
    "/proc/1/environ": EACCES,
    "/proc/1/mem": EACCES,
    "/proc/1/root readlink": EACCES,
    "/proc/1/root listdir": EACCES,
    "/proc/1/root/etc/hostname": EACCES,
    "/proc/1/cwd listdir": EACCES,
    "/proc/1/map_files": {"EACCES", "EPERM"},
}

CASES: list[Case] = [
    Case(
        "mount-tmpfs",
        "mount(2) over a path: undo masks/read-only views",
        "mount_tmpfs",
        *same({"mount": EPERM}),
    ),
    Case(
        "remount-usr-rw",
        "MS_REMOUNT|MS_BIND to make the host's read-only /usr writable",
        "remount_usr_rw",
        *same({"mount": EPERM}),
    ),
    Case(
        "umount-proc",
        "umount2(/proc) to reveal what a mask hides (CVE-2019-16884 class)",
        "umount_proc",
        *same({"umount2": EPERM}),
    ),
    Case(
        "pivot-root",
        "pivot_root(2) back out of the container root",
        "pivot_root",
        *same({"pivot_root": EPERM}),
    ),
    Case(
        "new-mount-api",
        "fsopen/fsconfig (CVE-2022-0185), open_tree/move_mount/fspick/mount_setattr",
        "new_mount_api",
        *same({k: EPERM for k in ("fsopen", "open_tree", "move_mount", "fspick", "mount_setattr")}),
    ),
    Case(
        "mount-cgroupfs",
        "CVE-2022-0492: mount a fresh cgroup fs to reach release_agent",
        "mount_cgroupfs",
        *same({"cgroup v1": EPERM, "cgroup2": EPERM}),
    ),
    Case(
        "chroot",
        "chroot(2) breakout building block (double-chroot class)",
        "chroot",
        *same({"chroot": EPERM}),
    ),
    *[
        Case(
            f"unshare-{name}",
            f"unshare(CLONE_NEW{name.upper()}): namespace creation unlocks kernel surface"
            + (" (CVE-2022-0185, CVE-2023-32233 need a user ns)" if name == "user" else ""),
            "unshare",
            *same({"unshare": EPERM}),
            args={"flag": flag},
        )
        for name, flag in NS_FLAGS.items()
    ],
    Case(
        "userns-maps",
        "rewrite uid_map/gid_map/setgroups to map host root in; nested user namespaces",
        "userns_maps",
        *same(
            {
                "write uid_map": EPERM,
                "write gid_map": EPERM,
                "write setgroups": {"EPERM", "EACCES", "EROFS"},
                # no new user namespace inside, whatever the seccomp filter lets through
                "max_user_namespaces": {"0"},
                "host root mapped": {"no"},
            }
        ),
    ),
    Case(
        "clone-newuser",
        "clone(2) with CLONE_NEWUSER (namespace flags through clone)",
        "clone_newuser",
        *same({"clone": EPERM}),
    ),
    Case(
        "clone3-newuser",
        "clone3(2) hides flags behind a pointer: must be ENOSYS",
        "clone3_newuser",
        *same({"clone3": {"ENOSYS"}}),
    ),
    Case(
        "setns-init",
        "setns(2) into /proc/1/ns/* (nsenter-style re-entry)",
        "setns",
        *same(
            {
                **{
                    f"open /proc/1/ns/{ns}": EACCES
                    for ns in ("mnt", "net", "pid", "user", "cgroup")
                },
                "setns(self net)": EPERM,
            }
        ),
    ),
    Case(
        "ptrace-init",
        "ptrace(PTRACE_ATTACH) of PID 1 (init holds CAP_KILL)",
        "ptrace_init",
        *same({"PTRACE_ATTACH 1": EPERM}),
    ),
    Case(
        "process-vm-init",
        "process_vm_readv/writev and kcmp on PID 1",
        "process_vm_init",
        *same({"process_vm_readv": EPERM, "process_vm_writev": EPERM, "kcmp": EPERM}),
    ),
    Case(
        "pidfd-getfd-init",
        "pidfd_getfd(2): steal an fd of PID 1",
        "pidfd_getfd_init",
        *same({"pidfd_open": {"OK"}, "pidfd_getfd": EPERM}),
    ),
    Case(
        "proc1-files",
        "/proc/1/{environ,mem,root,cwd,fd,map_files} of the non-dumpable init",
        "proc1_files",
        {**PROC1, "/proc/1/fd listdir": EACCES, "/proc/1/fd/N follow": {"none listed"}},
        # same uid as init: readdir of /proc/1/fd has no ptrace check (fd numbers only);
        # following any of them must still be refused
        {
            **PROC1,
            "/proc/1/fd listdir": {"OK", "EACCES"},
            "/proc/1/fd/N follow": {"EACCES", "none listed"},
        },
    ),
    Case(
        "tiocsti",
        "TIOCSTI terminal injection incl. high bits in the request (CVE-2017-5226 class)",
        "tiocsti",
        *same(
            {
                "TIOCSTI pty": EPERM,
                "TIOCSTI high bits 0x1_00005412": EPERM,
                "TIOCSTI high bits 0xffffffff_00005412": EPERM,
                "TIOCSTI stdin": EPERM,
                "echoed": {"none"},
            }
        ),
    ),
    Case(
        "tty-ldisc",
        "TIOCSETD line disciplines (CVE-2023-6546 n_gsm, CVE-2017-2636 n_hdlc), TIOCLINUX",
        "tty_line_discipline",
        *same({"TIOCSETD N_GSM": EPERM, "TIOCLINUX": EPERM}),
    ),
    Case(
        "keyrings",
        "add_key/keyctl/request_key: the keyring is not namespaced (CVE-2016-0728 class)",
        "keyrings",
        *same({"add_key": EPERM, "keyctl": EPERM, "request_key": EPERM}),
    ),
    Case(
        "bpf",
        "bpf(2): verifier exploits (CVE-2021-3490, CVE-2022-23222 class)",
        "bpf",
        *same({"BPF_MAP_CREATE": EPERM, "BPF_PROG_LOAD": EPERM}),
    ),
    Case(
        "perf-event-open",
        "perf_event_open(2): CVE-2013-2094 / CVE-2023-2235 class",
        "perf_event_open",
        *same({"perf_event_open": EPERM}),
    ),
    Case(
        "kernel-modules",
        "init_module/finit_module/delete_module: code into the host kernel",
        "kernel_modules",
        *same({"init_module": EPERM, "finit_module": EPERM, "delete_module": EPERM}),
    ),
    Case(
        "kexec",
        "kexec_load/kexec_file_load: replace the host kernel",
        "kexec",
        *same({"kexec_load": EPERM, "kexec_file_load": EPERM}),
    ),
    Case(
        "raw-sockets",
        "AF_PACKET (CVE-2020-14386, CVE-2017-7308), SOCK_RAW, AF_VSOCK (CVE-2021-26708), AF_ALG",
        "raw_sockets",
        *same(
            {
                "AF_PACKET SOCK_RAW": EAFNO,
                "AF_PACKET SOCK_DGRAM": EAFNO,
                "AF_INET SOCK_RAW": EPERM,
                "AF_INET6 SOCK_RAW": EPERM,
                "AF_VSOCK": EAFNO,
                "AF_ALG": EAFNO,
            }
        ),
    ),
    Case(
        "mknod",
        "mknod of block/char devices (raw disk or /dev/mem access)",
        "mknod",
        {
            "/tmp/sk-sda": EPERM,
            "/tmp/sk-mem": EPERM,
            "/dev/sk-vda": EROFS,
            "/sk-kmem": OWNER_DENIED,
        },
        {
            "/tmp/sk-sda": EPERM,
            "/tmp/sk-mem": EPERM,
            "/dev/sk-vda": EPERM | EROFS,
            "/sk-kmem": EPERM,
        },
    ),
    Case(
        "leaked-fds",
        "file descriptors of the owner/supervisor leaking in (CVE-2024-21626 fd variant)",
        "leaked_fds",
        *same({"open": {"0,1,2"}, "targets": {"*"}}),
    ),
    Case(
        "cwd-escape",
        "CVE-2024-21626: working directory outside the root; '..' from cwd",
        "cwd_escape",
        *same(
            {
                "getcwd": {"/usr/share"},
                "/proc/self/cwd": {"/usr/share"},
                "/proc/self/root": {"/"},
                "after ..": {"/"},
                "host-only names visible": {"none"},
                "same as /": {"yes"},
                "/.. is /": {"yes"},
            }
        ),
        kw={"workdir": "/usr/share"},
    ),
    Case(
        "exe-overwrite",
        "CVE-2019-5736: overwrite the executor through /proc/1/exe, or host binaries",
        "exe_overwrite",
        {
            "/proc/1/exe O_WRONLY": EACCES,
            "/proc/1/exe O_RDONLY": EACCES,
            "/proc/1/exe O_PATH": EACCES,
            "/proc/self/exe O_WRONLY": EACCES,
            "/usr/bin/id O_WRONLY": EACCES,
            "chmod /usr/bin/id (same mode)": EROFS,
        },
        {
            "/proc/1/exe O_WRONLY": EACCES,
            "/proc/1/exe O_RDONLY": EACCES,
            "/proc/1/exe O_PATH": EACCES,
            # in a user namespace the host's /usr is not container root's: EACCES first
            "/proc/self/exe O_WRONLY": {"EROFS", "ETXTBSY", "EACCES"},
            "/usr/bin/id O_WRONLY": {"EROFS", "EACCES"},
            "chmod /usr/bin/id (same mode)": {"EROFS", "EPERM"},
        },
    ),
    Case(
        "sysrq",
        "/proc/sysrq-trigger (read-only path); only 'h' is ever written",
        "sysrq_trigger",
        {"open": if_host_has("/proc/sysrq-trigger", EACCES, ENOENT)},
        {"open": if_host_has("/proc/sysrq-trigger", EROFS, ENOENT)},
    ),
    Case(
        "proc-sys",
        "/proc/sys writes: core_pattern / modprobe host escapes, hostname",
        "proc_sys_writes",
        {
            "/proc/sys/kernel/hostname": EACCES,
            "/proc/sys/kernel/core_pattern": EACCES,
            "/proc/sys/kernel/modprobe": if_host_has(
                "/proc/sys/kernel/modprobe", EACCES, {"absent"}
            ),
            "/proc/sys/vm/overcommit_memory": EACCES,
            "create /proc/sys/sk-new": {"EROFS", "EACCES", "ENOENT"},
        },
        {
            "/proc/sys/kernel/hostname": ROOT_RO,
            "/proc/sys/kernel/core_pattern": ROOT_RO,
            "/proc/sys/kernel/modprobe": if_host_has(
                "/proc/sys/kernel/modprobe", ROOT_RO, {"absent"}
            ),
            "/proc/sys/vm/overcommit_memory": ROOT_RO,
            "create /proc/sys/sk-new": {"EROFS", "EACCES", "ENOENT"},
        },
    ),
    Case(
        "sys-writes",
        "writing /sys (read-only sysfs)",
        "sys_writes",
        {
            "/sys mount": {"RO"},
            "/sys/class/net/lo/mtu": EROFS,
            "/sys/kernel/mm/transparent_hugepage/enabled": EROFS,
            "create /sys/sk-new": EROFS,
        },
        {
            "/sys mount": {"RO"},
            "/sys/class/net/lo/mtu": EROFS,
            "/sys/kernel/mm/transparent_hugepage/enabled": EROFS,
            "create /sys/sk-new": EROFS,
        },
    ),
    Case(
        "kmsg-syslog",
        "kernel log (KASLR/address leaks): /proc/kmsg and syslog(2)",
        "proc_kmsg",
        {"/proc/kmsg": EACCES, "syslog READ_ALL": EPERM},
        {"/proc/kmsg": {"EPERM", "EACCES"}, "syslog READ_ALL": EPERM},
    ),
    Case(
        "clock-set",
        "clock_settime/settimeofday/clock_adjtime/adjtimex: host clock not namespaced",
        "clock_set",
        *same(
            {
                "clock_settime": EPERM,
                "settimeofday": EPERM,
                "clock_adjtime": EPERM,
                "adjtimex ADJ_TICK": EPERM,
            }
        ),
    ),
    Case(
        "reboot",
        "reboot(2) (LINUX_REBOOT_CMD_CAD_OFF only)",
        "reboot",
        *same({"reboot CAD_OFF": EPERM}),
    ),
    Case("swap", "swapon/swapoff", "swap", *same({"swapon": EPERM, "swapoff": EPERM})),
    Case(
        "personality",
        "personality(READ_IMPLIES_EXEC / ADDR_NO_RANDOMIZE): weakened ASLR/NX",
        "personality",
        *same({"READ_IMPLIES_EXEC": EPERM, "ADDR_NO_RANDOMIZE": EPERM}),
    ),
    Case(
        "userfaultfd",
        "userfaultfd(2): race-widening for kernel exploits",
        "userfaultfd",
        *same({"userfaultfd": EPERM}),
    ),
    Case(
        "io-uring",
        "io_uring (CVE-2022-29582, CVE-2023-2598 class; bypasses seccomp per op)",
        "io_uring",
        *same({"io_uring_setup": EPERM, "io_uring_enter": EPERM, "io_uring_register": EPERM}),
    ),
    Case(
        "shocker",
        "open_by_handle_at 'shocker' (2014): open host inodes by forged handle",
        "shocker",
        *same({"name_to_handle_at": EPERM, "open_by_handle_at": EPERM}),
    ),
    Case(
        "proc-attr",
        "/proc/self/attr: switch LSM profile (AppArmor/SELinux escape to unconfined)",
        "proc_attr",
        *same(
            {
                "/proc/self/attr/current": {"EINVAL", "EPERM", "EACCES"},
                "/proc/self/attr/exec": {"EINVAL", "EPERM", "EACCES"},
            }
        ),
    ),
    Case(
        "hardware-io",
        "iopl/ioperm/modify_ldt: raw I/O ports, LDT exploits (CVE-2015-5157)",
        "hardware_io",
        *same({"iopl": EPERM, "ioperm": EPERM, "modify_ldt": EPERM}),
    ),
    Case(
        "sethostname",
        "sethostname(2) (own name only; host hostname checked after)",
        "sethostname",
        *same({"sethostname": EPERM}),
    ),
    Case(
        "abi-bypass",
        "seccomp bypass via the i386 (int 0x80) and x32 ABIs: process killed by SIGSYS",
        "abi_bypass",
        *same({"int 0x80 getpid": {"signal 31"}, "x32 getpid": {"signal 31"}}),
    ),
    Case(
        "oom-immunity",
        "oom_score_adj -1000: an OOM-immune process pushes the OOM killer onto others",
        "oom_immunity",
        *same({"/proc/self/oom_score_adj": EACCES, "/proc/1/oom_score_adj": EACCES}),
    ),
    Case(
        "cpu-priority",
        "SCHED_FIFO/SCHED_RR or nice -20: starving the host and other kernels",
        "cpu_priority",
        *same({"SCHED_FIFO": EPERM, "SCHED_RR": EPERM, "nice -20": EACCES}),
    ),
    Case(
        "raise-rlimits",
        "raising hard rlimits (nofile, core, rtprio) set by the executor",
        "raise_rlimits",
        *same({"RLIMIT_NOFILE": EPERM, "RLIMIT_CORE": EPERM, "RLIMIT_RTPRIO": EPERM}),
    ),
    Case(
        "regain-privileges",
        "capabilities back via capset/ambient raise, setuid(0), setgroups, clearing no_new_privs",
        "regain_privileges",
        {
            "capset all": EPERM,
            "ambient raise": EPERM,
            "clear no_new_privs": {"EINVAL"},
            "setgroups [0]": EPERM,
            # a single-id map has no uid 0 at all
            "setuid 0": EPERM | ({"EINVAL"} if SINGLE_MAP else set()),
            "setresuid 0": EPERM | ({"EINVAL"} if SINGLE_MAP else set()),
            "caps after": {"none"},
        },
        {
            "capset all": EPERM,
            "ambient raise": EPERM,
            "clear no_new_privs": {"EINVAL"},
            "setgroups [0]": EPERM,
            "caps after": {"none"},
        },
    ),
    Case(
        "kaslr-leak",
        "kernel addresses in /proc/kallsyms (KASLR bypass for kernel exploits)",
        "kaslr_leak",
        *same({"/proc/kallsyms": {"zeroed", "ENOENT"}}),
    ),
    Case(
        "netlink-admin",
        "rtnetlink / nf_tables configuration (CVE-2024-1086, CVE-2023-32233, CVE-2022-1015)",
        "netlink_admin",
        *same(
            {
                k: EPERM
                for k in (
                    "RTM_NEWLINK dummy",
                    "RTM_NEWADDR lo",
                    "nf_tables NEWTABLE",
                    "nf_tables GETTABLE",
                )
            }
        ),
    ),
    Case(
        "admin-misc",
        "acct, quotactl, vhangup, setdomainname, lookup_dcookie, fanotify_init, memfd_secret",
        "admin_misc",
        *same(
            {
                k: EPERM
                for k in (
                    "acct",
                    "quotactl",
                    "vhangup",
                    "setdomainname",
                    "lookup_dcookie",
                    "fanotify_init",
                    "memfd_secret",
                )
            }
        ),
    ),
]


@pytest.mark.privileged
@pytest.mark.parametrize(("case", "who", "expected"), both_users(CASES))
def test_attempt_fails(case: Case, who: str, expected: dict[str, set[str]]) -> None:
    args = dict(case.args)
    if case.id == "cwd-escape":  # names at the host's / that the image's root does not have
        args["host_only"] = sorted(set(os.listdir("/")) - set(os.listdir(hostimage.layer_dir())))
        assert args["host_only"]
    data = probe_ok(case.attempt, args, who=who, **case.kw)
    if case.id == "leaked-fds":
        assert data["open"] == "0,1,2", f"fds leaked into the container: {data}"
        return
    check(data, expected)


# ---- host files ---------------------------------------------------------------------------


#: A private directory of the caller's: root's home, or a rootless caller's own.
PRIVATE_HOME = "/root" if os.geteuid() == 0 else os.path.expanduser("~")


@pytest.fixture
def host_sentinels() -> Iterator[tuple[str, dict[str, str]]]:
    name = "sk-esc-sentinel-" + secrets.token_hex(4)
    paths = [Path(d) / name for d in (PRIVATE_HOME, "/var/tmp", "/tmp", "/dev/shm")]
    for p in paths:
        p.write_text("host secret\n")
        p.chmod(0o644)
    yield name, {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    for p in paths:
        p.unlink(missing_ok=True)


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_host_only_files_are_not_reachable(
    host_sentinels: tuple[str, dict[str, str]], who: str
) -> None:
    """Host files outside /usr and /etc (sentinels in /root, /var/tmp), also via /proc/1/root."""
    name, sums = host_sentinels
    direct = [f"{PRIVATE_HOME}/{name}", f"/var/tmp/{name}", f"/tmp/{name}", f"/dev/shm/{name}"]
    direct.append(str(run_dir()))  # the run dirs of all containers
    via_init = [f"/proc/1/root{PRIVATE_HOME}/{name}", f"/proc/1/root/var/tmp/{name}"]
    data = probe_ok("read_files", {"paths": direct + via_init}, who=who)
    check(data, {**{p: ENOENT for p in direct}, **{p: EACCES for p in via_init}})
    assert {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sums} == sums


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_etc_shadow_is_not_readable(who: str) -> None:
    """Host secrets in /etc (shadow, gshadow: 0640 root:shadow) never reach a container.

    Container root is uid 0 on the host (no user namespace), so owner permission alone
    would let it read them: the `host` image therefore carries a sanitised /etc (an
    allowlist copy), not the host's.
    """
    paths = [p for p in ("/etc/shadow", "/etc/gshadow") if os.path.exists(p)]
    data = probe_ok("read_files", {"paths": paths}, who=who)
    check(data, {p: ENOENT for p in paths})
    data = probe_ok("open_for_write", {"paths": paths}, who=who)
    check(data, {p: ENOENT for p in paths})


# ---- masked and read-only paths -------------------------------------------------------------

# Docker masks these as well; missing from the default list is itself a finding when present.
DOCKER_EXTRA_MASKS = ("/proc/asound", "/sys/devices/virtual/powercap")


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
@pytest.mark.parametrize("path", [*DEFAULT_MASKED_PATHS, *DOCKER_EXTRA_MASKS])
def test_masked_path(path: str, who: str) -> None:
    """Masked /proc and /sys paths (kcore, keys, timer_list, ...): absent, /dev/null or empty."""
    data = probe_ok("masked_paths", {"paths": [path]}, who=who)
    if os.path.exists(path):  # the host kernel has it: it must be masked, not merely absent
        ok = {"emptydir"} if os.path.isdir(path) else {"devnull"}
    else:
        ok = {"absent", "devnull", "emptydir"}
    check(data, {path: ok})


READONLY_INNER = {
    "/proc/irq": "/proc/irq/default_smp_affinity",
    "/proc/sys": "/proc/sys/kernel/core_pattern",
    "/proc/bus": None,
    "/proc/fs": None,
    "/proc/sysrq-trigger": "/proc/sysrq-trigger",
}


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_readonly_proc_paths(who: str) -> None:
    """Read-only /proc paths (sys, sysrq-trigger, irq, bus, fs): read-only mount, no write."""
    paths = {p: READONLY_INNER[p] for p in DEFAULT_READONLY_PATHS}
    data = probe_ok("readonly_paths", {"paths": paths}, who=who)
    expected: dict[str, set[str]] = {}
    for p, inner in paths.items():
        expected[p + " mount"] = {"RO"} if os.path.exists(p) else {"absent"}
        if inner:
            denied = EACCES if who == "nobody" else ROOT_RO
            expected[inner] = if_host_has(inner, denied, ENOENT)
    check(data, expected)


# ---- /dev ---------------------------------------------------------------------------------

DEV_LISTING = "fd,full,mqueue,null,ptmx,pts,random,shm,stderr,stdin,stdout,tty,urandom,zero"


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_dev_has_only_the_minimal_set(who: str) -> None:
    """Device nodes of the host (disks, /dev/mem, kmsg, fuse, tun, kvm, msr) are absent."""
    data = probe_ok("dev_nodes", who=who)
    assert data.pop("listing") == DEV_LISTING
    assert data.pop("/dev mount") in ("RW", "RO")
    expected = {k: ENOENT for k in data if k != "/dev/tty"}
    expected["/dev/tty"] = {"ENXIO"}  # no controlling terminal (setsid)
    check(data, expected)


# ---- network and unix sockets --------------------------------------------------------------


def _host_address() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.254", 9))
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


@pytest.fixture
def host_listeners() -> Iterator[tuple[list[tuple[str, int]], list[socket.socket]]]:
    """TCP listeners on the host's 127.0.0.1, ::1 and non-loopback address, one port."""
    socks: list[socket.socket] = []
    s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s4.bind(("0.0.0.0", 0))
    s4.listen(8)
    s4.setblocking(False)
    socks.append(s4)
    port = s4.getsockname()[1]
    targets = [("127.0.0.1", port)]
    addr = _host_address()
    if addr:
        targets.append((addr, port))
    try:
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.bind(("::1", port))
        s6.listen(8)
        s6.setblocking(False)
        socks.append(s6)
        targets.append(("::1", port))
    except OSError:
        pass
    yield targets, socks
    for s in socks:
        s.close()


def _nothing_accepted(socks: list[socket.socket]) -> bool:
    for s in socks:
        try:
            conn, _ = s.accept()
        except BlockingIOError:
            continue
        conn.close()
        return False
    return True


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_host_network_is_unreachable(
    host_listeners: tuple[list[tuple[str, int]], list[socket.socket]], who: str
) -> None:
    """Network namespace: host listeners on 127.0.0.1, ::1 and the host address are unreachable."""
    targets, socks = host_listeners
    data = probe_ok("tcp_connect", {"targets": targets}, who=who)
    expected: dict[str, set[str]] = {}
    for host, port in targets:
        loop = host in ("127.0.0.1", "::1")
        expected[f"{host}:{port}"] = {"ECONNREFUSED"} if loop else {"ENETUNREACH"}
        if ":" not in host:
            # UDP to our own loopback is accepted by the container's own lo (nobody listens)
            expected[f"udp {host}:{port}"] = {"OK"} if loop else {"ENETUNREACH"}
    check(data, expected)
    assert _nothing_accepted(socks), "a host listener accepted a connection from the container"


@pytest.fixture
def host_abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = "sk-esc-host-" + secrets.token_hex(4)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0" + name)
    s.listen(8)
    s.setblocking(False)
    yield name, s
    s.close()


HOST_UNIX_SOCKETS = (
    "/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
)


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_host_abstract_and_path_unix_sockets(
    host_abstract_socket: tuple[str, socket.socket], who: str
) -> None:
    """Abstract unix sockets are per network namespace; host daemon sockets are not in the root."""
    name, s = host_abstract_socket
    data = probe_ok("unix_connect", {"abstract": [name], "paths": list(HOST_UNIX_SOCKETS)}, who=who)
    check(data, {"@" + name: {"ECONNREFUSED"}, **{p: ENOENT for p in HOST_UNIX_SOCKETS}})
    assert _nothing_accepted([s])


def _wait_for(path: Path, marker: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text()
        if marker in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} never appeared: {path.read_text()}")


@pytest.mark.privileged
def test_other_containers_abstract_socket(tmp_path: Path) -> None:
    """Container B cannot reach container A's abstract unix socket (cross-tenant)."""
    name = "sk-esc-a-" + secrets.token_hex(4)
    spec = probe_spec("abstract_listen", {"name": name, "wait": 8})
    out = tmp_path / "a.out"
    with open(out, "w") as f, Container.create(spec) as a:
        a.start(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _wait_for(out, "SK-READY")
        data = probe_ok("unix_connect", {"abstract": [name]})
        check(data, {"@" + name: {"ECONNREFUSED"}})
        a.wait(30)
    a_data = parse(out.read_text())
    assert a_data == {"accepted": "nobody"}


@pytest.mark.privileged
def test_other_containers_files(tmp_path: Path) -> None:
    """Container B cannot read what container A wrote in its /tmp, /dev/shm, home or root layer."""
    paths = ["/tmp/sk-a", "/dev/shm/sk-a", "/home/sandbox/sk-a", "/sk-a"]
    planter = "nobody" if SINGLE_MAP else "root"  # the one who can write "/"
    spec = probe_spec("plant_and_hold", {"paths": paths, "wait": 8}, who=planter)
    out = tmp_path / "a.out"
    with open(out, "w") as f, Container.create(spec) as a:
        a.start(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _wait_for(out, "SK-READY")
        for who in ("nobody",) if SINGLE_MAP else ("nobody", "root"):
            data = probe_ok("read_files", {"paths": paths}, who=who)
            check(data, {p: ENOENT for p in paths})
        a.kill()
        a.wait(30)


# ---- cgroups (CVE-2022-0492) ----------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_cgroup_release_agent_and_limits(who: str) -> None:
    """CVE-2022-0492: read-only cgroup view; no release_agent; own limits unchangeable."""
    data = probe_ok("cgroup_escape", who=who, limits=Limits(memory=256 * MIB, pids=100))
    bad = {}
    for op, got in data.items():
        if op.endswith(" mount"):
            ok = {"RO"}
        elif op.endswith("release_agent exists"):
            ok = {"no"}
        elif op == "parent cgroup.procs":
            ok = {"ENOENT"}
        elif op == "mkdir child cgroup":
            ok = {"EROFS", "EACCES"}
        else:  # a cgroup control file opened for writing
            ok = OWNER_DENIED if who == "nobody" else ROOT_RO
        if got not in ok:
            bad[op] = (got, sorted(ok))
    assert not bad, f"HOLE in the cgroup view: {bad}"
    assert any(op.endswith("cgroup.procs") for op in data), data


# ---- resource exhaustion spilling over --------------------------------------------------------


@pytest.mark.privileged
def test_fork_bomb_does_not_spill_over(tmp_path: Path) -> None:
    """pids exhaustion in one container: another still starts and forks, so does the host."""
    spec = probe_spec("forkbomb", {"max": 300, "hold": 6}, limits=Limits(pids=24))
    out = tmp_path / "bomb.out"
    with open(out, "w") as f, Container.create(spec) as bomb:
        bomb.start(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        first = _wait_for(out, "SK-READY").split("SK-READY", 1)[1].split()
        assert int(first[0]) < 24 and first[1] == "EAGAIN", first
        data = probe_ok("fork_some", {"n": 20}, limits=Limits(pids=64))
        check(data, {"forked": {"20"}, "all exited 7": {"yes"}})
        assert subprocess.run(["/bin/true"]).returncode == 0, "the host can still fork"
        result = bomb.wait(60)
    assert result.pids_limit_hit and result.status == 0


@pytest.mark.privileged
def test_memory_exhaustion_does_not_spill_over() -> None:
    """A container at its memory cap is OOM-killed alone; a host process stays alive."""
    sentinel = subprocess.Popen(["/bin/sleep", "60"])
    try:
        result, data, text = probe("memory_hog", {"mib": 512}, limits=Limits(memory=64 * MIB))
        assert data is None, f"allocated past the cap: {text}"
        assert result.oom_killed and result.signal == signal.SIGKILL, result
        assert sentinel.poll() is None, "the host process was killed"
        ballast = bytearray(128 * MIB)  # the host can still allocate
        assert len(ballast) == 128 * MIB
    finally:
        sentinel.kill()
        sentinel.wait()


FILL_CASES = [
    pytest.param("/tmp/fill", "nobody", {"tmp_size": 4 * MIB}, id="tmp"),
    pytest.param("/dev/shm/fill", "nobody", {"shm_size": 4 * MIB}, id="dev-shm"),
    pytest.param("/home/sandbox/fill", "nobody", {"tmp_size": 4 * MIB}, id="home"),
    pytest.param("/fill", "root", {"writable_size": 4 * MIB}, id="writable-layer-root"),
]


@pytest.mark.privileged
@pytest.mark.parametrize(("path", "who", "sizes"), FILL_CASES)
def test_fillers_stop_at_the_cap(path: str, who: str, sizes: dict[str, int]) -> None:
    """Disk filling: /tmp, /dev/shm, home and the writable layer end in ENOSPC at their cap."""
    data = probe_ok("fill", {"path": path, "max_mib": 64}, who=who, **sizes)
    assert data["error"] == "ENOSPC" and int(data["mib"]) <= 4, data


# ---- setuid binaries and file capabilities --------------------------------------------------


def _layer(tmp_path: Path) -> Path:
    layer = tmp_path / "layer"
    (layer / "opt" / "sk").mkdir(parents=True)
    layer.chmod(0o755)
    for p in (tmp_path, layer / "opt", layer / "opt" / "sk"):
        p.chmod(0o755)
    return layer


@pytest.mark.privileged
@pytest.mark.root_only  # a root-owned setuid file is made for the test
def test_setuid_binary_in_image_does_not_gain_root(tmp_path: Path) -> None:
    """A setuid/setgid-root copy of `id` in an image layer: no_new_privs keeps euid 65534."""
    layer = _layer(tmp_path)
    suid = layer / "opt" / "sk" / "id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o6755)
    assert suid.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    layers = (str(layer), str(hostimage.layer_dir()))
    data = probe_ok("run_program", {"argv": ["/opt/sk/id"]}, layers=layers)
    assert data["status"] == "0", data
    assert data["output"].startswith("uid=65534(nobody) gid=65534(nogroup)"), data
    assert "euid=" not in data["output"] and "egid=" not in data["output"], (
        f"HOLE: setuid worked: {data}"
    )


def _vfs_cap(permitted: int, effective: bool) -> bytes:
    """struct vfs_cap_data (revision 2): magic|effective flag, then permitted/inheritable x2."""
    magic = 0x02000000 | (1 if effective else 0)
    return b"".join(v.to_bytes(4, "little") for v in (magic, permitted, 0, 0, 0))


@pytest.mark.privileged
@pytest.mark.root_only  # setting security.capability needs CAP_SETFCAP
@pytest.mark.parametrize("effective", [True, False], ids=["effective-bit", "permitted-only"])
def test_file_capabilities_are_not_gained(tmp_path: Path, effective: bool) -> None:
    """Capabilities re-gained through file caps (dac_override,dac_read_search on a copy of cat).

    With the effective bit the kernel refuses the exec (EPERM: the empty bounding set cannot
    grant what the file demands); without it the exec runs with no capability at all.
    """
    layer = _layer(tmp_path)
    cat = layer / "opt" / "sk" / "cat"
    shutil.copy("/usr/bin/cat", cat)
    cat.chmod(0o755)
    os.setxattr(cat, "security.capability", _vfs_cap(0b110, effective))
    secret = layer / "opt" / "sk" / "secret"  # root-only, like /etc/shadow
    secret.write_text("root only\n")
    secret.chmod(0o600)
    layers = (str(layer), str(hostimage.layer_dir()))
    data = probe_ok("run_program", {"argv": ["/opt/sk/cat", "/opt/sk/secret"]}, layers=layers)
    if effective:
        assert data == {"status": "exec EPERM", "output": ""}, f"HOLE: file caps worked: {data}"
        return
    assert data["status"] == "1" and "Permission denied" in data["output"], (
        f"HOLE: file caps worked: {data}"
    )
    data = probe_ok("run_program", {"argv": ["/opt/sk/cat", "/proc/self/status"]}, layers=layers)
    caps = dict(
        line.split(":\t", 1) for line in data["output"].splitlines() if line.startswith("Cap")
    )
    assert all(int(caps[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), (
        caps
    )


@pytest.mark.privileged
@pytest.mark.container_root
def test_container_root_cannot_plant_setuid_root_file_on_host(tmp_path: Path) -> None:
    """allow_root + writable volume: a setuid-root file left on the host (privilege escalation).

    Container root is an unprivileged host uid (the user namespace): through a plain
    writable volume its file belongs to that uid, never to host root; an idmapped volume,
    which would show it the on-disk uid 0, is refused for a root container before anything
    starts."""
    vol = tmp_path / "vol"
    vol.mkdir()
    vol.chmod(0o777)
    try:
        data = probe_ok(
            "plant_setuid",
            {"path": "/vol/id"},
            who="root",
            mounts=(Bind(str(vol), "/vol", readonly=False),),
        )
        st = (vol / "id").stat()
        assert st.st_uid != 0, f"a file of host root was planted: {data}"
        assert data["owner"] == "0"  # root inside, an unprivileged uid outside
        (vol / "id").unlink()
        if os.geteuid() == 0:  # idmapped mounts exist in root mode only
            with pytest.raises(SpecError, match="cannot have writable host volumes"):
                probe_ok(
                    "plant_setuid",
                    {"path": "/vol/id"},
                    who="root",
                    mounts=(Bind(str(vol), "/vol", readonly=False, idmap=True),),
                )
            assert list(vol.iterdir()) == []
    finally:
        shutil.rmtree(vol, ignore_errors=True)


@pytest.mark.privileged
@pytest.mark.root_only  # a root-owned setuid file is made for the test
def test_setuid_copy_up_never_reaches_the_host(tmp_path: Path) -> None:
    """CVE-2023-0386 class: a setuid-root file of an image layer copied up by container root
    (a chown is enough) lands in the writable layer, a tmpfs that exists only in the
    container's mount namespace: the host side of it is an empty directory, and the kernel
    user cannot use the bit (no_new_privs, nosuid)."""
    layer = _layer(tmp_path)
    suid = layer / "opt" / "sk" / "id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    layers = (str(layer), str(hostimage.layer_dir()))
    spec = probe_spec(
        "setuid_copy_up", {"path": "/opt/sk/id", "wait": 5}, who="root", layers=layers
    )
    out = tmp_path / "out"
    with open(out, "w+") as f, Container.create(spec) as c:
        c.start(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        _wait_for(out, "SK-READY")
        scratch = c.run_dir / "scratch"
        found = [p for p in scratch.rglob("*")] if scratch.exists() else []
        assert found == [], f"HOLE: the writable layer is visible on the host: {found}"
        c.wait(30)
    data = parse(out.read_text())
    assert data is not None and data["chown (copy-up)"] == "OK", out.read_text()


# ---- CVE-2021-30465: symlinks on mount targets ------------------------------------------------


@pytest.mark.privileged
@pytest.mark.parametrize("kind", ["relative-dotdot", "absolute", "final-component"])
def test_symlinked_mount_target_stays_in_root(tmp_path: Path, kind: str) -> None:
    """CVE-2021-30465 (static form): an image symlink on a volume path cannot aim it at the host."""
    host_target = tmp_path / "host-target"
    host_target.mkdir()
    layer = tmp_path / "layer"
    layer.mkdir()
    for d in ("proc", "dev", "sys", "tmp", "usr", "etc", "home"):
        (layer / d).mkdir()
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", layer / name)
    if kind == "relative-dotdot":
        os.symlink("../" * 12 + str(host_target).lstrip("/"), layer / "evil")
        target = "/evil/mnt"
    elif kind == "absolute":
        os.symlink(str(host_target), layer / "evil")
        target = "/evil/mnt"
    else:
        os.symlink(str(host_target), layer / "evil")
        target = "/evil"
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "marker").write_text("volume")
    before = host_mounts()
    try:
        data = probe_ok(
            "read_files",
            {"paths": [target + "/marker"]},
            layers=(str(layer),),
            mounts=(Bind(str(vol), target, readonly=True),),
        )
        assert data == {target + "/marker": "READ:6"}, data
    except RuntimeStartError:
        pass  # refusing the image is a fine outcome too
    assert list(host_target.iterdir()) == [], "the mount target escaped to the host"
    assert host_mounts() == before


@pytest.mark.privileged
@pytest.mark.parametrize("link", ["home", "etc", "tmp", "root"])
def test_symlinked_layout_dirs_stay_in_root(tmp_path: Path, link: str) -> None:
    """CVE-2021-30465 / CVE-2019-19921 class: an image whose /home, /etc, /tmp or / entry is a
    symlink to a host path; the runtime's own mounts and files (home tmpfs, /etc/hosts,
    /etc/hostname, /tmp tmpfs, volumes) must land inside the root or the start be refused."""
    # outside /tmp: the runtime mounts a fresh /tmp before it creates home and volumes
    host_target = Path("/var/tmp") / f"sk-esc-{secrets.token_hex(4)}" / "host-target"
    host_target.mkdir(parents=True)
    request_cleanup = host_target.parent
    layer = tmp_path / "layer"
    layer.mkdir()
    for d in ("proc", "dev", "sys", "tmp", "usr", "etc", "home", "root"):
        if d != link:
            (layer / d).mkdir()
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", layer / name)
    os.symlink("../" * 8 + str(host_target).lstrip("/"), layer / link)
    if link != "tmp":  # the same path inside the image: resolved in the root, it exists there
        (layer / str(host_target).lstrip("/")).mkdir(parents=True)
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "marker").write_text("volume")
    before = host_mounts()
    try:
        data = probe_ok(
            "read_files",
            {"paths": [f"/{link}/vol/marker"]},
            layers=(str(layer),),
            mounts=(Bind(str(vol), f"/{link}/vol", readonly=True),),
        )
        assert data == {f"/{link}/vol/marker": "READ:6"}, data
    except RuntimeStartError:
        pass  # refusing the image is a fine outcome too
    try:
        assert list(host_target.iterdir()) == [], "a runtime mount or file escaped to the host"
        assert host_mounts() == before
    finally:
        shutil.rmtree(request_cleanup, ignore_errors=True)


# ---- signals ---------------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_kill_minus_one_stays_inside(who: str) -> None:
    """`kill -9 -1` inside kills only the container's processes, not host processes of that uid."""
    uid = USERS[who]["user"]
    # rootless: the host processes at stake are the server's own (its uid is the kernel's)
    ids = {"user": uid, "group": uid} if os.geteuid() == 0 else {}
    host_same_uid = subprocess.Popen(["/bin/sleep", "60"], **ids)
    other = Container.create(make_spec(["/bin/sleep", "60"]))
    try:
        other.start(stdin=subprocess.DEVNULL)
        pids = {"host same-uid process": host_same_uid.pid, "test process": os.getpid()}
        data = probe_ok("kill_all", {"host_pids": pids}, who=who)
        check(
            data,
            {
                "kill(-1, SIGKILL)": {"OK"},
                "own child": {"killed"},
                **{f"kill({r}, 0)": {"ESRCH"} for r in pids},
            },
        )
        time.sleep(0.2)
        assert host_same_uid.poll() is None, "kill -1 reached a host process"
        assert other.poll() is None, "kill -1 reached another container"
    finally:
        host_same_uid.kill()
        host_same_uid.wait()
        other.destroy()


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_signal_to_host_supervisor(tmp_path: Path, who: str) -> None:
    """SIGKILL to the host pids of the supervisor and of the owner, and to PID 1: nothing dies."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    inbox.chmod(0o755)
    spec = probe_spec(
        "signal_supervisor",
        {"pidfile": "/inbox/pids.json"},
        who=who,
        mounts=(Bind(str(inbox), "/inbox", readonly=True),),
    )
    out = tmp_path / "out"
    with open(out, "w+") as f, Container.create(spec) as c:
        c.start(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        assert c.pid is not None and c.init_pid is not None
        pids = {"supervisor": c.pid, "init host pid": c.init_pid, "owner": os.getpid()}
        (inbox / "pids.json").write_text(json.dumps(pids))
        result = c.wait(60)
        supervisor_result = result
    data = parse(out.read_text())
    assert supervisor_result.status == 0 and data is not None, out.read_text()
    check(
        data,
        {
            "SIGKILL supervisor": {"ESRCH"},
            "SIGKILL init host pid": {"ESRCH"},
            "SIGKILL owner": {"ESRCH"},
            # PID 1 of a pid namespace ignores SIGKILL from inside; as another uid it is refused
            # (a single-id map gives init the kernel's uid: the same, ignored, SIGKILL)
            "SIGKILL init": EPERM if who == "nobody" and not SINGLE_MAP else {"OK"},
            "init alive": {"yes"},
        },
    )


# ---- probe table consistency (no container) -----------------------------------------------


def test_probe_syscall_numbers_match_the_seccomp_table() -> None:
    """The probes' raw system call numbers are the filter's (the source is read, not imported)."""
    from sandbox_kernel.runtime.seccomp_tables import X86_64_SYSCALLS

    tree = ast.parse(PROBE_SOURCE)
    table = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "NR" for t in node.targets)
    )
    numbers = ast.literal_eval(table)
    assert {k: X86_64_SYSCALLS[k] for k in numbers} == numbers


def test_probe_guard_comes_first() -> None:
    """The guard runs at module level before any attempt is defined."""
    tree = ast.parse(PROBE_SOURCE)
    calls = [
        i
        for i, node in enumerate(tree.body)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", "") == "_guard"
    ]
    first_attempt = next(
        i
        for i, node in enumerate(tree.body)
        if isinstance(node, ast.FunctionDef) and node.name != "_guard"
    )
    assert calls and calls[0] < first_attempt


@pytest.mark.privileged
def test_probe_refuses_outside_a_sandbox() -> None:
    """The guard refuses in a container whose hostname is not the one the probe expects."""
    spec = make_spec(
        [PY, "-c", PROBE_SOURCE, "reboot"],
        env=(("SK_PROBE_HOSTNAME", "not-this-one"), ("SK_PROBE_ARGS", "{}")),
    )
    out_path = Path(f"/tmp/{spec.id}.out")
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            result = c.wait(30)
            out.seek(0)
            text = out.read()
    finally:
        out_path.unlink(missing_ok=True)
    assert (
        result.status == REFUSED and "REFUSED: not in a sandbox" in text and "SK-RESULT" not in text
    )


# ---- mount flags and IPC namespace -------------------------------------------------------

MOUNT_FLAGS = {
    "/usr": {"RO", "NOSUID", "NODEV"},
    "/": {"NODEV"},  # the overlay root (the host image's sanitised /etc lives in it)
    "/proc": {"NOSUID", "NODEV", "NOEXEC"},
    "/proc/sys": {"RO", "NOSUID", "NODEV", "NOEXEC"},
    "/sys": {"RO", "NOSUID", "NODEV", "NOEXEC"},
    "/sys/fs/cgroup": {"RO", "NOSUID", "NODEV", "NOEXEC"},
    "/tmp": {"NOSUID", "NODEV"},
    "/home/sandbox": {"NOSUID", "NODEV"},
    "/dev": {"NOSUID", "NOEXEC"},
    "/dev/shm": {"NOSUID", "NODEV", "NOEXEC"},
    "/dev/mqueue": {"NOSUID", "NODEV", "NOEXEC"},
    "/dev/pts": {"NOSUID", "NOEXEC"},
}


@pytest.mark.privileged
def test_mount_flags_of_the_layout() -> None:
    """Setuid/device files on writable or host mounts: every mount has its nosuid/nodev/ro flags."""
    data = probe_ok("mount_flags", {"paths": sorted(MOUNT_FLAGS)})
    missing = {p: sorted(want - set(data[p].split(","))) for p, want in MOUNT_FLAGS.items()}
    assert not {p: m for p, m in missing.items() if m}, f"mount flags missing: {missing} ({data})"


@pytest.fixture
def host_ipc_objects() -> Iterator[dict[str, int]]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5E000000 | secrets.randbits(20)
    ipc_creat, ipc_rmid = 0o1000, 0
    ids = {
        "shm": libc.shmget(key, 4096, ipc_creat | 0o666),
        "msg": libc.msgget(key + 1, ipc_creat | 0o666),
        "sem": libc.semget(key + 2, 1, ipc_creat | 0o666),
    }
    assert all(i >= 0 for i in ids.values()), ids
    yield {"shm": key, "msg": key + 1, "sem": key + 2}
    libc.shmctl(ids["shm"], ipc_rmid, None)
    libc.msgctl(ids["msg"], ipc_rmid, None)
    libc.semctl(ids["sem"], 0, ipc_rmid)


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_host_sysv_ipc_is_invisible(host_ipc_objects: dict[str, int], who: str) -> None:
    """IPC namespace: the host's SysV shared memory, message queues and semaphores are not found."""
    data = probe_ok("sysv_ipc", {"keys": host_ipc_objects}, who=who)
    check(data, {"shm": ENOENT, "msg": ENOENT, "sem": ENOENT})


#: Tiny-file floods: each writable tmpfs, (who, directories), bounded per directory.
FLOOD_DIRS = {
    "nobody": ["/tmp/flood", "/home/sandbox/flood", "/dev/shm/flood"],
    "root": ["/flood", "/tmp/flood"],  # / is the writable layer's tmpfs
}


@pytest.mark.privileged
@pytest.mark.parametrize("who", ["nobody", "root"])
def test_tiny_file_flood_ends_in_enospc_not_an_oom_kill(who: str) -> None:
    """Every writable tmpfs has an inode cap: a flood of empty files (no data pages, only
    inodes, which the size cap does not count) ends with ENOSPC (errno 28) while the memory
    cap stays far away, and the sandbox lives on."""
    result, data, text = probe(
        "tiny_file_flood",
        {"dirs": FLOOD_DIRS[who], "max": 40_000},
        who=who,
        tmp_size=8 * MIB,
        writable_size=8 * MIB,
        shm_size=8 * MIB,
        limits=Limits(memory=512 * MIB),
    )
    assert result.status == 0 and not result.oom_killed and data is not None, text
    assert data == dict.fromkeys(FLOOD_DIRS[who], "ENOSPC"), data
    assert errno.errorcode[28] == "ENOSPC"


@pytest.mark.privileged
def test_host_paths_are_not_shown_inside() -> None:
    """What every process inside may read about PID 1 (its argv) and the mounts names no
    host path of the run dir, the state dir or the executor (init's argv is scrubbed, the
    overlay's options name the scratch dir's entries relatively, layers by descriptor)."""
    needles = [str(run_dir()), str(state_dir()), runtime_binary(), str(hostimage.layer_dir())]
    data = probe_ok("host_paths", {"needles": needles})
    assert data == {
        "/proc/1/cmdline": "clean",
        "/proc/self/mountinfo": "clean",
        "/proc/self/mounts": "clean",
    }, data
