"""The command line imports what its verb needs and nothing more: ``sandbox-kernel run``
loads neither the other verbs nor pyroute2 nor any Jupyter package (its start-up is most of
a short command's time), while ``--help`` still lists every verb."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sandbox_kernel.cli import VERB_MODULES, _verb_of

PROBE = """
import contextlib, io, json, sys
from sandbox_kernel.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps({"help": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _probe(*argv: str) -> tuple[str, set[str]]:
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.splitlines()[-1])
    return data["help"], set(data["modules"])


@pytest.mark.parametrize(
    ("argv", "verb"),
    [
        (["run", "host", "--", "/bin/true"], "run"),
        (["--debug", "ps"], "ps"),
        (["--help"], None),
        ([], None),
        (["rnu"], None),
        (["--debug"], None),
    ],
)
def test_the_verb_is_found_before_parsing(argv: list[str], verb: str | None) -> None:
    assert _verb_of(argv) == verb


def test_run_imports_only_what_it_needs() -> None:
    text, modules = _probe("run", "--help")
    assert "--memory" in text
    others = {f"sandbox_kernel.cli.{name}" for name in VERB_MODULES if name != "run"}
    assert not modules & others, sorted(modules & others)
    heavy = {m.split(".")[0] for m in modules} & {
        "pyroute2",
        "jupyter_client",
        "zmq",
        "traitlets",
        "asyncio",
    }
    assert not heavy, heavy


def test_help_lists_every_verb() -> None:
    text, modules = _probe("--help")
    for name in VERB_MODULES:
        assert name in text, name
        assert f"sandbox_kernel.cli.{name}" in modules
