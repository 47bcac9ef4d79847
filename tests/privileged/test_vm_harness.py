"""Smoke tests of the cgroup v2 QEMU harness's own pieces (tools/vm).

The cheap checks (syntax, argument passing, refusals) always run; the two that boot the guest
need the kernel cache from tools/vm/setup.sh and are skipped without it. Not ``privileged``:
nothing here needs root, and a missing kernel cache is not a CI failure of this suite
(``make test-cgroup-v2`` fails on its own if the guest cannot run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM = REPO / "tools" / "vm"
RUN = VM / "run-tests.sh"
VM_DIR = Path(os.environ.get("SANDBOX_KERNEL_VM_DIR") or REPO / ".vm")


def run(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_scripts_parse() -> None:
    for script in ("setup.sh", "run-tests.sh"):
        r = run("bash", "-n", VM / script)
        assert r.returncode == 0, r.stderr
    sh = shutil.which("busybox")
    if sh:
        r = run(sh, "sh", "-n", VM / "guest-init.sh")
        assert r.returncode == 0, r.stderr


def test_params_round_trip_through_a_posix_shell() -> None:
    awkward = ["-k", "a b", "it's", "$HOME", "new\nline", "*", ""]
    r = run(RUN, "--print-params", *awkward, env={"SANDBOX_KERNEL_EXTRA": "x y"})
    assert r.returncode == 0, r.stderr
    shell = shutil.which("busybox")
    argv = [shell, "sh"] if shell else ["sh"]
    script = r.stdout + '\nfor a in "$@"; do printf "%s\\0" "$a"; done\nprintf "%s" "$SK_CGROUP"'
    out = subprocess.run([*argv, "-c", script], capture_output=True, text=True, check=True).stdout
    *args, cgroup = out.split("\0")
    assert cgroup == "/"
    assert args[-len(awkward) :] == awkward
    assert args[:3] == ["/usr/bin/env", "-i", "-C"]
    assert "SANDBOX_KERNEL_IN_VM=1" in args
    assert "SANDBOX_KERNEL_CGROUP_MODE=v2" in args
    assert "SANDBOX_KERNEL_EXTRA=x y" in args
    assert args[args.index("pytest") + 1 : args.index("pytest") + 3] == [
        "-m",
        "cgroupv2 or vmkernel",
    ]


def test_exec_needs_a_command() -> None:
    r = run(RUN, "--exec")
    assert r.returncode == 2
    assert "--exec needs a command" in r.stderr


def test_native_refuses_a_non_unified_host() -> None:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("this host is pure cgroup v2: --native would run the suite")
    r = run(RUN, "--native")
    assert r.returncode == 2
    assert "pure cgroup v2 host" in r.stderr


def _kernel_cached() -> bool:
    current = VM_DIR / "current"
    return (
        current.is_file()
        and (VM_DIR / "kernels" / current.read_text().strip() / "vmlinuz").is_file()
    )


needs_guest = pytest.mark.skipif(
    not _kernel_cached() or shutil.which("qemu-system-x86_64") is None,
    reason="no guest kernel cached: run tools/vm/setup.sh",
)


@needs_guest
@pytest.mark.slow
def test_guest_reports_the_command_status_and_output(tmp_path: Path) -> None:
    cmd = (
        'test -f /sys/fs/cgroup/cgroup.controllers && echo "in-guest $SANDBOX_KERNEL_IN_VM"; exit 3'
    )
    r = run(
        RUN,
        "--exec",
        "sh",
        "-c",
        cmd,
        env={"SANDBOX_KERNEL_VM_RESULTS": str(tmp_path)},
        timeout=900,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "in-guest 1" in r.stdout
    assert (tmp_path / "status").read_text().strip() == "3"


@needs_guest
def test_guest_timeout_fails_clearly(tmp_path: Path) -> None:
    env = {"SANDBOX_KERNEL_VM_RESULTS": str(tmp_path), "SANDBOX_KERNEL_VM_TIMEOUT": "2"}
    r = run(RUN, "--exec", "true", env=env, timeout=120)
    assert r.returncode == 124, r.stdout + r.stderr
    assert "did not come back within 2s" in r.stderr
