"""The guarded contents managers: what a kernel plants in its folder is never followed.

The folder holds every kind of planted entry (links to a host file and a host folder, relative
and dangling links, a link as an intermediate folder, a FIFO and a socket named like
notebooks) and every operation of the contents API is tried on them through both the async
manager (the server's default) and the synchronous one: reading, the /files/ handler's path,
saving, chunked uploads, checkpoints, rename, delete, folder copy. The host file outside must
be neither served nor changed, and nothing may block. Nothing here needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError

from sandbox_kernel.jupyter import contents, serverext

NOTEBOOK = {
    "type": "notebook",
    "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5},
}
SECRET = "host secret\n"


class World:
    """A notebook folder with planted entries and a host folder outside it."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "nb"
        self.outside = tmp_path / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        self.secret = self.outside / "secret"
        self.secret.write_text(SECRET)
        (self.root / "plain.txt").write_text("plain\n")
        (self.root / "sub").mkdir()
        (self.root / "sub" / "inner.txt").write_text("inner\n")
        (self.root / "out.txt").symlink_to(self.secret)
        (self.root / "victim.ipynb").symlink_to(self.secret)
        (self.root / "rel.txt").symlink_to("../outside/secret")
        (self.root / "dangling.ipynb").symlink_to(self.outside / "new.ipynb")
        (self.root / "hostdir").symlink_to(self.outside)
        os.mkfifo(self.root / "fifo.ipynb")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.root / "sock.ipynb"))

    def outside_untouched(self) -> bool:
        return self.secret.read_text() == SECRET and sorted(os.listdir(self.outside)) == ["secret"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.sock.close()


@pytest.fixture(params=["async", "sync"])
def cm(request: pytest.FixtureRequest, world: World, tmp_path: Path) -> Any:
    """A guarded manager over the folder (the async default and the synchronous one)."""
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    cls = (
        contents.AsyncSandboxContentsManager
        if request.param == "async"
        else contents.SandboxContentsManager
    )
    return cls(root_dir=str(world.root))


async def call(result: Any) -> Any:
    """The result of a manager method, awaited when the manager is async."""
    if inspect.isawaitable(result):
        return await asyncio.wait_for(result, 10)  # a FIFO must never block the server
    return result


async def refused(result_thunk: Any, code: int = 403) -> str:
    """The message of the HTTPError ``code`` that the call raises."""
    with pytest.raises(HTTPError) as e:
        await call(result_thunk())
    assert e.value.status_code == code, e.value
    return str(e.value.log_message)


PLANTED_FILES = ["out.txt", "victim.ipynb", "rel.txt", "fifo.ipynb", "sock.ipynb"]


@pytest.mark.parametrize("name", PLANTED_FILES)
async def test_reading_a_planted_entry_is_refused(cm: Any, world: World, name: str) -> None:
    for kw in ({}, {"type": "file"}, {"type": "file", "format": "base64"}):
        msg = await refused(lambda kw=kw: cm.get(name, content=True, **kw))
        assert name in msg and "host secret" not in msg


@pytest.mark.parametrize("path", ["hostdir/secret", "hostdir", "sub/../hostdir/secret"])
async def test_paths_through_a_linked_folder_are_refused(cm: Any, world: World, path: str) -> None:
    with pytest.raises(HTTPError) as e:
        await call(cm.get(path, content=True))
    assert e.value.status_code in (403, 404)


async def test_listing_shows_links_as_themselves_and_hides_special_files(
    cm: Any, world: World
) -> None:
    model = await call(cm.get("", content=True))
    entries = {e["name"]: e for e in model["content"]}
    assert {"out.txt", "victim.ipynb", "hostdir", "dangling.ipynb", "plain.txt", "sub"} <= set(
        entries
    )
    assert "fifo.ipynb" not in entries and "sock.ipynb" not in entries
    for name in ["out.txt", "victim.ipynb", "hostdir"]:
        assert entries[name]["type"] == "file" and entries[name]["writable"] is False
        assert entries[name]["size"] < 200  # the link's own size, not the target's
    assert entries["sub"]["type"] == "directory"


async def test_regular_files_and_notebooks_work(cm: Any, world: World) -> None:
    model = await call(cm.get("plain.txt"))
    assert model["content"] == "plain\n"
    await call(cm.save(NOTEBOOK, "sub/new.ipynb"))
    nb = await call(cm.get("sub/new.ipynb"))
    assert nb["type"] == "notebook" and nb["content"]["nbformat"] == 4
    await call(cm.save(NOTEBOOK, "sub/new.ipynb"))  # overwrite in place
    await call(cm.save({"type": "directory"}, "made"))
    assert (world.root / "made").is_dir()
    assert cm.files_handler_class is FilesHandler  # /files/ goes through get, not by path


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("victim.ipynb", NOTEBOOK),
        ("out.txt", {"type": "file", "format": "text", "content": "pwned"}),
        ("rel.txt", {"type": "file", "format": "text", "content": "pwned"}),
        ("dangling.ipynb", NOTEBOOK),
        ("hostdir/secret", {"type": "file", "format": "text", "content": "pwned"}),
        ("hostdir/made.ipynb", NOTEBOOK),
        ("fifo.ipynb", NOTEBOOK),
    ],
)
async def test_saving_through_a_planted_entry_is_refused(
    cm: Any, world: World, path: str, model: dict[str, Any]
) -> None:
    with pytest.raises(HTTPError) as e:
        await call(cm.save(dict(model), path))
    assert e.value.status_code in (403, 404)
    assert world.outside_untouched()


@pytest.mark.parametrize("chunk", [1, 2, -1])
@pytest.mark.parametrize("path", ["out.txt", "hostdir/up.bin", "dangling.ipynb"])
async def test_upload_chunks_through_a_planted_entry_are_refused(
    cm: Any, world: World, path: str, chunk: int
) -> None:
    model = {"type": "file", "format": "text", "content": "pwned", "chunk": chunk}
    with pytest.raises(HTTPError):
        await call(cm.save(model, path))
    assert world.outside_untouched()


async def test_a_file_with_other_hard_links_is_not_written(cm: Any, world: World) -> None:
    os.link(world.root / "plain.txt", world.root / "twin.txt")
    msg = await refused(
        lambda: cm.save({"type": "file", "format": "text", "content": "x"}, "twin.txt")
    )
    assert "hard links" in msg
    assert (world.root / "plain.txt").read_text() == "plain\n"


async def test_checkpoints_never_follow_a_planted_link(cm: Any, world: World) -> None:
    await call(cm.save(NOTEBOOK, "nb.ipynb"))
    cps = cm.checkpoints
    await call(cps.create_checkpoint(cm, "nb.ipynb"))
    cp = world.root / ".ipynb_checkpoints" / "nb-checkpoint.ipynb"
    assert cp.is_file() and not cp.is_symlink()
    # the kernel swaps the checkpoint for a link to the host file: creating replaces it
    cp.unlink()
    cp.symlink_to(world.secret)
    await call(cps.create_checkpoint(cm, "nb.ipynb"))
    assert cp.is_file() and not cp.is_symlink() and world.outside_untouched()
    # restoring from a planted link is refused and leaves the notebook as it was
    cp.unlink()
    cp.symlink_to(world.secret)
    before = (world.root / "nb.ipynb").read_bytes()
    with pytest.raises(HTTPError):
        await call(cps.restore_checkpoint(cm, "checkpoint", "nb.ipynb"))
    assert (world.root / "nb.ipynb").read_bytes() == before
    assert await call(cps.list_checkpoints("nb.ipynb")) == []
    # the checkpoint folder itself made a link to a host folder: nothing is written there
    os.unlink(cp)
    os.rmdir(world.root / ".ipynb_checkpoints")
    (world.root / ".ipynb_checkpoints").symlink_to(world.outside)
    with pytest.raises(HTTPError):
        await call(cps.create_checkpoint(cm, "nb.ipynb"))
    assert world.outside_untouched()


async def test_rename_moves_the_link_itself_and_never_into_a_linked_folder(
    cm: Any, world: World
) -> None:
    await call(cm.rename("out.txt", "renamed.txt"))
    assert (world.root / "renamed.txt").is_symlink() and world.outside_untouched()
    with pytest.raises(HTTPError):
        await call(cm.rename("plain.txt", "hostdir/plain.txt"))
    assert world.outside_untouched() and (world.root / "plain.txt").exists()
    await refused(lambda: cm.rename("plain.txt", "sub"), 409)


async def test_delete_removes_links_not_what_they_point_to(cm: Any, world: World) -> None:
    await call(cm.delete("out.txt"))
    await call(cm.delete("hostdir"))
    await call(cm.delete("fifo.ipynb"))
    assert not os.path.lexists(world.root / "out.txt")
    assert not os.path.lexists(world.root / "hostdir")
    assert not os.path.lexists(world.root / "fifo.ipynb")
    assert world.outside_untouched()
    with pytest.raises(HTTPError):
        await call(cm.delete("hostdir/secret"))
    assert world.outside_untouched()


async def test_folder_copy_leaves_links_and_special_files_out(cm: Any, world: World) -> None:
    (world.root / "sub" / "link").symlink_to(world.secret)
    os.mkfifo(world.root / "sub" / "pipe")
    await call(cm.copy("sub", ""))
    copies = [n for n in os.listdir(world.root) if n.startswith("sub-Copy")]
    assert len(copies) == 1
    assert sorted(os.listdir(world.root / copies[0])) == ["inner.txt"]
    assert world.outside_untouched()


async def test_a_folder_flipped_to_a_link_during_saves_never_leaks(cm: Any, world: World) -> None:
    """The race: a thread swaps ``flip`` between a real folder and a link to the host folder
    while saves and reads go through it; no save may land outside, no read may show the
    host file, and every failure is an HTTP error (bounded: 300 rounds)."""
    flip = world.root / "flip"
    flip.mkdir()
    stop = threading.Event()

    def flipper() -> None:
        for _ in range(200_000):
            if stop.is_set():
                return
            os.rename(flip, world.root / "flip.real")
            flip.symlink_to(world.outside)
            flip.unlink()
            os.rename(world.root / "flip.real", flip)

    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    try:
        for i in range(300):
            with contextlib.suppress(HTTPError):  # refused or missing: never anything else
                await call(
                    cm.save({"type": "file", "format": "text", "content": "x"}, f"flip/f{i}.txt")
                )
            with contextlib.suppress(HTTPError):
                model = await call(cm.get(f"flip/f{i // 2}.txt"))
                assert model["content"] == "x"
            with contextlib.suppress(HTTPError):
                await call(cm.get("flip/secret", content=False))
                pytest.fail("the host file's metadata was served through the flipped folder")
    finally:
        stop.set()
        t.join(10)
    assert world.outside_untouched()


def test_guard_keeps_subclasses_and_leaves_other_managers_alone() -> None:
    class Custom(AsyncLargeFileManager):
        pass

    guarded = contents.guard(Custom)
    assert guarded is not None and issubclass(guarded, Custom) and contents.is_guarded(guarded)
    assert contents.guard(AsyncLargeFileManager) is contents.AsyncSandboxContentsManager
    assert contents.guard(contents.SandboxContentsManager) is contents.SandboxContentsManager
    assert contents.guard(object) is None


def test_server_extension_swaps_the_class_and_its_config_file(tmp_path: Path) -> None:
    class App:
        contents_manager_class: type = AsyncLargeFileManager

    app = App()
    serverext._link_jupyter_server_extension(app)
    assert app.contents_manager_class is contents.AsyncSandboxContentsManager
    path = serverext.write_config(tmp_path / "etc" / "jupyter")
    assert path.name == serverext.CONFIG_FILE
    import json

    assert json.loads(path.read_text()) == serverext.CONFIG


def test_the_wheel_and_kernelspec_install_enable_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One config: the wheel's data file is serverext.CONFIG, and installing the kernelspecs
    into a prefix writes it where a server of that prefix reads its config."""
    import json

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

    repo = Path(__file__).resolve().parents[2]
    shipped = repo / "jupyter-config" / serverext.CONFIG_FILE
    assert json.loads(shipped.read_text()) == serverext.CONFIG
    data_files = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    assert data_files["etc/jupyter/jupyter_server_config.d"] == [
        f"jupyter-config/{serverext.CONFIG_FILE}"
    ]
    from sandbox_kernel.jupyter import kernelspecs

    kernelspecs.install(["python3-sandbox"], prefix=str(tmp_path))
    written = tmp_path / "etc" / "jupyter" / "jupyter_server_config.d" / serverext.CONFIG_FILE
    assert json.loads(written.read_text()) == serverext.CONFIG
    assert kernelspecs.server_config_dir(user=True) != kernelspecs.server_config_dir()
