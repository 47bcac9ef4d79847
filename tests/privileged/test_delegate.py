"""``sandbox-kernel delegate`` on this host's real cgroups: a root-owned per-user cgroup with
the user's aggregate caps, a user-owned kernels/ below it, updates, the list, removal."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.cgroups import detect
from sandbox_kernel.cgroups.delegation import TOP, v1_parent
from sandbox_kernel.cli import main

pytestmark = [pytest.mark.privileged, pytest.mark.root_only]

GIB = 1024**3


@pytest.fixture
def user() -> Iterator[tuple[str, int]]:
    name = "sk-dg-" + secrets.token_hex(3)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
    uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout)
    try:
        yield name, uid
    finally:
        main(["delegate", "--remove", name])
        subprocess.run(["userdel", name], check=False)
        for path in ("/etc/subuid", "/etc/subgid"):
            lines = Path(path).read_text().splitlines(keepends=True)
            Path(path).write_text("".join(x for x in lines if not x.startswith(name + ":")))


def _dirs(uid: int) -> list[Path]:
    layout = detect()
    if layout.v1_mounts:
        mounts = {m.mountpoint for m in layout.v1_mounts.values()}
        return [Path(m) / TOP / f"user-{uid}" for m in sorted(mounts)]
    mountpoint = layout.v2_mountpoint()
    assert mountpoint is not None
    return [Path(mountpoint) / TOP / f"user-{uid}"]


def test_delegate_update_list_remove(
    user: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    name, uid = user
    assert main(["delegate", name, "--memory", "2G", "--cpus", "1.5", "--pids", "500"]) == 0
    dirs = _dirs(uid)
    for d in dirs:
        assert d.stat().st_uid == 0, "the user's caps stay root's"
        assert (d / "kernels").stat().st_uid == uid, "the user creates kernel cgroups here"
        assert (d / "kernels" / "cgroup.procs").stat().st_uid == uid
        assert (d / "cgroup.procs").stat().st_uid == 0
    memory = [d for d in dirs if (d / "memory.limit_in_bytes").exists()]
    if memory:  # v1
        assert int((memory[0] / "memory.limit_in_bytes").read_text()) == 2 * GIB
        assert v1_parent(detect(), uid) == f"/{TOP}/user-{uid}/kernels"
    capsys.readouterr()
    assert main(["delegate", "--list"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name + " ")]
    assert listed == [f"{name} (uid {uid}): memory 2 GiB, cpus 1.5, pids 500"]
    # again, with other caps: updated in place (idempotent)
    assert main(["delegate", name, "--memory", "1G"]) == 0
    capsys.readouterr()
    main(["delegate", "--list"])
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name + " ")]
    assert listed == [f"{name} (uid {uid}): memory 1 GiB, cpus unlimited, pids unlimited"]
    assert main(["delegate", "--remove", name]) == 0
    assert not any(d.exists() for d in dirs)


def test_delegate_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delegate", "no-such-user-xyz"]) == 125
    assert "no user of this host" in capsys.readouterr().err
    assert main(["delegate", "root"]) == 125
    assert "root needs no delegation" in capsys.readouterr().err
    assert main(["delegate", str(os.getuid()), "--memory", "lots"]) == 125
