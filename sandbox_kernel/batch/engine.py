"""The papermill engine ``sandbox``: papermill's nbclient engine with ``SandboxNotebookClient``.

Layer: batch. Registered as the ``papermill.engine`` entry point ``sandbox`` (pyproject.toml),
so that ``papermill --engine sandbox in.ipynb out.ipynb -k python3-sandbox`` (or
``papermill.execute_notebook(..., engine_name="sandbox")``) runs the notebook as papermill's
default engine does, except when the sandbox kernel dies: papermill then ends with
``SandboxKernelDied`` ("Kernel died: out of memory (limit 256 MiB, peak 256 MiB) ...") and
the output notebook's failing cell holds the reason and is marked failed (papermill's
``exception`` metadata). Imports papermill: only a host with papermill imports this module.

The output notebook usually lies in the kernel's folder, which the kernel writes: a link it
plants under the output's name (``out.ipynb -> /etc/cron.d/x``, a link to a folder, a
dangling link) or a FIFO named like it must not be followed or opened by papermill, which
often runs as root. Papermill writes the output by path (its local handler's ``open``), at
the start, after cells (autosave) and at the end, partly outside the engine; the engine
therefore replaces papermill's local handler by ``BeneathLocalHandler`` when it runs, whose
writes go through ``sandbox_kernel.beneath``: a new file in the output's folder renamed over
the name (a link or FIFO there is replaced, never followed or opened), every folder below
the kernel's folder reached without following a link.
"""

from __future__ import annotations

import os
from typing import Any

from nbclient.util import run_sync
from nbformat.notebooknode import NotebookNode
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, logger
from papermill.iorw import LocalHandler, papermill_io
from papermill.utils import chdir

from .. import beneath
from . import SandboxKernelDied, SandboxNotebookClient

__all__ = ["BeneathLocalHandler", "SandboxEngine", "SandboxPapermillClient", "write_output"]


def write_output(path: str, data: bytes, folders: list[str]) -> None:
    """Replace the file at the absolute ``path`` with ``data``, following no link a kernel
    could have made: below the first of ``folders`` (kernels' folders) that holds ``path``
    every name is walked without following a link; elsewhere the output's folder is the
    user's path and only its last name is never followed. A link, dangling link or FIFO
    under that name is replaced, never written through or opened (``beneath.write_bytes``);
    ``beneath.Refused`` for a link on the way. Called by ``BeneathLocalHandler.write``."""
    for folder in folders:
        if path.startswith(folder.rstrip("/") + "/"):
            beneath.write_bytes(folder, os.path.relpath(path, folder), data)
            return
    beneath.write_bytes(os.path.dirname(path), os.path.basename(path), data)


class BeneathLocalHandler(LocalHandler):  # type: ignore[misc]
    """Papermill's local file handler whose writes never follow a link (``write_output``);
    reads, listings and the working folder as papermill's. Put in papermill's place by
    ``install_handler`` when the sandbox engine runs; ``folders`` are the folders of the
    kernels the engine ran (``SandboxEngine`` adds each)."""

    def __init__(self) -> None:
        super().__init__()
        self.folders: list[str] = []

    def write(self, buf: str, path: str) -> None:
        """Write the text ``buf`` to ``path`` (relative to papermill's working folder);
        called by papermill for every save of the output notebook."""
        with chdir(self._cwd):
            dirname = os.path.dirname(path)
            if dirname and not os.path.isdir(dirname):
                raise FileNotFoundError(f"output folder {dirname} doesn't exist.")
            target = os.path.abspath(path)
        write_output(target, buf.encode("utf-8"), self.folders)


def install_handler() -> BeneathLocalHandler:
    """Papermill's local handler, replaced by a ``BeneathLocalHandler`` the first time (it
    keeps papermill's working folder); called by ``SandboxEngine.execute_notebook`` before
    the kernel starts. It stays for the rest of the process: papermill writes the output
    once more after the engine returned, the kernel's links still there."""
    handlers: list[tuple[str, Any]] = papermill_io._handlers
    for i, (scheme, handler) in enumerate(handlers):
        if scheme != "local":
            continue
        if isinstance(handler, BeneathLocalHandler):
            return handler
        safe = BeneathLocalHandler()
        safe._cwd = getattr(handler, "_cwd", None)
        handlers[i] = ("local", safe)
        return safe
    safe = BeneathLocalHandler()
    papermill_io.register("local", safe)
    return safe


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
    def execute_notebook(cls, nb: NotebookNode, kernel_name: str, **kwargs: Any) -> NotebookNode:
        """Papermill's engine entry (called by ``papermill.execute_notebook`` in the kernel's
        folder, its ``cwd``): the output's writes go through ``BeneathLocalHandler`` from
        now on, the kernel's folder (where the provisioner puts the kernel) among the ones
        walked without following a link."""
        handler = install_handler()
        folder = os.path.realpath(os.getcwd())
        if folder not in handler.folders:
            handler.folders.append(folder)
        result: NotebookNode = super().execute_notebook(nb, kernel_name, **kwargs)
        return result

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
