"""cgroups for unprivileged servers: a subtree that root hands to a user.

Layer: cgroups. A server that runs as an ordinary user can create kernel cgroups only in a
subtree delegated to it, and must never be able to raise what root capped above it.

* systemd hosts delegate a unit's cgroup (``Delegate=yes``: ``systemd-run --user --scope
  -p Delegate=yes jupyter lab``, SystemdSpawner's ``unit_extra_properties``): on cgroup v2
  the server's own cgroup is then owned by its user. ``find_parent`` finds it, moves the
  server's processes into a leaf (``server``) and puts kernels beside it (the "no internal
  processes" rule).
* Elsewhere (cgroup v1 hosts such as this one, v2 without systemd) the admin runs
  ``sandbox-kernel delegate USER [--memory ..] [--cpus ..] [--pids ..]`` once (a JupyterHub
  ``pre_spawn_hook`` or a boot-time unit; cgroups vanish at reboot). ``delegate`` makes, in
  each hierarchy, ``sandbox-kernel/user-UID`` owned by root and holding the user's
  aggregate caps, and below it ``kernels`` owned by the user: the user creates kernel
  cgroups there but cannot touch the caps of ``user-UID``.

Nothing here writes a cgroup it did not make (the delegations it makes are its own), and
every path is built from validated names.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
from dataclasses import dataclass, replace

from ..errors import CgroupError, SpecError
from .base import CgroupLimits
from .common import CgroupIO, Files, cgroup_error
from .detect import V1_CONTROLLERS, V2_CONTROLLERS, CgroupLayout, cgroup_dir

log = logging.getLogger(__name__)

#: The product's top cgroup for delegations, in every hierarchy.
TOP = "sandbox-kernel"
#: The user-owned child of a delegation, where kernel cgroups go.
KERNELS = "kernels"
#: v2: the leaf a server moves its processes into, inside its delegated cgroup.
SERVER_LEAF = "server"
#: v2 files a delegation hands over, when /sys/kernel/cgroup/delegate cannot be read.
V2_DELEGATE_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")
DELEGATE_LIST = "/sys/kernel/cgroup/delegate"
FIX = (
    "ask the administrator to run `sandbox-kernel delegate {user}` as root (once per boot, "
    "e.g. from JupyterHub's pre_spawn_hook), or on a systemd host start the server with "
    "`systemd-run --user --scope -p Delegate=yes <command>`"
)


def user_cgroup(uid: int) -> str:
    """The cgroup path (as in /proc/self/cgroup) of user ``uid``'s delegation."""
    return f"/{TOP}/user-{int(uid)}"


def kernels_cgroup(uid: int) -> str:
    """The user-owned cgroup path where user ``uid``'s kernel cgroups go."""
    return f"{user_cgroup(uid)}/{KERNELS}"


@dataclass(frozen=True)
class Delegation:
    """One user's delegation as ``delegate --list`` shows it."""

    uid: int
    user: str
    caps: CgroupLimits
    dirs: tuple[str, ...]  # the user-UID directories, one per hierarchy


def _hierarchy_dirs(layout: CgroupLayout, cgroup_path: str) -> list[tuple[str, str]]:
    """(controller or 'unified', directory) of ``cgroup_path`` in each hierarchy we use."""
    if layout.v2_mount is not None and not layout.v1_mounts:
        return [("unified", cgroup_dir(layout.v2_mount, cgroup_path, layout.root))]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for ctrl in V1_CONTROLLERS:
        mount = layout.v1_mounts.get(ctrl)
        if mount is None:
            continue
        d = cgroup_dir(mount, cgroup_path, layout.root)
        if d not in seen:
            seen.add(d)
            out.append((ctrl, d))
    return out


def _owned_by(files: Files, path: str, uid: int) -> bool:
    try:
        return files.io.stat(path).st_uid == uid
    except OSError:
        return False


def v1_parent(layout: CgroupLayout, uid: int, io: CgroupIO | None = None) -> str | None:
    """The kernels cgroup of a delegation made by ``delegate`` for ``uid`` when it exists in
    every hierarchy and is owned by ``uid`` (v1 and hybrid hosts); else None."""
    files = Files(io or CgroupIO())
    dirs = _hierarchy_dirs(layout, kernels_cgroup(uid))
    if dirs and all(files.io.isdir(d) and _owned_by(files, d, uid) for _, d in dirs):
        return kernels_cgroup(uid)
    return None


def v2_delegated(layout: CgroupLayout, uid: int, io: CgroupIO | None = None) -> str | None:
    """The nearest cgroup at or above the caller's own that is delegated to ``uid`` (owned
    by it, with cgroup.procs and cgroup.subtree_control its own too), v2; else None."""
    files = Files(io or CgroupIO())
    own = layout.v2_dir()
    mountpoint = layout.v2_mountpoint()
    if own is None or mountpoint is None:
        return None
    found = None
    d = own
    while d.startswith(mountpoint.rstrip("/") + "/"):
        if not _v2_delegated_dir(files, d, uid):
            break
        found = d
        d = os.path.dirname(d)
    return found


def _v2_delegated_dir(files: Files, d: str, uid: int) -> bool:
    """Is the v2 cgroup directory ``d`` delegated to ``uid`` (it, its cgroup.procs and its
    cgroup.subtree_control owned by ``uid``)?"""
    return _owned_by(files, d, uid) and all(
        _owned_by(files, os.path.join(d, f), uid)
        for f in ("cgroup.procs", "cgroup.subtree_control")
    )


def v2_recorded_parent(
    layout: CgroupLayout, path: object, uid: int, io: CgroupIO | None = None
) -> str | None:
    """``path`` (a parent cgroup directory another user's run dir recorded: untrusted) when
    it is a plain directory of the cgroup2 mount delegated to ``uid``; else None. Called, as
    root, for that user's ``ps``, ``stats`` and ``gc`` rows."""
    mountpoint = layout.v2_mountpoint()
    if not isinstance(path, str) or mountpoint is None or len(path) > 4096:
        return None
    if not path.isprintable():
        return None  # it would reach root's terminal in gc's messages
    if os.path.normpath(path) != path or not path.startswith(mountpoint.rstrip("/") + "/"):
        return None
    if os.path.realpath(path) != path:
        return None  # a symlink on the way
    files = Files(io or CgroupIO())
    return path if files.io.isdir(path) and _v2_delegated_dir(files, path, uid) else None


def enter_leaf(delegated: str, io: CgroupIO | None = None) -> None:
    """v2: move every process of ``delegated`` into its leaf ``server`` (made if missing),
    so that its children may have controllers ("no internal processes"). Called once by
    the rootless manager before the first kernel cgroup."""
    files = Files(io or CgroupIO())
    procs = os.path.join(delegated, "cgroup.procs")
    text = files.read_opt(procs) or ""
    pids = [p for p in text.split() if p.isdigit()]
    if not pids:
        return
    leaf = os.path.join(delegated, SERVER_LEAF)
    if not files.io.isdir(leaf):
        files.mkdir(leaf)
    for pid in pids:
        try:
            files.io.write(os.path.join(leaf, "cgroup.procs"), pid)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                continue
            raise cgroup_error(exc, f"moving process {pid} into", leaf) from exc


# ---- the admin's verb ------------------------------------------------------------------------


def user_entry(user: str) -> pwd.struct_passwd:
    """The account named ``user``, else (all digits) the account of that uid; SpecError when
    there is none. A name wins over a uid: a hub user called ``1001`` is that account."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    try:
        # ASCII digits only: str.isdigit also takes other scripts' digits
        if re.fullmatch(r"[0-9]{1,10}", user):
            return pwd.getpwuid(int(user))
    except (KeyError, OverflowError):
        pass
    raise SpecError(f"user {user!r} is no user of this host")


def _user_ids(user: str) -> tuple[int, int, str]:
    entry = user_entry(user)
    if entry.pw_uid == 0:
        raise SpecError("root needs no delegation")
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _v2_delegate_files(files: Files) -> tuple[str, ...]:
    text = files.read_opt(DELEGATE_LIST)
    names = tuple(n for n in (text or "").split() if n)
    return names or V2_DELEGATE_FILES


def delegate(
    user: str,
    caps: CgroupLimits,
    layout: CgroupLayout,
    io: CgroupIO | None = None,
    *,
    top: CgroupLimits | None = None,
) -> list[str]:
    """Root: make or update ``user``'s delegation with aggregate ``caps``; returns the
    user-owned kernels directories. ``top``: the caps of every user's kernels together (the
    host's reserve kept free for the hub and servers), written on ``sandbox-kernel`` itself;
    None leaves them as they are. Idempotent. Called by ``sandbox-kernel delegate`` and the
    JupyterHub hook (``jupyter.delegating``)."""
    files = Files(io or CgroupIO())
    uid, gid, _name = _user_ids(user)
    out = []
    v2 = layout.v2_mount is not None and not layout.v1_mounts
    for ctrl, top_dir in _hierarchy_dirs(layout, f"/{TOP}"):
        user_dir = os.path.join(top_dir, f"user-{uid}")
        kernels = os.path.join(user_dir, KERNELS)
        for d in (top_dir, user_dir):
            if not files.io.isdir(d):
                files.mkdir(d)
            if v2:
                _enable_v2(files, d)
        _write_pair(files, v2, ctrl, (top_dir, top), (user_dir, caps))
        if not files.io.isdir(kernels):
            files.mkdir(kernels)
        if v2:
            _enable_v2(files, kernels)
        names = _v2_delegate_files(files) if v2 else ("cgroup.procs", "tasks")
        for path in (kernels, *(os.path.join(kernels, n) for n in names)):
            if files.io.exists(path):
                files.io.chown(path, uid, gid)
        out.append(kernels)
    if not out:
        raise CgroupError("no cgroup hierarchy to delegate (see /proc/self/mountinfo)")
    return out


def _write_pair(
    files: Files,
    v2: bool,
    ctrl: str,
    top: tuple[str, CgroupLimits | None],
    user: tuple[str, CgroupLimits],
) -> None:
    """The all-users caps, then the user's. cgroup v1 refuses a CPU quota above the parent's
    and a parent's below a child's: the user's quota is held to the all-users one, and when
    the all-users caps cannot be lowered before the user's are, they go after. When they
    cannot be written at all (another delegation or a running kernel holds a higher CPU
    quota), the user's own caps still are and a warning says what stays: one user's spawn
    never fails for another's."""
    top_dir, top_caps = top
    user_dir, caps = user
    if top_caps is not None:
        try:
            _write_caps(files, v2, ctrl, top_dir, top_caps)
            top_caps = None
        except CgroupError:
            pass  # below the user's own quota now: after the user's
    if not v2 and ctrl == "cpu":
        caps = _within_parent_quota(files, top_dir, caps)
    _write_caps(files, v2, ctrl, user_dir, caps)
    if top_caps is not None:
        try:
            _write_caps(files, v2, ctrl, top_dir, top_caps)
        except CgroupError as exc:
            log.warning(
                "the cap of all users' kernels in %s could not be written (%s); it stays as "
                "it was until every delegation's and kernel's CPU cap is below it (cgroup v1)",
                top_dir,
                exc,
            )


def _within_parent_quota(files: Files, parent: str, caps: CgroupLimits) -> CgroupLimits:
    """v1: ``caps`` with its CPU quota no higher than ``parent``'s (which the kernel would
    refuse with EINVAL); logged when lowered."""
    quota = files.read_int(os.path.join(parent, "cpu.cfs_quota_us"))
    period = files.read_int(os.path.join(parent, "cpu.cfs_period_us")) or caps.cpu_period_us
    if quota is None or quota <= 0:
        return caps
    top = quota * caps.cpu_period_us // period
    if caps.cpu_quota_us is not None and caps.cpu_quota_us > top:
        log.info("a delegation's CPU cap is held to the all-users cap in %s", parent)
        return replace(caps, cpu_quota_us=top)
    return caps


def _write_caps(files: Files, v2: bool, ctrl: str, d: str, caps: CgroupLimits) -> None:
    from .v1 import write_v1_limits
    from .v2 import write_v2_limits

    if v2:
        write_v2_limits(files, d, caps)
    else:
        write_v1_limits(files, ctrl, d, caps)


def _enable_v2(files: Files, path: str) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    available = set((files.read_opt(os.path.join(path, "cgroup.controllers")) or "").split())
    enabled = set((files.read_opt(control) or "").split())
    todo = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
    if todo:
        files.write(control, " ".join("+" + c for c in todo))


def undelegate(user: str, layout: CgroupLayout, io: CgroupIO | None = None) -> int:
    """Root: remove ``user``'s delegation (its kernels' cgroups are killed and removed
    first), and the all-users cgroup with its caps once no delegation is left in it;
    returns how many directories went. Called by ``delegate --remove``."""
    files = Files(io or CgroupIO())
    uid, _gid, _name = _user_ids(user)
    removed = 0
    for _ctrl, user_dir in _hierarchy_dirs(layout, user_cgroup(uid)):
        if not files.io.isdir(user_dir):
            continue
        for d in files.tree_bottom_up(user_dir):
            files.sigkill(files.procs(d))
            files.rmdir_retry(d)
            removed += 1
    for _ctrl, top_dir in _hierarchy_dirs(layout, f"/{TOP}"):
        if files.io.isdir(top_dir) and not files.subdirs(top_dir):
            try:
                files.io.rmdir(top_dir)
                removed += 1
            except OSError:
                pass  # in use again meanwhile (another delegation, a server in it)
    return removed


def delegations(layout: CgroupLayout, io: CgroupIO | None = None) -> list[Delegation]:
    """Every delegation on this host with its caps, for ``delegate --list``."""
    from .v1 import read_v1_limits
    from .v2 import read_v2_limits

    files = Files(io or CgroupIO())
    v2 = layout.v2_mount is not None and not layout.v1_mounts
    found: dict[int, list[tuple[str, str]]] = {}
    for ctrl, top_dir in _hierarchy_dirs(layout, f"/{TOP}"):
        for sub in files.subdirs(top_dir):
            name = os.path.basename(sub)
            if name.startswith("user-") and name[5:].isdigit():
                found.setdefault(int(name[5:]), []).append((ctrl, sub))
    out = []
    for uid, dirs in sorted(found.items()):
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        caps = read_v2_limits(files, dirs[0][1]) if v2 else read_v1_limits(files, dirs)
        out.append(Delegation(uid, user, caps, tuple(d for _, d in dirs)))
    return out
