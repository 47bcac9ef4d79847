"""Why a kernel died, judged for this death, and kept across its restarts.

Layer: Jupyter. A cgroup's cap-hit counters (memory.events oom_kill, pids.events max) only
ever grow, so a counter above zero says a cap was hit at some time in the container's life,
not that it caused this death. The provisioner judges each death with ``verdict``: a cap is
blamed only when its counter rose after the kernel was last seen to survive (``CapBaseline``:
taken at each start, restarts included, and moved on while the kernel is seen alive), and a
death the server asked for (a shutdown or restart, a signal it sent) is reported as that,
never as a cap.

The provisioner records each death that was not asked for (or that a cap caused) with
``record`` in ``<run root>/kernels/<kernel id>/``; the restarted kernel's ``%sandbox`` magics
get the same data through the control socket (``previous_exit``, which the provisioner keeps
in memory); the file is for whoever looks after the process (``read_last_exit``: tests, an
operator); ``forget`` removes it when the kernel is shut down for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..cgroups.base import CgroupStats
from ..paths import run_dir
from ..runtime.container import ExitResult
from ..runtime.rundir import write_json

#: A cap hit the kernel was seen alive this long after is one it survived: not blamed for a
#: later death. (Longer than a process killed by the OOM killer takes to be reaped.)
SURVIVED_S = 1.0


@dataclass(frozen=True)
class CapCounts:
    """One reading of a container's cap-hit counters."""

    oom_kills: int = 0
    pids_limit_hits: int = 0

    @classmethod
    def of(cls, stats: CgroupStats) -> CapCounts:
        """The counters of one ``Container.stats`` reading."""
        return cls(stats.oom_kills, stats.pids_limit_hits)


class CapBaseline:
    """The counters a death of one kernel process is compared with. Made by the provisioner
    at each start (restarts included) from the new container's counters; ``alive`` is called
    at each of its polls that found the kernel running."""

    def __init__(self, counts: CapCounts, now: float) -> None:
        self.counts = counts
        self._pending = (now, counts)

    def due(self, now: float) -> bool:
        """Would ``alive`` at ``now`` move the baseline on? (The caller reads the counters
        only then.)"""
        return now - self._pending[0] >= SURVIVED_S

    def alive(self, counts: CapCounts, now: float) -> None:
        """The kernel was seen running at ``now``, and the counters read ``counts`` after:
        a reading taken at least ``SURVIVED_S`` before ``now`` becomes the baseline (its
        hits were survived), and this one waits its turn."""
        if self.due(now):
            self.counts = self._pending[1]
            self._pending = (now, counts)


def verdict(
    result: ExitResult,
    since: CapCounts,
    *,
    stop: str | None = None,
    sent: frozenset[int] = frozenset(),
) -> ExitResult:
    """``result`` as the provisioner reports this death (its ``reason()`` is the line users
    see). ``since``: the baseline's counters; ``stop``: what the server asked for, when it
    asked this kernel to stop (e.g. "restart requested"); ``sent``: the signals the server
    sent this kernel process (an interrupt's SIGINT, a user's signal). A death asked for, or
    by a signal the server sent, names that and blames no cap; otherwise a cap is blamed
    only when its counter rose past ``since``. Called by the provisioner's ``_record_exit``."""
    asked = stop or ("sent by the server" if result.signal in sent else None)
    if asked:
        return replace(result, oom_killed=False, pids_limit_hit=False, asked=asked)
    return replace(
        result,
        oom_killed=(result.oom_kills or 0) > since.oom_kills,
        pids_limit_hit=(result.pids_limit_hits or 0) > since.pids_limit_hits,
    )


#: The most kept kernel entries one ``collect_orphans`` looks at.
MAX_ORPHANS = 4096


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


def collect_orphans(dry_run: bool = False, root: Path | None = None) -> list[str]:
    """Drop what is kept of kernels whose container is gone (its run dir removed): a server
    killed before its ``cleanup`` could ``forget`` them. Returns the kernel ids (at most
    ``MAX_ORPHANS`` looked at). A restart between its cleanup and its next start may lose
    its file this way; the provisioner keeps the same reason in memory. Called by
    ``sandbox-kernel gc`` after the run dirs were collected."""
    base = kernels_dir(root)
    runs = root or run_dir()
    try:
        entries = sorted(base.iterdir())[:MAX_ORPHANS]
    except OSError:
        return []
    gone: list[str] = []
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        data = read_last_exit(entry.name, root)
        cid = data.get("container_id") if data else None
        if isinstance(cid, str) and cid and "/" not in cid and (runs / cid).exists():
            continue
        gone.append(entry.name)
        if not dry_run:
            shutil.rmtree(entry, ignore_errors=True)
    return gone


#: A process end watched on an event loop: the loop and the pidfd it reads.
EndWatch = tuple[asyncio.AbstractEventLoop, int]


def watch_end(pid: int, ended: Callable[[], None]) -> EndWatch | None:
    """Call ``ended`` once, on the running event loop, the moment process ``pid`` ends (a
    pidfd read: no thread per process); None where that cannot be (no pidfd, no running
    loop): the caller's own polling then notices. Called by the provisioner for its kernel
    and by the pool for each idle member; ``unwatch_end`` stops it and closes the pidfd
    (after the call too)."""
    try:
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(pid)
    except (OSError, RuntimeError, AttributeError):
        return None

    def fire() -> None:
        # an ended process's pidfd stays readable: read it once
        loop.remove_reader(fd)
        ended()

    try:
        loop.add_reader(fd, fire)
    except (OSError, RuntimeError, NotImplementedError):
        os.close(fd)
        return None
    return loop, fd


def unwatch_end(watch: EndWatch | None) -> None:
    """Stop a ``watch_end`` (None: nothing; tolerant of a closed loop)."""
    if watch is None:
        return
    loop, fd = watch
    with contextlib.suppress(Exception):
        loop.remove_reader(fd)
    os.close(fd)
