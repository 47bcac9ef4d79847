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
  init, the kernel) at a random delay, then of the child.

After each fault round ``sandbox-kernel gc`` runs (the CLI, as a user would) and the host must
hold no run dir, cgroup, mount, process or kernel state of any container the soak made (every
container id that was not there before the soak). Bounded: at most
``SANDBOX_KERNEL_SOAK_SECONDS`` (default 60) and 120 rounds; ``SANDBOX_KERNEL_SOAK_SEED``
replays a run (the seed is printed).
"""

from __future__ import annotations

import contextlib
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

from sandbox_kernel.paths import run_dir
from tests.privileged.conftest import leftovers

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("python2.7-sandbox", "python3-sandbox")
FAULTS = ("clean", "kill-owner", "interrupt-owner", "kill-child")

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

    async def main(name, cwd, clean):
        km = AsyncKernelManager(kernel_name=name, kernel_id=sys.argv[5])
        await km.start_kernel(cwd=cwd)
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
    name: str, cwd: Path, fault: str, ids_file: Path, kernel_id: str
) -> subprocess.Popen[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        [sys.executable, "-c", SERVER, name, str(cwd), fault, str(ids_file), kernel_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


class Round:
    """One child "server": its kernel id, and the file where it writes its container ids."""

    def __init__(self, tmp: Path, name: str, cwd: Path, fault: str) -> None:
        self.name, self.fault = name, fault
        self.kernel_id = str(uuid.uuid4())
        self.ids_file = tmp / f"ids-{self.kernel_id}"
        self.ids_file.touch()
        self.proc = start_server(name, cwd, fault, self.ids_file, self.kernel_id)

    def left(self, seconds: float) -> list[str]:
        """What of this round is still on the host after up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            found = traces(self.ids_file.read_text().split(), [self.kernel_id])
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


def test_start_stop_soak_with_faults_leaves_nothing_after_gc(
    kernels: Path, notebook_dir: Path, tmp_path: Path, soak_seed: int
) -> None:
    rng = random.Random(soak_seed)
    budget = float(os.environ.get("SANDBOX_KERNEL_SOAK_SECONDS", "60"))
    # each kernel's start time, measured on a clean round: the faults land within it
    start_time: dict[str, float] = {}
    for name in KERNELS:
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
        name = KERNELS[i % 2]
        r = Round(tmp_path, name, notebook_dir, rng.choice(FAULTS))
        delay = rng.uniform(0, start_time[name])
        if r.fault == "clean":
            r.clean()
            assert r.left(10) == [], f"round {i}: a clean stop of {name} left traces"
        else:
            r.fault_at(delay, rng)
            gc()
            left = r.left(15)
            if left:  # a container still dying when gc ran: gc once more
                gc()
                left = r.left(5)
            assert left == [], (
                f"round {i} ({name}, {r.fault} after {delay:.3f}s, seed {soak_seed}) left {left}"
            )
        done[r.fault] += 1
    print("soak rounds:", done)
    assert sum(done.values()) >= 4  # the budget allowed a soak, not one round
