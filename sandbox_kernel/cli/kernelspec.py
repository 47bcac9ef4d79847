"""``sandbox-kernel kernelspec install|ls``: the Jupyter kernelspecs of the sandbox kernels.

Layer: cli, on ``jupyter.kernelspecs``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..jupyter import kernelspecs


def register(sub: Any) -> None:
    """Add the ``kernelspec`` verb and its ``install`` and ``ls`` actions (called by
    ``cli.build_parser``)."""
    p = sub.add_parser("kernelspec", help="install or list the sandbox kernelspecs for Jupyter")
    verbs = p.add_subparsers(dest="kernelspec_verb", metavar="ACTION")
    inst = verbs.add_parser("install", help="install kernelspecs (default: all shipped ones)")
    inst.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="kernelspecs to install (python2.7-sandbox, python3-sandbox)",
    )
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this Python's prefix ({sys.prefix})",
    )
    where.add_argument("--prefix", metavar="P", help="install into P/share/jupyter/kernels")
    inst.add_argument("--memory", help="memory cap written into the kernelspec, e.g. 2G")
    inst.add_argument("--cpus", help="CPU cap, e.g. 0.5 or 2")
    inst.add_argument("--pids", help="process cap, e.g. 256")
    inst.add_argument("--image", help="image of the store to run (only with one NAME)")
    inst.set_defaults(func=install_command)
    ls = verbs.add_parser("ls", aliases=["list"], help="list the installed sandbox kernelspecs")
    ls.set_defaults(func=ls_command)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def install_command(args: argparse.Namespace) -> int:
    """``kernelspec install [NAME...]``: install with the given cap overrides and print where
    each went; warn when Jupyter would not find the provisioner. Called by ``cli.main``."""
    names = list(args.names) or kernelspecs.available()
    if args.image and len(names) != 1:
        print("sandbox-kernel: error: --image needs exactly one kernelspec NAME", file=sys.stderr)
        return 2
    prefix = sys.prefix if args.sys_prefix else args.prefix
    overrides = {"memory": args.memory, "cpus": args.cpus, "pids": args.pids, "image": args.image}
    done = kernelspecs.install(names, user=args.user, prefix=prefix, overrides=overrides)
    for k in done:
        settings = ", ".join(f"{key}={value}" for key, value in k.config.items())
        print(f"installed {k.name} ({k.display_name}) in {k.resource_dir}  [{settings}]")
    if not kernelspecs.provisioner_registered():
        print(
            "note: the sandbox-provisioner entry point is not installed in this Python; "
            "run `pip install .` (or `pip install -e .`) so that Jupyter can start these kernels",
            file=sys.stderr,
        )
    return 0


def ls_command(args: argparse.Namespace) -> int:
    """``kernelspec ls``: one line per installed sandbox kernelspec. Called by ``cli.main``."""
    found = kernelspecs.installed()
    if not found:
        print(
            "no sandbox kernelspec installed; run: sandbox-kernel kernelspec install --sys-prefix"
        )
        return 0
    width = max(len(k.name) for k in found)
    for k in found:
        settings = ", ".join(f"{key}={value}" for key, value in k.config.items())
        print(f"{k.name:<{width}}  {k.display_name:<24}  {settings:<48}  {k.resource_dir}")
    return 0
