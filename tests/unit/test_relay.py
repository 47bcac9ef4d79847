"""The output relay's limits (sandbox_kernel.jupyter.relay): what a kernel sends to Jupyter.

``OutputGuard`` on its own with a fake clock (sizes, rates, the notices and their parent),
then the relay between a host ipykernel (not sandboxed: these tests run nothing hostile)
and a jupyter_client client, over ipc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

from sandbox_kernel.jupyter import relay
from sandbox_kernel.jupyter.relay import OutputGuard, OutputLimits, RateLimiter

KEY = b"relay-test-key"
MiB = 1024**2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def kernel_message(
    session: Session, msg_type: str, content: dict[str, Any], parent: dict[str, Any]
) -> list[bytes]:
    """The wire frames of an iopub message as a kernel sends it (topic first)."""
    msg = session.msg(msg_type, content=content, parent=parent)
    return session.serialize(msg, ident=[b"kernel.x." + msg_type.encode()])


def read_notice(frames: list[bytes]) -> dict[str, Any]:
    """A notice as a client reads it: its signature must verify with the kernel's key."""
    reader = Session(key=KEY)
    _, msg_frames = reader.feed_identities(frames)
    return reader.deserialize(msg_frames)


@pytest.fixture
def guard() -> tuple[OutputGuard, Clock, Session]:
    clock = Clock()
    limits = OutputLimits(max_message_size=1 * MiB, msg_rate=10, data_rate=2 * MiB, window=1)
    return OutputGuard(limits, Session(key=KEY), clock=clock), clock, Session(key=KEY)


def test_a_message_over_the_size_limit_is_replaced_by_a_notice_in_its_cell(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("execute_request")
    big = kernel_message(kernel, "stream", {"name": "stdout", "text": "x" * (3 * MiB)}, cell)
    forward, notices = g.admit("iopub", big)
    assert not forward and len(notices) == 1
    notice = read_notice(notices[0])
    assert notice["msg_type"] == "stream" and notice["content"]["name"] == "stderr"
    text = notice["content"]["text"]
    assert "output dropped" in text and "exceeds the 1 MiB limit" in text and "3 MiB" in text
    assert notice["parent_header"]["msg_id"] == cell["msg_id"]
    small = kernel_message(kernel, "stream", {"name": "stdout", "text": "ok"}, cell)
    assert g.admit("iopub", small) == (True, [])


def test_an_oversized_reply_on_shell_is_dropped_with_a_notice_on_iopub(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("inspect_request")
    msg = kernel.msg("inspect_reply", content={"data": "y" * (2 * MiB)}, parent=cell)
    frames = kernel.serialize(msg, ident=[b"client-id"])
    forward, notices = g.admit("shell", frames)
    assert not forward
    assert read_notice(notices[0])["parent_header"]["msg_id"] == cell["msg_id"]


def test_a_flood_is_throttled_with_one_notice_then_resumes_with_the_count(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, clock, kernel = guard
    cell = kernel.msg_header("execute_request")
    line = kernel_message(kernel, "stream", {"name": "stdout", "text": "line\n"}, cell)
    results = [g.admit("iopub", line) for _ in range(25)]
    passed = [fwd for fwd, _ in results]
    assert passed[:10] == [True] * 10 and not any(passed[10:])  # 10 messages/s over 1 s
    notices = [n for _, ns in results for n in ns]
    assert len(notices) == 1  # one notice for the whole flood
    throttled = read_notice(notices[0])
    assert "output throttled" in throttled["content"]["text"]
    assert "10 messages/s or 2 MiB/s" in throttled["content"]["text"]
    assert throttled["parent_header"]["msg_id"] == cell["msg_id"]
    clock.now += 1.0  # the bucket refills
    forward, notices = g.admit("iopub", line)
    assert forward and len(notices) == 1
    resumed = read_notice(notices[0])["content"]["text"]
    assert "output resumed: 15 message(s)" in resumed


def test_bytes_are_limited_too(guard: tuple[OutputGuard, Clock, Session]) -> None:
    g, clock, kernel = guard
    cell = kernel.msg_header("execute_request")
    chunk = kernel_message(kernel, "stream", {"name": "stdout", "text": "z" * (MiB - 4096)}, cell)
    assert [g.admit("iopub", chunk)[0] for _ in range(3)] == [True, True, False]
    clock.now += 0.6  # 0.6 s at 2 MiB/s refills more than one chunk
    assert g.admit("iopub", chunk)[0]


def test_an_output_flood_does_not_drop_the_status_that_ends_the_cell(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("execute_request")
    line = kernel_message(kernel, "stream", {"name": "stdout", "text": "line\n"}, cell)
    for _ in range(50):
        g.admit("iopub", line)
    idle = kernel_message(kernel, "status", {"execution_state": "idle"}, cell)
    assert g.admit("iopub", idle)[0]


def test_a_notice_without_parent_goes_to_the_cell_that_ran_last(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("execute_request")
    g.admit("iopub", kernel_message(kernel, "status", {"execution_state": "busy"}, cell))
    orphan = kernel_message(kernel, "stream", {"name": "stdout", "text": "x" * (2 * MiB)}, {})
    _, notices = g.admit("iopub", orphan)
    assert read_notice(notices[0])["parent_header"]["msg_id"] == cell["msg_id"]
    reset = read_notice(g.reset_notice())
    assert "far over the 1 MiB limit" in reset["content"]["text"]
    assert reset["parent_header"]["msg_id"] == cell["msg_id"]


def test_garbage_from_the_kernel_is_judged_by_size_only(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, _ = guard
    assert g.admit("iopub", [b"no", b"delimiter"])[0]
    forward, notices = g.admit("iopub", [b"t", b"<IDS|MSG>", b"sig", b"{bad", b"[]", b"", b""])
    assert forward and not notices
    forward, notices = g.admit("iopub", [b"x" * (2 * MiB)])
    assert not forward and read_notice(notices[0])["parent_header"] == {}
    assert not g.admit("hb", [b"p" * (relay.MAX_HEADER + 1)])[0]


def test_zero_turns_a_rate_off() -> None:
    limiter = RateLimiter(0, 0, 3.0, floor=MiB)
    assert all(limiter.admit(10 * MiB, float(t)) for t in range(1000))
    assert OutputLimits(msg_rate=0, data_rate=MiB).describe_rates() == "1 MiB/s"


def test_the_byte_bucket_holds_at_least_one_largest_message() -> None:
    limiter = RateLimiter(0, 1024, 1.0, floor=4 * MiB)
    assert limiter.admit(4 * MiB, 0.0)
    assert not limiter.admit(1, 0.0)


# ---- the relay between a real (host) ipykernel and a client ---------------------------------


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[BlockingKernelClient]:
    """An ipykernel on the host bound in ``k/``, the relay serving ``c/`` with small limits,
    and a started client of ``c/``."""
    kdir, cdir = tmp_path / "k", tmp_path / "c"
    kdir.mkdir()
    cdir.mkdir()
    cfile, info = write_connection_file(
        str(cdir / "kernel.json"), ip=str(cdir / "s"), key=KEY, transport="ipc"
    )
    kinfo: dict[str, Any] = {**info, "ip": str(kdir / "s")}
    kfile = str(kdir / "kernel.json")
    ports = {f"{ch}_port": int(info[f"{ch}_port"]) for ch in relay.CHANNELS}  # type: ignore[literal-required]
    write_connection_file(kfile, ip=str(kdir / "s"), key=KEY, transport="ipc", **ports)  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", kfile],
        env={**os.environ, "JPY_PARENT_PID": str(os.getpid())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    limits = OutputLimits(max_message_size=1 * MiB, msg_rate=200, data_rate=2 * MiB, window=1)
    r = relay.Relay(kinfo, dict(info), limits, _Log(), name="test")
    r.start()
    client = BlockingKernelClient()
    client.load_connection_file(cfile)
    # no heartbeat channel: without a kernel manager, wait_for_ready takes a heartbeat not
    # yet answered (a kernel slow to start on a loaded machine) for a dead kernel
    client.start_channels(hb=False)
    try:
        client.wait_for_ready(timeout=60)
        assert proc.poll() is None, "the kernel ended"
        yield client
    finally:
        client.stop_channels()
        proc.kill()
        proc.wait()
        r.close()


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)

    def exception(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)

    def warning(self, fmt: str, *args: Any) -> None:
        self.lines.append(fmt % args)


def run_cell(client: BlockingKernelClient, code: str) -> str:
    """Run ``code``, return its stream output (stdout and stderr, in order)."""
    msg_id = client.execute(code)
    out = []
    while True:
        msg = client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def test_relay_passes_ordinary_output_and_replies(relayed: BlockingKernelClient) -> None:
    assert run_cell(relayed, "print(6 * 7)") == "42\n"
    reply = relayed.execute_interactive("x = 1", timeout=30)
    assert reply["content"]["status"] == "ok"


def test_relay_drops_a_large_print_with_a_notice_and_the_kernel_stays_usable(
    relayed: BlockingKernelClient,
) -> None:
    out = run_cell(relayed, "print('x' * (2 * 1024 * 1024))")  # under the hard cut
    assert "output dropped" in out and "exceeds the 1 MiB limit" in out
    assert "x" * 1000 not in out
    assert run_cell(relayed, "print('still here')") == "still here\n"


def test_relay_survives_a_frame_far_over_the_limit(relayed: BlockingKernelClient) -> None:
    # a raw 16 MiB frame on iopub: libzmq cuts the connection before reading it
    code = (
        "from ipykernel.kernelbase import Kernel\n"
        "k = Kernel.instance()\n"
        "k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'b'},"
        " parent=k.get_parent(), buffers=[b'b' * (16 * 1024 * 1024)])\n"
    )
    out = run_cell(relayed, code)
    deadline = time.monotonic() + 30
    while "far over" not in out and time.monotonic() < deadline:
        out += run_cell(relayed, "pass")
    assert "far over the 1 MiB limit" in out
    assert run_cell(relayed, "print('after')").endswith("after\n")


def test_relay_throttles_a_print_loop(relayed: BlockingKernelClient) -> None:
    code = "import sys\nfor i in range(3000):\n    print(i, 'y' * 2000); sys.stdout.flush()\n"
    out = run_cell(relayed, code)
    assert "output throttled" in out
    assert run_cell(relayed, "print('calm')").endswith("calm\n")


def test_relay_forwards_input_requests(relayed: BlockingKernelClient) -> None:
    msg_id = relayed.execute("v = input('name? ')", allow_stdin=True)
    request = relayed.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "name? "
    relayed.input("ada")
    while True:
        reply = relayed.get_shell_msg(timeout=30)
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    assert run_cell(relayed, "print(v)") == "ada\n"
    json.dumps(reply["content"])


def test_frames_count_in_the_size_and_too_many_are_dropped(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("execute_request")
    g.admit("iopub", kernel_message(kernel, "status", {"execution_state": "busy"}, cell))
    forward, notices = g.admit("iopub", [b""] * (relay.MAX_FRAMES + 1))
    assert not forward and "more than 64 frames" in read_notice(notices[0])["content"]["text"]
    assert read_notice(notices[0])["parent_header"]["msg_id"] == cell["msg_id"]
    # within the frame count, each frame still costs its overhead in the size limit
    limits = OutputLimits(max_message_size=relay.MIN_MESSAGE_SIZE, msg_rate=0, data_rate=0)
    small = OutputGuard(limits, Session(key=KEY))
    payload = relay.MIN_MESSAGE_SIZE - 10 * relay.FRAME_OVERHEAD
    assert small.admit("iopub", [b"x" * payload] + [b""] * 9)[0]
    assert not small.admit("iopub", [b"x" * payload] + [b""] * 10)[0]


def test_deep_json_in_a_header_is_plain_output(
    guard: tuple[OutputGuard, Clock, Session],
) -> None:
    g, _, _ = guard
    deep = b"[" * 5000 + b"]" * 5000  # under MAX_HEADER, over the parser's recursion limit
    frames = [b"t", b"<IDS|MSG>", b"sig", deep, deep, b"{}", b"{}"]
    assert g.admit("iopub", frames) == (True, [])


def test_headers_are_parsed_only_when_small_and_parents_only_when_needed(
    guard: tuple[OutputGuard, Clock, Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    g, _, kernel = guard
    cell = kernel.msg_header("execute_request")
    parsed: list[bytes] = []
    loads = json.loads

    def spy(data: bytes) -> Any:
        parsed.append(bytes(data))
        return loads(data)

    monkeypatch.setattr(json, "loads", spy)
    frames = kernel_message(kernel, "stream", {"name": "stdout", "text": "ok"}, cell)
    parent = frames[frames.index(b"<IDS|MSG>") + 3]
    assert g.admit("iopub", frames) == (True, [])
    assert parent not in parsed  # forwarded: its parent is not needed
    # a status header padded past 8 KiB is not read: the message counts as output
    msg = kernel.msg("status", content={"execution_state": "idle"}, parent=cell)
    msg["header"]["pad"] = "p" * (8 * 1024)
    padded = kernel.serialize(msg, ident=[b"kernel.x.status"])
    parsed.clear()
    g.admit("iopub", padded)
    assert parsed == [] and g.last_parent == {}


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[tuple[relay.Relay, Any, dict[str, Any], str]]:
    """A relay between sockets this test binds as the kernel's (``k``) and a SUB on the
    client's iopub: (relay, zmq context, kernel info, kernel folder)."""
    import zmq

    (tmp_path / "k").mkdir()
    (tmp_path / "c").mkdir()
    ports = {f"{ch}_port": n for n, ch in enumerate(relay.CHANNELS, 1)}
    base = {"transport": "ipc", "key": KEY.decode(), "signature_scheme": "hmac-sha256", **ports}
    kinfo = {**base, "ip": str(tmp_path / "k" / "s")}
    cinfo = {**base, "ip": str(tmp_path / "c" / "s")}
    ctx = zmq.Context()
    r = relay.Relay(kinfo, cinfo, OutputLimits(), _Log(), name="test")
    try:
        yield r, ctx, cinfo, str(tmp_path / "k")
    finally:
        r.close()
        ctx.destroy(linger=0)


def _iopub_client(ctx: Any, cinfo: dict[str, Any]) -> Any:
    import zmq

    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(relay.Relay.address(cinfo, "iopub"))
    return sub


def test_relay_drops_a_message_of_many_empty_frames(
    bare: tuple[relay.Relay, Any, dict[str, Any], str],
) -> None:
    import zmq

    r, ctx, cinfo, kdir = bare
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{kdir}/s-2")
    r.start()
    sub = _iopub_client(ctx, cinfo)
    # a PUB drops what it sends before a subscriber joined: send until one arrives
    while not sub.poll(50):
        pub.send_multipart([b"hello", b"<IDS|MSG>"])
    while sub.poll(200):
        sub.recv_multipart()
    pub.send_multipart([b""] * 100_000, copy=False)
    pub.send_multipart([b"after", b"<IDS|MSG>"])
    got = []
    while sub.poll(5000):
        got.append(sub.recv_multipart())
        if got[-1][0] == b"after":
            break
    assert all(len(m) <= relay.MAX_FRAMES for m in got)
    assert any(b"more than 64 frames" in m[-1] for m in got)
    assert r.guard.dropped == 1


def test_close_leaves_a_busy_thread_its_context(
    bare: tuple[relay.Relay, Any, dict[str, Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import zmq

    r, ctx, _, kdir = bare
    monkeypatch.setattr(relay, "CLOSE_TIMEOUT_S", 0.1, raising=False)
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{kdir}/s-2")
    entered, release = threading.Event(), threading.Event()
    admit = r.guard.admit

    def stuck(channel: str, frames: Any) -> Any:  # the thread, busy in a message
        entered.set()
        release.wait()
        return admit(channel, frames)

    r.guard.admit = stuck  # type: ignore[method-assign]
    r.start()
    thread = r._thread
    assert thread is not None
    while not entered.wait(0.05):
        pub.send_multipart([b"x", b"<IDS|MSG>"])
    r.close()
    assert thread.is_alive() and not r.context.closed  # not destroyed under the thread
    release.set()
    thread.join()
    assert r.context.closed  # the thread ended it
    assert any("did not stop" in line for line in r.log.lines)


def test_a_kernel_dropping_connections_gets_no_rebuild_storm(
    bare: tuple[relay.Relay, Any, dict[str, Any], str],
) -> None:
    import socket

    r, ctx, cinfo, kdir = bare
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{kdir}/s-1")  # shell: accepted and closed at once, 100 times
    srv.listen(16)
    r.start()
    sub = _iopub_client(ctx, cinfo)
    with srv:
        for _ in range(100):
            conn, _ = srv.accept()
            conn.close()
    notices = 0
    while sub.poll(500):
        sub.recv_multipart()
        notices += 1
    assert notices <= 1
    assert r.rebuilds < 20  # backoff: 10 ms doubling to 2 s between rebuilds
