"""A short smoke run of the whole benchmark suite (1-2 iterations, few kernels, no podman
import; no timed assertions: figures are checked by the benchmarks themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.privileged
def test_suite_smoke_run(tmp_path: Path, images: None) -> None:
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
    for prefix in (
        "P1 py3",
        "P1 py2.7",
        "P2",
        "P3",
        "P5",
        "P6",
        "P7",
        "P8",
        "T ",
        "N1",
        "N2",
        "N3",
    ):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert all(f["n"] >= 1 for f in data["figures"]), data["figures"]
    assert "figure" in proc.stdout and data["machine"]["cpus"] == os.cpu_count()
