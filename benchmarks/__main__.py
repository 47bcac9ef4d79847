"""``python -m benchmarks [--quick] [--only P1,P5] [--out DIR]``: run, print the table, write JSON.

Figures (see benchmarks/RESULTS.md): P1 start latency (with the bwrap and podman peers),
P2 setup time, P3 host-side memory, P4 the warm pool (a pooled start, an idle member, many
at once), P5 execute round trip, P6 kernels started at once,
P7 many idle kernels, P8 image size vs setup time, T tenant isolation, TF the same with
the neighbours under another user's aggregate caps (a teaching hub), G pulls from a
registry on loopback (against skopeo; a second pull with every layer present), N network
mode nat (setup time added, throughput and latency against the host's loopback).
Needs root, the built ``python3`` and ``python2.7`` images, and the native executor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from .stats import Figure, markdown, save, stamp, table

ALL = ("P1", "P2", "P4", "P5", "P6", "P7", "P8", "T", "TF", "G", "N")
KERNEL_FIGURES = {"P1", "P4", "P5", "P6", "P7", "T", "TF"}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1-2 iterations each (smoke run)")
    p.add_argument("--only", default="", help=f"comma list of {','.join(ALL)} (P2 includes P3)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-peers", action="store_true", help="P1 without bwrap/podman")
    p.add_argument("--p6", type=int, default=40, help="kernels started at once (P6)")
    p.add_argument("--p7", type=int, default=100, help="idle sandboxed kernels (P7)")
    return p.parse_args(argv)


def _machine() -> dict[str, object]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cg = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "cgroup": cg,
        "python": platform.python_version(),
    }


async def _kernel_figures(
    selected: set[str], args: argparse.Namespace, notes: list[str]
) -> list[Figure]:
    from . import execute, isolation, pool, start
    from .kernels import Harness

    q = args.quick
    h = Harness()
    figs: list[Figure] = []

    async def group(key: str, title: str, coro_fn) -> None:  # type: ignore[no-untyped-def]
        if key not in selected:
            return
        print(f"{key} {title} ...", file=sys.stderr)
        try:
            figs.extend(await coro_fn())
        except Exception as exc:  # one figure failing must not lose the others
            traceback.print_exc()
            notes.append(f"{key} failed: {exc!r}")

    try:
        await group(
            "P1",
            "start latency",
            lambda: start.measure(
                h, rounds=1 if q else 8, peers=not args.no_peers, warmup=not q, notes=notes
            ),
        )
        await group(
            "P4",
            "the warm pool",
            lambda: pool.measure(h, rounds=3 if q else 20, at_once=3 if q else 40),
        )
        await group("P5", "execute round trip", lambda: execute.p5(h, n=20 if q else 200))
        await group(
            "P6",
            "kernels at once",
            lambda: execute.p6(h, n=3 if q else args.p6, rounds=1 if q else 2, notes=notes),
        )
        await group(
            "P7",
            "idle kernels",
            lambda: execute.p7(h, n=3 if q else args.p7, rounds=2 if q else 3, notes=notes),
        )
        await group(
            "T",
            "tenant isolation",
            lambda: isolation.measure(h, n=20 if q else 200, rounds=1 if q else 2, by_kinds=not q),
        )
        await group(
            "TF",
            "tenant isolation with per-user caps (a teaching hub)",
            lambda: isolation.fair_share(h, n=20 if q else 200, rounds=1 if q else 2),
        )
    finally:
        h.close()
    return figs


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    selected = {s.strip().upper() for s in args.only.split(",") if s.strip()} or set(ALL)
    unknown = selected - set(ALL) - {"P3"}
    if unknown:
        print(f"unknown figures {sorted(unknown)}; choose from {','.join(ALL)}", file=sys.stderr)
        return 2
    if "P3" in selected:
        selected.add("P2")
    if os.geteuid() != 0:
        print("the benchmarks need root (namespaces, cgroups)", file=sys.stderr)
        return 2
    if selected & KERNEL_FIGURES:
        from .kernels import private_mount_namespace

        private_mount_namespace()  # before any thread: the chroot/bwrap views are mounted here
    t0 = time.monotonic()
    notes: list[str] = []
    figs: list[Figure] = []
    if selected & KERNEL_FIGURES:
        figs += asyncio.run(_kernel_figures(selected, args, notes))
    if "P2" in selected:
        from . import runtime

        print("P2/P3 runtime ...", file=sys.stderr)
        figs += runtime.measure(runs=3 if args.quick else 50, idle=2 if args.quick else 10)
    if "P8" in selected:
        from . import images

        print("P8 image size ...", file=sys.stderr)
        figs += images.measure(runs=2 if args.quick else 30, large=not args.quick)
    if "G" in selected:
        from . import registry

        print("G registry pulls ...", file=sys.stderr)
        figs += registry.measure(runs=1 if args.quick else 5)
    if "N" in selected:
        from . import network

        print("N network mode nat ...", file=sys.stderr)
        figs += network.measure(
            runs=3 if args.quick else 30,
            transfers=1 if args.quick else 5,
            size=20_000_000 if args.quick else 200_000_000,
        )
    elapsed = time.monotonic() - t0
    print(table(figs))
    for n in notes:
        print(f"note: {n}")
    print(f"({elapsed:.0f} s)")
    when = stamp()
    result = {
        "date": when,
        "machine": _machine(),
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "figures": [f.as_dict() for f in figs],
        "notes": notes,
        "markdown": markdown(figs),
    }
    print(f"wrote {save(args.out, (f'bench-{when}.json', 'latest.json'), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
