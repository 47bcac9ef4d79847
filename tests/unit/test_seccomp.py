"""The generated seccomp program, run by a small classic-BPF interpreter written here.

The interpreter implements only the instructions the generator is meant to emit, with the
kernel's semantics; any other opcode, an out-of-range jump, a misaligned or out-of-bounds
load, or running off the end of the program fails the test.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from sandbox_kernel.errors import SandboxError, SpecError
from sandbox_kernel.runtime import seccomp
from sandbox_kernel.runtime.seccomp_tables import X86_64_SYSCALLS

# --- constants written out independently of the module under test

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
EPERM = 0x00050000 | 1
ENOSYS = 0x00050000 | 38
EAFNOSUPPORT = 0x00050000 | 97

SECCOMP_DATA_SIZE = 64
MAX_INSNS = 4096

# The denied set from the policy brief, plus the few the implementation adds on purpose.
DENIED_EPERM = [
    "add_key",
    "request_key",
    "keyctl",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
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
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "reboot",
    "swapon",
    "swapoff",
    "clock_settime",
    "clock_adjtime",
    "settimeofday",
    "acct",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "iopl",
    "ioperm",
    "modify_ldt",
    "syslog",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "get_kernel_syms",
    "query_module",
    "getpmsg",
    "putpmsg",
    "afs_syscall",
    "tuxcall",
    "security",
    "vserver",
    "epoll_ctl_old",
    "epoll_wait_old",
    "mbind",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "move_pages",
    "migrate_pages",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "setdomainname",
    "sethostname",
    "chroot",
    "memfd_secret",
]
ARG_CHECKED = {"clone", "ioctl", "personality", "socket", "socketpair"}
ORDINARY = [
    "read",
    "write",
    "openat",
    "close",
    "mmap",
    "munmap",
    "mprotect",
    "brk",
    "futex",
    "epoll_wait",
    "epoll_pwait",
    "epoll_create1",
    "execve",
    "exit_group",
    "getpid",
    "rt_sigaction",
    "rt_sigreturn",
    "newfstatat",
    "statx",
    "getrandom",
    "wait4",
    "kill",
    "pipe2",
    "connect",
    "accept4",
    "prlimit64",
    "prctl",
    "seccomp",
    "landlock_create_ruleset",
    "adjtimex",
    "get_mempolicy",
    "rseq",
    "close_range",
    "openat2",
    "futex_waitv",
    "fchmodat2",
    "mseal",
    "map_shadow_stack",
    "uretprobe",
    "file_getattr",
]

# Spot checks of the number table against syscall_64.tbl.
KNOWN_NUMBERS = {
    "read": 0,
    "ioctl": 16,
    "socket": 41,
    "socketpair": 53,
    "clone": 56,
    "execve": 59,
    "ptrace": 101,
    "personality": 135,
    "mount": 165,
    "keyctl": 250,
    "unshare": 272,
    "uretprobe": 335,
    "clone3": 435,
    "io_uring_setup": 425,
    "memfd_secret": 447,
    "mseal": 462,
    "setxattrat": 463,
    "open_tree_attr": 467,
    "file_setattr": 469,
}


def nr(name: str) -> int:
    return X86_64_SYSCALLS[name]


# --- the interpreter

OP_LD_W_ABS = 0x20
OP_JA = 0x05
OP_JEQ_K = 0x15
OP_JGE_K = 0x35
OP_JSET_K = 0x45
OP_RET_K = 0x06
SUPPORTED = {OP_LD_W_ABS, OP_JA, OP_JEQ_K, OP_JGE_K, OP_JSET_K, OP_RET_K}


def decode(prog: bytes) -> list[tuple[int, int, int, int]]:
    assert len(prog) % 8 == 0, "program is not a whole number of sock_filter entries"
    return [struct.unpack_from("=HBBI", prog, off) for off in range(0, len(prog), 8)]


def validate(prog: bytes) -> list[tuple[int, int, int, int]]:
    """The checks the kernel (bpf_check_classic + seccomp_check_filter) makes, and ours."""
    insns = decode(prog)
    n = len(insns)
    assert 0 < n < MAX_INSNS
    for pc, (code, jt, jf, k) in enumerate(insns):
        assert code in SUPPORTED, f"pc {pc}: unexpected opcode {code:#x}"
        if code == OP_LD_W_ABS:
            assert k % 4 == 0 and k < SECCOMP_DATA_SIZE, f"pc {pc}: bad load offset {k}"
            assert jt == jf == 0
        elif code == OP_JA:
            assert k < n - pc - 1, f"pc {pc}: JA out of range"
        elif code in (OP_JEQ_K, OP_JGE_K, OP_JSET_K):
            assert pc + 1 + jt < n, f"pc {pc}: jt out of range"
            assert pc + 1 + jf < n, f"pc {pc}: jf out of range"
        else:
            assert jt == jf == 0
    assert insns[-1][0] == OP_RET_K, "the last instruction must be a RET"
    return insns


def seccomp_data(number: int, arch: int = AUDIT_ARCH_X86_64, args: tuple[int, ...] = ()) -> bytes:
    full = (tuple(args) + (0,) * 6)[:6]
    return struct.pack("=IIQ6Q", number & 0xFFFFFFFF, arch, 0x7F0000001234, *full)


def run(prog: bytes, number: int, *args: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    return run_counting(prog, number, *args, arch=arch)[0]


def run_counting(
    prog: bytes, number: int, *args: int, arch: int = AUDIT_ARCH_X86_64
) -> tuple[int, int]:
    """(the filter's answer, instructions executed)."""
    insns = decode(prog)
    data = seccomp_data(number, arch, args)
    acc = 0
    pc = 0
    steps = 0
    while True:
        assert 0 <= pc < len(insns), f"ran off the program at pc {pc}"
        steps += 1
        assert steps <= len(insns)
        code, jt, jf, k = insns[pc]
        if code == OP_LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data)
            (acc,) = struct.unpack_from("=I", data, k)
            pc += 1
        elif code == OP_JA:
            pc += 1 + k
        elif code == OP_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == OP_JGE_K:
            pc += 1 + (jt if acc >= k else jf)
        elif code == OP_JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == OP_RET_K:
            return k, steps
        else:
            pytest.fail(f"pc {pc}: opcode {code:#x} not implemented by the interpreter")


@pytest.fixture(scope="module")
def prog() -> bytes:
    return seccomp.build_filter()


# --- shape


def test_program_shape(prog: bytes) -> None:
    insns = validate(prog)
    assert len(prog) == 8 * len(insns)
    assert len(insns) < 400, "the binary search should keep the program a few hundred long"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"allow_ptrace": True},
        {"extra_denied": ["getpid", "ioctl", "read"]},
    ],
)
def test_every_variant_passes_validation(options: dict[str, object]) -> None:
    validate(seccomp.build_filter(**options))  # type: ignore[arg-type]


def test_dispatch_is_a_binary_search(prog: bytes) -> None:
    """Every system call is decided in a few dozen instructions, not a linear scan."""
    worst = max(run_counting(prog, n, 0, 0x5412)[1] for n in range(0, 520))
    assert worst <= 30, worst


def test_build_is_deterministic() -> None:
    assert seccomp.build_filter() == seccomp.build_filter()
    assert seccomp.build_filter() != seccomp.build_filter(allow_ptrace=True)


def test_number_table_spot_checks() -> None:
    for name, number in KNOWN_NUMBERS.items():
        assert X86_64_SYSCALLS[name] == number, name
    assert len(set(X86_64_SYSCALLS.values())) == len(X86_64_SYSCALLS)


HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not HEADER.exists(), reason="no x86_64 kernel headers here")
def test_number_table_matches_installed_headers() -> None:
    found = dict(re.findall(r"#define __NR_(\w+) (\d+)", HEADER.read_text()))
    assert len(found) > 300
    for name, number in found.items():
        assert X86_64_SYSCALLS.get(name) == int(number), name


# --- architecture and number ranges


@pytest.mark.parametrize("arch", [AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64, 0, 0xFFFFFFFF])
@pytest.mark.parametrize("number", [0, 1, 11, 26, 59, 120, 500])
def test_foreign_arch_is_killed(prog: bytes, arch: int, number: int) -> None:
    assert run(prog, number, arch=arch) == RET_KILL_PROCESS


@pytest.mark.parametrize("number", [0x40000000, 0x40000000 | 1, 0x40000000 | 520, 0x40000000 | 56])
def test_x32_numbers_are_killed(prog: bytes, number: int) -> None:
    assert run(prog, number) == RET_KILL_PROCESS


@pytest.mark.parametrize("number", [336, 400, 423, 470, 500, 1000, 0x3FFFFFFF])
def test_unknown_numbers_get_enosys(prog: bytes, number: int) -> None:
    assert run(prog, number) == ENOSYS


@pytest.mark.parametrize("number", [0xFFFFFFFF, 0x80000000, 0xC0000001])
def test_negative_numbers_get_enosys(prog: bytes, number: int) -> None:
    assert run(prog, number) == ENOSYS


# --- the deny list


@pytest.mark.parametrize("name", DENIED_EPERM)
def test_denied_syscalls_get_eperm(prog: bytes, name: str) -> None:
    assert run(prog, nr(name)) == EPERM
    assert run(prog, nr(name), 0xFFFFFFFFFFFFFFFF, 1, 2, 3, 4, 5) == EPERM


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_syscalls_are_allowed(prog: bytes, name: str) -> None:
    assert run(prog, nr(name)) == RET_ALLOW
    assert run(prog, nr(name), 3, 0xDEADBEEF, 0xFFFFFFFFFFFFFFFF) == RET_ALLOW


def test_clone3_gets_enosys_so_libc_falls_back(prog: bytes) -> None:
    assert run(prog, nr("clone3"), 0x7FFF0000, 88) == ENOSYS


def test_every_number_has_the_expected_outcome(prog: bytes) -> None:
    """Exhaustive: the whole table and a margin above it, with zero arguments."""
    by_nr = {v: k for k, v in X86_64_SYSCALLS.items()}
    for number in range(0, 700):
        got = run(prog, number)
        name = by_nr.get(number)
        if name is None:
            want = ENOSYS
        elif name in DENIED_EPERM:
            want = EPERM
        elif name == "clone3":
            want = ENOSYS
        elif name in ("socket", "socketpair"):
            want = EAFNOSUPPORT  # domain 0 (AF_UNSPEC)
        else:
            want = RET_ALLOW  # clone(0), ioctl(0, 0), personality(0): allowed
        assert got == want, f"{number} ({name}): {got:#x} != {want:#x}"


# --- argument checks


CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes
SIGCHLD = 17


@pytest.mark.parametrize(
    "flags",
    [CLONE_THREAD_FLAGS, SIGCHLD, 0x01200000 | SIGCHLD, 0xFFFFFFFF00000000 | CLONE_THREAD_FLAGS],
)
def test_clone_without_namespace_flags_is_allowed(prog: bytes, flags: int) -> None:
    assert run(prog, nr("clone"), flags, 0, 0, 0, 0) == RET_ALLOW


@pytest.mark.parametrize(
    "flag", [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]
)
def test_clone_with_any_namespace_flag_is_denied(prog: bytes, flag: int) -> None:
    assert run(prog, nr("clone"), flag | SIGCHLD) == EPERM
    assert run(prog, nr("clone"), flag | CLONE_THREAD_FLAGS) == EPERM


def test_clone_newuser_is_denied(prog: bytes) -> None:
    assert run(prog, nr("clone"), 0x10000000 | SIGCHLD) == EPERM
    assert run(prog, nr("clone"), 0, 0x10000000) == RET_ALLOW  # flags is args[0] on x86_64


@pytest.mark.parametrize(
    "cmd",
    [0x5412, 0xDEADBEEF00005412, 0x0000000100005412, 0x541C, 0xFFFFFFFF0000541C, 0x5423],
)
def test_ioctl_terminal_injection_is_denied(prog: bytes, cmd: int) -> None:
    assert run(prog, nr("ioctl"), 0, cmd) == EPERM


@pytest.mark.parametrize("cmd", [0x541B, 0x5401, 0x5413, 0x5412 << 32, 0x80045412])
def test_other_ioctls_are_allowed(prog: bytes, cmd: int) -> None:
    assert run(prog, nr("ioctl"), 0, cmd) == RET_ALLOW


def test_ioctl_check_reads_the_request_argument(prog: bytes) -> None:
    assert run(prog, nr("ioctl"), 0x5412, 0x541B, 0x5412) == RET_ALLOW


@pytest.mark.parametrize("persona", [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF])
def test_personality_allowed_values(prog: bytes, persona: int) -> None:
    assert run(prog, nr("personality"), persona) == RET_ALLOW


@pytest.mark.parametrize("persona", [0x0040000, 0x0400000, 0x1, 0x0200000, 0x20009])
def test_personality_other_values_denied(prog: bytes, persona: int) -> None:
    assert run(prog, nr("personality"), persona) == EPERM


@pytest.mark.parametrize("name", ["socket", "socketpair"])
@pytest.mark.parametrize("family", [1, 2, 10, 16, 0x100000002])
def test_common_socket_families_are_allowed(prog: bytes, name: str, family: int) -> None:
    assert run(prog, nr(name), family, 1, 0) == RET_ALLOW


@pytest.mark.parametrize("name", ["socket", "socketpair"])
@pytest.mark.parametrize("family", [0, 3, 4, 5, 17, 21, 29, 30, 31, 38, 40, 44, 0xFFFF])
def test_rare_socket_families_are_refused(prog: bytes, name: str, family: int) -> None:
    assert run(prog, nr(name), family, 1, 0) == EAFNOSUPPORT


# --- options


def test_allow_ptrace() -> None:
    prog = seccomp.build_filter(allow_ptrace=True)
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"):
        assert run(prog, nr(name)) == RET_ALLOW, name
    assert run(prog, nr("keyctl")) == EPERM
    assert run(prog, nr("mount")) == EPERM
    assert run(prog, nr("clone"), 0x10000000) == EPERM


def test_extra_denied_overrides_allow_and_argument_checks() -> None:
    prog = seccomp.build_filter(extra_denied=["getpid", "ioctl"])
    assert run(prog, nr("getpid")) == EPERM
    assert run(prog, nr("ioctl"), 0, 0x541B) == EPERM
    assert run(prog, nr("getppid")) == RET_ALLOW
    assert run(prog, nr("keyctl")) == EPERM


@pytest.mark.parametrize("bad", [["no_such_call"], ["vm86"], ["getpid", "stime"], "getpid"])
def test_extra_denied_rejects_unknown_names(bad: object) -> None:
    with pytest.raises(SpecError):
        seccomp.build_filter(extra_denied=bad)  # type: ignore[arg-type]


def test_long_jumps_get_trampolines() -> None:
    """Deny every other allowed call: hundreds of runs, so the root of the binary search
    must jump further than 255 instructions; every decision must still be right."""
    allowed = [
        name
        for name in X86_64_SYSCALLS
        if name not in DENIED_EPERM and name not in ARG_CHECKED and name != "clone3"
    ]
    extra = sorted(allowed, key=nr)[::2]
    prog = seccomp.build_filter(extra_denied=extra)
    insns = validate(prog)
    assert len(insns) > 300
    assert any(code == OP_JA for code, _, _, _ in insns), "expected JA trampolines"
    for name in X86_64_SYSCALLS:
        got = run(prog, nr(name), 0, 0x541B)
        if name in extra or name in DENIED_EPERM:
            assert got == EPERM, name
        elif name == "clone3":
            assert got == ENOSYS
        elif name in ("socket", "socketpair"):
            assert got == EAFNOSUPPORT
        else:
            assert got == RET_ALLOW, name
    assert run(prog, 600) == ENOSYS
    assert run(prog, 0, arch=AUDIT_ARCH_I386) == RET_KILL_PROCESS


# --- write_filter


def test_write_filter_is_content_addressed(tmp_path: Path) -> None:
    p1 = seccomp.write_filter(tmp_path)
    assert p1.parent == tmp_path
    assert p1.read_bytes() == seccomp.build_filter()
    assert stat.S_IMODE(p1.stat().st_mode) == 0o644
    mtime = p1.stat().st_mtime_ns
    assert seccomp.write_filter(tmp_path) == p1
    assert p1.stat().st_mtime_ns == mtime  # reused, not rewritten
    p2 = seccomp.write_filter(tmp_path, allow_ptrace=True)
    assert p2 != p1
    assert p2.read_bytes() == seccomp.build_filter(allow_ptrace=True)
    assert sorted(os.listdir(tmp_path)) == sorted([p1.name, p2.name])  # no temp files left


def test_write_filter_replaces_a_damaged_file(tmp_path: Path) -> None:
    p = seccomp.write_filter(tmp_path)
    p.write_bytes(b"\0" * 8)
    assert seccomp.write_filter(tmp_path) == p
    assert p.read_bytes() == seccomp.build_filter()


def test_write_filter_replaces_a_symlink(tmp_path: Path) -> None:
    p = seccomp.write_filter(tmp_path)
    p.unlink()
    decoy = tmp_path / "decoy"
    decoy.write_bytes(seccomp.build_filter())
    p.symlink_to(decoy)
    assert seccomp.write_filter(tmp_path) == p
    assert not p.is_symlink()
    assert p.read_bytes() == seccomp.build_filter()


def test_write_filter_creates_its_directory(tmp_path: Path) -> None:
    p = seccomp.write_filter(tmp_path / "a" / ".seccomp")
    assert p.read_bytes() == seccomp.build_filter()
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700


def test_write_filter_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SandboxError, match="file"):
        seccomp.write_filter(tmp_path / "file" / "sub")


# --- describe


def test_describe_agrees_with_the_program() -> None:
    prog = seccomp.build_filter()
    rules = seccomp.describe()
    named = {r.subject: r for r in rules}
    for name in DENIED_EPERM:
        assert named[name].action == "ERRNO(EPERM)", name
        assert named[name].reason
    assert named["clone3"].action == "ERRNO(ENOSYS)"
    for name in ARG_CHECKED:
        assert named[name].action == "by argument"
    # every "always" rule naming one system call matches what the program does
    want = {"ERRNO(EPERM)": EPERM, "ERRNO(ENOSYS)": ENOSYS}
    checked = 0
    for r in rules:
        if r.condition == "always" and r.subject in X86_64_SYSCALLS:
            assert run(prog, nr(r.subject)) == want[r.action], r.subject
            checked += 1
    assert checked == len(DENIED_EPERM) + 1
    table = seccomp.format_rules(rules)
    assert table.count("\n") == len(rules) + 2
    assert "| keyctl | always | ERRNO(EPERM) |" in table


def test_describe_options() -> None:
    rules = seccomp.describe(allow_ptrace=True, extra_denied=["getpid"])
    named = {r.subject: r for r in rules}
    assert "ptrace" not in named
    assert named["getpid"].action == "ERRNO(EPERM)"
    with pytest.raises(SpecError):
        seccomp.describe(extra_denied=["nope"])


def test_security_document_lists_every_denied_call() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    missing = [name for name in seccomp.DENIED if not re.search(rf"\b{name}\b", doc)]
    assert not missing, f"docs/security.md does not mention {missing}"


def test_errno_constants_match_this_platform() -> None:
    assert (EPERM & 0xFFFF, ENOSYS & 0xFFFF, EAFNOSUPPORT & 0xFFFF) == (
        errno.EPERM,
        errno.ENOSYS,
        errno.EAFNOSUPPORT,
    )


def test_the_program_is_built_once_per_process_for_each_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[bool, tuple[str, ...]]] = []
    real = seccomp.build_filter

    def counting(*, allow_ptrace: bool = False, extra_denied: Sequence[str] = ()) -> bytes:
        built.append((allow_ptrace, tuple(extra_denied)))
        return real(allow_ptrace=allow_ptrace, extra_denied=extra_denied)

    seccomp._built.cache_clear()
    monkeypatch.setattr(seccomp, "build_filter", counting)
    first = seccomp.write_filter(tmp_path)
    assert seccomp.write_filter(tmp_path) == first
    seccomp.write_filter(tmp_path, allow_ptrace=True)
    seccomp.write_filter(tmp_path, allow_ptrace=True)
    assert built == [(False, ()), (True, ())]
    assert first.read_bytes() == real()
    seccomp._built.cache_clear()
