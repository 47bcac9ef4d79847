from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import LimitRefused
from sandbox_kernel.jupyter.control import MAX_REQUEST, RATE_LIMIT, ControlServer
from sandbox_kernel.limits import Ceilings, Limits
from sandbox_kernel.limits import plan_change as plan_limit_change

G = 1 << 30
CEIL = Ceilings(memory=4 * G, cpus=2.0, pids=512)


def test_change_within_ceilings() -> None:
    new, warnings = plan_limit_change(
        {"op": "set", "memory": "2G", "cpus": "1.5", "pids": 300},
        Limits(memory=G, cpus=1, pids=256),
        CEIL,
        100,
    )
    assert (new.memory, new.cpus, new.pids) == (2 * G, 1.5, 300) and warnings == []


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"memory": "8G"}, "memory=8G refused: this server allows at most 4 GiB per kernel"),
        ({"cpus": 4}, "cpus=4 refused: this server allows at most 2 CPUs per kernel"),
        (
            {"pids": 100000},
            "pids=100000 refused: this server allows at most 512 processes per kernel",
        ),
        ({"memory": "1K"}, "memory='1K' is too small; use 16M to 1048576T"),
        ({"pids": "-3"}, "not a whole number"),
        ({"memory": "lots"}, "is not a size"),
        ({"cpus": True}, "not a valid value"),
        ({"memory": ["1G"]}, "not a valid value"),
        ({"memory": "1" * 100}, "not a valid value"),
        ({"kernel_id": "other"}, "unknown field"),
        ({}, "nothing to change"),
    ],
)
def test_refusals_name_field_value_and_ceiling(request_: dict[str, object], message: str) -> None:
    with pytest.raises(LimitRefused) as err:
        plan_limit_change({"op": "set", **request_}, Limits(memory=G), CEIL, None)
    assert message in str(err.value)


def test_lowering_below_usage_warns() -> None:
    new, warnings = plan_limit_change(
        {"op": "set", "memory": "64M"}, Limits(memory=G), CEIL, 200 << 20
    )
    assert new.memory == 64 << 20
    assert "uses 200 MiB now" in warnings[0]


async def _request(path: str, payload: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    await writer.drain()
    line = await reader.readline()
    writer.close()
    reply: dict[str, Any] = json.loads(line)
    return reply


@pytest.fixture
def server_path(tmp_path: Path) -> str:
    return str(tmp_path / "ctl")


async def test_server_answers_and_survives_hostile_requests(server_path: str) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["op"] == "set":
            plan_limit_change(req, Limits(), CEIL, None)
        return {"ok": True, "info": {"echo": req["op"]}}

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    try:
        assert (await _request(server_path, b'{"op": "get"}\n'))["info"] == {"echo": "get"}
        too_big = await _request(server_path, b"x" * (MAX_REQUEST + 100) + b"\n")
        assert too_big["ok"] is False and "too large" in too_big["error"]
        assert "not JSON" in (await _request(server_path, b"{nope\n"))["error"]
        assert "malformed" in (await _request(server_path, b'["op"]\n'))["error"]
        deep = await _request(server_path, b"[" * 2000 + b"]" * 2000 + b"\n")
        # refused either way: too deep to parse (RecursionError before Python 3.13), or
        # parsed into a list, which is not a request object
        assert deep["ok"] is False and "malformed" in deep["error"]
        assert "malformed" in (await _request(server_path, b'{"op": "reboot"}\n'))["error"]
        refused = await _request(server_path, b'{"op": "set", "memory": "64G"}\n')
        assert refused == {
            "ok": False,
            "error": "memory=64G refused: this server allows at most 4 GiB per kernel",
        }
        # a flood is cut off by the rate limit, and the server keeps working
        replies = [
            await _request(server_path, b'{"op": "get"}\n') for _ in range(RATE_LIMIT[0] + 5)
        ]
        assert any("too many requests" in r.get("error", "") for r in replies)
        assert oct(os.stat(server_path).st_mode & 0o777) == "0o600"
        assert all(r["op"] in ("get", "set") for r in seen)
    finally:
        await server.close()
    assert not os.path.exists(server_path)


async def test_slow_client_is_cut_off(server_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernel.jupyter import control

    monkeypatch.setattr(control, "READ_TIMEOUT_S", 0.2)

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(server_path)
        writer.write(b'{"op": ')  # never finishes the line
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 2)
        assert "incomplete" in json.loads(line)["error"]
        writer.close()
    finally:
        await server.close()


async def test_get_takes_no_arguments_and_cannot_name_another_kernel(server_path: str) -> None:
    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "info": {"container_id": "sk-mine"}}

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    try:
        for field in ("kernel_id", "container_id"):
            reply = await _request(
                server_path, json.dumps({"op": "get", field: "x"}).encode() + b"\n"
            )
            assert reply["ok"] is False and f"unknown field(s) {field}" in reply["error"]
        assert server.rejected == 2
    finally:
        await server.close()


def test_rate_limit_refills_after_a_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernel.jupyter import control

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    limiter = control._RateLimiter(*RATE_LIMIT)
    assert sum(limiter.allow() for _ in range(100)) == RATE_LIMIT[0]
    now[0] += RATE_LIMIT[1] / RATE_LIMIT[0] + 0.01  # one token back
    assert limiter.allow() and not limiter.allow()
    now[0] += 3600
    assert sum(limiter.allow() for _ in range(100)) == RATE_LIMIT[0]  # the burst, not more


async def test_too_many_connections_get_an_answer(
    server_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.jupyter import control

    monkeypatch.setattr(control, "MAX_CONNECTIONS", 1)
    gate = asyncio.Event()

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        await gate.wait()
        return {"ok": True}

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    try:
        first = asyncio.ensure_future(_request(server_path, b'{"op": "get"}\n'))
        await asyncio.sleep(0.2)
        busy = await _request(server_path, b'{"op": "get"}\n')
        assert busy["ok"] is False and "at once" in busy["error"]
        gate.set()
        assert (await first)["ok"] is True
    finally:
        await server.close()


def _slow_client(path: str) -> dict[str, Any]:
    """A blocking client like the in-kernel magics, slow to send its request: it connects,
    then sends (the server must not have closed meanwhile), then reads the reply."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        time.sleep(0.3)  # not measured: it only opens the window for an early close
        s.sendall(b'{"op": "get"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


async def test_connections_over_the_limit_are_answered_not_reset(server_path: str) -> None:
    from sandbox_kernel.jupyter import control

    gate = asyncio.Event()
    held = 0

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        nonlocal held
        held += 1
        await gate.wait()
        return {"ok": True}

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    try:
        first = [
            asyncio.ensure_future(_request(server_path, b'{"op": "get"}\n'))
            for _ in range(control.MAX_CONNECTIONS)
        ]
        while held < control.MAX_CONNECTIONS:
            await asyncio.sleep(0.01)
        over = await asyncio.gather(
            *(asyncio.to_thread(_slow_client, server_path) for _ in range(3))
        )
        for reply in over:  # the fifth, sixth and seventh at once
            assert reply == {"ok": False, "error": "too many requests at once; try again"}
        gate.set()
        assert [(await f)["ok"] for f in first] == [True] * control.MAX_CONNECTIONS
        assert server.rejected == 3
    finally:
        await server.close()


async def test_open_connections_are_capped(
    server_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel opening many connections and sending nothing holds at most a few of the
    server's fds: beyond the cap a connection is closed unread."""
    import subprocess
    import sys

    from sandbox_kernel.jupyter import control

    monkeypatch.setattr(control, "READ_TIMEOUT_S", 60.0)  # held as long as the test runs
    cap = getattr(control, "MAX_OPEN", 16)
    count = 200

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def fds() -> int:
        """This process's descriptors of sockets on the server's path (the listener and
        what it accepted), so that descriptors other threads of the test process open or
        close meanwhile do not count."""
        with open("/proc/net/unix") as f:
            inodes = {
                fields[6]
                for fields in (line.split() for line in f.readlines()[1:])
                if len(fields) > 7 and fields[7] == server_path
            }
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        return count

    server = ControlServer(server_path, handler, uid=os.getuid(), gid=os.getgid())
    await server.start()
    base = fds()
    # the "kernel": its own fd table, so that only the server's fds are counted here
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            "socks = []\n"
            f"for _ in range({count}):\n"
            "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)\n"
            "print('held', flush=True); sys.stdin.read()\n",
            server_path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == b"held\n"
        while server.rejected < count - cap:  # every connection accepted
            await asyncio.sleep(0.01)
        held = fds() - base
        assert cap - 2 <= held <= cap  # (the count does see the server's held sockets)
    finally:
        holder.kill()
        holder.wait()
        while getattr(server, "open", 0):  # the held ones see the kernel's end close
            await asyncio.sleep(0.01)
        await server.close()


def test_bind_refused_when_the_filesystem_ids_do_not_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setfsuid fails silently: when the ids in effect are not the kernel's, nothing is bound."""
    import ctypes
    import socket

    from sandbox_kernel.jupyter import control

    class Stuck:  # a libc whose setfsuid/setfsgid never take effect
        def setfsuid(self, uid: int) -> int:
            return 4242

        def setfsgid(self, gid: int) -> int:
            return 4242

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Stuck())
    path = str(tmp_path / "control")
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(PermissionError, match="ids"):
        control._bind_as(sock, path, 1000, 1000)
    assert not os.path.exists(path)


def _ask_blocking(path: str, payload: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """One request as the in-kernel magics make it: a blocking socket."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def test_the_control_thread_answers_with_no_event_loop_running_and_leaves_nothing(
    server_path: str,
) -> None:
    """No event loop runs in this (the caller's) thread: as with a blocking KernelManager
    between its calls, the thread of the server answers on its own."""
    import threading

    from sandbox_kernel.jupyter.control import ControlThread

    stuck = threading.Event()

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "set":  # a request in flight when the kernel shuts down
            stuck.set()
            await asyncio.sleep(3600)
        return {"ok": True, "thread": threading.current_thread().name}

    before = set(threading.enumerate())
    server = ControlThread(server_path, handler, uid=os.getuid(), gid=os.getgid())
    server.start()
    try:
        assert server.running
        reply = _ask_blocking(server_path, b'{"op": "get"}\n')
        assert reply["ok"] and reply["thread"] != threading.current_thread().name
        assert "not JSON" in _ask_blocking(server_path, b"{nope\n")["error"]  # checks apply
        ended: list[str] = []

        def ask_and_hang() -> None:
            try:
                _ask_blocking(server_path, b'{"op": "set"}\n', 30)
            except ValueError:  # no JSON: the connection was closed unanswered
                ended.append("closed")

        asker = threading.Thread(target=ask_and_hang)
        asker.start()
        assert stuck.wait(10)
    finally:
        server.close()
    asker.join(30)
    # the request in flight was ended (the connection closed), not left hanging
    assert not asker.is_alive() and ended == ["closed"]
    assert not server.running and not os.path.exists(server_path)
    assert set(threading.enumerate()) <= before
    server.close()  # idempotent


def test_a_control_thread_that_cannot_listen_raises_and_leaves_no_thread(
    tmp_path: Path,
) -> None:
    import threading

    from sandbox_kernel.jupyter.control import ControlThread

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    before = set(threading.enumerate())
    server = ControlThread(
        str(tmp_path / "missing" / "ctl"), handler, uid=os.getuid(), gid=os.getgid()
    )
    with pytest.raises(OSError):
        server.start()
    assert not server.running and set(threading.enumerate()) <= before


@pytest.mark.parametrize("planted", ["link to a host file", "link to a host socket", "FIFO"])
def test_the_control_sockets_mode_is_never_set_through_what_the_kernel_swapped_in(
    tmp_path: Path, planted: str
) -> None:
    """Between the bind and the chmod the kernel may replace the name: the mode is set on
    the name itself, and only when it is a socket."""
    import socket
    import stat

    from sandbox_kernel.jupyter import control

    host = tmp_path / "host"
    host.mkdir()
    victim = host / "file"
    victim.write_text("host")
    victim.chmod(0o644)
    with socket.socket(socket.AF_UNIX) as hs:
        hs.bind(str(host / "sock"))
        os.chmod(host / "sock", 0o755)
        path = tmp_path / "control"
        if planted == "FIFO":
            os.mkfifo(path)
        else:
            path.symlink_to(victim if planted == "link to a host file" else host / "sock")
        with pytest.raises(PermissionError, match="replaced by the kernel"):
            control._chmod_socket(str(path), 0o600)
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644
        assert stat.S_IMODE((host / "sock").stat().st_mode) == 0o755
        path.unlink()
        with socket.socket(socket.AF_UNIX) as ks:
            ks.bind(str(path))
            control._chmod_socket(str(path), 0o600)
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600
