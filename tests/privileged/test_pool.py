"""The warm pool for real: kernelspecs with ``pool_size``, jupyter_client's
AsyncKernelManager, the built images. A claimed kernel must be indistinguishable from a cold
one (folder, working directory, uid, environment, limits, magics, interrupt, restart), its
key its session's alone; a member that dies idle is never handed out; the pool stays within
the user's kernel count; nothing is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from sandbox_kernel.errors import SpecError
from sandbox_kernel.jupyter import pool as pool_mod
from sandbox_kernel.jupyter import provisioner as prov
from sandbox_kernel.paths import run_dir
from tests.privileged.conftest import KERNEL_UID
from tests.privileged.test_provisioner import execute

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

KERNELS = ("python2.7-sandbox", "python3-sandbox")


class Pooled:
    """Kernels of pooled copies of the shipped kernelspecs, in a fresh pool; at the end
    every kernel is shut down, the pool closed, and nothing of any container is left."""

    def __init__(self, kernels: Path, notebook_dir: Path) -> None:
        self.kernels = kernels
        self.notebook_dir = notebook_dir
        self.pool = pool_mod.Pool()
        self.kms: list[AsyncKernelManager] = []
        self.ids: set[str] = set()

    def spec(self, name: str, size: int, **settings: Any) -> str:
        spec = json.loads((self.kernels / name / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"].update(pool_size=size, **settings)
        pooled = f"t-pool-{name}-{size}"
        (self.kernels / pooled).mkdir(exist_ok=True)
        (self.kernels / pooled / "kernel.json").write_text(json.dumps(spec))
        return pooled

    async def start(self, name: str, policy: dict[str, Any] | None = None) -> AsyncKernelManager:
        config = Config({"SandboxPolicy": policy}) if policy else Config()
        km = AsyncKernelManager(kernel_name=name, config=config)
        self.kms.append(km)
        await km.start_kernel(cwd=str(self.notebook_dir))
        self.ids.add(self.provisioner(km).container_id or "")
        return km

    @staticmethod
    def provisioner(km: AsyncKernelManager) -> prov.SandboxProvisioner:
        p = km.provisioner
        assert isinstance(p, prov.SandboxProvisioner) and p.container_id
        return p

    async def ready(self, kernelspec: str, count: int = 1, timeout: float = 120) -> list[str]:
        """Wait until ``count`` members of ``kernelspec`` are ready; their ids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            members = self.pool.idle(kernelspec)
            self.ids.update(m.container.id for m in members)
            if len(members) >= count:
                return [m.container.id for m in members]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {count} ready member(s) of {kernelspec} in {timeout} s")

    async def close(self, assert_no_leftovers: Callable[[Iterable[str]], None]) -> None:
        for km in self.kms:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        self.ids.update(m.container.id for m in self.pool.idle())
        await asyncio.to_thread(self.pool.close)
        assert_no_leftovers(self.ids)


@pytest.fixture
async def pooled(
    kernels: Path,
    notebook_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    assert_no_leftovers: Callable[[Iterable[str]], None],
) -> AsyncIterator[Pooled]:
    p = Pooled(kernels, notebook_dir)
    monkeypatch.setattr(pool_mod, "POOL", p.pool)
    try:
        yield p
    finally:
        await p.close(assert_no_leftovers)


def _key(km: AsyncKernelManager) -> bytes:
    return bytes(km.session.key)


PROBE = (
    "import os, json, socket\n"
    "open('from_kernel.txt', 'w').write('x')\n"
    "print(json.dumps({'cwd': os.getcwd(), 'uid': os.getuid(), 'host': socket.gethostname(),"
    " 'env': dict(os.environ), 'conn': open('/run/sandbox/kernel.json').read()}))\n"
)


@pytest.mark.parametrize("name", KERNELS)
async def test_a_claimed_kernel_is_a_cold_one(pooled: Pooled, name: str) -> None:
    spec = pooled.spec(name, 1, memory="300M", pids=128)
    cold = await pooled.start(spec)
    assert not pooled.provisioner(cold).pooled
    [member] = await pooled.ready(spec)
    warm = await pooled.start(spec)
    p = pooled.provisioner(warm)
    assert p.pooled and p.container_id == member
    assert p.start_phases is not None and "pool claim" in p.start_phases.ms
    results = {}
    for km in (cold, warm):
        reply, out = await execute(km, PROBE)
        assert reply["status"] == "ok", out
        results[km] = json.loads(out.strip().splitlines()[-1])
    c, w = results[cold], results[warm]
    assert w["cwd"] == c["cwd"] == str(pooled.notebook_dir)
    assert w["uid"] == c["uid"] == KERNEL_UID
    assert w["host"] == p.container_id and c["host"] == pooled.provisioner(cold).container_id
    # the same environment, but for the hostname each container has
    assert w["env"].pop("HOSTNAME", w["host"]) == w["host"]
    assert c["env"].pop("HOSTNAME", c["host"]) == c["host"]
    assert w["env"] == c["env"], set(w["env"].items()) ^ set(c["env"].items())
    # the session's own key, in the kernel's connection file too; never the other's
    assert _key(warm) != _key(cold)
    assert json.loads(w["conn"])["key"] == _key(warm).decode()
    assert json.loads(c["conn"])["key"] == _key(cold).decode()
    assert (pooled.notebook_dir / "from_kernel.txt").stat().st_uid == KERNEL_UID
    # the limits and the magics, as a cold kernel has them
    reply, out = await execute(warm, "r = %sandbox\nprint(r)")
    assert reply["status"] == "ok" and "300 MiB" in out and "128" in out, out
    stats = p.container.stats() if p.container else None
    assert stats is not None and stats.memory_limit == 300 << 20 and stats.pids_limit == 128
    # the pool made the next one in the background
    assert await pooled.ready(spec)


@pytest.mark.parametrize("name", ["python3-sandbox"])
async def test_interrupt_restart_and_shutdown_of_a_claimed_kernel(
    pooled: Pooled, name: str
) -> None:
    spec = pooled.spec(name, 1)
    await pooled.start(spec)
    await pooled.ready(spec)
    km = await pooled.start(spec)
    p = pooled.provisioner(km)
    assert p.pooled
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=20)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
    first = p.container
    await km.restart_kernel(now=True)  # a restart is cold, under the same id
    assert p.container is not first and not p.pooled
    _, out = await execute(km, "x = 6 * 7\nprint(x)")
    assert out.strip() == "42", out
    await km.shutdown_kernel(now=True)
    assert p.container is None and not (run_dir() / (p.container_id or "-")).exists()


async def test_a_member_that_dies_idle_is_not_handed_out(pooled: Pooled) -> None:
    spec = pooled.spec("python3-sandbox", 1)
    await pooled.start(spec)
    [member] = await pooled.ready(spec)
    idle = pooled.pool.idle(spec)[0]
    assert idle.container.pid is not None
    os.kill(idle.container.pid, signal.SIGKILL)
    km = await pooled.start(spec)
    assert pooled.provisioner(km).container_id != member
    _, out = await execute(km, "print('alive')")
    assert out.strip() == "alive"
    # the dead member is gone, and replaced
    replaced = await pooled.ready(spec)
    assert member not in replaced
    assert not (run_dir() / member).exists()


async def test_the_pool_stays_within_the_kernel_count(pooled: Pooled) -> None:
    spec = pooled.spec("python3-sandbox", 2)
    policy = {"max_kernels": 2}
    await pooled.start(spec, policy)
    await pooled.ready(spec, 1)
    await asyncio.sleep(3)  # time to make a second member, were there room
    assert len(pooled.pool.idle(spec)) == 1  # one kernel and one member: the count is 2
    km = await pooled.start(spec, policy)
    assert pooled.provisioner(km).pooled
    await asyncio.sleep(3)
    assert pooled.pool.idle(spec) == []  # two kernels: no room for a member
    with pytest.raises(SpecError, match="already runs 2 kernel"):
        await pooled.start(spec, policy)


async def test_a_member_is_not_claimed_for_another_folder(pooled: Pooled, tmp_path: Path) -> None:
    spec = pooled.spec("python3-sandbox", 1)
    await pooled.start(spec)
    [member] = await pooled.ready(spec)
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, KERNEL_UID, KERNEL_UID)
    pooled.notebook_dir = other
    km = await pooled.start(spec)
    p = pooled.provisioner(km)
    assert not p.pooled and p.container_id != member
    _, out = await execute(km, "import os; print(os.getcwd())")
    assert out.strip() == str(other)


async def test_a_member_of_a_replaced_folder_is_not_claimed(pooled: Pooled) -> None:
    """The folder removed and made anew under the same path: the member's mount holds the
    old one, so the next kernel starts cold and sees the new folder."""
    spec = pooled.spec("python3-sandbox", 1)
    await pooled.start(spec)
    [member] = await pooled.ready(spec)
    folder = pooled.notebook_dir
    shutil.rmtree(folder)
    folder.mkdir()
    os.chown(folder, KERNEL_UID, KERNEL_UID)
    (folder / "new.txt").write_text("x")
    km = await pooled.start(spec)
    p = pooled.provisioner(km)
    assert not p.pooled and p.container_id != member
    _, out = await execute(km, "import os; print(sorted(os.listdir('.')))")
    assert "new.txt" in out, out
