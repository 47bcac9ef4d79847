"""Batch runs on real sandbox kernels end with why the kernel died: nbclient with
``SandboxNotebookClient`` and ``papermill --engine sandbox`` (unmodified nbclient and
papermill), a memory cap a cell allocates past; a notebook that fits runs as usual.

Needs root and the python3 image (built on first use)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient.exceptions import DeadKernelError
from nbformat.notebooknode import NotebookNode

from sandbox_kernel.batch import NOTICE, SandboxKernelDied, SandboxNotebookClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ALLOCATE = "x = bytearray(600 << 20)"  # past the 256 MiB cap (bytearray zeroes its pages)


def capped_kernel(kernels: Path, name: str = "python3-sandbox") -> str:
    """A copy of the shipped kernelspec ``name`` with a 256 MiB memory cap; its name."""
    spec = json.loads((kernels / name / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["memory"] = "256M"
    capped = f"t-batch-{name}"
    (kernels / capped).mkdir()
    (kernels / capped / "kernel.json").write_text(json.dumps(spec))
    return capped


def notebook(kernel: str, *sources: str) -> NotebookNode:
    cells = [nbformat.v4.new_code_cell(s) for s in sources]  # type: ignore[no-untyped-call]
    nb: NotebookNode = nbformat.v4.new_notebook(cells=cells)  # type: ignore[no-untyped-call]
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    return nb


def texts(cell: NotebookNode) -> str:
    return "".join(str(o.get("text", "")) for o in cell.outputs if o.output_type == "stream")


def container_ids(client: SandboxNotebookClient, into: list[str]) -> None:
    """Note the client's kernel's container id once it started (for the leftovers check)."""

    def note(**_: Any) -> None:
        cid = getattr(getattr(client.km, "provisioner", None), "container_id", None)
        if cid:
            into.append(cid)

    client.on_notebook_start = note


async def test_nbclient_ends_with_the_reason_in_the_error_and_the_cell(
    kernels: Path, notebook_dir: Path, assert_no_leftovers: Callable[[Iterable[str]], None]
) -> None:
    kernel = capped_kernel(kernels)
    nb = notebook(kernel, "print('before')", ALLOCATE, "print('never')")
    client = SandboxNotebookClient(
        nb, timeout=120, startup_timeout=120, resources={"metadata": {"path": str(notebook_dir)}}
    )
    ids: list[str] = []
    container_ids(client, ids)
    with pytest.raises(SandboxKernelDied) as info:
        await client.async_execute()
    assert isinstance(info.value, DeadKernelError)  # what nbclient's callers catch
    message = str(info.value)
    assert message.startswith("Kernel died: out of memory (limit 256 MiB, peak "), message
    assert "cell 1 of the notebook" in message and info.value.cell_index == 1
    assert texts(nb.cells[0]) == "before\n"
    failing = texts(nb.cells[1])
    assert failing.count(NOTICE) == 1 and f"{NOTICE}out of memory (limit 256 MiB" in failing
    assert nb.cells[2].outputs == [] and ids
    assert_no_leftovers(ids)


async def test_nbclient_runs_a_notebook_that_fits(
    kernels: Path, notebook_dir: Path, assert_no_leftovers: Callable[[Iterable[str]], None]
) -> None:
    kernel = capped_kernel(kernels)
    nb = notebook(kernel, "x = bytearray(16 << 20)\nprint(len(x) >> 20)", "print('after')")
    client = SandboxNotebookClient(
        nb, timeout=120, startup_timeout=120, resources={"metadata": {"path": str(notebook_dir)}}
    )
    ids: list[str] = []
    container_ids(client, ids)
    await client.async_execute()
    assert [texts(c) for c in nb.cells] == ["16\n", "after\n"]
    assert ids
    assert_no_leftovers(ids)


def papermill_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``papermill`` run of this checkout: the package from the source
    tree, and the ``papermill.engine`` entry point as pyproject.toml declares it (in a
    dist-info folder of its own, as an install would write it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    engines = project["project"]["entry-points"]["papermill.engine"]
    site = tmp_path / "site"
    info = site / "sandbox_kernel_checkout-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sandbox-kernel-checkout\nVersion: 0.0\n"
    )
    lines = [f"{name} = {target}" for name, target in engines.items()]
    (info / "entry_points.txt").write_text("[papermill.engine]\n" + "\n".join(lines) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), env.get("PYTHONPATH", "")])
    return env


def papermill(
    tmp_path: Path, nb: NotebookNode, cwd: Path, output: Path | None = None
) -> tuple[int, str, NotebookNode]:
    """Run ``papermill --engine sandbox`` on ``nb`` (the output notebook ``output``, by
    default beside the input); its status, stderr and output notebook."""
    source, output = tmp_path / "in.ipynb", output or tmp_path / "out.ipynb"
    nbformat.write(nb, str(source))  # type: ignore[no-untyped-call]
    cmd = [sys.executable, "-m", "papermill", "--engine", "sandbox", "--cwd", str(cwd)]
    cmd += ["--start-timeout", "120", str(source), str(output)]
    proc = subprocess.run(
        cmd, env=papermill_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    out: NotebookNode = nbformat.read(str(output), as_version=4)  # type: ignore[no-untyped-call]
    return proc.returncode, proc.stderr, out


def test_papermill_engine_ends_with_the_reason(
    kernels: Path, notebook_dir: Path, tmp_path: Path
) -> None:
    kernel = capped_kernel(kernels)
    status, stderr, out = papermill(
        tmp_path, notebook(kernel, "print('before')", ALLOCATE, "print('never')"), notebook_dir
    )
    assert status == 138, stderr  # papermill's status for a dead kernel, kept
    assert "SandboxKernelDied: Kernel died: out of memory (limit 256 MiB" in stderr, stderr
    failing = out.cells[1]
    assert f"{NOTICE}out of memory (limit 256 MiB" in texts(failing), failing
    assert failing.metadata.papermill["status"] == "failed"
    assert failing.metadata.papermill["exception"] is True
    assert out.metadata.papermill["exception"] is True
    assert texts(out.cells[0]) == "before\n" and out.cells[2].outputs == []


def test_papermill_engine_runs_a_notebook_that_fits(
    kernels: Path, notebook_dir: Path, tmp_path: Path
) -> None:
    kernel = capped_kernel(kernels)
    status, stderr, out = papermill(
        tmp_path, notebook(kernel, "print(6 * 7)", "print('after')"), notebook_dir
    )
    assert status == 0, stderr
    assert [texts(c) for c in out.cells] == ["42\n", "after\n"]
    assert out.metadata.papermill["exception"] is not True


#: A cell that plants, in the kernel's folder (its working directory), what waits under the
#: name of the next run's output notebook (a kernel cannot remove the root-owned output of
#: its own run: its owner is in no map of the kernel's, EOVERFLOW; what an earlier kernel
#: left there is what papermill meets).
PLANT_OUTPUT = {
    "link to a host file": "os.symlink(SECRET, 'out.ipynb')",
    "link to a host folder": "os.symlink(os.path.dirname(SECRET), 'out.ipynb')",
    "dangling link": "os.symlink(os.path.dirname(SECRET) + '/new.ipynb', 'out.ipynb')",
    "FIFO": "os.mkfifo('out.ipynb')",
}


@pytest.mark.parametrize("kind", list(PLANT_OUTPUT))
def test_papermill_never_follows_what_the_kernel_planted_as_its_output(
    kernels: Path, notebook_dir: Path, tmp_path: Path, kind: str
) -> None:
    host = tmp_path / "host"
    host.mkdir(mode=0o700)
    secret = host / "secret.txt"
    secret.write_text("host file\n")
    plant = "import os\n" + PLANT_OUTPUT[kind].replace("SECRET", repr(str(secret)))
    status, stderr, _ = papermill(
        tmp_path, notebook("python3-sandbox", plant + "\nprint('planted')"), notebook_dir
    )
    assert status == 0, stderr
    output = notebook_dir / "out.ipynb"
    assert not stat.S_ISREG(os.lstat(output).st_mode)  # what the kernel left
    t0 = time.monotonic()
    status, stderr, out = papermill(
        tmp_path, notebook("python3-sandbox", "print('after')"), notebook_dir, output
    )
    assert time.monotonic() - t0 < 240  # a FIFO did not block a save
    assert status == 0, stderr
    assert [texts(c) for c in out.cells] == ["after\n"]
    assert not output.is_symlink() and output.is_file()
    assert secret.read_text() == "host file\n"
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt"]
