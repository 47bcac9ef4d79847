"""What a real kernel swaps into its connection folder never leads the server elsewhere.

The connection folder (``/run/sandbox`` inside, a tmpfs of the container's own) holds the
kernel's ``k-<port>`` sockets, which the server's output relay connects to (and connects
again after a drop), and the ``control`` socket the server binds at each start. Kernel code
writes that folder: it replaces one of its sockets by a link to a socket (or a file) of the
host the test made, then makes the server connect again (a frame over the relay's hard
limit makes libzmq cut the iopub connection, and the relay connects again at once and then
every few milliseconds; a restart binds the control socket again). The
folder is mounted nosymfollow and the server reaches it through its descriptor, so the
server must never connect to the test's socket, never change the test's file, and get its
kernel back once the kernel puts its socket back.
"""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.jupyter import launch
from tests.privileged.conftest import (  # noqa: F401  (the fixtures)
    assert_no_leftovers,
    images,
    kernels,
    notebook_dir,
)
from tests.privileged.test_provisioner import clean_host, execute, track  # noqa: F401

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

#: Run in the kernel: its socket ``NAME`` moved aside, a link to ``TARGET`` (a host path)
#: in its place, then one frame far over the relay's limit (16 MiB, cut past twice that).
PLANT = """
import os
real = os.path.join(FOLDER, NAME)
os.rename(real, real + '.away')
os.symlink(TARGET, real)
print('x' * (40 << 20))
"""
RESTORE = """
import os
real = os.path.join(FOLDER, NAME)
os.unlink(real)
os.rename(real + '.away', real)
"""


@pytest.fixture
def host_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A listening socket of the host (and a file beside it) the kernel's links point at."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("host file\n")
    (host / "file").chmod(0o644)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(host / "sock"))
    (host / "sock").chmod(0o755)
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock, host
    finally:
        sock.close()


def nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def code(template: str, name: str, target: str = "") -> str:
    return (
        template.replace("FOLDER", repr(launch.CONN_TARGET))
        .replace("NAME", repr(name))
        .replace("TARGET", repr(target))
    )


async def outputs_again(km: AsyncKernelManager, deadline_s: float) -> bool:
    """Do cells' outputs reach the client again (the relay reconnected) within the time?"""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        reply, out = await execute(km, "print('back')", timeout=10)
        if reply["status"] == "ok" and "back" in out:
            return True
        await asyncio.sleep(0.5)
    return False


async def on_shell(km: AsyncKernelManager, source: str) -> dict[str, Any]:
    """Run ``source`` and read only its shell reply: the iopub connection it cuts or brings
    back may carry nothing meanwhile, so no iopub readiness is waited for."""
    kc = km.client()
    kc.start_channels()
    try:
        msg_id = kc.execute(source)
        while True:
            reply: dict[str, Any] = await kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]  # type: ignore[no-any-return]
    finally:
        kc.stop_channels()


@pytest.mark.parametrize("target", ["sock", "file"])
async def test_the_relay_never_connects_through_a_link_in_the_folder(
    clean_host: list[str],  # noqa: F811
    kernels: Path,  # noqa: F811
    notebook_dir: Path,  # noqa: F811
    host_socket: tuple[socket.socket, Path],
    target: str,
) -> None:
    sock, host = host_socket
    km = AsyncKernelManager(kernel_name="python3-sandbox")
    await km.start_kernel(cwd=str(notebook_dir))
    try:
        p = track(clean_host, km)
        relay: Any = p._relay
        assert relay is not None
        name = f"k-{km.iopub_port}"
        before = relay.rebuilds
        reply = await on_shell(km, code(PLANT, name, str(host / target)))
        assert reply["status"] == "ok", reply
        deadline = time.monotonic() + 20
        while relay.rebuilds == before and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert relay.rebuilds > before, "the relay never connected again"
        await asyncio.sleep(2)  # the relay retries every 5 to 20 ms meanwhile
        assert nobody_connected(sock), "the server connected to the host's socket"
        reply = await on_shell(km, code(RESTORE, name))
        assert reply["status"] == "ok", reply
        assert await outputs_again(km, 60), "the kernel's output did not come back"
        assert nobody_connected(sock)
        assert (host / "file").read_text() == "host file\n"
        assert stat.S_IMODE((host / "file").stat().st_mode) == 0o644
    finally:
        await km.shutdown_kernel(now=True)


@pytest.mark.parametrize("target", ["sock", "file"])
async def test_a_link_in_place_of_the_control_socket_is_never_followed(
    clean_host: list[str],  # noqa: F811
    kernels: Path,  # noqa: F811
    notebook_dir: Path,  # noqa: F811
    host_socket: tuple[socket.socket, Path],
    target: str,
) -> None:
    sock, host = host_socket
    km = AsyncKernelManager(kernel_name="python3-sandbox")
    await km.start_kernel(cwd=str(notebook_dir))
    try:
        track(clean_host, km)
        plant = code(PLANT, launch.CONTROL_SOCKET, str(host / target))
        plant = plant.replace("print('x' * (40 << 20))", "print('planted')")
        reply, out = await execute(km, plant)
        assert reply["status"] == "ok" and "planted" in out, out
        # the kernel's own request meets its link (nosymfollow inside too): no host answers
        reply, out = await execute(km, "r = %sandbox\nprint(r)")
        assert "the host did not answer" in out, out
        await km.restart_kernel(now=True)  # the server binds the control socket again
        reply, out = await execute(km, "r = %sandbox\nprint(r)")
        assert reply["status"] == "ok" and "memory limit" in out, out
        assert "the host did not answer" not in out, out
        assert nobody_connected(sock)
        assert (host / "file").read_text() == "host file\n"
        assert stat.S_IMODE((host / "file").stat().st_mode) == 0o644
        assert stat.S_IMODE((host / "sock").stat().st_mode) == 0o755
    finally:
        await km.shutdown_kernel(now=True)
