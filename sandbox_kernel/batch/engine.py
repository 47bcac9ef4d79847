"""The papermill engine ``sandbox``: papermill's nbclient engine with ``SandboxNotebookClient``.

Layer: batch. Registered as the ``papermill.engine`` entry point ``sandbox`` (pyproject.toml),
so that ``papermill --engine sandbox in.ipynb out.ipynb -k python3-sandbox`` (or
``papermill.execute_notebook(..., engine_name="sandbox")``) runs the notebook as papermill's
default engine does, except when the sandbox kernel dies: papermill then ends with
``SandboxKernelDied`` ("Kernel died: out of memory (limit 256 MiB, peak 256 MiB) ...") and
the output notebook's failing cell holds the reason and is marked failed (papermill's
``exception`` metadata). Imports papermill: only a host with papermill imports this module.
"""

from __future__ import annotations

from typing import Any

from nbclient.util import run_sync
from nbformat.notebooknode import NotebookNode
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, logger

from . import SandboxKernelDied, SandboxNotebookClient

__all__ = ["SandboxEngine", "SandboxPapermillClient"]


class SandboxPapermillClient(SandboxNotebookClient, PapermillNotebookClient):  # type: ignore[misc]
    """Papermill's client (cell metadata, autosave, output logging) with the sandbox client's
    end on a death; the failing cell is marked failed in papermill's metadata. Made by
    ``SandboxEngine`` for each notebook."""

    async def async_execute_cell(
        self,
        cell: NotebookNode,
        cell_index: int,
        execution_count: int | None = None,
        store_history: bool = True,
    ) -> NotebookNode:
        """Run one cell (``SandboxNotebookClient``'s); called by papermill's cell loop."""
        try:
            return await super().async_execute_cell(
                cell, cell_index, execution_count=execution_count, store_history=store_history
            )
        except SandboxKernelDied as exc:
            self.nb_man.cell_exception(cell, cell_index=cell_index, exception=exc)
            raise

    execute_cell = run_sync(async_execute_cell)


class SandboxEngine(NBClientEngine):  # type: ignore[misc]
    """Papermill's nbclient engine, running ``SandboxPapermillClient``. Papermill calls
    ``execute_managed_notebook`` once per run with its command-line or API options."""

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: int | None = None,
        **kwargs: Any,
    ) -> NotebookNode:
        """Run the notebook of ``nb_man`` (papermill's NotebookExecutionManager) on
        ``kernel_name``; the options mean what they mean for papermill's own engine
        (``execution_timeout``: seconds per cell, None for none)."""
        options = {
            k: v for k, v in kwargs.items() if k not in ("input_path", "timeout", "startup_timeout")
        }
        options.update(
            timeout=execution_timeout or kwargs.get("timeout"),
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        client = SandboxPapermillClient(nb_man, **options)
        result: NotebookNode = client.execute()
        return result
