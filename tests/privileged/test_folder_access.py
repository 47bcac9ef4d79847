"""A kernel that cannot write its notebook folder says so at once: a root-owned folder makes
``user='auto'`` run the kernel as nobody; the server log warns at start, the first execution
says it with the fix, ``%sandbox`` has the row, and a write there indeed fails (Python 2.7
and Python 3 kernels).

Needs root and the python2.7 / python3 images (built on first use)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from tests.privileged.test_magics import KERNELS, Kernels, execute, row

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.root_only,
    pytest.mark.images,
    pytest.mark.slow,
]


@pytest.fixture
async def sandboxes(
    kernels: Path, tmp_path: Path, assert_no_leftovers: Callable[[Iterable[str]], None]
) -> AsyncIterator[Kernels]:
    """Kernels started in a root-owned folder (mode 0755)."""
    course = tmp_path / "course"
    course.mkdir()
    course.chmod(0o755)
    assert os.stat(course).st_uid == 0
    ks = Kernels(kernels, course)
    try:
        yield ks
    finally:
        for km in ks.started:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        assert_no_leftovers(ks.ids)


@pytest.mark.parametrize("name", KERNELS)
async def test_a_root_owned_folder_is_told_at_the_first_execution(
    sandboxes: Kernels, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = sandboxes.notebook_dir
    problem = (
        f"the folder {folder} belongs to root; kernels run as nobody (65534) there: "
        "chown it to the user, or set SandboxProvisioner.user"
    )
    with caplog.at_level(logging.WARNING):
        km = await sandboxes.start(name)
    assert f"the kernel cannot write its notebook folder: {problem}" in caplog.text
    res = await execute(km, "import os; print(os.getuid())")
    assert res.ok and res.stdout.strip() == "65534", res
    assert f"This kernel cannot write its notebook folder: {problem}." in res.stderr, res
    res = await execute(km, "print('again')")
    assert res.ok and "notebook folder" not in res.stderr, res  # said once
    # the decision is right: a write there fails
    res = await execute(km, "open('x.txt', 'w')")
    assert not res.ok and ("Permission denied" in res.stderr or "Errno 13" in res.stderr), res
    res = await execute(km, "%sandbox")
    report = res.data[0]["text/plain"] if res.data else res.stdout
    assert row(report, "folder access") == f"not writable by this kernel: {problem}"
    # the kernel sees no host path but its folder's
    assert str(folder.parent.parent) not in problem.replace(str(folder), "")


@pytest.mark.parametrize("name", KERNELS)
async def test_a_writable_folder_says_nothing(
    sandboxes: Kernels, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    os.chown(sandboxes.notebook_dir, 1000, 1000)
    with caplog.at_level(logging.WARNING):
        km = await sandboxes.start(name)
    assert "notebook folder" not in caplog.text
    res = await execute(km, "open('x.txt', 'w').write('ok'); print('wrote')")
    assert res.ok and res.stdout.strip() == "wrote" and "notebook folder" not in res.stderr, res
    res = await execute(km, "%sandbox")
    report = res.data[0]["text/plain"] if res.data else res.stdout
    assert row(report, "folder access") == "read-write"
