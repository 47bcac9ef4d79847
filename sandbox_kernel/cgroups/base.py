"""The cgroup manager interface: one per host, two implementations (v1, v2).

A manager creates one cgroup per container (per controller on v1), nested under the
cgroup the calling process already sits in (read from /proc/self/cgroup), named from the
container id, so that crash leftovers can be found (``list_leftovers``) and removed.
It never moves or modifies cgroups it did not create.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class CgroupMode(str, enum.Enum):
    UNIFIED = "unified"  # pure v2 at /sys/fs/cgroup
    HYBRID = "hybrid"  # v1 controllers + a v2 mount without the controllers we need
    LEGACY = "legacy"  # v1 only


@dataclass(frozen=True)
class CgroupLimits:
    """Limits to apply. ``None`` = leave unlimited (``max``).

    memory: bytes. memory_swap: bytes of swap allowed on top of memory (0 = swap off).
    cpu_quota_us / cpu_period_us: CFS bandwidth (cpus=1.5 -> 150000/100000).
    cpu_weight: 1..10000 (v2 cpu.weight; v1 cpu.shares = weight*1024/100 clamped to 2..262144).
    pids: maximum tasks.
    """

    memory: int | None = None
    memory_swap: int | None = 0
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    cpu_weight: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class CgroupStats:
    memory_current: int  # bytes
    memory_peak: int  # bytes (v2 memory.peak where present; v1 max_usage_in_bytes; else tracked)
    memory_limit: int | None
    cpu_usage_us: int  # total CPU time of the cgroup, microseconds
    cpu_quota_us: int | None
    cpu_period_us: int
    pids_current: int
    pids_limit: int | None
    oom_kills: int  # processes killed by the OOM killer because of this cgroup's limit
    pids_limit_hits: int  # fork attempts refused by pids.max (v2 pids.events max; v1 pids.events)


class CgroupHandle(abc.ABC):
    """One container's cgroup(s)."""

    name: str  # e.g. "sk-0123456789ab"

    @property
    @abc.abstractmethod
    def join_paths(self) -> list[str]:
        """Directories whose cgroup.procs a process writes to join this container.

        v1: one per hierarchy.
        """

    def view_mounts(self) -> tuple[tuple[str, str], ...]:
        """What a container's read-only cgroup view mounts (the plan's /sys/fs/cgroup): v1,
        one (directory name under /sys/fs/cgroup, controller list) per joined hierarchy;
        v2, nothing (the cgroup2 filesystem is mounted whole, seen through the cgroup
        namespace)."""
        return ()

    @abc.abstractmethod
    def set_limits(self, limits: CgroupLimits) -> None:
        """Apply (or change, on a running container) all limits.

        Lowering memory below usage is allowed (v2 reclaims, then OOM-kills; v1 raises a
        CgroupError when the kernel cannot reclaim enough).
        """

    @abc.abstractmethod
    def stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Host pids of every process in the cgroup(s)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in it; waits until empty (bounded).

        v2: cgroup.kill where present, else freeze + kill loop; v1: kill loop.
        """

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove the directories; idempotent ("already gone" is fine). Kills first if not empty."""


class CgroupManager(abc.ABC):
    mode: CgroupMode
    version: int  # 1 or 2

    @abc.abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> CgroupHandle:
        """Create the container's cgroup(s) under the caller's cgroup and apply limits."""

    @abc.abstractmethod
    def open(self, name: str) -> CgroupHandle:
        """Handle for an existing container cgroup (e.g. from another process, or for gc)."""

    @abc.abstractmethod
    def list_leftovers(self, prefix: str = "sk-") -> list[str]:
        """Names of container cgroups under our parent(s) whose names start with prefix."""

    @abc.abstractmethod
    def controllers(self) -> dict[str, bool]:
        """{'memory': bool, 'cpu': bool, 'pids': bool}: which controllers are usable here."""
