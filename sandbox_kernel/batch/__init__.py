"""Batch runs on sandbox kernels: nbclient and papermill end with why the kernel died.

Layer: batch (on top of the Jupyter layer; imports nbclient, which a batch host has). When a
cap kills a kernel in the middle of a cell, plain nbclient ends with ``DeadKernelError:
Kernel died`` and nothing in the notebook says why. With ``SandboxNotebookClient`` (a
``nbclient.NotebookClient``, used the same way)::

    import nbformat
    from sandbox_kernel.batch import SandboxNotebookClient

    nb = nbformat.read("analysis.ipynb", as_version=4)
    SandboxNotebookClient(nb, kernel_name="python3-sandbox").execute()

the run ends with ``SandboxKernelDied`` (a ``DeadKernelError``) whose message names the
reason the provisioner recorded ("Kernel died: out of memory (limit 256 MiB, peak 256 MiB)
in cell 3 ..."), and the failing cell ends with the notice ``[sandbox-kernel] the kernel
died: <reason>`` (the one the output relay sends; written by the client when it did not
arrive). Papermill runs the same client with ``papermill --engine sandbox`` (``engine.py``,
the ``papermill.engine`` entry point). A kernel that is not a sandbox kernel ends as nbclient
ends it.
"""

from __future__ import annotations

import asyncio
from queue import Empty
from typing import Any

from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionComplete, DeadKernelError
from nbclient.util import ensure_async, run_sync
from nbformat.notebooknode import NotebookNode

__all__ = ["NOTICE", "SandboxKernelDied", "SandboxNotebookClient", "death_reason"]

#: What a cell whose kernel died ends with (the relay's notice, word for word).
NOTICE = "[sandbox-kernel] the kernel died: "
#: Output messages of the failing cell read after the death, at most (the relay's notice and
#: what the kernel sent just before it died), and how long to wait for the next one.
DRAIN_MESSAGES = 200
DRAIN_WAIT_S = 0.5
#: Polls of the kernel manager, ``REASON_POLL_S`` apart, for the provisioner to record the
#: death.
REASON_POLLS = 50
REASON_POLL_S = 0.1
NO_REASON = "no reason recorded (the kernel process ended)"


class SandboxKernelDied(DeadKernelError):
    """A sandbox kernel died while it ran a cell; ``reason`` is the provisioner's line
    (``last_exit["reason"]``), ``cell_index`` the cell's position in the notebook."""

    def __init__(self, reason: str, cell_index: int, kernelspec: str) -> None:
        super().__init__(
            f"Kernel died: {reason} (cell {cell_index} of the notebook, kernel {kernelspec!r})"
        )
        self.reason = reason
        self.cell_index = cell_index


def _sandbox_provisioner(km: Any) -> Any:
    """``km``'s provisioner when it is a sandbox provisioner, else None."""
    from ..jupyter.provisioner import SandboxProvisioner

    provisioner = getattr(km, "provisioner", None)
    return provisioner if isinstance(provisioner, SandboxProvisioner) else None


def death_reason(provisioner: Any) -> str | None:
    """The reason the sandbox ``provisioner`` recorded for its kernel's last exit, or None
    before it recorded one."""
    last = getattr(provisioner, "last_exit", None)
    if isinstance(last, dict) and last.get("reason"):
        return str(last["reason"])
    return None


async def _settled_reason(km: Any, provisioner: Any) -> str:
    """The death's reason, once the provisioner recorded it: nbclient saw the process gone,
    and the provisioner records the exit at a later poll when the executor had not reported
    it yet (``REASON_POLLS`` polls at most)."""
    for _ in range(REASON_POLLS):
        reason = death_reason(provisioner)
        if reason is not None:
            return reason
        await ensure_async(km.is_alive())
        await asyncio.sleep(REASON_POLL_S)
    return death_reason(provisioner) or NO_REASON


def has_notice(cell: NotebookNode) -> bool:
    """Does ``cell`` already end its output with a death notice (the relay's)?"""
    return any(
        out.get("output_type") == "stream" and NOTICE in str(out.get("text", ""))
        for out in cell.get("outputs", [])
    )


class SandboxNotebookClient(NotebookClient):
    """nbclient's ``NotebookClient`` that ends a run whose sandbox kernel died with the
    reason (see the module docstring): in the raised ``SandboxKernelDied`` and in the
    failing cell's outputs. Made by the caller (a script, ``engine.SandboxEngine``) like
    nbclient's own; its traits and hooks are nbclient's."""

    _sandbox_parent: str | None = None

    async def _async_poll_output_msg(
        self, parent_msg_id: str, cell: NotebookNode, cell_index: int
    ) -> None:
        """nbclient's output loop for one cell (called by ``async_execute_cell``); notes the
        cell's request id, for the output read after a death."""
        self._sandbox_parent = parent_msg_id
        await super()._async_poll_output_msg(parent_msg_id, cell, cell_index)

    async def async_execute_cell(
        self,
        cell: NotebookNode,
        cell_index: int,
        execution_count: int | None = None,
        store_history: bool = True,
    ) -> NotebookNode:
        """Run one cell (nbclient's); a death of the sandbox kernel meanwhile reads the
        cell's last output, adds the notice when the relay's did not come, and raises
        ``SandboxKernelDied``. Called by ``execute`` for each cell, and by papermill."""
        provisioner = _sandbox_provisioner(self.km)
        try:
            result: NotebookNode = await super().async_execute_cell(
                cell, cell_index, execution_count=execution_count, store_history=store_history
            )
        except DeadKernelError as exc:
            if provisioner is None or isinstance(exc, SandboxKernelDied):
                raise
            reason = await _settled_reason(self.km, provisioner)
            await self._drain_output(cell, cell_index)
            if not has_notice(cell):
                cell.outputs.append(
                    NotebookNode(  # type: ignore[no-untyped-call]
                        output_type="stream", name="stderr", text=f"{NOTICE}{reason}\n"
                    )
                )
            self.log.error("the sandbox kernel died in cell %s: %s", cell_index, reason)
            raise SandboxKernelDied(reason, cell_index, provisioner.kernelspec_name) from exc
        return result

    execute_cell = run_sync(async_execute_cell)

    async def _drain_output(self, cell: NotebookNode, cell_index: int) -> None:
        """Put the failing cell's output that came before the death was seen (nbclient
        stops reading it at once) into the cell: the relay's notice among it. Bounded by
        ``DRAIN_MESSAGES`` and ``DRAIN_WAIT_S`` of silence."""
        kc, parent = self.kc, self._sandbox_parent
        if kc is None or parent is None:
            return
        for _ in range(DRAIN_MESSAGES):
            try:
                msg = await ensure_async(kc.iopub_channel.get_msg(timeout=DRAIN_WAIT_S))
            except Empty:
                return
            if msg.get("parent_header", {}).get("msg_id") != parent:
                continue
            try:
                self.process_message(msg, cell, cell_index)
            except CellExecutionComplete:
                return
