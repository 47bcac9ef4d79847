"""Pieces shared by the v1 and v2 managers: file access (injectable), error wrapping, checks.

Layer: cgroups (OS side, internal: only ``v1``, ``v2`` and the package's ``__init__`` import
it; the runtime gets ``cpus_to_quota`` and tests get ``CgroupIO`` through the package).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

from ..errors import CgroupError, PrivilegeError, SandboxError, SpecError
from .base import CgroupHandle, CgroupLimits, CgroupManager
from .detect import CgroupLayout

#: Default bound for kill() to see the cgroup empty, and for remove() to retry EBUSY.
KILL_TIMEOUT_S = 5.0
REMOVE_TIMEOUT_S = 5.0

_PRIV_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class CgroupIO:
    """Every filesystem and signal operation the managers do. Tests substitute a subclass.

    Methods raise plain OSError; the managers turn them into CgroupError/PrivilegeError.
    """

    def read(self, path: str) -> str:
        """The whole file as text (cgroup files are ASCII)."""
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def write(self, path: str, value: str) -> None:
        """Write ``value`` to an existing file, truncating it."""
        # One write(2) per value: cgroup files act on each write call.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        """``os.path.exists``."""
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        """``os.path.isdir``."""
        return os.path.isdir(path)

    def stat(self, path: str) -> os.stat_result:
        """The owner and mode of a cgroup file or directory (never through a symlink)."""
        return os.stat(path, follow_symlinks=False)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """Hand a delegated cgroup file or directory to its user (never through a symlink)."""
        os.chown(path, uid, gid, follow_symlinks=False)

    def listdir(self, path: str) -> list[str]:
        """``os.listdir``."""
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        """Create one cgroup directory (mode 0755)."""
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        """Remove one (empty) cgroup directory."""
        os.rmdir(path)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to host process ``pid`` (the v1 and no-cgroup.kill kill loops)."""
        os.kill(pid, sig)

    def sleep(self, seconds: float) -> None:
        """Pause between the retries of the kill and removal loops."""
        time.sleep(seconds)

    def monotonic(self) -> float:
        """The clock the kill and removal loops' deadlines are measured on."""
        return time.monotonic()


def cgroup_error(exc: OSError, action: str, path: str, fix: str = "") -> SandboxError:
    """A CgroupError (PrivilegeError for EACCES/EPERM/EROFS) naming path, action and fix.
    Called by ``Files`` and the drivers wherever an OSError of a cgroup file is caught."""
    msg = f"{action} {path}: {exc.strerror or exc}"
    err: SandboxError
    if exc.errno in _PRIV_ERRNOS:
        if not fix:
            fix = (
                "run the server as root or in a cgroup delegated to its user "
                "(systemd Delegate=yes), with cgroupfs mounted read-write"
            )
        err = PrivilegeError(f"{msg}; {fix}")
    else:
        err = CgroupError(f"{msg}; {fix}" if fix else msg)
    err.errno = exc.errno
    err.__cause__ = exc
    return err


def check_name(name: str) -> None:
    """A container cgroup name must be one plain path component (SpecError otherwise).
    Called by both drivers before any path is built from a name (``create``, ``open``)."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\0" in name
        or "\n" in name
        or len(name) > 200
    ):
        raise SpecError(
            f"cgroup name {name!r} is not a single path component; use a name like 'sk-<id>' "
            "made of letters, digits, '-', '_' and '.'",
            context="cgroup",
        )


def check_limits(limits: CgroupLimits) -> None:
    """Reject values the kernel would refuse or misread, before touching any file.
    Called by both drivers' ``create`` and ``set_limits`` (SpecError listing each problem)."""
    problems: list[str] = []
    if limits.memory is not None and limits.memory <= 0:
        problems.append(f"memory={limits.memory}: must be a positive number of bytes or None")
    if limits.memory_swap is not None and limits.memory_swap < 0:
        problems.append(
            f"memory_swap={limits.memory_swap}: must be >= 0 bytes (0 = swap off) or None"
        )
    if not 1000 <= limits.cpu_period_us <= 1_000_000:
        problems.append(f"cpu_period_us={limits.cpu_period_us}: must be 1000..1000000 µs")
    if limits.cpu_quota_us is not None and limits.cpu_quota_us < 1000:
        problems.append(f"cpu_quota_us={limits.cpu_quota_us}: must be >= 1000 µs or None")
    if limits.cpu_weight is not None and not 1 <= limits.cpu_weight <= 10000:
        problems.append(f"cpu_weight={limits.cpu_weight}: must be 1..10000 or None")
    if limits.pids is not None and limits.pids < 1:
        problems.append(f"pids={limits.pids}: must be >= 1 or None")
    if problems:
        raise SpecError(problems, context="cgroup limits")


def cpus_to_quota(cpus: float, period: int = 100_000) -> int:
    """CFS quota in µs for ``cpus`` CPUs over ``period`` µs (at least 1000 µs, kernel minimum).
    Called by ``runtime.container.cgroup_limits`` at create and on each limit change."""
    if not cpus > 0:
        raise SpecError(f"cpus={cpus!r}: must be a number of CPUs above 0, e.g. 0.5 or 2")
    if period <= 0:
        raise SpecError(f"period={period!r}: must be a positive number of microseconds")
    return max(1000, round(cpus * period))


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight (1..10000, default 100) to v1 cpu.shares (2..262144, default 1024).
    Called by the v1 driver when it writes cpu.shares."""
    return min(262144, max(2, weight * 1024 // 100))


def parse_keyed(text: str) -> dict[str, int]:
    """Parse flat keyed files (``key value`` per line: memory.events, cpu.stat, oom_control...).
    Called by both drivers' ``stats``."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_pids(text: str) -> list[int]:
    """The pids of a cgroup.procs text (``Files.procs``)."""
    return [int(tok) for tok in text.split() if tok.isdigit()]


class Files:
    """CgroupIO plus error wrapping and the tree walks both managers need (one per manager,
    shared by its handles as ``manager.files``)."""

    def __init__(self, io: CgroupIO) -> None:
        self.io = io

    def read(self, path: str, fix: str = "") -> str:
        """Contents of a file that must exist; CgroupError naming the path and ``fix``."""
        try:
            return self.io.read(path)
        except OSError as exc:
            raise cgroup_error(exc, "reading", path, fix) from exc

    def read_opt(self, path: str) -> str | None:
        """Contents, or None when the file does not exist (controller off, older kernel)."""
        try:
            return self.io.read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise cgroup_error(exc, "reading", path) from exc

    def read_int(self, path: str) -> int | None:
        """An integer file; None if missing or ``max``."""
        text = self.read_opt(path)
        if text is None:
            return None
        text = text.strip()
        if text == "max" or not text:
            return None
        try:
            return int(text)
        except ValueError as exc:
            raise CgroupError(
                f"reading {path}: unexpected content {text!r} (expected an integer or 'max'); "
                "the kernel's cgroup interface is not the one this version supports"
            ) from exc

    def write(self, path: str, value: str, fix: str = "") -> None:
        """Write one value (the drivers' limit writes); CgroupError naming value and path."""
        try:
            self.io.write(path, value)
        except OSError as exc:
            raise cgroup_error(exc, f"writing {value!r} to", path, fix) from exc

    def exists(self, path: str) -> bool:
        """Does the file exist (controller files the kernel may not offer)?"""
        return self.io.exists(path)

    def mkdir(self, path: str) -> None:
        """Create one container cgroup directory (both drivers' ``create``)."""
        try:
            self.io.mkdir(path)
        except FileExistsError as exc:
            raise cgroup_error(
                exc,
                "creating cgroup",
                path,
                "a leftover of an earlier run? remove it (garbage collection) or use a new name",
            ) from exc
        except OSError as exc:
            raise cgroup_error(exc, "creating cgroup", path) from exc

    def subdirs(self, path: str) -> list[str]:
        """Child cgroup directories (empty if ``path`` is gone)."""
        try:
            names = self.io.listdir(path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise cgroup_error(exc, "listing", path) from exc
        return sorted(os.path.join(path, n) for n in names if self.io.isdir(os.path.join(path, n)))

    def tree_bottom_up(self, path: str) -> list[str]:
        """``path`` and every cgroup below it, deepest first."""
        out: list[str] = []
        for sub in self.subdirs(path):
            out.extend(self.tree_bottom_up(sub))
        out.append(path)
        return out

    def procs(self, path: str) -> list[int]:
        """Pids in ``path`` and in every cgroup below it (gone = none)."""
        pids: list[int] = []
        for d in self.tree_bottom_up(path):
            text = self.read_opt(os.path.join(d, "cgroup.procs"))
            if text is not None:
                pids.extend(parse_pids(text))
        return sorted(set(pids))

    def sigkill(self, pids: list[int]) -> None:
        """SIGKILL each pid (already gone is fine); a step of the drivers' kill loops."""
        for pid in pids:
            try:
                self.io.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited meanwhile
            except OSError as exc:
                raise cgroup_error(exc, "sending SIGKILL to pid", str(pid)) from exc

    def rmdir_retry(self, path: str, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """rmdir, retrying EBUSY (exiting tasks, zombies) for ``timeout`` s; gone = fine."""
        deadline = self.io.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                self.io.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or self.io.monotonic() >= deadline:
                    left = self.procs(path) if exc.errno == errno.EBUSY else []
                    fix = (
                        f"processes {left[:10]} are still in it: kill them, or reap the exited "
                        "children of the process that started them, then retry"
                        if left
                        else "a process may still hold it (an unreaped zombie): retry later"
                    )
                    raise cgroup_error(exc, "removing cgroup", path, fix) from exc
            self.io.sleep(delay)
            delay = min(delay * 2, 0.1)


class HandleBase(CgroupHandle):
    """What the v1 and v2 handles share: liveness, members, the kill loop and removal, over
    ``join_paths`` (v1: one directory per hierarchy; v2: one)."""

    def __init__(self, files: Files, name: str) -> None:
        self.name = name
        self._f = files

    def exists(self) -> bool:
        """Does any of the container's cgroup directories still exist?"""
        return any(self._f.io.isdir(d) for d in self.join_paths)

    def pids(self) -> list[int]:
        """Members of every joined directory and the cgroups below them."""
        found: set[int] = set()
        for d in self.join_paths:
            found.update(self._f.procs(d))
        return sorted(found)

    def _kill_loop(self, step: Callable[[list[int]], None], timeout: float) -> None:
        """Call ``step(members)`` until the cgroups are empty (``kill`` of both drivers);
        CgroupError when members are left after ``timeout`` s (stuck in the kernel)."""
        io = self._f.io
        deadline = io.monotonic() + timeout
        delay = 0.002
        while True:
            left = self.pids()
            if not left:
                return
            if io.monotonic() >= deadline:
                raise CgroupError(
                    f"cgroup(s) {', '.join(self.join_paths)}: processes {left[:10]} still alive "
                    f"{timeout:.1f} s after SIGKILL; they may be stuck in the kernel (D state): "
                    "check /proc/<pid>/stack and retry removal later"
                )
            step(left)
            io.sleep(delay)
            delay = min(delay * 2, 0.05)

    def remove(self, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """Kill what is left, then rmdir every directory deepest first, retrying EBUSY for
        ``timeout`` s (see ``CgroupHandle.remove`` for the callers)."""
        if not self.exists():
            return
        if self.pids():
            self.kill()
        for top in self.join_paths:
            for d in self._f.tree_bottom_up(top):
                self._f.rmdir_retry(d, timeout)


class ManagerBase(CgroupManager):
    """What the v1 and v2 managers share: the detected layout and the file access."""

    def __init__(self, layout: CgroupLayout, io: CgroupIO | None) -> None:
        self.mode = layout.mode
        self.layout = layout
        self.files = Files(io or CgroupIO())
