"""The host pseudo-image's layer: one version per state of the host's /etc files, made beside
the others and renamed into place, never over a directory in use, and never failing a start
while an earlier version exists; a copy that /etc changes under neither crashes nor follows a
link; gc removes build leftovers and the versions no container uses, and only those."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.cgroups.none import NullManager
from sandbox_kernel.cli import image as image_cli
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, leftovers
from sandbox_kernel.runtime.rundir import proc_starttime, write_json


def test_a_version_per_state_of_etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v1")
    first = hostimage.layer_dir(tmp_path)
    assert (first / ".stamp").read_text() == "v1" and (first / "etc").is_dir()
    assert hostimage.layer_dir(tmp_path) == first  # unchanged /etc: the same layer
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v2")  # e.g. a user was added
    second = hostimage.layer_dir(tmp_path)
    assert second != first and first.is_dir(), "the old version stays for running containers"
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_failed_rebuild_falls_back_to_the_last_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v1")
    first = hostimage.layer_dir(tmp_path)

    def changing_etc(dst: Path) -> None:  # dpkg rewrote /etc/alternatives during the copy
        raise shutil.Error([("/etc/alternatives/x", str(dst), "No such file or directory")])

    monkeypatch.setattr(hostimage, "_copy_etc", changing_etc)
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v2")
    assert hostimage.layer_dir(tmp_path) == first
    leftovers = [p.name for p in (tmp_path / "host-layers").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no half-built layer is left behind"


def test_no_version_at_all_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hostimage, "_copy_etc", broken)
    with pytest.raises(SandboxError, match="cannot make the host image layer"):
        hostimage.layer_dir(tmp_path)


def test_collect_keeps_the_newest_and_those_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = []
    for v in ("v1", "v2", "v3"):
        monkeypatch.setattr(hostimage, "_stamp", lambda v=v: v)
        made.append(hostimage.layer_dir(tmp_path))
    legacy = tmp_path / "host-layer"
    legacy.mkdir()
    # v1 is in use, v3 is current, the 0.1 layer may be in use (unknown)
    for p in made:
        _age(p / ".stamp", hostimage.USE_GRACE_S + 5)  # none handed out lately
    removed = hostimage.collect({str(made[0])}, unknown=True, base=tmp_path)
    assert removed == [made[1].name]
    assert made[0].is_dir() and made[2].is_dir() and legacy.is_dir()
    removed = hostimage.collect(set(), unknown=False, base=tmp_path)
    assert set(removed) == {made[0].name, "host-layer"}
    assert made[2].is_dir() and not made[0].exists() and not legacy.exists()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_etc(root: Path) -> Path:
    etc = root / "etc"
    (etc / "alternatives").mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "alternatives" / "editor").symlink_to("/usr/bin/vi")
    (etc / "alternatives" / "README").write_text("alternatives\n")
    (etc / "ld.so.conf.d").mkdir()
    (etc / "ld.so.conf.d" / "libc.conf").write_text("/usr/local/lib\n")
    os.mkfifo(etc / "services")  # a FIFO where a file was expected: skipped, never opened
    (etc / "shadow").write_text("secret")  # not on the allowlist
    return etc


def test_copy_keeps_links_as_links_and_skips_what_is_not_allowed(tmp_path: Path) -> None:
    etc = _fake_etc(tmp_path)
    os.chmod(etc / "passwd", 0o600)
    dst = tmp_path / "layer-etc"
    dst.mkdir()
    hostimage._copy_etc(dst, str(etc))
    assert (dst / "passwd").read_text() == (etc / "passwd").read_text()
    assert (dst / "passwd").stat().st_mode & 0o777 == 0o644
    assert (dst / "ld.so.conf.d").stat().st_mode & 0o777 == 0o755
    assert os.readlink(dst / "alternatives" / "editor") == "/usr/bin/vi"
    assert not (dst / "services").exists() and not (dst / "shadow").exists()


class _RacyOs:
    """``os`` as ``hostimage`` sees it, where ``change`` runs right after the stat of
    ``name``: the host changing /etc between the copier's look and its open."""

    def __init__(self, name: str, change: Callable[[], None]) -> None:
        self.name, self.change, self.fired = name, change, False

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)

    def stat(self, path: Any, **kw: Any) -> os.stat_result:
        st = os.stat(path, **kw)
        if path == self.name and not self.fired:
            self.fired = True
            self.change()
        return st


def _to_file(p: Path) -> None:
    shutil.rmtree(p)
    p.write_text("now a file")


def _to_link(p: Path) -> None:
    shutil.rmtree(p)
    p.symlink_to(p.parent.parent / "outside")


def _to_fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("passwd", lambda p: p.unlink()),  # a file vanishes
        ("editor", lambda p: p.unlink()),  # a link vanishes (update-alternatives)
        ("alternatives", _to_file),  # a directory replaced by a file
        ("alternatives", _to_link),  # a directory replaced by a link out of /etc
        ("alternatives", shutil.rmtree),  # a directory vanishes
        ("group", _to_fifo),  # a file replaced by a FIFO: never blocks
    ],
)
def test_etc_changing_mid_copy_is_skipped_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, change: Callable[[Path], Any]
) -> None:
    etc = _fake_etc(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "host-secret").write_text("never copied")
    where = {"editor": etc / "alternatives" / "editor"}.get(name, etc / name)
    racy = _RacyOs(name, lambda: change(where))
    monkeypatch.setattr(hostimage, "os", racy)
    dst = tmp_path / "layer-etc"
    dst.mkdir()
    hostimage._copy_etc(dst, str(etc))
    assert racy.fired
    assert not list(dst.rglob("host-secret")), "a link planted mid-copy is not followed"
    assert (dst / "ld.so.conf.d" / "libc.conf").is_file(), "the rest is copied"
    assert not (dst / name).exists() or name == "editor"


def test_etc_changing_during_the_build_is_copied_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamps = iter(["v1", "v2", "v2", "v2", "v2"])  # v1 at the start, v2 once copied
    monkeypatch.setattr(hostimage, "_stamp", lambda: next(stamps))
    layer = hostimage.layer_dir(tmp_path)
    assert (layer / ".stamp").read_text() == "v2"
    assert [p.name for p in layer.parent.iterdir()] == [layer.name], "no other version, no tmp"


def test_an_unwritable_store_uses_the_layer_of_version_0_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = tmp_path / "host-layer"  # made by version 0.1, say, in a store seen read-only
    (legacy / "etc").mkdir(parents=True)
    (legacy / ".stamp").write_text("old")

    def read_only(dst: Path, etc: str = "/etc") -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(hostimage, "_copy_etc", read_only)
    with caplog.at_level(logging.WARNING, logger=hostimage.__name__):
        assert hostimage.layer_dir(tmp_path) == legacy
    assert "could not be refreshed" in caplog.text and "Read-only" in caplog.text


def _run_root_using(root: Path, layer: Path, pid: int) -> Path:
    rdir = root / new_container_id()
    rdir.mkdir(parents=True)
    write_json(
        rdir / "meta.json",
        {"owner_pid": pid, "owner_start": proc_starttime(pid), "layers": [str(layer)]},
    )
    return rdir


def test_a_version_stays_while_a_container_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, runs = tmp_path / "state", tmp_path / "run"
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v1")
    old = hostimage.layer_dir()
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v2")  # a user was added on the host
    current = hostimage.layer_dir()
    assert leftovers.collect_host_layers(runs) == [], "just handed out: kept"
    _age(old / ".stamp", hostimage.USE_GRACE_S + 5)
    rdir = _run_root_using(runs, old, os.getpid())
    assert leftovers.collect_host_layers(runs) == [], "a live container's lower layer"
    assert (old / "etc").is_dir()
    write_json(rdir / "meta.json", {"owner_pid": _dead_pid(), "layers": [str(old)]})
    assert leftovers.collect_host_layers(runs) == [old.name]
    assert not old.exists() and (current / ".stamp").is_file()


def test_gc_removes_stale_build_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, runs = tmp_path / "state", tmp_path / "run"
    runs.mkdir()
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(runs))
    monkeypatch.setattr(hostimage, "_stamp", lambda: "v1")
    hostimage.layer_dir()
    dead = _dead_pid()
    stale = [
        state / "host-layers" / f".tmp-{dead}-0a1b2c3d",  # a crashed build
        state / f"host-layer.tmp{dead}",  # version 0.1's
        state / "host-layer.old77",  # 0.1's replaced layer, no container left to use it
    ]
    building = state / "host-layers" / f".tmp-{os.getpid()}-01234567"  # a build under way
    for p in (*stale, building):
        (p / "etc" / "alternatives").mkdir(parents=True)
    report = leftovers.collect_leftovers(root=runs, manager=NullManager("test"))
    assert sorted(report.host_layers) == sorted(p.name for p in stale)
    assert not any(p.exists() for p in stale) and building.is_dir()
    _age(building, 7200)  # its pid reused long after: gone too, by image gc this time
    image_cli.cmd_gc(argparse.Namespace(grace=300.0))
    assert not building.exists()
    assert [p.name for p in (state / "host-layers").iterdir()] == [hostimage.layer_dir().name]
