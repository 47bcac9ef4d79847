"""Root's side of a user's delegation: which caps, from which policy, and the host's reserve.

Layer: Jupyter (it reads the server's ``SandboxPolicy`` traits). Called, as root, by
``sandbox-kernel delegate USER`` and by the JupyterHub hook (``sandbox_kernel.hub``) before
each user's server starts. The caps come, per field, from the command line, else the host's
policy file for that user (``sandbox_kernel.policy``: ``user_memory``, ``user_cpus``,
``user_pids``), else the server config's ``SandboxPolicy`` traits of the same names; the
host's ``[reserve]`` becomes the cap of all users' kernels together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .. import policy as host_policy
from ..cgroups import detect, reset_manager_cache
from ..cgroups.base import CgroupLimits
from ..cgroups.common import cpus_to_quota
from ..cgroups.delegation import delegate, user_entry
from ..errors import SpecError
from ..limits import CPUS, MEMORY, PIDS


@dataclass(frozen=True)
class Delegated:
    """What ``delegate_user`` did: the user's caps, the all-users cap (None: untouched),
    the user-owned kernels directories, where the caps came from, and the policy file's
    values for that user (None: no file), which the hub hook also applies."""

    user: str
    caps: CgroupLimits
    top: CgroupLimits | None
    dirs: tuple[str, ...]
    source: str
    policy: host_policy.UserPolicy | None = None


def user_uid(user: str) -> int:
    """The uid of ``user`` (a name, else a uid), SpecError when there is no such user."""
    return user_entry(user).pw_uid


def caps_for(
    mine: host_policy.UserPolicy | None,
    *,
    memory: str | None = None,
    cpus: str | None = None,
    pids: str | None = None,
) -> tuple[CgroupLimits, str]:
    """A user's aggregate caps and a phrase naming their source: command-line values
    (``--memory`` ...) win, and any of them given, the others stay unset; else the policy
    file's for that user (``mine``), else the server config's ``SandboxPolicy``."""
    if memory or cpus or pids:
        mem = MEMORY.parse(memory, "--memory") if memory else None
        cpu = CPUS.parse(cpus, "--cpus") if cpus else None
        pid = PIDS.parse(pids, "--pids") if pids else None
        return _limits(mem, cpu, pid), "the command line"
    from .settings import SandboxPolicy, server_config

    traits = SandboxPolicy(config=server_config())
    where = "SandboxPolicy.{} (jupyter_server_config)"
    mem = (
        MEMORY.parse(traits.user_memory, where.format("user_memory"))
        if traits.user_memory
        else None
    )
    cpu = CPUS.parse(traits.user_cpus, where.format("user_cpus")) if traits.user_cpus else None
    pid = PIDS.parse(traits.user_pids, where.format("user_pids")) if traits.user_pids else None
    source = "SandboxPolicy (jupyter_server_config)" if (mem or cpu or pid) else "no policy"
    if mine is not None:
        if mine.user_memory or mine.user_cpus or mine.user_pids:
            source = mine.where
        mem = mine.user_memory or mem
        cpu = mine.user_cpus or cpu
        pid = mine.user_pids or pid
    return _limits(mem, cpu, pid), source


def _limits(memory: int | None, cpus: float | None, pids: int | None) -> CgroupLimits:
    return CgroupLimits(
        memory=memory,
        memory_swap=0 if memory is not None else None,
        cpu_quota_us=cpus_to_quota(cpus) if cpus is not None else None,
        pids=pids,
    )


def reserve_caps(host: host_policy.HostPolicy | None) -> CgroupLimits | None:
    """The cap of every user's kernels together: the host's memory and CPUs less the
    policy file's ``[reserve]`` (None without a policy file or a reserve: the all-users
    cgroup keeps what it has). SpecError when the reserve leaves nothing."""
    if host is None or (host.reserve_memory is None and host.reserve_cpus is None):
        return None
    memory = cpus = None
    if host.reserve_memory is not None:
        total = _mem_total()
        if host.reserve_memory >= total - MEMORY.minimum:
            raise SpecError(
                f"[reserve] memory leaves nothing for kernels on this host "
                f"({MEMORY.fmt(total)} in all); reserve less",
                context=f"the policy file {host.path}",
            )
        memory = total - host.reserve_memory
    if host.reserve_cpus is not None:
        count = float(len(os.sched_getaffinity(0)) or 1)
        if host.reserve_cpus >= count - CPUS.minimum:
            raise SpecError(
                f"[reserve] cpus leaves nothing for kernels on this host ({count:g} CPUs); "
                "reserve less",
                context=f"the policy file {host.path}",
            )
        cpus = count - host.reserve_cpus
    return _limits(memory, cpus, None)


def _mem_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise SpecError("/proc/meminfo has no MemTotal line")  # pragma: no cover


def delegate_user(
    user: str, *, memory: str | None = None, cpus: str | None = None, pids: str | None = None
) -> Delegated:
    """Root: make or update ``user``'s delegation with the caps of ``caps_for`` and the
    all-users cap of ``reserve_caps`` (the policy file is read once, here). Idempotent."""
    host = host_policy.load()
    mine = host.for_user(user_uid(user)) if host is not None else None
    caps, source = caps_for(mine, memory=memory, cpus=cpus, pids=pids)
    top = reserve_caps(host)
    if top is not None and top.cpu_quota_us is not None:
        # one user never gets more than all users together (cgroup v1 refuses it outright)
        quota = caps.cpu_quota_us
        if quota is None or quota > top.cpu_quota_us:
            caps = replace(caps, cpu_quota_us=top.cpu_quota_us)
    made = delegate(user, caps, detect(), top=top)
    reset_manager_cache()
    return Delegated(user, caps, top, tuple(made), source, mine)
