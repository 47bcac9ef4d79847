"""The death reason describes this death: ``exits.verdict`` and ``exits.CapBaseline``.

A cgroup's cap counters only grow, so a cap hit early in a kernel's life (a cell that met the
pids cap, a worker the OOM killer took) must not be blamed for a later death, nor for a stop
the server asked for. And ``exits.watch_end``: a real child's end is told once, at once; an
undone watch tells nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox_kernel.jupyter.exits import CapBaseline, CapCounts, unwatch_end, verdict, watch_end
from sandbox_kernel.runtime.container import ExitResult

MiB = 1 << 20


def ended(
    *, code: int | None = None, sig: int | None = None, oom: int = 0, pids: int = 0
) -> ExitResult:
    """What ``Container`` reports: the raw counters, flags set when they are above zero."""
    return ExitResult(
        status=code if code is not None else 128 + (sig or 0),
        code=code,
        signal=sig,
        oom_killed=oom > 0,
        memory_limit=256 * MiB,
        memory_peak=256 * MiB,
        pids_limit_hit=pids > 0,
        pids_limit=256,
        oom_kills=oom,
        pids_limit_hits=pids,
    )


def test_the_raw_result_blames_any_cap_hit_of_the_container() -> None:
    # what the runtime says (and `run` prints): the figures of the whole container
    reason = ended(code=0, pids=3).reason()
    assert reason == "exited with code 0; the process limit (256) was reached"


@pytest.mark.parametrize(
    ("result", "since", "stop", "sent", "reason"),
    [
        # the pids cap was hit earlier (the kernel survived it), then a clean exit
        (ended(code=0, pids=7), CapCounts(0, 7), None, (), "exited with code 0"),
        # ... and a restart the user asked for, answered cleanly
        (
            ended(code=0, pids=7),
            CapCounts(),
            "restart requested",
            (),
            "exited with code 0 (restart requested)",
        ),
        # a forced restart (SIGKILL after the shutdown request timed out) after a cap hit
        (
            ended(sig=signal.SIGKILL, pids=7),
            CapCounts(),
            "restart requested, then stopped by the server",
            (signal.SIGINT, signal.SIGKILL),
            "killed by SIGKILL (restart requested, then stopped by the server)",
        ),
        # a forced restart after an OOM kill of a worker process
        (
            ended(sig=signal.SIGKILL, oom=1),
            CapCounts(),
            "stopped by the server",
            (signal.SIGKILL,),
            "killed by SIGKILL (stopped by the server)",
        ),
        # OOM now: the counter rose past the baseline
        (
            ended(sig=signal.SIGKILL, oom=2),
            CapCounts(1, 0),
            None,
            (),
            "out of memory (limit 256 MiB, peak 256 MiB)",
        ),
        # OOM earlier (survived), then a crash of its own
        (ended(sig=signal.SIGSEGV, oom=1), CapCounts(1, 0), None, (), "killed by SIGSEGV"),
        # the user's interrupt (SIGINT sent by the server) killed it after a cap hit
        (
            ended(sig=signal.SIGINT, pids=4),
            CapCounts(),
            None,
            (signal.SIGINT,),
            "killed by SIGINT (sent by the server)",
        ),
        # the user's kill through the server (signal_kernel)
        (
            ended(sig=signal.SIGKILL, oom=1, pids=1),
            CapCounts(),
            "sent by the server",
            (signal.SIGKILL,),
            "killed by SIGKILL (sent by the server)",
        ),
        # a signal the server sent earlier does not explain a death by another one
        (
            ended(sig=signal.SIGKILL, oom=1),
            CapCounts(),
            None,
            (signal.SIGINT,),
            "out of memory (limit 256 MiB, peak 256 MiB)",
        ),
        # a cap hit in this life, shortly before a death nobody asked for: still blamed
        (
            ended(sig=signal.SIGABRT, pids=9),
            CapCounts(0, 2),
            None,
            (),
            "killed by SIGABRT; the process limit (256) was reached",
        ),
        (
            ended(code=1, oom=1, pids=1),
            CapCounts(),
            None,
            (),
            "out of memory (limit 256 MiB, peak 256 MiB); the process limit (256) was reached",
        ),
    ],
)
def test_the_reason_describes_this_death(
    result: ExitResult,
    since: CapCounts,
    stop: str | None,
    sent: tuple[int, ...],
    reason: str,
) -> None:
    judged = verdict(result, since, stop=stop, sent=frozenset(sent))
    assert judged.reason() == reason
    blamed = "out of memory" in judged.reason() or "process limit" in judged.reason()
    assert blamed == (judged.oom_killed or judged.pids_limit_hit)
    assert judged.to_json()["reason"] == judged.reason()


def test_a_setup_error_is_the_reason_whatever_was_asked() -> None:
    failed = replace(ended(code=125), setup_error="mount: /x: no such file")
    for stop in (None, "restart requested"):
        assert (
            verdict(failed, CapCounts(), stop=stop)
            .reason()
            .startswith("the sandbox could not start: mount")
        )


def test_the_baseline_moves_on_only_past_hits_the_kernel_survived() -> None:
    base = CapBaseline(CapCounts(0, 0), now=100.0)
    # a cap hit at 100.5, read at once: the kernel may be dying of it, not yet a baseline
    assert not base.due(100.5)
    base.alive(CapCounts(0, 3), now=100.5)
    assert base.counts == CapCounts(0, 0)
    # seen alive a second after the start's reading: that reading is the baseline, the newer
    # one waits its turn
    assert base.due(101.0)
    base.alive(CapCounts(0, 3), now=101.0)
    assert base.counts == CapCounts(0, 0)
    # seen alive a second after the hit was read: survived
    base.alive(CapCounts(1, 3), now=102.0)
    assert base.counts == CapCounts(0, 3)
    # a death now: the pids hits were survived, the OOM kill read at 102.0 was not
    died = verdict(ended(sig=signal.SIGKILL, oom=1, pids=3), base.counts)
    assert died.reason() == "out of memory (limit 256 MiB, peak 256 MiB)"


def test_gc_drops_the_kept_state_of_kernels_whose_container_is_gone(tmp_path: Path) -> None:
    from sandbox_kernel.jupyter import exits as ex

    (tmp_path / "sk-alive").mkdir()
    for kid, cid in (("k-alive", "sk-alive"), ("k-gone", "sk-gone")):
        d = ex.kernels_dir(tmp_path) / kid
        d.mkdir(parents=True)
        (d / "last-exit.json").write_text(json.dumps({"container_id": cid}))
    (ex.kernels_dir(tmp_path) / "k-broken").mkdir()
    assert sorted(ex.collect_orphans(dry_run=True, root=tmp_path)) == ["k-broken", "k-gone"]
    assert (ex.kernels_dir(tmp_path) / "k-gone").exists()  # a dry run removes nothing
    assert sorted(ex.collect_orphans(root=tmp_path)) == ["k-broken", "k-gone"]
    assert [p.name for p in ex.kernels_dir(tmp_path).iterdir()] == ["k-alive"]


def waiting_child() -> subprocess.Popen[bytes]:
    """A real child process that runs until its stdin is closed."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )


def end(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(10)


async def test_the_end_of_a_process_is_told_once_the_moment_it_ends() -> None:
    child = waiting_child()
    calls: list[float] = []
    told = asyncio.Event()

    def ended() -> None:
        calls.append(time.monotonic())
        told.set()

    watch = watch_end(child.pid, ended)
    try:
        assert watch is not None, "pidfd_open is missing (Linux 5.3 and Python 3.9 have it)"
        await asyncio.sleep(0.3)
        assert calls == [], "told of an end while the process runs"
        end(child)
        gone = time.monotonic()
        await asyncio.wait_for(told.wait(), 5)
        assert calls[0] - gone < 1.0
        # the pidfd stays readable: still one call, though the watch was not undone yet
        await asyncio.sleep(0.3)
        assert len(calls) == 1, calls
    finally:
        unwatch_end(watch)
        if child.poll() is None:
            end(child)


async def test_an_undone_watch_tells_nothing_and_closes_its_pidfd() -> None:
    child = waiting_child()
    calls: list[str] = []
    watch = watch_end(child.pid, lambda: calls.append("ended"))
    assert watch is not None
    unwatch_end(watch)
    with pytest.raises(OSError):
        os.fstat(watch[1])
    end(child)
    await asyncio.sleep(0.5)
    assert calls == []
    unwatch_end(None)  # nothing to undo


def test_there_is_no_watch_without_a_running_loop() -> None:
    child = waiting_child()
    try:
        assert watch_end(child.pid, lambda: None) is None
    finally:
        end(child)
