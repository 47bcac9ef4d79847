"""The cgroup v2 venue itself: what the cgroupv2 tests rely on, checked where they run.

Runs in the QEMU guest of tools/vm/run-tests.sh (or with --native on a pure v2 host, as root).
Skipped on hosts without a unified hierarchy, such as cgroup v1 CI machines.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CG = Path("/sys/fs/cgroup")
NEEDED = {"memory", "cpu", "pids"}


def _fs_type(path: Path) -> str | None:
    """Filesystem type of the mount at exactly ``path`` (None if not a mount point)."""
    best = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == str(path):
                best = fields[2]  # the last mount at a path is the visible one
    return best


def _unified() -> bool:
    return _fs_type(CG) == "cgroup2"


pytestmark = [
    pytest.mark.cgroupv2,
    pytest.mark.skipif(
        not _unified(),
        reason="needs a pure cgroup v2 host (/sys/fs/cgroup is not cgroup2): "
        "run tools/vm/run-tests.sh",
    ),
    pytest.mark.root_only,  # facts about the guest, checked as root
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups and mounts"),
]


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh child of the root cgroup with memory, cpu and pids enabled; removed afterwards."""
    enabled = set((CG / "cgroup.subtree_control").read_text().split())
    for c in sorted(NEEDED - enabled):
        (CG / "cgroup.subtree_control").write_text(f"+{c}")
    path = CG / f"sk-sanity-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        if (path / "cgroup.kill").exists() and (path / "cgroup.procs").read_text().strip():
            (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_cgroup2_is_mounted_at_sys_fs_cgroup() -> None:
    assert _fs_type(CG) == "cgroup2"
    assert not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()


def test_image_store_can_be_idmapped() -> None:
    """Root mode idmaps image layers: the image store must be on a filesystem that allows it
    (the guest gives it an ext4 of its own)."""
    from sandbox_kernel.paths import state_dir
    from sandbox_kernel.runtime import userns

    store = state_dir()
    store.mkdir(parents=True, exist_ok=True)
    assert userns.idmap_supported(str(store)), f"{store} cannot be idmapped"


def test_root_offers_memory_cpu_pids() -> None:
    available = set((CG / "cgroup.controllers").read_text().split())
    assert available >= NEEDED, f"root cgroup.controllers = {sorted(available)}"


def test_in_vm_flag_matches_environment() -> None:
    if os.environ.get("SANDBOX_KERNEL_IN_VM") == "1":
        assert os.environ.get("SANDBOX_KERNEL_CGROUP_MODE") == "v2"
        assert _fs_type(Path("/tmp")) == "tmpfs", "overlayfs needs /tmp on a real filesystem"
        assert _fs_type(Path("/run")) == "tmpfs"


def test_child_cgroup_limits(cgroup: Path) -> None:
    assert set((cgroup / "cgroup.controllers").read_text().split()) >= NEEDED
    (cgroup / "memory.max").write_text("67108864")
    (cgroup / "cpu.max").write_text("50000 100000")
    (cgroup / "pids.max").write_text("16")
    assert (cgroup / "memory.max").read_text().strip() == "67108864"
    assert (cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
    assert (cgroup / "pids.max").read_text().strip() == "16"


def _spawn_in(cgroup: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start argv already inside cgroup (it joins before exec)."""
    procs = str(cgroup / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    return subprocess.Popen(
        argv, preexec_fn=join, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _events(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_oom_kill_under_memory_max(cgroup: Path) -> None:
    (cgroup / "memory.max").write_text(str(32 << 20))
    if (cgroup / "memory.swap.max").exists():
        (cgroup / "memory.swap.max").write_text("0")
    hog = "b = []\nwhile True:\n    b.append(bytearray(1 << 20))\n"
    proc = _spawn_in(cgroup, [sys.executable, "-S", "-c", hog])
    rc = proc.wait(timeout=120)
    assert rc == -9, f"expected SIGKILL from the OOM killer, got {rc}"
    assert _events(cgroup / "memory.events")["oom_kill"] == 1


def test_pids_max_is_enforced(cgroup: Path) -> None:
    (cgroup / "pids.max").write_text("4")
    script = (
        "import os\n"
        "n = 0\n"
        "for _ in range(10):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        import time; time.sleep(30); os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
        "os._exit(0 if n < 10 else 1)\n"
    )
    proc = _spawn_in(cgroup, [sys.executable, "-S", "-c", script])
    assert proc.wait(timeout=120) == 0
    assert _events(cgroup / "pids.events")["max"] >= 1


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare not installed")
def test_unprivileged_user_namespace_with_pid_and_mount() -> None:
    subprocess.run(["unshare", "-Urmpf", "true"], check=True, timeout=60)


def test_overlay_mount(tmp_path: Path) -> None:
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("lower")
    merged = tmp_path / "merged"
    opts = ",".join(
        f"{key}={tmp_path / name}"
        for key, name in (("lowerdir", "lower"), ("upperdir", "upper"), ("workdir", "work"))
    )
    mount = ["mount", "-t", "overlay", "-o", opts, "overlay", str(merged)]
    subprocess.run(mount, check=True, timeout=60)
    try:
        assert (merged / "f").read_text() == "lower"
        (merged / "f").write_text("upper")
        assert (tmp_path / "upper" / "f").read_text() == "upper"
        assert (tmp_path / "lower" / "f").read_text() == "lower"
    finally:
        subprocess.run(["umount", str(merged)], check=True, timeout=60)
