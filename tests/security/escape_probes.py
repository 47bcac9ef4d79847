"""Escape attempts that run INSIDE a sandbox-kernel container, never on the host.

``tests/security/test_escape.py`` passes this file's source to ``python3 -c`` inside a
container, with the attempt's name as the first argument and its arguments as JSON in
``SK_PROBE_ARGS``. The last line of output is ``SK-RESULT {json}``: one errno name (or
outcome word) per attempted operation.

SAFETY: the guard below runs before anything else, at import time. It refuses (exit 99,
"REFUSED: not in a sandbox") unless PID 1 is our init ``sk-runtime``, no_new_privs is set,
the effective capability set is empty and the hostname is the unique one the test chose.
Run by mistake on the host as root, a "successful" attempt would change the real machine.
Attempts that could do harm if they succeeded use their least destructive form (reboot
with CAD_OFF, sysrq 'h', files opened for writing but never written, the current clock
written back, a module name that does not exist).

Python 3 standard library only (it runs with the image's interpreter).
"""

from __future__ import annotations

import os
import sys

REFUSED = 99


def _guard() -> None:
    problems: list[str] = []
    try:
        with open("/proc/1/comm") as f:
            comm = f.read().strip()
    except OSError as exc:
        comm = f"unreadable ({exc})"
    if comm != "sk-runtime":
        problems.append(f"PID 1 is {comm!r}, not sk-runtime")
    fields: dict[str, str] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError as exc:
        problems.append(f"cannot read /proc/self/status ({exc})")
    if fields.get("NoNewPrivs") != "1":
        problems.append("NoNewPrivs is {!r}".format(fields.get("NoNewPrivs")))
    if fields.get("CapEff") != "0000000000000000":
        problems.append("CapEff is {!r}".format(fields.get("CapEff")))
    want = os.environ.get("SK_PROBE_HOSTNAME", "")
    have = os.uname().nodename
    if not want or have != want:
        problems.append(f"hostname {have!r} is not the expected {want!r}")
    if problems:
        sys.stdout.write("REFUSED: not in a sandbox: {}\n".format("; ".join(problems)))
        sys.stdout.flush()
        os._exit(REFUSED)


_guard()

# ---- only reached inside a sandbox -----------------------------------------------------

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

ARGS: dict[str, Any] = json.loads(os.environ.get("SK_PROBE_ARGS") or "{}")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers (checked against sandbox_kernel/runtime/seccomp_tables.py by a unit
# test in test_escape.py, which reads this table without importing this file).
NR = {
    "ioctl": 16,
    "getpid": 39,
    "clone": 56,
    "kill": 62,
    "ptrace": 101,
    "syslog": 103,
    "personality": 135,
    "modify_ldt": 154,
    "pivot_root": 155,
    "adjtimex": 159,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "iopl": 172,
    "vhangup": 153,
    "quotactl": 179,
    "setdomainname": 171,
    "lookup_dcookie": 212,
    "fanotify_init": 300,
    "memfd_secret": 447,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "mknodat": 259,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_open": 434,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
}

AT_FDCWD = -100
SIGSYS = 31


def ename(code: int | None) -> str:
    if code is None:  # an OSError raised without an errno
        return "ENone"
    return errno.errorcode.get(code, f"E{code}")


def sysc(name: str, *args: object) -> str:
    """Raw system call; returns 'OK' (or 'OK:<value>' with keep=True) or the errno name."""
    conv: list[object] = []
    for a in args:
        if isinstance(a, int):
            conv.append(ctypes.c_long(a))
        elif isinstance(a, bytes):
            conv.append(ctypes.c_char_p(a))
        else:
            conv.append(a)
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NR[name]), *conv)
    if ret == -1:
        return ename(ctypes.get_errno())
    return "OK"


def oserr(fn: Callable[..., object], *args: object, **kw: object) -> str:
    try:
        fn(*args, **kw)
    except OSError as exc:
        return ename(exc.errno) if exc.errno else type(exc).__name__
    return "OK"


def open_result(path: str, flags: int) -> str:
    """Open and close at once (never writes): 'OPENED' or the errno name."""
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return ename(exc.errno)
    os.close(fd)
    return "OPENED"


def read_result(path: str, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError as exc:
        return ename(exc.errno)
    return f"READ:{len(data)}"


def ro_flag(path: str) -> str:
    try:
        return "RO" if os.statvfs(path).f_flag & os.ST_RDONLY else "RW"
    except OSError as exc:
        return ename(exc.errno)


def buf(size: int) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


# ---- attempts: each returns {operation: outcome} ----------------------------------------

ATTEMPTS: dict[str, Callable[[], dict[str, str]]] = {}


def attempt(fn: Callable[[], dict[str, str]]) -> Callable[[], dict[str, str]]:
    ATTEMPTS[fn.__name__] = fn
    return fn


@attempt
def read_files() -> dict[str, str]:
    """Read each path of ARGS['paths']."""
    return {p: read_result(p) for p in ARGS["paths"]}


@attempt
def open_for_write() -> dict[str, str]:
    """Open each path of ARGS['paths'] for writing (never writes)."""
    return {p: open_result(p, os.O_WRONLY) for p in ARGS["paths"]}


@attempt
def readonly_paths() -> dict[str, str]:
    """The read-only /proc paths: mount flag and a write attempt on a file inside."""
    out = {}
    for path, inner in ARGS["paths"].items():
        out[path + " mount"] = ro_flag(path) if os.path.exists(path) else "absent"
        if inner:
            out[inner] = open_result(inner, os.O_WRONLY)
    return out


@attempt
def masked_paths() -> dict[str, str]:
    """Masked paths must be absent, /dev/null, or an empty directory; never host data."""
    out = {}
    for path in ARGS["paths"]:
        try:
            st = os.lstat(path)
        except OSError as exc:
            out[path] = "absent" if exc.errno == errno.ENOENT else ename(exc.errno)
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                entries = os.listdir(path)
            except OSError as exc:
                out[path] = ename(exc.errno)
                continue
            out[path] = "emptydir" if not entries else f"EXPOSED:{len(entries)} entries"
        elif stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
            data = read_result(path)
            out[path] = "devnull" if data == "READ:0" else "EXPOSED:" + data
        else:
            out[path] = "EXPOSED:" + read_result(path)
    return out


@attempt
def sysrq_trigger() -> dict[str, str]:
    """Write 'h' (help: harmless) to /proc/sysrq-trigger; never any other letter."""
    try:
        fd = os.open("/proc/sysrq-trigger", os.O_WRONLY)
    except OSError as exc:
        return {"open": ename(exc.errno)}
    try:
        os.write(fd, b"h")
        return {"open": "OPENED", "write": "WROTE"}
    except OSError as exc:
        return {"open": "OPENED", "write": ename(exc.errno)}
    finally:
        os.close(fd)


@attempt
def proc_sys_writes() -> dict[str, str]:
    """Host-global knobs behind /proc/sys (core_pattern, modprobe: classic escapes)."""
    out = {}
    for path in (
        "/proc/sys/kernel/hostname",
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/vm/overcommit_memory",
    ):
        out[path] = open_result(path, os.O_WRONLY) if os.path.exists(path) else "absent"
    out["create /proc/sys/sk-new"] = open_result("/proc/sys/sk-new", os.O_WRONLY | os.O_CREAT)
    return out


@attempt
def sys_writes() -> dict[str, str]:
    out = {"/sys mount": ro_flag("/sys")}
    for path in (
        "/sys/class/net/lo/mtu",
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/kernel/uevent_helper",
        "/sys/fs/cgroup",
    ):
        if os.path.exists(path) and not os.path.isdir(path):
            out[path] = open_result(path, os.O_WRONLY)
    out["create /sys/sk-new"] = open_result("/sys/sk-new", os.O_WRONLY | os.O_CREAT)
    return out


@attempt
def proc_kmsg() -> dict[str, str]:
    return {
        "/proc/kmsg": read_result("/proc/kmsg", 1) if os.path.exists("/proc/kmsg") else "absent",
        "syslog READ_ALL": sysc("syslog", 3, buf(4096), 4096),
    }


@attempt
def mount_tmpfs() -> dict[str, str]:
    return {"mount": sysc("mount", b"none", b"/tmp", b"tmpfs", 0, b"size=1m")}


@attempt
def remount_usr_rw() -> dict[str, str]:
    ms_remount, ms_bind = 32, 4096
    return {"mount": sysc("mount", None, b"/usr", None, ms_remount | ms_bind, None)}


@attempt
def umount_proc() -> dict[str, str]:
    return {"umount2": sysc("umount2", b"/proc", 2)}  # MNT_DETACH


@attempt
def pivot_root() -> dict[str, str]:
    return {"pivot_root": sysc("pivot_root", b"/tmp", b"/tmp")}


@attempt
def new_mount_api() -> dict[str, str]:
    out = {
        "fsopen": sysc("fsopen", b"tmpfs", 0),
        "open_tree": sysc("open_tree", AT_FDCWD, b"/proc", 1),
    }
    out["move_mount"] = sysc("move_mount", AT_FDCWD, b"/tmp", AT_FDCWD, b"/usr", 0)
    out["fspick"] = sysc("fspick", AT_FDCWD, b"/usr", 0)
    attr = buf(32)  # struct mount_attr: clear MOUNT_ATTR_RDONLY
    struct.pack_into("=QQQQ", attr, 0, 0, 1, 0, 0)
    out["mount_setattr"] = sysc("mount_setattr", AT_FDCWD, b"/usr", 0, attr, 32)
    return out


@attempt
def mount_cgroupfs() -> dict[str, str]:
    for d in ("/tmp/cg1", "/tmp/cg2"):
        os.makedirs(d, exist_ok=True)
    return {
        "cgroup v1": sysc("mount", b"cgroup", b"/tmp/cg1", b"cgroup", 0, b"memory"),
        "cgroup2": sysc("mount", b"cgroup2", b"/tmp/cg2", b"cgroup2", 0, None),
    }


@attempt
def chroot() -> dict[str, str]:
    return {"chroot": sysc("chroot", b"/tmp")}


@attempt
def unshare() -> dict[str, str]:
    """unshare(ARGS['flag'])."""
    return {"unshare": sysc("unshare", ARGS["flag"])}


@attempt
def clone_newuser() -> dict[str, str]:
    clone_newuser, sigchld = 0x10000000, 17
    ctypes.set_errno(0)
    ret = libc.syscall(
        ctypes.c_long(NR["clone"]),
        ctypes.c_long(clone_newuser | sigchld),
        ctypes.c_long(0),
        ctypes.c_long(0),
        ctypes.c_long(0),
        ctypes.c_long(0),
    )
    if ret == 0:
        os._exit(42)
    if ret < 0:
        return {"clone": ename(ctypes.get_errno())}
    os.waitpid(ret, 0)
    return {"clone": "OK"}


@attempt
def clone3_newuser() -> dict[str, str]:
    args = buf(88)  # struct clone_args (v2), flags = CLONE_NEWUSER, exit_signal = SIGCHLD
    struct.pack_into("=QQQQQ", args, 0, 0x10000000, 0, 0, 0, 17)
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NR["clone3"]), args, ctypes.c_long(88))
    if ret == 0:
        os._exit(42)
    if ret < 0:
        return {"clone3": ename(ctypes.get_errno())}
    os.waitpid(ret, 0)
    return {"clone3": "OK"}


@attempt
def setns() -> dict[str, str]:
    out = {}
    for ns in ("mnt", "net", "pid", "user", "cgroup"):
        out["open /proc/1/ns/" + ns] = open_result("/proc/1/ns/" + ns, os.O_RDONLY)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    out["setns(self net)"] = sysc("setns", fd, 0)
    os.close(fd)
    return out


@attempt
def ptrace_init() -> dict[str, str]:
    res = sysc("ptrace", 16, 1, 0, 0)  # PTRACE_ATTACH to PID 1
    if res == "OK":
        sysc("ptrace", 17, 1, 0, 0)  # PTRACE_DETACH
    return {"PTRACE_ATTACH 1": res}


@attempt
def process_vm_init() -> dict[str, str]:
    local = buf(16)
    data = buf(8)
    struct.pack_into("=QQ", local, 0, ctypes.addressof(data), 8)
    remote = buf(16)
    struct.pack_into("=QQ", remote, 0, 0x400000, 8)
    empty = buf(16)  # zero-length: a write that could never change PID 1
    struct.pack_into("=QQ", empty, 0, 0x400000, 0)
    lempty = buf(16)
    struct.pack_into("=QQ", lempty, 0, ctypes.addressof(data), 0)
    return {
        "process_vm_readv": sysc("process_vm_readv", 1, local, 1, remote, 1, 0),
        "process_vm_writev": sysc("process_vm_writev", 1, lempty, 1, empty, 1, 0),
        "kcmp": sysc("kcmp", 1, os.getpid(), 0, 0, 0),
    }


@attempt
def pidfd_getfd_init() -> dict[str, str]:
    ctypes.set_errno(0)
    pidfd = libc.syscall(ctypes.c_long(NR["pidfd_open"]), ctypes.c_long(1), ctypes.c_long(0))
    if pidfd < 0:
        return {"pidfd_open": ename(ctypes.get_errno()), "pidfd_getfd": "skipped"}
    res = sysc("pidfd_getfd", pidfd, 0, 0)
    return {"pidfd_open": "OK", "pidfd_getfd": res}


@attempt
def proc1_files() -> dict[str, str]:
    out = {
        "/proc/1/environ": read_result("/proc/1/environ"),
        "/proc/1/mem": open_result("/proc/1/mem", os.O_RDONLY),
        "/proc/1/root readlink": oserr(os.readlink, "/proc/1/root"),
        "/proc/1/root listdir": oserr(os.listdir, "/proc/1/root"),
        "/proc/1/root/etc/hostname": read_result("/proc/1/root/etc/hostname"),
        "/proc/1/cwd listdir": oserr(os.listdir, "/proc/1/cwd"),
        "/proc/1/fd listdir": oserr(os.listdir, "/proc/1/fd"),
        "/proc/1/map_files": oserr(os.listdir, "/proc/1/map_files"),
    }
    # the fd numbers may be listable by the same uid (readdir has no ptrace check); what
    # matters is that no fd of init can be followed (CVE-2024-21626: a leaked host dir fd)
    try:
        fds = os.listdir("/proc/1/fd")
    except OSError:
        fds = []
    outcomes = set()
    for fd in fds:
        outcomes.add(oserr(os.readlink, "/proc/1/fd/" + fd))
        outcomes.add(open_result("/proc/1/fd/" + fd, os.O_PATH))
        outcomes.add(open_result("/proc/1/fd/" + fd, os.O_RDONLY))
    out["/proc/1/fd/N follow"] = ",".join(sorted(outcomes)) or "none listed"
    return out


def _ioctl(fd: int, request: int, arg: object) -> str:
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NR["ioctl"]), ctypes.c_long(fd), ctypes.c_ulong(request), arg)
    return ename(ctypes.get_errno()) if ret == -1 else "OK"


@attempt
def tiocsti() -> dict[str, str]:
    master, slave = os.openpty()
    ch = ctypes.c_char(b"x")
    out = {
        "TIOCSTI pty": _ioctl(slave, 0x5412, ctypes.byref(ch)),
        "TIOCSTI high bits 0x1_00005412": _ioctl(slave, 0x100005412, ctypes.byref(ch)),
        "TIOCSTI high bits 0xffffffff_00005412": _ioctl(
            slave, 0xFFFFFFFF00005412, ctypes.byref(ch)
        ),
        "TIOCSTI stdin": _ioctl(0, 0x5412, ctypes.byref(ch)),
    }
    os.set_blocking(master, False)
    try:
        injected = os.read(master, 16)
    except BlockingIOError:
        injected = b""
    out["echoed"] = "none" if not injected else f"INJECTED:{injected!r}"
    return out


@attempt
def tty_line_discipline() -> dict[str, str]:
    _master, slave = os.openpty()
    ldisc = ctypes.c_int(21)  # N_GSM (CVE-2023-6546); N_HDLC is 13 (CVE-2017-2636)
    sel = ctypes.c_char(b"\x02")
    return {
        "TIOCSETD N_GSM": _ioctl(slave, 0x5423, ctypes.byref(ldisc)),
        "TIOCLINUX": _ioctl(slave, 0x541C, ctypes.byref(sel)),
    }


@attempt
def keyrings() -> dict[str, str]:
    return {
        "add_key": sysc("add_key", b"user", b"sk-probe", b"x", 1, -2),
        "keyctl": sysc("keyctl", 0, -4, 0),  # KEYCTL_GET_KEYRING_ID of the user keyring
        "request_key": sysc("request_key", b"user", b"sk-probe", None, 0),
    }


@attempt
def bpf() -> dict[str, str]:
    attr = buf(128)
    return {"BPF_MAP_CREATE": sysc("bpf", 0, attr, 128), "BPF_PROG_LOAD": sysc("bpf", 5, attr, 128)}


@attempt
def perf_event_open() -> dict[str, str]:
    attr = buf(128)
    struct.pack_into("=II", attr, 0, 1, 128)  # PERF_TYPE_SOFTWARE, size; config 0 = cpu clock
    return {"perf_event_open": sysc("perf_event_open", attr, 0, -1, -1, 0)}


@attempt
def kernel_modules() -> dict[str, str]:
    fd = os.open("/dev/null", os.O_RDONLY)
    out = {
        "init_module": sysc("init_module", buf(1), 0, b""),
        "finit_module": sysc("finit_module", fd, b"", 0),
        "delete_module": sysc("delete_module", b"sk_no_such_module", os.O_NONBLOCK),
    }
    os.close(fd)
    return out


@attempt
def kexec() -> dict[str, str]:
    return {
        "kexec_load": sysc("kexec_load", 0, 0, None, 0),
        "kexec_file_load": sysc("kexec_file_load", -1, -1, 0, b"", 0),
    }


@attempt
def raw_sockets() -> dict[str, str]:
    def sock(family: int, kind: int, proto: int = 0) -> str:
        try:
            s = socket.socket(family, kind, proto)
        except OSError as exc:
            return ename(exc.errno)
        s.close()
        return "OK"

    return {
        "AF_PACKET SOCK_RAW": sock(17, socket.SOCK_RAW, 0x0300),
        "AF_PACKET SOCK_DGRAM": sock(17, socket.SOCK_DGRAM, 0x0300),
        "AF_INET SOCK_RAW": sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
        "AF_INET6 SOCK_RAW": sock(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW),
        "AF_VSOCK": sock(40, socket.SOCK_STREAM),
        "AF_ALG": sock(38, socket.SOCK_SEQPACKET),
    }


@attempt
def tcp_connect() -> dict[str, str]:
    out = {}
    for host, port in ARGS["targets"]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, port))
            out[f"{host}:{port}"] = "CONNECTED"
        except TimeoutError:
            out[f"{host}:{port}"] = "timeout"
        except OSError as exc:
            out[f"{host}:{port}"] = ename(exc.errno)
        finally:
            s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for host, port in ARGS["targets"]:
        if ":" not in host:
            out[f"udp {host}:{port}"] = oserr(u.sendto, b"x", (host, port))
    u.close()
    return out


@attempt
def unix_connect() -> dict[str, str]:
    out = {}
    for name in ARGS["abstract"]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out["@" + name] = oserr(s.connect, "\0" + name)
        s.close()
    for path in ARGS.get("paths", []):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out[path] = oserr(s.connect, path)
        s.close()
    return out


@attempt
def abstract_listen() -> dict[str, str]:
    """Listen on an abstract name; report whether anyone connected within ARGS['wait'] s."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0" + ARGS["name"])
    s.listen(4)
    print("SK-READY", flush=True)
    ready, _, _ = select.select([s], [], [], ARGS["wait"])
    return {"accepted": "CONNECTED" if ready else "nobody"}


@attempt
def mknod() -> dict[str, str]:
    out = {}
    for path, kind, major, minor in (
        ("/tmp/sk-sda", stat.S_IFBLK, 8, 0),
        ("/tmp/sk-mem", stat.S_IFCHR, 1, 1),
        ("/dev/sk-vda", stat.S_IFBLK, 253, 0),
        ("/sk-kmem", stat.S_IFCHR, 1, 2),
    ):
        out[path] = oserr(os.mknod, path, kind | 0o600, os.makedev(major, minor))
    return out


@attempt
def dev_nodes() -> dict[str, str]:
    out = {"listing": ",".join(sorted(os.listdir("/dev")))}
    for name in (
        "sda",
        "vda",
        "mem",
        "kmem",
        "port",
        "kmsg",
        "fuse",
        "net/tun",
        "kvm",
        "console",
        "loop0",
        "loop-control",
        "dm-0",
        "nvme0n1",
        "hwrng",
        "cpu/0/msr",
    ):
        out["/dev/" + name] = open_result("/dev/" + name, os.O_RDONLY)
    out["/dev/tty"] = open_result("/dev/tty", os.O_RDWR)
    out["/dev mount"] = ro_flag("/dev")
    return out


@attempt
def leaked_fds() -> dict[str, str]:
    soft = min(os.sysconf("SC_OPEN_MAX"), 65536)
    open_fds = []
    for fd in range(soft):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_fds.append(fd)
    targets = {}
    for fd in open_fds:
        try:
            targets[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            targets[str(fd)] = ename(exc.errno)
    return {"open": ",".join(str(fd) for fd in open_fds), "targets": json.dumps(targets)}


@attempt
def cwd_escape() -> dict[str, str]:
    """CVE-2024-21626: the working directory must be inside the root and '..' stays there."""
    out = {
        "getcwd": os.getcwd(),
        "/proc/self/cwd": os.readlink("/proc/self/cwd"),
        "/proc/self/root": os.readlink("/proc/self/root"),
    }
    for _ in range(40):
        os.chdir("..")
    out["after .."] = os.getcwd()
    root_entries = set(os.listdir("."))
    out["host-only names visible"] = (
        ",".join(sorted(root_entries & set(ARGS["host_only"]))) or "none"
    )
    out["same as /"] = "yes" if os.stat(".").st_ino == os.stat("/").st_ino else "NO"
    out["/.. is /"] = "yes" if os.stat("/..").st_ino == os.stat("/").st_ino else "NO"
    return out


@attempt
def exe_overwrite() -> dict[str, str]:
    """CVE-2019-5736 class: the host executor binary and host binaries stay unwritable."""
    out = {
        "/proc/1/exe O_WRONLY": open_result("/proc/1/exe", os.O_WRONLY),
        "/proc/1/exe O_RDONLY": open_result("/proc/1/exe", os.O_RDONLY),
        "/proc/1/exe O_PATH": open_result("/proc/1/exe", os.O_PATH),
        "/proc/self/exe O_WRONLY": open_result("/proc/self/exe", os.O_WRONLY),
        "/usr/bin/id O_WRONLY": open_result("/usr/bin/id", os.O_WRONLY),
    }
    mode = stat.S_IMODE(os.stat("/usr/bin/id").st_mode)
    out["chmod /usr/bin/id (same mode)"] = oserr(os.chmod, "/usr/bin/id", mode)
    return out


@attempt
def cgroup_escape() -> dict[str, str]:
    """CVE-2022-0492: release_agent, cgroup.procs and limits behind the read-only view."""
    out = {"/sys/fs/cgroup mount": ro_flag("/sys/fs/cgroup")}
    base = "/sys/fs/cgroup"
    dirs = [base]
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name)
        if os.path.isdir(p) and not os.path.islink(p):
            dirs.append(p)
    for d in dirs:
        if d != base:
            out[d + " mount"] = ro_flag(d)
        for f in (
            "release_agent",
            "notify_on_release",
            "cgroup.procs",
            "memory.limit_in_bytes",
            "memory.max",
            "pids.max",
            "cgroup.subtree_control",
        ):
            p = os.path.join(d, f)
            if os.path.exists(p):
                out[p] = open_result(p, os.O_WRONLY)
        out[d + "/release_agent exists"] = "yes" if os.path.exists(d + "/release_agent") else "no"
    out["parent cgroup.procs"] = open_result(base + "/../cgroup.procs", os.O_WRONLY)
    out["mkdir child cgroup"] = oserr(os.mkdir, dirs[-1] + "/sk-child")
    return out


@attempt
def fill() -> dict[str, str]:
    """Write 1 MiB blocks into ARGS['path'] until an error."""
    n = 0
    try:
        with open(ARGS["path"], "wb") as f:
            block = b"\xa5" * 1048576
            while n < ARGS["max_mib"]:
                f.write(block)
                f.flush()
                n += 1
        return {"error": "none", "mib": str(n)}
    except OSError as exc:
        return {"error": ename(exc.errno), "mib": str(n)}


@attempt
def forkbomb() -> dict[str, str]:
    """Fork until refused (bounded by ARGS['max']); children sleep; hold ARGS['hold'] s."""
    kids, err = [], "none"
    for _ in range(ARGS["max"]):
        try:
            pid = os.fork()
        except OSError as exc:
            err = ename(exc.errno)
            break
        if pid == 0:
            time.sleep(ARGS["hold"] + 5)
            os._exit(0)
        kids.append(pid)
    print(f"SK-READY {len(kids)} {err}", flush=True)
    time.sleep(ARGS["hold"])
    for k in kids:
        os.kill(k, signal.SIGKILL)
        os.waitpid(k, 0)
    return {"forked": str(len(kids)), "error": err}


@attempt
def fork_some() -> dict[str, str]:
    kids = []
    for _ in range(ARGS["n"]):
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        kids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
    return {
        "forked": str(len(kids)),
        "all exited 7": "yes" if codes == [7] * len(kids) else str(codes),
    }


@attempt
def memory_hog() -> dict[str, str]:
    chunks = []
    for i in range(ARGS["mib"] // 16):
        chunks.append(bytearray(b"\x01") * (16 * 1048576))
        print(f"SK-MEM {(i + 1) * 16}", flush=True)
    return {"allocated": str(ARGS["mib"])}


@attempt
def run_program() -> dict[str, str]:
    """Run ARGS['argv'] and report its exit status and output (setuid / file caps cases)."""
    try:
        p = subprocess.run(
            ARGS["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30
        )
    except OSError as exc:
        return {"status": "exec " + ename(exc.errno), "output": ""}
    return {"status": str(p.returncode), "output": p.stdout.decode("utf-8", "replace").strip()}


@attempt
def clock_set() -> dict[str, str]:
    now = buf(16)
    libc.clock_gettime(0, now)  # CLOCK_REALTIME, written back unchanged
    tv = buf(16)
    sec, nsec = struct.unpack_from("=qq", now, 0)
    struct.pack_into("=qq", tv, 0, sec, nsec // 1000)
    timex = buf(256)
    out = {
        "clock_settime": sysc("clock_settime", 0, now),
        "settimeofday": sysc("settimeofday", tv, None),
        "clock_adjtime": sysc("clock_adjtime", 0, timex),
    }
    # adjtimex is allowed by seccomp: modes=0 reads; ADJ_TICK with the current tick needs
    # CAP_SYS_TIME (the capability layer must refuse it)
    libc.adjtimex(timex)
    tick = struct.unpack_from("=q", timex, 88)[0]
    struct.pack_into("=I", timex, 0, 0x4000)
    struct.pack_into("=q", timex, 88, tick)
    out["adjtimex ADJ_TICK"] = sysc("adjtimex", timex)
    return out


@attempt
def reboot() -> dict[str, str]:
    # LINUX_REBOOT_CMD_CAD_OFF (0): the least destructive command; never POWER_OFF/RESTART
    return {"reboot CAD_OFF": sysc("reboot", 0xFEE1DEAD, 672274793, 0, None)}


@attempt
def swap() -> dict[str, str]:
    return {
        "swapon": sysc("swapon", b"/dev/null", 0),
        "swapoff": sysc("swapoff", b"/sk-no-such-swap"),
    }


@attempt
def personality() -> dict[str, str]:
    return {
        "READ_IMPLIES_EXEC": sysc("personality", 0x0400000),
        "ADDR_NO_RANDOMIZE": sysc("personality", 0x0040000),
    }


@attempt
def userfaultfd() -> dict[str, str]:
    return {"userfaultfd": sysc("userfaultfd", os.O_CLOEXEC)}


@attempt
def io_uring() -> dict[str, str]:
    params = buf(120)
    return {
        "io_uring_setup": sysc("io_uring_setup", 8, params),
        "io_uring_enter": sysc("io_uring_enter", 0, 0, 0, 0, None, 0),
        "io_uring_register": sysc("io_uring_register", 0, 0, None, 0),
    }


@attempt
def shocker() -> dict[str, str]:
    """open_by_handle_at with a forged handle for inode 2 (the root of most ext4 fs)."""
    handle = buf(8 + 128)
    mnt_id = ctypes.c_int(0)
    struct.pack_into("=Ii", handle, 0, 128, 0)
    out = {
        "name_to_handle_at": sysc(
            "name_to_handle_at", AT_FDCWD, b"/", handle, ctypes.byref(mnt_id), 0
        )
    }
    forged = buf(8 + 8)
    struct.pack_into("=IiII", forged, 0, 8, 1, 2, 0)  # FILEID_INO32_GEN: ino 2, gen 0
    root = os.open("/", os.O_RDONLY)
    out["open_by_handle_at"] = sysc("open_by_handle_at", root, forged, os.O_RDONLY)
    os.close(root)
    return out


@attempt
def proc_attr() -> dict[str, str]:
    out = {}
    for name in ("current", "exec"):
        path = "/proc/self/attr/" + name
        if not os.path.exists(path):
            out[path] = "absent"
            continue
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            out[path] = ename(exc.errno)
            continue
        try:
            os.write(fd, b"unconfined")
            out[path] = "WROTE"
        except OSError as exc:
            out[path] = ename(exc.errno)
        finally:
            os.close(fd)
    return out


@attempt
def hardware_io() -> dict[str, str]:
    return {
        "iopl": sysc("iopl", 3),
        "ioperm": sysc("ioperm", 0x80, 1, 1),
        "modify_ldt": sysc("modify_ldt", 1, buf(16), 16),
    }


@attempt
def sethostname() -> dict[str, str]:
    name = os.uname().nodename.encode()  # its own name: harmless even if it went through
    return {"sethostname": sysc("sethostname", name, len(name))}


def _child_status(fn: Callable[[], object]) -> str:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


@attempt
def abi_bypass() -> dict[str, str]:
    """Dodge the x86_64 filter through the i386 (int 0x80) and x32 ABIs."""

    def int80() -> NoReturn:
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20 (i386 getpid); int 0x80; ret
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        ret = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
        os._exit(50 if ret > 0 else 51)

    def x32() -> NoReturn:
        libc.syscall(ctypes.c_long(NR["getpid"] | 0x40000000))
        os._exit(52)

    return {"int 0x80 getpid": _child_status(int80), "x32 getpid": _child_status(x32)}


@attempt
def kill_all() -> dict[str, str]:
    """kill(-1, SIGKILL) from inside, plus direct signals to host pids in ARGS['host_pids']."""
    victim = os.fork()
    if victim == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(0.2)
    out = {"kill(-1, SIGKILL)": oserr(os.kill, -1, signal.SIGKILL)}
    _, status = os.waitpid(victim, 0)
    out["own child"] = (
        "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else "survived"
    )
    for role, pid in sorted(ARGS["host_pids"].items()):
        out[f"kill({role}, 0)"] = oserr(os.kill, pid, 0)
    return out


@attempt
def signal_supervisor() -> dict[str, str]:
    """Wait for the host pids of the supervisor and of the owner; SIGKILL them; SIGKILL PID 1."""
    path = ARGS["pidfile"]
    deadline = time.time() + 20
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    with open(path) as f:
        pids = json.load(f)
    out = {}
    for role, pid in sorted(pids.items()):
        out[f"SIGKILL {role}"] = oserr(os.kill, pid, signal.SIGKILL)
    out["SIGKILL init"] = oserr(os.kill, 1, signal.SIGKILL)
    time.sleep(0.3)
    with open("/proc/1/comm") as f:
        out["init alive"] = "yes" if f.read().strip() == "sk-runtime" else "NO"
    return out


@attempt
def plant_setuid() -> dict[str, str]:
    """As container root: leave a setuid-root executable in a writable volume."""
    src, dst = "/usr/bin/id", ARGS["path"]
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    out = {"chmod 4755": oserr(os.chmod, dst, 0o4755)}
    st = os.stat(dst)
    out["owner"] = str(st.st_uid)
    out["mode"] = f"{stat.S_IMODE(st.st_mode):o}"
    return out


@attempt
def oom_immunity() -> dict[str, str]:
    """Lower oom_score_adj to -1000: an OOM-immune kernel would push the OOM killer elsewhere."""

    def write(path: str) -> str:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            return ename(exc.errno)
        try:
            os.write(fd, b"-1000")
            return "WROTE"
        except OSError as exc:
            return ename(exc.errno)
        finally:
            os.close(fd)

    return {
        "/proc/self/oom_score_adj": write("/proc/self/oom_score_adj"),
        "/proc/1/oom_score_adj": write("/proc/1/oom_score_adj"),
    }


@attempt
def cpu_priority() -> dict[str, str]:
    """Real-time scheduling / negative nice: starve the host's other tenants."""
    out = {
        "SCHED_FIFO": oserr(os.sched_setscheduler, 0, os.SCHED_FIFO, os.sched_param(1)),
        "SCHED_RR": oserr(os.sched_setscheduler, 0, os.SCHED_RR, os.sched_param(1)),
        "nice -20": oserr(os.setpriority, os.PRIO_PROCESS, 0, -20),
    }
    return out


@attempt
def raise_rlimits() -> dict[str, str]:
    import resource

    out = {}
    for name in ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_RTPRIO"):
        res = getattr(resource, name)
        _soft, hard = resource.getrlimit(res)
        new = 1048576 if hard == resource.RLIM_INFINITY or hard < 1048576 else hard + 1
        try:
            resource.setrlimit(res, (new, new))
            out[name] = "RAISED"
        except ValueError:  # Python's message for EPERM: "not allowed to raise maximum limit"
            out[name] = "EPERM"
        except OSError as exc:
            out[name] = ename(exc.errno)
    return out


@attempt
def regain_privileges() -> dict[str, str]:
    """Capabilities back through capset/ambient/setuid/setgroups, and clearing no_new_privs."""
    header = buf(8)
    struct.pack_into("=Ii", header, 0, 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
    data = buf(24)
    struct.pack_into("=IIIIII", data, 0, *([0xFFFFFFFF] * 6))
    ctypes.set_errno(0)
    ret = libc.capset(header, data)
    out = {"capset all": "OK" if ret == 0 else ename(ctypes.get_errno())}
    libc.prctl.restype = ctypes.c_int
    prctl = [ctypes.c_ulong(v) for v in (47, 2, 21, 0, 0)]  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
    ctypes.set_errno(0)
    out["ambient raise"] = "OK" if libc.prctl(*prctl) == 0 else ename(ctypes.get_errno())
    ctypes.set_errno(0)
    nnp = [ctypes.c_ulong(v) for v in (38, 0, 0, 0, 0)]  # PR_SET_NO_NEW_PRIVS 0
    out["clear no_new_privs"] = "OK" if libc.prctl(*nnp) == 0 else ename(ctypes.get_errno())
    out["setgroups [0]"] = oserr(os.setgroups, [0])
    if os.getuid() != 0:
        out["setuid 0"] = oserr(os.setuid, 0)
        out["setresuid 0"] = oserr(os.setresuid, 0, 0, 0)
    with open("/proc/self/status") as f:
        caps = dict(line.split(":", 1) for line in f if line.startswith("Cap"))
    out["caps after"] = "none" if all(int(v, 16) == 0 for v in caps.values()) else json.dumps(caps)
    return out


@attempt
def mount_flags() -> dict[str, str]:
    names = [
        ("RO", os.ST_RDONLY),
        ("NOSUID", os.ST_NOSUID),
        ("NODEV", os.ST_NODEV),
        ("NOEXEC", os.ST_NOEXEC),
    ]
    out = {}
    for path in ARGS["paths"]:
        try:
            flags = os.statvfs(path).f_flag
        except OSError as exc:
            out[path] = ename(exc.errno)
            continue
        out[path] = ",".join(n for n, bit in names if flags & bit) or "-"
    return out


@attempt
def sysv_ipc() -> dict[str, str]:
    """SysV IPC objects of the host (IPC namespace): the keys in ARGS are not found."""
    out = {}
    libc.shmget.restype = ctypes.c_int
    libc.msgget.restype = ctypes.c_int
    libc.semget.restype = ctypes.c_int
    for kind, key in sorted(ARGS["keys"].items()):
        fn: Callable[[ctypes.c_int], int] = {
            "shm": lambda k: libc.shmget(k, 0, 0),
            "msg": lambda k: libc.msgget(k, 0),
            "sem": lambda k: libc.semget(k, 0, 0),
        }[kind]
        ctypes.set_errno(0)
        ret = fn(ctypes.c_int(key))
        out[kind] = "FOUND" if ret >= 0 else ename(ctypes.get_errno())
    return out


@attempt
def kaslr_leak() -> dict[str, str]:
    """Kernel addresses (KASLR defeat, step one of most kernel exploits) in /proc/kallsyms."""
    try:
        with open("/proc/kallsyms") as f:
            addrs = [f.readline().split()[0] for _ in range(50)]
    except OSError as exc:
        return {"/proc/kallsyms": ename(exc.errno)}
    leaked = any(int(a, 16) != 0 for a in addrs)
    return {"/proc/kallsyms": "ADDRESSES" if leaked else "zeroed"}


def _rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _netlink_ack(proto: int, msg_type: int, flags: int, body: bytes) -> str:
    """Send one netlink request, return the errno name of the kernel's ack ('OK' for 0)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    try:
        s.settimeout(3)
        s.bind((0, 0))
        header = struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0)
        s.send(header + body)
        data = s.recv(65536)
    except OSError as exc:
        return "socket " + ename(exc.errno)
    finally:
        s.close()
    _length, kind = struct.unpack_from("=IH", data, 0)
    if kind != 2:  # NLMSG_ERROR
        return f"REPLY type {kind}"
    code = struct.unpack_from("=i", data, 16)[0]
    return "OK" if code == 0 else ename(-code)


@attempt
def netlink_admin() -> dict[str, str]:
    """Kernel network configuration: rtnetlink link creation and nf_tables (CVE-2024-1086,
    CVE-2023-32233, CVE-2022-1015 need CAP_NET_ADMIN over the network namespace)."""
    request, ack, create, excl = 0x1, 0x4, 0x400, 0x200
    ifinfo = struct.pack("=BxHiII", 0, 0, 0, 0, 0)
    linkinfo = _rtattr(18, _rtattr(1, b"dummy\0"))  # IFLA_LINKINFO { IFLA_INFO_KIND }
    body = ifinfo + _rtattr(3, b"skdummy0\0") + linkinfo  # IFLA_IFNAME
    out = {"RTM_NEWLINK dummy": _netlink_ack(0, 16, request | ack | create | excl, body)}
    addr = struct.pack("=BBBBi", socket.AF_INET, 8, 0, 0, 1)  # ifaddrmsg on lo (index 1)
    body = (
        addr + _rtattr(2, socket.inet_aton("10.66.0.1")) + _rtattr(1, socket.inet_aton("10.66.0.1"))
    )
    out["RTM_NEWADDR lo"] = _netlink_ack(0, 20, request | ack | create | excl, body)
    nfgen = struct.pack("=BBH", socket.AF_INET, 0, 0)
    table = _rtattr(1, b"sk\0")  # NFTA_TABLE_NAME
    out["nf_tables NEWTABLE"] = _netlink_ack(
        12, (10 << 8) | 0, request | ack | create, nfgen + table
    )
    out["nf_tables GETTABLE"] = _netlink_ack(12, (10 << 8) | 1, request | ack, nfgen)
    return out


@attempt
def admin_misc() -> dict[str, str]:
    """Host-wide administration calls: process accounting, quotas, vhangup, NIS domain,
    dcookies, fanotify (filesystem-wide monitoring), memfd_secret."""
    name = b"(none)"
    return {
        "acct": sysc("acct", None),
        "quotactl": sysc("quotactl", 0x800007, b"/", 0, None),  # Q_SYNC, harmless
        "vhangup": sysc("vhangup"),
        "setdomainname": sysc("setdomainname", name, len(name)),
        "lookup_dcookie": sysc("lookup_dcookie", 0, buf(64), 64),
        "fanotify_init": sysc("fanotify_init", 0, 0),
        "memfd_secret": sysc("memfd_secret", 0),
    }


@attempt
def plant_and_hold() -> dict[str, str]:
    """Write a secret into each of ARGS['paths'], then hold for ARGS['wait'] seconds."""
    for path in ARGS["paths"]:
        with open(path, "w") as f:
            f.write("secret of container A\n")
    print("SK-READY", flush=True)
    time.sleep(ARGS["wait"])
    return {"held": "yes"}


@attempt
def userns_maps() -> dict[str, str]:
    """Rewrite this user namespace's maps or setgroups (to map host root in), and the
    namespace limit that keeps nested user namespaces out."""
    out = {}
    for name, data in (("uid_map", "0 0 1"), ("gid_map", "0 0 1"), ("setgroups", "allow")):
        path = "/proc/self/" + name
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            out["write " + name] = ename(exc.errno)
            continue
        try:
            os.write(fd, data.encode())
            out["write " + name] = "WROTE"
        except OSError as exc:
            out["write " + name] = ename(exc.errno)
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            out["max_user_namespaces"] = f.read().strip()
    except OSError as exc:
        out["max_user_namespaces"] = ename(exc.errno)
    with open("/proc/self/uid_map") as f:
        out["host root mapped"] = (
            "yes" if any(line.split()[1] == "0" for line in f if len(line.split()) == 3) else "no"
        )
    return out


@attempt
def setuid_copy_up() -> dict[str, str]:
    """CVE-2023-0386 class: copy a setuid file of the image up into the writable layer (a
    metadata change), then say where that layer is: the host must never see it."""
    path = ARGS["path"]
    out = {"chown (copy-up)": oserr(os.chown, path, 0, 0)}
    st = os.stat(path)
    out["mode"] = f"{stat.S_IMODE(st.st_mode):o}"
    print("SK-READY", flush=True)
    time.sleep(ARGS["wait"])
    return out


@attempt
def tiny_file_flood() -> dict[str, str]:
    """Create empty files in each of ARGS['dirs'] (made if missing) until refused, at most
    ARGS['max'] each: an inode cap ends it with ENOSPC; without one only the memory cap
    would (an OOM kill of the whole sandbox)."""
    out = {}
    for d in ARGS["dirs"]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        result = "none refused"
        for i in range(ARGS["max"]):
            try:
                os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except OSError as exc:
                result = ename(exc.errno)
                break
        out[d] = result
    return out


@attempt
def fill_file() -> dict[str, str]:
    """Write ARGS['bytes'] (1 MiB chunks) into each of ARGS['paths']: the outcome's errno."""
    out = {}
    chunk = b"x" * (1 << 20)
    for path in ARGS["paths"]:
        try:
            with open(path, "wb") as f:
                for _ in range(ARGS["bytes"] >> 20):
                    f.write(chunk)
                    f.flush()
            out[path] = "OK"
        except OSError as exc:
            out[path] = ename(exc.errno)
    return out


@attempt
def host_paths() -> dict[str, str]:
    """Read what any process inside may read about PID 1 and the mounts; report which of
    ARGS['needles'] (host paths: the run dir, the image store, the executor) appear."""
    out = {}
    for name in ("/proc/1/cmdline", "/proc/self/mountinfo", "/proc/self/mounts"):
        try:
            with open(name, "rb") as f:
                text = f.read(1 << 20).replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError as exc:
            out[name] = ename(exc.errno)
            continue
        out[name] = ",".join(n for n in ARGS["needles"] if n in text) or "clean"
    return out


def main() -> None:
    name = sys.argv[1]
    result = ATTEMPTS[name]()
    sys.stdout.write("SK-RESULT " + json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
