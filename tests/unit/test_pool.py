"""The warm pool without containers: what a key ignores, which kernels can be pooled, the
claim protocol of the member's program, and the pool's bookkeeping (a dead member never
handed out, a failing key no longer refilled, the user's kernel count)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.jupyter import pool as pool_mod
from sandbox_kernel.magics import sandbox_pool
from sandbox_kernel.runtime.spec import ContainerSpec

CONN = {
    "transport": "ipc",
    "ip": "/run/sandbox/k",
    "shell_port": 1,
    "iopub_port": 2,
    "stdin_port": 3,
    "control_port": 4,
    "hb_port": 5,
    "key": "the-session-key",
    "signature_scheme": "hmac-sha256",
    "jupyter_session": "nb.ipynb",
}
ARGV = ("/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "/run/sandbox/kernel.json")


def _spec(**changes: Any) -> ContainerSpec:
    base = ContainerSpec(
        id="sk-000000000001",
        layers=("/img",),
        command=(*ARGV, "--ext=sandbox_magics"),
        hostname="sk-000000000001",
        files=(("/run/sandbox/kernel.json", 0o644, json.dumps(CONN)),),
        user=1000,
        group=1000,
        workdir="/home/a",
    )
    return replace(base, **changes)


def test_the_key_ignores_only_what_differs_between_two_starts() -> None:
    a = _spec()
    b = _spec(id="sk-000000000002", hostname="sk-000000000002", files=())
    assert pool_mod.pool_key(a) == pool_mod.pool_key(b)
    assert hash(pool_mod.pool_key(a)) == hash(pool_mod.pool_key(b))
    for other in (_spec(workdir="/home/b"), _spec(user=1001), _spec(env=(("A", "1"),))):
        assert pool_mod.pool_key(other) != pool_mod.pool_key(a)


def test_only_ipykernel_launcher_commands_are_pooled() -> None:
    cmd = pool_mod.member_command((*ARGV, "--ext=sandbox_magics"), "/opt/m")
    assert cmd == ("/usr/bin/python3", "/opt/m/sandbox_pool.py", *ARGV[3:], "--ext=sandbox_magics")
    assert pool_mod.member_command(("/usr/bin/python3", "-m", "other", "-f", "x"), "/m") is None
    assert pool_mod.member_command(("/bin/kernel", "-f", "x"), "/m") is None


def test_the_placeholder_key_is_new_and_the_rest_the_same() -> None:
    placeholder = json.loads(pool_mod.placeholder_connection(json.dumps(CONN)))
    again = json.loads(pool_mod.placeholder_connection(json.dumps(CONN)))
    assert placeholder["key"] not in (CONN["key"], again["key"]) and len(placeholder["key"]) == 64
    assert placeholder["jupyter_session"] == ""
    assert {k: v for k, v in placeholder.items() if k not in ("key", "jupyter_session")} == {
        k: v for k, v in CONN.items() if k not in ("key", "jupyter_session")
    }


def test_the_member_program_checks_its_claim(tmp_path: Path) -> None:
    current = dict(CONN, key="placeholder")
    assert sandbox_pool.check_claim(current, dict(CONN)) is None
    assert sandbox_pool.check_claim(current, dict(CONN, key="")) == "no key"
    assert sandbox_pool.check_claim(current, dict(CONN, shell_port=9)) == "shell_port differs"
    assert sandbox_pool.check_claim(current, dict(CONN, ip="/tmp/x")) == "ip differs"
    path = tmp_path / "kernel.json"
    sandbox_pool.write_connection(str(path), CONN)
    assert json.loads(path.read_text()) == CONN and path.stat().st_mode & 0o777 == 0o600


class FakeSession:
    key = b"placeholder"


class FakeApp:
    session = FakeSession()


def test_a_claim_over_the_socket(tmp_path: Path) -> None:
    """The member's claim thread and ``hand_over`` against each other: ready, the claim,
    ok; the key is the session's, the file rewritten."""
    path = tmp_path / "kernel.json"
    path.write_text(json.dumps(dict(CONN, key="placeholder")))
    ours, theirs = socket.socketpair()
    app = FakeApp()
    thread = threading.Thread(target=sandbox_pool.serve_claim, args=(app, theirs, str(path)))
    thread.start()
    assert pool_mod._read_line(ours, 5) == "ready"

    class M:
        sock = ours
        container = type("C", (), {"id": "sk-000000000001"})()

    pool_mod.hand_over(M, json.dumps(CONN))  # type: ignore[arg-type]
    thread.join(5)
    assert app.session.key == b"the-session-key"
    assert json.loads(path.read_text())["key"] == "the-session-key"
    assert ours.fileno() == -1  # closed by hand_over


def test_a_claim_line_is_bounded() -> None:
    ours, theirs = socket.socketpair()
    ours.sendall(b"x" * (sandbox_pool.MAX_CLAIM + 10))
    with pytest.raises(ValueError, match="larger than"):
        sandbox_pool.read_line(theirs)
    a, b = socket.socketpair()
    a.sendall(b"partial")
    a.close()
    assert sandbox_pool.read_line(b) is None  # end of input before a whole line


# ---- the pool's bookkeeping, with fake members ---------------------------------------------
class FakeContainer:
    def __init__(self, cid: str, user: int = 1000) -> None:
        self.id = cid
        self.spec = _spec(user=user)
        self.ended = False
        self.destroyed = False

    @property
    def proc(self) -> Any:
        ended = self.ended
        return type("P", (), {"poll": lambda self: 1 if ended else None, "pid": 0})()

    def poll(self) -> Any:
        return type("R", (), {"reason": lambda self: "killed by SIGKILL"})() if self.ended else None

    def destroy(self) -> None:
        self.destroyed = True


FOLDER = (1, 42)


def _member(key: ContainerSpec, cid: str, user: int = 1000) -> pool_mod.Member:
    a, _ = socket.socketpair()
    return pool_mod.Member(
        FakeContainer(cid, user),  # type: ignore[arg-type]
        a,
        key,
        "k",
        folder=FOLDER,
    )


async def test_a_dead_member_is_never_handed_out() -> None:
    pool = pool_mod.Pool()
    key = pool_mod.pool_key(_spec())
    dead, alive = _member(key, "sk-dead"), _member(key, "sk-alive")
    dead.container.ended = True  # type: ignore[attr-defined]
    pool._members[key] = [dead, alive]
    assert pool.claim(key, FOLDER) is alive
    assert pool.claim(key, FOLDER) is None
    await asyncio.sleep(0.1)
    assert dead.container.destroyed  # type: ignore[attr-defined]
    # a folder made anew under the same path: the member's mount holds the old one
    stale = _member(key, "sk-stale")
    pool._members[key] = [stale]
    assert pool.claim(key, (1, 43)) is None
    await asyncio.sleep(0.1)
    assert stale.container.destroyed  # type: ignore[attr-defined]
    assert pool_mod.folder_id("/") is not None and pool_mod.folder_id("/nonexistent") is None


async def test_refilling_stops_after_failures_and_keeps_to_the_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = pool_mod.Pool()
    key = pool_mod.pool_key(_spec())
    tries: list[str] = []

    async def failing(self: pool_mod.Pool, k: ContainerSpec, want: pool_mod.Want) -> Any:
        tries.append("x")
        raise OSError("broken image")

    monkeypatch.setattr(pool_mod.Pool, "_make", failing)
    pool.want(key, pool_mod.Want(2, "k", lambda mid: (_spec(), {}, {})))
    assert pool._task is not None
    await asyncio.wait_for(pool._task, 5)
    assert len(tries) == pool_mod.MAX_FAILURES

    made: list[str] = []

    async def making(self: pool_mod.Pool, k: ContainerSpec, want: pool_mod.Want) -> Any:
        made.append("x")
        return _member(k, f"sk-{len(made)}")

    monkeypatch.setattr(pool_mod.Pool, "_make", making)
    other = pool_mod.pool_key(_spec(workdir="/home/b"))
    room = iter([True, False])
    pool.want(other, pool_mod.Want(3, "k", lambda mid: (_spec(), {}, {}), room=lambda: next(room)))
    assert pool._task is not None
    await asyncio.wait_for(pool._task, 5)
    assert len(made) == 1 and len(pool.idle()) == 1  # no room for a second


async def test_evict_lets_the_oldest_member_of_that_user_go() -> None:
    pool = pool_mod.Pool()
    key = pool_mod.pool_key(_spec())
    old, new, theirs = _member(key, "sk-a"), _member(key, "sk-b"), _member(key, "sk-c", user=7)
    pool._members[key] = [old, new, theirs]
    assert await pool.evict(1000)
    assert old.container.destroyed and not new.container.destroyed  # type: ignore[attr-defined]
    assert not await pool.evict(42)
    assert await pool.evict(None)  # rootless: any member of the server's user
    assert theirs.container.destroyed or new.container.destroyed  # type: ignore[attr-defined]
    pool.close()
    assert pool.idle() == [] and new.container.destroyed  # type: ignore[attr-defined]


async def test_a_kernelspecs_size_bounds_all_its_folders_together() -> None:
    """pool_size is per kernelspec: the newest folder's want is filled, the oldest member
    of another folder giving way; an older want is not refilled."""
    pool = pool_mod.Pool()
    a, b = pool_mod.pool_key(_spec(workdir="/home/a")), pool_mod.pool_key(_spec(workdir="/b"))
    old = _member(a, "sk-a")
    pool._members[a] = [old]

    def make(mid: str) -> Any:
        return (_spec(), {}, {})

    pool._wants[a] = pool_mod.Want(1, "k", make, asked=1.0)
    assert pool._next() is None  # a has its one member
    pool._wants[b] = pool_mod.Want(1, "k", make, asked=2.0)
    assert pool._next() == (b, old)  # b is made, a's member gives way
    # another kernelspec's pool is its own
    other = pool_mod.pool_key(_spec(user=5))
    pool._wants[other] = pool_mod.Want(1, "other", make, asked=0.5)
    assert pool._next() in ((b, old), (other, None))


async def test_ready_is_read_on_the_event_loop_bounded_and_cancellable() -> None:
    a, b = socket.socketpair()
    try:
        b.sendall(b"rea")
        reading = asyncio.ensure_future(pool_mod._read_line_async(a, 5))
        await asyncio.sleep(0.05)
        assert not reading.done()  # half a line: still waiting, and the loop runs on
        b.sendall(b"dy\nmore")
        assert await reading == "ready"
        assert a.getblocking()  # left blocking for hand_over
        assert await pool_mod._read_line_async(a, 0.1) is None  # no newline in time
        waiting = asyncio.ensure_future(pool_mod._read_line_async(a, 60))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the pool's close cancels its refill task
        with pytest.raises(asyncio.CancelledError):
            await waiting
        b.close()
        assert await pool_mod._read_line_async(a, 5) is None  # end of input
    finally:
        a.close()
