"""The %sandbox magics for real: Python 2.7 and Python 3 kernels (AsyncKernelManager with the
sandbox kernelspecs), their cgroups read from the host, the control channel under attack, cell
budgets, the explanation after an OOM kill, and ``sandbox-kernel stats``.

Needs root and the python2.7 / python3 images (built on first use)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from sandbox_kernel.cgroups import CgroupStats, get_manager
from sandbox_kernel.jupyter import provisioner as prov
from tests.privileged.conftest import KERNEL_UID

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

KERNELS = ("python2.7-sandbox", "python3-sandbox")
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Kernels:
    """Starts sandbox kernels for one test; shuts them down and checks nothing is left."""

    kernels: Path
    notebook_dir: Path
    started: list[AsyncKernelManager] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    async def start(
        self, name: str, *, policy: dict[str, Any] | None = None, **settings: Any
    ) -> AsyncKernelManager:
        kernel_name = name
        if settings:
            spec = json.loads((self.kernels / name / "kernel.json").read_text())
            spec["metadata"]["kernel_provisioner"]["config"].update(settings)
            kernel_name = f"t-{name}-{len(self.started)}"
            (self.kernels / kernel_name).mkdir()
            (self.kernels / kernel_name / "kernel.json").write_text(json.dumps(spec))
        config = Config({"SandboxPolicy": policy}) if policy else Config()
        km = AsyncKernelManager(kernel_name=kernel_name, config=config)
        self.started.append(km)
        await km.start_kernel(cwd=str(self.notebook_dir))
        self.provisioner(km)
        return km

    def provisioner(self, km: AsyncKernelManager) -> prov.SandboxProvisioner:
        p = km.provisioner
        assert isinstance(p, prov.SandboxProvisioner) and p.container_id
        if p.container_id not in self.ids:
            self.ids.append(p.container_id)
        return p

    def image(self, name: str) -> str:
        """The image reference a shipped kernelspec runs (as the report and ps show it)."""
        spec = json.loads((self.kernels / name / "kernel.json").read_text())
        image = str(spec["metadata"]["kernel_provisioner"]["config"]["image"])
        return image if ":" in image else f"{image}:latest"

    def cgroup(self, km: AsyncKernelManager) -> CgroupStats:
        """The kernel's cgroup figures, read from the host's cgroup files."""
        cid = self.provisioner(km).container_id
        assert cid is not None
        return get_manager().open(cid).stats()


@pytest.fixture
async def sandboxes(
    kernels: Path, notebook_dir: Path, assert_no_leftovers: Callable[[Iterable[str]], None]
) -> AsyncIterator[Kernels]:
    ks = Kernels(kernels, notebook_dir)
    try:
        yield ks
    finally:
        for km in ks.started:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        assert_no_leftovers(ks.ids)


@dataclass
class Result:
    reply: dict[str, Any]
    stdout: str
    stderr: str
    data: list[dict[str, Any]]  # execute_result / display_data bundles

    @property
    def ok(self) -> bool:
        return self.reply.get("status") == "ok"

    def __str__(self) -> str:
        return f"status={self.reply.get('status')}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def execute(km: AsyncKernelManager, code: str, timeout: float = 120) -> Result:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        out: list[str] = []
        err: list[str] = []
        data: list[dict[str, Any]] = []

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (out if content["name"] == "stdout" else err).append(content["text"])
            elif kind == "error":
                err.append("\n".join(content["traceback"]))
            elif kind in ("execute_result", "display_data"):
                data.append(content["data"])

        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return Result(reply["content"], "".join(out), "".join(err), data)
    finally:
        kc.stop_channels()


def row(report: str, name: str) -> str:
    """The value of one row of the %sandbox text report."""
    m = re.search(rf"^{re.escape(name)} +(.*)$", report, re.M)
    assert m, f"no row {name!r} in:\n{report}"
    return m.group(1)


def fmt_size(n: int | None) -> str:
    from sandbox_kernel.magics.sandbox_magics import fmt_size as f

    return str(f(n))


REPORT = "r = %sandbox\nprint(repr(r))"
USAGE = "import json, sandbox_magics\nprint(json.dumps(sandbox_magics.read_usage()))"


# ---- 1. the report's figures are the cgroup's ------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_report_figures_match_the_cgroup(sandboxes: Kernels, name: str) -> None:
    km = await sandboxes.start(name)
    res = await execute(km, "%sandbox")
    assert res.ok, res
    (bundle,) = res.data
    text, html = bundle["text/plain"], bundle["text/html"]
    host = sandboxes.cgroup(km)
    assert host.memory_limit == 1 * GiB and host.pids_limit == 256
    assert host.cpu_quota_us == 100_000 and host.cpu_period_us == 100_000

    assert row(text, "image").startswith(f"{sandboxes.image(name)} sha256:")
    assert row(text, "memory limit") == fmt_size(host.memory_limit)
    assert row(text, "cpu limit") == "%g CPUs" % (host.cpu_quota_us / host.cpu_period_us)
    assert row(text, "process limit") == str(host.pids_limit)
    assert row(text, "/tmp size").startswith("256 MiB (private tmpfs, ")
    assert row(text, "network") == "none (loopback only)"
    assert row(text, "out-of-memory kills") == "0"
    used = re.fullmatch(r"([\d.]+) MiB \(peak ([\d.]+) MiB\)", row(text, "memory used"))
    assert used, text
    assert 5 <= float(used.group(1)) <= float(used.group(2)) < 1024
    assert 2 <= int(row(text, "processes")) < 50
    for label in ("memory limit", "process limit", "/tmp size", "memory used", "cpu time"):
        assert f"<th style='text-align:left'>{label}</th>" in html
    assert f"<td style='text-align:left'>{fmt_size(host.memory_limit)}</td>" in html

    # the raw figures the report is made of, against the host's reading of the same files
    res = await execute(km, USAGE)
    assert res.ok, res
    usage = json.loads(res.stdout)
    host = sandboxes.cgroup(km)
    assert usage["memory_limit"] == host.memory_limit
    assert usage["pids_limit"] == host.pids_limit
    assert host.cpu_quota_us is not None
    assert usage["cpus"] == host.cpu_quota_us / host.cpu_period_us
    assert abs(usage["memory_current"] - host.memory_current) < 64 * MiB
    assert 0 < usage["cpu_usage_us"] <= host.cpu_usage_us
    assert abs(usage["pids_current"] - host.pids_current) <= 2


# ---- 2. a live change is applied -------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_live_change_reaches_the_cgroup(sandboxes: Kernels, name: str) -> None:
    km = await sandboxes.start(name)
    res = await execute(km, "%sandbox memory=512M pids=200 cpus=0.5")
    assert res.ok and "Limits now: memory 512 MiB, cpus 0.5, pids 200" in res.stdout, res
    host = sandboxes.cgroup(km)
    assert host.memory_limit == 512 * MiB and host.pids_limit == 200
    assert host.cpu_quota_us == 50_000
    report = (await execute(km, REPORT)).stdout
    assert row(report, "memory limit") == "512 MiB" and row(report, "process limit") == "200"
    assert row(report, "cpu limit") == "0.5 CPUs"
    container = sandboxes.provisioner(km).container
    assert container is not None and container.limits.memory == 512 * MiB


# ---- 3. above the ceiling: refused, naming the ceiling ---------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_change_above_the_ceiling_is_refused(sandboxes: Kernels, name: str) -> None:
    policy = {"max_memory": "1G", "max_pids": 400, "max_cpus": 1.5}
    km = await sandboxes.start(name, policy=policy)
    for ask, message in (
        ("memory=2G", "memory=2G refused: this server allows at most 1 GiB per kernel"),
        ("pids=1000", "pids=1000 refused: this server allows at most 400 processes per kernel"),
        ("cpus=4", "cpus=4 refused: this server allows at most 1.5 CPUs per kernel"),
    ):
        res = await execute(km, f"%sandbox {ask}")
        assert res.ok and message in res.stderr and "Limits now" not in res.stdout, res
    host = sandboxes.cgroup(km)
    assert (host.memory_limit, host.pids_limit, host.cpu_quota_us) == (GiB, 256, 100_000)
    report = (await execute(km, REPORT)).stdout
    assert row(report, "memory limit") == "1 GiB (server allows up to 1 GiB)"
    assert row(report, "process limit") == "256 (server allows up to 400)"
    res = await execute(km, "%sandbox pids=400")  # at the ceiling: fine
    assert "pids 400" in res.stdout, res
    assert sandboxes.cgroup(km).pids_limit == 400


# ---- 4. hostile messages from inside --------------------------------------------------------
HOSTILE = r"""
import json, os, socket, threading
PATH = os.environ['SANDBOX_KERNEL_CONTROL']

def talk(payload, path=PATH):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(path)
        s.sendall(payload)
        data = b''
        while not data.endswith(b'\n'):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return json.loads(data.decode('utf-8')) if data else {'ok': False, 'error': 'closed'}
    except Exception as e:
        return {'ok': False, 'error': 'exception %s: %s' % (type(e).__name__, e)}
    finally:
        s.close()

def line(obj):
    return json.dumps(obj).encode('utf-8') + b'\n'

r = {}
r['oversized'] = talk(b'{"op": "get", "pad": "' + b'x' * 65536 + b'"}\n')
r['not_json'] = talk(b'{nope\n')
r['binary'] = talk(b'\xff\xfe\x00\x01\n')
r['not_object'] = talk(b'[1, 2, 3]\n')
r['bad_op'] = talk(line({'op': 'reboot'}))
r['deep'] = talk(b'[' * 2000 + b']' * 2000 + b'\n')
r['other_set'] = talk(line({'op': 'set', 'container_id': OTHER_CID, 'kernel_id': OTHER_KID,
                            'memory': '64M'}))
r['other_get'] = talk(line({'op': 'get', 'kernel_id': OTHER_KID}))
r['other_socket'] = talk(line({'op': 'set', 'memory': '64M'}), path=OTHER_PATH)
r['bad_value'] = talk(line({'op': 'set', 'memory': ['1G'] * 100}))

flood = []
def burst():
    for _ in range(10):
        flood.append(talk(line({'op': 'get'})))
threads = [threading.Thread(target=burst) for _ in range(10)]
for t in threads:
    t.start()
for t in threads:
    t.join()
r['flood_ok'] = sum(1 for x in flood if x.get('ok'))
r['flood_errors'] = sorted(set(x.get('error', '')[:40] for x in flood if not x.get('ok')))
r['flood_n'] = len(flood)
print(json.dumps(r))
"""


@pytest.mark.parametrize("name", KERNELS)
async def test_hostile_messages_are_rejected_and_the_host_keeps_working(
    sandboxes: Kernels, name: str
) -> None:
    other_name = next(k for k in KERNELS if k != name)
    km, other = await asyncio.gather(sandboxes.start(name), sandboxes.start(other_name))
    other_p = sandboxes.provisioner(other)
    assert other_p.container_id is not None
    # the other kernel's control socket as the server reaches it (its connection folder is
    # a tmpfs of the other container, held by the server as a descriptor)
    assert other_p._conn_fd is not None
    other_path = f"/proc/{os.getpid()}/fd/{other_p._conn_fd}/control"
    assert os.path.exists(other_path)
    other_before = sandboxes.cgroup(other)

    code = (
        f"OTHER_CID = {other_p.container_id!r}\nOTHER_KID = {str(other.kernel_id)!r}\n"
        f"OTHER_PATH = {other_path!r}\n" + HOSTILE
    )
    res = await execute(km, code)
    assert res.ok, res
    r = json.loads(res.stdout)

    def refused(key: str, text: str) -> None:
        assert r[key]["ok"] is False and text in r[key]["error"], (key, r[key])

    refused("oversized", "request too large (at most 4096 bytes)")
    refused("not_json", "malformed request (not JSON)")
    refused("binary", "malformed request (not JSON)")
    refused("not_object", "malformed request")
    refused("bad_op", "malformed request")
    refused("deep", "malformed request")
    refused("other_set", "unknown field(s) container_id, kernel_id")
    refused("other_get", "unknown field(s) kernel_id")
    refused("other_socket", "exception")  # the other kernel's socket is not in this sandbox
    assert "No such file" in r["other_socket"]["error"] or "Errno 2" in r["other_socket"]["error"]
    refused("bad_value", "not a valid value")
    assert r["flood_n"] == 100
    assert r["flood_ok"] <= 25, r  # the burst of the rate limit, not more
    assert any("too many requests" in e for e in r["flood_errors"]), r

    # the host side still works: a normal %sandbox, then a change (the rate limit refills a
    # request every few seconds)
    async def once_allowed(code: str) -> Result:
        for _ in range(15):
            res = await execute(km, code)
            if "too many requests" not in res.stdout + res.stderr:
                return res
            await asyncio.sleep(1)
        raise AssertionError(f"still rate-limited: {res}")

    report = (await once_allowed(REPORT)).stdout
    assert row(report, "image").startswith(sandboxes.image(name)), report
    assert row(report, "memory limit") == "1 GiB"
    res = await once_allowed("%sandbox pids=240")
    assert "pids 240" in res.stdout, res
    assert sandboxes.cgroup(km).pids_limit == 240

    # ... and nothing of the other kernel changed; its own channel works
    other_after = sandboxes.cgroup(other)
    assert (other_after.memory_limit, other_after.pids_limit, other_after.cpu_quota_us) == (
        other_before.memory_limit,
        other_before.pids_limit,
        other_before.cpu_quota_us,
    )
    res = await execute(other, REPORT)
    assert row(res.stdout, "image").startswith(sandboxes.image(other_name)), res
    assert sandboxes.provisioner(km)._control is not None


# ---- 5. cell budgets -------------------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_cell_time_budget_interrupts_and_the_kernel_answers(
    sandboxes: Kernels, name: str
) -> None:
    km = await sandboxes.start(name)
    t0 = time.monotonic()
    res = await execute(km, "%%sandbox timeout=2s\nn = 0\nwhile True:\n    n += 1\n")
    elapsed = time.monotonic() - t0
    assert "Cell stopped: it exceeded its time budget of 2 s." in res.stderr, res
    assert "The kernel is still running" in res.stderr
    assert not res.ok, "a budget-stopped cell ends as an error, so Run All stops there"
    assert elapsed < 2 + 30, elapsed  # generous: a loaded host
    res = await execute(km, "print('%s %d' % (n > 0, 6 * 7))")
    assert res.ok and res.stdout.strip() == "True 42", res


@pytest.mark.parametrize("name", KERNELS)
async def test_cell_memory_budget_interrupts_a_growing_allocation(
    sandboxes: Kernels, name: str
) -> None:
    km = await sandboxes.start(name)
    code = (
        "%%sandbox memory=150M\n"
        "import time\n"
        "blocks = []\n"
        "while True:\n"
        "    blocks.append(bytearray(4 << 20))\n"
        "    time.sleep(0.01)\n"
    )
    res = await execute(km, code)
    m = re.search(
        r"Cell stopped: it exceeded its memory budget of 150 MiB \(used ([\d.]+) MiB\)", res.stderr
    )
    assert m, res
    assert 150 < float(m.group(1)) < 1024
    host = sandboxes.cgroup(km)
    assert host.oom_kills == 0 and host.memory_limit == GiB  # the budget, not the cap, stopped it
    res = await execute(km, "print(len(blocks) > 10); del blocks")
    assert res.ok and res.stdout.strip() == "True", res


# ---- 6. why the previous kernel died ---------------------------------------------------------
async def _oom(km: AsyncKernelManager) -> None:
    """Make the kernel of ``km`` allocate 600 MiB, and wait (60 s at most) for its death."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        kc.execute("x = bytearray(600 << 20)")
    finally:
        kc.stop_channels()
    for _ in range(600):
        if not await km.is_alive():
            break
        await asyncio.sleep(0.1)
    assert not await km.is_alive()


@pytest.mark.parametrize("name", KERNELS)
async def test_after_an_oom_kill_the_next_kernel_says_why(sandboxes: Kernels, name: str) -> None:
    km = await sandboxes.start(name, policy={"max_memory": "384M"}, memory="256M")
    assert sandboxes.cgroup(km).memory_limit == 256 * MiB
    await _oom(km)
    p = sandboxes.provisioner(km)
    assert p.last_exit is not None and p.last_exit["oom_killed"], p.last_exit
    await km.restart_kernel(now=True)  # what jupyter_server's KernelRestarter does
    res = await execute(km, "print('back')")
    assert res.ok and res.stdout.strip() == "back", res
    m = re.search(
        r"The previous kernel was stopped: out of memory \(limit 256 MiB, peak ([\d.]+) MiB\)\. "
        r"Raise it with %sandbox memory=384M \(this server allows up to 384 MiB\) "
        r"or use less memory\.",
        res.stderr,
    )
    assert m, res
    assert 200 <= float(m.group(1)) <= 257
    res = await execute(km, "print('again')")  # said once
    assert "previous kernel" not in res.stderr, res
    # raised to the ceiling, dead again: the advice no longer says raise it; the raised
    # limit outlived the restart
    res = await execute(km, "%sandbox memory=384M")
    assert res.ok, res
    await _oom(km)
    await km.restart_kernel(now=True)
    res = await execute(km, "print('back')")
    assert "The memory limit is already the most this kernel may have (384 MiB)" in res.stderr
    assert sandboxes.cgroup(km).memory_limit == 384 * MiB
    # a restart the user asked for is not explained
    await km.restart_kernel(now=True)
    res = await execute(km, "print('fresh')")
    assert res.ok and "previous kernel" not in res.stderr, res


#: A cell that meets the pids cap and lives on: threads until one cannot start, then let go.
HIT_THE_PIDS_CAP = """
import threading
ev, ts = threading.Event(), []
try:
    while len(ts) < 2000:
        t = threading.Thread(target=ev.wait)
        t.start()
        ts.append(t)
except Exception:
    pass
ev.set()
for t in ts:
    t.join()
print(len(ts) < 2000)
"""


@pytest.mark.parametrize("name", KERNELS)
async def test_a_restart_after_the_pids_cap_was_hit_is_not_blamed_on_the_cap(
    sandboxes: Kernels, name: str
) -> None:
    km = await sandboxes.start(name, pids=64)
    p = sandboxes.provisioner(km)
    res = await execute(km, HIT_THE_PIDS_CAP)
    assert res.ok and res.stdout.strip() == "True", res
    assert sandboxes.cgroup(km).pids_limit_hits > 0  # the cap was hit, and the kernel lives
    # a restart the user asked for, answered by the kernel
    await km.restart_kernel()
    assert p.last_exit is not None, p.last_exit
    assert "restart requested" in p.last_exit["reason"], p.last_exit
    assert "process limit" not in p.last_exit["reason"] and not p.last_exit["pids_limit_hit"]
    res = await execute(km, "print('fresh')")
    assert res.ok and "previous kernel" not in res.stderr, res
    # the cap hit again, then a forced restart (SIGKILL, the restarter's way)
    res = await execute(km, HIT_THE_PIDS_CAP)
    assert res.ok and sandboxes.cgroup(km).pids_limit_hits > 0, res
    await km.restart_kernel(now=True)
    assert p.last_exit is not None
    assert p.last_exit["reason"] == "killed by SIGKILL (stopped by the server)", p.last_exit
    res = await execute(km, "print('fresh')")
    assert res.ok and "previous kernel" not in res.stderr, res


# ---- 7. sandbox-kernel stats ---------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_stats_json_shows_the_running_kernel(
    sandboxes: Kernels, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_kernel.cli import main

    km = await sandboxes.start(name)
    await execute(km, "%sandbox memory=700M pids=200")
    cid = sandboxes.provisioner(km).container_id
    assert cid is not None
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        kc.execute("import time\nt = time.time()\nwhile time.time() - t < 8:\n    pass\n")
        await asyncio.sleep(1)
        capsys.readouterr()
        status = await asyncio.to_thread(main, ["stats", "--json", "--interval", "3"])
        out = capsys.readouterr().out
    finally:
        kc.stop_channels()
    assert status == 0
    rows = {r["container_id"]: r for r in json.loads(out)}
    r = rows[cid]
    host = sandboxes.cgroup(km)
    assert r["kernel_id"] == km.kernel_id and r["kernelspec"] == name
    assert r["image"] == sandboxes.image(name) and r["user"] == KERNEL_UID
    assert r["limits"] == {"memory": 700 * MiB, "cpus": 1.0, "pids": 200}
    assert (host.memory_limit, host.pids_limit) == (700 * MiB, 200)
    use = r["usage"]
    assert 5 * MiB < use["memory"] <= use["memory_peak"] < 700 * MiB
    assert abs(use["memory"] - host.memory_current) < 64 * MiB
    assert 2 <= use["pids"] < 50
    assert 10 < use["cpu_percent"] <= 150, use  # a busy loop under a 1-CPU cap
    assert use["oom_kills"] == 0
    assert await asyncio.to_thread(main, ["stats", "--no-stream", "--interval", "0.2"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("CONTAINER") and cid in table and "/ 700 MiB" in table


# ---- the "/tmp size 252 GiB" report ---------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
async def test_tmp_hidden_by_the_notebook_directory_is_reported_as_such(
    sandboxes: Kernels, name: str
) -> None:
    """Jupyter started in /tmp: the notebook directory (the host's /tmp) is bound over the
    sandbox's private /tmp tmpfs. /proc/mounts still lists the tmpfs (in mount-id order,
    which need not be the stacking order), but /tmp is the host's disk: the report must not
    call that disk's size the size of /tmp."""
    sandboxes.notebook_dir = Path("/tmp")
    km = await sandboxes.start(name)
    res = await execute(km, REPORT + "\nprint(open('/proc/mounts').read())")
    assert res.ok, res
    mounts = [f for f in (line.split() for line in res.stdout.splitlines()) if f[1:2] == ["/tmp"]]
    assert "tmpfs" in [m[2] for m in mounts] and len(mounts) == 2  # stacked
    text = row(res.stdout, "/tmp size")
    assert text.startswith("not the sandbox's private tmpfs: the host directory /tmp ("), text
    assert "256 MiB" not in text
