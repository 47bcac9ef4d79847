"""The in-kernel %sandbox extension: pure parts, and Python 2.7 compatibility."""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.magics import sandbox_magics as m

SOURCE = m.__file__


def test_units() -> None:
    assert (
        m.parse_duration("500ms") == 0.5
        and m.parse_duration("2m") == 120
        and m.parse_duration("10") == 10
    )
    assert m.parse_size("512M") == 512 << 20 and m.parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert m.fmt_size(512 << 20) == "512 MiB" and m.fmt_size(None) == "unlimited"


def test_report_renders_html_and_text() -> None:
    usage = {
        "memory_current": 50 << 20,
        "memory_peak": 60 << 20,
        "memory_limit": 1 << 30,
        "cpus": 1.0,
        "pids_current": 14,
        "pids_limit": 256,
        "cpu_usage_us": 2_500_000,
        "oom_kills": 0,
        "pids_limit_hits": 1,
    }
    info = {
        "image": "python3:latest",
        "image_digest": "sha256:abcdef0123456789abcdef",
        "limits": {"network": "none"},
        "ceilings": {"memory": "4 GiB", "cpus": 2, "pids": 512},
    }
    report = m.build_report(info, usage, 12.0)
    text = repr(report)
    assert "memory limit" in text and "1 GiB (server allows up to 4 GiB)" in text
    assert "50 MiB (peak 60 MiB)" in text and "2.50 s (12% of a CPU recently)" in text
    assert "process-limit hits   1" in text.replace("  ", "  ")
    html = report._repr_html_()
    assert html.startswith("<table>") and "<th style='text-align:left'>processes</th>" in html


def test_report_network_rows_for_nat_and_none() -> None:
    usage = {"memory_limit": 1 << 30}
    info: dict[str, Any] = {
        "ceilings": {"memory": None, "bandwidth": "16mbit"},
        "network": {
            "mode": "nat",
            "address": "10.213.0.2",
            "allow": ["198.18.0.0/15", "pypi.org:443"],
            "bandwidth": 8_000_000,
            "bytes_in": 3 << 20,
            "bytes_out": 2048,
            "refused": 12,
        },
    }
    report = m.build_report(info, usage, 0.0)
    rows = dict(report.rows)
    assert rows["network"] == "nat, address 10.213.0.2"
    assert rows["network allow"] == "198.18.0.0/15, pypi.org:443"
    assert rows["bandwidth"] == "8mbit each way (server allows up to 16mbit)"
    assert rows["network traffic"] == "3 MiB in, 2 KiB out"
    assert rows["network refused"] == "12 connections refused by policy"
    assert report.note is not None and "bandwidth=RATE" in report.note
    info["network"] = {"mode": "nat", "address": "10.213.0.3", "allow": [], "refused": 1}
    rows = dict(m.build_report(info, usage, 0.0).rows)
    assert rows["bandwidth"] == "unlimited each way (server allows up to 16mbit)"
    assert rows["network refused"] == "1 connection refused by policy"
    rows = dict(m.build_report({"network": {"mode": "none"}}, usage, 0.0).rows)
    assert rows["network"] == "none (loopback only)" and "bandwidth" not in rows
    assert m.fmt_rate(512_000) == "512kbit" and m.fmt_rate(1_500_000_000) == "1.5gbit"


def test_explanation_of_an_oom_kill() -> None:
    info: dict[str, Any] = {
        "ceilings": {"memory": "2 GiB"},
        "previous_exit": {
            "reason": "out of memory (limit 512 MiB, peak 512 MiB)",
            "oom_killed": True,
            "memory_limit": 512 << 20,
        },
    }
    assert m.explain_previous_exit(info) == (
        "The previous kernel was stopped: out of memory (limit 512 MiB, peak 512 MiB). "
        "Raise it with %sandbox memory=1G (this server allows up to 2 GiB) or use less memory."
    )
    assert m.explain_previous_exit({"previous_exit": None}) is None
    # the advice never goes above what may be asked for, nor below the kernel's limit now
    info["ceiling_values"] = {"memory": 768 << 20, "pids": 256}
    info["previous_exit"]["memory_limit"] = 600 << 20  # raised live before the death
    info["limits"] = {"memory": 600 << 20}  # ... and kept on restart
    assert "Raise it with %sandbox memory=768M" in m.explain_previous_exit(info)
    info["ceiling_values"] = {"memory": 1400 << 20}  # never rounded up past the ceiling
    assert "Raise it with %sandbox memory=1200M" in m.explain_previous_exit(info)
    info["previous_exit"]["memory_limit"] = 1000 << 20
    info["limits"] = {"memory": 1000 << 20}
    assert "Raise it with %sandbox memory=1400M" in m.explain_previous_exit(info)
    info["ceiling_values"] = {"memory": 768 << 20, "pids": 256}
    info["limits"] = {"memory": 768 << 20}
    assert m.explain_previous_exit(info).endswith(
        "The memory limit is already the most this kernel may have (768 MiB): use less "
        "memory, or ask your teacher or administrator for more."
    )
    # raised since the death (the dialog's "Restart with ..."): the limit now, nothing to ask
    info["limits"] = {"memory": 1536 << 20}
    assert m.explain_previous_exit(info) == (
        "The previous kernel was stopped: out of memory (limit 512 MiB, peak 512 MiB). "
        "The memory limit is now 1.5 GiB."
    )
    pids: dict[str, Any] = {
        "previous_exit": {"reason": "process limit hit", "pids_limit_hit": True},
        "limits": {"pids": 256},
        "ceiling_values": {"pids": 256},
    }
    assert "already the most this kernel may have (256)" in m.explain_previous_exit(pids)
    pids["previous_exit"]["pids_limit"] = 128
    assert m.explain_previous_exit(pids) == (
        "The previous kernel was stopped: process limit hit. The process limit is now 256."
    )


def test_the_first_execution_asks_the_host_then_and_only_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[dict[str, Any]] = []
    prev = {"reason": "out of memory", "oom_killed": True, "memory_limit": 512 << 20}

    def host(request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        asked.append(request)
        return {"ok": True, "info": {"previous_exit": prev, "limits": {"memory": 1 << 30}}}

    monkeypatch.setattr(m, "ask_host", host)
    monkeypatch.setitem(m._first_execution, "asked", False)
    m._on_first_execution()
    m._on_first_execution()
    assert asked == [{"op": "get"}]
    assert capsys.readouterr().err == (
        "The previous kernel was stopped: out of memory. The memory limit is now 1 GiB.\n"
    )


FOLDER_PROBLEM = (
    "the folder /srv/course belongs to root; kernels run as nobody (65534) there: "
    "chown it to the user, or set SandboxProvisioner.user"
)


def test_an_unwritable_folder_is_told_at_the_first_execution_and_in_the_report() -> None:
    info = {"notebook_folder_writable": False, "notebook_folder_problem": FOLDER_PROBLEM}
    notice = m.first_notice(info)
    assert notice == f"This kernel cannot write its notebook folder: {FOLDER_PROBLEM}."
    usage = {"memory_limit": 1 << 30, "cpus": None, "pids_limit": 64}
    rows = dict(m.build_report(info, usage, 0.0).rows)
    assert rows["folder access"] == f"not writable by this kernel: {FOLDER_PROBLEM}"
    # both notices, the previous death first
    both = m.first_notice({**info, "previous_exit": {"reason": "killed by SIGKILL"}})
    assert both is not None
    assert both.splitlines() == ["The previous kernel was stopped: killed by SIGKILL.", notice]


@pytest.mark.parametrize(
    ("writable", "problem", "row"),
    [
        (True, None, "read-write"),
        (False, None, "read-only (mounted so: notebook_folder='ro')"),
        (None, None, None),
    ],
)
def test_folder_access_row(writable: bool | None, problem: str | None, row: str | None) -> None:
    info = {"notebook_folder_writable": writable, "notebook_folder_problem": problem}
    assert m.folder_access_text(info) == row
    assert m.first_notice(info) is None  # nothing to tell at the first execution
    assert m.folder_access_text(None) is None and m.first_notice(None) is None


class FakeShell:
    def __init__(self) -> None:
        self.user_ns: dict[str, Any] = {}  # whatever the cells assigned

    def transform_cell(self, cell: str) -> str:
        return cell


def test_time_budget_interrupts_and_kernel_stays_usable(capsys: pytest.CaptureFixture[str]) -> None:
    shell = FakeShell()
    assert m.run_with_budget(shell, "n = 0\nwhile True:\n    n += 1\n", timeout=0.3) is False
    assert "Cell stopped: it exceeded its time budget of 0.3 s" in capsys.readouterr().err
    assert shell.user_ns["n"] > 0
    assert m.run_with_budget(shell, "x = 1 + 1", timeout=5) is True and shell.user_ns["x"] == 2


def test_a_real_interrupt_is_not_swallowed() -> None:
    shell = FakeShell()
    with pytest.raises(KeyboardInterrupt):
        m.run_with_budget(shell, "raise KeyboardInterrupt", timeout=5)


def test_memory_budget_uses_the_cgroup_reading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readings = iter([10 << 20] * 3 + [900 << 20] * 100)
    monkeypatch.setattr(m, "read_usage", lambda: {"memory_current": next(readings)})
    shell = FakeShell()
    code = "import time\nwhile True:\n    time.sleep(0.001)\n"
    assert m.run_with_budget(shell, code, memory=500 << 20, interval=0.01) is False
    assert "memory budget of 500 MiB (used 900 MiB)" in capsys.readouterr().err


def test_ask_host_without_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(m.CONTROL_ENV, raising=False)
    assert m.ask_host({"op": "get"})["ok"] is False


def _python27() -> str | None:
    pyenv = glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python2.7"))
    found = [*pyenv, "/usr/bin/python2.7"]
    return next((p for p in found if os.path.exists(p)), None)


def test_compiles_and_works_on_python27(tmp_path: Path) -> None:
    py27 = _python27()
    if py27 is None:
        pytest.skip("no Python 2.7 interpreter on this host (the privileged image tests cover it)")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(SOURCE)!r}); import sandbox_magics as m; "
        "assert m.parse_size('1G') == 1 << 30; assert m.fmt_size(3 << 20) == '3 MiB'; "
        "r = m.build_report({}, {'memory_limit': None}, 0.0); repr(r); r._repr_html_(); "
        "n = {'network': {'mode': 'nat', 'allow': ['198.18.0.7'], 'refused': 2, "
        "'bandwidth': 8000000, 'bytes_in': 1, 'bytes_out': 2}, 'ceilings': {}}; "
        "assert 'refused by policy' in repr(m.build_report(n, {}, 0.0)); print('ok')"
    )
    out = subprocess.run([py27, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


MOUNTINFO_TMP_SHADOWED = (
    "22 1 0:20 / / rw,relatime - overlay overlay rw\n"
    "40 22 0:41 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=262144k\n"
    "41 22 0:42 / /home/sandbox rw - tmpfs home rw,size=262144k\n"
    "45 40 254:0 /tmp /tmp rw,nosuid,nodev,relatime - ext4 /dev/vda rw\n"
    "46 22 254:0 /srv/my\\040notebooks /srv/my\\040notebooks rw - ext4 /dev/vda rw\n"
)


def test_mount_at_finds_the_top_of_stacked_mounts(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO_TMP_SHADOWED)
    top = m.mount_at("/tmp", str(info))
    assert top["fstype"] == "ext4" and top["root"] == "/tmp" and top["source"] == "/dev/vda"
    assert m.mount_at("/srv/my notebooks", str(info))["root"] == "/srv/my notebooks"
    assert m.mount_at("/nope", str(info)) is None
    info.write_text(MOUNTINFO_TMP_SHADOWED.replace("45 40", "45 99"))  # unrelated parents
    assert m.mount_at("/tmp", str(info))["fstype"] == "ext4"  # the later one is on top


def test_tmp_shadowed_by_a_host_directory_is_said_so(tmp_path: Path) -> None:
    """Jupyter started in /tmp: the notebook directory is bound over the sandbox's /tmp
    tmpfs; statvfs then measures the host's disk (the '/tmp size 252 GiB' report)."""
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO_TMP_SHADOWED)
    text = m.tmp_info(str(tmp_path), str(info).replace("mountinfo", "none"))
    assert "private" not in text and "used)" in text  # no mount table: plain figures
    info.write_text(MOUNTINFO_TMP_SHADOWED.replace(" /tmp rw", f" {tmp_path} rw"))
    text = m.tmp_info(str(tmp_path), str(info))
    assert text.startswith("not the sandbox's private tmpfs: the host directory /tmp (ext4)")


def test_report_says_when_the_host_did_not_answer() -> None:
    report = m.build_report(None, {"memory_limit": None}, 0.0, host_error="too many requests")
    assert "the host said: too many requests" in repr(report)
