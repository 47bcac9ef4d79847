"""P2 container setup time and P3 host-side memory per running container (runtime only).

P2: the executor reports, per container, the microseconds from its own start to the
main process's execve (the ``exec`` status line), root mode with its user namespace and
idmapped layers as the product runs it. Also the whole Python-side
create+start+wait+destroy cycle, for context.
P3: VmRSS of the executor's supervisor process (the only host-side process per
container; init and the command are inside the container's cgroup and counted there).
"""

from __future__ import annotations

import subprocess
import time

from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, Limits

from .stats import Figure


def _spec(command: list[str], **kw: object) -> ContainerSpec:
    """A container as the product makes it: in the caller's user namespace (root mode)."""
    spec = ContainerSpec(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=tuple(command),
        mounts=hostimage.binds(),
        limits=Limits(memory=256 << 20, pids=64, cpus=1.0),
        **kw,  # type: ignore[arg-type]
    )
    return userns.for_caller().apply(spec)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(runs: int = 50, idle: int = 10) -> list[Figure]:
    setup = Figure("P2 setup: executor start -> execve", "ms", target="<= 10 ms", limit=10.0)
    cycle = Figure("runtime cycle: create+start+wait+destroy (/bin/true)", "ms")
    for _ in range(runs):
        t0 = time.perf_counter()
        with Container.create(_spec(["/bin/true"])) as c:
            c.start(stdout=subprocess.DEVNULL)
            c.wait(30)
            assert c.setup_us is not None
            setup.values.append(c.setup_us / 1000)
        cycle.values.append((time.perf_counter() - t0) * 1000)
    rss = Figure(
        "P3 host-side memory per container (supervisor RSS)", "MiB", target="<= 2 MiB", limit=2.0
    )
    containers = []
    try:
        for _ in range(idle):
            c = Container.create(_spec(["/bin/sleep", "60"]))
            containers.append(c)
            c.start()
        time.sleep(0.2)
        for c in containers:
            assert c.pid is not None
            rss.values.append(_rss_kib(c.pid) / 1024)
    finally:
        for c in containers:
            c.destroy()
    return [setup, cycle, rss]
