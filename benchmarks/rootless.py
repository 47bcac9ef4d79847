"""R1 rootless kernel start and R2 rootless container setup, against root mode.

``python -m benchmarks.rootless --user USER [--rounds N] [--setups N] [--quick] [--out DIR]``,
as root, from a world-readable checkout and virtualenv (``tools/rootless-tests.sh --bench``
makes both, and the user, and removes them after).

R1: launch -> first kernel_info_reply and -> first iopub status of a ``python3-sandbox``
kernel (the same image from the system store, the same notebook folder), started by a
server running as USER (rootless: USER's subordinate range through newuidmap/newgidmap,
USER's delegated cgroup) and by root (root mode: the product's id range, idmapped folder
and layers). One start of each per round, the order alternating; the ratio per round.
R2: executor start -> execve of a ``/bin/true`` container of the host image, newuidmap and
newgidmap included, rootless vs root mode, interleaved the same way.

The root process measures root mode itself and drives a worker running as USER (this
module with ``--worker``, started with runuser) over a pipe: one request line, one JSON
answer line. Both sides run the same measuring code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from sandbox_kernel.jupyter import kernelspecs
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, Limits

from .kernels import Kernel, client_context
from .stats import Figure, publish, ratio

KERNEL = "python3-sandbox"
R1_LIMIT = 1.05
R2_LIMIT = 10.0


class Side:
    """What one side (root or the user) needs to start kernels: its own kernelspec prefix
    (JUPYTER_PATH), a log, a zmq context; the notebook folder is shared."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))  # short: socket paths
        prefix = self.root / "jp"
        kernelspecs.install([KERNEL], prefix=str(prefix))
        os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        os.environ["JUPYTER_RUNTIME_DIR"] = str(self.root / "rt")
        if not kernelspecs.provisioner_registered():
            kernelspecs.register_provisioner_in_process()
        self.log: IO[bytes] = open(self.root / "kernels.log", "ab")  # noqa: SIM115
        self.ctx = client_context()

    async def kernel(self) -> dict[str, float]:
        """One kernel start: milliseconds to kernel_info_reply and to iopub status."""
        from jupyter_client.manager import AsyncKernelManager

        km = AsyncKernelManager(kernel_name=KERNEL, context=self.ctx)
        k = Kernel(km, self.ctx)
        k.t0 = time.perf_counter()
        await km.start_kernel(cwd=str(self.workdir), stdout=self.log, stderr=self.log)
        try:
            reply, iopub = await k.ready()
        finally:
            await k.stop()
        return {"reply_ms": reply * 1000, "iopub_ms": iopub * 1000}

    @staticmethod
    def setup() -> dict[str, float]:
        """One container of the host image: the executor's start -> execve, in ms."""
        spec = ContainerSpec(
            id=new_container_id(),
            layers=(str(hostimage.layer_dir()),),
            command=("/bin/true",),
            mounts=hostimage.binds(),
            user=os.geteuid() or 65534,
            group=os.getegid() or 65534,
            limits=Limits(memory=256 << 20, pids=64, cpus=1.0),
        )
        with Container.create(userns.for_caller().apply(spec)) as c:
            c.start(stdout=subprocess.DEVNULL)
            c.wait(30)
            assert c.setup_us is not None
            return {"setup_ms": c.setup_us / 1000}

    def close(self) -> None:
        self.log.close()
        self.ctx.destroy(linger=0)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


async def _worker(workdir: Path) -> int:
    """The user's side: answer each request line ("kernel" or "setup") with a JSON line."""
    side = Side(workdir)
    try:
        for line in sys.stdin:
            what = line.strip()
            try:
                out: dict[str, Any] = await side.kernel() if what == "kernel" else side.setup()
            except Exception as exc:  # reported to the root side, which stops
                out = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out), flush=True)
    finally:
        side.close()
    return 0


class Worker:
    """The root side's handle on the worker process running as the user."""

    def __init__(self, user: str, workdir: Path) -> None:
        home = pwd.getpwnam(user).pw_dir
        env = ["PATH=/usr/bin:/bin", f"HOME={home}", "PYTHONDONTWRITEBYTECODE=1"]
        self.proc = subprocess.Popen(
            [
                "runuser",
                "-u",
                user,
                "--",
                "env",
                "-i",
                *env,
                sys.executable,
                "-m",
                "benchmarks.rootless",
                "--worker",
                "--workdir",
                str(workdir),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )

    def ask(self, what: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the rootless worker exited ({self.proc.wait(10)})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"rootless {what}: {out['error']}")
        return {k: float(v) for k, v in out.items()}

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def measure(user: str, rounds: int, setups: int) -> list[Figure]:
    """R1 and R2 (see the module docstring), root mode measured here, rootless by the
    worker, interleaved with the order alternating each round."""
    pw = pwd.getpwnam(user)
    workdir = Path(tempfile.mkdtemp(prefix="skr-nb-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    os.chown(workdir, pw.pw_uid, pw.pw_gid)  # the notebook folder: the user's, on both sides
    side = Side(workdir)
    worker = Worker(user, workdir)
    res: dict[str, list[float]] = {
        k: []
        for k in ("root reply", "root iopub", "rl reply", "rl iopub", "root setup", "rl setup")
    }
    try:
        # warm-up: page cache, snapshots, the host image layer of each side
        await side.kernel()
        worker.ask("kernel")
        Side.setup()
        worker.ask("setup")
        for r in range(rounds):
            for who in ("root", "rl") if r % 2 == 0 else ("rl", "root"):
                got = await side.kernel() if who == "root" else worker.ask("kernel")
                res[f"{who} reply"].append(got["reply_ms"])
                res[f"{who} iopub"].append(got["iopub_ms"])
        for r in range(setups):
            for who in ("root", "rl") if r % 2 == 0 else ("rl", "root"):
                got = Side.setup() if who == "root" else worker.ask("setup")
                res[f"{who} setup"].append(got["setup_ms"])
    finally:
        worker.close()
        side.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return [
        Figure("R1 py3 rootless: launch -> iopub status", "ms", res["rl iopub"]),
        Figure("R1 py3 root mode: launch -> iopub status", "ms", res["root iopub"]),
        ratio(
            "R1 py3 ratio rootless/root mode (iopub ready)",
            res["rl iopub"],
            res["root iopub"],
            target="<= 1.05",
            limit=R1_LIMIT,
        ),
        ratio("R1 py3 ratio rootless/root mode (kernel_info)", res["rl reply"], res["root reply"]),
        Figure(
            "R2 setup rootless (newuidmap incl.): executor start -> execve",
            "ms",
            res["rl setup"],
            target="<= 10 ms",
            limit=R2_LIMIT,
        ),
        Figure("R2 setup root mode: executor start -> execve", "ms", res["root setup"]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rootless", description=__doc__)
    p.add_argument("--user", help="the unprivileged user whose server is measured")
    p.add_argument("--rounds", type=int, default=20, help="kernel starts of each side")
    p.add_argument("--setups", type=int, default=50, help="container setups of each side")
    p.add_argument("--quick", action="store_true", help="2 rounds, 3 setups (smoke run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return asyncio.run(_worker(Path(args.workdir)))
    if os.geteuid() != 0 or not args.user:
        print("run as root with --user USER (see tools/rootless-tests.sh --bench)", file=sys.stderr)
        return 2
    rounds, setups = (2, 3) if args.quick else (args.rounds, args.setups)
    t0 = time.monotonic()
    figs = asyncio.run(measure(args.user, rounds, setups))
    publish(figs, args.out, "rootless", quick=args.quick, elapsed=time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
