"""Small helpers: medians with min and max, and the result table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    target: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "unit": self.unit,
            "n": len(self.values),
            "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "target": self.target,
        }


def table(figures: list[Figure]) -> str:
    rows = [("figure", "median", "min", "max", "n", "target")]
    for f in figures:
        d = f.as_dict()
        cells = [_fmt(d[k], f.unit) for k in ("median", "min", "max")]
        rows.append((f.name, *cells, str(d["n"]), f.target))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _fmt(value: object, unit: str) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3g} {unit}"
