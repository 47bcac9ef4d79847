"""The built-in pseudo-image ``host``: the host's /usr and /etc, read-only.

It makes the runtime usable and testable without building an image: an empty lower
layer holding the usr-merge symlinks (bin, lib, lib64, sbin -> usr/...), plus read-only
bind mounts of the host's /usr and /etc.
"""

from __future__ import annotations

import os
from pathlib import Path

from .paths import state_dir
from .spec import Bind

NAME = "host"
_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")


def layer_dir(base: Path | None = None) -> Path:
    """Create (once) and return the host image's lower layer."""
    root = (base or state_dir()) / "host-layer"
    if not (root / ".complete").exists():
        tmp = root.with_name(f"host-layer.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for d in ("usr", "etc", "proc", "dev", "sys", "tmp", "home", "root", "run", "var"):
            (tmp / d).mkdir(exist_ok=True)
        for name in _LINKS:
            if os.path.lexists(f"/{name}") and not os.path.lexists(tmp / name):
                os.symlink(f"usr/{name}", tmp / name)
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, root)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


def binds() -> tuple[Bind, ...]:
    return (Bind("/usr", "/usr", readonly=True), Bind("/etc", "/etc", readonly=True))
