"""Whose containers a caller sees: its own and, as root, every user's too.

Layer: runtime (OS side; imports the leaves and cgroups). Called by ``sandbox-kernel ps``,
``stats`` and ``gc``. An ordinary user sees the containers of its own run root only. Root
sees its own run root and the run roots of other users' servers (``paths.user_run_roots``:
the private ``/tmp/sk-UID`` and ``/run/user/UID/sandbox-kernel``), with each such
container's cgroup looked up where that user's delegation is, never anywhere that user
does not own (``cgroups.manager_for_user``).

Everything in another user's run dir is that user's to write, so root reads it as
untrusted: files through ``rundir.read_small`` (no symlink at the last component, bounded
size), directories that are not symlinks, cgroups only inside the user's delegation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..cgroups import get_manager, manager_for_user
from ..cgroups.base import CgroupManager
from ..errors import SandboxError
from ..paths import mount_points, run_dir, user_run_roots
from .rundir import ContainerInfo, container_dirs


@dataclass(frozen=True)
class RunRoot:
    """One run root and the host uid of the servers whose containers it holds."""

    uid: int
    path: Path

    @property
    def own(self) -> bool:
        """Is it the caller's own run root?"""
        return self.uid == os.geteuid()


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: At most this many run dirs of one other user are looked at (each is a few files to
#: read; a user could make any number).
MAX_FOREIGN = 512


def run_roots() -> list[RunRoot]:
    """The caller's own run root first, then, for root, each other user's (see the module
    docstring)."""
    roots = [RunRoot(os.geteuid(), run_dir())]
    if os.geteuid() == 0:
        roots += [RunRoot(uid, path) for uid, path in user_run_roots(mount_points())]
    return roots


@contextlib.contextmanager
def opened(root: RunRoot) -> Iterator[Path | None]:
    """A path to ``root``'s directory that stays the directory checked, whatever its owner
    renames meanwhile: the caller's own run root as it is; another user's opened without
    following a symlink, checked (owner, closed to others) and reached through
    ``/proc/self/fd`` while the block runs. None when it is gone or no longer that user's."""
    if root.own:
        yield root.path
        return
    try:
        fd = os.open(root.path, _DIR_FLAGS)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        ok = st.st_uid == root.uid and not st.st_mode & 0o077
        yield Path(f"/proc/self/fd/{fd}") if ok else None
    finally:
        os.close(fd)


def containers(roots: list[RunRoot] | None = None) -> Iterator[tuple[RunRoot, ContainerInfo]]:
    """Every run dir of ``roots`` (default ``run_roots()``), running or not, with its run
    root. Another user's run dirs (at most ``MAX_FOREIGN``, none that is a mount point) are
    each opened without following a link and read through ``/proc/self/fd``: their
    ``ContainerInfo.path`` is valid only while the loop body runs (its metadata is read at
    once)."""
    mounts: set[str] | None = None
    for root in roots if roots is not None else run_roots():
        with opened(root) as base:
            if base is None:
                continue
            if root.own:
                for entry in container_dirs(base):
                    yield root, ContainerInfo(entry)
                continue
            mounts = mount_points() if mounts is None else mounts
            for entry in container_dirs(base)[:MAX_FOREIGN]:
                if str(root.path / entry.name) in mounts:
                    continue
                try:
                    fd = os.open(entry, _DIR_FLAGS)
                except OSError:
                    continue  # swapped for a link or something else meanwhile
                try:
                    yield root, ContainerInfo(Path(f"/proc/self/fd/{fd}"), entry.name)
                finally:
                    os.close(fd)


def cgroup_manager(root: RunRoot, info: ContainerInfo) -> CgroupManager | None:
    """The manager of the cgroups of the container ``info`` of ``root``: the caller's own
    manager for its own containers, the delegation's for another user's; None when the
    container has no cgroups (limits not enforced) or none can be found."""
    if info.meta.get("limits_enforced") is False:
        return None
    if root.own:
        try:
            return get_manager()
        except SandboxError:
            return None
    return manager_for_user(root.uid, info.meta.get("cgroup_parent"))


def find(container_id: str) -> tuple[RunRoot, ContainerInfo] | None:
    """The run root and run dir of container ``container_id`` among ``run_roots()``, or None.
    Called by ``stats`` at each sample."""
    for root, info in containers():
        if info.id == container_id:
            return root, info
    return None
