"""Fixtures shared by the privileged tests."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

#: The uid a kernel runs as in these tests: the notebook folder's owner (1000) as root;
#: rootless, the server's own.
KERNEL_UID = 1000 if os.geteuid() == 0 else os.geteuid()
KERNEL_GID = 1000 if os.geteuid() == 0 else os.getegid()


@pytest.fixture(scope="session")
def images() -> None:
    """The images the shipped kernelspecs use, built into the default store when missing
    (a fresh machine builds them once: a few minutes)."""
    from sandbox_kernel.errors import ImageError
    from sandbox_kernel.images import lookup
    from sandbox_kernel.images.build import build_image
    from sandbox_kernel.images.store import ImageStore
    from sandbox_kernel.jupyter.demo import IMAGES

    for name in IMAGES:
        try:
            lookup.find(name)  # rootless: the system store's, built by the root run
        except ImageError:
            build_image(name, ImageStore())


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: None) -> Path:
    """The shipped kernelspecs installed under a private JUPYTER_PATH; their folder."""
    from sandbox_kernel.jupyter import kernelspecs

    prefix = tmp_path / "prefix"
    kernelspecs.install(None, prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    if not kernelspecs.provisioner_registered():
        kernelspecs.register_provisioner_in_process()
    return prefix / "share" / "jupyter" / "kernels"


@pytest.fixture
def notebook_dir(tmp_path: Path) -> Path:
    """A notebook folder owned by uid 1000 (kernels run as its owner); rootless: the
    caller's own (kernels run as the server's user)."""
    nb = tmp_path / "notebooks"
    nb.mkdir()
    if os.geteuid() == 0:
        os.chown(nb, 1000, 1000)
    return nb


def leftovers(container_id: str) -> list[str]:
    """What is left on the host of one container: run dir, cgroup, mounts, processes. Only the
    given container is checked, so containers of concurrent test runs do not interfere."""
    from sandbox_kernel.cgroups import get_manager
    from sandbox_kernel.paths import run_dir

    found = []
    if (run_dir() / container_id).exists():
        found.append(f"run dir {run_dir() / container_id}")
    if container_id in get_manager().list_leftovers("sk-"):
        found.append(f"cgroup {container_id}")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.strip()}" for line in f if container_id in line]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if container_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"process {pid}")
    return found


@pytest.fixture
def assert_no_leftovers() -> Callable[[Iterable[str]], None]:
    """A check: nothing of these containers is left on the host (waiting up to 10 s)."""

    def check(container_ids: Iterable[str]) -> None:
        ids = list(container_ids)
        deadline = time.monotonic() + 10
        while any(leftovers(c) for c in ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [x for c in ids for x in leftovers(c)] == []

    return check


def crash(c: Any) -> None:
    """Leave the started container ``c`` as a crashed server leaves it: its executor killed,
    its owner and supervisor pids forged to a dead process's, its run dir and cgroups still
    there (for gc to find). Used by the gc tests of the runtime and of root's gc."""
    import json
    import signal
    import subprocess

    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    assert c.pid is not None and c.proc is not None
    os.kill(c.pid, signal.SIGKILL)
    c.proc.wait(5)
    meta = json.loads((c.run_dir / "meta.json").read_text())
    meta["owner_pid"] = dead.pid
    (c.run_dir / "meta.json").write_text(json.dumps(meta))
    (c.run_dir / "pid").write_text(json.dumps({"pid": dead.pid, "start": None}))
