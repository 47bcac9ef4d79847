"""Why a kernel died, kept across its restarts: ``<run root>/kernels/<kernel id>/``.

Layer: Jupyter. The provisioner records each death that was not asked for (or that a cap
caused) with ``record``; the restarted kernel's ``%sandbox`` magics get the same data through
the control socket (``previous_exit``, which the provisioner keeps in memory); the file is
for whoever looks after the process (``read_last_exit``: tests, an operator); ``forget``
removes it when the kernel is shut down for good.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..paths import run_dir
from ..runtime.rundir import write_json


def kernels_dir(root: Path | None = None) -> Path:
    """``<run root>/kernels``: per-kernel state that outlives a container (the root defaults
    to ``paths.run_dir()``)."""
    return (root or run_dir()) / "kernels"


def last_exit_path(kernel_id: str, root: Path | None = None) -> Path:
    """The file holding the last recorded death reason of kernel ``kernel_id``."""
    return kernels_dir(root) / kernel_id / "last-exit.json"


def read_last_exit(kernel_id: str, root: Path | None = None) -> dict[str, Any] | None:
    """The last recorded death reason of a kernel, or None. Nothing in the package reads it
    back; the tests do, to check what the provisioner kept."""
    try:
        data = json.loads(last_exit_path(kernel_id, root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record(kernel_id: str, data: dict[str, Any]) -> None:
    """Keep ``data`` (an ``ExitResult.to_json()`` plus the kernel's names) as the kernel's
    last death reason. Raises OSError when the run root is not writable. Called by the
    provisioner's ``_record_exit``, at most once per container."""
    path = last_exit_path(kernel_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_json(path, data)


def forget(kernel_id: str) -> None:
    """Drop what is kept of a kernel (idempotent). Called by the provisioner's ``cleanup``
    on a shutdown that is not a restart."""
    shutil.rmtree(kernels_dir() / kernel_id, ignore_errors=True)
