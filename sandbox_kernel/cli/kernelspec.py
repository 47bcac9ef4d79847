"""``sandbox-kernel kernelspec install|add|ls``: the Jupyter kernelspecs of the sandbox kernels.

Layer: cli, on ``jupyter.kernelspecs`` and, for ``add``, the image probe and the ipykernel
layer (``images.probe``, ``images.ipykernel_layer``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..jupyter import kernelspecs


def _destinations(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this Python's prefix ({sys.prefix})",
    )
    where.add_argument("--prefix", metavar="P", help="install into P/share/jupyter/kernels")
    p.add_argument("--memory", help="memory cap written into the kernelspec, e.g. 2G")
    p.add_argument("--cpus", help="CPU cap, e.g. 0.5 or 2")
    p.add_argument("--pids", help="process cap, e.g. 256")


def register(sub: Any) -> None:
    """Add the ``kernelspec`` verb and its ``install``, ``add`` and ``ls`` actions (called by
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
    _destinations(inst)
    inst.add_argument("--image", help="image of the store to run (only with one NAME)")
    inst.set_defaults(func=install_command)
    add = verbs.add_parser(
        "add",
        help="write a kernelspec for any Python image of the store (ipykernel supplied "
        "when it has none)",
    )
    add.add_argument("name", metavar="NAME", help="the new kernelspec's name, e.g. course-py2")
    add.add_argument("--image", required=True, help="the image, e.g. python:2.7-slim")
    add.add_argument("--display-name", help="name shown in Jupyter (default: from the image)")
    add.add_argument(
        "--python", help="which interpreter: a path or a version such as 3.12 (default: newest)"
    )
    _destinations(add)
    add.set_defaults(func=add_command)
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


def add_command(args: argparse.Namespace) -> int:
    """``kernelspec add NAME --image REF``: probe the image's Python, supply the ipykernel
    layer when it has no ipykernel, write the kernelspec, print what it found and where the
    kernelspec went. Failures are one line naming the image and the fix (SandboxError).
    Called by ``cli.main``."""
    from ..images import ipykernel_layer, lookup, probe
    from ..runtime.container import require_privileges

    overrides = {"memory": args.memory, "cpus": args.cpus, "pids": args.pids}
    # the name and caps are checked before anything is probed or built
    kernelspecs.render_image(args.name, args.image, "python", args.name, overrides=overrides)
    require_privileges()
    image = lookup.find(args.image)
    facts = probe.probe_image(image)
    interp = ipykernel_layer.choose(image.ref, facts.interpreters, args.python)
    layer = ""
    if not interp.ipykernel:
        layer = ipykernel_layer.ensure(interp, progress=print).ref
    display = args.display_name or f"Python {interp.major_minor} ({image.ref}, sandbox)"
    data = kernelspecs.render_image(
        args.name,
        image.ref,
        interp.executable,
        display,
        ipykernel_layer=layer,
        overrides=overrides,
    )
    prefix = sys.prefix if args.sys_prefix else args.prefix
    done = kernelspecs.add_image(args.name, data, user=args.user, prefix=prefix)
    kernel = f"ipykernel {interp.ipykernel}" if interp.ipykernel else f"ipykernel from {layer}"
    print(f"image {image.ref}: Python {interp.version} at {interp.executable}, {kernel}")
    if facts.user or facts.working_dir not in ("", "/"):
        print(
            f"note: the image's User ({facts.user or 'unset'}) and WorkingDir "
            f"({facts.working_dir or '/'}) are not used: kernels run as the notebook's owner "
            "in the notebook's folder; its Env is kept"
        )
    settings = ", ".join(f"{key}={value}" for key, value in done.config.items())
    print(f"installed {done.name} ({done.display_name}) in {done.resource_dir}  [{settings}]")
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
