"""``sandbox-kernel delegate`` on this host's real cgroups: a root-owned per-user cgroup with
the user's aggregate caps, a user-owned kernels/ below it, updates, the list, removal."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.cgroups import detect, manager_for_user
from sandbox_kernel.cgroups.delegation import TOP, v1_parent
from sandbox_kernel.cli import main, ps
from sandbox_kernel.cli.stats import read_cgroup
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, Limits
from tests.privileged.conftest import crash

pytestmark = [pytest.mark.privileged, pytest.mark.root_only]

GIB = 1024**3


@pytest.fixture
def user() -> Iterator[tuple[str, int]]:
    yield from _test_user()


@pytest.fixture
def other_user() -> Iterator[tuple[str, int]]:
    yield from _test_user()


def _test_user() -> Iterator[tuple[str, int]]:
    """A fresh account with a free uid; removed with its delegation afterwards."""
    name = "sk-dg-" + secrets.token_hex(3)
    # a uid nobody has and nothing on the host was left under (its default run roots)
    for _ in range(100):
        uid = 50000 + secrets.randbelow(9000)
        with contextlib.suppress(KeyError):
            pwd.getpwuid(uid)
            continue
        if not any(Path(p).exists() for p in (f"/tmp/sk-{uid}", f"/run/user/{uid}")):
            break
    else:
        raise AssertionError("no free uid found for the test user")
    subprocess.run(["useradd", "-M", "-u", str(uid), "-s", "/usr/sbin/nologin", name], check=True)
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
    others = [p for d in dirs if d.parent.is_dir() for p in d.parent.glob("user-*") if p != d]
    assert main(["delegate", "--remove", name]) == 0
    assert not any(d.exists() for d in dirs)
    if not others:  # the last delegation gone: so is the all-users cgroup with its caps
        assert not any(d.parent.exists() for d in dirs)


def test_delegate_takes_the_policys_per_user_caps(
    user: tuple[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No caps on the command line: the server config's SandboxPolicy.user_* caps."""
    name, _ = user
    (tmp_path / "jupyter_server_config.py").write_text(
        'c.SandboxPolicy.user_memory = "3G"\nc.SandboxPolicy.user_pids = 300\n'
    )
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    assert main(["delegate", name]) == 0
    capsys.readouterr()
    main(["delegate", "--list"])
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name + " ")]
    assert listed == [f"{name} (uid {user[1]}): memory 3 GiB, cpus unlimited, pids 300"]
    (tmp_path / "jupyter_server_config.py").write_text('c.SandboxPolicy.user_memory = "lots"\n')
    assert main(["delegate", name]) == 125
    assert "SandboxPolicy.user_memory" in capsys.readouterr().err


def test_delegate_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delegate", "no-such-user-xyz"]) == 125
    assert "no user of this host" in capsys.readouterr().err
    assert main(["delegate", "root"]) == 125
    assert "root needs no delegation" in capsys.readouterr().err
    assert main(["delegate", str(os.getuid()), "--memory", "lots"]) == 125


# ---- root's ps, stats and gc see every user's containers ------------------------------------


def _user_container(run_root: Path, uid: int, command: list[str]) -> Container:
    """A container in ``uid``'s run root with its cgroup in ``uid``'s delegation, as that
    user's rootless server makes them (created here by root, which is what matters to root's
    ps and gc: where the run dir and the cgroup are)."""
    manager = manager_for_user(uid)
    assert manager is not None, "the delegation is found for that user"
    spec = ContainerSpec(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=tuple(command),
        mounts=hostimage.binds(),
        user=65534,
        group=65534,
        limits=Limits(memory=256 << 20, pids=64),
    )
    # no user namespace: the run root is closed to the product's id range
    c = Container.create(spec, manager=manager, root=run_root)
    c.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return c


@pytest.mark.skipif(not detect().v1_mounts, reason="the v1 delegation (v2: in the guest)")
def test_root_ps_stats_and_gc_cover_every_user(
    user: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """As root, ``ps`` and ``stats`` list another user's containers with their owner and
    usage, and ``gc`` removes that user's crash leftovers; what the user planted in its run
    root (symlinks, a dead copy of root's own container's id) reaches nothing of root's."""
    name, uid = user
    assert main(["delegate", name]) == 0
    run_root = Path(f"/tmp/sk-{uid}")
    run_root.mkdir(mode=0o700)
    os.chown(run_root, uid, uid)
    live = _user_container(run_root, uid, ["/bin/sleep", "300"])
    crashed = _user_container(run_root, uid, ["/bin/sleep", "300"])
    mine = Container.create(
        userns.for_caller().apply(
            ContainerSpec(
                id=new_container_id(),
                layers=(str(hostimage.layer_dir()),),
                command=("/bin/sleep", "300"),
                mounts=hostimage.binds(),
                user=65534,
                group=65534,
            )
        )
    )
    try:
        mine.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        crash(crashed)
        # planted by the user: a dead run dir named like root's live container, a run dir
        # that is a symlink to root's, a meta.json that is a symlink to a root-only file
        forged = run_root / mine.id
        forged.mkdir()
        (forged / "pid").write_text(json.dumps({"pid": 1, "start": "0"}))
        (forged / "meta.json").write_text(json.dumps({"owner_pid": 1, "owner_start": "0"}))
        other_id = new_container_id()
        os.symlink(mine.run_dir, run_root / other_id)
        (live.run_dir / "kernel").symlink_to("/etc/shadow")  # not read: not a run dir file
        rows = {(r["owner_uid"], r["container_id"]): r for r in ps.collect(include_stopped=True)}
        assert rows[uid, live.id]["running"]
        assert rows[uid, live.id]["usage"] is not None, "usage read from the user's delegation"
        assert rows[uid, live.id]["usage"]["pids_limit"] == 64
        assert rows[0, mine.id]["running"] and not rows[uid, mine.id]["running"]
        assert rows[uid, mine.id]["usage"] is None
        assert (uid, other_id) not in rows, "a symlinked run dir is not followed"
        capsys.readouterr()
        assert main(["ps"]) == 0
        table = capsys.readouterr().out
        assert table.startswith("OWNER") and any(
            ln.startswith(name) and live.id in ln for ln in table.splitlines()
        ), table
        figures = read_cgroup(live.id)
        assert figures is not None and figures["pids_limit"] == 64

        assert main(["gc"]) == 0
        out = capsys.readouterr().out
        assert (
            f"run dir {crashed.id} (uid {uid})" in out and f"cgroup {crashed.id} (uid {uid})" in out
        )
        assert not crashed.run_dir.exists()
        assert crashed.id not in manager_for_user(uid).list_leftovers()  # type: ignore[union-attr]
        # the forged copy of root's id went; root's own container did not
        assert not forged.exists() and mine.poll() is None and mine.run_dir.is_dir()
        assert live.poll() is None and live.run_dir.is_dir()
        assert (run_root / other_id).is_symlink() and mine.run_dir.is_dir()
    finally:
        for c in (live, crashed, mine):
            with contextlib.suppress(Exception):
                c.destroy()
        shutil.rmtree(run_root, ignore_errors=True)


def _cpu_quota(d: Path) -> int | None:
    """The CFS quota of the cgroup ``d`` in microseconds per 100 ms (None: unlimited)."""
    v1 = Path(str(d).replace("/memory/", "/cpu/"))
    if (v1 / "cpu.cfs_quota_us").exists():
        q = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if q < 0 else q
    text = (d / "cpu.max").read_text().split()[0]
    return None if text == "max" else int(text)


def test_delegation_from_the_policy_file_with_the_hosts_reserve(
    user: tuple[str, int],
    other_user: tuple[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No caps on the command line: the policy file's for that user; its [reserve] caps all
    users' kernels together at the host less the reserve. Lowering both at once works on
    cgroup v1 too (a parent's CPU quota below a child's is refused there)."""
    name, uid = user
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    policy = etc / "policy.toml"
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY", str(policy))
    cpus = len(os.sched_getaffinity(0))
    top_dirs = [d.parent for d in _dirs(uid)]
    try:
        policy.write_text(
            f'user_memory = "2G"\nuser_cpus = 1\n[users.{name}]\nuser_pids = 300\n'
            '[reserve]\nmemory = "1G"\ncpus = 0.5\n'
        )
        policy.chmod(0o644)
        assert main(["delegate", name]) == 0
        mem = next(d for d in _dirs(uid) if "memory" in str(d) or (d / "memory.max").exists())
        mem_file = (
            "memory.limit_in_bytes" if (mem / "memory.limit_in_bytes").exists() else "memory.max"
        )
        assert int((mem / mem_file).read_text()) == 2 * GIB
        assert _cpu_quota(mem) == 100_000
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        top_mem = int((mem.parent / mem_file).read_text())
        assert abs(top_mem - (total - GIB)) < 64 << 20  # MemTotal less the reserve
        assert _cpu_quota(mem.parent) == round((cpus - 0.5) * 100_000)
        # a reserve that leaves less than the user had: the user is lowered first
        policy.write_text(f"user_cpus = 1\n[reserve]\ncpus = {cpus - 0.25}\n")
        # (other users' running kernels, e.g. of a rootless run on this host, may hold a
        # higher quota: then cgroup v1 keeps the old all-users cap and says so)
        cpu_top = Path(str(mem.parent).replace("/memory/", "/cpu/"))
        busy = [p for p in cpu_top.glob("user-*/kernels/sk-*") if _cpu_quota(p)]
        caplog.set_level(logging.WARNING, "sandbox_kernel.cgroups.delegation")
        assert main(["delegate", name]) == 0
        assert _cpu_quota(mem) == 25_000
        if busy:
            assert "could not be written" in caplog.text
        else:
            assert _cpu_quota(mem.parent) == 25_000 and not caplog.text
        # a delegation without a reserve leaves the all-users cap as it is, and on cgroup
        # v1 its CPU cap is held to it (a higher one is refused there)
        other, other_uid = other_user
        policy.write_text("user_cpus = 1\n")
        assert main(["delegate", other]) == 0
        other_dir = next(d for d in _dirs(other_uid) if d.parent == mem.parent)
        top_quota = _cpu_quota(mem.parent)
        assert top_quota is not None
        v1 = Path(str(other_dir).replace("/memory/", "/cpu/"), "cpu.cfs_quota_us").exists()
        assert _cpu_quota(other_dir) == (min(100_000, top_quota) if v1 else 100_000)
    finally:
        # the all-users cgroup back to no caps (it holds other tests' delegations too)
        from sandbox_kernel.cgroups.base import CgroupLimits
        from sandbox_kernel.cgroups.delegation import delegate

        policy.unlink(missing_ok=True)
        delegate(name, CgroupLimits(memory_swap=None), detect(), top=CgroupLimits(memory_swap=None))
    for d in top_dirs:
        assert d.is_dir()
