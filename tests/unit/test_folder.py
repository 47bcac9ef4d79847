"""Can the kernel's user write its notebook folder: the decision and its texts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox_kernel.jupyter import folder

NOBODY = folder.NOBODY


@pytest.mark.parametrize(
    ("owner", "group", "mode", "uid", "gid", "expected"),
    [
        (1000, 1000, 0o755, 1000, 1000, True),  # the owner, with write and search
        (0, 0, 0o755, NOBODY, NOBODY, False),  # root's folder, the kernel nobody
        (0, 0, 0o777, NOBODY, NOBODY, True),  # ... open to everyone
        (0, 0, 0o1777, NOBODY, NOBODY, True),  # ... a sticky /tmp-like folder
        (0, 100, 0o775, 1000, 100, True),  # the group's bits for the group
        (0, 100, 0o755, 1000, 100, False),
        (1000, 1000, 0o577, 1000, 1000, False),  # the owner's bits count, not the others'
        (1000, 1000, 0o655, 1000, 1000, False),  # write without search is no use
        (2000, 100, 0o707, 1000, 100, False),  # the group's bits, not the others'
        (2000, 2000, 0o757, 1000, 1000, True),  # neither: the others' bits
        (1000, 1000, 0o000, 0, 0, True),  # root may
    ],
)
def test_may_write(owner: int, group: int, mode: int, uid: int, gid: int, expected: bool) -> None:
    assert folder.may_write(owner, group, stat.S_IFDIR | mode, uid, gid) is expected


def fake_stat(uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, gid, 4096, 0, 0, 0))


def test_a_root_owned_folder_and_a_nobody_kernel_say_the_fix() -> None:
    got = folder.check(
        "/srv/course",
        (NOBODY, NOBODY),
        NOBODY,
        readonly=False,
        stat_of=lambda p: fake_stat(0, 0, 0o755),
    )
    assert got.writable is False and not got.readonly_mount
    assert got.problem == (
        "the folder /srv/course belongs to root; kernels run as nobody (65534) there: "
        "chown it to the user, or set SandboxProvisioner.user"
    )


def test_other_owner_and_own_folder_without_write() -> None:
    other = folder.check(
        "/nb", (1000, 1000), 1000, readonly=False, stat_of=lambda p: fake_stat(1234, 1234, 0o755)
    )
    assert other.problem is not None and "belongs to uid 1234; kernels run as uid 1000" in (
        other.problem
    )
    own = folder.check(
        "/nb", (1000, 1000), 1000, readonly=False, stat_of=lambda p: fake_stat(1000, 1000, 0o555)
    )
    assert own.writable is False and own.problem is not None
    assert "mode 0555" in own.problem and "chmod u+wx" in own.problem


def test_the_ids_compared_are_the_given_ones_not_the_shown_uid() -> None:
    # a rootless kernel: uid 0 inside, the server's uid on the host (the folder's owner)
    got = folder.check(
        "/nb", (1000, 1000), 0, readonly=False, stat_of=lambda p: fake_stat(1000, 1000, 0o755)
    )
    assert got.writable is True and got.problem is None


def test_read_only_mount_and_unreadable_folder(tmp_path: Path) -> None:
    ro = folder.check(str(tmp_path), (NOBODY, NOBODY), NOBODY, readonly=True)
    assert ro.writable is False and ro.problem is None and ro.readonly_mount
    gone = folder.check(str(tmp_path / "gone"), (1000, 1000), 1000, readonly=False)
    assert gone.writable is None and gone.problem is None


def test_a_real_folder(tmp_path: Path) -> None:
    me = (os.geteuid(), os.getegid())
    tmp_path.chmod(0o755)
    assert folder.check(str(tmp_path), me, me[0], readonly=False).writable is True
    if me[0] != 0:
        tmp_path.chmod(0o555)
        try:
            assert folder.check(str(tmp_path), me, me[0], readonly=False).writable is False
        finally:
            tmp_path.chmod(0o755)
