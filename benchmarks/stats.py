"""Small helpers: medians with min and max (and p99), same-run ratios, and the result table.

A comparison is always a :func:`ratio` of samples taken in the same run, interleaved
(ABAB...): each pair gives one ratio, and the figure is the median of those ratios, so
that the noise of a shared machine (other jobs come and go) hits both sides alike.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Figure:
    """One measured figure: samples, and optionally a target the chosen statistic must meet.

    ``limit``: the figure meets its target when ``stat`` (``median`` or ``p99``) <= limit.
    """

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""
    limit: float | None = None
    stat: str = "median"
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def p99(self) -> float:
        return percentile(self.values, 99)

    def value(self) -> float:
        return self.p99 if self.stat == "p99" else self.median

    def verdict(self) -> str:
        if self.limit is None or not self.values:
            return ""
        return "ok" if self.value() <= self.limit else "MISS"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "unit": self.unit,
            "n": len(self.values),
            "median": self.median if self.values else None,
            "p99": self.p99 if self.values else None,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "target": self.target,
            "limit": self.limit,
            "stat": self.stat,
            "verdict": self.verdict(),
            "note": self.note,
            "values": list(self.values),
        }


def ratio(
    name: str,
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    target: str = "",
    limit: float | None = None,
    note: str = "",
) -> Figure:
    """Per-pair ratios numerator[i] / denominator[i] (samples taken interleaved, same run)."""
    values = [a / b for a, b in zip(numerator, denominator, strict=False) if b > 0]
    return Figure(name, "x", values, target=target, limit=limit, note=note)


def table(figures: list[Figure]) -> str:
    rows: list[tuple[str, ...]] = [("figure", "median", "p99", "min", "max", "n", "target", "")]
    for f in figures:
        d = f.as_dict()
        cells = [_fmt(d[k], f.unit) for k in ("median", "p99", "min", "max")]
        rows.append((f.name, *cells, str(d["n"]), f.target, f.verdict()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def markdown(figures: list[Figure]) -> str:
    """The same table in Markdown (for benchmarks/RESULTS.md and the README)."""
    lines = [
        "| figure | median | p99 | min | max | n | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        d = f.as_dict()
        cells = [_fmt(d[k], f.unit) for k in ("median", "p99", "min", "max")]
        lines.append("| " + " | ".join((f.name, *cells, str(d["n"]), f.target, f.verdict())) + " |")
    return "\n".join(lines)


def _fmt(value: object, unit: str) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.3g} {unit}"


def save(out: str, names: Sequence[str], result: dict[str, object]) -> Path:
    """Write ``result`` (JSON) under the folder ``out`` as each of ``names``; the first
    path. Called by ``python -m benchmarks`` and ``benchmarks.rootless``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(json.dumps(result, indent=1) + "\n")
    return folder / names[0]


def publish(figures: list[Figure], out: str, kind: str, *, quick: bool, elapsed: float) -> Path:
    """Print the table and the run's duration, and save the figures as ``KIND-STAMP.json``
    and ``KIND-latest.json`` under ``out``; the first path. The end of ``benchmarks.hub``
    and ``benchmarks.rootless``."""
    print(table(figures))
    print(f"({elapsed:.0f} s)")
    when = stamp()
    result: dict[str, object] = {
        "date": when,
        "quick": quick,
        "figures": [f.as_dict() for f in figures],
        "markdown": markdown(figures),
    }
    path = save(out, (f"{kind}-{when}.json", f"{kind}-latest.json"), result)
    print(f"wrote {path}")
    return path


def stamp() -> str:
    """The UTC time of a run, as its result files are named."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
