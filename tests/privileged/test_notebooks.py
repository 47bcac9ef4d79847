"""nbclient executes the notebooks of notebooks/ on the sandbox kernels, concurrently, and
their outputs show the isolation and the limits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from sandbox_kernel.jupyter import kernelspecs
from sandbox_kernel.jupyter.demo import key_outputs

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: None) -> Path:
    prefix = tmp_path / "prefix"
    kernelspecs.install(None, prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    if not kernelspecs.provisioner_registered():
        kernelspecs.register_provisioner_in_process()
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 1000, 1000)
    return out


async def execute(name: str, workdir: Path) -> Any:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name=nb.metadata.kernelspec.name,
        resources={"metadata": {"path": str(workdir)}},
    )
    await client.async_execute()
    return nb


async def test_demo_notebooks_run_side_by_side(workdir: Path) -> None:
    nb2, nb3 = await asyncio.gather(
        execute("python2-demo.ipynb", workdir), execute("python3-demo.ipynb", workdir)
    )
    k2, k3 = key_outputs(nb2), key_outputs(nb3)
    assert k2["python"].startswith("Python 2.7.")
    assert k2["py2 syntax"] == "hello from Python 2"
    assert k3["python"].startswith("Python 3.11.")
    for k in (k2, k3):
        pids = eval(k["pids"].split(": ", 1)[1])  # a printed list of ints
        assert pids[0] == 1 and len(pids) < 6
        assert k["hostname"].startswith("hostname: sk-")
        assert k["identity"] == f"uid: 1000, gid: 1000, cwd: {workdir}"
        assert k["limits"].endswith("memory 1024 MiB, cpus 1, pids 256"), k["limits"]
        assert "ConnectionRefusedError" in k["loopback"] or "error" in k["loopback"]
        assert "CONNECTED" not in k["internet"] and "unreachable" in k["internet"].lower()
    assert k2["hostname"] != k3["hostname"]
    for tag in ("python2", "python3"):
        st = (workdir / f"written-by-{tag}.txt").stat()
        assert st.st_uid == 1000


async def test_limits_notebook_fork_bomb_is_contained(workdir: Path) -> None:
    nb = await execute("limits.ipynb", workdir)
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "refused with EAGAIN: True" in text, text
    assert "children reaped" in text
    assert "the kernel is still usable: 6 * 7 = 42" in text
    forked = int(text.split("forked ", 1)[1].split()[0])
    assert 100 < forked < 256


def test_notebooks_are_clean_sources() -> None:
    """The committed notebooks carry no outputs (the demo writes executed copies elsewhere)."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name in kernelspecs.KERNELSPEC_NAMES
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
