"""P4 the warm pool: a pooled start beside a cold one, the memory and processes of an idle
member, and many kernels requested at once with a pool and without.

A pooled start is timed as P1 times a cold one (``AsyncKernelManager.start_kernel``, then a
fresh client's first kernel_info_reply and first iopub status), each only once the pool has
a ready member (the wait for it is not timed: that is the pool's background work). The
cold starts of the same kernelspec without a pool are interleaved with them.
"""

from __future__ import annotations

import asyncio
import sys
import time

from traitlets.config import Config

from sandbox_kernel.jupyter import pool as pool_mod

from .execute import _at_once
from .kernels import Harness, Kernel, descendants, pss_kib, stop_all
from .start import phase_figures
from .stats import Figure, ratio

P4_LIMIT_MS = 30.0


async def _members(spec: str, count: int, timeout: float = 300) -> list[pool_mod.Member]:
    """Wait until ``count`` members of ``spec`` are ready; them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = pool_mod.POOL.idle(spec)
        if len(members) >= count:
            return members
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the pool of {spec} did not reach {count} ready members in {timeout} s")


async def _timed(h: Harness, spec: str) -> tuple[float, float, bool]:
    k: Kernel = await h.start(spec)
    try:
        reply, iopub = await k.ready()
        pooled = bool(getattr(k.km.provisioner, "pooled", False))
    finally:
        await k.stop()
    return reply * 1000, iopub * 1000, pooled


def _member_memory(member: pool_mod.Member) -> tuple[float, float, int, int]:
    """PSS (MiB) of the member's host-side processes (executor, init) and of its kernel's
    processes; their counts."""
    sup = member.container.proc.pid if member.container.proc else None
    if sup is None:
        return 0.0, 0.0, 0, 0
    init = member.container.init_pid
    host = [sup, *([init] if init else [])]
    inside = [p for p in descendants(sup) if p not in host]
    return (
        sum(pss_kib(p) for p in host) / 1024,
        sum(pss_kib(p) for p in inside) / 1024,
        len(host),
        len(inside),
    )


async def measure(h: Harness, rounds: int = 20, at_once: int = 40) -> list[Figure]:
    figs: list[Figure] = []
    pooled = h.sandbox_variant("python3-sandbox", "pool", pool_size=1)
    holder = await h.start(pooled)  # the first start is cold and fills the pool
    try:
        await holder.ready()
        warm: tuple[list[float], list[float]] = ([], [])
        cold: tuple[list[float], list[float]] = ([], [])
        misses = 0
        await _timed(h, "python3-sandbox")  # warm-up of the cold path
        for r in range(rounds):
            order = ("pool", "cold") if r % 2 == 0 else ("cold", "pool")
            for kind in order:
                if kind == "pool":
                    await _members(pooled, 1)
                    reply, iopub, was_pooled = await _timed(h, pooled)
                    misses += not was_pooled
                    warm[0].append(reply)
                    warm[1].append(iopub)
                else:
                    reply, iopub, _ = await _timed(h, "python3-sandbox")
                    cold[0].append(reply)
                    cold[1].append(iopub)
        member = (await _members(pooled, 1))[0]
        host_mib, inside_mib, host_n, inside_n = _member_memory(member)
    finally:
        await holder.stop()
    figs += [
        Figure(
            "P4 pooled start: launch -> kernel_info_reply",
            "ms",
            warm[0],
            target=f"<= {P4_LIMIT_MS:.0f}",
            limit=P4_LIMIT_MS,
        ),
        Figure("P4 pooled start: launch -> iopub status", "ms", warm[1]),
        Figure("P4 cold start (same run): launch -> iopub status", "ms", cold[1]),
        ratio("P4 ratio pooled/cold (iopub ready)", warm[1], cold[1]),
        Figure("P4 pooled starts that found no member", "", [misses]),
        *phase_figures("P4 pooled start", h.phases.get(pooled, [])[1:]),
        Figure("P4 idle member: host-side PSS (executor, init)", "MiB", [host_mib]),
        Figure("P4 idle member: kernel PSS (in the container)", "MiB", [inside_mib]),
        Figure("P4 idle member: processes host-side / in the container", "", [host_n, inside_n]),
    ]
    if at_once:
        figs += await _many(h, at_once)
    return figs


async def _many(h: Harness, n: int) -> list[Figure]:
    """``n`` kernels requested at once: claiming a pool of ``n``, and cold."""
    spec = h.sandbox_variant("python3-sandbox", f"pool{n}", pool_size=n)
    h.config = Config({"SandboxPolicy": {"max_pool_size": n}})
    try:
        holder = await h.start(spec)
        await holder.ready()
        t = time.perf_counter()
        await _members(spec, n, timeout=600)
        fill = time.perf_counter() - t
        print(f"  pool of {n} filled in {fill:.1f} s", file=sys.stderr)
        pooled_s, kernels, errors = await _at_once(h, spec, n)
        claimed = sum(bool(getattr(k.km.provisioner, "pooled", False)) for k in kernels)
        await stop_all([*kernels, holder])
        await asyncio.sleep(1)
        cold_s, kernels2, errors2 = await _at_once(h, "python3-sandbox", n)
        await stop_all(kernels2)
    finally:
        h.config = None
        await asyncio.to_thread(pool_mod.POOL.close)
        pool_mod.POOL = pool_mod.Pool()
    return [
        Figure(f"P4 {n} kernels at once from a pool of {n}: all ready", "s", [pooled_s]),
        Figure(f"P4 {n} kernels at once, cold: all ready", "s", [cold_s]),
        Figure(f"P4 {n} at once ratio pooled/cold", "x", [pooled_s / cold_s]),
        Figure(f"P4 {n} at once: claimed from the pool", "", [claimed]),
        Figure(f"P4 {n} at once: failed, pooled / cold", "", [len(errors), len(errors2)]),
        Figure(f"P4 filling a pool of {n}, one member at a time", "s", [fill]),
    ]
