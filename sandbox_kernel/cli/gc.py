"""``sandbox-kernel gc``: remove what crashed containers left behind.

Layer: cli. The work is ``runtime.leftovers.collect_leftovers``, then
``jupyter.exits.collect_orphans`` (kept death reasons of kernels whose container is gone).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..jupyter.exits import collect_orphans
from ..runtime.leftovers import collect_leftovers, collect_other_users
from .ps import safe_text


def register(sub: Any) -> None:
    """Add the ``gc`` verb to the CLI's subparsers (called by ``cli.build_parser``)."""
    p = sub.add_parser("gc", help="remove leftovers of crashed containers (cgroups, run dirs)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=gc_command)


def gc_command(args: argparse.Namespace) -> int:
    """``sandbox-kernel gc [--dry-run]``: collect and print what was (or would be) removed
    (the caller's own containers; as root, every user's); 1 when something could not be
    removed. Called by ``cli.main``."""
    report = collect_leftovers(dry_run=args.dry_run)
    if os.geteuid() == 0:  # root cleans every user's too
        other = collect_other_users(dry_run=args.dry_run)
        report.run_dirs += other.run_dirs
        report.cgroups += other.cgroups
        report.errors += other.errors
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(report.run_dirs)} run dir(s), {len(report.cgroups)} cgroup(s)")
    for name in report.run_dirs:
        print(f"  run dir {name}")
    for name in report.cgroups:
        print(f"  cgroup {name}")
    for name in report.host_layers:  # old versions and build leftovers (not in a dry run)
        print(f"  host image layer {name}")
    for name in report.network:  # nat leases, links and firewall rules (not in a dry run)
        print(f"  {name}")
    for kernel_id in collect_orphans(dry_run=args.dry_run):  # after the run dirs went
        print(f"  kept state of kernel {safe_text(kernel_id, 200)}")
    for err in report.errors:
        print(f"  error: {safe_text(err, 2000)}")
    return 1 if report.errors else 0
