"""Autograding with nbgrader on sandbox kernels.

Layer: grading (on top of the Jupyter layer; imports nbgrader, which only a grading host
needs: ``pip install 'sandbox-kernel[grading]'``). In the course's ``nbgrader_config.py``::

    import sandbox_kernel.grading
    sandbox_kernel.grading.configure(c)
    c.Execute.timeout = 30  # seconds per cell; past it the cell is interrupted

``nbgrader autograde`` then runs every submission with ``SandboxExecute`` instead of
nbgrader's ``Execute``, which

* refuses a notebook whose kernel is not a sandbox kernel (the kernel comes from the
  instructor's source notebook: nbgrader's OverwriteKernelspec): a student's code never runs
  as the grader;
* mounts the submission's folder read-only in the kernel (``notebook_folder='ro'``): what a
  submission writes (files, links planted for the grader to follow when it saves the graded
  notebook, files for other students) stays in the sandbox's /tmp and ends with it;
* bounds the output the grader keeps per cell and per notebook (``max_cell_output``,
  ``max_notebook_output``): an output flood costs the grader no more memory than that, and
  the cell says what was dropped; an error's traceback is kept, shortened;
* names why a kernel died (the memory cap, the process limit, a signal) in the grader's
  log and in the error nbgrader records for that submission, instead of "Kernel died".

The caps of each kernel are the kernelspec's, within the host's policy for the grader's
user (/etc/sandbox-kernel/policy.toml), as for any other sandbox kernel.
"""

from __future__ import annotations

import copy
from typing import Any

from nbclient.exceptions import DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.converters.autograde import Autograde
from nbgrader.preprocessors import Execute
from traitlets import Unicode
from traitlets.config import Config

from ..errors import SpecError
from ..jupyter.kernelspecs import PROVISIONER_NAME
from ..units import format_size, parse_size

__all__ = ["SandboxExecute", "UnsandboxedKernel", "configure"]

#: How much of an error output is kept whatever the output budget: traceback lines at each
#: end, and characters per line and of the message.
ERROR_LINES = 20
ERROR_LINE_CHARS = 2000


class UnsandboxedKernel(Exception):
    """A notebook to grade asks for a kernel that is not a sandbox kernel."""


def configure(c: Config) -> None:
    """Make ``nbgrader autograde`` run submissions with ``SandboxExecute``: called from a
    course's ``nbgrader_config.py`` with its ``c``. The other autograde steps stay
    nbgrader's own, in nbgrader's order."""
    default = Autograde.autograde_preprocessors.default()
    c.Autograde.autograde_preprocessors = [
        SandboxExecute if pp is Execute else pp for pp in default
    ]


def _text_size(value: Any, budget: int = 1 << 30) -> int:
    """Characters of the strings in an output message's content (its data, text, traceback),
    counted up to ``budget``."""
    total = 0
    stack = [value]
    while stack and total < budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _short(value: Any) -> str:
    text = str(value)
    if len(text) <= ERROR_LINE_CHARS:
        return text
    return text[:ERROR_LINE_CHARS] + f"... ({len(text) - ERROR_LINE_CHARS} more characters)"


def _bounded_error(out: NotebookNode) -> NotebookNode:
    """An error output with its message and traceback shortened to a fixed size."""
    out.evalue = _short(out.get("evalue", ""))
    lines = [_short(line) for line in out.get("traceback", [])]
    if len(lines) > 2 * ERROR_LINES:
        dropped = len(lines) - 2 * ERROR_LINES
        lines = [*lines[:ERROR_LINES], f"... ({dropped} traceback lines)", *lines[-ERROR_LINES:]]
    out.traceback = lines
    return out


class SandboxExecute(Execute):  # type: ignore[misc]
    """nbgrader's Execute for sandbox kernels (see the module docstring). nbgrader's
    Autograde calls it for each submitted notebook once ``configure`` put it in the
    autograde steps; its traits are set as ``c.SandboxExecute.NAME`` (and nbgrader's, such
    as ``timeout``, as ``c.Execute.NAME``)."""

    max_cell_output = Unicode(
        "1M",
        config=True,
        help="""Output one cell may leave in the graded notebook (its streams, displays and
        results; an error is always kept, shortened). Unit: bytes or K/M/G (binary). Past
        it the rest is dropped and the cell says so. Default: 1M.""",
    )
    max_notebook_output = Unicode(
        "16M",
        config=True,
        help="""Output one notebook may leave in the graded notebook, all cells together.
        Unit: bytes or K/M/G (binary). Default: 16M.""",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cell_out: dict[int, int] = {}
        self._total_out = 0
        self._dropped: set[int] = set()
        self._provisioner: Any = None
        self._where = "a notebook"
        # the budgets, parsed once: nbgrader makes one instance per notebook it converts
        self._limits = self._budgets()

    # ---- bounds ------------------------------------------------------------------------
    def _budgets(self) -> tuple[int, int]:
        try:
            return (
                parse_size(self.max_cell_output, "SandboxExecute.max_cell_output"),
                parse_size(self.max_notebook_output, "SandboxExecute.max_notebook_output"),
            )
        except SpecError as exc:
            raise ValueError(f"{exc} (nbgrader_config.py)") from None

    def output(
        self,
        outs: list[NotebookNode],
        msg: dict[str, Any],
        display_id: str | None,
        cell_index: int,
    ) -> NotebookNode | None:
        """Keep an output message while the cell's and the notebook's budgets last (called
        by nbclient for each output message of the kernel)."""
        content = msg.get("content", {})
        if msg.get("msg_type") == "error":
            out = super().output(outs, msg, display_id, cell_index)
            return _bounded_error(out) if out is not None else None
        per_cell, per_notebook = self._limits
        used = self._cell_out.get(cell_index, 0)
        size = _text_size(content, per_notebook + 1)
        if used + size > per_cell or self._total_out + size > per_notebook:
            if cell_index not in self._dropped:
                self._dropped.add(cell_index)
                which = (
                    f"{format_size(per_cell)} per cell"
                    if used + size > per_cell
                    else f"{format_size(per_notebook)} per notebook"
                )
                note = NotebookNode(  # type: ignore[no-untyped-call]
                    output_type="stream",
                    name="stderr",
                    text=f"[sandbox grading] output past {which} was not kept\n",
                )
                outs.append(note)
            return None
        self._cell_out[cell_index] = used + size
        self._total_out += size
        kept: NotebookNode | None = super().output(outs, msg, display_id, cell_index)
        return kept

    # ---- the kernel ----------------------------------------------------------------------
    def create_kernel_manager(self) -> Any:
        """The notebook's kernel manager, with the submission's folder read-only in the
        sandbox; refuses a kernel that is not a sandbox kernel. Called by nbclient before
        it starts the kernel."""
        name = self.kernel_name or self.nb.metadata.get("kernelspec", {}).get("name")
        config = copy.deepcopy(self.config)
        config.merge(Config({"SandboxProvisioner": {"notebook_folder": "ro"}}))
        kw = {"kernel_name": name} if name else {}
        km = self.kernel_manager_class(config=config, **kw)
        meta = km.kernel_spec.metadata if km.kernel_spec is not None else {}
        provisioner = (meta.get("kernel_provisioner") or {}).get("provisioner_name")
        if provisioner != PROVISIONER_NAME:
            raise UnsandboxedKernel(
                f"{self._where} asks for kernel {km.kernel_name!r}, which is not a sandbox "
                f"kernel (its provisioner is {provisioner or 'the default'}); a submission "
                "never runs outside a sandbox: set the source notebook's kernel to a sandbox "
                "kernel (sandbox-kernel kernelspec list) and run nbgrader generate_assignment"
            )
        self.km = km
        return km

    def preprocess_cell(self, cell: NotebookNode, resources: Any, index: int) -> Any:
        """Run one cell (nbconvert's); keeps the kernel's provisioner, which the kernel
        manager drops at shutdown, for the death reason."""
        if self._provisioner is None:
            self._provisioner = getattr(self.km, "provisioner", None)
        return super().preprocess_cell(cell, resources, index)

    def _death_reason(self) -> str:
        last = getattr(self._provisioner, "last_exit", None)
        if isinstance(last, dict) and last.get("reason"):
            return str(last["reason"])
        return "no reason recorded (the kernel process ended)"

    def preprocess(
        self, nb: NotebookNode, resources: Any = None, km: Any = None
    ) -> tuple[NotebookNode, Any]:
        """Execute one submitted notebook (nbgrader's Autograde calls it per notebook); a
        kernel that died is reported with its reason and the submission's names."""
        info = (resources or {}).get("nbgrader", {})
        self._where = (
            f"student {info.get('student', '?')}'s {info.get('assignment', '?')}/"
            f"{info.get('notebook', '?')}.ipynb"
        )
        self._cell_out, self._total_out, self._dropped = {}, 0, set()
        self._provisioner = None
        try:
            return super().preprocess(nb, resources, km)  # type: ignore[no-any-return]
        except DeadKernelError as exc:
            reason = self._death_reason()
            self.log.error("%s: the sandbox kernel died: %s", self._where, reason)
            raise DeadKernelError(f"{self._where}: the sandbox kernel died: {reason}") from exc
