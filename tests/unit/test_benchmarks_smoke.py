"""The benchmark suite's pure parts: statistics, table, arguments (the smoke run of the whole
suite is tests/privileged/test_benchmarks_smoke.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import stats
from benchmarks.__main__ import _args


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


def test_publish_prints_and_saves_both_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figs = [stats.Figure("H1 x", "ms", [1.0, 2.0, 3.0])]
    path = stats.publish(figs, str(tmp_path), "hub", quick=True, elapsed=3.2)
    latest = json.loads((tmp_path / "hub-latest.json").read_text())
    assert path.name.startswith("hub-2") and json.loads(path.read_text()) == latest
    assert latest["quick"] is True and latest["figures"][0]["median"] == 2.0
    assert "| H1 x | 2 ms |" in latest["markdown"]
    out = capsys.readouterr().out
    assert "H1 x" in out and "(3 s)" in out and f"wrote {path}" in out
