"""Batch runs end with why the sandbox kernel died: the client's handling of a death (a
fake kernel manager; the real kernels are in tests/privileged/test_batch.py) and the
papermill engine's entry point."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat.notebooknode import NotebookNode

from sandbox_kernel import batch
from sandbox_kernel.jupyter.provisioner import SandboxProvisioner

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

REASON = "out of memory (limit 256 MiB, peak 256 MiB)"


class FakeManager:
    """What the client reads of a kernel manager after a death: the provisioner, and
    ``is_alive`` (each call is a poll, after which the provisioner may have recorded it)."""

    def __init__(self, provisioner: Any, record_after: int = 0) -> None:
        self.provisioner = provisioner
        self.polls = 0
        self._record_after = record_after

    async def is_alive(self) -> bool:
        self.polls += 1
        if self.polls >= self._record_after and isinstance(self.provisioner, SandboxProvisioner):
            self.provisioner.last_exit = {"reason": REASON, "oom_killed": True}
        return False


def provisioner() -> SandboxProvisioner:
    return SandboxProvisioner(kernel_id="k-1", kernel_spec=None)


def notebook() -> NotebookNode:
    cells = [nbformat.v4.new_code_cell("x = bytearray(1 << 30)")]  # type: ignore[no-untyped-call]
    nb: NotebookNode = nbformat.v4.new_notebook(cells=cells)  # type: ignore[no-untyped-call]
    return nb


@pytest.fixture
def dies(monkeypatch: pytest.MonkeyPatch) -> list[NotebookNode]:
    """nbclient's cell run ends as it does when the kernel died; the cells it ran."""
    ran: list[NotebookNode] = []

    async def dead(self: Any, cell: NotebookNode, cell_index: int, **kw: Any) -> NotebookNode:
        ran.append(cell)
        raise DeadKernelError("Kernel died")

    monkeypatch.setattr(NotebookClient, "async_execute_cell", dead)
    monkeypatch.setattr(batch, "REASON_POLL_S", 0.0)
    return ran


@pytest.mark.parametrize("record_after", [0, 3])
def test_a_death_raises_with_the_reason_and_writes_it_in_the_cell(
    dies: list[NotebookNode], record_after: int
) -> None:
    nb = notebook()
    p = provisioner()
    client = batch.SandboxNotebookClient(nb, km=FakeManager(p, record_after))  # type: ignore[arg-type]
    with pytest.raises(batch.SandboxKernelDied) as info:
        client.execute_cell(nb.cells[0], 0)  # the synchronous form papermill calls
    assert dies == [nb.cells[0]]
    assert str(info.value) == f"Kernel died: {REASON} (cell 0 of the notebook, kernel '?')"
    assert isinstance(info.value, DeadKernelError) and info.value.reason == REASON
    assert [o["text"] for o in nb.cells[0].outputs] == [f"{batch.NOTICE}{REASON}\n"]


def test_the_relays_notice_is_not_written_twice(dies: list[NotebookNode]) -> None:
    nb = notebook()
    notice = nbformat.v4.new_output(  # type: ignore[no-untyped-call]
        "stream", name="stderr", text=f"{batch.NOTICE}{REASON}\n"
    )
    p = provisioner()
    p.last_exit = {"reason": REASON}

    async def dead_with_notice(self: Any, cell: NotebookNode, *a: Any, **kw: Any) -> Any:
        cell.outputs = [notice]  # nbclient read the relay's notice before it saw the death
        raise DeadKernelError("Kernel died")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NotebookClient, "async_execute_cell", dead_with_notice)
        client = batch.SandboxNotebookClient(nb, km=FakeManager(p))  # type: ignore[arg-type]
        with pytest.raises(batch.SandboxKernelDied):
            client.execute_cell(nb.cells[0], 0)
    assert nb.cells[0].outputs == [notice]


def test_no_reason_recorded_is_said_so(dies: list[NotebookNode]) -> None:
    nb = notebook()
    km = FakeManager(provisioner(), record_after=10**6)  # never recorded
    client = batch.SandboxNotebookClient(nb, km=km)  # type: ignore[arg-type]
    with pytest.raises(batch.SandboxKernelDied, match="no reason recorded"):
        client.execute_cell(nb.cells[0], 0)
    assert km.polls == batch.REASON_POLLS


def test_another_kernel_ends_as_nbclient_ends_it(dies: list[NotebookNode]) -> None:
    nb = notebook()
    client = batch.SandboxNotebookClient(nb, km=FakeManager(object()))  # type: ignore[arg-type]
    with pytest.raises(DeadKernelError) as info:
        client.execute_cell(nb.cells[0], 0)
    assert type(info.value) is DeadKernelError and str(info.value) == "Kernel died"
    assert nb.cells[0].outputs == []


def test_the_papermill_engine_is_declared_and_loads() -> None:
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["papermill.engine"]["sandbox"]
    module, _, name = target.partition(":")
    assert (module, name) == ("sandbox_kernel.batch.engine", "SandboxEngine")
    from papermill.engines import NBClientEngine

    from sandbox_kernel.batch import engine

    assert issubclass(engine.SandboxEngine, NBClientEngine)
    # papermill calls the synchronous execute_cell: it must run this client's cell step
    client = engine.SandboxPapermillClient
    assert client.execute_cell is not NotebookClient.execute_cell
    assert client.execute_cell is not batch.SandboxNotebookClient.execute_cell


@pytest.fixture
def papermill_handlers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Papermill's handler list, restored after the test (install_handler changes it)."""
    from papermill.iorw import papermill_io

    saved = list(papermill_io._handlers)
    monkeypatch.setattr(papermill_io, "_handlers", saved)
    return saved


def plant(folder: Path, name: str, kind: str, outside: Path) -> None:
    """What a kernel leaves under the output's name in its folder."""
    target = folder / name
    if kind == "link to a file outside":
        target.symlink_to(outside / "victim.txt")
    elif kind == "link to a folder outside":
        target.symlink_to(outside)
    elif kind == "dangling link":
        target.symlink_to(outside / "new.ipynb")
    elif kind == "FIFO":
        os.mkfifo(target)
    else:
        raise AssertionError(kind)


PLANTED = ["link to a file outside", "link to a folder outside", "dangling link", "FIFO"]


@pytest.mark.parametrize("kind", PLANTED)
@pytest.mark.parametrize("where", ["the kernel's folder", "a subfolder of it"])
def test_papermill_writes_replace_what_the_kernel_planted(
    tmp_path: Path,
    papermill_handlers: list[tuple[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    where: str,
) -> None:
    from papermill.iorw import write_ipynb

    from sandbox_kernel.batch import engine

    folder, outside = tmp_path / "kernel", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("host file\n")
    out_dir = folder if where == "the kernel's folder" else folder / "results"
    out_dir.mkdir(exist_ok=True)
    plant(out_dir, "out.ipynb", kind, outside)
    handler = engine.install_handler()
    handler.folders.append(str(folder))
    assert engine.install_handler() is handler  # once per process
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    monkeypatch.chdir(tmp_path)
    # a FIFO opened for writing would block: the write must end at once (alarm as a bound)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the write blocked"))
    signal.alarm(10)
    try:
        write_ipynb(nb, str(out_dir.relative_to(tmp_path) / "out.ipynb"))  # papermill's path
    finally:
        signal.alarm(0)
    out = out_dir / "out.ipynb"
    assert not out.is_symlink() and out.is_file()
    assert nbformat.read(str(out), as_version=4).cells == []  # type: ignore[no-untyped-call]
    assert (outside / "victim.txt").read_text() == "host file\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.ipynb"]  # no temporary left


def test_a_planted_folder_link_on_the_way_is_refused(
    tmp_path: Path, papermill_handlers: list[tuple[str, Any]]
) -> None:
    from papermill.iorw import write_ipynb

    from sandbox_kernel import beneath
    from sandbox_kernel.batch import engine

    folder, outside = tmp_path / "kernel", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "results").symlink_to(outside)
    engine.install_handler().folders.append(str(folder))
    with pytest.raises(beneath.Refused, match="results is a symbolic link"):
        write_ipynb(nbformat.v4.new_notebook(), str(folder / "results" / "out.ipynb"))  # type: ignore[no-untyped-call]
    assert list(outside.iterdir()) == []


def test_the_engine_puts_its_handler_in_papermills_place(
    tmp_path: Path, papermill_handlers: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from papermill.engines import NBClientEngine
    from papermill.iorw import LocalHandler, papermill_io

    from sandbox_kernel.batch import engine

    original = papermill_io.get_handler("x.ipynb")
    assert type(original) is LocalHandler
    seen: list[Any] = []
    monkeypatch.setattr(
        NBClientEngine, "execute_notebook", classmethod(lambda cls, *a, **k: seen.append(a))
    )
    monkeypatch.chdir(tmp_path)
    engine.SandboxEngine.execute_notebook(nbformat.v4.new_notebook(), "k")  # type: ignore[no-untyped-call]
    handler = papermill_io.get_handler(str(tmp_path / "out.ipynb"))
    assert isinstance(handler, engine.BeneathLocalHandler) and seen
    assert handler.folders == [os.path.realpath(tmp_path)]
