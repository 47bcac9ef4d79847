"""``sandbox-kernel ps [--json] [--all]``: the running sandboxes, with their kernels and usage.

Layer: cli. Reads the run dirs (``runtime.rundir``), the cgroups and, for a network-mode
``nat`` container, its host-side link's byte counters (sysfs); ``stats`` reuses
``collect``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import time
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from ..runtime.owners import RunRoot, cgroup_manager, containers, run_roots
from ..runtime.rundir import META_POOL
from ..units import format_cpus, format_size


def _uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def collect(root: Path | None = None, *, include_stopped: bool = False) -> list[dict[str, Any]]:
    """One dict per container (running ones unless include_stopped), with its metadata,
    limits and, when it runs, cgroup usage: the caller's own containers (those of the run
    root ``root`` when given) and, as root, every user's (``runtime.owners``). Called by
    ``ps_command`` and, for the metadata, by ``stats`` at each refresh."""
    roots = [RunRoot(os.geteuid(), root)] if root is not None else run_roots()
    rows: list[dict[str, Any]] = []
    now = time.time()
    for owner, info in containers(roots):
        running = info.running()
        if not running and not include_stopped:
            continue
        meta = info.meta
        raw_limits = meta.get("limits")
        limits: dict[str, Any] = raw_limits if isinstance(raw_limits, dict) else {}
        row: dict[str, Any] = {
            "container_id": info.id,
            "owner_uid": owner.uid,  # the host user whose server made it
            "kernel_id": safe_text(meta.get("kernel_id")),
            # an idle member of a server's warm pool (no kernel yet)
            "pool": meta.get(META_POOL) is True,
            "kernelspec": safe_text(meta.get("kernelspec")),
            "image": safe_text(meta.get("image")),
            "user": _int(meta.get("user")),
            "group": _int(meta.get("group")),
            "running": running,
            "supervisor_pid": info.supervisor_pid,
            "created": _number(meta.get("created"), None),
            "uptime_s": round(now - _number(meta.get("created"), now), 1),
            "limits": {
                "memory": _int(limits.get("memory")),
                "cpus": _number(limits.get("cpus"), None),
                "cpu_deferred": limits.get("defer_cpu") is True,
                "pids": _int(limits.get("pids")),
            },
            "usage": None,
            # False: a rootless container without cgroups (the admin allowed it)
            "limits_enforced": meta.get("limits_enforced", True) is not False,
        }
        row["network"] = network_of(info.id, meta, running)
        manager = cgroup_manager(owner, info) if running else None
        if manager is not None:
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


def network_of(container_id: str, meta: dict[str, Any], running: bool) -> dict[str, Any]:
    """A container's network as ``ps`` and ``stats`` show it: ``{"mode": "none"}``, or a
    ``nat`` one's address and bandwidth (bits per second, None: no cap; as its run dir's
    metadata says: set at create, the bandwidth rewritten by each live change) and, while it
    runs, the bytes it received and sent, read from its host-side link's counters
    (``skn-`` + its short name: links only the host makes, never a kernel). Called by
    ``collect`` for each container."""
    net = meta.get("network")
    if not isinstance(net, dict) or net.get("mode") != "nat":
        return {"mode": "none"}
    bandwidth = meta["bandwidth"] if "bandwidth" in meta else net.get("bandwidth")
    out: dict[str, Any] = {
        "mode": "nat",
        "address": safe_text(net.get("address"), 15),
        "bandwidth": _int(bandwidth),
        "bytes_in": None,
        "bytes_out": None,
    }
    if running:
        from ..network import IF_PREFIX
        from ..network.links import counters
        from ..network.nat import short_name

        name = short_name(container_id)
        if name.isalnum():
            counted = counters(IF_PREFIX + name)
            if counted is not None:
                out["bytes_in"], out["bytes_out"] = counted
    return out


def net_io(network: dict[str, Any] | None) -> str:
    """The NET I/O column of ``ps`` and ``stats``: bytes in / out of a ``nat`` container
    (``-`` for network 'none', or while unknown)."""
    if not network or network.get("mode") != "nat" or network.get("bytes_in") is None:
        return "-"
    return f"{format_size(network['bytes_in'])} / {format_size(network['bytes_out'])}"


def safe_text(value: object, limit: int = 200) -> str | None:
    """A metadata string as ps shows it (another user's run dir may hold anything): at
    most ``limit`` printable characters."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


#: The largest metadata number ps takes (another user's run dir may hold anything).
_MAX_NUMBER = 2**63


def _number(value: object, default: float | None) -> Any:
    """A metadata number, or ``default`` when it is not a finite one below 2**63."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) >= _MAX_NUMBER:
            return default
        number = float(value)
        return number if math.isfinite(number) and abs(number) < _MAX_NUMBER else default
    return default


def _int(value: object) -> int | None:
    """A metadata count or id, or None when it is not a non-negative int below 2**63."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_NUMBER
    return value if ok else None  # type: ignore[return-value]


def owner_name(uid: int) -> str:
    """The login name of host uid ``uid`` (the number when it has none). Shown by ``ps``
    and ``stats`` in their OWNER column."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def format_table(rows: list[dict[str, Any]]) -> str:
    """``collect``'s rows as an aligned text table. Called by ``ps_command``."""
    head: tuple[str, ...] = (
        "CONTAINER",
        "KERNEL",
        "KERNELSPEC",
        "IMAGE",
        "USER",
        "MEMORY",
        "CPUS",
        "PIDS",
        "NET I/O",
        "UPTIME",
    )
    me = os.geteuid()
    # root seeing other users' containers: whose server made each
    show_owner = any(r.get("owner_uid", me) != me for r in rows)
    if show_owner:
        head = ("OWNER", *head)
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        lim = r["limits"]
        use = r["usage"] or {}
        mem = f"{format_size(use['memory']) if use else '-'} / {format_size(lim['memory'])}"
        if not r.get("limits_enforced", True):
            mem += " (limits not enforced)"
        cpus = format_cpus(lim["cpus"]) + (" (deferred)" if lim["cpu_deferred"] else "")
        pids = f"{use.get('pids', '-')} / {lim['pids'] if lim['pids'] is not None else 'unlimited'}"
        kernel = (r["kernel_id"] or ("(pool)" if r.get("pool") else "-"))[:8]
        lines.append(
            (
                *((owner_name(r.get("owner_uid", me)),) if show_owner else ()),
                r["container_id"],
                kernel,
                str(r["kernelspec"] or "-"),
                str(r["image"] or "-"),
                str(r["user"]),
                mem,
                cpus,
                pids,
                net_io(r.get("network")),
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
