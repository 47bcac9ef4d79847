"""cgroup layer: one manager per host, v1 or v2, picked once from the detected mode.

Layer: cgroups (OS side; imports only ``errors``); the runtime builds on it, never the other
way round. ``get_manager()`` is the entry point. ``SANDBOX_KERNEL_CGROUP_MODE=v1|v2`` forces
an implementation (tests); ``SANDBOX_KERNEL_CGROUP_PARENT`` (or the ``parent`` argument,
e.g. the admin's setting) names the parent cgroup instead of the caller's own cgroup.
"""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Callable

from ..errors import CgroupError, PrivilegeError, SandboxError
from . import delegation
from .base import CgroupHandle, CgroupLimits, CgroupManager, CgroupMode, CgroupStats
from .common import CgroupIO, cpus_to_quota, weight_to_shares
from .detect import CgroupLayout, detect
from .v1 import V1Handle, V1Manager
from .v2 import V2Handle, V2Manager

__all__ = [
    "MODE_ENV",
    "PARENT_ENV",
    "CgroupHandle",
    "CgroupIO",
    "CgroupLayout",
    "CgroupLimits",
    "CgroupManager",
    "CgroupMode",
    "CgroupStats",
    "V1Handle",
    "V1Manager",
    "V2Handle",
    "V2Manager",
    "cpus_to_quota",
    "detect",
    "get_manager",
    "manager_for_user",
    "reset_manager_cache",
    "weight_to_shares",
]

MODE_ENV = "SANDBOX_KERNEL_CGROUP_MODE"
PARENT_ENV = "SANDBOX_KERNEL_CGROUP_PARENT"

_Factory = Callable[[CgroupLayout, "str | None", "CgroupIO | None"], CgroupManager]

#: mode -> implementation (as crun does: unified -> v2; hybrid and legacy -> v1).
_BY_MODE: dict[CgroupMode, _Factory] = {
    CgroupMode.UNIFIED: V2Manager,
    CgroupMode.HYBRID: V1Manager,
    CgroupMode.LEGACY: V1Manager,
}
_BY_FORCED: dict[str, _Factory] = {"v1": V1Manager, "v2": V2Manager}

_cache: dict[tuple[str, str | None, str], CgroupManager] = {}
_lock = threading.Lock()


def reset_manager_cache() -> None:
    """Forget the managers built so far (tests; after the host's cgroup setup changed)."""
    with _lock:
        _cache.clear()


def _delegated_parent(layout: CgroupLayout, v2: bool, io: CgroupIO | None) -> str:
    """An unprivileged caller's parent cgroup: its delegated subtree (v2: its own cgroup
    delegated by systemd or ``sandbox-kernel delegate``, whose processes move into a leaf;
    v1: the ``kernels`` cgroup of ``sandbox-kernel delegate``). PrivilegeError naming the
    fix when there is none."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if v2:
        found = delegation.v2_delegated(layout, uid, io)
        if found is not None:
            delegation.enter_leaf(found, io)
            return found
    else:
        parent = delegation.v1_parent(layout, uid, io)
        if parent is not None:
            return parent
    where = layout.v2_dir() if v2 else delegation.kernels_cgroup(uid)
    raise PrivilegeError(
        f"no cgroup is delegated to {user} (looked for {where}), so the sandbox's memory, CPU "
        f"and process caps cannot be enforced; {delegation.FIX.format(user=user)}"
    )


def get_manager(
    parent: str | None = None,
    *,
    root: str = "/",
    mounts_text: str | None = None,
    cgroup_text: str | None = None,
    io: CgroupIO | None = None,
    mode: str | None = None,
) -> CgroupManager:
    """The cgroup manager for this host (cached per parent and mode).

    Called by ``Container.create`` and gc when not given one, and by ``ps``, ``stats`` and
    ``doctor``.

    parent: parent cgroup for containers (v2: a path in the cgroup2 mount, or the directory
        itself; v1: a cgroup path used in every hierarchy). Default: $SANDBOX_KERNEL_CGROUP_PARENT,
        else, for root, the caller's own cgroup, and for anyone else the cgroup delegated
        to them (PrivilegeError when there is none).
    mode: "v1" or "v2" to force an implementation; default: $SANDBOX_KERNEL_CGROUP_MODE, else
        chosen from the detected mode.
    root, mounts_text, cgroup_text, io: injection points for tests (a fake tree). When any of
        them is given, the result is built fresh and not cached.
    """
    if parent is None:
        parent = os.environ.get(PARENT_ENV) or None
    if mode is None:
        mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode and mode not in _BY_FORCED:
        raise CgroupError(
            f"{MODE_ENV}={mode!r} is not a cgroup mode; use 'v1' or 'v2', or unset it to detect"
        )
    injected = root != "/" or mounts_text is not None or cgroup_text is not None or io is not None
    key = (root, parent, mode)
    if not injected:
        with _lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached
    layout = detect(root=root, mounts_text=mounts_text, cgroup_text=cgroup_text)
    factory = _BY_FORCED[mode] if mode else _BY_MODE[layout.mode]
    if parent is None and os.geteuid() != 0:
        parent = _delegated_parent(layout, factory is V2Manager, io)
    manager = factory(layout, parent, io)
    if not injected:
        with _lock:
            manager = _cache.setdefault(key, manager)
    return manager


def manager_for_user(uid: int, recorded_parent: object = None) -> CgroupManager | None:
    """As root: the manager of another user's kernel cgroups, where that user's delegation
    is (v1: the kernels cgroup ``sandbox-kernel delegate`` made; v2: ``recorded_parent``,
    the parent cgroup its run dir recorded, taken only when it is delegated to ``uid``);
    None when there is none. Never a cgroup that user does not own. Called by
    ``runtime.owners`` for root's ``ps``, ``stats`` and ``gc``."""
    try:
        mode = os.environ.get(MODE_ENV, "").strip().lower()
        layout = detect()
        v2 = mode == "v2" or (not mode and _BY_MODE[layout.mode] is V2Manager)
        if v2:
            parent = delegation.v2_recorded_parent(layout, recorded_parent, uid)
        else:
            parent = delegation.v1_parent(layout, uid)
        return get_manager(parent=parent) if parent is not None else None
    except (SandboxError, OSError):
        return None
