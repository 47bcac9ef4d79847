"""``sandbox-kernel delegate``: the admin's one-time verb that lets a user's server cap its
kernels, on hosts without systemd's cgroup delegation.

As root: ``delegate USER [--memory SIZE] [--cpus N] [--pids N]`` makes (or updates) the
user's delegation with those aggregate caps (no caps given: the host policy file's for that
user, else the server's ``SandboxPolicy`` ``user_memory``, ``user_cpus`` and ``user_pids``,
or none; ``jupyter.delegating``), and the cap of all users' kernels together from the
policy file's ``[reserve]``;
``--remove USER`` undoes it; ``--list`` prints one line per delegated user with its caps.
cgroups vanish at reboot: run it from a boot-time unit, or from JupyterHub's
``pre_spawn_hook`` for each user.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..cgroups import detect
from ..cgroups.base import CgroupLimits
from ..cgroups.delegation import delegations, undelegate
from ..errors import PrivilegeError, SpecError
from ..jupyter.delegating import delegate_user
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
    done = delegate_user(args.user, memory=args.memory, cpus=args.cpus, pids=args.pids)
    print(f"delegated to {args.user}: {_caps_text(done.caps)} (from {done.source})")
    if done.top is not None:
        print(f"  all users' kernels together: {_caps_text(done.top)} (the host less its reserve)")
    for path in done.dirs:
        print(f"  {path}")
    return 0
