"""``sandbox-kernel delegate``: the admin's one-time verb that lets a user's server cap its
kernels, on hosts without systemd's cgroup delegation.

As root: ``delegate USER [--memory SIZE] [--cpus N] [--pids N]`` makes (or updates) the
user's delegation with those aggregate caps (no caps given: the per-user caps of the
server's ``SandboxPolicy``, ``user_memory``, ``user_cpus`` and ``user_pids``, or none);
``--remove USER`` undoes it; ``--list`` prints one line per delegated user with its caps.
cgroups vanish at reboot: run it from a boot-time unit, or from JupyterHub's
``pre_spawn_hook`` for each user.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..cgroups import detect, reset_manager_cache
from ..cgroups.base import CgroupLimits
from ..cgroups.common import cpus_to_quota
from ..cgroups.delegation import delegate, delegations, undelegate
from ..errors import PrivilegeError, SpecError
from ..limits import CPUS, MEMORY, PIDS
from ..units import format_cpus, format_size


def register(sub: Any) -> None:
    """Add the ``delegate`` verb to the CLI (called by ``cli.build_parser``)."""
    p = sub.add_parser(
        "delegate",
        help="(root) let USER's Jupyter server cap its kernels: a delegated cgroup with "
        "the user's aggregate caps",
        description="Make a cgroup subtree for USER, capped as a whole, in which the user's "
        "server (running as USER) creates its kernels' cgroups; the user can never raise "
        "the caps. Idempotent: run it again with other caps to update them.",
    )
    p.add_argument("user", nargs="?", metavar="USER", help="a user name or uid")
    p.add_argument("--memory", help="aggregate memory cap of the user's kernels, e.g. 8G")
    p.add_argument("--cpus", help="aggregate CPU cap, in CPUs, e.g. 4")
    p.add_argument("--pids", help="aggregate process cap, e.g. 2048")
    p.add_argument("--remove", action="store_true", help="remove USER's delegation")
    p.add_argument("--list", action="store_true", help="list the delegated users and caps")
    p.set_defaults(func=delegate_command)


def _caps(args: argparse.Namespace) -> CgroupLimits:
    """The caps of the command line; none given: the per-user caps of the server's
    ``SandboxPolicy`` (``user_memory``, ``user_cpus``, ``user_pids``), or none."""
    if args.memory or args.cpus or args.pids:
        memory = MEMORY.parse(args.memory, "--memory") if args.memory else None
        cpus = CPUS.parse(args.cpus, "--cpus") if args.cpus else None
        pids = PIDS.parse(args.pids, "--pids") if args.pids else None
    else:
        from ..jupyter.settings import SandboxPolicy, server_config

        policy = SandboxPolicy(config=server_config())
        where = "SandboxPolicy.{} (jupyter_server_config)"
        memory = (
            MEMORY.parse(policy.user_memory, where.format("user_memory"))
            if policy.user_memory
            else None
        )
        cpus = CPUS.parse(policy.user_cpus, where.format("user_cpus")) if policy.user_cpus else None
        pids = PIDS.parse(policy.user_pids, where.format("user_pids")) if policy.user_pids else None
    return CgroupLimits(
        memory=memory,
        memory_swap=0 if memory is not None else None,
        cpu_quota_us=cpus_to_quota(cpus) if cpus is not None else None,
        pids=pids,
    )


def _caps_text(caps: CgroupLimits) -> str:
    cpus = None if caps.cpu_quota_us is None else caps.cpu_quota_us / caps.cpu_period_us
    return (
        f"memory {format_size(caps.memory)}, cpus {format_cpus(cpus)}, "
        f"pids {caps.pids if caps.pids is not None else 'unlimited'}"
    )


def delegate_command(args: argparse.Namespace) -> int:
    """Run ``delegate``; returns the exit status. Called by ``cli.main``."""
    layout = detect()
    if args.list:
        for d in delegations(layout):
            print(f"{d.user} (uid {d.uid}): {_caps_text(d.caps)}")
        return 0
    if not args.user:
        raise SpecError("give a USER, or --list")
    if os.geteuid() != 0:
        raise PrivilegeError("delegate changes cgroups of other users: run it as root")
    if args.remove:
        n = undelegate(args.user, layout)
        print(f"removed the delegation of {args.user} ({n} cgroup(s))")
        return 0
    caps = _caps(args)
    made = delegate(args.user, caps, layout)
    reset_manager_cache()
    print(f"delegated to {args.user}: {_caps_text(caps)}")
    for path in made:
        print(f"  {path}")
    return 0
