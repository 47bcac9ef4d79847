"""A soak with faults: both kernels started and stopped again and again while the process that
owns them (the "server") is killed at a random moment of the start, and after each round
nothing of them is left once ``sandbox-kernel gc`` has run.

Each round a child process (``SERVER`` below) starts one sandbox kernel through
jupyter_client's AsyncKernelManager, Python 2.7 and 3 in turn, and waits for it to answer.
The round's fault is drawn from:

* ``clean``: the child shuts the kernel down itself; nothing may be left even before gc;
* ``kill-owner``: SIGKILL of the child at a random delay between 0 and the measured start
  time (so before, during and after the executor's setup, the cgroup work and the kernel's
  first reply), as a server crash;
* ``interrupt-owner``: SIGINT at a random delay (jupyter_server's way out without kernel
  shutdown), so the provisioner's exit hooks run wherever the start was;
* ``kill-child``: SIGKILL of a random process below the child (the executor, the container's
  init, the kernel) at a random delay, then of the child;
* ``stage-fault``: a setup stage of the start, drawn from ``STAGES`` (the cgroup's creation,
  the plan's write, the executor's spawn and its report, the connection folder's handover,
  the relay's and the control socket's start, the provisioner's connect), raises in the
  child, before or after it did its work (the child patches the stage's function in its
  own process; the product has no switch for it): the start must fail with that error and
  the child exit by itself.

Pooled rounds use a kernelspec with a warm pool of one (``pool_size``), so a killed owner
also leaves a pool member behind for gc.

After each fault round ``sandbox-kernel gc`` runs (the CLI, as a user would) and the host must
hold no run dir, cgroup, mount, process or kernel state of any container the soak made (every
container id the child made, its pool members' included), and no work folder of the child's
in the image store's ``tmp/`` or the host layers' ``.tmp-PID-*`` (both named by the pid of
the process that made them). Bounded: at most
``SANDBOX_KERNEL_SOAK_SECONDS`` (default 60) and 120 rounds; ``SANDBOX_KERNEL_SOAK_SEED``
replays a run (the seed is printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sandbox_kernel.paths import run_dir, state_dir
from tests.privileged.conftest import leftovers

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("python2.7-sandbox", "python3-sandbox")
FAULTS = ("clean", "kill-owner", "interrupt-owner", "kill-child", "stage-fault")
#: The setup stages a ``stage-fault`` round breaks (the child's STAGES table has each).
STAGES = ("cgroup", "plan", "executor", "share", "relay", "control", "connect")

SERVER = textwrap.dedent(
    """
    import asyncio, os, sys
    from jupyter_client.manager import AsyncKernelManager
    import sandbox_kernel.jupyter.provisioner as prov

    new_id = prov.new_container_id

    def recorded_id():
        # written down before anything of the container exists, for the leftovers check
        cid = new_id()
        with open(sys.argv[4], "a") as f:
            f.write(cid + "\\n")
            f.flush()
            os.fsync(f.fileno())
        return cid

    prov.new_container_id = recorded_id
    import sandbox_kernel.jupyter.pool as pool
    pool.new_container_id = recorded_id  # warm pool members too

    import inspect
    import sandbox_kernel.jupyter.control as control
    import sandbox_kernel.jupyter.relay as relay
    import sandbox_kernel.runtime.container as container
    from sandbox_kernel.cgroups.none import NullManager
    from sandbox_kernel.cgroups.v1 import V1Manager
    from sandbox_kernel.cgroups.v2 import V2Manager

    STAGES = {
        "cgroup": [(V1Manager, "create"), (V2Manager, "create"), (NullManager, "create")],
        "plan": [(container.Container, "_write_plan")],
        "executor": [(container.Container, "_await_exec")],
        "share": [(container.Container, "_receive_shared")],
        "relay": [(relay.Relay, "start")],
        "control": [(control.ControlThread, "start")],
        "connect": [(prov.SandboxProvisioner, "_connect")],
    }

    class InjectedFault(RuntimeError):
        pass

    def inject(owner, attr, stage, after):
        orig = getattr(owner, attr)
        what = "injected fault at %s (%s it ran)" % (stage, "after" if after else "before")
        if inspect.iscoroutinefunction(orig):
            async def broken(*args, **kwargs):
                if after:
                    await orig(*args, **kwargs)
                raise InjectedFault(what)
        else:
            def broken(*args, **kwargs):
                if after:
                    orig(*args, **kwargs)
                raise InjectedFault(what)
        setattr(owner, attr, broken)

    if sys.argv[6] != "none":
        stage, when = sys.argv[6].split(":")
        for owner, attr in STAGES[stage]:
            inject(owner, attr, stage, when == "after")

    async def main(name, cwd, clean):
        km = AsyncKernelManager(kernel_name=name, kernel_id=sys.argv[5])
        try:
            await km.start_kernel(cwd=cwd)
        except InjectedFault as exc:
            print("FAILED %s" % exc, flush=True)
            return
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        print("READY", flush=True)
        kc.stop_channels()
        if clean:
            await km.shutdown_kernel(now=False)
            print("DOWN", flush=True)
            return
        await asyncio.sleep(120)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "clean"))
    """
)


def traces(container_ids: list[str], kernel_ids: list[str]) -> list[str]:
    """What the host still holds of these containers (run dir, cgroup, mounts, processes:
    the privileged suite's own check) and of these kernels (the provisioner's state)."""
    found = [x for c in container_ids for x in leftovers(c)]
    found += [f"kernel state {k}" for k in kernel_ids if (run_dir() / "kernels" / k).exists()]
    return found


def work_folders(pid: int) -> list[str]:
    """The image store's and the host layers' work folders made by process ``pid`` (both
    carry the maker's pid in their names: ``tmp/<kind>-PID-*``, ``host-layers/.tmp-PID-*``)."""
    root = state_dir()
    found = [str(p) for p in (root / "tmp").glob(f"*-{pid}-*")]
    found += [str(p) for p in (root / "host-layers").glob(f".tmp-{pid}-*")]
    return found


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children of children, from /proc; bounded by /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_server(
    name: str, cwd: Path, fault: str, ids_file: Path, kernel_id: str, stage: str
) -> subprocess.Popen[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        [sys.executable, "-c", SERVER, name, str(cwd), fault, str(ids_file), kernel_id, stage],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


class Round:
    """One child "server": its kernel id, and the file where it writes its container ids."""

    def __init__(self, tmp: Path, name: str, cwd: Path, fault: str, stage: str = "none") -> None:
        self.name, self.fault, self.stage = name, fault, stage
        self.kernel_id = str(uuid.uuid4())
        self.ids_file = tmp / f"ids-{self.kernel_id}"
        self.ids_file.touch()
        self.proc = start_server(name, cwd, fault, self.ids_file, self.kernel_id, stage)

    def left(self, seconds: float) -> list[str]:
        """What of this round is still on the host after up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            found = traces(self.ids_file.read_text().split(), [self.kernel_id])
            found += work_folders(self.proc.pid)
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL what is left of the child, collect it (bounded)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)

    def clean(self) -> None:
        """A clean round: the child starts, shuts down and exits 0 (bounded)."""
        try:
            out, err = self.proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name}: the clean round did not end in 180 s")
        assert self.proc.returncode == 0 and "DOWN" in out, err[-2000:]

    def failed_stage(self) -> None:
        """A stage-fault round: the child's start fails with the injected error, and the
        child ends by itself (bounded)."""
        try:
            out, err = self.proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name}: the start broken at {self.stage} did not end in 180 s")
        stage, when = self.stage.split(":")
        assert f"FAILED injected fault at {stage} ({when} it ran)" in out, (out, err[-2000:])

    def fault_at(self, delay: float, rng: random.Random) -> None:
        """This round's fault, ``delay`` seconds into the start."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(delay)
        if self.fault == "kill-owner":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        elif self.fault == "interrupt-owner":
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        else:
            below = descendants(self.proc.pid)
            if below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(below), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)
        self.kill()


def gc() -> None:
    """``sandbox-kernel gc``, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "sandbox_kernel", "gc"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def soak_seed() -> int:
    env = os.environ.get("SANDBOX_KERNEL_SOAK_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(1 << 30)
    print(f"soak seed {seed} (SANDBOX_KERNEL_SOAK_SEED={seed} replays it)")
    return seed


def pooled(kernels: Path, name: str) -> str:
    """A copy of the shipped kernelspec ``name`` with a warm pool of one; its name."""
    spec = json.loads((kernels / name / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["pool_size"] = 1
    copy = f"t-soak-pool-{name}"
    (kernels / copy).mkdir()
    (kernels / copy / "kernel.json").write_text(json.dumps(spec))
    return copy


def test_start_stop_soak_with_faults_leaves_nothing_after_gc(
    kernels: Path, notebook_dir: Path, tmp_path: Path, soak_seed: int
) -> None:
    rng = random.Random(soak_seed)
    budget = float(os.environ.get("SANDBOX_KERNEL_SOAK_SECONDS", "60"))
    names = [*KERNELS, pooled(kernels, "python3-sandbox")]
    # each kernel's start time, measured on a clean round: the faults land within it
    start_time: dict[str, float] = {}
    for name in names:
        t0 = time.monotonic()
        r = Round(tmp_path, name, notebook_dir, "clean")
        r.clean()
        start_time[name] = time.monotonic() - t0
        assert r.left(10) == [], f"a clean stop of {name} left traces"
    deadline = time.monotonic() + budget
    done: dict[str, int] = dict.fromkeys(FAULTS, 0)
    for i in range(120):
        if time.monotonic() > deadline:
            break
        name = names[i % len(names)]
        fault = rng.choice(FAULTS)
        stage = f"{rng.choice(STAGES)}:{rng.choice(('before', 'after'))}"
        r = Round(tmp_path, name, notebook_dir, fault, stage if fault == "stage-fault" else "none")
        delay = rng.uniform(0, start_time[name])
        if r.fault == "clean":
            r.clean()
            assert r.left(10) == [], f"round {i}: a clean stop of {name} left traces"
        else:
            if r.fault == "stage-fault":
                r.failed_stage()
                delay = 0.0
            else:
                r.fault_at(delay, rng)
            gc()
            left = r.left(15)
            if left:  # a container still dying when gc ran: gc once more
                gc()
                left = r.left(5)
            assert left == [], (
                f"round {i} ({name}, {r.fault} {r.stage} after {delay:.3f}s, "
                f"seed {soak_seed}) left {left}"
            )
        done[r.fault] += 1
    print("soak rounds:", done)
    assert sum(done.values()) >= 4  # the budget allowed a soak, not one round
