"""gc's judgement of run dirs (``runtime.leftovers``): what is being created or still owned
stays, whatever another process does at the same instant; what is dead goes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandbox_kernel.cgroups.none import NullManager
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, leftovers
from sandbox_kernel.runtime.rundir import ContainerInfo, proc_starttime, write_json


@pytest.fixture(autouse=True)
def _no_host_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """These run roots are test folders: the host image layers are never looked at."""
    monkeypatch.setattr(hostimage, "collect", lambda in_use, unknown: [])


def _gc(root: Path) -> leftovers.GcReport:
    return leftovers.collect_leftovers(root=root, manager=NullManager("test"))


def _owned_meta(path: Path, pid: int | None = None) -> None:
    pid = pid or os.getpid()
    write_json(path / "meta.json", {"owner_pid": pid, "owner_start": proc_starttime(pid)})


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("late_at", [1, 2])
def test_metadata_written_while_gc_looks_keeps_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late_at: int
) -> None:
    """The race of two kernels starting at once: gc reads a new run dir before its creator
    wrote meta.json, and the creator writes it before gc looks again (at gc's first look
    at the run dir, or at its second)."""
    rdir = tmp_path / new_container_id()
    rdir.mkdir()
    (rdir / "conn").mkdir()
    looks = []

    class LateMeta(ContainerInfo):
        def __init__(self, path: Path, container_id: str | None = None) -> None:
            super().__init__(path, container_id)
            if path == rdir:
                looks.append(path)
                if len(looks) == late_at:
                    _owned_meta(rdir)  # the creator, right after gc's read

    monkeypatch.setattr(leftovers, "ContainerInfo", LateMeta)
    report = _gc(tmp_path)
    assert len(looks) >= late_at
    assert report.run_dirs == []
    assert (rdir / "conn").is_dir()


def test_run_dirs_of_live_owners_stay_and_dead_ones_go(tmp_path: Path) -> None:
    owned = tmp_path / new_container_id()
    owned.mkdir()
    _owned_meta(owned)
    _age(owned, 3600)
    orphan = tmp_path / new_container_id()
    orphan.mkdir()
    _owned_meta(orphan, _dead_pid())
    reused = tmp_path / new_container_id()  # our pid, another process's start time
    reused.mkdir()
    write_json(reused / "meta.json", {"owner_pid": os.getpid(), "owner_start": "1"})
    fresh = tmp_path / new_container_id()  # no metadata yet: being created
    fresh.mkdir()
    stale = tmp_path / new_container_id()  # no metadata, long ago: its creator crashed
    stale.mkdir()
    _age(stale, leftovers.CREATION_GRACE_S + 5)
    junk = tmp_path / new_container_id()  # unreadable metadata, long ago
    junk.mkdir()
    (junk / "meta.json").write_text("{not json")
    _age(junk, leftovers.CREATION_GRACE_S + 5)
    report = _gc(tmp_path)
    assert sorted(report.run_dirs) == sorted(p.name for p in (orphan, reused, stale, junk))
    assert owned.is_dir() and fresh.is_dir()
    assert not any(p.exists() for p in (orphan, reused, stale, junk))
    assert _gc(tmp_path).run_dirs == [], "a second gc finds nothing more"


def test_concurrent_creations_and_collections_lose_no_run_dir(tmp_path: Path) -> None:
    """Creators make run dirs the way ``Container.create`` does (folder, subfolder, then
    metadata, then a file in the subfolder) while collectors run gc in a loop: no
    creator ever finds its run dir gone."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def create() -> None:
        try:
            for _ in range(150):
                rdir = tmp_path / new_container_id()
                rdir.mkdir()
                (rdir / "conn").mkdir()
                _owned_meta(rdir)
                (rdir / "conn" / "kernel.json").write_text("{}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def collect() -> None:
        try:
            for _ in range(5000):
                if stop.is_set():
                    return
                _gc(tmp_path)
        except BaseException as exc:
            errors.append(exc)

    threads: list[threading.Thread] = [threading.Thread(target=create) for _ in range(3)]
    collectors = [threading.Thread(target=collect) for _ in range(2)]
    for t in threads + collectors:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    for t in collectors:
        t.join(timeout=120)
    assert errors == []
    assert len(list(tmp_path.iterdir())) == 450
