"""The output relay: what a kernel sends reaches Jupyter only within bounds.

Layer: Jupyter. A kernel's memory cap bounds the kernel, not the process reading its
sockets: a kernel flooding output made an unread client hold gigabytes in its ZMQ receive
queues. So the kernel never talks to Jupyter directly: it binds its sockets in its
connection folder, and a relay owned by the server (a thread of the server's process,
outside the container, where kernel code cannot reach or configure it) connects to them and
serves the client's sockets in a host-only folder. Between the two, every message from the
kernel passes ``OutputGuard``:

* a message larger than ``max_message_size`` is dropped, each frame counted with
  ``FRAME_OVERHEAD`` bytes (a frame far above it makes libzmq cut the connection before it
  is read: ZMQ_MAXMSGSIZE; the relay then rebuilds the socket, with backoff), and so is a
  message of more than ``MAX_FRAMES`` frames, the rest of it unread;
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
#: Header and parent frames longer than this are not parsed (treated as plain output);
#: a heartbeat longer than this is dropped.
MAX_HEADER = 8 * 1024
#: Frames in one message, at most: a Jupyter message is its identities, the delimiter,
#: signature, header, parent, metadata and content, then one frame per buffer; this leaves
#: room for dozens of buffers. A message with more is dropped without reading the rest.
MAX_FRAMES = 64
#: What each frame costs beyond its bytes, charged in the size limit (libzmq's own
#: per-frame record is 64 bytes: a message of empty frames is not free).
FRAME_OVERHEAD = 64
#: iopub messages of the protocol itself: limited apart from output, so that a flood of
#: output never drops the "idle" status that ends a cell.
PROTOCOL_TYPES = frozenset(
    {"status", "execute_input", "clear_output", "comm_open", "comm_close", "iopub_welcome"}
)
#: The identity of the relay's sockets on the kernel's ROUTER sockets (shell, control and
#: stdin share it: the kernel sends input requests to the shell request's sender).
RELAY_IDENTITY = b"sandbox-kernel-relay"
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
#: Seconds before a kernel socket whose connection libzmq cut (a frame far over the size
#: limit: libzmq does not reconnect it) is rebuilt: at once (what the kernel sends until
#: then is lost), then after the first, doubling up to the second, and at once again once
#: a connection lasted the second.
REBUILD_BACKOFF = (0.01, 2.0)
#: Seconds ``Relay.close`` waits for the thread to stop.
CLOSE_TIMEOUT_S = 5.0
#: The relay's retries of a kernel socket that is not there yet (or any more), in ms: the
#: first after RECONNECT_MS, then doubling up to RECONNECT_MAX_MS.
RECONNECT_MS = 5
RECONNECT_MAX_MS = 20
#: Milliseconds the relay's iopub socket keeps a death notice it could not yet deliver
#: when the relay closes (the restart comes right after the notice).
FLUSH_MS = 1000
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
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return {}
    return value if isinstance(value, dict) else {}


class WireMessage:
    """The parts of one Jupyter wire message the guard reads, each parsed only when asked
    (once), and only when small: ``msg_type`` ('' and ``parent`` {} when the frames are
    not a message, or too large to read cheaply). Made by ``OutputGuard.admit``."""

    def __init__(self, frames: Sequence[bytes]) -> None:
        self.frames = frames
        try:
            self.start: int | None = list(frames).index(DELIM)
        except ValueError:
            self.start = None
        if self.start is not None and len(frames) < self.start + 6:
            self.start = None
        self._type: str | None = None
        self._parent: dict[str, Any] | None = None

    @property
    def msg_type(self) -> str:
        """The header's ``msg_type`` (parsed on first use)."""
        if self._type is None:
            start = self.start
            value = _json(self.frames[start + 2]).get("msg_type") if start is not None else None
            self._type = value if isinstance(value, str) else ""
        return self._type

    @property
    def header(self) -> dict[str, Any]:
        """The header ({} when unreadable)."""
        return _json(self.frames[self.start + 2]) if self.start is not None else {}

    @property
    def parent(self) -> dict[str, Any]:
        """The parent header, {} unless it has a string ``msg_id`` (parsed on first use)."""
        if self._parent is None:
            start = self.start
            value = _json(self.frames[start + 3]) if start is not None else {}
            self._parent = value if isinstance(value.get("msg_id"), str) else {}
        return self._parent


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
        #: the header of the last execute_request a client sent (the cell the kernel runs,
        #: or ran last): the parent of a notice about the kernel itself (its death). Taken
        #: from the client's side: a kernel killed at once never sends its "busy"
        self.last_execute: dict[str, Any] = {}
        self.dropped = 0  # messages dropped in all, for the log

    def admit(self, channel: str, frames: Sequence[bytes]) -> tuple[bool, list[list[bytes]]]:
        """(forward it?, notices to send on iopub) for one message from the kernel on
        ``channel``. Called by the relay thread for every message the kernel sends."""
        if len(frames) > MAX_FRAMES:  # the relay reads no more than one frame beyond
            self.dropped += 1
            msg = WireMessage(frames)
            text = (
                f"output dropped: a {msg.msg_type or 'message'} of more than {MAX_FRAMES} "
                "frames (parts), more than a Jupyter message needs"
            )
            return False, [self.notice(text, msg.parent or self.last_parent)]
        size = sum(len(f) for f in frames) + FRAME_OVERHEAD * len(frames)
        if channel == "hb":
            return size <= MAX_HEADER, []
        msg = WireMessage(frames)
        msg_type = msg.msg_type
        if channel == "iopub" and msg_type == "status" and msg.parent:
            self.last_parent = msg.parent
        if size > self.limits.max_message_size:
            parent = msg.parent or self.last_parent
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
                        msg.parent or self.last_parent,
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
                    msg.parent or self.last_parent,
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

    def from_client(self, channel: str, frames: Sequence[bytes]) -> None:
        """Note an execute_request a client sends on shell (``last_execute``). Called by the
        relay thread for each message it passes to the kernel."""
        if channel == "shell":
            msg = WireMessage(frames)
            if msg.msg_type == "execute_request" and isinstance(msg.header.get("msg_id"), str):
                self.last_execute = msg.header

    def kernel_notice(self, text: str) -> list[bytes]:
        """A notice about the kernel itself (``text``: its death), parented to the
        execute_request it runs or ran last (``last_execute``; else the last request it
        answered), so that the cell that was running shows it. Called by the relay thread
        for ``Relay.tell``."""
        return self.notice(text, self.last_execute or self.last_parent)

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
        self.rebuild_at: float | None = None  # disconnected: rebuild then unless reconnected
        self.backoff = 0.0  # the wait before the next rebuild
        self.up_since: float | None = None  # connected since


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
        # notices from other threads (``tell``): their text, pushed into the relay thread
        wake_addr = f"inproc://relay-tell-{id(self)}"
        self._tell_rx = self.context.socket(zmq.PULL)
        self._tell_rx.bind(wake_addr)
        self._tell_tx = self.context.socket(zmq.PUSH)
        self._tell_tx.setsockopt(zmq.SNDHWM, 16)
        self._tell_tx.connect(wake_addr)
        self._tell_lock = threading.Lock()  # callers' threads share _tell_tx
        self._flush = False  # a death notice was sent: close iopub with FLUSH_MS
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = True  # the thread ended (or never started)
        self._orphaned = False  # close gave up waiting: the thread ends the context
        self._last_cut_notice: float | None = None
        self._died = False  # the kernel's death was told (relay thread only)
        self.rebuilds = 0  # kernel sockets rebuilt, for tests and the log

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
        self._done = False
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def tell(self, text: str, kind: str = "death") -> None:
        """Send ``text`` to the notebook as a notice about the kernel (``kind`` "death":
        its death, kept on the iopub socket up to ``FLUSH_MS`` past ``close``), parented to
        the execute_request it ran (``OutputGuard.kernel_notice``). Thread-safe and never
        blocks; a notice told after ``close`` is dropped. Called by the provisioner the
        moment it learns that the kernel ended without being asked to."""
        with self._tell_lock:
            if self._tell_tx.closed:
                return
            try:
                self._tell_tx.send_multipart([kind.encode(), text.encode()], zmq.NOBLOCK)
            except zmq.ZMQError:  # sixteen notices queued, or the relay is gone
                self.guard.dropped += 1

    def close(self) -> None:
        """Stop the thread and close the sockets (blocking, bounded by a few seconds). A
        thread still running then keeps its sockets (libzmq sockets are not thread-safe):
        it closes them and ends the context itself when it stops."""
        if self._thread is not None:
            tx = self.context.socket(zmq.PAIR)
            tx.connect(self._stop_addr)
            tx.send(b"stop")
            self._thread.join(CLOSE_TIMEOUT_S)
            tx.close(linger=0)
            self._thread = None
        with self._tell_lock:
            self._tell_tx.close(linger=0)
        with self._lock:
            self._orphaned = not self._done
        if self._orphaned:
            self.log.warning(
                "kernel %s: the output relay did not stop within %g s; it closes its "
                "sockets when it does",
                self.name,
                CLOSE_TIMEOUT_S,
            )
        else:
            self._close_inproc()
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
        # while the kernel starts, its sockets appear only after its imports: retry every
        # 5 ms, backing off to 20 ms at most (zmq's doubling up to 200 ms made a kernel's
        # readiness visible to Jupyter up to 160 ms late, 60 ms on the median start)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        if ch.name == "iopub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        elif ch.name != "hb":
            sock.setsockopt(zmq.IDENTITY, RELAY_IDENTITY)
        ch.monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
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
            self._end()
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
                flush = self._flush and ch.name == "iopub"
                ch.client.close(linger=FLUSH_MS if flush else 0)
            self._end()

    def _end(self) -> None:
        """The thread's last step: when ``close`` gave up waiting for it, end the context
        (the thread's sockets are closed by then)."""
        with self._lock:
            self._done = True
            orphaned = self._orphaned
        if orphaned:
            self._close_inproc()
            self.context.term()

    def _close_inproc(self) -> None:
        self._stop_rx.close(linger=0)
        self._tell_rx.close(linger=0)
        with self._tell_lock:
            self._tell_tx.close(linger=0)

    def _loop(self, channels: list[_Channel]) -> None:
        """Relay until told to stop; each pass does bounded work (at most ``QUEUE_DEPTH``
        messages per socket, each of at most ``MAX_FRAMES`` + 1 frames read)."""
        iopub = next(ch for ch in channels if ch.name == "iopub")
        while True:
            poller = zmq.Poller()
            poller.register(self._stop_rx, zmq.POLLIN)
            poller.register(self._tell_rx, zmq.POLLIN)
            for ch in channels:
                if ch.kernel is None:  # waiting to be rebuilt; the client's side waits too
                    continue
                if ch.name != "iopub":  # a PUB socket receives nothing
                    poller.register(ch.client, zmq.POLLIN)
                poller.register(ch.kernel, zmq.POLLIN)
                poller.register(ch.monitor, zmq.POLLIN)
            changed = False
            while not changed:
                ready = dict(poller.poll(self._timeout(channels)))
                if self._inproc(ready, iopub):
                    return
                now = time.monotonic()
                for ch in channels:
                    if ch.monitor in ready:
                        self._monitor(ch, iopub, now)
                    if ch.rebuild_at is not None and now >= ch.rebuild_at:
                        self._rebuild(ch)
                        changed = True
                        continue
                    if ch.kernel in ready and self._from_kernel(ch, iopub, now):
                        changed = True
                        continue
                    if ch.client in ready and ch.kernel is not None:
                        self._from_client(ch)

    def _inproc(self, ready: dict[Any, int], iopub: _Channel) -> bool:
        """Send what ``tell`` queued (also when a stop is ready: told before the close was
        asked); True when ``close`` asked the loop to stop."""
        if self._tell_rx in ready or self._stop_rx in ready:
            self._told(iopub)
        return self._stop_rx in ready

    def _told(self, iopub: _Channel) -> None:
        """Send the notices ``tell`` queued (at most a queue's worth per pass)."""
        for _ in range(QUEUE_DEPTH):
            try:
                kind, text = self._tell_rx.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if kind == b"death":
                self._flush = True
                self._died = True  # a connection lost from now on is the death, not a cut
            self._send(iopub.client, self.guard.kernel_notice(text.decode(errors="replace")))

    @staticmethod
    def _timeout(channels: list[_Channel]) -> int | None:
        """Milliseconds until the next rebuild is due (None: none is)."""
        due = [ch.rebuild_at for ch in channels if ch.rebuild_at is not None]
        if not due:
            return None
        return max(0, int((min(due) - time.monotonic()) * 1000) + 1)

    def _schedule_rebuild(self, ch: _Channel, now: float) -> None:
        """The kernel socket lost its connection: rebuild it after the backoff, unless
        libzmq says it reconnects it (an ordinary disconnect, not a cut)."""
        if ch.up_since is not None and now - ch.up_since >= REBUILD_BACKOFF[1]:
            ch.backoff = 0.0  # it had been stable
        ch.up_since = None
        ch.rebuild_at = now + ch.backoff
        ch.backoff = min(REBUILD_BACKOFF[1], max(REBUILD_BACKOFF[0], ch.backoff * 2))

    def _rebuild(self, ch: _Channel) -> None:
        """Make a new kernel socket for ``ch`` (its rebuild was due); the next connect of a
        socket dropped for a lost connection, not by the relay, tells of the cut."""
        ch.cut = ch.kernel is not None
        ch.rebuild_at = None
        self._drop_kernel(ch)
        self._connect_kernel(ch)
        self.rebuilds += 1

    def _monitor(self, ch: _Channel, iopub: _Channel, now: float) -> None:
        """Handle the kernel socket's events: a disconnect schedules a rebuild (libzmq does
        not reconnect a connection it cut for a too-large frame), cancelled when libzmq
        schedules its own reconnect (at once after an ordinary disconnect); a connect tells
        of a cut (at most once per rate window)."""
        assert ch.monitor is not None
        while ch.monitor.poll(0):
            event = recv_monitor_message(ch.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._schedule_rebuild(ch, now)
            elif event == zmq.EVENT_CONNECT_RETRIED:
                ch.rebuild_at = None
            elif event == zmq.EVENT_CONNECTED:
                ch.rebuild_at = None
                ch.up_since = now
                if ch.cut:
                    ch.cut = False
                    if self._died:
                        continue
                    last = self._last_cut_notice
                    if last is None or now - last >= self.limits.window:
                        self._last_cut_notice = now
                        self._send(iopub.client, self.guard.reset_notice())

    def _from_kernel(self, ch: _Channel, iopub: _Channel, now: float) -> bool:
        """Relay what the kernel sent on ``ch``; True when the kernel socket was dropped
        (a message of too many frames: its unread rest goes with the socket)."""
        assert ch.kernel is not None
        for _ in range(QUEUE_DEPTH):
            try:
                frames = self._recv(ch.kernel)
            except zmq.Again:
                return False
            forward, notices = self.guard.admit(ch.name, frames)
            for notice in notices:
                self._send(iopub.client, notice)
            if len(frames) > MAX_FRAMES:
                self._drop_kernel(ch)
                self._schedule_rebuild(ch, now)
                return True
            if forward:
                self._send(ch.client, frames)
        return False

    @staticmethod
    def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
        """One message from the kernel, or its first ``MAX_FRAMES`` + 1 frames when it has
        more (the rest is not read: no Python object is made for it)."""
        parts = [sock.recv(zmq.NOBLOCK, copy=False)]
        while parts[-1].more and len(parts) <= MAX_FRAMES:
            parts.append(sock.recv(zmq.NOBLOCK, copy=False))
        return [part.bytes for part in parts]

    def _from_client(self, ch: _Channel) -> None:
        assert ch.kernel is not None
        for _ in range(QUEUE_DEPTH):
            try:
                frames = ch.client.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.guard.from_client(ch.name, frames)
            self._send(ch.kernel, frames)

    def _send(self, sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # that side's queue is full: the message is dropped
            self.guard.dropped += 1
