"""No cgroups at all: a rootless container on a host that delegated none to its user.

Layer: cgroups. ``Container.create`` uses it only when the container asks for no cap, or
when the administrator explicitly allowed unenforced limits
(``SandboxPolicy.allow_unenforced_limits``); then ``enforced`` is False and ``ps`` and
``%sandbox`` say "limits not enforced". The container's processes still die with it: the
executor's init is PID 1 of their pid namespace.
"""

from __future__ import annotations

from .base import CgroupHandle, CgroupLimits, CgroupManager, CgroupMode, CgroupStats


class NullHandle(CgroupHandle):
    """A container's cgroup when there is none: joins nothing, enforces nothing, counts
    nothing (the limits asked for are remembered, for reports)."""

    def __init__(self, name: str, limits: CgroupLimits) -> None:
        self.name = name
        self.limits = limits

    @property
    def join_paths(self) -> list[str]:
        """None: the container joins no cgroup."""
        return []

    def set_limits(self, limits: CgroupLimits) -> None:
        """Remember ``limits`` (nothing enforces them)."""
        self.limits = limits

    def stats(self) -> CgroupStats:
        """All zeros: nothing is counted."""
        return CgroupStats(
            memory_current=0,
            memory_peak=0,
            memory_limit=None,
            cpu_usage_us=0,
            cpu_quota_us=None,
            cpu_period_us=self.limits.cpu_period_us,
            pids_current=0,
            pids_limit=None,
            oom_kills=0,
            pids_limit_hits=0,
        )

    def pids(self) -> list[int]:
        """None known (no cgroup lists them)."""
        return []

    def kill(self) -> None:
        """Nothing to do: the executor's init takes its pid namespace down with it."""

    def remove(self) -> None:
        """Nothing to remove."""


class NullManager(CgroupManager):
    """The manager of ``NullHandle`` s; ``reason`` says why there are no cgroups."""

    mode = CgroupMode.UNIFIED
    version = 0
    enforced = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def create(self, name: str, limits: CgroupLimits) -> NullHandle:
        """A handle that enforces nothing."""
        return NullHandle(name, limits)

    def open(self, name: str) -> NullHandle:
        """A handle that enforces nothing."""
        return NullHandle(name, CgroupLimits())

    def list_leftovers(self, prefix: str = "sk-") -> list[str]:
        """None: no cgroup is ever made."""
        return []

    def controllers(self) -> dict[str, bool]:
        """No controller is usable."""
        return {"memory": False, "cpu": False, "pids": False}
