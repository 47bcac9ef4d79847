"""Can the kernel's user write its notebook folder? Told at start, not at the first save.

Layer: Jupyter. As root, ``user='auto'`` runs a kernel as the notebook folder's owner, and as
nobody (65534) when that owner is root; such a kernel cannot write a root-owned folder, and
its user only learned so when a file write failed. The provisioner asks ``check`` at each
start (the server log says it once), and again for each ``%sandbox`` report; the kernel's
first execution says it too (the magics read ``notebook_folder_problem`` from the host's
answer). The texts name only the notebook folder, which the kernel sees at the same path,
and the kernel's own uid.

The decision is the kernel's uid and gid against the folder's owner, group and mode bits
(a kernel has no supplementary groups; ACLs are not read): the ids the folder is compared
with are the ones it shows inside the sandbox (root mode idmaps it: on-disk ids are the
same container ids) or the kernel's host ids where it is not idmapped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

#: The uid ``user='auto'`` runs a kernel as in a root-owned folder.
NOBODY = 65534


@dataclass(frozen=True)
class FolderAccess:
    """``writable``: None when the folder could not be read (or no kernel runs);
    ``problem``: the text for the log, the notice and ``%sandbox`` when it is not writable
    (None for a folder mounted read-only on purpose, ``notebook_folder='ro'``)."""

    writable: bool | None
    problem: str | None = None
    readonly_mount: bool = False


def may_write(owner: int, group: int, mode: int, uid: int, gid: int) -> bool:
    """May ``uid``:``gid`` create files in a folder of ``owner``:``group`` with ``mode``
    (write and search permission, the owner's bits for its owner, the group's for its
    group, the others' else)? Root may."""
    if uid == 0:
        return True
    if uid == owner:
        bits = mode >> 6
    elif gid == group:
        bits = mode >> 3
    else:
        bits = mode
    return bits & 0o3 == 0o3


def problem_text(folder: str, owner: int, mode: int, kernel_uid: int) -> str:
    """Why the kernel (``kernel_uid``, its own uid) cannot write ``folder`` and the fix."""
    if owner == kernel_uid:
        return (
            f"the folder {folder} has mode {stat.S_IMODE(mode):04o}: its owner, the kernel's "
            f"uid {kernel_uid}, cannot write it: chmod u+wx it"
        )
    who = "root" if owner == 0 else f"uid {owner}"
    runs = f"nobody ({NOBODY})" if kernel_uid == NOBODY else f"uid {kernel_uid}"
    return (
        f"the folder {folder} belongs to {who}; kernels run as {runs} there: chown it to "
        "the user, or set SandboxProvisioner.user"
    )


def check(
    folder: str,
    ids: tuple[int, int],
    kernel_uid: int,
    *,
    readonly: bool,
    stat_of: Callable[[str], os.stat_result] = os.stat,
) -> FolderAccess:
    """The kernel's access to its notebook ``folder``: ``ids`` the uid and gid compared with
    the folder's (see the module docstring), ``kernel_uid`` the uid the kernel sees as its
    own (for the text), ``readonly`` the folder mounted read-only. Blocking (one stat): the
    provisioner calls it in a thread at each start and for each ``%sandbox`` report."""
    if readonly:
        return FolderAccess(False, None, readonly_mount=True)
    try:
        st = stat_of(folder)
    except OSError:
        return FolderAccess(None)
    if may_write(st.st_uid, st.st_gid, st.st_mode, *ids):
        return FolderAccess(True)
    return FolderAccess(False, problem_text(folder, st.st_uid, st.st_mode, kernel_uid))
