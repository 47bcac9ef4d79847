"""``sandbox-kernel stats [--json] [--no-stream] [--interval S]``: live usage of every sandbox.

Like ``docker stats``: one line per running sandbox with its kernel, image, user, limits
and usage (memory current and peak, CPU % over the last interval, processes). On a
terminal the table refreshes every ``--interval`` seconds until Ctrl-C; with ``--json``,
``--no-stream`` or when the output is not a terminal it is printed once (the CPU % is then
measured over one interval).

Limits are read from the cgroups (what the kernel really has, including changes made
live with ``%sandbox memory=...``), not from the settings the sandbox started with.

Layer: cli. The sandboxes come from ``ps.collect``; the figures from each cgroup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import SandboxError
from ..units import format_cpus, format_size

Sample = dict[str, dict[str, Any]]  # container id -> raw cgroup figures
Collect = Callable[[], list[dict[str, Any]]]
Read = Callable[[str], "dict[str, Any] | None"]

HEAD = (
    "CONTAINER",
    "KERNEL",
    "IMAGE",
    "USER",
    "CPU %",
    "CPUS",
    "MEM USAGE / LIMIT",
    "MEM %",
    "MEM PEAK",
    "PIDS",
    "NET I/O",
    "OOM",
)


def read_cgroup(container_id: str) -> dict[str, Any] | None:
    """Raw figures of one container's cgroup, or None when it is gone. The default ``read``
    of ``measure`` and ``stream``, called for each sandbox at each sample."""
    from ..runtime import owners

    found = owners.find(container_id)
    manager = owners.cgroup_manager(*found) if found is not None else None
    if manager is None:
        return None
    try:
        st = manager.open(container_id).stats()
    except (SandboxError, OSError):
        return None
    cpus = None
    if st.cpu_quota_us is not None and st.cpu_quota_us > 0 and st.cpu_period_us:
        cpus = st.cpu_quota_us / st.cpu_period_us
    return {
        "memory": st.memory_current,
        "memory_peak": st.memory_peak,
        "memory_limit": st.memory_limit,
        "cpu_usage_us": st.cpu_usage_us,
        "cpus": cpus,
        "pids": st.pids_current,
        "pids_limit": st.pids_limit,
        "oom_kills": st.oom_kills,
        "pids_limit_hits": st.pids_limit_hits,
    }


def _default_collect() -> list[dict[str, Any]]:
    from .ps import collect

    return collect()


def snapshot(ids: list[str], read: Read) -> tuple[float, Sample]:
    """(monotonic time, figures of each id that is still there): one sample, taken by
    ``measure`` and ``stream``."""
    now = time.monotonic()
    sample: Sample = {}
    for cid in ids:
        figures = read(cid)
        if figures is not None:
            sample[cid] = figures
    return now, sample


def build_rows(
    sandboxes: list[dict[str, Any]],
    before: tuple[float, Sample] | None,
    after: tuple[float, Sample],
) -> list[dict[str, Any]]:
    """One row per sandbox of ``after``: metadata from ``sandboxes`` (``ps.collect``), figures
    from the cgroup samples; CPU % from the CPU time used between the two samples (100 % =
    one CPU busy all the time; None without an earlier sample)."""
    t1, now = after
    t0, prev = before if before is not None else (t1, {})
    rows = []
    for box in sandboxes:
        cid = box["container_id"]
        cur = now.get(cid)
        if cur is None:
            continue  # ended meanwhile
        old = prev.get(cid)
        cpu_percent = None
        if old is not None and t1 > t0:
            used = max(0, cur["cpu_usage_us"] - old["cpu_usage_us"])
            cpu_percent = round(used / ((t1 - t0) * 1e6) * 100.0, 1)
        limit = cur["memory_limit"]
        rows.append(
            {
                "container_id": cid,
                "owner_uid": box.get("owner_uid"),
                "kernel_id": box.get("kernel_id"),
                "kernelspec": box.get("kernelspec"),
                "image": box.get("image"),
                "user": box.get("user"),
                "limits": {
                    "memory": limit,
                    "cpus": cur["cpus"],
                    "pids": cur["pids_limit"],
                },
                # the CPU cap a kernel gets once it answered its first request (start-up
                # runs uncapped; see provisioner.post_launch)
                "cpus_deferred": _deferred_cpus(box) if cur["cpus"] is None else None,
                # network 'nat': address, bandwidth, bytes in and out (``ps.network_of``)
                "network": box.get("network") or {"mode": "none"},
                "usage": {
                    "memory": cur["memory"],
                    "memory_peak": cur["memory_peak"],
                    "memory_percent": round(cur["memory"] / limit * 100.0, 1) if limit else None,
                    "cpu_percent": cpu_percent,
                    "cpu_s": round(cur["cpu_usage_us"] / 1e6, 3),
                    "pids": cur["pids"],
                    "oom_kills": cur["oom_kills"],
                    "pids_limit_hits": cur["pids_limit_hits"],
                },
            }
        )
    return rows


def _deferred_cpus(box: dict[str, Any]) -> float | None:
    limits = box.get("limits") or {}
    cpus = limits.get("cpus")
    return float(cpus) if limits.get("cpu_deferred") and cpus else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """``build_rows``' rows as an aligned text table, like ``docker stats`` (via ``render``)."""
    from .ps import net_io, owner_name

    me = os.geteuid()
    show_owner = any(r.get("owner_uid", me) not in (me, None) for r in rows)
    lines: list[tuple[str, ...]] = [("OWNER", *HEAD) if show_owner else HEAD]
    for r in rows:
        lim, use = r["limits"], r["usage"]
        cpu = "-" if use["cpu_percent"] is None else f"{use['cpu_percent']:.1f}%"
        mem_pct = "-" if use["memory_percent"] is None else f"{use['memory_percent']:.1f}%"
        pids_limit = "unlimited" if lim["pids"] is None else str(lim["pids"])
        lines.append(
            (
                *((owner_name(r.get("owner_uid", me)),) if show_owner else ()),
                r["container_id"],
                (r["kernel_id"] or "-")[:8],
                str(r["image"] or "-"),
                "-" if r["user"] is None else str(r["user"]),
                cpu,
                (
                    f"{format_cpus(r['cpus_deferred'])} (deferred)"
                    if r.get("cpus_deferred")
                    else format_cpus(lim["cpus"])
                ),
                f"{format_size(use['memory'])} / {format_size(lim['memory'])}",
                mem_pct,
                format_size(use["memory_peak"]),
                f"{use['pids']} / {pids_limit}",
                net_io(r.get("network")),
                str(use["oom_kills"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def render(rows: list[dict[str, Any]]) -> str:
    """The table, or a line saying there is no sandbox. Called by ``stream`` at each redraw
    and by ``stats_command`` for one table."""
    return format_table(rows) if rows else "no running sandbox"


def measure(
    interval: float,
    *,
    collect: Collect = _default_collect,
    read: Read = read_cgroup,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Rows once, with the CPU % measured over ``interval`` seconds. Called by
    ``stats_command`` for ``--json``, ``--no-stream`` and output that is not a terminal."""
    boxes = collect()
    ids = [b["container_id"] for b in boxes]
    before = snapshot(ids, read)
    sleep(interval)
    return build_rows(boxes, before, snapshot(ids, read))


def stream(
    interval: float,
    out: TextIO,
    *,
    collect: Collect = _default_collect,
    read: Read = read_cgroup,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Redraw the table every ``interval`` seconds (``rounds`` times, or until Ctrl-C).
    Called by ``stats_command`` on a terminal."""
    previous: tuple[float, Sample] | None = None
    done = 0
    while rounds is None or done < rounds:
        boxes = collect()
        current = snapshot([b["container_id"] for b in boxes], read)
        out.write("\x1b[H\x1b[2J" + render(build_rows(boxes, previous, current)) + "\n")
        out.flush()
        previous = current
        done += 1
        if rounds is None or done < rounds:
            sleep(interval)


def register(sub: Any) -> None:
    """Add the ``stats`` verb (called by ``cli.build_parser``)."""
    p = sub.add_parser(
        "stats", help="live CPU, memory and process usage of the running sandboxes (kernels)"
    )
    p.add_argument("--json", action="store_true", help="print JSON once (one list of objects)")
    p.add_argument("--no-stream", action="store_true", help="print the table once")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes, and over which CPU %% is measured (default: 1)",
    )
    p.set_defaults(func=stats_command)


def stats_command(args: argparse.Namespace) -> int:
    """``sandbox-kernel stats``: check ``--interval``, then print once or stream (see the
    module docstring). Called by ``cli.main``."""
    interval = args.interval
    if not interval > 0 or interval > 3600:
        print("sandbox-kernel: error: --interval must be between 0 and 3600 s", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(measure(interval), indent=2))
        return 0
    if args.no_stream or not sys.stdout.isatty():
        print(render(measure(interval)))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        stream(interval, sys.stdout)
    return 0
