"""Kernel harness: the variants of a kernel start, and measurements on running kernels.

Variants (each an installed kernelspec in a private JUPYTER_PATH):

* ``python3-sandbox`` / ``python2.7-sandbox``: the shipped sandbox kernelspecs (our provisioner).
* ``bare-python3``: jupyter_client's LocalProvisioner with the host venv's interpreter (same
  ipykernel version as the image), tcp transport as Jupyter's default.
* ``chroot-<image>``: the image's interpreter ``chroot``-ed into a merged view of the image (an
  overlay mounted in this process's private mount namespace), no namespaces, no cgroups,
  no seccomp: the baseline of "pure sandbox overhead". ipc transport, like ours.
* ``bwrap-<image>``: bubblewrap over the same merged view (``--unshare-all``).
* ``podman-<image>``: podman + crun with the image imported from ``sandbox-kernel image export``.

The merged views are mounted once, in a private mount namespace of the benchmark process
(:func:`private_mount_namespace`, called before any thread starts): nothing is mounted on the
host, and everything goes away with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from sandbox_kernel.images.store import Image, ImageStore
from sandbox_kernel.jupyter import kernelspecs

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
NOTEBOOK_UID = 1000
#: The zmq reconnect interval of our measuring clients (the default, 100 ms, would quantize
#: every start time to 100 ms).
RECONNECT_MS = 5


def private_mount_namespace() -> None:
    """Move this process into its own mount namespace, all mounts private (single-threaded!)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --make-rprivate /: {os.strerror(err)}")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (KiB), 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (through /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


class Harness:
    """Kernelspecs of every variant, in a private JUPYTER_PATH under a short temp dir."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="skb-", dir="/tmp"))  # short: socket paths
        os.chmod(self.root, 0o755)
        self.conn = self.root / "c"
        self.conn.mkdir(mode=0o777)
        os.chmod(self.conn, 0o1777)
        self.workdir = self.root / "nb"
        self.workdir.mkdir()
        os.chown(self.workdir, NOTEBOOK_UID, NOTEBOOK_UID)
        prefix = self.root / "jp"
        kernelspecs.install(None, prefix=str(prefix))
        self.kernels_dir = prefix / "share" / "jupyter" / "kernels"
        os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(self.root / "rt"))
        if not kernelspecs.provisioner_registered():
            kernelspecs.register_provisioner_in_process()
        self.store = ImageStore()
        self.log = open(self.root / "kernels.log", "ab")  # noqa: SIM115 - closed in close()
        self.views: dict[str, Path] = {}
        self.ipc_names: set[str] = set()
        self.podman_images: set[str] = set()
        self.failures: dict[str, str] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self.notes: list[str] = []
        #: kernelspec -> the provisioner's start phases (ms) of each start of it
        self.phases: dict[str, list[dict[str, float]]] = {}
        self.podman_runtime = ""
        #: the kernel managers' config (the pool benchmark raises SandboxPolicy.max_pool_size)
        self.config: Config | None = None
        self._seq = 0
        bare = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self._write_spec("bare-python3", bare)

    def close(self) -> None:
        for name in sorted(self.podman_images):
            subprocess.run(
                ["podman", "rm", "-f", "--filter", f"label=skb={self.root.name}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            subprocess.run(
                ["podman", "rmi", "-f", name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        self.log.close()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        for view in self.views.values():
            subprocess.run(
                ["umount", "-R", "-l", str(view)], check=False, stderr=subprocess.DEVNULL
            )
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- kernelspecs ----------------------------------------------------------------------
    def _write_spec(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        d = self.kernels_dir / name
        d.mkdir(parents=True, exist_ok=True)
        data = {"argv": argv, "display_name": name, "language": "python", "env": env or {}}
        (d / "kernel.json").write_text(json.dumps(data, indent=1))

    def sandbox_variant(self, name: str, suffix: str, **config: Any) -> str:
        """A copy of the shipped sandbox kernelspec ``name`` with other provisioner settings."""
        data = json.loads((self.kernels_dir / name / "kernel.json").read_text())
        data["metadata"]["kernel_provisioner"]["config"].update(config)
        spec = f"{name}-{suffix}"
        d = self.kernels_dir / spec
        d.mkdir(exist_ok=True)
        (d / "kernel.json").write_text(json.dumps(data, indent=1))
        return spec

    def image(self, name: str) -> Image:
        return self.store.resolve(name)

    def image_argv(self, name: str) -> list[str]:
        data = kernelspecs.load_template(f"{name}-sandbox")
        return [str(a) for a in data["argv"]]

    def image_env(self, name: str) -> dict[str, str]:
        env = dict(self.image(name).config.env)
        env.setdefault("HOME", "/tmp")
        return env

    def view(self, name: str) -> Path:
        """The merged view of an image: overlay (upper on a tmpfs), /proc, /dev, /tmp, conn dir."""
        if name in self.views:
            return self.views[name]
        image = self.image(name)
        base = self.root / f"v{len(self.views)}"
        base.mkdir()
        _sh("mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(base))
        for sub in ("upper", "work", "m"):
            (base / sub).mkdir()
        m = base / "m"
        lowers = ":".join(image.lowerdirs())
        opts = f"lowerdir={lowers},upperdir={base / 'upper'},workdir={base / 'work'}"
        _sh("mount", "-t", "overlay", "overlay", "-o", opts, str(m))
        _sh("mount", "-t", "proc", "proc", str(m / "proc"))
        _sh("mount", "--rbind", "/dev", str(m / "dev"))
        _sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(m / "tmp"))
        inside = m / str(self.conn).lstrip("/")
        inside.mkdir(parents=True, exist_ok=True)
        _sh("mount", "--bind", str(self.conn), str(inside))
        self.views[name] = base
        return base

    def chroot_spec(self, name: str) -> str:
        m = self.view(name) / "m"
        env = [f"{k}={v}" for k, v in self.image_env(name).items()]
        argv = ["/usr/sbin/chroot", str(m), "/usr/bin/env", "-i", *env, *self.image_argv(name)]
        spec = f"chroot-{name}"
        self._write_spec(spec, argv)
        self.ipc_names.add(spec)
        return spec

    def bwrap_spec(self, name: str) -> str:
        m = self.view(name) / "m"
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        argv += ["--ro-bind", str(m), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.conn), str(self.conn), "--clearenv", "--chdir", "/tmp"]
        for k, v in self.image_env(name).items():
            argv += ["--setenv", k, v]
        argv += ["--", *self.image_argv(name)]
        spec = f"bwrap-{name}"
        self._write_spec(spec, argv)
        self.ipc_names.add(spec)
        return spec

    def podman_spec(self, name: str, timeout: float = 300) -> str:
        """Import the image into podman (from our OCI export) and write its kernelspec."""
        if shutil.which("podman") is None:
            raise RuntimeError("podman is not installed (apt-get install podman crun)")
        tar = self.root / f"{name}.oci.tar"
        subprocess.run(
            [sys.executable, "-m", "sandbox_kernel", "image", "export", name, str(tar)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=timeout,
        )
        loaded = subprocess.run(
            ["podman", "load", "-i", str(tar)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        tar.unlink()
        names = [
            line.split(":", 1)[1].strip().split(",")[0]
            for line in loaded.stdout.splitlines()
            if line.startswith("Loaded image")
        ]
        if not names:
            raise RuntimeError(f"podman load gave no image name: {loaded.stdout.strip()!r}")
        ref = names[0]
        self.podman_images.add(ref)
        common = ["--network", "none", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        common += ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
        runtime = "crun"
        probe = subprocess.run(
            ["podman", "run", "--rm", "--runtime", "crun", *common, ref, "/bin/true"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["?"])[-1]
            self.notes.append(f"podman+crun cannot run here ({why}); podman+runc measured instead")
            runtime = "runc"
        self.podman_runtime = runtime
        argv = ["podman", "run", "--rm", "--runtime", runtime, *common, "--log-driver", "none"]
        argv += ["--label", f"skb={self.root.name}", "-v", f"{self.conn}:{self.conn}"]
        argv += ["--memory", "1g", "--pids-limit", "256", "--cpus", "1"]
        argv += ["--user", f"{NOTEBOOK_UID}:{NOTEBOOK_UID}", "-e", "HOME=/tmp"]
        argv += [ref, *self.image_argv(name)]
        spec = f"podman-{name}"
        self._write_spec(spec, argv)
        self.ipc_names.add(spec)
        return spec

    # ---- kernels ---------------------------------------------------------------------------
    @property
    def context(self) -> zmq.asyncio.Context:
        """One zmq context for every manager and client (as jupyter_server's kernel manager
        shares one): a context per kernel would cost file descriptors of its own."""
        if self._ctx is None:
            self._ctx = client_context()
        return self._ctx

    def manager(self, spec: str) -> AsyncKernelManager:
        if self.config is not None:
            km = AsyncKernelManager(kernel_name=spec, context=self.context, config=self.config)
        else:
            km = AsyncKernelManager(kernel_name=spec, context=self.context)
        if spec in self.ipc_names:
            self._seq += 1
            km.transport = "ipc"
            km.ip = str(self.conn / f"k{self._seq}")
            km.connection_file = str(self.conn / f"k{self._seq}.json")
        return km

    async def start(self, spec: str) -> Kernel:
        km = self.manager(spec)
        k = Kernel(km, self.context)
        k.t0 = time.perf_counter()
        await km.start_kernel(cwd=str(self.workdir), stdout=self.log, stderr=self.log)
        k.started = time.perf_counter() - k.t0
        phases = getattr(km.provisioner, "start_phases", None)
        if phases is not None:  # a sandbox kernel: where its start spent the time
            self.phases.setdefault(spec, []).append(dict(phases.ms))
        if spec in self.ipc_names:  # the kernel (another uid, or in podman) reads it
            with contextlib.suppress(OSError):
                os.chmod(km.connection_file, 0o644)
        return k


def client_context() -> zmq.asyncio.Context:
    ctx = zmq.asyncio.Context()
    ctx.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


class Kernel:
    """A started kernel with one measuring client."""

    def __init__(self, km: AsyncKernelManager, ctx: zmq.asyncio.Context) -> None:
        self.km = km
        self.t0 = 0.0
        self.started = 0.0  # seconds from launch until start_kernel returned
        self.ctx = ctx
        self.kc: AsyncKernelClient | None = None

    async def ready(self, timeout: float = 120) -> tuple[float, float]:
        """Seconds from launch to the first kernel_info_reply, and to the first iopub status."""
        kc = self.km.client(context=self.ctx)
        self.kc = kc
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        deadline = time.monotonic() + timeout
        t_reply: float | None = None
        last = 0.0
        while t_reply is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kernel {self.km.kernel_name} did not answer kernel_info")
            if time.perf_counter() - last > 0.25:
                kc.kernel_info()
                last = time.perf_counter()
            try:
                msg = await kc.get_shell_msg(timeout=0.25)
            except queue.Empty:
                continue
            if msg["msg_type"] == "kernel_info_reply":
                t_reply = time.perf_counter()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kernel {self.km.kernel_name}: no iopub status")
            try:
                msg = await kc.get_iopub_msg(timeout=0.02)
            except queue.Empty:
                kc.kernel_info()  # each request makes the kernel publish busy/idle
                continue
            if msg["msg_type"] == "status":
                t_io = time.perf_counter()
                break
        return t_reply - self.t0, t_io - self.t0

    def drop_iopub(self) -> None:
        """Close the client's iopub socket (P7 holds ~100 kernels in one process: fewer fds)."""
        if self.kc is not None and self.kc._iopub_channel is not None:
            self.kc._iopub_channel.stop()
            self.kc._iopub_channel = None

    async def execute(self, code: str = "1+1", timeout: float = 60) -> float:
        """Seconds from execute_request to its execute_reply."""
        kc = self.kc
        assert kc is not None
        t = time.perf_counter()
        mid = kc.execute(code, store_history=False)
        while True:
            msg = await kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == mid:
                if msg["content"].get("status") != "ok":
                    raise RuntimeError(f"execute failed: {msg['content']}")
                return time.perf_counter() - t

    def pids(self) -> tuple[list[int], list[int]]:
        """(sandbox processes on the host side + init, the kernel's own processes)."""
        prov: Any = self.km.provisioner
        container = getattr(prov, "container", None)
        if container is not None and container.proc is not None:
            sup = container.proc.pid
            init = container.init_pid
            kernel = [p for p in descendants(sup) if p not in (sup, init)]
            return [sup, *([init] if init else [])], kernel
        proc = getattr(prov, "process", None)
        return [], descendants(proc.pid) if proc is not None else []

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km.has_kernel:
            now = not str(self.km.kernel_name).startswith("podman-")
            await asyncio.wait_for(self.km.shutdown_kernel(now=now), 60)


async def stop_all(kernels: list[Kernel]) -> None:
    results = await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"  ({len(errors)} kernels did not stop cleanly: {errors[0]!r})", file=sys.stderr)
