"""The cgroup manager interface: one per host, two implementations (v1, v2).

Layer: cgroups (OS side; imports nothing of the package). The runtime's ``Container``, gc,
``ps``, ``stats`` and ``doctor`` use only this interface; ``get_manager`` picks the driver.
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
    """How the host's cgroups are set up, as ``detect`` finds it; picks the driver
    (``get_manager``) and is shown by ``doctor``."""

    UNIFIED = "unified"  # pure v2 at /sys/fs/cgroup
    HYBRID = "hybrid"  # v1 controllers + a v2 mount without the controllers we need
    LEGACY = "legacy"  # v1 only


@dataclass(frozen=True)
class CgroupLimits:
    """Limits to apply. ``None`` = leave unlimited (``max``).

    Made from a container's ``Limits`` by ``runtime.container.cgroup_limits``; passed to
    ``CgroupManager.create`` and ``CgroupHandle.set_limits``.

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
    """One reading of a container's cgroup figures (``CgroupHandle.stats``), for the exit
    reason, ``ps``, ``stats`` and the live-change memory warning."""

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
    """One container's cgroup(s), made by ``CgroupManager.create`` or ``open``; owned by a
    ``Container`` (its lifetime) or used briefly by gc, ``ps`` and ``stats``."""

    name: str  # e.g. "sk-0123456789ab"

    @property
    @abc.abstractmethod
    def join_paths(self) -> list[str]:
        """Directories whose cgroup.procs a process writes to join this container.

        v1: one per hierarchy. ``Container.start`` hands them to the executor (the plan's
        ``cgroup`` records), whose init joins them before unsharing.
        """

    def view_mounts(self) -> tuple[tuple[str, str], ...]:
        """What a container's read-only cgroup view mounts (the plan's /sys/fs/cgroup): v1,
        one (directory name under /sys/fs/cgroup, controller list) per joined hierarchy;
        v2, nothing (the cgroup2 filesystem is mounted whole, seen through the cgroup
        namespace). Called by ``Container.start`` for the plan's ``HostContext``."""
        return ()

    @abc.abstractmethod
    def set_limits(self, limits: CgroupLimits) -> None:
        """Apply (or change, on a running container) all limits.

        Called by the manager's ``create`` and by ``Container.update`` and
        ``apply_deferred_cpu``. Lowering memory below usage is allowed (v2 reclaims, then
        OOM-kills; v1 raises a CgroupError when the kernel cannot reclaim enough).
        """

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Current figures; ContainerNotFound when the cgroup is gone. Called by
        ``Container.stats`` and at exit, and by ``ps`` and ``stats`` through ``open``."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Host pids of every process in the cgroup(s) (and their sub-cgroups); the kill loop
        and ``remove`` use it."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in it; waits until empty (bounded).

        Called by ``Container.kill``, by gc for a leftover, and by ``remove`` when members are
        left. v2: cgroup.kill where present, else freeze + kill loop; v1: kill loop.
        """

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove the directories; idempotent ("already gone" is fine). Kills first if not empty.

        Called by ``Container.destroy``, by gc, and by the v2 ``create`` when its limits fail.
        """


class CgroupManager(abc.ABC):
    """Creates and finds container cgroups under one parent; one per host and parent, from
    ``get_manager`` (cached)."""

    mode: CgroupMode
    version: int  # 1 or 2 (0: no cgroups, ``none.NullManager``)
    #: Do the caps reach the kernel? False only for ``none.NullManager``.
    enforced: bool = True

    @property
    def parent_dir(self) -> str | None:
        """v2: the one parent directory of its containers' cgroups, which each run dir
        records (root's ``ps`` and ``gc`` find another user's cgroups there); None where
        the parent is not one directory (v1: one per hierarchy) or there is none."""
        return None

    @abc.abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> CgroupHandle:
        """Create the container's cgroup(s) under the parent and apply limits. Called by
        ``Container.create`` once per container."""

    @abc.abstractmethod
    def open(self, name: str) -> CgroupHandle:
        """Handle for an existing container cgroup; ContainerNotFound if there is none.
        Called by gc (per leftover) and by ``ps`` and ``stats`` (per running container)."""

    @abc.abstractmethod
    def list_leftovers(self, prefix: str = "sk-") -> list[str]:
        """Names of container cgroups under our parent(s) whose names start with prefix.
        Called by ``leftovers.collect_leftovers`` (gc, and each ``Container.create``)."""

    @abc.abstractmethod
    def controllers(self) -> dict[str, bool]:
        """{'memory': bool, 'cpu': bool, 'pids': bool}: which controllers are usable here.
        Called by ``sandbox-kernel doctor``."""
