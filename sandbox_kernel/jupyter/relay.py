"""The output relay: what a kernel sends reaches Jupyter only within bounds.

Layer: Jupyter. A kernel's memory cap bounds the kernel, not the process reading its
sockets: a kernel flooding output made an unread client hold gigabytes in its ZMQ receive
queues. So the kernel never talks to Jupyter directly: it binds its sockets in its
connection folder, and a relay owned by the server (a thread of the server's process,
outside the container, where kernel code cannot reach or configure it) connects to them and
serves the client's sockets in a host-only folder. Between the two, every message from the
kernel passes ``OutputGuard``:

* a message larger than ``max_message_size`` is dropped (a frame far above it makes libzmq
  cut the connection before it is read: ZMQ_MAXMSGSIZE; the relay then reconnects);
* messages beyond the rate limits (messages/s and bytes/s, averaged over a window, as
  jupyter_server's iopub rate limit) are dropped until the kernel slows down;
* each drop is told in the notebook by a notice: a signed ``stream`` message on iopub whose
  parent is the dropped message's parent, so it shows in the cell that made the output;
* the queues are bounded: ``QUEUE_DEPTH`` messages on the kernel's side (read at once),
  ``CLIENT_QUEUE_DEPTH`` per client (Jupyter's own depth; what enters it is rate-limited).

The provisioner makes one ``Relay`` per kernel start (``start`` in ``pre_launch``, ``close`` in
``cleanup``); ``OutputGuard`` is plain logic, tested on its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from jupyter_client.session import Session
from zmq.utils.monitor import recv_monitor_message

from ..units import format_size

MiB = 1024**2
#: The smallest max_message_size accepted (below it ordinary replies would be dropped).
MIN_MESSAGE_SIZE = 64 * 1024
#: Messages queued on each kernel-facing relay socket, at most (the relay reads them
#: at once; when it cannot, the kernel's own queue, in the kernel's memory, fills).
QUEUE_DEPTH = 64
#: Messages queued for each client, at most: the queue Jupyter itself uses (a client that
#: reads late still gets a burst of that many); what enters it is rate-limited.
CLIENT_QUEUE_DEPTH = 1000
#: A frame above max_message_size times this is cut by libzmq before it is read.
HARD_FACTOR = 2
#: Header and parent frames longer than this are not parsed (treated as plain output).
MAX_HEADER = 64 * 1024
#: iopub messages of the protocol itself: limited apart from output, so that a flood of
#: output never drops the "idle" status that ends a cell.
PROTOCOL_TYPES = frozenset(
    {"status", "execute_input", "clear_output", "comm_open", "comm_close", "iopub_welcome"}
)
#: The identity of the relay's sockets on the kernel's ROUTER sockets (shell, control and
#: stdin share it: the kernel sends input requests to the shell request's sender).
RELAY_IDENTITY = b"sandbox-kernel-relay"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
DELIM = b"<IDS|MSG>"


@dataclass(frozen=True)
class OutputLimits:
    """What one kernel may send to Jupyter (resolved from the settings; 0 turns a rate
    limit off)."""

    max_message_size: int = 16 * MiB
    msg_rate: float = 1000.0  # messages per second
    data_rate: int = 8 * MiB  # bytes per second
    window: float = 3.0  # seconds the rates are averaged over

    def describe_rates(self) -> str:
        """The rate limits in words, for the throttling notice."""
        parts = []
        if self.msg_rate:
            parts.append(f"{self.msg_rate:g} messages/s")
        if self.data_rate:
            parts.append(f"{format_size(self.data_rate)}/s")
        return " or ".join(parts)


class RateLimiter:
    """Two token buckets (messages, bytes), each holding ``window`` seconds of its rate and
    refilled continuously; a message passes when both hold enough. The byte bucket holds at
    least ``floor`` bytes, so that a message of the largest allowed size can pass."""

    def __init__(self, msg_rate: float, data_rate: float, window: float, floor: int) -> None:
        self.msg_rate, self.data_rate = msg_rate, data_rate
        self.msg_cap = msg_rate * window
        self.byte_cap = max(data_rate * window, float(floor)) if data_rate else 0.0
        self.msgs, self.bytes = self.msg_cap, self.byte_cap
        self.last: float | None = None

    def admit(self, nbytes: int, now: float) -> bool:
        """Take one message of ``nbytes`` if both buckets allow it (called for each message)."""
        if self.last is not None:
            elapsed = max(0.0, now - self.last)
            self.msgs = min(self.msg_cap, self.msgs + elapsed * self.msg_rate)
            self.bytes = min(self.byte_cap, self.bytes + elapsed * self.data_rate)
        self.last = now
        if (self.msg_rate and self.msgs < 1) or (self.data_rate and self.bytes < nbytes):
            return False
        if self.msg_rate:
            self.msgs -= 1
        if self.data_rate:
            self.bytes -= nbytes
        return True


def _json(frame: bytes) -> dict[str, Any]:
    if len(frame) > MAX_HEADER:
        return {}
    try:
        value = json.loads(frame)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def parse(frames: Sequence[bytes]) -> tuple[str, dict[str, Any]]:
    """The message type and parent header of a Jupyter wire message ('' and {} when the
    frames are not one, or too large to read cheaply)."""
    try:
        i = list(frames).index(DELIM)
    except ValueError:
        return "", {}
    if len(frames) < i + 6:
        return "", {}
    header, parent = _json(frames[i + 2]), _json(frames[i + 3])
    msg_type = header.get("msg_type")
    if not isinstance(parent.get("msg_id"), str):
        parent = {}
    return (msg_type if isinstance(msg_type, str) else ""), parent


class OutputGuard:
    """Decides, for each message from the kernel, whether it reaches Jupyter, and makes the
    notices (signed iopub frames) that tell the notebook what was dropped. Used by the
    relay thread only (not thread-safe); ``clock`` for tests."""

    def __init__(
        self,
        limits: OutputLimits,
        session: Session,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.session = session
        self.clock = clock
        floor = limits.max_message_size

        def bucket() -> RateLimiter:
            return RateLimiter(limits.msg_rate, limits.data_rate, limits.window, floor)

        self.buckets = {"output": bucket(), "protocol": bucket()}
        self.throttled: dict[str, list[int]] = {}  # bucket -> [messages, bytes] dropped
        self.last_parent: dict[str, Any] = {}
        self.dropped = 0  # messages dropped in all, for the log

    def admit(self, channel: str, frames: Sequence[bytes]) -> tuple[bool, list[list[bytes]]]:
        """(forward it?, notices to send on iopub) for one message from the kernel on
        ``channel``. Called by the relay thread for every message the kernel sends."""
        size = sum(len(f) for f in frames)
        if channel == "hb":
            return size <= MAX_HEADER, []
        msg_type, parent = parse(frames)
        if channel == "iopub" and msg_type == "status" and parent:
            self.last_parent = parent
        parent = parent or self.last_parent
        if size > self.limits.max_message_size:
            self.dropped += 1
            what = f"a {msg_type or 'message'} of {format_size(size)}"
            text = (
                f"output dropped: {what} exceeds the {format_size(self.limits.max_message_size)} "
                "limit of messages from a sandbox kernel (SandboxProvisioner.max_message_size)"
            )
            return False, [self.notice(text, parent)]
        kind = "protocol" if channel != "iopub" or msg_type in PROTOCOL_TYPES else "output"
        notices: list[list[bytes]] = []
        if self.buckets[kind].admit(size, self.clock()):
            dropped = self.throttled.pop(kind, None)
            if dropped is not None:
                notices.append(
                    self.notice(
                        f"output resumed: {dropped[0]} message(s) ({format_size(dropped[1])}) "
                        "were dropped while the kernel sent too fast",
                        parent,
                    )
                )
            return True, notices
        self.dropped += 1
        if kind not in self.throttled:
            self.throttled[kind] = [0, 0]
            notices.append(
                self.notice(
                    f"output throttled: the kernel sends more than {self.limits.describe_rates()} "
                    f"(averaged over {self.limits.window:g} s); its output is dropped until it "
                    "slows down (SandboxProvisioner.iopub_msg_rate_limit, "
                    "iopub_data_rate_limit)",
                    parent,
                )
            )
        self.throttled[kind][0] += 1
        self.throttled[kind][1] += size
        return False, notices

    def reset_notice(self) -> list[bytes]:
        """The notice for a connection libzmq cut because a frame was far over the size
        limit (called by the relay once it is connected again)."""
        self.dropped += 1
        return self.notice(
            f"output dropped: the kernel sent a message far over the "
            f"{format_size(self.limits.max_message_size)} limit "
            "(SandboxProvisioner.max_message_size)",
            self.last_parent,
        )

    def notice(self, text: str, parent: dict[str, Any]) -> list[bytes]:
        """A signed stderr ``stream`` message with ``parent`` as parent header, as iopub
        frames."""
        msg = self.session.msg(
            "stream", content={"name": "stderr", "text": f"[sandbox-kernel] {text}\n"}
        )
        msg["parent_header"] = dict(parent)
        return self.session.serialize(msg, ident=[b"stream.stderr"])


class _Channel:
    """One channel: the client's socket (bound) and the kernel's (connected, rebuilt when
    libzmq cut it), with the monitor of the kernel's."""

    def __init__(self, name: str, client: zmq.Socket[bytes], kernel_addr: str) -> None:
        self.name = name
        self.client = client
        self.kernel_addr = kernel_addr
        self.kernel: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.cut = False  # libzmq cut the kernel's connection; notice on the next connect


class Relay:
    """The relay of one kernel start (see the module docstring): ``start`` binds the
    client's sockets and runs the loop in a daemon thread; ``close`` (blocking: the
    provisioner calls it in a thread) stops it and closes every socket."""

    def __init__(
        self,
        kernel_info: dict[str, Any],
        client_info: dict[str, Any],
        limits: OutputLimits,
        log: logging.Logger | Any,
        name: str = "kernel",
    ) -> None:
        self.kernel_info, self.client_info = kernel_info, client_info
        self.limits = limits
        self.log = log
        self.name = name
        key = kernel_info["key"]
        self.guard = OutputGuard(
            limits,
            Session(
                key=key.encode() if isinstance(key, str) else key,
                signature_scheme=kernel_info.get("signature_scheme", "hmac-sha256"),
                username="sandbox-kernel",
            ),
        )
        self.context = zmq.Context(io_threads=1)
        self._stop_addr = f"inproc://relay-stop-{id(self)}"
        self._stop_rx = self.context.socket(zmq.PAIR)
        self._stop_rx.bind(self._stop_addr)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @staticmethod
    def address(info: dict[str, Any], channel: str) -> str:
        """The ZMQ address of ``channel`` in connection info ``info``."""
        port = info[f"{channel}_port"]
        if info.get("transport", "tcp") == "ipc":
            return f"ipc://{info['ip']}-{port}"
        return f"tcp://{info['ip']}:{port}"

    def start(self) -> None:
        """Bind the client's sockets and start relaying (called by the provisioner's
        ``pre_launch`` once both connection files are written)."""
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.name}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread and close the sockets (blocking, bounded by a few seconds)."""
        if self._thread is not None:
            tx = self.context.socket(zmq.PAIR)
            tx.connect(self._stop_addr)
            tx.send(b"stop")
            self._thread.join(5)
            tx.close(linger=0)
            self._thread = None
        self._stop_rx.close(linger=0)
        self.context.destroy(linger=0)
        if self.guard.dropped:
            self.log.info(
                "kernel %s: the relay dropped %d message(s)", self.name, self.guard.dropped
            )

    # ---- the thread ---------------------------------------------------------------------------
    def _socket(self, kind: int, depth: int = QUEUE_DEPTH) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, depth)
        sock.setsockopt(zmq.RCVHWM, depth)
        return sock

    def _connect_kernel(self, ch: _Channel) -> None:
        kind = {"iopub": zmq.SUB, "hb": zmq.DEALER}.get(ch.name, zmq.DEALER)
        sock = self._socket(kind)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_size * HARD_FACTOR + MiB)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
        if ch.name == "iopub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        elif ch.name != "hb":
            sock.setsockopt(zmq.IDENTITY, RELAY_IDENTITY)
        ch.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(ch.kernel_addr)
        ch.kernel = sock

    def _drop_kernel(self, ch: _Channel) -> None:
        if ch.kernel is not None:
            ch.kernel.disable_monitor()
            ch.kernel.close(linger=0)
        if ch.monitor is not None:
            ch.monitor.close(linger=0)
        ch.kernel = ch.monitor = None

    def _setup(self) -> list[_Channel]:
        channels = []
        for name in CHANNELS:
            client = self._socket(zmq.PUB if name == "iopub" else zmq.ROUTER, CLIENT_QUEUE_DEPTH)
            client.bind(self.address(self.client_info, name))
            ch = _Channel(name, client, self.address(self.kernel_info, name))
            self._connect_kernel(ch)
            channels.append(ch)
        return channels

    def _run(self) -> None:
        try:
            channels = self._setup()
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(channels)
        except Exception:
            self.log.exception("kernel %s: the output relay failed", self.name)
        finally:
            for ch in channels:
                self._drop_kernel(ch)
                ch.client.close(linger=0)

    def _loop(self, channels: list[_Channel]) -> None:
        iopub = next(ch for ch in channels if ch.name == "iopub")
        while True:
            poller = zmq.Poller()
            poller.register(self._stop_rx, zmq.POLLIN)
            for ch in channels:
                if ch.name != "iopub":  # a PUB socket receives nothing
                    poller.register(ch.client, zmq.POLLIN)
                poller.register(ch.kernel, zmq.POLLIN)
                poller.register(ch.monitor, zmq.POLLIN)
            rebuilt = False
            while not rebuilt:
                ready = dict(poller.poll())
                if self._stop_rx in ready:
                    return
                for ch in channels:
                    if ch.monitor in ready and self._monitor(ch, iopub):
                        rebuilt = True
                        continue
                    if ch.kernel in ready:
                        self._from_kernel(ch, iopub)
                    if ch.client in ready:
                        self._from_client(ch)

    def _monitor(self, ch: _Channel, iopub: _Channel) -> bool:
        """Handle the kernel socket's events; True when it was rebuilt (a disconnect: libzmq
        does not reconnect a connection it cut for a too-large frame)."""
        assert ch.monitor is not None
        while ch.monitor.poll(0):
            event = recv_monitor_message(ch.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._drop_kernel(ch)
                self._connect_kernel(ch)
                ch.cut = True
                return True
            if event == zmq.EVENT_CONNECTED and ch.cut:
                ch.cut = False
                self._send(iopub.client, self.guard.reset_notice())
        return False

    def _from_kernel(self, ch: _Channel, iopub: _Channel) -> None:
        assert ch.kernel is not None
        for _ in range(QUEUE_DEPTH):
            try:
                frames = ch.kernel.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            forward, notices = self.guard.admit(ch.name, frames)
            for notice in notices:
                self._send(iopub.client, notice)
            if forward:
                self._send(ch.client, frames)

    def _from_client(self, ch: _Channel) -> None:
        assert ch.kernel is not None
        for _ in range(QUEUE_DEPTH):
            try:
                frames = ch.client.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(ch.kernel, frames)

    def _send(self, sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # that side's queue is full: the message is dropped
            self.guard.dropped += 1
