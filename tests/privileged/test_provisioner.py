"""The sandbox provisioner for real: jupyter_client's AsyncKernelManager, the built images,
namespaces and cgroups. Needs root and the python2.7 / python3 images (built on first use)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.errors import SpecError
from sandbox_kernel.jupyter import exits
from sandbox_kernel.jupyter import provisioner as prov
from sandbox_kernel.paths import run_dir
from tests.privileged.conftest import KERNEL_GID, KERNEL_UID

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

KERNELS = ("python2.7-sandbox", "python3-sandbox")


@pytest.fixture
def clean_host(assert_no_leftovers: Callable[[Iterable[str]], None]) -> Iterator[list[str]]:
    """Tests append the ids of their containers; afterwards nothing of them is left."""
    ids: list[str] = []
    yield ids
    assert_no_leftovers(ids)


def track(ids: list[str], km: AsyncKernelManager) -> prov.SandboxProvisioner:
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner) and p.container_id
    if p.container_id not in ids:
        ids.append(p.container_id)
    return p


async def execute(
    km: AsyncKernelManager, code: str, timeout: float = 60
) -> tuple[dict[str, Any], str]:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        chunks: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                chunks.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                chunks.append("\n".join(msg["content"]["traceback"]))

        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(chunks)
    finally:
        kc.stop_channels()


@pytest.fixture
async def started(
    clean_host: list[str], kernels: Path, notebook_dir: Path
) -> AsyncIterator[dict[str, AsyncKernelManager]]:
    kms = {name: AsyncKernelManager(kernel_name=name) for name in KERNELS}
    await asyncio.gather(*(km.start_kernel(cwd=str(notebook_dir)) for km in kms.values()))
    for km in kms.values():
        track(clean_host, km)
    try:
        yield kms
    finally:
        for km in kms.values():
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
            assert not (run_dir() / "kernels" / str(km.kernel_id)).exists()


# ---- tests -------------------------------------------------------------------------------------
async def test_both_kernels_run_at_once_isolated(
    clean_host: list[str], started: dict[str, AsyncKernelManager], notebook_dir: Path
) -> None:
    code = (
        "import os, sys, socket\n"
        "print('%d.%d' % sys.version_info[:2])\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(socket.gethostname())\n"
        "print('%d %s' % (os.getuid(), os.getcwd()))\n"
        "print(sorted(k for k in os.environ))\n"
    )
    results = await asyncio.gather(*(execute(km, code) for km in started.values()))
    for (name, km), (reply, out) in zip(started.items(), results, strict=True):
        assert reply["status"] == "ok", out
        lines = out.splitlines()
        assert lines[0] == ("2.7" if name.startswith("python2") else "3.11")
        pids = json.loads(lines[1])
        assert pids[0] == 1 and len(pids) < 6, pids  # init, kernel (and its helpers)
        provisioner = km.provisioner
        assert isinstance(provisioner, prov.SandboxProvisioner)
        assert lines[2] == provisioner.container_id
        assert lines[3] == f"{KERNEL_UID} {notebook_dir}"
        env = set(json.loads(lines[4].replace("'", '"')))
        assert "PYTHONDONTWRITEBYTECODE" in env
        assert not env & {"SUDO_USER", "PYTEST_CURRENT_TEST", "JUPYTER_PATH"}
        assert km.transport == "ipc" and km.connection_file.startswith(str(run_dir()))


async def test_network_is_absent(
    clean_host: list[str], started: dict[str, AsyncKernelManager]
) -> None:
    code = (
        "import socket, time\n"
        "for addr in (('127.0.0.1', 1), ('198.18.0.1', 443)):\n"
        "    s = socket.socket(); s.settimeout(5); t = time.time()\n"
        "    try:\n"
        "        s.connect(addr); print('connected')\n"
        "    except Exception as e:\n"
        "        print('%s %.2f' % (type(e).__name__, time.time() - t))\n"
    )
    for km in started.values():
        reply, out = await execute(km, code)
        assert reply["status"] == "ok"
        assert "connected" not in out
        for line in out.splitlines():
            assert float(line.split()[-1]) < 1.0, out


async def test_file_written_in_notebook_dir_has_the_owner(
    clean_host: list[str], started: dict[str, AsyncKernelManager], notebook_dir: Path
) -> None:
    for name, km in started.items():
        reply, out = await execute(km, f"open('from-{name}.txt', 'w').write(u'hi')")
        assert reply["status"] == "ok", out
        st = (notebook_dir / f"from-{name}.txt").stat()
        assert (st.st_uid, st.st_gid) == (KERNEL_UID, KERNEL_GID)
    # nothing else of the host is visible
    reply, out = await execute(
        started["python3-sandbox"],
        "import os; print(os.path.exists('/work'), os.path.exists('/root/.bashrc'))",
    )
    assert out.strip() == "False False"


@pytest.mark.root_only
async def test_notebook_folder_without_idmapped_mounts_keeps_the_owner(
    clean_host: list[str],
    kernels: Path,
    notebook_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root mode on a notebook filesystem that cannot be idmapped (NFS, CIFS, 9p; stood in
    for here): the folder is bound as it is and the kernel's own ids map to themselves,
    so its files still belong to the folder's owner; every other id stays in the range and
    host root in no map."""
    from sandbox_kernel.runtime import userns

    monkeypatch.setattr(userns, "idmap_supported", lambda path: False)
    km = AsyncKernelManager(kernel_name="python3-sandbox")
    await km.start_kernel(cwd=str(notebook_dir))
    track(clean_host, km)
    try:
        reply, out = await execute(
            km,
            "import os; open('kept.txt', 'w').write('x'); print(os.getuid());"
            "print(open('/proc/self/uid_map').read())",
        )
        assert reply["status"] == "ok", out
        uid, *maps = out.split("\n")
        assert int(uid) == KERNEL_UID
        rows = [tuple(int(x) for x in line.split()) for line in maps if line.strip()]
        assert (KERNEL_UID, KERNEL_UID, 1) in rows, rows
        assert not any(outside == 0 for _, outside, _ in rows), "host root in no map"
        st = (notebook_dir / "kept.txt").stat()
        assert (st.st_uid, st.st_gid) == (KERNEL_UID, KERNEL_GID)
    finally:
        await km.shutdown_kernel(now=True)


async def test_interrupt_restart_shutdown(
    clean_host: list[str], started: dict[str, AsyncKernelManager]
) -> None:
    for km in started.values():
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=120)
            msg_id = kc.execute("import time; time.sleep(30)")
            await asyncio.sleep(2)
            t0 = time.monotonic()
            await km.interrupt_kernel()
            while True:
                reply = await kc.get_shell_msg(timeout=20)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            assert time.monotonic() - t0 < 10
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
        finally:
            kc.stop_channels()
        provisioner = km.provisioner
        assert isinstance(provisioner, prov.SandboxProvisioner)
        first = provisioner.container
        await km.restart_kernel(now=True)
        assert provisioner.container is not first
        _, out = await execute(km, "print(6 * 7)")
        assert out.strip() == "42"
        await km.shutdown_kernel()
        assert not km.has_kernel and provisioner.container is None


async def test_cpu_cap_applied_after_first_kernel_info(
    clean_host: list[str], kernels: Path, notebook_dir: Path
) -> None:
    spec = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"].update(
        {"cpus": 0.5, "pids": 64, "memory": "300M"}
    )
    (kernels / "t-caps").mkdir()
    (kernels / "t-caps" / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="t-caps")
    await km.start_kernel(cwd=str(notebook_dir))
    track(clean_host, km)
    try:
        provisioner = km.provisioner
        assert isinstance(provisioner, prov.SandboxProvisioner)
        await execute(km, "1")
        for _ in range(100):
            if provisioner.container is not None and not provisioner.container.limits.defer_cpu:
                break
            await asyncio.sleep(0.1)
        assert provisioner.container is not None and not provisioner.container.limits.defer_cpu
        st = provisioner.container.stats()
        assert (
            st.cpu_quota_us == 50_000 and st.pids_limit == 64 and st.memory_limit == 300 * 1024**2
        )
        # the start's trace: each phase of the provisioner and the runtime, in order
        phases = provisioner.start_phases
        assert phases is not None and phases is provisioner.container.phases
        names = [n for n in phases.ms if not n.startswith("(")]
        assert names.index("image") < names.index("gc") < names.index("cgroup")
        assert (
            names.index("plan") < names.index("executor") < names.index("first kernel_info reply")
        )
        assert names[-1] == "cpu cap" and 0 < phases.ms["executor"] < phases.total_ms
        # the executor's own clock starts once it runs, which may be before Popen returned
        # (the host's "spawn" phase): its setup fits in spawn and executor together
        own = phases.ms["(executor's own setup)"]
        assert 0 < own <= phases.ms["spawn"] + phases.ms["executor"]
    finally:
        await km.shutdown_kernel(now=True)


async def test_oom_death_is_reported_and_kept(
    clean_host: list[str], kernels: Path, notebook_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["memory"] = "200M"
    (kernels / "t-oom").mkdir()
    (kernels / "t-oom" / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="t-oom")
    await km.start_kernel(cwd=str(notebook_dir))
    track(clean_host, km)
    try:
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        kc.execute("x = bytearray(600 * 1024 * 1024)")
        kc.stop_channels()
        provisioner = km.provisioner
        assert isinstance(provisioner, prov.SandboxProvisioner)
        import logging

        with caplog.at_level(logging.WARNING):
            for _ in range(300):
                if not await km.is_alive():
                    break
                await asyncio.sleep(0.1)
        assert provisioner.last_exit is not None and provisioner.last_exit["oom_killed"]
        assert "stopped: out of memory (limit 200 MiB" in caplog.text
        saved = exits.read_last_exit(str(km.kernel_id))
        assert saved is not None and saved["reason"].startswith("out of memory")
        await km.restart_kernel(now=True)
        _, out = await execute(km, "print('back')")
        assert "back" in out
        # the %sandbox extension tells the user why the previous kernel stopped
        assert "The previous kernel was stopped: out of memory (limit 200 MiB" in out
        assert exits.read_last_exit(str(km.kernel_id)) is not None
    finally:
        await km.shutdown_kernel(now=True)
    assert exits.read_last_exit(str(km.kernel_id)) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("memory", "lots", "memory='lots' is not a size"),
        ("cpus", "-1", "cpus='-1'"),
        ("pids", 1, "pids=1 is too small"),
        ("image", "no-such-image", "image 'no-such-image' not found"),
        ("network", "host", "network='host' is not available"),
        ("user", "root", "user='root' is root"),
        (
            "extra_mounts",
            ["/etc:/etc"],
            "extra_mounts entry '/etc:/etc': source /etc is not under an allowed",
        ),
        ("tmp_size", "big", "tmp_size='big' is not a size"),
        ("writable_size", "0", "writable_size='0' is too small"),
        ("env", {"1X": "y"}, "env key '1X' is invalid"),
    ],
)
async def test_bad_kernelspec_fails_clearly_and_leaves_nothing(
    clean_host: list[str],
    kernels: Path,
    notebook_dir: Path,
    field: str,
    value: Any,
    message: str,
) -> None:
    spec = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"][field] = value
    (kernels / "t-bad").mkdir()
    (kernels / "t-bad" / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="t-bad")
    with pytest.raises(SpecError) as info:
        await km.start_kernel(cwd=str(notebook_dir))
    assert str(info.value).startswith("kernelspec 't-bad': ")
    assert message in str(info.value)
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    assert p.container is None
    if p.container_id:  # the image was resolved before the failure: nothing of it may stay
        clean_host.append(p.container_id)
    for entry in run_dir().glob("sk-*/meta.json"):
        with contextlib.suppress(OSError, ValueError):
            assert json.loads(entry.read_text()).get("kernelspec") != "t-bad"


async def test_ps_lists_the_running_kernels(
    clean_host: list[str], started: dict[str, AsyncKernelManager]
) -> None:
    from sandbox_kernel.cli import main
    from sandbox_kernel.cli.ps import collect, format_table

    await asyncio.gather(*(execute(km, "x = 1") for km in started.values()))
    rows = {r["kernel_id"]: r for r in collect()}
    for name, km in started.items():
        row = rows[km.kernel_id]
        assert row["kernelspec"] == name and row["running"]
        assert row["container_id"] == track(clean_host, km).container_id
        assert (
            row["image"] == name.replace("-sandbox", "-plot") + ":latest"
        )  # the kernelspecs' image
        assert row["user"] == KERNEL_UID
        assert row["limits"] == {"memory": 1024**3, "cpus": 1.0, "cpu_deferred": False, "pids": 256}
        usage = row["usage"]
        assert usage is not None and 0 < usage["memory"] < 1024**3 and 2 <= usage["pids"] < 50
        assert row["container_id"] in format_table([row])
    assert main(["ps", "--json"]) == 0


async def test_kernel_command_missing_in_image_fails_clearly(
    clean_host: list[str], kernels: Path, notebook_dir: Path
) -> None:
    from sandbox_kernel.jupyter.errors import KernelSandboxError

    spec = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    spec["argv"] = ["/usr/bin/nope", "-f", "{connection_file}"]
    (kernels / "t-argv").mkdir()
    (kernels / "t-argv" / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="t-argv")
    with pytest.raises(KernelSandboxError) as info:
        await km.start_kernel(cwd=str(notebook_dir))
    assert str(info.value).startswith("kernelspec 't-argv': ")
    assert "/usr/bin/nope: command not found" in str(info.value)
    assert info.value.status_code == 500
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner) and p.container is None and p.container_id
    cid = p.container_id
    clean_host.append(cid)  # its run dir and cgroups are gone already
    assert not [t for t in threading.enumerate() if cid in t.name]  # nor its control thread


async def test_sandbox_magics_in_both_kernels(
    clean_host: list[str], started: dict[str, AsyncKernelManager]
) -> None:
    for km in started.values():
        reply, out = await execute(km, "r = %sandbox\nprint(r)")
        assert reply["status"] == "ok", out
        assert "memory limit         1 GiB" in out and "process limit        256" in out
        reply, out = await execute(km, "%sandbox memory=512M pids=200")
        assert reply["status"] == "ok", out
        assert "memory 512 MiB" in out
        provisioner = track(clean_host, km)
        assert provisioner.container is not None
        st = provisioner.container.stats()
        assert st.memory_limit == 512 * 1024**2 and st.pids_limit == 200
        # no ceiling of the admin's: the kernelspec's caps are the most a notebook may ask for
        reply, out = await execute(km, "%sandbox memory=1T")
        assert "memory=1T refused: this server allows at most 1 GiB per kernel" in out, out
        assert provisioner.container.stats().memory_limit == 512 * 1024**2


@pytest.mark.rootless_only
async def test_rootless_without_a_delegated_cgroup(
    clean_host: list[str], kernels: Path, notebook_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rootless server whose user has no delegated cgroup: the kernel does not start and
    the error names the fix; with SandboxPolicy.allow_unenforced_limits it starts, and
    %sandbox says the limits are not enforced."""
    from traitlets.config import Config

    from sandbox_kernel.cgroups import reset_manager_cache

    monkeypatch.setenv("SANDBOX_KERNEL_CGROUP_PARENT", "/sk-no-such-delegation")
    reset_manager_cache()
    try:
        km = AsyncKernelManager(kernel_name="python3-sandbox")
        with pytest.raises(Exception, match="sk-no-such-delegation") as info:
            await km.start_kernel(cwd=str(notebook_dir))
        track(clean_host, km)
        assert "Traceback" not in str(info.value)
        cfg = Config()
        cfg.SandboxPolicy.allow_unenforced_limits = True
        km = AsyncKernelManager(kernel_name="python3-sandbox", config=cfg)
        await km.start_kernel(cwd=str(notebook_dir))
        track(clean_host, km)
        try:
            reply, out = await execute(km, "r = %sandbox\nprint(repr(r))")
            assert reply["status"] == "ok", out
            assert "(not enforced)" in out and "Limits not enforced" in out, out
        finally:
            await km.shutdown_kernel(now=True)
    finally:
        reset_manager_cache()


#: Kernel code for the connection-folder test. It refuses to run unless in a sandbox: PID 1
#: is our init and the product's marker is set (a mistaken run on the host would write to
#: the host's /run).
_CONN_WRITE = r"""
import errno, os
comm = open('/proc/1/comm').read().strip()
if comm != 'sk-runtime' or os.environ.get('JPY_SANDBOX_KERNEL') != '1':
    raise SystemExit('REFUSED: not in a sandbox')
conn = os.path.dirname(os.environ['SANDBOX_KERNEL_CONTROL'])
out = []
for name in ('big', 'kernel.json'):
    try:
        with open(os.path.join(conn, name), 'ab') as f:
            for _ in range(64):  # up to 64 MiB, far beyond the folder's 64K
                f.write(b'x' * (1 << 20))
                f.flush()
        out.append(name + ' OK')
    except (IOError, OSError) as exc:
        out.append(name + ' ' + errno.errorcode.get(exc.errno, str(exc.errno)))
n = 0
try:
    while n < 5000:
        os.mkdir(os.path.join(conn, 'd%d' % n))
        n += 1
    out.append('dirs none refused')
except OSError as exc:
    out.append('dirs ' + errno.errorcode.get(exc.errno, str(exc.errno)))
out.append(conn)
for name in ('/proc/1/cmdline', '/proc/self/mountinfo'):
    out.append(open(name, 'rb').read().decode('utf-8', 'replace').replace('\0', ' '))
print('\n'.join(out))
"""


def _tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*"))


async def test_connection_folder_is_no_host_write_and_shows_no_host_path(
    clean_host: list[str], started: dict[str, AsyncKernelManager]
) -> None:
    """The kernel's connection folder is a small tmpfs of its own: writing 64 MiB or 5000
    folders there ends in ENOSPC (the host's run dir stays small), and what the kernel
    reads about PID 1 and its mounts names neither the run dir nor the state dir. The
    kernel still answers afterwards (its sockets and the control socket live there)."""
    from sandbox_kernel.paths import state_dir

    for km in started.values():
        p = track(clean_host, km)
        reply, out = await execute(km, _CONN_WRITE)
        assert reply["status"] == "ok", out
        lines = out.splitlines()
        # kernel.json: the plan's (EACCES) or, rewritten by an old ipykernel, the kernel's
        assert lines[0] == "big ENOSPC" and lines[2] == "dirs ENOSPC", out
        assert lines[1] in ("kernel.json EACCES", "kernel.json ENOSPC"), out
        assert lines[3] == "/run/sandbox"
        for needle in (str(run_dir()), str(state_dir()), str(p.container_id)):
            assert needle not in "\n".join(lines[4:]), (needle, out)
        assert p.container_id is not None
        assert _tree_bytes(run_dir() / p.container_id) < 1 << 20
        reply, out = await execute(km, "print(6 * 7)")
        assert reply["status"] == "ok" and out.strip() == "42", out


@pytest.mark.parametrize("name", KERNELS)
def test_sandbox_requests_are_answered_under_a_blocking_kernel_manager(
    clean_host: list[str], kernels: Path, notebook_dir: Path, name: str
) -> None:
    """Scripts drive kernels with the blocking KernelManager, whose event loop runs only
    inside its calls: %sandbox (a report, then a live change) is answered while this thread
    sleeps outside any jupyter_client call."""
    import uuid

    from jupyter_client.manager import KernelManager

    done = notebook_dir / f"answered-{uuid.uuid4().hex[:8]}"
    code = (
        "try:\n"
        "    r = %sandbox\n"
        "    print(r)\n"
        "    %sandbox pids=200\n"
        "finally:\n"
        f"    open({done.name!r}, 'w').close()\n"
    )
    km = KernelManager(kernel_name=name)
    km.start_kernel(cwd=str(notebook_dir))
    kc = km.client()
    try:
        provisioner = km.provisioner
        assert isinstance(provisioner, prov.SandboxProvisioner) and provisioner.container_id
        cid = provisioner.container_id
        clean_host.append(cid)
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        msg_id = kc.execute(code)
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # not inside any jupyter_client call
        assert done.exists(), "the cell did not finish"
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        out: list[str] = []
        err: list[str] = []
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                (out if msg["content"]["name"] == "stdout" else err).append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        text = "".join(out)
        assert reply["content"]["status"] == "ok" and not err, (text, err)
        assert "process limit        256" in text and "did not answer" not in text, text
        assert re.search(r"Limits now: memory 1 GiB, cpus [\d.]+, pids 200\n", text), text
        assert provisioner.container is not None
        assert provisioner.container.stats().pids_limit == 200
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        done.unlink(missing_ok=True)
    assert not [t for t in threading.enumerate() if cid in t.name]  # nor its control thread
