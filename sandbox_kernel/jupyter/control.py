"""The control channel: how code inside a kernel asks the host for something.

Layer: Jupyter (asyncio only). The provisioner serves one ``ControlServer`` per kernel start
(``launch_kernel``) and closes it in ``cleanup``; its handler answers the requests. The
server runs in a thread of its own with its own event loop (``ControlThread``), so requests
are answered whatever drives the kernel: jupyter_server's event loop, or a blocking
``KernelManager`` whose loop runs only while the caller is inside one of its calls.

One unix socket per kernel, in the kernel's own connection folder (a tmpfs of its
container, which the server reaches by a descriptor), owned by the kernel's uid. The host
knows which kernel is asking by the socket the request arrived on: a request can only ever
act on its own container.

Protocol: one JSON object per line, at most ``MAX_REQUEST`` bytes, one request per
connection, answered with one JSON line.

* ``{"op": "get"}`` -> ``{"ok": true, "info": {...}}`` (limits, ceilings, image, previous exit)
* ``{"op": "set", "memory": "2G", "cpus": 2, "pids": 512}`` -> ``{"ok": true, "limits": {...},
  "warnings": [...]}`` or ``{"ok": false, "error": "memory=8G refused: this server allows at
  most 4 GiB per kernel"}``

Everything from the kernel is hostile: sizes are bounded, every field validated, requests
rate-limited, connections time-limited and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import LimitRefused

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
READ_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 4  # requests served at once; more get a polite "too many at once"
#: Connections open at once, at most (served, or waiting for the "too many" answer): beyond
#: it a connection is closed at once, unread, so that a kernel cannot hold the server's fds.
MAX_OPEN = 16
CLOSE_TIMEOUT_S = 10.0  # the most ControlThread.close waits for requests in flight
RATE_LIMIT = (20, 60.0)  # bursts of 20 requests per kernel, then one every 3 seconds
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class _Refused(Exception):
    """A request refused before it reaches the handler (its text is the reply's error)."""


class _RateLimiter:
    """Token bucket: bursts of ``count`` requests, refilled at ``count`` per ``window`` s.

    A refused request costs nothing, so a flood locks a kernel out for seconds, not for
    the whole window.
    """

    def __init__(self, count: int, window: float) -> None:
        self.count, self.window = count, window
        self.tokens = float(count)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.count, self.tokens + (now - self.stamp) * self.count / self.window)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def _bind_as(sock: socket.socket, path: str, uid: int, gid: int) -> None:
    """Bind ``sock`` at ``path`` (mode 0600) from a thread of its own whose filesystem ids
    are ``uid``/``gid``, the kernel's: the connection folder is a tmpfs of the container's
    user namespace, where the server's own ids may not exist (root's: EOVERFLOW), and the
    socket is then the kernel's from its creation (no chown through a path the kernel may
    swap), and its mode is set through a descriptor of the name, never through a link the
    kernel put there meanwhile (``_chmod_socket``; the folder is mounted nosymfollow as
    well). Called by ``ControlServer.start``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    failure: list[BaseException] = []

    def run() -> None:  # setfsuid changes the calling thread only
        old_gid = libc.setfsgid(gid)
        old_uid = libc.setfsuid(uid)
        try:
            # setfsuid reports no failure; -1 changes nothing and returns the id in effect
            if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
                raise PermissionError(
                    f"cannot make the control socket {path} as uid {uid}, gid {gid}: "
                    "the server could not take those filesystem ids (it needs "
                    "CAP_SETUID and CAP_SETGID: run Jupyter as root)"
                )
            sock.bind(path)
            _chmod_socket(path, 0o600)
        except BaseException as exc:
            failure.append(exc)
        finally:
            libc.setfsuid(old_uid)
            libc.setfsgid(old_gid)

    thread = threading.Thread(target=run, name="sandbox-control-bind")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _chmod_socket(path: str, mode: int) -> None:
    """Give the socket at ``path`` mode ``mode`` without following a link: the name is
    opened ``O_PATH|O_NOFOLLOW`` (a link is opened as itself, not followed), must be a
    socket (``fstat`` on the descriptor), and is changed through that descriptor. The kernel
    writes the folder and may have swapped the name since the bind: PermissionError then,
    nothing changed. Called by ``_bind_as`` right after the bind."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise PermissionError(
                f"the control socket {path} was replaced by the kernel before its mode was "
                "set; the kernel's start is refused (restart it)"
            )
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


class ControlServer:
    """Serve one kernel's control socket (asyncio). Made by the provisioner for each start,
    with its ``_control_request`` as ``handler``; requests are checked here first."""

    def __init__(self, path: str, handler: Handler, *, uid: int, gid: int) -> None:
        self.path = path
        self.handler = handler
        self.uid, self.gid = uid, gid
        self.limiter = _RateLimiter(*RATE_LIMIT)
        self.active = 0
        self.open = 0  # connections open now (bounded by MAX_OPEN)
        self.rejected = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Listen on ``path`` (replacing a stale socket), owned by the kernel's uid, mode 0600.
        Called by the provisioner's ``launch_kernel``, once the kernel exec'd."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.to_thread(_bind_as, sock, self.path, self.uid, self.gid)
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=MAX_REQUEST + 2
            )
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop listening and remove the socket (idempotent). Called by the provisioner's
        ``cleanup``, and by ``pre_launch`` when connecting the kernel fails."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_OPEN:  # closed unread: each held connection is a server fd
            self.rejected += 1
            writer.transport.abort()
            return
        self.open += 1
        try:
            await self._serve_open(reader, writer)
        finally:
            self.open -= 1

    async def _serve_open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CONNECTIONS:
            self.rejected += 1
            busy = {"ok": False, "error": "too many requests at once; try again"}
            # read the request first: closing before the client sent it, or with it unread,
            # resets the client's connection instead of answering it
            with contextlib.suppress(
                OSError, asyncio.TimeoutError, EOFError, asyncio.LimitOverrunError
            ):
                await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT_S)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                writer.write(json.dumps(busy).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
            writer.close()
            return
        self.active += 1
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception as exc:  # a bug must not leave the connection (or the log) hanging
            log.warning("control connection failed: %s", exc)
        finally:
            self.active -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """Read, check and answer one request; refusals are counted in ``rejected``."""
        try:
            request = await self._read_request(reader)
        except _Refused as exc:
            self.rejected += 1
            return {"ok": False, "error": str(exc)}
        try:
            return await self.handler(request)
        except LimitRefused as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # never let a request take the server down
            log.warning("control request failed: %s", exc)
            return {"ok": False, "error": f"the host could not apply it: {exc}"}

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """One bounded, rate-limited, well-formed request; ``_Refused`` otherwise."""
        too_large = f"request too large (at most {MAX_REQUEST} bytes)"
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            raise _Refused(too_large) from None
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            raise _Refused("incomplete request (one JSON object per line)") from None
        if len(line) > MAX_REQUEST + 1:
            raise _Refused(too_large)
        if not self.limiter.allow():
            raise _Refused("too many requests; try again in a few seconds")
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: '[[[[...' nested too deep
            raise _Refused("malformed request (not JSON)") from None
        if not isinstance(request, dict) or request.get("op") not in ("get", "set"):
            raise _Refused('malformed request: expected {"op": "get"|"set", ...}')
        if request["op"] == "get" and len(request) > 1:
            extra = ", ".join(sorted(str(k)[:32] for k in request if k != "op"))
            raise _Refused(f"unknown field(s) {extra}; get takes no arguments")
        return request


class ControlThread:
    """Serve one ``ControlServer`` from a dedicated thread running its own event loop, so
    that it answers whether or not anything else runs the caller's loop. Made by the
    provisioner for each start (``pre_launch``) and closed by its ``cleanup``; ``handler``
    then runs in that thread's loop (what it shares with the provisioner's loop it guards
    with a lock: see ``SandboxProvisioner._change_limits``)."""

    def __init__(self, path: str, handler: Handler, *, uid: int, gid: int, name: str = "") -> None:
        self.server = ControlServer(path, handler, uid=uid, gid=gid)
        self.name = name or path  # in the thread's name (the provisioner's: the container id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread and listen (blocking, until the socket is bound; raises what
        ``ControlServer.start`` raised, with no thread left). Called by the provisioner's
        ``pre_launch``."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"sandbox-control {self.name}", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), loop).result(CLOSE_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening, end the requests in flight (cancelled; a host-side step already
        running is waited for), remove the socket, stop and join the thread (blocking,
        idempotent). Called by the provisioner's ``cleanup``, and by ``pre_launch`` when
        connecting the kernel fails."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self._stop(), loop)
            try:
                done.result(CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.warning("control socket %s: closing failed: %s", self.server.path, exc)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CLOSE_TIMEOUT_S)
        if thread.is_alive():
            log.warning("control socket %s: its thread did not stop", self.server.path)
            return
        loop.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.server.path)

    @property
    def running(self) -> bool:
        """Is the thread serving (tests check that nothing is left after ``close``)?"""
        return self._thread is not None and self._thread.is_alive()

    async def _stop(self) -> None:
        closing = asyncio.ensure_future(self.server.close())
        await asyncio.sleep(0)  # the listener is closed: no new connection from here
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me and t is not closing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await closing
        await asyncio.get_running_loop().shutdown_default_executor()
