"""The container's seccomp filter, generated as a classic-BPF program (no libseccomp).

Layer: runtime (OS side). ``Container.start`` calls ``write_filter`` when the spec asks
for seccomp (the default); ``describe`` and ``format_rules`` document the policy.

The output of :func:`build_filter` is a sequence of raw ``struct sock_filter`` entries
(8 bytes each: ``u16 code, u8 jt, u8 jf, u32 k`` in native byte order) that ``sk-runtime``
loads with ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)`` right before ``execve`` (plan
record ``seccomp HOSTFILE``).

Policy (the reasons are in ``docs/security.md`` and in :func:`describe`):

1. ``seccomp_data.arch`` other than AUDIT_ARCH_X86_64 (i386 through ``int 0x80``, ...):
   KILL_PROCESS.
2. A negative system call number: ERRNO(ENOSYS), what the kernel itself answers.
3. An x32 number (bit 30, ``0x40000000``, set): KILL_PROCESS.
4. Every x86_64 system call of :mod:`sandbox_kernel.runtime.seccomp_tables` is classified:
   allowed, denied with ERRNO(EPERM), allowed after an argument check, or (``clone3``)
   ERRNO(ENOSYS).
   Any number the table does not know (holes, system calls of newer kernels) gets
   ERRNO(ENOSYS), so a libc falls back to an older call as it does on an older kernel.

The number dispatch is a binary search over runs of numbers sharing one outcome, so the
program stays a few hundred instructions long.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import struct
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import SpecError, wrap_oserror
from .seccomp_tables import HIGHEST_KNOWN, I386_ONLY, X86_64_SYSCALLS

__all__ = [
    "AUDIT_ARCH_I386",
    "AUDIT_ARCH_X86_64",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS",
    "Rule",
    "build_filter",
    "describe",
    "format_rules",
    "write_filter",
]

# --- kernel constants (linux/filter.h, linux/bpf_common.h, linux/seccomp.h, linux/audit.h)

BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_K = 0x00
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_JSET = 0x40

OP_LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
OP_JA = BPF_JMP | BPF_JA
OP_JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
OP_JGE_K = BPF_JMP | BPF_JGE | BPF_K
OP_JSET_K = BPF_JMP | BPF_JSET | BPF_K
OP_RET_K = BPF_RET | BPF_K

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_I386 = 0x40000003  # EM_386 | __AUDIT_ARCH_LE

X32_SYSCALL_BIT = 0x40000000
NEGATIVE_NR = 0x80000000
BPF_MAXINSNS = 4096
SOCK_FILTER = struct.Struct("=HBBI")

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
OFF_NR = 0
OFF_ARCH = 4
_LOW_HALF = 0 if sys.byteorder == "little" else 4


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of ``args[index]`` in struct seccomp_data."""
    return 16 + 8 * index + _LOW_HALF


RET_ALLOW = SECCOMP_RET_ALLOW
RET_KILL = SECCOMP_RET_KILL_PROCESS
RET_EPERM = SECCOMP_RET_ERRNO | errno.EPERM
RET_ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
RET_EAFNOSUPPORT = SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT

# --- argument constants

# Namespace flags that clone(2) accepts (CLONE_NEWTIME, 0x80, is clone3/unshare only: in
# clone's flags the low byte is the exit signal).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# personality(2) values Docker's default profile allows: PER_LINUX, PER_LINUX32,
# UNAME26, UNAME26|PER_LINUX32, and 0xffffffff (query the current persona).
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# ioctl requests refused whatever the fd: TIOCSTI fakes terminal input (pushes commands into
# a shell that shares the terminal), TIOCLINUX reaches the virtual-console driver (selection
# paste = the same injection), TIOCSETD loads tty line disciplines (n_hdlc CVE-2017-2636,
# n_gsm CVE-2023-6546).
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TIOCSETD = 0x5423
IOCTL_DENIED = {"TIOCSTI": TIOCSTI, "TIOCLINUX": TIOCLINUX, "TIOCSETD": TIOCSETD}

# socket(2)/socketpair(2) families allowed; everything else gets EAFNOSUPPORT, what a kernel
# built without that family answers.
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
SOCKET_FAMILIES_ALLOWED = {
    "AF_UNIX": AF_UNIX,
    "AF_INET": AF_INET,
    "AF_INET6": AF_INET6,
    "AF_NETLINK": AF_NETLINK,
}

# --- the policy tables

_R_KEYS = "the kernel keyring is not namespaced: keys of the host and of other users"
_R_TRACING = "whole-kernel tracing/eBPF: large attack surface and host information leaks"
_R_MODULES = "loads code into (or replaces) the host kernel"
_R_MOUNT = "changes the mount tree: could undo masked and read-only paths"
_R_NS = "new namespaces (user ns above all) unlock kernel code reachable only with capabilities"
_R_HANDLES = "file handles bypass the mount tree and open host files (the 'shocker' escape)"
_R_UFFD = "stalls kernel page faults: a standard tool to win races in kernel exploits"
_R_PTRACE = "inspects or alters other processes; Docker needs CAP_SYS_PTRACE for it"
_R_TIME = "the host clock is not namespaced"
_R_ADMIN = "host-wide administration, needs capabilities the kernel never has"
_R_OBSOLETE = "obsolete or unimplemented interface, no legitimate use"
_R_HW = "raw I/O ports / LDT changes: hardware access and historical exploit vectors"
_R_NUMA = "NUMA placement changes affect other tenants; Docker needs CAP_SYS_NICE"
_R_URING = "io_uring: frequent source of kernel exploits, and its operations bypass seccomp"
_R_FANOTIFY = "filesystem-wide monitoring"
_R_SECRETMEM = "memfd_secret: special memory-management surface, no use in a notebook"
_R_CHROOT = "building block of escapes; never needed in a container that is already rooted"

DENIED: dict[str, str] = {
    **dict.fromkeys(["add_key", "request_key", "keyctl"], _R_KEYS),
    **dict.fromkeys(["bpf", "perf_event_open", "lookup_dcookie"], _R_TRACING),
    **dict.fromkeys(
        [
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
        ],
        _R_MODULES,
    ),
    **dict.fromkeys(
        [
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        ],
        _R_MOUNT,
    ),
    "chroot": _R_CHROOT,
    **dict.fromkeys(["unshare", "setns"], _R_NS),
    **dict.fromkeys(["open_by_handle_at", "name_to_handle_at"], _R_HANDLES),
    "userfaultfd": _R_UFFD,
    **dict.fromkeys(
        ["ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"], _R_PTRACE
    ),
    **dict.fromkeys(["clock_settime", "clock_adjtime", "settimeofday"], _R_TIME),
    **dict.fromkeys(
        [
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "syslog",
            "vhangup",
            "sethostname",
            "setdomainname",
        ],
        _R_ADMIN,
    ),
    **dict.fromkeys(
        [
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "getpmsg",
            "putpmsg",
            "afs_syscall",
            "tuxcall",
            "security",
            "vserver",
            "epoll_ctl_old",
            "epoll_wait_old",
        ],
        _R_OBSOLETE,
    ),
    **dict.fromkeys(["iopl", "ioperm", "modify_ldt"], _R_HW),
    **dict.fromkeys(
        ["mbind", "set_mempolicy", "set_mempolicy_home_node", "move_pages", "migrate_pages"],
        _R_NUMA,
    ),
    **dict.fromkeys(["io_uring_setup", "io_uring_enter", "io_uring_register"], _R_URING),
    "fanotify_init": _R_FANOTIFY,
    "memfd_secret": _R_SECRETMEM,
}

# What allow_ptrace=True allows (Docker's CAP_SYS_PTRACE group).
PTRACE_GROUP = ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd")

_R_CLONE3 = (
    "its flags sit behind a pointer seccomp cannot read; ENOSYS makes glibc fall back to "
    "clone(2), whose flags are checked"
)


# --- internal representation of outcomes


@dataclass(frozen=True)
class _Test:
    op: Literal["eq", "set"]
    value: int
    ret: int


@dataclass(frozen=True)
class _ArgCheck:
    """Load the low 32 bits of ``args[arg]``, run the tests in order, else ``default``."""

    arg: int
    tests: tuple[_Test, ...]
    default: int


_Outcome = int | _ArgCheck  # an int is a RET value


def _special_rules() -> dict[str, _ArgCheck]:
    return {
        # x86_64 clone(flags, newsp, parent_tid, child_tid, tls): flags is args[0]; the
        # kernel keeps only lower_32_bits(flags), so the high half cannot smuggle anything.
        "clone": _ArgCheck(0, (_Test("set", CLONE_NAMESPACE_FLAGS, RET_EPERM),), RET_ALLOW),
        # ioctl(fd, unsigned int cmd, ...): the kernel truncates cmd to 32 bits, so only the
        # low half is compared (high bits set must not bypass the check, CVE-2017-5226 class).
        "ioctl": _ArgCheck(
            1, tuple(_Test("eq", v, RET_EPERM) for v in IOCTL_DENIED.values()), RET_ALLOW
        ),
        # personality(unsigned int persona)
        "personality": _ArgCheck(
            0, tuple(_Test("eq", v, RET_ALLOW) for v in PERSONALITY_ALLOWED), RET_EPERM
        ),
        # socket(int domain, ...), socketpair(int domain, ...)
        "socket": _ArgCheck(
            0,
            tuple(_Test("eq", v, RET_ALLOW) for v in SOCKET_FAMILIES_ALLOWED.values()),
            RET_EAFNOSUPPORT,
        ),
        "socketpair": _ArgCheck(
            0,
            tuple(_Test("eq", v, RET_ALLOW) for v in SOCKET_FAMILIES_ALLOWED.values()),
            RET_EAFNOSUPPORT,
        ),
    }


def _check_names(extra_denied: Sequence[str]) -> list[str]:
    if isinstance(extra_denied, str):
        raise SpecError(
            f"extra_denied={extra_denied!r}: expected a list of system call names, not a string",
            "seccomp",
        )
    problems = []
    for name in extra_denied:
        if name in X86_64_SYSCALLS:
            continue
        if name in I386_ONLY:
            problems.append(
                f"extra_denied: {name!r} is not an x86_64 system call; the filter already kills "
                "every i386 system call, remove it from the list"
            )
        else:
            problems.append(
                f"extra_denied: {name!r} is not a known x86_64 system call name "
                "(see sandbox_kernel/seccomp_tables.py); fix the spelling"
            )
    if problems:
        raise SpecError(problems, "seccomp")
    return list(extra_denied)


def _outcomes(allow_ptrace: bool, extra_denied: Sequence[str]) -> dict[int, _Outcome]:
    """Number -> outcome for every system call of the table."""
    extra = set(_check_names(extra_denied))
    special = _special_rules()
    out: dict[int, _Outcome] = {}
    for name, nr in X86_64_SYSCALLS.items():
        outcome: _Outcome
        if name in extra:
            outcome = RET_EPERM
        elif allow_ptrace and name in PTRACE_GROUP:
            outcome = RET_ALLOW
        elif name in DENIED:
            outcome = RET_EPERM
        elif name == "clone3":
            outcome = RET_ENOSYS
        elif name in special:
            outcome = special[name]
        else:
            outcome = RET_ALLOW
        out[nr] = outcome
    return out


# --- a tiny assembler with labels and automatic long-jump trampolines


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: str | None = None  # label; None: the next instruction
    jf: str | None = None
    target: str | None = None  # JA only


@dataclass
class _Label:
    name: str


_Item = _Insn | _Label


def _is_cond(insn: _Insn) -> bool:
    return insn.code in (OP_JEQ_K, OP_JGE_K, OP_JSET_K)


def _layout(
    items: Sequence[_Item], long_t: set[int], long_f: set[int]
) -> tuple[dict[int, int], dict[str, int]]:
    """Addresses of the instructions and labels, with room for the trampolines already
    known to be needed (``long_t``/``long_f``: conditional jumps whose true/false target is
    out of reach)."""
    addr: dict[int, int] = {}
    labels: dict[str, int] = {}
    pos = 0
    for i, item in enumerate(items):
        if isinstance(item, _Label):
            if item.name in labels:
                raise AssertionError(f"duplicate label {item.name}")
            labels[item.name] = pos
            continue
        addr[i] = pos
        pos += 1 + (i in long_t) + (i in long_f)
    return addr, labels


def _find_long_jumps(
    items: Sequence[_Item], long_t: set[int], long_f: set[int]
) -> tuple[dict[int, int], dict[str, int]]:
    """Grow ``long_t``/``long_f`` until every conditional offset fits in 8 bits; return the
    final layout."""
    while True:
        addr, labels = _layout(items, long_t, long_f)
        changed = False
        for i, item in enumerate(items):
            if isinstance(item, _Label) or not _is_cond(item):
                continue
            for lab, longs in ((item.jt, long_t), (item.jf, long_f)):
                if lab is None or i in longs:
                    continue
                off = labels[lab] - (addr[i] + 1)
                if off < 0:
                    raise AssertionError(f"backward jump to {lab}")
                if off > 255:
                    longs.add(i)
                    changed = True
        if not changed:
            return addr, labels


def _assemble(items: Sequence[_Item]) -> list[tuple[int, int, int, int]]:
    """Resolve labels. A conditional jump whose target is more than 255 instructions away
    gets a ``JA`` trampoline right after it (iterated until every offset fits)."""
    long_t: set[int] = set()
    long_f: set[int] = set()
    addr, labels = _find_long_jumps(items, long_t, long_f)
    prog: list[tuple[int, int, int, int]] = []
    for i, item in enumerate(items):
        if isinstance(item, _Label):
            continue
        here = addr[i]
        if item.code == OP_JA:
            assert item.target is not None
            prog.append((OP_JA, 0, 0, labels[item.target] - (here + 1)))
            continue
        if not _is_cond(item):
            prog.append((item.code, 0, 0, item.k))
            continue
        n_tramp = (i in long_t) + (i in long_f)

        def rel(lab: str | None, here: int = here, n_tramp: int = n_tramp) -> int:
            return n_tramp if lab is None else labels[lab] - (here + 1)

        jt = 0 if i in long_t else rel(item.jt)
        jf = (1 if i in long_t else 0) if i in long_f else rel(item.jf)
        prog.append((item.code, jt, jf, item.k))
        for lab, longs in ((item.jt, long_t), (item.jf, long_f)):
            if i in longs:
                assert lab is not None
                prog.append((OP_JA, 0, 0, labels[lab] - (len(prog) + 1)))
    return prog


# --- code generation


class _Gen:
    def __init__(self) -> None:
        self.items: list[_Item] = []
        self._n = 0

    def label(self) -> str:
        self._n += 1
        return f"L{self._n}"

    def place(self, name: str) -> None:
        self.items.append(_Label(name))

    def ld(self, offset: int) -> None:
        self.items.append(_Insn(OP_LD_W_ABS, offset))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None = None) -> None:
        self.items.append(_Insn(code, k, jt, jf))

    def ret(self, value: int) -> None:
        self.items.append(_Insn(OP_RET_K, value))

    def outcome(self, outcome: _Outcome) -> None:
        if isinstance(outcome, int):
            self.ret(outcome)
            return
        self.ld(_arg_low(outcome.arg))
        rets: dict[int, str] = {}
        for test in outcome.tests:
            lab = rets.setdefault(test.ret, self.label())
            self.jump(OP_JEQ_K if test.op == "eq" else OP_JSET_K, test.value, lab)
        self.ret(outcome.default)
        for value, lab in rets.items():
            self.place(lab)
            self.ret(value)

    def tree(self, runs: Sequence[tuple[int, _Outcome]]) -> None:
        """Binary search over ``runs`` (start number, outcome), sorted, contiguous; the
        loaded accumulator holds the number, known to be >= runs[0][0]."""
        if len(runs) == 1:
            self.outcome(runs[0][1])
            return
        mid = len(runs) // 2
        right = self.label()
        self.jump(OP_JGE_K, runs[mid][0], right)
        self.tree(runs[:mid])
        self.place(right)
        self.tree(runs[mid:])


def _runs(outcomes: dict[int, _Outcome]) -> list[tuple[int, _Outcome]]:
    """Runs of consecutive numbers with the same outcome over 0..X32_SYSCALL_BIT-1; numbers
    not in the table (holes, newer kernels) get ENOSYS."""
    runs: list[tuple[int, _Outcome]] = []
    for nr in range(HIGHEST_KNOWN + 2):
        outcome = outcomes.get(nr, RET_ENOSYS)
        if not runs or runs[-1][1] != outcome:
            runs.append((nr, outcome))
    return runs


def build_filter(*, allow_ptrace: bool = False, extra_denied: Sequence[str] = ()) -> bytes:
    """The filter program as raw ``struct sock_filter`` entries (native byte order).

    ``allow_ptrace`` allows ptrace, process_vm_readv/writev, kcmp and pidfd_getfd (debuggers,
    profilers such as py-spy). ``extra_denied`` names more x86_64 system calls to answer with
    EPERM (even ones normally allowed after an argument check). Raises SpecError for a name
    that is not an x86_64 system call. Called by ``write_filter`` (and ``describe`` mirrors
    it).
    """
    outcomes = _outcomes(allow_ptrace, extra_denied)
    g = _Gen()
    kill, enosys = g.label(), g.label()
    g.ld(OFF_ARCH)
    g.jump(OP_JEQ_K, AUDIT_ARCH_X86_64, None, kill)
    g.ld(OFF_NR)
    g.jump(OP_JGE_K, NEGATIVE_NR, enosys)
    g.jump(OP_JSET_K, X32_SYSCALL_BIT, kill)
    g.tree(_runs(outcomes))
    g.place(kill)
    g.ret(RET_KILL)
    g.place(enosys)
    g.ret(RET_ENOSYS)
    prog = _assemble(g.items)
    if len(prog) >= BPF_MAXINSNS:
        raise AssertionError(f"seccomp program too long: {len(prog)} instructions")
    return b"".join(SOCK_FILTER.pack(*insn) for insn in prog)


@functools.lru_cache(maxsize=8)
def _built(allow_ptrace: bool, extra_denied: tuple[str, ...]) -> bytes:
    """``build_filter``'s program, built once per process for each choice (a server starts
    many kernels with the same filter; building it takes about 0.7 ms)."""
    return build_filter(allow_ptrace=allow_ptrace, extra_denied=extra_denied)


def write_filter(
    directory: str | os.PathLike[str],
    *,
    allow_ptrace: bool = False,
    extra_denied: Sequence[str] = (),
) -> Path:
    """Write the program into ``directory`` under a name derived from its content
    (``seccomp-<sha256 prefix>.bpf``) and return the path. ``directory`` is created (mode
    0700) if missing. An existing file with the right content is reused; a damaged one is
    replaced (atomically, via rename). Called by ``Container.start`` with the run root's
    ``.seccomp`` directory, at each start of a container with ``seccomp=True``."""
    data = _built(allow_ptrace, tuple(extra_denied))
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise wrap_oserror(
            exc, "cannot create the seccomp filter directory", str(directory)
        ) from exc
    path = directory / f"seccomp-{hashlib.sha256(data).hexdigest()[:32]}.bpf"
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return path
    except OSError:
        pass  # unreadable: rewrite below
    try:
        fd, tmp = tempfile.mkstemp(prefix=".seccomp-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise wrap_oserror(exc, "cannot create the seccomp filter in", str(directory)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise wrap_oserror(exc, "cannot write the seccomp filter", str(path)) from exc
    return path


# --- description for docs and `sandbox-kernel` diagnostics


@dataclass(frozen=True)
class Rule:
    """One line of the policy: which calls, under what condition, what answer, and why
    (made by ``describe``)."""

    subject: str
    condition: str
    action: str
    reason: str


def _action_name(value: int) -> str:
    if value == RET_ALLOW:
        return "ALLOW"
    if value == RET_KILL:
        return "KILL_PROCESS"
    if value & 0xFFFF0000 == SECCOMP_RET_ERRNO:
        code = value & 0xFFFF
        return f"ERRNO({errno.errorcode.get(code, str(code))})"
    return hex(value)


def describe(*, allow_ptrace: bool = False, extra_denied: Sequence[str] = ()) -> list[Rule]:
    """The rules of the filter :func:`build_filter` makes with the same options, in the
    order the program checks them. For docs/security.md and the tests; no start path calls
    it."""
    outcomes = _outcomes(allow_ptrace, extra_denied)
    extra = set(extra_denied)
    by_nr = {nr: name for name, nr in X86_64_SYSCALLS.items()}
    rules = [
        Rule(
            "any system call",
            f"arch != AUDIT_ARCH_X86_64 ({AUDIT_ARCH_X86_64:#x}), e.g. i386 via int 0x80",
            "KILL_PROCESS",
            "the 32-bit tables have other numbers; one policy per ABI is error prone",
        ),
        Rule(
            "any system call",
            "nr < 0",
            "ERRNO(ENOSYS)",
            "what the kernel answers anyway",
        ),
        Rule(
            "any system call",
            f"nr & {X32_SYSCALL_BIT:#x} (x32 ABI)",
            "KILL_PROCESS",
            "no x32 binary belongs in an x86_64 image: a deliberate dodge, treated like i386",
        ),
    ]
    special = _special_rules()
    details = {
        "clone": f"flags & {CLONE_NAMESPACE_FLAGS:#x} (CLONE_NEW*) -> ERRNO(EPERM), else ALLOW",
        "ioctl": (
            "low 32 bits of request in {"
            + ", ".join(f"{n} {v:#x}" for n, v in IOCTL_DENIED.items())
            + "} -> ERRNO(EPERM), else ALLOW"
        ),
        "personality": (
            "persona in {"
            + ", ".join(f"{v:#x}" for v in PERSONALITY_ALLOWED)
            + "} -> ALLOW, else ERRNO(EPERM)"
        ),
        "socket": (
            "domain in {"
            + ", ".join(SOCKET_FAMILIES_ALLOWED)
            + "} -> ALLOW, else ERRNO(EAFNOSUPPORT)"
        ),
    }
    details["socketpair"] = details["socket"]
    reasons = {
        "clone": _R_NS,
        "ioctl": "TIOCSTI/TIOCLINUX inject terminal input; TIOCSETD loads line disciplines",
        "personality": "odd personas (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE...) weaken defences",
        "socket": "rare families (vsock, RDS, TIPC, AF_ALG, CAN...) are a major exploit source",
    }
    reasons["socketpair"] = reasons["socket"]
    for nr in sorted(outcomes):
        name = by_nr[nr]
        outcome = outcomes[nr]
        if isinstance(outcome, _ArgCheck):
            rules.append(Rule(name, details[name], "by argument", reasons[name]))
        elif outcome == RET_ALLOW:
            continue
        elif name in extra:
            rules.append(Rule(name, "always", _action_name(outcome), "denied by the site"))
        elif name == "clone3":
            rules.append(Rule(name, "always", _action_name(outcome), _R_CLONE3))
        else:
            rules.append(Rule(name, "always", _action_name(outcome), DENIED[name]))
    assert set(special) <= set(details)
    if allow_ptrace:
        rules.append(
            Rule(", ".join(PTRACE_GROUP), "always", "ALLOW", "allow_ptrace=True (debuggers)")
        )
    rules.append(
        Rule(
            "every other x86_64 system call of the table",
            f"0 <= nr <= {HIGHEST_KNOWN}",
            "ALLOW",
            "the ordinary Linux API; capabilities and namespaces bound what it can do",
        )
    )
    rules.append(
        Rule(
            "numbers the table does not know",
            f"holes, nr > {HIGHEST_KNOWN}",
            "ERRNO(ENOSYS)",
            "new kernel features stay off until reviewed; libcs fall back as on an old kernel",
        )
    )
    return rules


def format_rules(rules: Iterable[Rule]) -> str:
    """A Markdown table of ``rules`` (``describe``'s), as in docs/security.md."""
    lines = ["| system call | condition | action | reason |", "|---|---|---|---|"]
    for r in rules:
        cells = (r.subject, r.condition, r.action, r.reason)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
