"""Find and remove what crashed containers left behind.

A container's host resources are all named from its id: the run dir ``<run_root>/<id>``
and the cgroup(s) ``<parent>/<id>``. A run dir is *live* while its executor runs, or,
before the executor started, while the process that created it runs. Anything else
named like a container id is a leftover: its processes are killed, its cgroups and
run dir removed. Mounts never need collecting: they only ever exist inside the
container's own mount namespace.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import get_manager
from .cgroups.base import CgroupManager
from .errors import SandboxError
from .paths import is_container_id, run_dir

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    run_dirs: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


CREATION_GRACE_S = 30.0


def _being_created(entry: Path) -> bool:
    """A run dir without metadata yet is being created right now by another process."""
    try:
        return (
            not (entry / "meta.json").exists()
            and time.time() - entry.stat().st_mtime < CREATION_GRACE_S
        )
    except OSError:
        return False


def live_ids(root: Path) -> set[str]:
    from .container import ContainerInfo

    live: set[str] = set()
    if not root.is_dir():
        return live
    for entry in root.iterdir():
        if is_container_id(entry.name) and entry.is_dir() and not entry.is_symlink():
            info = ContainerInfo(entry)
            if info.running() or info.owner_alive() or _being_created(entry):
                live.add(entry.name)
    return live


def collect(
    *, root: Path | None = None, manager: CgroupManager | None = None, dry_run: bool = False
) -> GcReport:
    """Remove leftovers of dead containers. Safe to run at any time, from any process."""
    root = root or run_dir()
    report = GcReport()
    live = live_ids(root)
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if is_container_id(entry.name) and entry.name not in live and not entry.is_symlink():
                report.run_dirs.append(entry.name)
    try:
        manager = manager or get_manager()
        leftovers = [
            n for n in manager.list_leftovers("sk-") if is_container_id(n) and n not in live
        ]
    except SandboxError as exc:
        report.errors.append(str(exc))
        leftovers = []
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
        shutil.rmtree(root / name, ignore_errors=True)
    if report.run_dirs or report.cgroups:
        log.info("gc removed run dirs %s, cgroups %s", report.run_dirs, report.cgroups)
    return report
