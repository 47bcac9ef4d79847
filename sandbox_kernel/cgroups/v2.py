"""cgroup v2 (unified hierarchy) manager.

Layer: cgroups (OS side). ``get_manager`` builds it on unified hosts (or when v2 is forced).
A container gets one directory ``<parent>/<name>`` where the parent is the caller's own cgroup
(the ``0::`` line of /proc/self/cgroup) or an explicitly configured parent (e.g. a cgroup that
systemd delegated to the server). memory, cpu and pids are enabled in the parent's
cgroup.subtree_control when they are not already; the kernel's "no internal processes" rule makes
that fail with EBUSY when the parent is not the root cgroup and has member processes.
"""

from __future__ import annotations

import contextlib
import errno
import os

from ..errors import CgroupError, ContainerNotFound
from .base import CgroupLimits, CgroupStats
from .common import (
    KILL_TIMEOUT_S,
    CgroupIO,
    Files,
    HandleBase,
    ManagerBase,
    cgroup_error,
    check_limits,
    check_name,
    parse_keyed,
)
from .detect import V2_CONTROLLERS, CgroupLayout

_DEFAULT_WEIGHT = 100

PARENT_FIX = (
    "run the server in a delegated cgroup and give kernels a parent without processes: e.g. "
    "start it with `systemd-run --scope -p Delegate=yes <server command>`, create an empty child "
    "of that scope (mkdir <scope>/kernels) and set the parent-cgroup setting "
    "(SANDBOX_KERNEL_CGROUP_PARENT) to it; or set the parent-cgroup setting to any cgroup that "
    "has no processes"
)


class V2Handle(HandleBase):
    """A container's cgroup on v2: one directory, made by ``V2Manager.create`` or found by
    ``V2Manager.open``."""

    def __init__(self, manager: V2Manager, name: str, path: str) -> None:
        super().__init__(manager.files, name)
        self.path = path
        self._m = manager
        self._peak_seen = 0

    def __repr__(self) -> str:
        return f"V2Handle({self.name!r}, {self.path!r})"

    @property
    def join_paths(self) -> list[str]:
        """The one directory of the container's cgroup."""
        return [self.path]

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def set_limits(self, limits: CgroupLimits) -> None:
        """Write memory.max, memory.swap.max, cpu.max, cpu.weight and pids.max (those the
        kernel offers); CgroupError when a limit needs a controller that is not enabled."""
        check_limits(limits)
        f = self._f
        missing = self._m.missing_controllers(limits, self.path)
        if missing:
            raise CgroupError(
                f"cgroup {self.path}: the {', '.join(missing)} controller(s) are not enabled "
                f"(not in {os.path.dirname(self.path)}/cgroup.subtree_control), so the requested "
                "limits cannot be applied; enable them in the parent's cgroup.subtree_control "
                "(they must be listed in its cgroup.controllers) or drop those limits"
            )
        write_v2_limits(f, self.path, limits)

    def _event(self, filename: str, key: str) -> int | None:
        text = self._f.read_opt(self._file(filename))
        if text is None:
            return None
        return parse_keyed(text).get(key)

    def stats(self) -> CgroupStats:
        """Read memory.current/peak, cpu.stat, cpu.max, pids and the OOM and pids.max events
        (memory.peak, where the kernel lacks it, is the highest current seen by this handle)."""
        f = self._f
        if not self.exists():
            raise ContainerNotFound(
                f"cgroup {self.path} does not exist (container {self.name} already removed?)"
            )
        current = f.read_int(self._file("memory.current")) or 0
        peak = f.read_int(self._file("memory.peak"))
        self._peak_seen = max(self._peak_seen, current)
        if peak is None:
            peak = self._peak_seen
        cpu_stat = f.read_opt(self._file("cpu.stat"))
        usage = parse_keyed(cpu_stat).get("usage_usec", 0) if cpu_stat is not None else 0
        quota: int | None = None
        period = 100_000
        cpu_max = f.read_opt(self._file("cpu.max"))
        if cpu_max is not None:
            parts = cpu_max.split()
            if parts and parts[0] != "max":
                quota = int(parts[0])
            if len(parts) > 1:
                period = int(parts[1])
        oom = self._event("memory.events", "oom_kill")
        if oom is None:  # kernels before 4.13, or a memory.events without the key
            oom = self._event("memory.events.local", "oom_kill")
        hits = self._event("pids.events", "max")
        if hits is None:
            hits = self._event("pids.events.local", "max")
        return CgroupStats(
            memory_current=current,
            memory_peak=peak,
            memory_limit=f.read_int(self._file("memory.max")),
            cpu_usage_us=usage,
            cpu_quota_us=quota,
            cpu_period_us=period,
            pids_current=f.read_int(self._file("pids.current")) or 0,
            pids_limit=f.read_int(self._file("pids.max")),
            oom_kills=oom or 0,
            pids_limit_hits=hits or 0,
        )

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """cgroup.kill (Linux 5.14+), else freeze, SIGKILL each member, thaw; repeated until
        empty or ``timeout`` s (then CgroupError)."""
        if not self.exists():
            return
        kill_file = self._file("cgroup.kill")
        if self._f.exists(kill_file):
            self._kill_loop(lambda _left: self._write_kill(kill_file), timeout)
        else:
            self._kill_loop(self._freeze_and_kill, timeout)

    def _write_kill(self, kill_file: str) -> None:
        try:
            self._f.io.write(kill_file, "1")
        except FileNotFoundError:
            pass  # removed meanwhile: the loop sees it empty
        except OSError as exc:
            raise cgroup_error(exc, "writing '1' to", kill_file) from exc

    def _freeze_and_kill(self, left: list[int]) -> None:
        """No cgroup.kill (kernel < 5.14): freeze so nothing forks while we kill, kill every
        member, thaw so that the signals are delivered."""
        io = self._f.io
        freeze_file = self._file("cgroup.freeze")
        frozen = False
        if self._f.exists(freeze_file):
            try:
                io.write(freeze_file, "1")
                frozen = True
            except OSError:
                frozen = False
        try:
            self._f.sigkill(left)
        finally:
            if frozen:
                try:
                    io.write(freeze_file, "0")
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise cgroup_error(exc, "thawing (writing '0' to)", freeze_file) from exc


class V2Manager(ManagerBase):
    """The v2 driver: container cgroups are children of one parent directory (the caller's
    own cgroup, or the configured parent). Built by ``get_manager``."""

    version = 2

    def __init__(
        self,
        layout: CgroupLayout,
        parent: str | None = None,
        io: CgroupIO | None = None,
    ) -> None:
        super().__init__(layout, io)
        mountpoint = layout.v2_mountpoint()
        if mountpoint is None:
            raise CgroupError(
                "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); mount it with "
                "`mount -t cgroup2 none /sys/fs/cgroup` or use the cgroup v1 manager"
            )
        self.mountpoint = mountpoint
        if parent:
            if parent == mountpoint or parent.startswith(mountpoint.rstrip("/") + "/"):
                self.parent = parent.rstrip("/") or "/"
            else:
                self.parent = os.path.join(mountpoint, parent.strip("/")).rstrip("/")
        else:
            own = layout.v2_dir()
            assert own is not None
            self.parent = own
        if not self.files.io.isdir(self.parent):
            raise CgroupError(
                f"parent cgroup {self.parent} does not exist; create it, or fix the parent-cgroup "
                "setting (a path inside the cgroup2 mount, e.g. /system.slice/jupyter.service)"
            )

    def __repr__(self) -> str:
        return f"V2Manager(mode={self.mode.value}, parent={self.parent!r})"

    @property
    def parent_dir(self) -> str | None:
        """The parent directory (see ``CgroupManager.parent_dir``)."""
        return self.parent

    @property
    def is_root(self) -> bool:
        """Is the parent the root cgroup (exempt from the "no internal processes" rule)?"""
        return os.path.normpath(self.parent) == os.path.normpath(self.mountpoint)

    def _set(self, path: str) -> set[str]:
        text = self.files.read_opt(path)
        return set(text.split()) if text is not None else set()

    def controllers(self) -> dict[str, bool]:
        """Which of memory, cpu, pids the parent's cgroup.controllers offers."""
        available = self._set(os.path.join(self.parent, "cgroup.controllers"))
        return {c: c in available for c in V2_CONTROLLERS}

    def missing_controllers(self, limits: CgroupLimits, path: str) -> list[str]:
        """Controllers that ``limits`` needs but that are not enabled for ``path`` (read by
        ``V2Handle.set_limits`` from the cgroup's own cgroup.controllers)."""
        wanted = []
        if limits.memory is not None:
            wanted.append("memory")
        if limits.cpu_quota_us is not None or limits.cpu_weight is not None:
            wanted.append("cpu")
        if limits.pids is not None:
            wanted.append("pids")
        enabled = self._set(os.path.join(path, "cgroup.controllers"))
        return [c for c in wanted if c not in enabled]

    def enable_controllers(self) -> list[str]:
        """Enable memory/cpu/pids (those available) in the parent's subtree_control.

        Returns what was newly enabled. Nothing is written when all are already enabled.
        Called by ``create`` before each container cgroup is made.
        """
        available = self._set(os.path.join(self.parent, "cgroup.controllers"))
        control = os.path.join(self.parent, "cgroup.subtree_control")
        enabled = self._set(control)
        todo = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
        if not todo:
            return []
        value = " ".join("+" + c for c in todo)
        try:
            self.files.io.write(control, value)
        except OSError as exc:
            if exc.errno == errno.EBUSY and not self.is_root:
                members = self.files.read_opt(os.path.join(self.parent, "cgroup.procs")) or ""
                n = len(members.split())
                err = CgroupError(
                    f"cannot enable {value!r} in {control}: cgroup v2's \"no internal "
                    f'processes" rule forbids controllers for the children of a non-root '
                    f"cgroup that has member processes, and {self.parent} has {n}"
                    f"{' (e.g. pid ' + members.split()[0] + ')' if n else ''}; "
                    f"fix: {PARENT_FIX}"
                )
                err.errno = exc.errno
                raise err from exc
            raise cgroup_error(
                exc,
                f"enabling {value!r} in",
                control,
                "the controllers must be listed in the parent's cgroup.controllers "
                "(delegated to it by its own parent)"
                if exc.errno in (errno.ENOENT, errno.EINVAL)
                else "",
            ) from exc
        return todo

    def _path(self, name: str) -> str:
        check_name(name)
        return os.path.join(self.parent, name)

    def create(self, name: str, limits: CgroupLimits) -> V2Handle:
        """Enable the controllers in the parent, mkdir ``<parent>/<name>``, apply ``limits``
        (the directory is removed again if that fails)."""
        path = self._path(name)
        check_limits(limits)
        self.enable_controllers()
        self.files.mkdir(path)
        handle = V2Handle(self, name, path)
        try:
            handle.set_limits(limits)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error matters more
                handle.remove()
            raise
        return handle

    def open(self, name: str) -> V2Handle:
        """The handle of ``<parent>/<name>``; ContainerNotFound when it does not exist."""
        path = self._path(name)
        if not self.files.io.isdir(path):
            raise ContainerNotFound(
                f"no cgroup {path} for container {name}; it was removed or never created"
            )
        return V2Handle(self, name, path)

    def list_leftovers(self, prefix: str = "sk-") -> list[str]:
        """Child cgroups of the parent named with ``prefix``."""
        return sorted(
            os.path.basename(d)
            for d in self.files.subdirs(self.parent)
            if os.path.basename(d).startswith(prefix)
        )


def write_v2_limits(f: Files, path: str, limits: CgroupLimits) -> None:
    """Write memory.max, memory.swap.max, cpu.max, cpu.weight and pids.max of cgroup ``path``
    (those the kernel offers). Called by ``V2Handle.set_limits`` and for a delegation's caps."""

    def file(name: str) -> str:
        return os.path.join(path, name)

    if f.exists(file("memory.max")):
        f.write(file("memory.max"), "max" if limits.memory is None else str(limits.memory))
        # Absent when the kernel has no swap accounting: then swap cannot be limited (or used
        # beyond what the host allows) per cgroup; nothing to write.
        if f.exists(file("memory.swap.max")):
            swap = "max" if limits.memory_swap is None else str(limits.memory_swap)
            f.write(file("memory.swap.max"), swap)
    if f.exists(file("cpu.max")):
        quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
        f.write(file("cpu.max"), f"{quota} {limits.cpu_period_us}")
        weight = _DEFAULT_WEIGHT if limits.cpu_weight is None else limits.cpu_weight
        f.write(file("cpu.weight"), str(weight))
    if f.exists(file("pids.max")):
        f.write(file("pids.max"), "max" if limits.pids is None else str(limits.pids))


def read_v2_limits(f: Files, path: str) -> CgroupLimits:
    """The caps of cgroup ``path`` as ``write_v2_limits`` writes them (``delegate --list``)."""
    quota, period = None, 100_000
    cpu_max = f.read_opt(os.path.join(path, "cpu.max"))
    if cpu_max:
        parts = cpu_max.split()
        quota = None if parts[0] == "max" else int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else period
    return CgroupLimits(
        memory=f.read_int(os.path.join(path, "memory.max")),
        cpu_quota_us=quota,
        cpu_period_us=period,
        pids=f.read_int(os.path.join(path, "pids.max")),
    )
