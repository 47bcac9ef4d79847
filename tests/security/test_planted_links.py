"""What a real kernel plants in its notebook folder is never followed by the Jupyter server.

A jupyter_server (root, or in the rootless rerun the unprivileged user) with the product's
server extension enabled as ``kernelspec install`` enables it starts a sandbox kernel; the
kernel's code plants links to a host file and to the host's root, a dangling link where a
notebook will be saved, and a FIFO and a socket named like notebooks. Through the REST API
and the ``/files/`` handler the server must refuse every one of them with a 403 that says
why, never block, never serve the host file's bytes and never change it, and still list,
read and save the folder's regular files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.privileged.conftest import images  # noqa: F401  (the session fixture)
from tests.privileged.test_server import Server, launch_server, run_cell, stop_jupyter

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

SECRET = "host secret of the server's user\n"

#: Run inside the kernel: refuses outside a sandbox (PID 1 the product's init, no_new_privs,
#: no capabilities), then plants its entries in the working directory (the notebook folder).
PLANT = r"""
import os, socket
def _in_sandbox():
    lines = open('/proc/self/status').read().splitlines()
    status = dict(line.split(':', 1) for line in lines if ':' in line)
    return (open('/proc/1/comm').read().strip() == 'sk-runtime'
            and status['NoNewPrivs'].strip() == '1'
            and status['CapEff'].strip() == '0000000000000000')
if not _in_sandbox():
    raise SystemExit('REFUSED: not in a sandbox')
os.symlink(SECRET_PATH, 'out.txt')
os.symlink(SECRET_PATH, 'victim.ipynb')
os.symlink('/etc/shadow', 'shadow.txt')
os.symlink('/', 'rootlink')
os.symlink(os.path.dirname(SECRET_PATH) + '/new.ipynb', 'dangling.ipynb')
os.mkfifo('fifo.ipynb')
_s = socket.socket(socket.AF_UNIX); _s.bind('sock.ipynb')
open('mine.txt', 'w').write('written by the kernel\n')
print('planted')
"""

NOTEBOOK = {
    "type": "notebook",
    "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5},
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[Server]:  # noqa: F811
    base = tmp_path_factory.mktemp("planted")
    secret = base / "secret.txt"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    srv = launch_server(base)
    kid = None
    try:
        code, model = srv.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
        assert code == 201, model
        kid = model["id"]
        status, out = run_cell(srv, kid, PLANT.replace("SECRET_PATH", repr(str(secret))))
        assert (status, out.strip()) == ("ok", "planted"), out
        srv.secret = secret  # type: ignore[attr-defined]
        yield srv
    finally:
        if kid is not None:
            srv.request("DELETE", f"/api/kernels/{kid}")
        stop_jupyter(srv.proc)


def untouched(srv: Server) -> bool:
    secret: Path = srv.secret  # type: ignore[attr-defined]
    return (
        secret.read_text() == SECRET and sorted(os.listdir(secret.parent)).count("new.ipynb") == 0
    )


def test_the_server_loaded_the_guard(planted: Server) -> None:
    assert "guards the notebook folders" in planted.log.read_text()


@pytest.mark.parametrize(
    "path",
    [
        "/api/contents/out.txt",
        "/api/contents/out.txt?type=file&format=base64",
        "/api/contents/victim.ipynb",
        "/api/contents/shadow.txt",
        "/api/contents/rootlink/etc/shadow",
        "/api/contents/rootlink",
        "/api/contents/fifo.ipynb",
        "/api/contents/sock.ipynb",
        "/files/out.txt",
        "/files/rootlink/etc/passwd",
        "/files/fifo.ipynb",
    ],
)
def test_reading_a_planted_entry_is_refused(planted: Server, path: str) -> None:
    t0 = time.monotonic()
    code, body = planted.request("GET", path)
    assert code in (403, 404), (code, body)
    text = str(body)
    assert "host secret" not in text and "root:" not in text
    assert time.monotonic() - t0 < 60  # bounded: the FIFO never blocks the server


def test_refusals_say_why(planted: Server) -> None:
    code, body = planted.request("GET", "/api/contents/out.txt")
    assert code == 403
    assert "out.txt is a symbolic link" in body["message"]
    assert "does not follow links" in body["message"]
    code, body = planted.request("GET", "/api/contents/fifo.ipynb")
    assert code == 403 and "a FIFO" in body["message"]


@pytest.mark.parametrize("path", ["victim.ipynb", "dangling.ipynb", "rootlink/tmp/x.ipynb"])
def test_saving_through_a_planted_link_is_refused(planted: Server, path: str) -> None:
    code, body = planted.request("PUT", f"/api/contents/{path}", NOTEBOOK)
    assert code in (403, 404), (code, body)
    assert untouched(planted)


def test_the_folder_still_works(planted: Server) -> None:
    code, listing = planted.request("GET", "/api/contents/")
    assert code == 200, listing
    names = {e["name"]: e for e in listing["content"]}
    assert {"out.txt", "victim.ipynb", "rootlink", "mine.txt"} <= set(names)
    assert "fifo.ipynb" not in names and "sock.ipynb" not in names
    assert names["out.txt"]["writable"] is False
    code, model = planted.request("GET", "/api/contents/mine.txt")
    assert code == 200 and model["content"] == "written by the kernel\n"
    code, raw = planted.request("GET", "/files/mine.txt")
    assert (code, raw) == (200, "written by the kernel\n")
    code, model = planted.request("PUT", "/api/contents/saved.ipynb", NOTEBOOK)
    assert code in (200, 201), model
    code, _ = planted.request("POST", "/api/contents/saved.ipynb/checkpoints")
    assert code == 201
    # deleting a link removes the link, not what it points to
    code, _ = planted.request("DELETE", "/api/contents/out.txt")
    assert code == 204
    assert not os.path.lexists(planted.root / "out.txt") and untouched(planted)
