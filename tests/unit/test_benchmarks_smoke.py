"""The benchmark suite: its pure parts (statistics, table, arguments), and a short privileged
smoke run of the whole suite (1-2 iterations; no timed assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import stats
from benchmarks.__main__ import _args

ROOT = Path(__file__).resolve().parents[2]


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == 50
    assert stats.percentile(values, 99) == 99
    assert stats.percentile(values, 100) == 100
    assert stats.percentile([3.0], 99) == 3.0
    assert math.isnan(stats.percentile([], 99))


def test_figure_verdict_uses_the_chosen_statistic() -> None:
    f = stats.Figure("x", "ms", [1.0] * 99 + [500.0], limit=200.0, stat="p99")
    assert f.median == 1.0 and f.p99 == 1.0 and f.verdict() == "ok"
    f.values += [500.0] * 5
    assert f.verdict() == "MISS"
    assert stats.Figure("y", "ms").verdict() == ""
    assert stats.Figure("z", "ms", [1.0]).verdict() == ""  # no target


def test_ratio_is_per_pair() -> None:
    r = stats.ratio("r", [2.0, 3.0, 10.0], [1.0, 3.0, 5.0], target="<= 1.05", limit=1.05)
    assert r.values == [2.0, 1.0, 2.0]
    assert r.unit == "x" and r.median == 2.0 and r.verdict() == "MISS"
    assert stats.ratio("r", [1.0], [0.0]).values == []  # a zero denominator is dropped


def test_table_and_json_forms() -> None:
    figs = [
        stats.Figure("P2 setup", "ms", [1.0, 2.0, 3.0], target="<= 10 ms", limit=10.0),
        stats.Figure("empty", "ms"),
    ]
    text = stats.table(figs)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["figure", "median", "p99", "min", "max"]
    assert "2 ms" in lines[1] and lines[1].rstrip().endswith("ok")
    assert "-" in lines[2]
    md = stats.markdown(figs)
    assert md.startswith("| figure |") and md.count("\n") == 3
    d = figs[0].as_dict()
    json.dumps(d)
    assert (d["median"], d["min"], d["max"], d["n"], d["verdict"]) == (2.0, 1.0, 3.0, 3, "ok")


def test_arguments() -> None:
    a = _args(["--quick", "--only", "P1,p5"])
    assert a.quick and a.only == "P1,p5" and a.p6 == 40 and a.p7 == 100
    assert not _args([]).quick


@pytest.mark.privileged
def test_suite_smoke_run(tmp_path: Path) -> None:
    """The whole suite with --quick (1-2 iterations, few kernels, no podman import)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-peers", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "latest.json").read_text())
    names = [f["name"] for f in data["figures"]]
    for prefix in ("P1 py3", "P1 py2.7", "P2", "P3", "P5", "P6", "P7", "P8", "T "):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(f["n"] >= 1 for f in data["figures"]), data["figures"]
    assert "figure" in proc.stdout and data["machine"]["cpus"] == os.cpu_count()
