"""Whose containers root's ps, stats and gc see: other users' run roots, read as untrusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandbox_kernel import paths
from sandbox_kernel.runtime import owners
from sandbox_kernel.runtime.rundir import (
    MAX_RUN_FILE,
    ContainerInfo,
    container_dirs,
    read_json,
    read_small,
)

CID = "sk-0123456789ab"


def test_read_small_refuses_symlinks_big_files_and_fifos(tmp_path: Path) -> None:
    good = tmp_path / "meta.json"
    good.write_text(json.dumps({"image": "python3"}))
    assert read_json(good) == {"image": "python3"}
    secret = tmp_path / "secret"
    secret.write_text('{"leak": true}')
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    assert read_small(link) is None and read_json(link) is None, "a planted link is not followed"
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_RUN_FILE + 1))
    assert read_small(big) is None, "no unbounded read"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_small(fifo) is None, "a FIFO neither blocks nor is read"
    assert read_small(tmp_path / "missing") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") is None


def test_container_dirs_are_real_directories_named_like_ids(tmp_path: Path) -> None:
    (tmp_path / CID).mkdir()
    (tmp_path / "sk-not-an-id").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "sk-ba9876543210").symlink_to(target)
    (tmp_path / "sk-aaaaaaaaaaaa").write_text("")
    assert container_dirs(tmp_path) == [tmp_path / CID]
    assert container_dirs(tmp_path / "missing") == []


def _fake_user_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A fake /tmp and /run/user for ``paths.user_run_roots``, seen as by uid 4242 (so that
    the caller's own dirs, uid != 4242, count as another user's)."""
    fake_tmp, fake_run = tmp_path / "tmp", tmp_path / "run-user"
    fake_tmp.mkdir()
    fake_run.mkdir()
    globs = [
        (str(fake_tmp), *paths._USER_ROOT_GLOBS[0][1:]),
        (str(fake_run), *paths._USER_ROOT_GLOBS[1][1:]),
    ]
    monkeypatch.setattr(paths, "_USER_ROOT_GLOBS", tuple(globs))
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    return fake_tmp, fake_run


def test_user_run_roots_only_what_that_user_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = os.getuid()  # the real owner of what this test makes
    fake_tmp, fake_run = _fake_user_roots(tmp_path, monkeypatch)
    good = fake_tmp / f"sk-{me}"
    good.mkdir(mode=0o700)
    xdg = fake_run / str(me) / "sandbox-kernel"
    xdg.mkdir(parents=True, mode=0o700)
    xdg.chmod(0o700)
    # someone else's uid in the name: not the owner of the directory
    (fake_tmp / f"sk-{me + 1}").mkdir(mode=0o700)
    # a symlink to a directory of the right owner
    (fake_tmp / f"sk-{me}0").symlink_to(good)
    (fake_tmp / "sk-abc").mkdir(mode=0o700)  # not a uid
    assert paths.user_run_roots() == [(me, good), (me, xdg)]
    good.chmod(0o755)  # open to others: not what that user's server makes
    assert paths.user_run_roots() == [(me, xdg)]


def test_opened_rechecks_the_owner_and_never_follows_a_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = os.getuid()
    real = tmp_path / f"sk-{me}"
    real.mkdir(mode=0o700)
    (real / CID).mkdir()
    (real / CID / "meta.json").write_text(json.dumps({"image": "python3"}))
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    root = owners.RunRoot(me, real)
    assert not root.own
    seen = [(r.uid, info.id, info.meta) for r, info in owners.containers([root])]
    assert seen == [(me, CID, {"image": "python3"})]
    # renamed away and replaced by a symlink to another directory: not followed
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "sk-ffffffffffff").mkdir()
    real.rename(tmp_path / "moved")
    real.symlink_to(other)
    assert list(owners.containers([root])) == []
    # a directory of another owner: not taken
    with owners.opened(owners.RunRoot(me + 1, other)) as base:
        assert base is None
    # the path stays the directory checked while the block runs, whatever is renamed
    real.unlink()
    moved = tmp_path / "moved"
    moved.rename(real)
    with owners.opened(root) as base:
        assert base is not None
        real.rename(tmp_path / "moved-again")
        assert [p.name for p in container_dirs(base)] == [CID]
        assert ContainerInfo(base / CID).meta == {"image": "python3"}
