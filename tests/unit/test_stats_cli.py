"""``sandbox-kernel stats``: sampling, CPU %, formatting and the command, with fake data."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Collection
from typing import Any

import pytest

from sandbox_kernel.cli import main
from sandbox_kernel.cli import stats as st

M = 1 << 20

# ps.collect()'s JSON-shaped records, as the stats command reads them
BOXES: list[dict[str, Any]] = [
    {
        "container_id": "sk-0123456789ab",
        "kernel_id": "5e1f2a3b-aaaa-bbbb-cccc-000000000001",
        "kernelspec": "python3-sandbox",
        "image": "python3:latest",
        "user": 1000,
    },
    {
        "container_id": "sk-ba9876543210",
        "kernel_id": None,
        "kernelspec": None,
        "image": "python2.7:latest",
        "user": 65534,
    },
]


def figures(cpu_us: int, memory: int = 100 * M, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "memory": memory,
        "memory_peak": 150 * M,
        "memory_limit": 1024 * M,
        "cpu_usage_us": cpu_us,
        "cpus": 1.5,
        "pids": 12,
        "pids_limit": 256,
        "oom_kills": 0,
        "pids_limit_hits": 0,
    }
    base.update(kw)
    return base


class FakeCgroups:
    """Each read of a container advances its CPU time by ``rate`` CPU-us per call."""

    def __init__(self, rates: dict[str, int], gone: Collection[str] = frozenset()) -> None:
        self.rates, self.gone = rates, gone
        self.cpu = dict.fromkeys(rates, 1_000_000)

    def read(self, cid: str) -> dict[str, object] | None:
        if cid in self.gone:
            return None
        value = self.cpu[cid]
        self.cpu[cid] += self.rates[cid]
        return figures(value, memory_limit=None if cid.endswith("10") else 1024 * M)


def test_cpu_percent_and_figures_over_one_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    fake = FakeCgroups({"sk-0123456789ab": 1_500_000, "sk-ba9876543210": 0})
    slept: list[float] = []
    rows = st.measure(2.0, collect=lambda: BOXES, read=fake.read, sleep=slept.append)
    assert slept == [2.0]
    first, second = rows
    assert first["kernel_id"] == BOXES[0]["kernel_id"] and first["user"] == 1000
    assert first["limits"] == {"memory": 1024 * M, "cpus": 1.5, "pids": 256}
    assert first["usage"]["cpu_percent"] == 75.0  # 1.5 CPU-s in 2 s
    assert first["usage"]["memory_percent"] == pytest.approx(9.8)
    assert first["usage"]["memory_peak"] == 150 * M and first["usage"]["pids"] == 12
    assert second["usage"]["cpu_percent"] == 0.0
    assert second["limits"]["memory"] is None and second["usage"]["memory_percent"] is None
    json.dumps(rows)  # plain data


def test_a_sandbox_that_ended_meanwhile_is_left_out() -> None:
    fake = FakeCgroups({"sk-0123456789ab": 0, "sk-ba9876543210": 0}, gone={"sk-ba9876543210"})
    rows = st.measure(0.0, collect=lambda: BOXES, read=fake.read, sleep=lambda s: None)
    assert [r["container_id"] for r in rows] == ["sk-0123456789ab"]


def test_table_has_every_column() -> None:
    before = (10.0, {"sk-0123456789ab": figures(0)})
    after = (11.0, {"sk-0123456789ab": figures(250_000)})
    text = st.format_table(st.build_rows(BOXES, before, after))
    head, line = text.splitlines()
    for column in ("CONTAINER", "KERNEL", "IMAGE", "USER", "CPU %", "MEM USAGE / LIMIT", "PIDS"):
        assert column in head
    assert line.split() == [
        "sk-0123456789ab",
        "5e1f2a3b",
        "python3:latest",
        "1000",
        "25.0%",
        "1.5",
        "100",
        "MiB",
        "/",
        "1",
        "GiB",
        "9.8%",
        "150",
        "MiB",
        "12",
        "/",
        "256",
        "-",  # NET I/O: network 'none'
        "0",
    ]
    # the first refresh has no earlier sample: no CPU % yet; no limit: "unlimited"
    first = st.build_rows(
        BOXES, None, (1.0, {"sk-0123456789ab": figures(0, memory_limit=None, pids_limit=None)})
    )
    line = st.format_table(first).splitlines()[1]
    assert "  -  " in line and "100 MiB / unlimited" in line and "12 / unlimited" in line
    assert st.render([]) == "no running sandbox"
    # start-up runs without the CPU cap: the table says which cap comes
    boxes = [dict(BOXES[0], limits={"cpus": 2.0, "cpu_deferred": True})]
    rows = st.build_rows(boxes, None, (1.0, {"sk-0123456789ab": figures(0, cpus=None)}))
    assert rows[0]["limits"]["cpus"] is None and rows[0]["cpus_deferred"] == 2.0
    assert "2 (deferred)" in st.format_table(rows)


def test_nat_sandbox_shows_bytes_in_and_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``nat`` container's bytes come from its host-side link (skn- + its short name),
    its bandwidth from the run dir's metadata (a live change rewrote it)."""
    from sandbox_kernel.cli import ps
    from sandbox_kernel.network import links

    asked: list[str] = []

    def counters(ifname: str) -> tuple[int, int]:
        asked.append(ifname)
        return 3 * M, 2048

    monkeypatch.setattr(links, "counters", counters)
    meta = {"network": {"mode": "nat", "address": "10.213.0.2", "bandwidth": 16_000_000}}
    net = ps.network_of("sk-0123456789ab", {**meta, "bandwidth": 8_000_000}, True)
    assert asked == ["skn-0123456789a"]
    assert net == {
        "mode": "nat",
        "address": "10.213.0.2",
        "bandwidth": 8_000_000,
        "bytes_in": 3 * M,
        "bytes_out": 2048,
    }
    assert ps.network_of("sk-0123456789ab", meta, False)["bytes_in"] is None
    assert ps.network_of("sk-0123456789ab", {}, True) == {"mode": "none"}
    assert ps.network_of("sk-0123456789ab", {"network": "nat"}, True) == {"mode": "none"}
    boxes = [dict(BOXES[0], network=net)]
    rows = st.build_rows(boxes, None, (1.0, {"sk-0123456789ab": figures(0)}))
    assert "3 MiB / 2 KiB" in st.format_table(rows)
    assert ps.net_io({"mode": "none"}) == "-"


def test_stream_redraws_with_cpu_from_the_previous_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    fake = FakeCgroups({"sk-0123456789ab": 500_000, "sk-ba9876543210": 1_000_000})
    out = io.StringIO()
    slept: list[float] = []
    st.stream(1.0, out, collect=lambda: BOXES, read=fake.read, sleep=slept.append, rounds=3)
    frames = out.getvalue().split("\x1b[H\x1b[2J")[1:]
    assert len(frames) == 3 and slept == [1.0, 1.0]
    assert "50.0%" not in frames[0] and "50.0%" in frames[1] and "100.0%" in frames[2]


def test_command_json_and_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCgroups({"sk-0123456789ab": 10_000, "sk-ba9876543210": 0})
    monkeypatch.setattr(st, "_default_collect", lambda: BOXES)
    monkeypatch.setattr(st, "read_cgroup", fake.read)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    # measure's defaults were bound at import: pass through the module attributes
    real_measure = st.measure
    monkeypatch.setattr(
        st,
        "measure",
        lambda interval: real_measure(
            interval, collect=st._default_collect, read=st.read_cgroup, sleep=lambda s: None
        ),
    )
    assert main(["stats", "--json", "--interval", "0.5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["container_id"] for r in rows] == ["sk-0123456789ab", "sk-ba9876543210"]
    assert main(["stats", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CONTAINER") and "sk-ba9876543210" in out
    assert main(["stats", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
