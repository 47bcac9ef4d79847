"""cgroup v1 (legacy and hybrid hosts) manager.

Layer: cgroups (OS side). ``get_manager`` builds it on legacy and hybrid hosts (or when v1
is forced).
A container gets ``<own cgroup>/<name>`` in each of the memory, cpu, cpuacct and pids hierarchies
(one directory when cpu and cpuacct are co-mounted as ``cpu,cpuacct``), where ``<own cgroup>`` is
the caller's cgroup in that hierarchy (from /proc/self/cgroup) or the configured parent cgroup path.

OOM kills: memory.oom_control has an ``oom_kill N`` line since Linux 4.13. On older kernels the
count falls back to the number of times ``stats()`` saw ``under_oom`` go from 0 to 1 (a lower
bound: an OOM that starts and ends between two calls is missed). memory.failcnt is not used: it
counts limit hits that reclaim resolved, not kills, and stayed 0 during real OOM kills.
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
    weight_to_shares,
)
from .detect import V1_CONTROLLERS, CgroupLayout, cgroup_dir

#: v1 controllers that a container's read-only cgroup view may mount (the mount options of a
#: hierarchy name its controllers among other options).
V1_MOUNTABLE = (
    "memory",
    "cpu",
    "cpuacct",
    "pids",
    "cpuset",
    "blkio",
    "devices",
    "freezer",
    "hugetlb",
)
#: Limits at or above this are "unlimited" (the kernel shows PAGE_COUNTER_MAX * page size).
_UNLIMITED = 1 << 62
_DEFAULT_SHARES = 1024


class V1Handle(HandleBase):
    """A container's cgroups on v1: one directory per hierarchy (memory, cpu, cpuacct,
    pids), made by ``V1Manager.create`` or found by ``V1Manager.open``."""

    def __init__(self, manager: V1Manager, name: str, dirs: dict[str, str]) -> None:
        super().__init__(manager.files, name)
        #: controller -> this container's directory in that controller's hierarchy
        self.dirs = dirs
        self._m = manager
        self._under_oom = False
        self._oom_seen = 0

    def __repr__(self) -> str:
        return f"V1Handle({self.name!r}, {self.dirs!r})"

    @property
    def join_paths(self) -> list[str]:
        """The container's directories, one per mounted hierarchy (co-mounted controllers
        share one), in controller order."""
        out: list[str] = []
        for d in self.dirs.values():
            if d not in out:
                out.append(d)
        return out

    def view_mounts(self) -> tuple[tuple[str, str], ...]:
        """One (directory name under /sys/fs/cgroup, mountable controllers) per hierarchy the
        container joined."""
        seen: dict[str, str] = {}
        for ctrl in self.dirs:
            mount = self._m.layout.v1_mounts.get(ctrl)
            if mount is None or mount.mountpoint in seen:
                continue
            ctrls = [c for c in V1_MOUNTABLE if c in mount.options]
            if ctrls:
                seen[mount.mountpoint] = ",".join(ctrls)
        return tuple((os.path.basename(m), opts) for m, opts in seen.items())

    def _file(self, controller: str, name: str) -> str | None:
        d = self.dirs.get(controller)
        return None if d is None else os.path.join(d, name)

    # -- limits -------------------------------------------------------------------------------

    def set_limits(self, limits: CgroupLimits) -> None:
        """Write memory (and memsw, in the order the kernel accepts), the CFS quota and
        period, cpu.shares and pids.max; CgroupError when a limit's hierarchy is not mounted."""
        check_limits(limits)
        missing = [
            c
            for c, wanted in (
                ("memory", limits.memory is not None),
                ("cpu", limits.cpu_quota_us is not None or limits.cpu_weight is not None),
                ("pids", limits.pids is not None),
            )
            if wanted and c not in self.dirs
        ]
        if missing:
            raise CgroupError(
                f"container cgroup {self.name}: the cgroup v1 {', '.join(missing)} "
                "hierarchy is not mounted, so the requested limits cannot be applied; mount it "
                "(e.g. `mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory`) or drop those "
                "limits"
            )
        for ctrl in ("memory", "cpu", "pids"):
            if ctrl in self.dirs:
                write_v1_limits(self._f, ctrl, self.dirs[ctrl], limits)

    # -- stats --------------------------------------------------------------------------------

    def _int(self, controller: str, name: str) -> int | None:
        path = self._file(controller, name)
        return None if path is None else self._f.read_int(path)

    def _keyed(self, controller: str, name: str) -> dict[str, int]:
        path = self._file(controller, name)
        text = None if path is None else self._f.read_opt(path)
        return {} if text is None else parse_keyed(text)

    def _oom_kills(self) -> int:
        ctl = self._keyed("memory", "memory.oom_control")
        if "oom_kill" in ctl:
            return ctl["oom_kill"]
        under = bool(ctl.get("under_oom", 0))
        if under and not self._under_oom:
            self._oom_seen += 1
        self._under_oom = under
        return self._oom_seen

    def stats(self) -> CgroupStats:
        """Read usage and max usage, cpuacct.usage, the CFS quota, pids, OOM kills (see the
        module docstring) and pids.events."""
        if not self.exists():
            raise ContainerNotFound(
                f"cgroups of container {self.name} ({', '.join(self.join_paths)}) do not exist "
                "(already removed?)"
            )
        limit = self._int("memory", "memory.limit_in_bytes")
        quota = self._int("cpu", "cpu.cfs_quota_us")
        acct_ns = self._int("cpuacct", "cpuacct.usage")
        return CgroupStats(
            memory_current=self._int("memory", "memory.usage_in_bytes") or 0,
            memory_peak=self._int("memory", "memory.max_usage_in_bytes") or 0,
            memory_limit=None if limit is None or limit >= _UNLIMITED else limit,
            cpu_usage_us=(acct_ns or 0) // 1000,
            cpu_quota_us=None if quota is None or quota < 0 else quota,
            cpu_period_us=self._int("cpu", "cpu.cfs_period_us") or 100_000,
            pids_current=self._int("pids", "pids.current") or 0,
            pids_limit=self._int("pids", "pids.max"),
            oom_kills=self._oom_kills(),
            pids_limit_hits=self._keyed("pids", "pids.events").get("max", 0),
        )

    # -- processes ----------------------------------------------------------------------------

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every member until all hierarchies are empty, or CgroupError after
        ``timeout`` s."""
        # No freezer (not one of our hierarchies): SIGKILL every member until all hierarchies
        # are empty; pids.max bounds how fast a fork loop can refill them.
        self._kill_loop(self._f.sigkill, timeout)


class V1Manager(ManagerBase):
    """The v1 driver: a container cgroup in each mounted hierarchy of memory, cpu, cpuacct
    and pids, under the caller's (or the configured) parent there. Built by ``get_manager``."""

    version = 1

    def __init__(
        self,
        layout: CgroupLayout,
        parent: str | None = None,
        io: CgroupIO | None = None,
    ) -> None:
        super().__init__(layout, io)
        #: controller -> parent directory in that hierarchy
        self.parents: dict[str, str] = {}
        for ctrl in V1_CONTROLLERS:
            mount = layout.v1_mounts.get(ctrl)
            if mount is None:
                continue
            if parent:
                self.parents[ctrl] = cgroup_dir(mount, "/" + parent.strip("/"), layout.root)
            else:
                own = layout.v1_dir(ctrl)
                assert own is not None
                self.parents[ctrl] = own
        if not self.parents:
            raise CgroupError(
                "no cgroup v1 memory, cpu, cpuacct or pids hierarchy is mounted (see "
                "/proc/self/mountinfo); mount them under /sys/fs/cgroup or use the v2 manager"
            )
        for ctrl, d in self.parents.items():
            if not self.files.io.isdir(d):
                raise CgroupError(
                    f"parent cgroup {d} ({ctrl} hierarchy) does not exist; create it, or fix the "
                    "parent-cgroup setting (a cgroup path such as /jupyter, used in every "
                    "hierarchy)"
                )

    def __repr__(self) -> str:
        return f"V1Manager(mode={self.mode.value}, parents={self.parents!r})"

    def controllers(self) -> dict[str, bool]:
        """Which of memory, cpu, pids have a mounted hierarchy with a parent directory."""
        return {c: c in self.parents for c in ("memory", "cpu", "pids")}

    def _dirs(self, name: str) -> dict[str, str]:
        check_name(name)
        return {ctrl: os.path.join(d, name) for ctrl, d in self.parents.items()}

    def create(self, name: str, limits: CgroupLimits) -> V1Handle:
        """mkdir ``<parent>/<name>`` in each hierarchy and apply ``limits`` (the directories
        made are removed again if anything fails)."""
        dirs = self._dirs(name)
        check_limits(limits)
        handle = V1Handle(self, name, dirs)
        made: list[str] = []
        try:
            for d in handle.join_paths:
                self.files.mkdir(d)
                made.append(d)
            handle.set_limits(limits)
        except BaseException:
            for d in reversed(made):
                with contextlib.suppress(Exception):  # the first error matters more
                    self.files.rmdir_retry(d, 1.0)
            raise
        return handle

    def open(self, name: str) -> V1Handle:
        """The handle of container ``name``; ContainerNotFound when no hierarchy has it."""
        handle = V1Handle(self, name, self._dirs(name))
        if not handle.exists():
            raise ContainerNotFound(
                f"no cgroup for container {name} in {', '.join(handle.join_paths)}; it was "
                "removed or never created"
            )
        return handle

    def list_leftovers(self, prefix: str = "sk-") -> list[str]:
        """Children named with ``prefix`` of the parent in any hierarchy (each name once)."""
        names: set[str] = set()
        for d in set(self.parents.values()):
            for sub in self.files.subdirs(d):
                base = os.path.basename(sub)
                if base.startswith(prefix):
                    names.add(base)
        return sorted(names)


def _v1_memory(f: Files, d: str, limits: CgroupLimits) -> None:
    """memory.limit_in_bytes and memory.memsw.limit_in_bytes of ``d``, in the order the
    kernel accepts (memory <= memsw at every moment)."""
    mem_file = os.path.join(d, "memory.limit_in_bytes")
    memsw_file = os.path.join(d, "memory.memsw.limit_in_bytes")
    new_mem = -1 if limits.memory is None else limits.memory
    if limits.memory is None or limits.memory_swap is None:
        new_memsw = -1
    else:
        new_memsw = limits.memory + limits.memory_swap
    current = f.read_int(mem_file)
    current = _UNLIMITED if current is None else current
    # When raising, memsw goes first; when lowering, memory goes first.
    raising = new_mem == -1 or new_mem > current
    # No memsw file: the kernel has no swap accounting (swapaccount=0); swap cannot be
    # limited per cgroup and only memory is written.
    order = [(mem_file, new_mem)]
    if f.exists(memsw_file):
        order = [(memsw_file, new_memsw), *order] if raising else [*order, (memsw_file, new_memsw)]
    for path, value in order:
        try:
            f.io.write(path, str(value))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                usage = f.read_int(path.replace("limit_in_bytes", "usage_in_bytes"))
                err = CgroupError(
                    f"cannot lower {path} to {value} bytes: the container uses {usage} bytes "
                    "and the kernel could not reclaim enough (cgroup v1 refuses a limit below "
                    "unreclaimable usage instead of OOM-killing); free memory in the kernel "
                    "(or restart it), then lower the limit"
                )
                err.errno = exc.errno
                raise err from exc
            raise cgroup_error(exc, f"writing {value} to", path) from exc


def _v1_cpu(f: Files, d: str, limits: CgroupLimits) -> None:
    """The CFS quota and period, and cpu.shares, of ``d``."""
    quota_file = os.path.join(d, "cpu.cfs_quota_us")
    period_file = os.path.join(d, "cpu.cfs_period_us")
    if f.exists(quota_file):
        if f.read_int(period_file) != limits.cpu_period_us:
            # Lift the quota first so the period change cannot break the parent's ratio check.
            f.write(quota_file, "-1")
            f.write(period_file, str(limits.cpu_period_us))
        f.write(quota_file, "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us))
    elif limits.cpu_quota_us is not None:
        raise CgroupError(
            f"{quota_file} does not exist: the kernel lacks CFS bandwidth control "
            "(CONFIG_CFS_BANDWIDTH); drop the CPU quota or use a kernel that has it"
        )
    shares = _DEFAULT_SHARES if limits.cpu_weight is None else weight_to_shares(limits.cpu_weight)
    f.write(os.path.join(d, "cpu.shares"), str(shares))


def write_v1_limits(f: Files, controller: str, d: str, limits: CgroupLimits) -> None:
    """Write the part of ``limits`` that hierarchy ``controller`` holds into cgroup ``d``.
    Called by ``V1Handle.set_limits`` and for a delegation's caps."""
    if controller == "memory":
        _v1_memory(f, d, limits)
    elif controller == "cpu":
        _v1_cpu(f, d, limits)
    elif controller == "pids":
        f.write(os.path.join(d, "pids.max"), "max" if limits.pids is None else str(limits.pids))


def read_v1_limits(f: Files, dirs: list[tuple[str, str]]) -> CgroupLimits:
    """The caps held by the cgroups ``dirs`` ((controller, directory) pairs), as written by
    ``write_v1_limits``; for ``delegate --list``."""
    by = dict(dirs)
    memory = quota = pids = None
    period = 100_000
    if "memory" in by:
        value = f.read_int(os.path.join(by["memory"], "memory.limit_in_bytes"))
        memory = None if value is None or value >= _UNLIMITED else value
    if "cpu" in by:
        q = f.read_int(os.path.join(by["cpu"], "cpu.cfs_quota_us"))
        quota = None if q is None or q < 0 else q
        period = f.read_int(os.path.join(by["cpu"], "cpu.cfs_period_us")) or period
    if "pids" in by:
        pids = f.read_int(os.path.join(by["pids"], "pids.max"))
    return CgroupLimits(memory=memory, cpu_quota_us=quota, cpu_period_us=period, pids=pids)
