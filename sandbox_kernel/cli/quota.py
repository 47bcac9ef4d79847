"""``sandbox-kernel quota``: the disk quota of a notebook folder (a project quota of the
host's filesystem; ``sandbox_kernel.quota``).

* ``quota show FOLDER``: the folder's project id, limits and use (any user; root sees the
  filesystem's records, others what ``statvfs`` reports);
* ``quota set FOLDER SIZE [--files N]`` (root): put the folder and everything below it under
  the quota, which a kernel working there cannot lift. On a hub whose servers run as the
  students, root runs it for each student's home (for instance in the spawner's
  ``pre_spawn_hook``), and ``SandboxPolicy.notebook_quota`` makes the student's server
  refuse kernels in a folder without one;
* ``quota clear FOLDER`` (root): lift the limits (the folder keeps its project id).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import quota
from ..errors import PrivilegeError, SpecError
from ..limits import DISK_QUOTA


def register(sub: Any) -> None:
    """Add the ``quota`` verb to the CLI (called by ``cli.build_parser``)."""
    p = sub.add_parser(
        "quota",
        help="show or (root) set the disk quota of a notebook folder (a project quota)",
        description="A project quota of the host's filesystem (XFS mounted with prjquota, "
        "ext4 with the project and quota features) on a notebook folder and everything below "
        "it: a kernel working there gets 'Disk quota exceeded' at the limit and cannot lift it.",
    )
    p.add_argument("action", choices=("show", "set", "clear"))
    p.add_argument("folder", metavar="FOLDER", help="the notebook folder")
    p.add_argument("size", nargs="?", metavar="SIZE", help="(set) the limit, e.g. 2G")
    p.add_argument(
        "--files",
        type=int,
        default=None,
        help="(set) most files and folders too (0: none; left as it is when not given)",
    )
    p.set_defaults(func=quota_command)


def quota_command(args: argparse.Namespace) -> int:
    """Run ``quota``; returns the exit status. Called by ``cli.main``."""
    folder = os.path.realpath(args.folder)
    if args.action == "show":
        print(quota.read(folder).describe())
        return 0
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"sandbox-kernel quota {args.action} changes the host's quota records: run it as root"
        )
    if args.action == "clear":
        print(quota.clear(folder).describe())
        return 0
    if not args.size:
        raise SpecError("quota set needs a SIZE, e.g. sandbox-kernel quota set FOLDER 2G")
    if args.files is not None and args.files < 0:
        raise SpecError(f"--files {args.files}: use a number of files, or 0 (no file limit)")
    limit = int(DISK_QUOTA.parse(args.size, "SIZE"))
    print(quota.apply(folder, limit, args.files, foreign=True, source="SIZE").describe())
    return 0
