"""The grading step's own rules, without a kernel: the output it keeps is bounded per cell and
per notebook, an error is kept shortened, and a notebook on a kernel outside the sandbox is
refused before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from sandbox_kernel import grading


def stream(text: str, msg_id: str = "m1") -> dict[str, Any]:
    return {
        "msg_type": "stream",
        "header": {"msg_type": "stream"},
        "parent_header": {"msg_id": msg_id},
        "content": {"name": "stdout", "text": text},
    }


def executor(nb: Any = None, **traits: Any) -> Any:
    ex = grading.SandboxExecute(**traits)
    ex.nb = nb if nb is not None else nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    ex.reset_execution_trackers()  # what preprocess does first
    ex.clear_before_next_output = False  # what each cell execution does first
    return ex


def test_output_is_bounded_per_cell_and_says_so() -> None:
    ex = executor(max_cell_output="10K", max_notebook_output="25K")
    outs: list[Any] = []
    for _ in range(5):
        ex.output(outs, stream("x" * 4096), None, 0)
    kept = [o for o in outs if o.get("name") == "stdout"]
    notes = [o for o in outs if o.get("name") == "stderr"]
    assert sum(len(o.text) for o in kept) == 2 * 4096
    assert len(notes) == 1 and "output past 10 KiB per cell was not kept" in notes[0].text
    # the next cells each get their own budget until the notebook's is spent
    for cell in (1, 2, 3):
        ex.output(outs := [], stream("y" * 8192), None, cell)
        assert bool([o for o in outs if o.get("name") == "stdout"]) == (cell < 3)
    assert "25 KiB per notebook" in outs[-1].text


def test_an_error_is_kept_but_shortened() -> None:
    ex = executor(max_cell_output="1K")
    outs: list[Any] = []
    ex.output(outs, stream("x" * 2048), None, 0)  # the budget is spent
    error = {
        "msg_type": "error",
        "header": {"msg_type": "error"},
        "parent_header": {"msg_id": "m1"},
        "content": {"ename": "ValueError", "evalue": "v" * 10**6, "traceback": ["t"] * 10**4},
    }
    ex.output(outs, error, None, 0)
    (err,) = [o for o in outs if o.output_type == "error"]
    assert err.ename == "ValueError"
    assert len(err.evalue) < grading.ERROR_LINE_CHARS + 100
    assert len(err.traceback) == 2 * grading.ERROR_LINES + 1


def test_a_notebook_on_a_plain_kernel_is_refused(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3"}
    ex = executor(nb)
    with pytest.raises(grading.UnsandboxedKernel, match="'python3', which is not a sandbox"):
        ex.create_kernel_manager()


def test_configure_swaps_only_the_execute_step() -> None:
    from nbgrader.converters.autograde import Autograde
    from nbgrader.preprocessors import Execute
    from traitlets.config import Config

    c = Config()
    grading.configure(c)
    steps = c.Autograde.autograde_preprocessors
    default = Autograde.autograde_preprocessors.default()
    assert steps == [grading.SandboxExecute if p is Execute else p for p in default]
    assert Execute not in steps and len(steps) == len(default)
