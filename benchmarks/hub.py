"""H1 login to a ready kernel through a teaching hub, H2 kernels per user at the limit.

``python -m benchmarks.hub --user USER --prefix PREFIX --proxy CHP [--rounds N] [--quick]
[--out DIR]``, as root; ``tools/rootless-tests.sh --bench`` makes the account, the
world-readable install and configurable-http-proxy, runs it after the rootless figures, and
removes them after.

A real JupyterHub (tests/hubserver.py: LocalProcessSpawner, the product's spawn hooks, a
policy file) serves USER. H1, per round: the student's server is started through the hub's
API (what a login does after authentication), a kernel is started through the proxy and
one cell is executed over its websocket; the figure is the time from the spawn request to
that cell's reply, once with ``python3-sandbox`` and once with the plain ``python3``
ipykernel in the same round (the order alternating), and their per-round ratio. The
kernel's own part (kernel request to reply) is given apart. H2: with ``max_kernels`` = 4
in the policy, four sandbox kernels are requested at once by one student: the time until
the last of them answered a cell, and how long the refusal of a fifth takes. H3, with the
student's server running: the hub's own API (``GET /hub/api/users/USER`` through the proxy,
as the admin service) timed alone and beside the tenant-isolation benchmark's 10 hostile
neighbours (benchmarks/isolation.py), first with their per-kernel caps only, then inside
another user's delegation with that user's aggregate caps (1 CPU for all of them): the
p99 ratio hostile/alone per phase pair, target <= 2 with the aggregate caps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sandbox_kernel.images.store import ImageStore
from tests.hubserver import Hub, HubRefused, running_hub

from .isolation import phase_figures, phases, tenant
from .stats import Figure, publish, ratio

AT_ONCE = 4
POLICY = f"""\
max_memory = "1G"
max_pids = 256
max_kernels = {AT_ONCE}
sandboxed_only = false
allowed_images = ["python3-plot", "python2.7-plot"]
user_memory = "4G"
user_pids = 2048
"""
SANDBOX, PLAIN = "python3-sandbox", "python3"


def login_to_kernel(hub: Hub, user: str, kernel: str) -> tuple[float, float]:
    """Seconds from the spawn request to the first cell's reply, and from the kernel
    request to it; the server is stopped after (not timed)."""
    t0 = time.perf_counter()
    hub.spawn(user, poll=0.05)
    t1 = time.perf_counter()
    kid = hub.api("POST", f"/user/{user}/api/kernels", {"name": kernel})["id"]
    status, out = hub.cell(user, kid, "print(6 * 7)")
    t2 = time.perf_counter()
    if status != "ok" or out.strip() != "42":
        raise RuntimeError(f"{kernel}: the first cell answered {status!r}: {out[-500:]}")
    hub.stop(user)
    return t2 - t0, t2 - t1


def at_the_limit(hub: Hub, user: str) -> tuple[float, float]:
    """Seconds until ``AT_ONCE`` kernels requested at once all answered a cell, and the
    seconds the refusal of one more takes."""
    hub.spawn(user, poll=0.05)

    def one(_: int) -> None:
        kid = hub.api("POST", f"/user/{user}/api/kernels", {"name": SANDBOX})["id"]
        status, out = hub.cell(user, kid, "print(6 * 7)")
        if status != "ok":
            raise RuntimeError(f"a kernel at the limit answered {status!r}: {out[-500:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(AT_ONCE) as pool:
        list(pool.map(one, range(AT_ONCE)))
    t1 = time.perf_counter()
    try:
        hub.api("POST", f"/user/{user}/api/kernels", {"name": SANDBOX})
        raise RuntimeError(f"a kernel beyond max_kernels = {AT_ONCE} was started")
    except HubRefused as exc:
        if "max_kernels" not in exc.message:
            raise
    t2 = time.perf_counter()
    hub.stop(user)
    return t1 - t0, t2 - t1


def hub_api_under_load(hub: Hub, user: str, n: int, rounds: int) -> list[Figure]:
    """H3: the hub API's latency alone and beside 10 hostile neighbours, with their
    per-kernel caps only and under another user's aggregate caps (see the module
    docstring); the student's server runs meanwhile."""
    image = ImageStore().resolve("python3")

    def call() -> float:
        t0 = time.perf_counter()
        model = hub.api("GET", f"/hub/api/users/{user}", timeout=30)
        dt = time.perf_counter() - t0
        if model.get("name") != user:
            raise RuntimeError(f"the hub answered for {model.get('name')!r}, not {user!r}")
        return dt

    async def sample() -> float:
        return await asyncio.to_thread(call)

    async def both() -> list[Figure]:
        for _ in range(20):  # warm up: connections, the hub's caches
            await sample()
        what = "hub API GET user"
        figs = phase_figures(
            "H3",
            what,
            "10 hostile neighbours (per-kernel caps only)",
            await phases(image, sample, n, rounds),
            ", per-kernel caps only",
            target=False,
        )
        with tenant() as manager:
            if manager is None:
                print(
                    "  H3: the tenant has a delegation already; capped run skipped", file=sys.stderr
                )
                return figs
            capped = await phases(image, sample, n, rounds, manager)
        return figs + phase_figures(
            "H3F",
            what,
            "10 hostile neighbours of another user (1 CPU for all)",
            capped,
            ", neighbours under a per-user cap",
        )

    hub.spawn(user, poll=0.05)
    try:
        return asyncio.run(both())
    finally:
        hub.stop(user)


def measure(hub: Hub, user: str, rounds: int, n: int = 200) -> list[Figure]:
    totals: dict[str, list[float]] = {SANDBOX: [], PLAIN: []}
    kernel_part: dict[str, list[float]] = {SANDBOX: [], PLAIN: []}
    for i in range(rounds):
        order = (SANDBOX, PLAIN) if i % 2 == 0 else (PLAIN, SANDBOX)
        for kernel in order:
            total, part = login_to_kernel(hub, user, kernel)
            totals[kernel].append(total * 1000)
            kernel_part[kernel].append(part * 1000)
    all_ready: list[float] = []
    refusal: list[float] = []
    for _ in range(max(1, rounds // 2)):
        ready, refused = at_the_limit(hub, user)
        all_ready.append(ready * 1000)
        refusal.append(refused * 1000)
    return [
        Figure("H1 login -> ready sandbox kernel (through the hub)", "ms", totals[SANDBOX]),
        Figure("H1 login -> ready plain ipykernel (same hub)", "ms", totals[PLAIN]),
        ratio("H1 sandbox / plain, login -> ready", totals[SANDBOX], totals[PLAIN]),
        Figure("H1 kernel request -> first reply, sandbox", "ms", kernel_part[SANDBOX]),
        Figure("H1 kernel request -> first reply, plain", "ms", kernel_part[PLAIN]),
        Figure(f"H2 {AT_ONCE} kernels at once (the user's limit) -> all answered", "ms", all_ready),
        Figure("H2 the refusal of one more (max_kernels)", "ms", refusal),
        *hub_api_under_load(hub, user, n, 2 if rounds > 1 else 1),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hub", description=__doc__)
    p.add_argument("--user", help="the student account the hub serves")
    p.add_argument("--prefix", help="the world-readable install (jupyterhub, sandbox-kernel)")
    p.add_argument("--proxy", help="the configurable-http-proxy executable")
    p.add_argument("--rounds", type=int, default=6, help="H1 rounds (H2: half as many)")
    p.add_argument("--quick", action="store_true", help="one round (smoke run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not (args.user and args.prefix and args.proxy):
        print(
            "run as root with --user, --prefix, --proxy (tools/rootless-tests.sh --bench)",
            file=sys.stderr,
        )
        return 2
    rounds = 1 if args.quick else args.rounds
    t0 = time.monotonic()
    with running_hub([args.user], args.prefix, args.proxy, POLICY) as hub:
        figs = measure(hub, args.user, rounds, n=20 if args.quick else 200)
    publish(figs, args.out, "hub", quick=args.quick, elapsed=time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
