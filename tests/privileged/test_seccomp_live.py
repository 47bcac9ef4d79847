"""The generated seccomp filter loaded into a real kernel.

Each probe runs in a forked child that sets no_new_privs, loads the filter from the file
``write_filter`` produced (exactly what sk-runtime loads) and then attempts system calls.
Every attempt is harmless even if the filter were missing: unshare only changes the child,
which exits at once; mount targets a path that does not exist; TIOCSTI goes to a pipe (not
a terminal); keyctl only asks for the id of an existing keyring; clone3 is given no
arguments. A control run without the filter shows that the kernel's own answers differ.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import seccomp
from sandbox_kernel.runtime.seccomp_tables import X86_64_SYSCALLS

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(
        platform.system() != "Linux" or platform.machine() != "x86_64",
        reason="the filter is for Linux x86_64",
    ),
]

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
TIOCSTI = 0x5412
FIONREAD = 0x541B
KEYCTL_GET_KEYRING_ID = 0
KEY_SPEC_SESSION_KEYRING = -3
AF_PACKET = 17
SOCK_DGRAM = 2
ADDR_NO_RANDOMIZE = 0x0040000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def sys_call(name: str | int, *args: int) -> int:
    """Raw syscall: the result, or -errno."""
    number = X86_64_SYSCALLS[name] if isinstance(name, str) else name
    ctypes.set_errno(0)
    res = int(libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args)))
    return -ctypes.get_errno() if res == -1 else res


def load_filter(data: bytes) -> None:
    n = len(data) // 8
    insns = (SockFilter * n).from_buffer_copy(data)
    prog = SockFprog(n, ctypes.cast(insns, ctypes.POINTER(SockFilter)))
    zero = ctypes.c_ulong(0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog)) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def in_child(data: bytes | None, probe: Callable[[], dict[str, Any]]) -> tuple[int, Any]:
    """Run ``probe`` in a forked child (after loading ``data`` if given); return the child's
    wait status and the JSON the probe produced (None if the child died before writing)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            if data is not None:
                load_filter(data)
            out = json.dumps(probe()).encode()
        except BaseException as exc:
            out = json.dumps({"exception": repr(exc)}).encode()
            code = 3
        try:
            os.write(w, out)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    return status, (json.loads(raw) if raw else None)


def probe_denials() -> dict[str, Any]:
    r, w = os.pipe()
    missing = "/nonexistent-sandbox-kernel-seccomp-probe"
    res = {
        "getpid": sys_call("getpid"),
        "unshare_newuser": sys_call("unshare", CLONE_NEWUSER),
        "keyctl": sys_call("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),
        # TIOCSTI with garbage in the high half of the request, on a pipe (not a tty)
        "ioctl_tiocsti_high": sys_call("ioctl", r, 0xDEADBEEF00000000 | TIOCSTI, 0),
        "ioctl_fionread": sys_call("ioctl", r, FIONREAD, ctypes.addressof(ctypes.c_int())),
        "syscall_1000": sys_call(1000),
        "mount": sys_call(
            "mount", 0, ctypes.addressof(ctypes.create_string_buffer(missing.encode())), 0, 0, 0
        ),
        "clone3": sys_call("clone3", 0, 0),
        "personality_query": sys_call("personality", 0xFFFFFFFF),
        "personality_norandom": sys_call("personality", ADDR_NO_RANDOMIZE),
        "socket_packet": sys_call("socket", AF_PACKET, SOCK_DGRAM, 0),
        "bpf": sys_call("bpf", 0, 0, 0),
    }
    os.close(r)
    os.close(w)
    for key in ("socket_packet",):
        if res[key] >= 0:
            os.close(res[key])
    return res


@pytest.fixture(scope="module")
def filter_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = seccomp.write_filter(tmp_path_factory.mktemp("seccomp"))
    return Path(path).read_bytes()


def test_kernel_accepts_the_filter_and_denies(filter_bytes: bytes) -> None:
    status, res = in_child(filter_bytes, probe_denials)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, res)
    assert res["getpid"] > 0
    assert res["unshare_newuser"] == -errno.EPERM
    assert res["keyctl"] == -errno.EPERM
    assert res["ioctl_tiocsti_high"] == -errno.EPERM
    assert res["ioctl_fionread"] == 0
    assert res["syscall_1000"] == -errno.ENOSYS
    assert res["mount"] == -errno.EPERM
    assert res["clone3"] == -errno.ENOSYS
    assert res["personality_query"] >= 0
    assert res["personality_norandom"] == -errno.EPERM
    assert res["socket_packet"] == -errno.EAFNOSUPPORT
    assert res["bpf"] == -errno.EPERM


def test_control_without_filter_gives_other_answers() -> None:
    """The same probes unfiltered: proves the answers above come from the filter."""
    status, res = in_child(None, probe_denials)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, res)
    assert res["ioctl_tiocsti_high"] == -errno.ENOTTY
    assert res["mount"] != -errno.EPERM
    assert res["clone3"] != -errno.ENOSYS
    assert res["personality_norandom"] != -errno.EPERM


def probe_threads_and_fork() -> dict[str, Any]:
    """glibc's pthread_create tries clone3 first: it must fall back to clone."""
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return {"thread_ran": len(seen) == 1, "fork_exit": os.WEXITSTATUS(status)}


def test_threads_and_fork_work_under_the_filter(filter_bytes: bytes) -> None:
    status, res = in_child(filter_bytes, probe_threads_and_fork)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, res)
    assert res == {"thread_ran": True, "fork_exit": 7}


def probe_x32() -> dict[str, Any]:
    return {"x32_getpid": sys_call(0x40000000 | X86_64_SYSCALLS["getpid"])}


def probe_i386() -> dict[str, Any]:
    # mov eax, 20 (i386 getpid); int 0x80; ret
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
    mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    mem.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(addr)
    return {"i386_getpid": fn()}


@pytest.mark.parametrize("probe", [probe_x32, probe_i386])
def test_other_abis_kill_the_process(
    filter_bytes: bytes, probe: Callable[[], dict[str, Any]]
) -> None:
    status, res = in_child(filter_bytes, probe)
    assert os.WIFSIGNALED(status), (status, res)
    assert os.WTERMSIG(status) == signal.SIGSYS
    assert res is None


def test_python_runs_normally_under_the_filter(filter_bytes: bytes, tmp_path: Path) -> None:
    """Ordinary interpreter work: files, sockets on loopback, subprocess, threads."""

    def probe() -> dict[str, Any]:
        import socket
        import subprocess

        (tmp_path / "f").write_text("x")
        a, b = socket.socketpair()
        a.sendall(b"hi")
        got = b.recv(2)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        out = subprocess.run(["/bin/echo", "ok"], capture_output=True, check=True).stdout
        return {"read": (tmp_path / "f").read_text(), "sock": got.decode(), "echo": out.decode()}

    status, res = in_child(filter_bytes, probe)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, res)
    assert res == {"read": "x", "sock": "hi", "echo": "ok\n"}
