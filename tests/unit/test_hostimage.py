"""The host pseudo-image's layer: one version per state of the host's /etc files, made beside
the others and renamed into place, never over a directory in use, and never failing a start
while an earlier version exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sandbox_kernel.errors import SandboxError
from sandbox_kernel.runtime import hostimage


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
    removed = hostimage.collect({str(made[0])}, unknown=True, base=tmp_path)
    assert removed == [made[1].name]
    assert made[0].is_dir() and made[2].is_dir() and legacy.is_dir()
    removed = hostimage.collect(set(), unknown=False, base=tmp_path)
    assert set(removed) == {made[0].name, "host-layer"}
    assert made[2].is_dir() and not made[0].exists() and not legacy.exists()
