"""The ``sandbox-kernel`` command line.

Layer: cli, the top (may import everything below; in the package only ``__main__``
imports it; the ``sandbox-kernel`` console script calls ``main``). Each verb lives in its own
module exposing ``register(subparsers)``; the module's handler is stored as the parser's
``func`` default, called by ``main`` with the parsed arguments, and returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import SandboxError

# Verb modules, in the order they appear in --help.
VERB_MODULES = (
    "run",
    "gc",
    "image",
    "kernelspec",
    "delegate",
    "quota",
    "policy",
    "doctor",
    "ps",
    "stats",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb module's ``register`` applied (a verb module
    missing from this build is skipped). Called by ``main`` on each invocation."""
    parser = argparse.ArgumentParser(
        prog="sandbox-kernel",
        description="Run Jupyter kernels (and any command) in lightweight Linux containers.",
    )
    parser.add_argument("--debug", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # verb not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sandbox-kernel`` (console script) and ``python -m sandbox_kernel``:
    parse, run the verb's handler, and turn a SandboxError into one line and exit 125."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="sandbox-kernel: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except SandboxError as exc:
        print(f"sandbox-kernel: error: {exc}", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
