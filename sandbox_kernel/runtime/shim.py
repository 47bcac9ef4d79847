"""The shim layer: what a rootless container's runtime needs inside a root-owned image.

Layer: OS (runtime). A rootless container's root is an unprivileged id; files of an image
from the system store belong to host root, which its user namespace does not map, so
overlay can copy none of them up: the runtime could not create the notebook folder's mount
point under /home, nor write /etc/hosts. ``Container.start`` therefore asks ``entries``
for the paths the plan creates in the image (mount points, their parents, the /etc files)
and the executor makes them first in a small top layer of its own (``shimdir`` and
``shimfile`` records), owned by the container's root; the plan's own records then find
them there. An existing image directory keeps its mode; a path that is a symlink in the
image is left alone (the record that needs it fails as it would anyway).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from . import ops

#: Mounted fresh by the plan: nothing under them is in the image.
_FRESH = ("/proc", "/dev", "/sys")


@dataclass(frozen=True)
class ShimEntry:
    """One path of the shim layer: a directory, or an empty file the plan writes later."""

    path: str
    mode: int
    is_dir: bool

    def op(self) -> ops.Op:
        """The executor record that makes it."""
        return (
            ops.ShimDir(self.path, self.mode) if self.is_dir else ops.ShimFile(self.path, self.mode)
        )


def _lookup(layers: Sequence[str], path: str) -> os.stat_result | None:
    """``path`` as the merged image shows it (top-most layer first; a whiteout hides it, an
    opaque directory stops the search below it). Never follows a symlink."""
    rel = path.lstrip("/")
    for layer in layers:
        full = os.path.join(layer, rel)
        try:
            st = os.lstat(full)
        except OSError:
            if _hidden_in(layer, rel):
                return None
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return None  # a whiteout
        return st
    return None


def _hidden_in(layer: str, rel: str) -> bool:
    """Does ``layer`` hide ``rel`` from the layers below (a whiteout or an opaque directory
    on the way)?"""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        p = os.path.join(layer, *parts[:i])
        try:
            st = os.lstat(p)
        except OSError:
            return False
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return True
        if i < len(parts) and stat.S_ISDIR(st.st_mode) and _opaque(p):
            return True
    return False


def _opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _targets(plan: Sequence[ops.Op]) -> list[tuple[str, bool]]:
    """(path, is a directory) of everything the plan creates in the image before pivot."""
    out: list[tuple[str, bool]] = []
    for op in plan:
        if isinstance(op, ops.Pivot):
            break
        if isinstance(op, ops.Mkdir):
            out.append((op.path, True))
        elif isinstance(op, (ops.Touch, ops.WriteFile)):
            out.append((op.path, False))
    return [(p, d) for p, d in out if not any(p == f or p.startswith(f + "/") for f in _FRESH)]


def entries(plan: Sequence[ops.Op], layers: Sequence[str]) -> tuple[ShimEntry, ...]:
    """The shim layer for ``plan`` over image ``layers`` (top-most first): each created path
    and its parents, in creation order, each once."""
    made: dict[str, ShimEntry] = {}
    for path, is_dir in _targets(plan):
        chain = []
        p = path
        while p not in ("/", ""):
            chain.append(p)
            p = posixpath.dirname(p)
        for i, p in enumerate(reversed(chain)):
            if p in made:
                continue
            want_dir = is_dir or i < len(chain) - 1
            st = _lookup(layers, p)
            if st is not None and stat.S_ISLNK(st.st_mode):
                break  # through a symlink of the image: not ours to shadow
            if st is not None and stat.S_ISDIR(st.st_mode) != want_dir:
                break
            mode = stat.S_IMODE(st.st_mode) if st is not None else (0o755 if want_dir else 0o644)
            made[p] = ShimEntry(p, mode & 0o7777, want_dir)
    return tuple(made.values())
