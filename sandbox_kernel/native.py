"""Locate the compiled executor (sk-runtime), built by the package's build hook."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SandboxError

_HERE = Path(__file__).resolve().parent


def runtime_binary() -> str:
    env = os.environ.get("SANDBOX_KERNEL_RUNTIME")
    candidates = [Path(env)] if env else []
    candidates.append(_HERE / "_bin" / "sk-runtime")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise SandboxError(
        f"the executor sk-runtime is missing (looked in {', '.join(str(c) for c in candidates)}); "
        "reinstall the package with a C compiler present (apt-get install gcc), "
        "or in a checkout run: make native"
    )
