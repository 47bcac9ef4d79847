"""The warm pool: sandbox kernels started and initialised before they are asked for.

Layer: Jupyter (no traitlets or jupyter_client here; the provisioner is the only caller).
One ``Pool`` per server process (``POOL``). A member is a container made exactly as the
kernel's would be, from the same ``ContainerSpec``, but for three fields:

* its command runs ``magics/sandbox_pool.py`` (the kernel initialised, waiting for its
  session) in place of ``-m ipykernel_launcher``;
* its connection file holds a placeholder key, made here and never given to anyone;
* its id (and hostname) is its own; a kernel that claims it takes that id.

Everything else is fixed when a container starts (the notebook folder, mounted at its own
path and the working directory; the uid; the environment; the limits; the image), so
members are kept per *key*: the kernel's spec with those three fields blanked
(``pool_key``). A start whose key has a ready member claims it (``claim``), hands it the
session's connection file over the member's standard input, a unix socket only the pool
holds (``hand_over``), and so gets a kernel whose key only this session knows. The pool
then makes a new member for that key in the background, one container at a time.

A member that ends while idle is logged, removed and replaced (a key whose members keep
failing stops being refilled); the server's exit destroys every member (``close``), a
SIGKILLed server's members are the leftovers ``gc`` removes (their owner is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import SandboxError
from ..paths import new_container_id
from ..runtime.container import Container
from ..runtime.rundir import META_POOL
from ..runtime.spec import ContainerSpec
from .exits import EndWatch, unwatch_end, watch_end

log = logging.getLogger(__name__)

#: The member's program, in the magics folder the kernel's container mounts.
LAUNCHER = "sandbox_pool.py"
#: Seconds a new member may take to say ``ready`` (its kernel's imports and start).
READY_TIMEOUT = 120.0
#: Seconds a claimed member may take to take its session's key.
CLAIM_TIMEOUT = 10.0
#: Members of one key that ended before being claimed, in a row, after which the key is
#: not refilled for RETRY_AFTER seconds (a broken image must not make the pool start
#: containers forever).
MAX_FAILURES = 3
RETRY_AFTER = 600.0


#: A folder's identity: its device and inode numbers.
FolderId = tuple[int, int]


def folder_id(path: str) -> FolderId | None:
    """The identity of folder ``path`` (None when it cannot be read): a member's notebook
    folder is the same folder only while this is the same. Blocking (a stat): in a thread."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pool_key(spec: ContainerSpec) -> ContainerSpec:
    """The key a kernel's container spec is pooled under: the spec without what differs
    between two starts of one kernelspec in one folder (the id, the hostname, the
    connection file). Called by the provisioner at each first start of a kernel."""
    return replace(spec, id="", hostname="", files=())


def member_command(argv: tuple[str, ...], magics_dir: str) -> tuple[str, ...] | None:
    """The member's command for kernel command ``argv``, or None when the kernel cannot be
    pooled: only ``PYTHON -m ipykernel_launcher -f FILE ...`` (the form of the product's
    kernelspecs) runs under the launcher, which does what ipykernel_launcher does."""
    if len(argv) < 5 or argv[1:3] != ("-m", "ipykernel_launcher") or argv[3] != "-f":
        return None
    return (argv[0], f"{magics_dir}/{LAUNCHER}", *argv[3:])


def placeholder_connection(connection: str) -> str:
    """The member's connection file: the session's (``connection``, JSON) with a key made
    here, which the member drops at its claim, and no session name."""
    info = json.loads(connection)
    info["key"] = secrets.token_hex(32)
    info["jupyter_session"] = ""
    return json.dumps(info)


@dataclass(frozen=True)
class Want:
    """What the pool keeps for one key: up to ``size`` members (``size`` is per
    kernelspec: all its folders together), each made by ``make`` (a spec with the given
    id, the meta.json fields, the run dir subfolders), while ``room()`` allows one more
    (the user's kernel count; called in a thread). Given by the provisioner after each
    first start of a pooled kernelspec; the latest of a kernelspec is the one refilled."""

    size: int
    kernelspec: str
    make: Callable[[str], tuple[ContainerSpec, dict[str, object], dict[str, tuple[int, int, int]]]]
    room: Callable[[], bool] = lambda: True
    asked: float = field(default_factory=time.monotonic)


@dataclass
class Member:
    """One idle sandbox of the pool, its kernel initialised and waiting for a session."""

    container: Container
    sock: socket.socket  # the pool's end of the member's standard input
    key: ContainerSpec
    kernelspec: str
    made: float = field(default_factory=time.monotonic)
    watch: EndWatch | None = None  # its end watched on the event loop while idle
    folder: FolderId | None = None  # its notebook folder's identity when it was made

    def alive(self) -> bool:
        """Is the member's process still running? (``Popen.poll``: never blocks.)"""
        proc = self.container.proc
        return proc is not None and proc.poll() is None


class Pool:
    """The members of this server process, per key (see the module docstring). Its
    methods run on the server's event loop; container work goes to threads."""

    def __init__(self) -> None:
        self._members: dict[ContainerSpec, list[Member]] = {}
        self._wants: dict[ContainerSpec, Want] = {}
        #: containers being made (``close`` destroys them too)
        self._making: set[Container] = set()
        #: key -> (members that failed in a row, when the last did)
        self._failures: dict[ContainerSpec, tuple[int, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- what the provisioner calls --------------------------------------------------
    def claim(self, key: ContainerSpec, folder: FolderId | None) -> Member | None:
        """A ready member of ``key`` whose notebook folder is still the folder ``folder``
        (``folder_id`` of the key's working directory now), taken out of the pool (its idle
        watch stopped), or None. A member found ended is dropped (logged, destroyed in the
        background); one whose folder was replaced since (removed and made anew, renamed)
        is dropped too: its mount holds the old one."""
        members = self._members.get(key, [])
        while members:
            member = members.pop(0)
            self._unwatch(member)
            if not member.alive():
                self._lost(member)
            elif folder is None or member.folder != folder:
                log.info("pool: member %s let go: its folder was replaced", member.container.id)
                self._soon(_destroy, member)
            else:
                return member
        return None

    def claimed(self, member: Member, *, ok: bool) -> None:
        """How the hand-over of claimed ``member`` went: it took its session (its key's
        members work: failures forgotten), or it refused or did not answer (a failure).
        Called by the provisioner's ``launch_kernel``."""
        if ok:
            self._failures.pop(member.key, None)
        else:
            self._failed(member.key)

    def want(self, key: ContainerSpec, want: Want) -> None:
        """Keep members of ``key`` (the kernelspec's newest want) and start refilling."""
        if self._closed:
            return
        for old in [k for k, w in self._wants.items() if w.kernelspec == want.kernelspec]:
            if old != key and not self._members.get(old):  # no member left to claim there
                del self._wants[old]
                self._failures.pop(old, None)
        self._wants[key] = want
        self._kick()

    def forget(self, kernelspec: str) -> None:
        """No pool for ``kernelspec`` any more (its pool_size is 0 now): let its members
        go."""
        for key in [k for k, w in self._wants.items() if w.kernelspec == kernelspec]:
            del self._wants[key]
        for member in self.idle(kernelspec):
            self._drop(member)

    def idle(self, kernelspec: str | None = None) -> list[Member]:
        """The ready members (of ``kernelspec``, or all)."""
        return [
            m
            for members in self._members.values()
            for m in members
            if kernelspec is None or m.kernelspec == kernelspec
        ]

    async def evict(self, uid: int | None) -> bool:
        """Let the oldest idle member of kernel user ``uid`` (None: any) go and wait until
        it is destroyed, to make room for a cold start within that user's kernel count;
        False when there is none."""
        found = [m for m in self.idle() if uid is None or m.container.spec.user == uid]
        if not found:
            return False
        member = min(found, key=lambda m: m.made)
        self._members[member.key].remove(member)
        self._unwatch(member)
        await asyncio.to_thread(_destroy, member)
        log.info("pool: member %s let go to make room for a kernel", member.container.id)
        return True

    def close(self) -> None:
        """Destroy every member and every container being made, now (blocking;
        idempotent). Called at the server's exit (the provisioner's atexit hook) and by
        the tests."""
        self._closed = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(RuntimeError):
                self._task.cancel()
        for members in list(self._members.values()):
            for member in members:
                self._unwatch(member)
                _destroy(member)
        for container in list(self._making):
            _destroy_container(container)
        self._members.clear()
        self._wants.clear()

    # ---- refilling -------------------------------------------------------------------
    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._refill())

    def _next(self) -> tuple[ContainerSpec, Member | None] | None:
        """The key to make a member for: of each kernelspec, its newest want, while its
        kernelspec has fewer members than its size in all (the oldest member of another
        folder gives way) and it has not failed MAX_FAILURES times in a row lately."""
        newest: dict[str, tuple[ContainerSpec, Want]] = {}
        for key, want in self._wants.items():
            if want.kernelspec not in newest or want.asked > newest[want.kernelspec][1].asked:
                newest[want.kernelspec] = (key, want)
        now = time.monotonic()
        for key, want in newest.values():
            failed, when = self._failures.get(key, (0, 0.0))
            if failed >= MAX_FAILURES and now - when < RETRY_AFTER:
                continue
            if len(self._members.get(key, [])) >= want.size:
                continue
            others = [m for m in self.idle(want.kernelspec) if m.key != key]
            full = len(others) + len(self._members.get(key, [])) >= want.size
            return key, (min(others, key=lambda m: m.made) if full and others else None)
        return None

    async def _refill(self) -> None:
        """Make members one at a time until every kernelspec has its size (bounded: each
        pass adds a member or counts a failure, and a key pauses after MAX_FAILURES
        failures in a row). Where the user's kernel count leaves no room, stop: the next
        kernel start (``want``) looks again."""
        while not self._closed:
            found = self._next()
            if found is None:
                return
            key, gives_way = found
            want = self._wants[key]
            try:
                room = await asyncio.to_thread(want.room)
            except Exception as exc:
                log.warning("pool: cannot count the user's kernels (%s); no member made", exc)
                return
            if not room or self._closed or key not in self._wants:
                return
            if gives_way is not None:  # only once a member can be made in its place
                self._drop(gives_way)
            try:
                member = await self._make(key, want)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(key)
                log.warning("pool: a member of %s could not start (%s)", want.kernelspec, exc)
                continue
            if self._closed or key not in self._wants:
                await asyncio.to_thread(_destroy, member)
                continue
            self._members.setdefault(key, []).append(member)
            self._watch(member)
            log.debug("pool: member %s of %s ready", member.container.id, want.kernelspec)

    def _failed(self, key: ContainerSpec) -> None:
        failed = self._failures.get(key, (0, 0.0))[0] + 1
        self._failures[key] = (failed, time.monotonic())
        if failed == MAX_FAILURES:
            log.warning(
                "pool: %d members in a row failed; none is made for them for %d s",
                failed,
                RETRY_AFTER,
            )

    async def _make(self, key: ContainerSpec, want: Want) -> Member:
        """Create and start one member, wait for its ``ready``, then apply its CPU cap (the
        kernel's start ran uncapped, as a cold one's does; what runs idle is capped)."""
        member_id = new_container_id()
        spec, meta, subdirs = want.make(member_id)
        # before the mount: a folder replaced in between shows as a different one at claim
        folder = await asyncio.to_thread(folder_id, spec.workdir)
        container = await asyncio.to_thread(
            Container.create, spec, meta={**meta, META_POOL: True}, subdirs=subdirs
        )
        self._making.add(container)
        ours: socket.socket | None = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await asyncio.to_thread(
                    container.start, stdin=theirs.fileno(), stdout=None, stderr=None
                )
            finally:
                theirs.close()
            # read on the event loop, not in a thread: the interpreter's exit joins executor
            # threads before the pool's close runs, and a hung member would hold it
            line = await _read_line_async(ours, READY_TIMEOUT)
            if line != "ready":
                raise SandboxError(f"pool member {container.id} said {line!r}, not ready")
            await asyncio.to_thread(container.apply_deferred_cpu)
        except BaseException:
            if ours is not None:
                ours.close()
            await asyncio.to_thread(_destroy_container, container)
            raise
        finally:
            self._making.discard(container)
        return Member(container, ours, key, want.kernelspec, folder=folder)

    # ---- idle members that end -------------------------------------------------------
    def _watch(self, member: Member) -> None:
        proc = member.container.proc
        if proc is not None:  # where it cannot be watched, claim still checks it
            member.watch = watch_end(proc.pid, lambda: self._ended(member))

    def _unwatch(self, member: Member) -> None:
        watch, member.watch = member.watch, None
        unwatch_end(watch)

    def _ended(self, member: Member) -> None:
        """An idle member's process ended: never hand it out; make another."""
        self._unwatch(member)
        members = self._members.get(member.key, [])
        if member in members:
            members.remove(member)
            self._failed(member.key)
            self._lost(member)
            self._kick()

    def _drop(self, member: Member) -> None:
        """Take ``member`` out of the pool and destroy it in the background."""
        members = self._members.get(member.key, [])
        if member in members:
            members.remove(member)
        self._unwatch(member)
        self._soon(_destroy, member)

    def _lost(self, member: Member) -> None:
        self._soon(_destroy_lost, member)

    @staticmethod
    def _soon(fn: Callable[[Member], None], member: Member) -> None:
        try:
            asyncio.get_running_loop().run_in_executor(None, fn, member)
        except RuntimeError:
            fn(member)


def hand_over(member: Member, connection: str) -> None:
    """Give claimed ``member`` its session: the connection file ``connection`` (JSON, with
    the session's key) over its standard input, and wait for its ``ok``; the pool's end of
    the socket is closed either way. Blocking (the provisioner runs it in a thread, in
    ``launch_kernel``); a SandboxError when the member refused or did not answer."""
    line = json.dumps(json.loads(connection), separators=(",", ":"))  # one line
    try:
        member.sock.sendall(line.encode() + b"\n")
        answer = _read_line(member.sock, CLAIM_TIMEOUT)
    except OSError as exc:
        raise SandboxError(f"pool member {member.container.id}: the claim failed: {exc}") from None
    finally:
        member.sock.close()
    if answer != "ok":
        raise SandboxError(f"pool member {member.container.id} refused its claim: {answer!r}")


def _read_line(
    sock: socket.socket,
    timeout: float,
    limit: int = 4096,
    stop: Callable[[], bool] = lambda: False,
) -> str | None:
    """One line from ``sock`` within ``timeout`` seconds (None at end of input, past it, or
    once ``stop()`` is true: it is asked every half second); at most ``limit`` bytes."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or stop():
            return None
        sock.settimeout(min(left, 0.5))
        try:
            chunk = sock.recv(limit - len(data))
        except TimeoutError:
            continue
        if not chunk:
            return None
        data += chunk
    return data.rstrip(b"\n").decode("utf-8", "replace")


async def _read_line_async(sock: socket.socket, timeout: float, limit: int = 4096) -> str | None:
    """``_read_line`` on the event loop: one line from ``sock`` within ``timeout`` seconds
    (None at end of input or past it), at most ``limit`` bytes; cancelled with the refill
    task (``Pool.close``). The socket is left blocking again for ``hand_over``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = b""
    sock.setblocking(False)
    try:
        while b"\n" not in data and len(data) < limit:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, limit - len(data)), left)
            except asyncio.TimeoutError:  # (not yet the builtin TimeoutError on 3.10)
                return None
            if not chunk:
                return None
            data += chunk
    finally:
        sock.setblocking(True)
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _destroy(member: Member) -> None:
    with contextlib.suppress(OSError):
        member.sock.close()
    _destroy_container(member.container)


def _destroy_container(container: Container) -> None:
    try:
        container.destroy()
    except Exception as exc:
        log.warning("pool: member %s: %s", container.id, exc)


def _destroy_lost(member: Member) -> None:
    """Log why an idle member ended (reading its end may wait on its status pipe: in a
    thread), and destroy it."""
    try:
        result = member.container.poll()
        why = result.reason() if result is not None else "it ended"
    except Exception as exc:
        why = f"its end could not be read: {exc}"
    try:
        log.warning(
            "pool: idle member %s of %s ended (%s); it is replaced",
            member.container.id,
            member.kernelspec,
            why,
        )
    finally:
        _destroy(member)


#: The pool of this server process.
POOL = Pool()
