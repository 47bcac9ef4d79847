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


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` names, when it is one of ``VERB_MODULES`` (the first word that is
    not the global ``--debug``); None otherwise (no verb, ``--help``, a typo)."""
    for word in argv:
        if word == "--debug":
            continue
        return word if word in VERB_MODULES else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with the verb modules' ``register`` applied: every one, or only
    ``only`` (a verb module missing from this build is skipped). Called by ``main`` on each
    invocation with the verb of the command line, so that a verb imports what it needs and
    nothing of the others (``--help`` and a mistyped verb get them all)."""
    parser = argparse.ArgumentParser(
        prog="sandbox-kernel",
        description="Run Jupyter kernels (and any command) in lightweight Linux containers.",
    )
    parser.add_argument("--debug", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES if only is None else (only,):
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
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_verb_of(words))
    args = parser.parse_args(words)
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
