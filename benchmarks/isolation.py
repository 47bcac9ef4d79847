"""Tenant isolation: a probe kernel's execute latency alone vs with 10 hostile neighbours.

The probe is a sandboxed Python 3 kernel (the shipped kernelspec: 1 CPU, 1 GiB, 256 pids).
The neighbours are containers of the python3 image, each capped (1 CPU, 128 MiB, 64 pids,
/tmp 32 MiB), two of each: a CPU loop, memory at its cap (allocate past it, OOM-killed,
again), a fork bomb at its pids cap, a /tmp filler (ENOSPC, again), an output flood (stdout
drained by a ``cat`` on the host). Phases alternate: alone, hostile, alone, hostile...

``fair_share`` runs the same neighbours as another user's kernels on a teaching hub: inside
a delegation with that user's aggregate caps (``sandbox-kernel delegate``, 1 CPU, 2 GiB,
2048 pids), the probe outside it, as a student's kernel beside theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import pwd
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from sandbox_kernel.cgroups import detect, manager_for_user, reset_manager_cache
from sandbox_kernel.cgroups.base import CgroupLimits, CgroupManager
from sandbox_kernel.cgroups.common import cpus_to_quota
from sandbox_kernel.cgroups.delegation import delegate, delegations, undelegate
from sandbox_kernel.images.store import Image
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, Limits

from .kernels import Harness, Kernel
from .stats import Figure, percentile

HOSTILE = {
    "cpu": ["/usr/bin/python3", "-c", "while True: pass"],
    "memory": [
        "/bin/sh",
        "-c",
        "while true; do /usr/bin/python3 -c 'b = bytearray(400 << 20)' 2>/dev/null; done",
    ],
    "forkbomb": [
        "/usr/bin/python3",
        "-c",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ],
    "tmpfill": [
        "/bin/sh",
        "-c",
        "while true; do dd if=/dev/zero of=/tmp/f bs=1M count=100 2>/dev/null; rm -f /tmp/f; done",
    ],
    "flood": ["/usr/bin/yes", "output flood output flood output flood"],
}


class Neighbours:
    """The 10 hostile containers of ``image`` (the python3 image), in ``manager``'s cgroups."""

    def __init__(self, image: Image, manager: CgroupManager | None = None) -> None:
        self.image = image
        self.manager = manager  # None: the benchmark's own cgroup parent
        self.containers: list[Container] = []
        self.kinds: list[str] = []
        self.drains: list[subprocess.Popen[bytes]] = []

    def start(self, kinds: tuple[str, ...] = tuple(HOSTILE), per: int = 2) -> None:
        layers = self.image.lowerdirs()
        env = tuple(self.image.config.env)
        for kind in kinds:
            argv = HOSTILE[kind]
            for _ in range(per):
                spec = ContainerSpec(
                    id=new_container_id(),
                    layers=layers,
                    command=tuple(argv),
                    env=env,
                    user=1000,
                    group=1000,
                    tmp_size=32 << 20,
                    writable_size=32 << 20,
                    limits=Limits(memory=128 << 20, pids=64, cpus=1.0),
                )
                c = Container.create(spec, manager=self.manager)
                self.containers.append(c)
                self.kinds.append(kind)
                if kind == "flood":
                    drain = subprocess.Popen(
                        ["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
                    )
                    self.drains.append(drain)
                    c.start(stdin=subprocess.DEVNULL, stdout=drain.stdin, stderr=subprocess.DEVNULL)
                    assert drain.stdin is not None
                    drain.stdin.close()
                else:
                    c.start(
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )

    def stop(self) -> None:
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.destroy()
        for d in self.drains:
            with contextlib.suppress(Exception):
                d.wait(10)
        self.containers.clear()
        self.kinds.clear()
        self.drains.clear()


async def _ready_probe(h: Harness) -> Kernel:
    """The probe: a sandboxed Python 3 kernel, ready and warmed up (10 executions)."""
    probe = await h.start("python3-sandbox")
    try:
        await probe.ready()
        for _ in range(10):
            await probe.execute()
    except BaseException:
        await probe.stop()
        raise
    return probe


async def phases(
    image: Image,
    sample: Callable[[], Awaitable[float]],
    n: int,
    rounds: int,
    manager: CgroupManager | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """``rounds`` pairs of phases: ``n`` samples alone, then ``n`` with the 10 hostile
    neighbours of ``image`` (in ``manager``'s cgroups; None: the benchmark's own).
    ``sample`` times one request (seconds): the probe kernel's execute here, the hub's
    API in benchmarks/hub.py. The latencies alone and hostile (ms) and each pair's p99
    ratio."""
    alone: list[float] = []
    hostile: list[float] = []
    ratios: list[float] = []
    for _ in range(rounds):
        a = [await sample() * 1000 for _ in range(n)]
        nb = Neighbours(image, manager)
        try:
            await asyncio.to_thread(nb.start)
            await asyncio.sleep(2)  # let them reach their caps
            t = time.monotonic()
            b = [await sample() * 1000 for _ in range(n)]
            dead = [k for k, c in zip(nb.kinds, nb.containers, strict=True) if c.poll()]
            print(
                f"  hostile phase {time.monotonic() - t:.1f} s, neighbours ended: {dead}",
                file=sys.stderr,
            )
        finally:
            await asyncio.to_thread(nb.stop)
        alone += a
        hostile += b
        ratios.append(percentile(b, 99) / percentile(a, 99))
        await asyncio.sleep(1)
    return alone, hostile, ratios


def phase_figures(
    tag: str,
    what: str,
    beside: str,
    result: tuple[list[float], list[float], list[float]],
    ratio: str,
    *,
    target: bool = True,
) -> list[Figure]:
    """The three figures of a ``phases`` result: ``what`` alone, ``what`` ``beside`` the
    neighbours (p99 shown), and the per-pair p99 ratio (``ratio`` ends its name), with the
    issue's target of 2x unless ``target`` is False."""
    alone, hostile, ratios = result
    goal: dict[str, Any] = {"target": "<= 2", "limit": 2.0} if target else {}
    return [
        Figure(f"{tag} {what}, alone", "ms", alone, stat="p99"),
        Figure(f"{tag} {what}, {beside}", "ms", hostile, stat="p99"),
        Figure(f"{tag} ratio p99 hostile/alone{ratio}", "x", ratios, **goal),
    ]


async def measure(h: Harness, n: int = 200, rounds: int = 2, by_kinds: bool = True) -> list[Figure]:
    probe = await _ready_probe(h)
    image = h.image("python3")
    by_kind: dict[str, float] = {}
    try:
        result = await phases(image, probe.execute, n, rounds)
        # which kind hurts: two neighbours of one kind at a time, each against a fresh "alone"
        for kind in HOSTILE if by_kinds else ():
            a = [await probe.execute() * 1000 for _ in range(n // 2)]
            nb = Neighbours(image)
            try:
                await asyncio.to_thread(nb.start, (kind,), 2)
                await asyncio.sleep(1)
                b = [await probe.execute() * 1000 for _ in range(n // 2)]
            finally:
                await asyncio.to_thread(nb.stop)
            by_kind[kind] = percentile(b, 99) / percentile(a, 99)
            await asyncio.sleep(0.5)
    finally:
        await probe.stop()
    kinds = [
        Figure(f"T ratio p99 with 2 {k} neighbours/alone", "x", [v]) for k, v in by_kind.items()
    ]
    figs = phase_figures(
        "T", "probe execute 1+1", "10 hostile neighbours", result, " (per phase pair)"
    )
    return [*figs, *kinds]


#: The account whose delegation holds the neighbours in ``fair_share`` (it owns nothing the
#: neighbours touch; they run as uid 1000 in root mode, as every neighbour here).
TENANT = "nobody"
#: That tenant's aggregate caps, as a teaching host's policy gives one student.
TENANT_CAPS = CgroupLimits(
    memory=2 << 30, memory_swap=0, cpu_quota_us=cpus_to_quota(1.0), pids=2048
)


@contextlib.contextmanager
def tenant() -> Iterator[CgroupManager | None]:
    """A delegation of ``TENANT`` with ``TENANT_CAPS`` and a manager for containers in it;
    None when that account already has a delegation (an admin's: left alone). Removed after."""
    uid = pwd.getpwnam(TENANT).pw_uid
    layout = detect()
    if any(d.uid == uid for d in delegations(layout)):
        yield None
        return
    made = delegate(TENANT, TENANT_CAPS, layout)
    reset_manager_cache()
    try:
        yield manager_for_user(uid, made[0])
    finally:
        reset_manager_cache()
        undelegate(TENANT, layout)


async def fair_share(h: Harness, n: int = 200, rounds: int = 2) -> list[Figure]:
    """The probe's p99 with the 10 hostile neighbours inside another user's delegation
    (its aggregate caps bound them together) against the probe alone."""
    probe = await _ready_probe(h)
    try:
        with tenant() as manager:
            if manager is None:
                print(f"  fair share: {TENANT} has a delegation already; skipped", file=sys.stderr)
                return []
            result = await phases(h.image("python3"), probe.execute, n, rounds, manager)
    finally:
        await probe.stop()
    return phase_figures(
        "TF",
        "probe execute 1+1",
        "10 hostile neighbours of another user (1 CPU for all)",
        result,
        ", neighbours under a per-user cap",
    )
