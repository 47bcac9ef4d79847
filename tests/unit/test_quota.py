"""Notebook-folder quotas without a quota-capable filesystem: the structures handed to the
kernel, the tagging walk (links never followed, other types and filesystems left alone,
bounded), the refusals of an unprivileged server, the policy traits and the report row.
The real project quotas (ext4 on a loop file) are tests/privileged/test_folder_quota.py."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import quota
from sandbox_kernel.errors import QuotaError, SpecError
from sandbox_kernel.jupyter.resolve import read_policy
from sandbox_kernel.jupyter.settings import SandboxPolicy
from sandbox_kernel.magics import sandbox_magics as m

MiB = 1 << 20


def test_kernel_structures_have_the_kernels_sizes() -> None:
    # struct fsxattr is 28 bytes, struct if_dqblk 72 (8 u64, a u32, padding)
    assert quota._FSXATTR.size == 28
    assert quota._DQBLK.size == 72
    buf = quota._limits(8 * MiB + 1, 100)
    bhard, bsoft, _, ihard, isoft, *_, valid = quota._DQBLK.unpack(buf.raw)
    assert (bhard, bsoft, ihard, isoft) == (8 * 1024 + 1, 0, 100, 0)  # blocks round up
    assert valid == quota.QIF_BLIMITS | quota.QIF_ILIMITS
    assert quota.is_ours(quota.PROJECT_BASE) and not quota.is_ours(1000)


def test_the_walk_tags_folders_and_files_and_never_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = tmp_path / "nb"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "a.txt").write_text("a")
    (top / "sub" / "b.txt").write_text("b")
    (top / "sub" / "deeper" / "c.txt").write_text("c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host.txt").write_text("host")
    (top / "link-dir").symlink_to(outside)
    (top / "link-file").symlink_to(outside / "host.txt")
    os.mkfifo(top / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(top / "sock"))
    tagged: dict[int, tuple[int, bool]] = {}

    def record(fd: int, projid: int, inherit: bool) -> None:
        tagged[os.fstat(fd).st_ino] = (projid, inherit)

    monkeypatch.setattr(quota, "_set_project", record)
    fd = quota.open_folder(str(top))
    try:
        seen = quota._tag_tree(fd, 7, str(top))
    finally:
        os.close(fd)
    want = {
        (top / "sub").stat().st_ino: (7, True),
        (top / "sub" / "deeper").stat().st_ino: (7, True),
        (top / "a.txt").stat().st_ino: (7, False),
        (top / "sub" / "b.txt").stat().st_ino: (7, False),
        (top / "sub" / "deeper" / "c.txt").stat().st_ino: (7, False),
    }
    assert tagged == want  # not the link targets, the FIFO or the socket
    assert seen == 9


def test_the_walk_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    monkeypatch.setattr(quota, "_set_project", lambda fd, projid, inherit: None)
    monkeypatch.setattr(quota, "MAX_WALK_ENTRIES", 3)
    fd = quota.open_folder(str(tmp_path))
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(QuotaError, match=r"more than 3 entries .*chattr -R -p 9 \+P"):
            quota._tag_tree(fd, 9, str(tmp_path))
        assert len(os.listdir("/proc/self/fd")) == before  # every descriptor was closed
    finally:
        os.close(fd)


def test_the_walk_holds_descriptors_by_depth_not_by_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    for i in range(300):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_text("x")
    tagged: list[int] = []
    monkeypatch.setattr(
        quota, "_set_project", lambda fd, projid, inherit: tagged.append(os.fstat(fd).st_ino)
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = quota.open_folder(str(tmp_path))
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard))
    try:
        assert quota._tag_tree(fd, 9, str(tmp_path)) == 600
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert len(set(tagged)) == 600  # every folder and file, none left out


def test_the_walk_refuses_what_it_cannot_tag_and_skips_mount_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = tmp_path / "a" / "b" / "c" / "d"
    chain.mkdir(parents=True)
    (tmp_path / "mnt" / "inside").mkdir(parents=True)
    tagged: list[str] = []

    def record(fd: int, projid: int, inherit: bool) -> None:
        tagged.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(quota, "_set_project", record)
    monkeypatch.setattr(quota, "mount_points", lambda: {str(tmp_path / "mnt")})
    fd = quota.open_folder(str(tmp_path))
    try:
        quota._tag_tree(fd, 9, str(tmp_path))
        assert str(tmp_path / "mnt") not in tagged and str(chain) in tagged
        monkeypatch.setattr(quota, "MAX_DEPTH", 2)
        with pytest.raises(QuotaError, match=r"a/b/c is more than 2 folders deep"):
            quota._tag_tree(fd, 9, str(tmp_path))

        def broken(fd: int, projid: int, inherit: bool) -> None:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        monkeypatch.setattr(quota, "_set_project", broken)
        with pytest.raises(QuotaError, match=r"cannot put a under the quota \(Operation not"):
            quota._tag_tree(fd, 9, str(tmp_path))
    finally:
        os.close(fd)


def test_a_limit_is_compared_as_the_quota_block_it_was_set_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = 1395864371  # "1.3G": not a whole number of 1 KiB quota blocks
    stored = quota._blocks(odd) * quota.QUOTA_BLOCK
    monkeypatch.setattr(
        quota, "read", lambda folder, what: quota.Usage(folder, quota.PROJECT_BASE, stored, 0)
    )
    assert quota.verify(str(tmp_path), odd).bytes_limit == stored
    with pytest.raises(QuotaError, match="is above"):
        quota.verify(str(tmp_path), odd - 1024)


def test_a_link_on_the_way_or_at_the_end_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "real" / "nb").mkdir(parents=True)
    (tmp_path / "nb").symlink_to(tmp_path / "real")
    (tmp_path / "swapped").symlink_to(tmp_path / "real")  # a parent a kernel swapped in
    with pytest.raises(QuotaError, match=r"\(Not a directory\); .* reached without links"):
        quota.open_folder(str(tmp_path / "nb"))
    with pytest.raises(QuotaError, match=r"not for a quota: /.*/swapped is a symbolic link"):
        quota.open_folder(str(tmp_path / "swapped" / "nb"))
    with pytest.raises(QuotaError, match="reached without links"):
        quota.open_folder(str(tmp_path / "missing"))
    os.close(quota.open_folder(str(tmp_path / "real" / "nb")))


def test_without_root_a_quota_is_checked_never_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a rootless server, even under root
    with pytest.raises(QuotaError, match=r"only root can set a quota .*quota set"):
        quota.apply(str(tmp_path), 8 * MiB)
    assert quota.read(str(tmp_path)).project == 0
    with pytest.raises(
        QuotaError,
        match=r"has no disk quota, .* 8 MiB \(SandboxPolicy.notebook_quota\); .*"
        rf"as root: sandbox-kernel quota set {tmp_path} 8 MiB",
    ):
        quota.verify(str(tmp_path), 8 * MiB)


def test_verify_refuses_a_quota_above_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def usage(limit: int | None) -> quota.Usage:
        return quota.Usage(str(tmp_path), quota.PROJECT_BASE + 1, limit, 0)

    monkeypatch.setattr(quota, "read", lambda folder, what: usage(64 * MiB))
    with pytest.raises(QuotaError, match=r"its disk quota \(64 MiB\) is above the 8 MiB"):
        quota.verify(str(tmp_path), 8 * MiB)
    monkeypatch.setattr(quota, "read", lambda folder, what: usage(None))
    with pytest.raises(QuotaError, match=r"its disk quota \(no limit\)"):
        quota.verify(str(tmp_path), 8 * MiB)
    monkeypatch.setattr(quota, "read", lambda folder, what: usage(4 * MiB))
    assert quota.verify(str(tmp_path), 8 * MiB).bytes_limit == 4 * MiB


def test_describe() -> None:
    assert quota.Usage("/nb", 0, None, None).describe() == "/nb: no project quota"
    u = quota.Usage("/nb", 5, 8 * MiB, 3 * MiB, 100, 7)
    assert u.describe() == "/nb: project 5: 3 MiB used of 8 MiB, 7 of 100 files"


def test_policy_traits() -> None:
    policy = read_policy(SandboxPolicy(notebook_quota="2G", notebook_quota_files=5000))
    assert policy.notebook_quota == 2 << 30 and policy.notebook_quota_files == 5000
    assert read_policy(SandboxPolicy()).notebook_quota is None
    with pytest.raises(SpecError, match=r"SandboxPolicy\.notebook_quota='lots' is not a size"):
        read_policy(SandboxPolicy(notebook_quota="lots"))
    with pytest.raises(SpecError, match=r"_files needs SandboxPolicy\.notebook_quota"):
        read_policy(SandboxPolicy(notebook_quota_files=10))
    with pytest.raises(SpecError, match="notebook_quota_files=-1 must be a number of files"):
        read_policy(SandboxPolicy(notebook_quota="1G", notebook_quota_files=-1))
    # for_user keeps it (the kernel user's narrowed policy is what the start checks)
    assert policy.for_user(os.getuid()).notebook_quota == 2 << 30


def test_report_row() -> None:
    usage = {"memory_limit": None}
    info = {"notebook_quota": {"bytes_limit": 8 * MiB, "bytes_used": 3 * MiB}}
    text = repr(m.build_report(info, usage, 0.0))
    assert "notebook folder      3 MiB used of 8 MiB (disk quota of the folder)" in text
    info["notebook_quota"].update(files_limit=100, files_used=7)
    assert "7 of 100 files" in repr(m.build_report(info, usage, 0.0))
    assert "notebook folder" not in repr(m.build_report({}, usage, 0.0))


def test_cli_refuses_changes_without_root_and_shows_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_kernel.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["quota", "set", str(tmp_path), "1G"]) == 125
    assert "changes the host's quota records: run it as root" in capsys.readouterr().err
    assert main(["quota", "show", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}: no project quota"


def test_the_provisioner_applies_as_root_checks_rootless_and_skips_a_readonly_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from sandbox_kernel.jupyter import provisioner as prov
    from sandbox_kernel.jupyter.resolve import KernelSettings, Policy

    calls: list[tuple[str, str, int]] = []
    usage = quota.Usage(str(tmp_path), quota.PROJECT_BASE, 8 * MiB, MiB, None, 3)

    def applied(f: str, b: int, n: int | None, source: str) -> quota.Usage:
        calls.append(("apply", f, b))
        return usage

    def verified(f: str, b: int, source: str) -> quota.Usage:
        calls.append(("verify", f, b))
        return usage

    monkeypatch.setattr(prov, "apply_quota", applied)
    monkeypatch.setattr(prov, "verify_quota", verified)
    p = prov.SandboxProvisioner()

    def _settings(policy: Policy) -> KernelSettings:
        none: Any = None
        return KernelSettings("python3", none, 0, 0, (), (), none, 1000, 1000, 60.0, policy=policy)

    settings = _settings(Policy(notebook_quota=8 * MiB))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert p._folder_quota(settings, str(tmp_path)) is usage
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert p._folder_quota(settings, str(tmp_path)) is usage
    assert calls == [("apply", str(tmp_path), 8 * MiB), ("verify", str(tmp_path), 8 * MiB)]
    assert p._folder_quota(replace(settings, notebook_readonly=True), str(tmp_path)) is None
    assert p._folder_quota(_settings(Policy()), str(tmp_path)) is None
    assert len(calls) == 2

    def refused(f: str, b: int, source: str) -> quota.Usage:
        raise QuotaError(f"notebook folder {f} has no disk quota")

    monkeypatch.setattr(prov, "verify_quota", refused)
    with pytest.raises(SpecError, match="has no disk quota"):
        p._folder_quota(settings, str(tmp_path))
    # what %sandbox gets: figures, no path
    p.cwd = str(tmp_path)
    monkeypatch.setattr(prov, "read_quota", lambda f: usage)
    assert p._quota_info(settings) == {
        "bytes_limit": 8 * MiB,
        "bytes_used": MiB,
        "files_limit": None,
        "files_used": 3,
    }


def test_an_admins_project_is_only_verified_and_its_refusal_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(tmp_path / "run"))
    nb = tmp_path / "nb"
    nb.mkdir()
    mine = nb.stat().st_ino
    # the folder is in project 4242, its parent in none: a project the admin made there
    monkeypatch.setattr(
        quota, "get_project", lambda fd: (4242, True) if os.fstat(fd).st_ino == mine else (0, False)
    )

    def refuse(folder: str, limit: int, source: str, what: str) -> quota.Usage:
        raise QuotaError("the admin's project has no limit")

    def never(*args: object) -> None:
        raise AssertionError("an admin's project was changed")

    monkeypatch.setattr(quota, "verify", refuse)
    monkeypatch.setattr(quota, "_set_project", never)
    monkeypatch.setattr(quota, "_quotactl", never)
    with pytest.raises(QuotaError) as caught:
        quota.apply(str(nb), 8 * MiB)
    assert str(caught.value) == "the admin's project has no limit"


def test_the_policy_files_home_quota_bounds_every_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.jupyter import provisioner as prov
    from sandbox_kernel.jupyter.resolve import KernelSettings, Policy

    calls: list[tuple[str, int, str]] = []

    def verified(f: str, b: int, source: str = "SandboxPolicy.notebook_quota") -> quota.Usage:
        calls.append(("verify", b, source))
        return quota.Usage(f, quota.PROJECT_BASE, b, 0)

    def applied(f: str, b: int, n: int | None, source: str) -> quota.Usage:
        calls.append(("apply", b, source))
        return quota.Usage(f, quota.PROJECT_BASE, b, 0)

    monkeypatch.setattr(prov, "verify_quota", verified)
    monkeypatch.setattr(prov, "apply_quota", applied)
    p = prov.SandboxProvisioner()

    def start(euid: int, **policy: Any) -> list[tuple[str, int, str]]:
        none: Any = None
        settings = KernelSettings(
            "python3", none, 0, 0, (), (), none, 1000, 1000, 60.0,
            policy=Policy(file_where="/etc/p.toml (users.alice)", **policy),
        )  # fmt: skip
        monkeypatch.setattr(os, "geteuid", lambda: euid)
        calls.clear()
        p._folder_quota(settings, str(tmp_path))
        return list(calls)

    home = "home_quota in /etc/p.toml (users.alice)"
    assert start(1000, file_home_quota=4 * MiB) == [("verify", 4 * MiB, home)]
    assert start(1000, notebook_quota=8 * MiB, file_home_quota=4 * MiB) == [
        ("verify", 4 * MiB, home)
    ]
    assert start(1000, notebook_quota=2 * MiB, file_home_quota=4 * MiB) == [
        ("verify", 2 * MiB, "SandboxPolicy.notebook_quota")
    ]
    # a root server sets the tighter of the two, never one above the file's
    assert start(0, notebook_quota=2 * MiB, file_home_quota=4 * MiB) == [
        ("apply", 2 * MiB, "SandboxPolicy.notebook_quota")
    ]
    assert start(0, notebook_quota=8 * MiB, file_home_quota=4 * MiB) == [("apply", 4 * MiB, home)]
    assert start(0, file_home_quota=4 * MiB) == [("verify", 4 * MiB, home)]
    assert start(0) == []
