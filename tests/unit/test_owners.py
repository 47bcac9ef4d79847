"""Whose containers root's ps, stats and gc see: other users' run roots, read as untrusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sandbox_kernel import paths
from sandbox_kernel.cli import ps
from sandbox_kernel.runtime import owners
from sandbox_kernel.runtime.rundir import (
    MAX_RUN_FILE,
    ContainerInfo,
    container_dirs,
    read_json,
    read_small,
    remove_tree,
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
    (tmp_path / "deep.json").write_text("[" * 60000)
    assert read_json(tmp_path / "deep.json") is None, "too deep: no RecursionError"


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
    (fake_tmp / f"sk-00{me}").mkdir(mode=0o700)  # the same uid again, spelt otherwise
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


def test_remove_tree_never_follows_nor_blocks(tmp_path: Path) -> None:
    """Root removing another user's dead run dir: links inside are unlinked, not followed; a
    FIFO is unlinked, never opened; no recursion limit; a too deep tree stops with OSError."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    base = tmp_path / "root"
    victim = base / CID / "scratch" / "a"
    victim.mkdir(parents=True)
    (victim / "link").symlink_to(outside)
    (victim / "file").write_text("y")
    os.mkfifo(victim / "fifo")
    deep = base / CID / "deep"
    deep.mkdir()
    d = deep
    for _ in range(50):
        d = d / "d"
        d.mkdir()
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree(fd, CID)
        assert not (base / CID).exists()
        assert (outside / "keep").read_text() == "x", "nothing behind a link is touched"
        os.mkfifo(base / "sk-fifo")  # swapped in for a run dir: refused at once, not opened
        with pytest.raises(NotADirectoryError):
            remove_tree(fd, "sk-fifo")
        (base / "sk-link").symlink_to(outside)
        with pytest.raises(OSError):
            remove_tree(fd, "sk-link")
        assert (outside / "keep").exists()
        d = base / "too-deep"
        for _ in range(300):
            d = d / "d"
        d.mkdir(parents=True)
        with pytest.raises(OSError, match="deeper than"):
            remove_tree(fd, "too-deep")
    finally:
        os.close(fd)


def test_ps_survives_hostile_metadata(tmp_path: Path) -> None:
    """What another user plants in a run dir (huge or infinite numbers, wrong types, escape
    sequences) neither crashes ps nor reaches the terminal."""
    d = tmp_path / CID
    d.mkdir()
    meta = {
        "created": 10**400,
        "limits": {"memory": 10**400, "cpus": "lots", "pids": -5, "defer_cpu": "yes"},
        "user": 2**70,
        "image": "py\x1b[2J\x1b]0;pwned\x07",
        "kernelspec": ["not", "a", "string"],
    }
    (d / "meta.json").write_text(json.dumps(meta).replace("Infinity", "1e999"))
    (d / "pid").write_text(json.dumps({"pid": os.getpid(), "start": None}))
    rows = ps.collect(tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row["limits"] == {"memory": None, "cpus": None, "cpu_deferred": False, "pids": None}
    assert row["user"] is None and row["kernelspec"] is None
    assert row["image"] is not None and "\x1b" not in row["image"] and "\x07" not in row["image"]
    table = ps.format_table(rows)
    assert "\x1b" not in table and CID in table
    meta["created"] = float("-inf")
    (d / "meta.json").write_text(json.dumps(meta))  # -Infinity: Python's json reads it
    assert ps.format_table(ps.collect(tmp_path))
