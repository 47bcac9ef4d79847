"""The provisioner's Jupyter-side logic, with the container layer replaced by a recorder.

What is real here: jupyter_client's AsyncKernelManager, the provisioner factory (reading
the kernelspec's metadata.kernel_provisioner.config), connection-file writing, the
settings validation and the traitlets config. What is faked: Container (no namespaces) and
the image store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from tornado.web import HTTPError
from traitlets.config import Config

from sandbox_kernel.errors import CgroupError, ContainerNotFound, SandboxError, SpecError
from sandbox_kernel.jupyter import exits, kernelspecs, launch
from sandbox_kernel.jupyter import provisioner as prov
from sandbox_kernel.paths import run_dir
from sandbox_kernel.runtime import userns
from sandbox_kernel.runtime.container import ExitResult
from sandbox_kernel.runtime.phases import Phases
from sandbox_kernel.runtime.spec import Bind, ContainerSpec, IdMap, NetworkMode, Tmpfs

FAKE_RANGE = userns.SubRange(300000, 65536)


def fake_userns() -> userns.UserNamespace:
    """Root mode over a fixed range as root; the caller's single-id map otherwise."""
    if os.geteuid() == 0:
        return userns.root_mode(FAKE_RANGE)
    uid, gid = os.geteuid(), os.getegid()
    return userns.UserNamespace((IdMap(uid, uid, 1),), (IdMap(gid, gid, 1),))


class FakeNetwork:
    """A ``nat`` container's attachment as the provisioner sees it (its figures, its cap)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.bandwidth = config.bandwidth
        self.refused = 0

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "nat",
            "address": "10.213.0.2",
            "allow": [str(e) for e in self.config.allow],
            "bandwidth": self.bandwidth,
            "bytes_in": 1000,
            "bytes_out": 2000,
            "refused": self.refused,
        }


class FakeContainer:
    """Records the spec; 'runs' a host `sleep` as the kernel so signals and exits are real."""

    created: list[FakeContainer] = []
    kernel_code = "import time; time.sleep(60)"

    def __init__(self, spec: ContainerSpec, root: Path, meta: dict[str, Any]) -> None:
        self.spec = spec
        self.id = spec.id
        self.meta = meta
        self.limits = spec.limits
        self.run_dir = root / spec.id
        self.run_dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.setup_us = 1000
        self.destroyed = False
        self.cpu_applied = False
        self.limits_enforced = True
        self._result: ExitResult | None = None
        self.oom = False
        self.shared_fds: list[int] = []
        # the cgroup's cap-hit counters (memory.events oom_kill, pids.events max)
        self.oom_kills = 0
        self.pids_hits = 0
        self.phases = Phases()
        # network 'nat': what the attachment would report (``Attachment.stats``)
        self.network = FakeNetwork(spec.nat) if spec.nat is not None else None

    def network_stats(self) -> dict[str, Any]:
        if self.network is None:
            return {"mode": self.spec.network.value}
        return self.network.stats()

    def set_bandwidth(self, rate_bits: int | None) -> None:
        assert self.network is not None
        self.network.bandwidth = rate_bits

    refreshes = 0

    def refresh_network(self) -> bool:
        self.refreshes += 1
        if self.refreshes == 2:
            raise SandboxError("network_allow entry 'a.example': the host name does not resolve")
        return True

    @classmethod
    def create(
        cls,
        spec: ContainerSpec,
        *,
        meta: dict[str, Any] | None = None,
        subdirs: dict[str, tuple[int, int, int]] | None = None,
        phases: Phases | None = None,
        **_: Any,
    ) -> FakeContainer:
        c = cls(spec, run_dir(), meta or {})
        c.phases = phases or c.phases
        for name, (uid, gid, mode) in (subdirs or {}).items():
            (c.run_dir / name).mkdir(parents=True, mode=mode)
            os.chown(c.run_dir / name, uid, gid)
        cls.created.append(c)
        return c

    @classmethod
    def open(cls, container_id: str) -> Any:
        raise ContainerNotFound(container_id)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, **_: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.kernel_code])

    def shared_dir(self, path: str) -> int:
        """The real one hands over the container's tmpfs at ``path``; here a folder of the
        run dir standing for it, holding the spec's files below ``path`` as the plan would."""
        folder = self.run_dir / "shared" / path.strip("/")
        folder.mkdir(parents=True, exist_ok=True)
        # as the real one: mode 0700, the kernel user's (root mode: its id in the range)
        uid, gid = self.spec.user, self.spec.group
        for m in self.spec.uid_map:
            if m.inside <= self.spec.user < m.inside + m.count:
                uid = m.outside + self.spec.user - m.inside
        for m in self.spec.gid_map:
            if m.inside <= self.spec.group < m.inside + m.count:
                gid = m.outside + self.spec.group - m.inside
        if os.geteuid() == 0:
            os.chown(folder, uid, gid)
        os.chmod(folder, 0o700)
        for name, _mode, content in self.spec.files:
            if name.startswith(path + "/"):
                (folder / name[len(path) + 1 :]).write_text(content)
        fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.shared_fds.append(fd)
        return fd

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def poll(self) -> ExitResult | None:
        if self.proc is None or self.proc.poll() is None:
            return self._result
        if self._result is None:
            rc = self.proc.returncode
            sig = -rc if rc < 0 else None
            self._result = ExitResult(
                status=128 + sig if sig else rc,
                code=None if sig else rc,
                signal=sig,
                oom_killed=self.oom_kills > 0,
                memory_limit=self.limits.memory,
                memory_peak=self.limits.memory if self.oom_kills else 1,
                pids_limit_hit=self.pids_hits > 0,
                pids_limit=self.limits.pids,
                oom_kills=self.oom_kills,
                pids_limit_hits=self.pids_hits,
            )
        return self._result

    def apply_deferred_cpu(self) -> None:
        self.cpu_applied = True

    def update(self, limits: Any) -> None:
        self.limits = limits

    def stats(self) -> Any:
        from sandbox_kernel.cgroups.base import CgroupStats

        return CgroupStats(
            100 * 1024**2,
            100 * 1024**2,
            self.limits.memory,
            0,
            None,
            100_000,
            3,
            self.limits.pids,
            self.oom_kills,
            self.pids_hits,
        )

    def destroy(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.destroyed = True
        for fd in self.shared_fds:
            os.close(fd)
        self.shared_fds.clear()
        import shutil

        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def fake_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(run))
    monkeypatch.setattr(prov, "Container", FakeContainer)
    FakeContainer.created = []

    def fake_image(name: str, context: str, ipykernel_layer: str = "") -> launch.KernelImage:
        if name.split(":")[0] not in ("python3", "python2.7"):
            raise SpecError(f"image={name!r} is not in the image store", context=context)
        layer = (str(tmp_path / ipykernel_layer),) if ipykernel_layer else ()
        return launch.KernelImage(
            ref=f"{name}:latest",
            layers=(*layer, str(tmp_path)),
            env=(("IMAGE_VAR", "1"), ("PATH", "/usr/bin:/bin")),
            argv=("/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
            digest="sha256:abc",
            ipykernel_path="/opt/sandbox-kernel/ipykernel" if ipykernel_layer else "",
        )

    monkeypatch.setattr(launch, "find_image", fake_image)
    # fixed maps: unit tests never reserve an id range on the host
    monkeypatch.setattr(userns, "for_caller", fake_userns)
    monkeypatch.setattr(userns, "idmap_supported", lambda path: True)
    kernelspecs.register_provisioner_in_process()
    return run


@pytest.fixture
def kernel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A JUPYTER_PATH with the two shipped kernelspecs plus one per test that writes it."""
    jp = tmp_path / "jupyter"
    kernelspecs.install(None, prefix=str(jp))
    monkeypatch.setenv("JUPYTER_PATH", str(jp / "share" / "jupyter"))
    return jp / "share" / "jupyter" / "kernels"


def add_spec(
    kernels: Path, name: str, config: dict[str, Any], argv: list[str] | None = None
) -> None:
    # the fake kernel never answers kernel_info: the CPU cap comes after this timeout
    config = {"cpu_defer_timeout": 0.3, **config}
    d = kernels / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(
        json.dumps(
            {
                "argv": argv
                if argv is not None
                else ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"Test {name}",
                "language": "python",
                "interrupt_mode": "signal",
                "env": {"SPEC_VAR": "from-spec"},
                "metadata": {
                    "kernel_provisioner": {
                        "provisioner_name": "sandbox-provisioner",
                        "config": config,
                    }
                },
            }
        )
    )


async def test_start_writes_ipc_connection_and_container_spec(  # noqa: PLR0915
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_spec(kernel_dir, "t-ok", {"image": "python3", "memory": "512M", "cpus": 0.5, "pids": 64})
    nb = tmp_path / "nb"
    nb.mkdir()
    if os.geteuid() == 0:
        os.chown(nb, 1000, 1000)
    monkeypatch.setenv("HOST_SECRET", "do-not-leak")
    km = AsyncKernelManager(kernel_name="t-ok")
    await km.start_kernel(
        cwd=str(nb), env={**os.environ, "JPY_PARENT_PID": "4242", "JPY_SESSION_NAME": "x"}
    )
    try:
        c = FakeContainer.created[-1]
        spec = c.spec
        conn = launch.CONN_TARGET  # inside: no host path
        assert km.transport == "ipc"
        # the kernel's file, written by the plan into its connection folder (a tmpfs)
        ((path, mode, text),) = spec.files
        assert (path, mode) == (f"{conn}/kernel.json", 0o644)
        info = json.loads(text)
        assert info["transport"] == "ipc" and info["ip"] == f"{conn}/k"
        assert info["key"] == km.session.key.decode() and info["shell_port"] > 0
        # the server reaches that folder through its descriptor, never a host folder
        p = km.provisioner
        assert isinstance(p, prov.SandboxProvisioner) and p._conn_fd is not None
        fd = p._conn_fd
        assert os.path.samefile(f"/proc/self/fd/{fd}", c.shared_dir(conn))
        # Jupyter's file: the output relay's sockets, in the server's own folder of the run dir
        relay_dir = fake_runtime / spec.id / launch.RELAY_SUBDIR
        assert km.ip == f"{relay_dir}/k"
        assert km.connection_file == str(relay_dir / "kernel.json")
        assert oct(relay_dir.stat().st_mode & 0o777) == "0o700"
        mine = json.loads(Path(km.connection_file).read_text())
        assert mine["ip"] == km.ip and mine["key"] == info["key"]
        assert mine["shell_port"] == info["shell_port"]
        # the in-container command: "python3" is not rewritten into the host interpreter
        assert list(spec.command) == [
            "python3",
            "-m",
            "ipykernel_launcher",
            "-f",
            f"{conn}/kernel.json",
            "--ext=sandbox_magics",  # the %sandbox magics, mounted read-only
        ]
        env = dict(spec.env)
        assert env["SPEC_VAR"] == "from-spec" and env["IMAGE_VAR"] == "1"
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"
        for leaked in ("HOST_SECRET", "JPY_SESSION_NAME", "HOME"):
            assert leaked not in env
        assert env["JPY_PARENT_PID"] == "1"  # the container's init, not the host's 4242
        assert spec.workdir == str(nb)
        root_mode = os.geteuid() == 0  # idmapped: the kernel's files keep the folder's owner
        assert Bind(str(nb), str(nb), readonly=False, idmap=root_mode) in spec.mounts
        # the connection folder: a small shared tmpfs; no writable host folder but nb
        assert Tmpfs(conn, launch.IPC_TMPFS_SIZE, 0o700, shared=True) in spec.mounts
        assert Bind(str(launch.MAGICS_SOURCE), launch.MAGICS_TARGET, readonly=True) in spec.mounts
        assert len(spec.mounts) == 3
        assert [m.source for m in spec.mounts if isinstance(m, Bind) and not m.readonly] == [
            str(nb)
        ]
        assert env["PYTHONPATH"] == launch.MAGICS_TARGET
        assert env["SANDBOX_KERNEL_CONTROL"] == f"{conn}/control"
        assert Path(f"/proc/self/fd/{fd}/control").is_socket()
        assert spec.limits.memory == 512 * 1024**2 and spec.limits.cpus == 0.5
        assert spec.limits.pids == 64 and spec.limits.defer_cpu
        assert spec.bytes_per_inode == 16384  # the setting's default: the tmpfs inode caps
        if os.geteuid() == 0:
            assert (spec.user, spec.group) == (1000, 1000)  # inside; on the host: the range's
            host = FAKE_RANGE.start + 1000
            assert os.stat(f"/proc/self/fd/{fd}/control").st_uid == host
            assert spec.uid_map == ((IdMap(0, FAKE_RANGE.start, FAKE_RANGE.count)),)
            assert spec.idmap_layers
        assert c.meta["kernel_id"] == km.kernel_id and c.meta["kernelspec"] == "t-ok"
        assert c.cpu_applied  # after the (timed-out) wait for kernel_info in post_launch
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel(now=True)
    assert c.destroyed
    assert not (fake_runtime / spec.id).exists()


async def test_jupyter_connects_to_the_relay_with_the_kernels_ports_and_key(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-relay", {"image": "python3"})
    km = AsyncKernelManager(kernel_name="t-relay")
    await km.start_kernel(cwd=str(tmp_path))
    try:
        spec = FakeContainer.created[-1].spec
        relay_dir = fake_runtime / spec.id / "relay"
        # Jupyter's sockets are the relay's, in a folder the kernel never sees (not mounted)
        assert km.transport == "ipc"
        assert km.ip == f"{relay_dir}/k"
        assert km.connection_file == f"{relay_dir}/kernel.json"
        assert all(str(relay_dir) not in str(m) for m in spec.mounts)
        client = json.loads(Path(km.connection_file).read_text())
        ((_, _, text),) = spec.files  # the kernel's, written into its tmpfs by the plan
        info = json.loads(text)
        assert {k: v for k, v in info.items() if k not in ("ip", "jupyter_session")} == {
            k: v for k, v in client.items() if k not in ("ip", "jupyter_session")
        }
        st = relay_dir.stat()
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (os.geteuid(), "0o700")
        assert all(
            (relay_dir / f"k-{client[f'{ch}_port']}").is_socket() for ch in ("shell", "iopub")
        )
    finally:
        await km.shutdown_kernel(now=True)


async def test_restart_reuses_the_connection_directory(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-rs", {"image": "python3"})
    km = AsyncKernelManager(kernel_name="t-rs")
    await km.start_kernel(cwd=str(tmp_path))
    first = FakeContainer.created[-1]
    conn, ip = km.connection_file, km.ip
    await km.restart_kernel(now=True)
    second = FakeContainer.created[-1]
    assert first is not second and first.destroyed and not second.destroyed
    # same endpoints: the new container's socket folder took the old one's descriptor
    assert km.connection_file == conn and Path(conn).exists() and km.ip == ip
    assert first.spec.id == second.spec.id
    await km.shutdown_kernel(now=True)
    assert second.destroyed


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image": "python3", "memory": "lots"}, "memory='lots' is not a size"),
        ({"image": "python3", "cpus": "fast"}, "cpus='fast' is not a CPU count"),
        ({"image": "python3", "pids": 2}, "pids=2 is too small"),
        ({"image": "python3", "tmp_size": "x"}, "tmp_size='x' is not a size"),
        ({"image": "python3", "writable_size": "x"}, "writable_size='x' is not a size"),
        ({"image": "python3", "extra_mounts": ["/etc"]}, "extra_mounts entry '/etc' is malformed"),
        ({"image": "python3", "extra_mounts": "oops"}, "extra_mounts entry 'oops' is malformed"),
        ({"image": "python3", "env": {"A": 1}}, "env={'A': 1} has the wrong type"),
        ({"image": "python3", "network": "host"}, "network='host' is not available"),
        ({"image": "python3", "user": "0"}, "user='0' is root"),
        ({"image": "python3", "user": [1]}, "user=[1] has the wrong type"),
        ({"image": "nope"}, "image='nope' is not in the image store"),
        ({"memory": "1G"}, "image='' is missing or empty"),
        ({"image": "python3", "colour": "red"}, "'colour' is not a sandbox setting"),
        (
            {"image": "python3", "ipykernel_layer": "python2.7"},
            "ipykernel_layer='python2.7' is not an ipykernel layer",
        ),
    ],
)
async def test_bad_kernelspec_config_fails_start_with_a_clear_error(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    add_spec(kernel_dir, "t-bad", config)
    km = AsyncKernelManager(kernel_name="t-bad")
    with pytest.raises(SpecError) as info:
        await km.start_kernel(cwd=str(tmp_path))
    assert str(info.value).startswith("kernelspec 't-bad': ")
    assert message in str(info.value)
    # jupyter_server puts an HTTPError's log_message in the REST reply (others: "Unhandled error")
    assert isinstance(info.value, HTTPError) and info.value.status_code == 400
    assert message in (info.value.log_message or "")
    assert not FakeContainer.created


async def test_admin_ceiling_from_config_beats_the_kernelspec(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-big", {"image": "python3", "memory": "8G"})
    cfg = Config()
    cfg.SandboxPolicy.max_memory = "4G"
    km = AsyncKernelManager(kernel_name="t-big", config=cfg)
    with pytest.raises(
        SpecError, match=r"memory='8G' is above the administrator's ceiling \(SandboxPolicy"
    ):
        await km.start_kernel(cwd=str(tmp_path))


async def test_config_file_settings_apply_and_kernelspec_overrides(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-cfg", {"image": "python3", "pids": 100})
    cfg = Config()
    cfg.SandboxProvisioner.memory = "300M"
    cfg.SandboxProvisioner.pids = 50
    cfg.SandboxProvisioner.env = {"FROM_CONFIG": "1"}
    km = AsyncKernelManager(kernel_name="t-cfg", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    try:
        spec = FakeContainer.created[-1].spec
        assert spec.limits.memory == 300 * 1024**2
        assert spec.limits.pids == 100
        assert dict(spec.env)["FROM_CONFIG"] == "1"
    finally:
        await km.shutdown_kernel(now=True)


async def test_empty_kernelspec_argv_falls_back_to_the_image_label(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-label", {"image": "python3"}, argv=[])
    km = AsyncKernelManager(kernel_name="t-label")
    await km.start_kernel(cwd=str(tmp_path))
    try:
        spec = FakeContainer.created[-1].spec
        assert list(spec.command) == [
            "/usr/bin/python3",
            "-m",
            "ipykernel_launcher",
            "-f",
            f"{launch.CONN_TARGET}/kernel.json",
            "--ext=sandbox_magics",
        ]
    finally:
        await km.shutdown_kernel(now=True)


async def test_signals_reach_the_container_and_death_reason_is_kept(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_spec(kernel_dir, "t-sig", {"image": "python3", "memory": "512M"})
    km = AsyncKernelManager(kernel_name="t-sig")
    km.log = logging.getLogger("test-sandbox")
    await km.start_kernel(cwd=str(tmp_path))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    c = FakeContainer.created[-1]
    c.oom_kills = 1
    assert c.proc is not None
    c.proc.send_signal(signal.SIGKILL)  # as the OOM killer would
    c.proc.wait()
    p.log = logging.getLogger("test-sandbox")
    with caplog.at_level(logging.WARNING, logger="test-sandbox"):
        assert await p.poll() == 128 + 9
    assert (
        f"kernel {km.kernel_id} (Test t-sig) stopped: out of memory (limit 512 MiB, peak 512 MiB)"
        in caplog.text
    )
    assert p.last_exit is not None and p.last_exit["oom_killed"]
    saved = exits.read_last_exit(str(km.kernel_id))
    assert saved is not None and saved["reason"].startswith("out of memory")
    # the reason survives a restart, and goes with the final shutdown
    await km.restart_kernel(now=True)
    assert exits.read_last_exit(str(km.kernel_id)) is not None
    await km.shutdown_kernel(now=True)
    assert exits.read_last_exit(str(km.kernel_id)) is None


@pytest.fixture
def why_kernel(fake_runtime: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec (pids=100) whose fake kernel survives an interrupt and answers a shutdown
    as ipykernel does (exit 0, here on SIGTERM); every poll that sees it alive moves the cap
    baseline on (no waiting a second)."""
    monkeypatch.setattr(exits, "SURVIVED_S", 0.0)
    monkeypatch.setattr(
        FakeContainer,
        "kernel_code",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(60)",
    )
    add_spec(kernel_dir, "t-why", {"image": "python3", "pids": 100})
    return "t-why"


def previous_exit() -> Any:
    """What the running (fake) kernel's %sandbox is told of the previous one's death."""
    path = control_path(FakeContainer.created[-1])
    return ask(path, {"op": "get"})["info"]["previous_exit"]


async def test_a_requested_restart_is_reported_as_such_after_a_cap_hit(
    why_kernel: str, tmp_path: Path
) -> None:
    km = AsyncKernelManager(kernel_name=why_kernel)
    await km.start_kernel(cwd=str(tmp_path))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    try:
        # a cell hit the pids cap and the kernel lived on; then a restart, answered cleanly
        c = FakeContainer.created[-1]
        await asyncio.sleep(0.3)  # the fake kernel sets its signal handlers
        c.pids_hits = 5
        assert await km.is_alive() and await km.is_alive()
        await p.shutdown_requested(restart=True)
        assert c.proc is not None
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 0
        assert await p.poll() == 0
        assert p.last_exit is not None
        assert p.last_exit["reason"] == "exited with code 0 (restart requested)", p.last_exit
        assert exits.read_last_exit(str(km.kernel_id)) is None  # nothing to explain
        await km.restart_kernel(now=True)
        assert await asyncio.to_thread(previous_exit) is None
        # a cap hit just now, then a forced restart (SIGKILL): the restart is the reason
        FakeContainer.created[-1].pids_hits = 2
        await asyncio.sleep(0.3)
        await km.restart_kernel(now=True)
        assert p.last_exit is not None
        assert p.last_exit["reason"] == "killed by SIGKILL (stopped by the server)"
        assert not p.last_exit["pids_limit_hit"]
        assert await asyncio.to_thread(previous_exit) is None
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_cap_hit_is_blamed_only_for_a_death_right_after_it(
    why_kernel: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    km = AsyncKernelManager(kernel_name=why_kernel)
    await km.start_kernel(cwd=str(tmp_path))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    p.log = logging.getLogger("test-sandbox")
    try:
        # an OOM kill the kernel survived, then a crash of its own: the crash is the reason
        c = FakeContainer.created[-1]
        c.oom_kills = 1
        assert await km.is_alive() and await km.is_alive()
        assert c.proc is not None
        c.proc.send_signal(signal.SIGSEGV)
        c.proc.wait(10)
        assert not await km.is_alive()
        assert p.last_exit is not None and p.last_exit["reason"] == "killed by SIGSEGV"
        await km.restart_kernel(now=True)
        assert (await asyncio.to_thread(previous_exit))["reason"] == "killed by SIGSEGV"
        # a cap hit right before a death nobody asked for is still blamed, and kept
        c = FakeContainer.created[-1]
        c.pids_hits = 3
        assert c.proc is not None
        c.proc.kill()
        c.proc.wait(10)
        with caplog.at_level(logging.WARNING, logger="test-sandbox"):
            assert not await km.is_alive()
        reason = "killed by SIGKILL; the process limit (100) was reached"
        assert f"stopped: {reason}" in caplog.text
        saved = exits.read_last_exit(str(km.kernel_id))
        assert saved is not None and saved["reason"] == reason and saved["pids_limit_hit"]
    finally:
        await km.shutdown_kernel(now=True)


async def test_interrupt_sends_sigint(fake_runtime: Path, kernel_dir: Path, tmp_path: Path) -> None:
    add_spec(kernel_dir, "t-int", {"image": "python3"})
    km = AsyncKernelManager(kernel_name="t-int")
    await km.start_kernel(cwd=str(tmp_path))
    c = FakeContainer.created[-1]
    await km.interrupt_kernel()
    assert c.proc is not None
    assert c.proc.wait(10) == -signal.SIGINT
    assert not await km.is_alive()
    await km.shutdown_kernel(now=True)


async def test_provisioner_info_round_trip(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-info", {"image": "python3"})
    km = AsyncKernelManager(kernel_name="t-info")
    await km.start_kernel(cwd=str(tmp_path))
    try:
        p = km.provisioner
        assert isinstance(p, prov.SandboxProvisioner)
        info = await p.get_provisioner_info()
        assert info["container_id"] == p.container_id and info["kernel_id"] == km.kernel_id
        other = prov.SandboxProvisioner(
            kernel_id="x", kernel_spec=KernelSpec(display_name="x"), parent=None
        )
        await other.load_provisioner_info(info)
        assert other.container_id == p.container_id and other.cwd == str(tmp_path)
    finally:
        await km.shutdown_kernel(now=True)


def test_timings() -> None:
    p = prov.SandboxProvisioner(
        kernel_id="x", kernel_spec=KernelSpec(display_name="x"), parent=None
    )
    assert p.get_shutdown_wait_time(5.0) == 5.0
    assert p.get_stable_start_time(10.0) >= 10.0
    assert not p.has_process


# ---- the CLI of the Jupyter layer: kernelspec install/ls, ps, doctor ----------------------------
def test_kernelspec_install_and_ls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    from sandbox_kernel.cli import main

    prefix = tmp_path / "p"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    assert (
        main(["kernelspec", "install", "--prefix", str(prefix), "--memory", "2G", "--pids", "300"])
        == 0
    )
    specs = KernelSpecManager().find_kernel_specs()
    for name, image, exe in (
        ("python2.7-sandbox", "python2.7-plot", "/usr/bin/python2.7"),
        ("python3-sandbox", "python3-plot", "/usr/bin/python3"),
    ):
        data = json.loads((Path(specs[name]) / "kernel.json").read_text())
        assert data["argv"] == [exe, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        assert data["interrupt_mode"] == "signal"
        prov_cfg = data["metadata"]["kernel_provisioner"]
        assert prov_cfg["provisioner_name"] == "sandbox-provisioner"
        assert prov_cfg["config"] == {"image": image, "memory": "2G", "cpus": 1, "pids": 300}
    assert (
        KernelSpecManager().get_kernel_spec("python3-sandbox").display_name == "Python 3 (sandbox)"
    )
    capsys.readouterr()
    assert main(["kernelspec", "ls"]) == 0
    out = capsys.readouterr().out
    assert "python2.7-sandbox" in out and "Python 2.7 (sandbox)" in out and "memory=2G" in out


def test_kernelspec_install_refuses_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_kernel.cli import main

    code = main(
        ["kernelspec", "install", "--prefix", str(tmp_path), "--memory", "lots", "--cpus", "0"]
    )
    assert code == 125
    err = capsys.readouterr().err
    assert "memory='lots' is not a size" in err and "cpus='0' must be more than 0" in err
    assert not (tmp_path / "share").exists()
    assert main(["kernelspec", "install", "--prefix", str(tmp_path), "--image", "x"]) == 2


def test_ps_reads_the_run_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernel.cli import ps
    from sandbox_kernel.runtime.rundir import proc_starttime as _proc_starttime

    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(tmp_path))
    for cid, pid in (("sk-00000000000a", os.getpid()), ("sk-00000000000b", 2**22 + 7)):
        d = tmp_path / cid
        d.mkdir()
        (d / "meta.json").write_text(
            json.dumps(
                {
                    "id": cid,
                    "image": "python3:latest",
                    "user": 1000,
                    "group": 1000,
                    "limits": {"memory": 1024**3, "cpus": 1.0, "pids": 256, "defer_cpu": False},
                    "created": 1000.0,
                    "kernel_id": "kid-" + cid[-1],
                    "kernelspec": "python3-sandbox",
                }
            )
        )
        (d / "pid").write_text(json.dumps({"pid": pid, "start": _proc_starttime(pid)}))
    (tmp_path / "kernels").mkdir()  # not a container
    rows = ps.collect(tmp_path)
    assert [r["container_id"] for r in rows] == ["sk-00000000000a"]  # b's executor is gone
    row = rows[0]
    assert row["kernel_id"] == "kid-a" and row["user"] == 1000 and row["limits"]["pids"] == 256
    assert len(ps.collect(tmp_path, include_stopped=True)) == 2
    table = ps.format_table(rows)
    assert "sk-00000000000a" in table and "python3-sandbox" in table and "1 GiB" in table


def test_doctor_lines_and_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_kernel.cli import doctor

    results = doctor.run_checks()
    whats = " ".join(r.what for r in results)
    for probe in ("cgroup", "overlayfs", "namespaces", "executor", "image python3", "kernelspec"):
        assert probe in whats
    for r in results:
        assert r.status in (doctor.OK, doctor.WARN, doctor.FAIL)
        assert r.status == doctor.OK or r.fix, r  # every problem says how to fix it
    monkeypatch.setattr(doctor, "CHECKS", (lambda: [doctor.Check(doctor.FAIL, "x", "do y")],))
    assert doctor.doctor_command(None) == 1  # type: ignore[arg-type]
    assert "FAIL  x  — do y" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "CHECKS", (lambda: [doctor.Check(doctor.WARN, "w", "z")],))
    assert doctor.doctor_command(None) == 0  # type: ignore[arg-type]


def test_doctor_as_root_says_what_an_old_kernel_lacks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Root mode idmaps notebook folders and layers (Linux 5.12); on an older kernel doctor
    says kernels cannot start there, and the way out."""
    from sandbox_kernel.cli import doctor
    from sandbox_kernel.runtime import userns

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(userns, "reserve_range", lambda: userns.SubRange(196608, 65536))
    monkeypatch.setattr(doctor, "_kernel_version", lambda: (5, 10))
    monkeypatch.setattr(userns, "idmap_supported", lambda path: True)
    lines = doctor.check_identity()
    old = [c for c in lines if c.status == doctor.FAIL]
    assert len(old) == 1 and "5.12" in old[0].what and "rootless" in old[0].fix
    monkeypatch.setattr(doctor, "_kernel_version", lambda: (6, 1))
    assert all(c.status == doctor.OK for c in doctor.check_identity())
    monkeypatch.setattr(userns, "idmap_supported", lambda path: False)
    store = [c for c in doctor.check_identity() if c.status == doctor.FAIL]
    assert len(store) == 1 and "image store" in store[0].what and "ext4" in store[0].fix


def control_path(c: FakeContainer) -> str:
    """The control socket the kernel reaches as SANDBOX_KERNEL_CONTROL, from the host: in
    the container's connection folder, by its descriptor."""
    inside = dict(c.spec.env)["SANDBOX_KERNEL_CONTROL"]
    folder, name = inside.rsplit("/", 1)
    return f"/proc/self/fd/{c.shared_dir(folder)}/{name}"


def ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data))


async def test_control_channel_reports_and_changes_limits_within_the_policy(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-ctl", {"image": "python3", "memory": "1G", "pids": 100})
    cfg = Config()
    cfg.SandboxPolicy.max_memory = "2G"
    km = AsyncKernelManager(kernel_name="t-ctl", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    try:
        c = FakeContainer.created[-1]
        path = control_path(c)
        info = (await asyncio.to_thread(ask, path, {"op": "get"}))["info"]
        assert info["limits"]["memory"] == 1024**3 and info["limits"]["pids"] == 100
        assert info["ceilings"]["memory"] == "2 GiB" and info["previous_exit"] is None
        assert info["kernelspec"] == "t-ctl" and info["image"] == "python3:latest"
        # asked with this loop blocked (a blocking KernelManager between its calls): the
        # control thread answers, and the change goes through the same checks
        reply = ask(path, {"op": "set", "memory": "1.5G", "pids": 80})
        assert reply["ok"], reply
        assert c.limits.memory == int(1.5 * 1024**3) and c.limits.pids == 80
        reply = await asyncio.to_thread(ask, path, {"op": "set", "memory": "4G"})
        assert not reply["ok"] and "at most 2 GiB" in reply["error"]
        cgroup_file = "/sys/fs/cgroup/sandbox-kernel/sk-0123456789ab/memory.max"

        def refused(limits: Any) -> None:  # the cgroup write failing (its error names it)
            raise CgroupError(f"writing '1' to {cgroup_file}: Invalid argument")

        c.update = refused  # type: ignore[method-assign]
        reply = await asyncio.to_thread(ask, path, {"op": "set", "memory": "1G"})
        assert not reply["ok"] and "could not apply" in reply["error"]
        assert "/sys" not in reply["error"] and "cgroup" not in reply["error"], "no host path"
        del c.update
        assert c.limits.memory == int(1.5 * 1024**3)
        # no ceiling of the admin's for pids: the kernelspec's 100 is the most
        reply = await asyncio.to_thread(ask, path, {"op": "set", "pids": 200})
        assert not reply["ok"] and "at most 100 processes" in reply["error"], reply
        assert "the kernelspec's value" in reply["error"] and c.limits.pids == 80
        # after a death the next kernel is told why
        c.oom_kills = 1
        assert c.proc is not None
        c.proc.kill()
        c.proc.wait()
        assert await km.is_alive() is False
        await km.restart_kernel(now=True)
        path = control_path(FakeContainer.created[-1])
        info = (await asyncio.to_thread(ask, path, {"op": "get"}))["info"]
        assert info["previous_exit"]["oom_killed"] is True
        # the live changes outlive the restart; the kernelspec's caps stay the live ceiling
        assert info["limits"]["memory"] == int(1.5 * 1024**3) and info["limits"]["pids"] == 80
        assert info["ceiling_values"] == {
            "memory": 2 * 1024**3,
            "cpus": 1.0,
            "pids": 100,
            "bandwidth": None,
        }
        assert FakeContainer.created[-1].spec.limits.pids == 80
        # a restart the user asked for is not a death to explain
        await km.restart_kernel(now=True)
        path = control_path(FakeContainer.created[-1])
        info = (await asyncio.to_thread(ask, path, {"op": "get"}))["info"]
        assert info["previous_exit"] is None
    finally:
        await km.shutdown_kernel(now=True)
    assert not Path(path).exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("sandbox-control")]


@pytest.mark.skipif(os.geteuid() != 0, reason="network 'nat' needs a root server")
async def test_nat_kernel_bandwidth_shown_changed_live_within_the_ceiling_and_kept(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    """A ``nat`` kernel's %sandbox report has its network; bandwidth= changes the link's
    cap live within SandboxPolicy.max_bandwidth (refused above it, with the usual message),
    and a restart keeps it, as it keeps memory=."""
    add_spec(
        kernel_dir,
        "t-nat",
        {"image": "python3", "network": "nat", "network_allow": ["198.18.0.0/24:80"]},
    )
    add_spec(kernel_dir, "t-none", {"image": "python3"})
    cfg = Config()
    cfg.SandboxPolicy.allowed_networks = ["none", "nat"]
    cfg.SandboxPolicy.network_allow = ["198.18.0.0/15"]
    cfg.SandboxPolicy.max_bandwidth = "16mbit"
    km = AsyncKernelManager(kernel_name="t-nat", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    try:
        c = FakeContainer.created[-1]
        assert c.spec.network is NetworkMode.NAT and c.spec.nat is not None
        assert c.spec.nat.bandwidth == 16_000_000, "no bandwidth of its own: the ceiling"
        assert [str(e) for e in c.spec.nat.allow] == ["198.18.0.0/24:80"]
        path = control_path(c)
        info = (await asyncio.to_thread(ask, path, {"op": "get"}))["info"]
        assert info["network"]["mode"] == "nat" and info["network"]["bandwidth"] == 16_000_000
        assert info["ceilings"]["bandwidth"] == "16mbit"
        reply = await asyncio.to_thread(ask, path, {"op": "set", "bandwidth": "8mbit"})
        assert reply["ok"] and reply["limits"]["bandwidth"] == 8_000_000, reply
        assert c.network is not None and c.network.bandwidth == 8_000_000
        reply = await asyncio.to_thread(ask, path, {"op": "set", "bandwidth": "32mbit"})
        assert not reply["ok"] and "at most 16mbit in each direction" in reply["error"], reply
        reply = await asyncio.to_thread(ask, path, {"op": "set", "bandwidth": "8"})
        assert not reply["ok"] and "has no unit" in reply["error"], reply
        assert c.network.bandwidth == 8_000_000
        await km.restart_kernel(now=True)
        again = FakeContainer.created[-1]
        assert again is not c and again.spec.nat is not None
        assert again.spec.nat.bandwidth == 8_000_000, "the live bandwidth outlives a restart"
    finally:
        await km.shutdown_kernel(now=True)
    km = AsyncKernelManager(kernel_name="t-none", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    try:
        path = control_path(FakeContainer.created[-1])
        info = (await asyncio.to_thread(ask, path, {"op": "get"}))["info"]
        assert info["network"] == {"mode": "none"}
        reply = await asyncio.to_thread(ask, path, {"op": "set", "bandwidth": "8mbit"})
        assert not reply["ok"] and "network 'none'" in reply["error"], reply
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_nat_kernels_host_names_are_resolved_again_while_it_runs(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Allow-listed host names are resolved again every REFRESH_S seconds while the kernel
    runs (a name that stops resolving is logged and the refreshing goes on); a list of
    networks only is never refreshed; the shutdown stops it."""
    from sandbox_kernel.network import nat

    monkeypatch.setattr(nat, "REFRESH_S", 0.05)
    for name, allow in (("t-names", ["a.example:443"]), ("t-nets", ["198.18.0.0/24"])):
        add_spec(kernel_dir, name, {"image": "python3", "network": "nat", "network_allow": allow})
    cfg = Config()
    cfg.SandboxPolicy.allowed_networks = ["none", "nat"]
    cfg.SandboxPolicy.network_allow = ["a.example:443", "198.18.0.0/15"]
    km = AsyncKernelManager(kernel_name="t-names", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    c = FakeContainer.created[-1]
    try:
        deadline = time.monotonic() + 10
        while c.refreshes < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert c.refreshes >= 3, "refreshed again after the failed one"
    finally:
        await km.shutdown_kernel(now=True)
    stopped = c.refreshes
    await asyncio.sleep(0.2)
    assert c.refreshes == stopped, "the shutdown stops it"
    km = AsyncKernelManager(kernel_name="t-nets", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    try:
        await asyncio.sleep(0.2)
        assert FakeContainer.created[-1].refreshes == 0
    finally:
        await km.shutdown_kernel(now=True)


async def test_notebook_folder_read_only_from_the_kernelspec_or_the_config(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    """notebook_folder='ro' (a kernelspec's, or the grader's config) mounts the folder
    read-only; the default is read-write."""
    add_spec(kernel_dir, "t-ro", {"image": "python3", "notebook_folder": "ro"})
    add_spec(kernel_dir, "t-rw", {"image": "python3"})
    cases = [
        ("t-ro", None, True),
        ("t-rw", None, False),
        ("t-rw", Config({"SandboxProvisioner": {"notebook_folder": "ro"}}), True),
    ]
    for name, config, readonly in cases:
        km = AsyncKernelManager(kernel_name=name, **({"config": config} if config else {}))
        await km.start_kernel(cwd=str(tmp_path))
        try:
            spec = FakeContainer.created[-1].spec
            (bind,) = [m for m in spec.mounts if isinstance(m, Bind) and m.target == str(tmp_path)]
            assert bind.readonly is readonly, (name, config)
        finally:
            await km.shutdown_kernel(now=True)


async def test_ipykernel_layer_on_top_and_on_pythonpath(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    """A kernelspec written by `kernelspec add` for an image without ipykernel: the layer it
    names is the top-most, its packages on PYTHONPATH after the magics'."""
    layer = "sandbox-kernel-ipykernel:cp311-x"
    add_spec(kernel_dir, "t-layer", {"image": "python3", "ipykernel_layer": layer})
    km = AsyncKernelManager(kernel_name="t-layer")
    await km.start_kernel(cwd=str(tmp_path))
    try:
        spec = FakeContainer.created[-1].spec
        assert spec.layers == (str(tmp_path / layer), str(tmp_path))
        env = dict(spec.env)
        assert env["PYTHONPATH"] == f"{launch.MAGICS_TARGET}:/opt/sandbox-kernel/ipykernel"
    finally:
        await km.shutdown_kernel(now=True)


async def test_magics_only_for_ipykernel_and_can_be_turned_off(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-nomagic", {"image": "python3", "magics": False})
    add_spec(
        kernel_dir,
        "t-other",
        {"image": "python3"},
        argv=["/usr/bin/other-kernel", "{connection_file}"],
    )
    for name in ("t-nomagic", "t-other"):
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel(cwd=str(tmp_path))
        try:
            spec = FakeContainer.created[-1].spec
            assert not any(a.startswith("--ext") for a in spec.command)
            assert all(m.target != launch.MAGICS_TARGET for m in spec.mounts)
            assert "PYTHONPATH" not in dict(spec.env)
        finally:
            await km.shutdown_kernel(now=True)


async def test_a_relay_that_fails_to_start_is_closed_and_the_folder_fd_too(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.jupyter import relay as relay_mod

    made: list[relay_mod.Relay] = []
    seen: list[prov.SandboxProvisioner] = []
    connect = prov.SandboxProvisioner._connect

    async def spy(self: prov.SandboxProvisioner, container: Any) -> None:
        seen.append(self)
        await connect(self, container)

    def failing_start(self: relay_mod.Relay) -> None:
        made.append(self)
        raise RuntimeError("relay could not bind")

    monkeypatch.setattr(prov.SandboxProvisioner, "_connect", spy)
    monkeypatch.setattr(relay_mod.Relay, "start", failing_start)
    add_spec(kernel_dir, "t-relayfail", {"image": "python3"})
    km = AsyncKernelManager(kernel_name="t-relayfail")
    with pytest.raises(RuntimeError, match="relay could not bind"):
        await km.start_kernel(cwd=str(tmp_path))
    assert made and made[0].context.closed
    assert seen and seen[0]._conn_fd is None and seen[0]._relay is None


async def test_the_deferred_cpu_cap_skips_a_container_replaced_while_it_waited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = prov.SandboxProvisioner()

    async def answered(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(prov, "_wait_kernel_info", answered)

    class Old:
        def __init__(self) -> None:
            self.cpu_applied = False
            self.phases = Phases()
            self.proc = subprocess.Popen(  # alive while the cap waits
                [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
            )

        def apply_deferred_cpu(self) -> None:
            self.cpu_applied = True

    old = Old()
    waiting, lock = threading.Event(), threading.Lock()

    class Watched:  # the limits lock, telling when the cap waits for it
        def __enter__(self) -> None:
            waiting.set()
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            lock.release()

    p._limits_lock = Watched()  # type: ignore[assignment]
    p.container = old  # type: ignore[assignment]
    try:
        lock.acquire()  # a restart holds the lock
        task = asyncio.ensure_future(p._apply_cpu_when_ready(old))  # type: ignore[arg-type]
        for _ in range(1000):
            if waiting.is_set() or task.done():
                break
            await asyncio.sleep(0.01)
        assert waiting.is_set(), task
        p.container = None  # the restart replaced the container
        lock.release()
        await task
        assert not old.cpu_applied
    finally:
        assert old.proc.stdin is not None
        old.proc.stdin.close()
        old.proc.wait()


async def test_an_unwritable_notebook_folder_is_told_at_start_and_to_the_kernel(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As root, a root-owned folder makes user='auto' run the kernel as nobody: the server log
    says so at start and the kernel's %sandbox gets it (rootless: the server's own folder)."""
    add_spec(kernel_dir, "t-folder", {"image": "python3"})
    course = tmp_path / "course"
    course.mkdir(mode=0o755)
    km = AsyncKernelManager(kernel_name="t-folder")
    km.log = logging.getLogger("test-folder")
    with caplog.at_level(logging.WARNING, logger="test-folder"):
        await km.start_kernel(cwd=str(course))
    try:
        info = (
            await asyncio.to_thread(ask, control_path(FakeContainer.created[-1]), {"op": "get"})
        )["info"]
        if os.geteuid() != 0:
            assert info["notebook_folder_writable"] is True, info
            assert info["notebook_folder_problem"] is None
            return
        problem = (
            f"the folder {course} belongs to root; kernels run as nobody (65534) there: "
            "chown it to the user, or set SandboxProvisioner.user"
        )
        assert info["notebook_folder_writable"] is False
        assert info["notebook_folder_problem"] == problem
        assert f"the kernel cannot write its notebook folder: {problem}" in caplog.text
        # the fix, then a restart: writable, and said nowhere
        os.chown(course, 1000, 1000)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test-folder"):
            await km.restart_kernel(now=True)
        info = (
            await asyncio.to_thread(ask, control_path(FakeContainer.created[-1]), {"op": "get"})
        )["info"]
        assert info["notebook_folder_writable"] is True and info["notebook_folder_problem"] is None
        assert "notebook folder" not in caplog.text
    finally:
        await km.shutdown_kernel(now=True)
