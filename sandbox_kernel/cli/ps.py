"""``sandbox-kernel ps [--json] [--all]``: the running sandboxes, with their kernels and usage.

Layer: cli. Reads the run dirs (``runtime.rundir``) and the cgroups; ``stats`` reuses
``collect``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from ..paths import is_container_id, run_dir
from ..runtime.rundir import ContainerInfo, find_container
from ..units import format_cpus, format_size


def _uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def collect(root: Path | None = None, *, include_stopped: bool = False) -> list[dict[str, Any]]:
    """One dict per container of the run dir (running ones unless include_stopped), with
    its metadata, limits and, when it runs, cgroup usage. Called by ``ps_command`` and, for
    the metadata, by ``stats`` at each refresh."""
    from ..cgroups import get_manager

    root = root or run_dir()
    rows: list[dict[str, Any]] = []
    if not root.is_dir():
        return rows
    try:
        manager: Any = get_manager()
    except SandboxError:
        manager = None
    now = time.time()
    for entry in sorted(root.iterdir()):
        if not is_container_id(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            info: ContainerInfo = find_container(entry.name, root=root)
        except SandboxError:
            continue
        running = info.running()
        if not running and not include_stopped:
            continue
        meta = info.meta
        limits = meta.get("limits") or {}
        row: dict[str, Any] = {
            "container_id": info.id,
            "kernel_id": meta.get("kernel_id"),
            "kernelspec": meta.get("kernelspec"),
            "image": meta.get("image"),
            "user": meta.get("user"),
            "group": meta.get("group"),
            "running": running,
            "supervisor_pid": info.supervisor_pid,
            "created": meta.get("created"),
            "uptime_s": round(now - float(meta.get("created") or now), 1),
            "limits": {
                "memory": limits.get("memory"),
                "cpus": limits.get("cpus"),
                "cpu_deferred": bool(limits.get("defer_cpu")),
                "pids": limits.get("pids"),
            },
            "usage": None,
            # False: a rootless container without cgroups (the admin allowed it)
            "limits_enforced": meta.get("limits_enforced", True) is not False,
        }
        if manager is not None and running:
            try:
                st = manager.open(info.id).stats()
            except (SandboxError, OSError):
                pass
            else:
                row["usage"] = {
                    "memory": st.memory_current,
                    "memory_peak": st.memory_peak,
                    "memory_limit": st.memory_limit,
                    "cpu_s": round(st.cpu_usage_us / 1e6, 2),
                    "pids": st.pids_current,
                    "pids_limit": st.pids_limit,
                    "oom_kills": st.oom_kills,
                }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """``collect``'s rows as an aligned text table. Called by ``ps_command``."""
    head = (
        "CONTAINER",
        "KERNEL",
        "KERNELSPEC",
        "IMAGE",
        "USER",
        "MEMORY",
        "CPUS",
        "PIDS",
        "UPTIME",
    )
    lines = [head]
    for r in rows:
        lim = r["limits"]
        use = r["usage"] or {}
        mem = f"{format_size(use['memory']) if use else '-'} / {format_size(lim['memory'])}"
        if not r.get("limits_enforced", True):
            mem += " (limits not enforced)"
        cpus = format_cpus(lim["cpus"]) + (" (deferred)" if lim["cpu_deferred"] else "")
        pids = f"{use.get('pids', '-')} / {lim['pids'] if lim['pids'] is not None else 'unlimited'}"
        kernel = (r["kernel_id"] or "-")[:8]
        lines.append(
            (
                r["container_id"],
                kernel,
                str(r["kernelspec"] or "-"),
                str(r["image"] or "-"),
                str(r["user"]),
                mem,
                cpus,
                pids,
                _uptime(r["uptime_s"]) if r["running"] else "stopped",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


def register(sub: Any) -> None:
    """Add the ``ps`` verb (called by ``cli.build_parser``)."""
    p = sub.add_parser("ps", help="list running sandboxes (kernels), their limits and usage")
    p.add_argument("--json", action="store_true", help="print JSON (one list of objects)")
    p.add_argument(
        "--all", action="store_true", help="include stopped containers not yet collected"
    )
    p.set_defaults(func=ps_command)


def ps_command(args: argparse.Namespace) -> int:
    """``sandbox-kernel ps``: print the table (or JSON with ``--json``). Called by
    ``cli.main``."""
    rows = collect(include_stopped=args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print("no running sandbox")
    return 0
