"""Finding the cgroup delegated to an unprivileged server, on a fake cgroup tree."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox_kernel.cgroups import detect
from sandbox_kernel.cgroups.delegation import (
    SERVER_LEAF,
    enter_leaf,
    kernels_cgroup,
    v1_parent,
    v2_delegated,
    v2_recorded_parent,
)

V1_MOUNTS = "".join(
    f"cgroup /sys/fs/cgroup/{c} cgroup rw,nosuid,{c} 0 0\n" for c in ("memory", "cpu", "pids")
)


def test_v1_parent_is_the_kernels_cgroup_of_the_delegation(tmp_path: Path) -> None:
    uid = os.geteuid()
    layout = detect(root=str(tmp_path), mounts_text=V1_MOUNTS, cgroup_text="1:memory:/\n")
    assert v1_parent(layout, uid) is None  # nothing delegated yet
    for c in ("memory", "cpu"):
        (tmp_path / f"sys/fs/cgroup/{c}/sandbox-kernel/user-{uid}/kernels").mkdir(parents=True)
    assert v1_parent(layout, uid) is None, "the pids hierarchy has no delegation"
    (tmp_path / f"sys/fs/cgroup/pids/sandbox-kernel/user-{uid}/kernels").mkdir(parents=True)
    assert v1_parent(layout, uid) == kernels_cgroup(uid) == f"/sandbox-kernel/user-{uid}/kernels"
    assert v1_parent(layout, uid + 1) is None  # another user's


def _v2_tree(tmp_path: Path, own: str) -> Path:
    d = tmp_path / "sys/fs/cgroup" / own.strip("/")
    d.mkdir(parents=True)
    p = tmp_path / "sys/fs/cgroup"
    for part in own.strip("/").split("/"):
        p = p / part
        for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.controllers"):
            (p / f).write_text("")
    return d


def test_v2_delegated_is_the_topmost_owned_ancestor(tmp_path: Path) -> None:
    own = "/user.slice/app.slice/jupyter.scope"
    _v2_tree(tmp_path, own)
    layout = detect(
        root=str(tmp_path),
        mounts_text="cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
        cgroup_text=f"0::{own}\n",
    )
    found = v2_delegated(layout, os.geteuid())
    assert found == str(tmp_path / "sys/fs/cgroup/user.slice")
    assert v2_delegated(layout, os.geteuid() + 1) is None
    if os.geteuid() == 0:  # the part above the delegation belongs to someone else
        os.chown(tmp_path / "sys/fs/cgroup/user.slice", 65534, 65534)
        found = v2_delegated(layout, 0)
        assert found == str(tmp_path / "sys/fs/cgroup/user.slice/app.slice")


def test_enter_leaf_moves_the_processes_into_a_leaf(tmp_path: Path) -> None:
    d = _v2_tree(tmp_path, "/svc.scope")
    (d / "cgroup.procs").write_text("123\n456\n")
    leaf = d / SERVER_LEAF
    leaf.mkdir()  # cgroupfs gives a new cgroup its files; a fake tree needs them made
    (leaf / "cgroup.procs").write_text("")
    enter_leaf(str(d))
    assert (leaf / "cgroup.procs").read_text() == "456"  # each pid written (the last stays)
    (d / "cgroup.procs").write_text("")
    enter_leaf(str(d))  # nothing to move: no error, nothing written


def test_v2_recorded_parent_only_inside_the_users_delegation(tmp_path: Path) -> None:
    """Root's ps and gc take another user's recorded v2 parent only when it is a plain
    directory of the cgroup2 mount delegated to that user."""
    own = "/user.slice/jupyter.scope"
    d = _v2_tree(tmp_path, own)
    layout = detect(
        root=str(tmp_path),
        mounts_text="cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
        cgroup_text=f"0::{own}\n",
    )
    me = os.geteuid()
    assert v2_recorded_parent(layout, str(d), me) == str(d)
    assert v2_recorded_parent(layout, str(d), me + 1) is None, "not that user's"
    mount = tmp_path / "sys/fs/cgroup"
    for bad in (
        None,
        42,
        str(mount),  # the mount itself
        str(d) + "/../jupyter.scope",  # not normalised
        str(tmp_path / "elsewhere"),  # outside the mount
        str(d / "missing"),
        "x" * 5000,
    ):
        assert v2_recorded_parent(layout, bad, me) is None, bad
    esc = mount / "a\x1b[2Jb.scope"  # it would reach root's terminal in gc's messages
    esc.mkdir()
    for f in ("cgroup.procs", "cgroup.subtree_control"):
        (esc / f).write_text("")
    assert v2_recorded_parent(layout, str(esc), me) is None
    link = mount / "link.scope"
    link.symlink_to(d)
    assert v2_recorded_parent(layout, str(link), me) is None, "a symlink on the way"
    if me == 0:
        os.chown(d / "cgroup.procs", 65534, 65534)
        assert v2_recorded_parent(layout, str(d), 0) is None, "cgroup.procs not delegated"
