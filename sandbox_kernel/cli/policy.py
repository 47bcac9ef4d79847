"""``sandbox-kernel policy [USER]``: check the host's policy file and show what a user gets.

Any user may run it (the file is world-readable): without USER, the caller. It prints the
per-kernel ceilings, the allowed images, the most kernels at once and the aggregate caps of
that user, with the sections that gave them, and the host's reserve. An invalid or
untrusted file is an error naming it (exit 125), as at every kernel start.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
from typing import Any

from .. import policy as host_policy
from ..limits import BOUNDS
from ..units import format_cpus, format_size


def register(sub: Any) -> None:
    """Add the ``policy`` verb (called by ``cli.build_parser``)."""
    p = sub.add_parser(
        "policy",
        help="check the host's policy file and show what USER's kernels may have",
        description=f"Read {host_policy.DEFAULT_PATH} (or ${host_policy.ENV}) as every "
        "kernel start does and print the limits that apply to USER (default: you).",
    )
    p.add_argument("user", nargs="?", metavar="USER", help="a user name or uid")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=policy_command)


def _uid(user: str | None) -> tuple[int, str]:
    from ..jupyter.delegating import user_uid

    uid = os.geteuid() if user is None else user_uid(user)
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, str(uid)


def describe(host: host_policy.HostPolicy | None, uid: int) -> dict[str, Any]:
    """The policy of ``uid`` as plain data (what the command prints)."""
    if host is None:
        return {"file": None, "path": host_policy.policy_path() or f"{host_policy.ENV}=none"}
    mine = host.for_user(uid)
    ceilings = {n: mine.ceilings.of(n) for n in host_policy.CEILING_KEYS.values()}
    return {
        "file": host.path,
        "sections": mine.where,
        "per_kernel": ceilings,
        "allowed_images": list(mine.images),
        "max_kernels": mine.max_kernels,
        "user": {"memory": mine.user_memory, "cpus": mine.user_cpus, "pids": mine.user_pids},
        "reserve": {"memory": host.reserve_memory, "cpus": host.reserve_cpus},
    }


def _text(name: str, value: Any) -> str:
    if value is None:
        return "no limit"
    if name == "cpus":
        return format_cpus(value)
    if name == "pids":
        return str(int(value))
    return str(BOUNDS[name].fmt(value)) if name in BOUNDS else str(value)


def policy_command(args: argparse.Namespace) -> int:
    """Run ``policy``; returns the exit status. Called by ``cli.main``."""
    uid, name = _uid(args.user)
    data = describe(host_policy.load(), uid)
    if args.json:
        print(json.dumps({"uid": uid, "user": name, **data}, indent=2))
        return 0
    if data["file"] is None:
        print(
            f"no policy file at {data['path']}: kernels get their kernelspec's caps and a "
            "notebook can never raise them; see docs/configuration.md to write one"
        )
        return 0
    print(f"{data['file']}: valid; for {name} (uid {uid}) from {data['sections']}:")
    per = ", ".join(f"{n} {_text(n, v)}" for n, v in data["per_kernel"].items())
    print(f"  per kernel at most: {per}")
    print(f"  images: {', '.join(data['allowed_images']) or 'every image of the store'}")
    print(f"  kernels at once: {data['max_kernels'] or 'no limit'}")
    agg = ", ".join(f"{n} {_text(n, v)}" for n, v in data["user"].items())
    print(f"  all of {name}'s kernels together: {agg} (written by root: sandbox-kernel delegate)")
    res = data["reserve"]
    memory = format_size(res["memory"]) if res["memory"] else "none"
    cpus = format_cpus(res["cpus"]) if res["cpus"] else "none"
    print(f"  kept for the hub and servers: memory {memory}, cpus {cpus}")
    return 0
