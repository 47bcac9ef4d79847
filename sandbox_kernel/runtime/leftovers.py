"""Find and remove what crashed containers left behind (``sandbox-kernel gc``).

Layer: runtime (OS side). Called by ``sandbox-kernel gc``, before every
``Container.create``, and by the provisioner's cleanup of a kernel it re-attached to.

A container's host resources are all named from its id: the run dir ``<run_root>/<id>``
and the cgroup(s) ``<parent>/<id>``. A run dir is *live* while its executor runs, or,
before the executor started, while the process that created it runs. Anything else
named like a container id is a leftover: its processes are killed, its cgroups and
run dir removed. Mounts never need collecting: they only ever exist inside the
container's own mount namespace.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import network
from ..cgroups import get_manager
from ..cgroups.base import CgroupManager
from ..errors import PrivilegeError, SandboxError
from ..paths import is_container_id, run_dir
from . import hostimage
from .owners import RunRoot, cgroup_manager, containers, opened, run_roots
from .rundir import ContainerInfo, container_dirs, proc_starttime, remove_tree

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What one ``collect_leftovers`` found (and removed, unless a dry run): run dir and
    cgroup names, and one line per error. ``sandbox-kernel gc`` prints it."""

    run_dirs: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    host_layers: list[str] = field(default_factory=list)  # old host image layer versions
    network: list[str] = field(default_factory=list)  # nat leases, links, rules removed


#: How long a run dir without readable metadata counts as being created (seconds).
CREATION_GRACE_S = 30.0


def _young(entry: Path) -> bool:
    """Was the run dir ``entry`` changed less than ``CREATION_GRACE_S`` ago? Writing its
    ``meta.json`` (a rename into it) changes it too."""
    try:
        return time.time() - entry.stat().st_mtime < CREATION_GRACE_S
    except OSError:
        return False


def _entry_live(entry: Path) -> bool:
    """Is the run dir ``entry`` live? One without readable metadata is judged by its age
    alone, never by whether ``meta.json`` exists by the time it is looked at: its creator
    may write it between the read and that look (two kernels starting at once, each one's
    gc seeing the other's run dir), and the run dir, fresh, stays live."""
    info = ContainerInfo(entry)
    if not info.meta:
        return _young(entry)
    return info.running() or info.owner_alive()


def live_ids(root: Path) -> set[str]:
    """Ids of the run dirs under ``root`` that are live (see the module docstring); their
    cgroups are never collected. Called by ``collect_leftovers``."""
    return {e.name for e in container_dirs(root) if _entry_live(e)}


def collect_host_layers(root: Path | None = None) -> list[str]:
    """Remove the host image layer versions and build leftovers no live container of the run
    root ``root`` (default ``paths.run_dir()``) uses (their run dirs record their layers);
    returns their names. Called by ``collect_leftovers`` and by ``sandbox-kernel image gc``."""
    root = root or run_dir()
    in_use: set[str] = set()
    unknown = False
    for entry in container_dirs(root):
        if _entry_live(entry):
            layers = ContainerInfo(entry).meta.get("layers")
            if isinstance(layers, list):
                in_use.update(str(x) for x in layers)
            else:
                unknown = True
    return hostimage.collect(in_use, unknown)


def collect_leftovers(
    *, root: Path | None = None, manager: CgroupManager | None = None, dry_run: bool = False
) -> GcReport:
    """Remove leftovers of dead containers. Safe to run at any time, from any process.
    ``dry_run``: only report. Cgroup errors are reported, not raised."""
    root = root or run_dir()
    report = GcReport()
    # Order matters: a container's run dir is created before its cgroups, so listing the
    # cgroups FIRST and the live run dirs second never mistakes a container being created
    # right now (by another process) for a leftover.
    try:
        manager = manager or get_manager()
        candidates = [n for n in manager.list_leftovers("sk-") if is_container_id(n)]
    except PrivilegeError:
        candidates = []  # rootless without a delegated cgroup: no cgroup was ever made
    except SandboxError as exc:
        report.errors.append(str(exc))
        candidates = []
    live = live_ids(root)
    # each run dir's liveness is judged as it is listed (one created meanwhile is live)
    report.run_dirs.extend(e.name for e in container_dirs(root) if not _entry_live(e))
    leftovers = [n for n in candidates if n not in live]
    report.cgroups.extend(leftovers)
    if dry_run:
        return report
    for name in leftovers:
        try:
            assert manager is not None
            handle = manager.open(name)
            handle.kill()
            handle.remove()
        except SandboxError as exc:
            report.errors.append(f"cgroup {name}: {exc}")
    for name in report.run_dirs:
        report.network += _collect_stack(root / name)
        shutil.rmtree(root / name, ignore_errors=True)
    report.host_layers = collect_host_layers(root)
    if network.anything_there():
        from ..network import nat

        try:
            report.network += nat.collect(lambda pid, start: proc_starttime(pid) == start)
        except SandboxError as exc:
            report.errors.append(f"network: {exc}")
    if report.run_dirs or report.cgroups:
        log.info("gc removed run dirs %s, cgroups %s", report.run_dirs, report.cgroups)
    return report


def _collect_stack(run_dir: Path, uid: int | None = None) -> list[str]:
    """The rootless ``nat`` user-mode stack a dead container's run dir names, killed
    (``network.usermode.collect_run_dir``; only a process of ``uid``, default this
    process's own); nothing to do without its pid file."""
    from ..network.usermode import PID_FILE, collect_run_dir

    if not (run_dir / PID_FILE).exists():
        return []
    return collect_run_dir(
        run_dir,
        lambda pid, start: proc_starttime(pid) == start,
        os.getuid() if uid is None else uid,
    )


def collect_other_users(*, dry_run: bool = False, uid: int | None = None) -> GcReport:
    """As root: remove the leftovers of dead containers of other users' servers (their run
    roots from ``owners.run_roots``; their cgroups only inside each user's delegation, see
    ``cgroups.manager_for_user``); ``uid``: only that user's. Names in the report carry the
    uid. Called by ``sandbox-kernel gc`` run as root, after ``collect_leftovers``, and by the
    JupyterHub ``post_stop_hook`` for the user whose server stopped."""
    report = GcReport()
    for root in run_roots():
        if not root.own and (uid is None or root.uid == uid):
            _collect_user(root, report, dry_run)
    return report


def orphans_ending(uid: int) -> int:
    """As root: how many of user ``uid``'s containers still run although the process that
    made them is gone (their executors are taking them down: an executor ends its container
    when its owner dies). Called by the hub's post-stop hook, which waits for them to end
    before it collects."""
    count = 0
    for root in run_roots():
        if not root.own and root.uid == uid:
            count += sum(
                1
                for _owner, info in containers([root])
                if info.running() and not info.owner_alive()
            )
    return count


def _collect_user(root: RunRoot, report: GcReport, dry_run: bool) -> None:
    # Only what a dead run dir names: a cgroup without a run dir here may belong to a live
    # container of a run root root cannot see (SANDBOX_KERNEL_RUN_DIR); that user's own gc,
    # before each new container, takes it. Everything here is that user's to plant.
    tag = f" (uid {root.uid})"
    dead: list[str] = []
    for owner, info in containers([root]):
        if _entry_live(info.path):
            continue
        manager = cgroup_manager(owner, info)
        handle = None
        if manager is not None:
            try:
                handle = manager.open(info.id)
            except SandboxError:
                handle = None  # no cgroup left
        dead.append(info.id)
        report.run_dirs.append(info.id + tag)
        if not dry_run:
            report.network += [f"{x}{tag}" for x in _collect_stack(info.path, root.uid)]
        if handle is None:
            continue
        report.cgroups.append(info.id + tag)
        if dry_run:
            continue
        try:
            handle.kill()
            handle.remove()
        except (SandboxError, OSError, RecursionError) as exc:
            report.errors.append(f"cgroup {info.id}{tag}: {exc}")
    if not dry_run and dead:
        _remove_run_dirs(root, dead, report)


def _remove_run_dirs(root: RunRoot, names: list[str], report: GcReport) -> None:
    """Remove another user's dead run dirs ``names`` (``rundir.remove_tree``: no link
    followed, nothing blocks); failures become report lines."""
    tag = f" (uid {root.uid})"
    with opened(root) as base:
        if base is None:
            return
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in names:
                try:
                    remove_tree(fd, name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    report.errors.append(f"run dir {name}{tag}: {exc}")
        finally:
            os.close(fd)
    log.info("gc removed the leftovers of containers %s of uid %d", names, root.uid)
