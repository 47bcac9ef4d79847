"""Rootless ``nat``: a user-mode network stack (slirp4netns) per container, with the
allow-list, the refused counter, the connection cap and the bandwidth caps applied inside
the container's own network namespace.

Layer: network. ``attachment`` gives a ``UserModeAttachment`` to an unprivileged
owner; its interface is ``nat.Attachment``'s. Why slirp4netns and what it cannot do:
docs/network-rootless.md. The steps, while the container's init waits for ``go`` (still
with the owner's credentials, so that the owner may open its namespaces):

1. ``attach`` opens ``/proc/PID/ns/user`` and ``/proc/PID/ns/net`` and keeps them until
   ``detach`` (every later step goes through them, never through a pid);
2. the rules (``firewall.namespace_commands``), put in by ``network.inside`` (a fresh
   Python that joins those namespaces), before any packet can leave;
3. slirp4netns, started by the owner: ``--disable-host-loopback`` (the host's loopback
   services are unreachable), ``--exit-fd`` (it ends when the owner does, even by
   SIGKILL), its seccomp filter (its ``--enable-sandbox`` needs a mount namespace that an
   unprivileged process outside the container cannot make); it makes the tap device
   ``eth0``, the address (the subnet's ``.100``) and the default route (``.2``); its pid
   and start time go to ``net.pid`` in the container's run dir, for gc;
4. the caps (``inside.shape``), when the kernel has a bandwidth.

The subnet's own addresses (the stack's gateway, which stands for the host, and its DNS
forwarder) and the host's own addresses (which the stack reaches as the host itself) are
refused and counted whatever the allow-list says.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PrivilegeError, SandboxError, SpecError
from . import links, nat
from .config import NatConfig, resolve_allow

STACK = "slirp4netns"
TUN = "/dev/net/tun"
#: The pid file of the container's user-mode stack, in its run dir.
PID_FILE = "net.pid"
#: The stack's MTU (its largest: slirp4netns is much faster with big frames).
MTU = 65520
#: How long the stack may take to bring up the tap device, and a request in the namespace.
READY_S = 10.0
REQUEST_S = 20.0
#: The package root put on the helper's path (the same code as the owner's).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_HELPER = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from sandbox_kernel.network import inside; sys.exit(inside.main(sys.argv[2:]))"
)
#: The helper's whole environment.
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
StartTime = Callable[[int], str | None]


def subnet_problem(subnet: str) -> str | None:
    """Why ``subnet`` cannot be the user-mode stack's network (it puts the container at
    the subnet's address 100), or None."""
    if ipaddress.IPv4Network(subnet).prefixlen > 25:
        return (
            f"network_subnet={subnet!r}: a rootless kernel's subnet needs at least 128 "
            "addresses (the user-mode stack puts the kernel at its address 100); give a "
            "/25 or larger, e.g. 10.213.0.0/24"
        )
    return None


def check_host() -> None:
    """PrivilegeError naming what this host lacks for rootless ``nat``, and the fix."""
    if shutil.which(STACK) is None:
        raise PrivilegeError(
            "network 'nat' without root needs slirp4netns (the user-mode network stack): "
            "install the Debian package slirp4netns, or use network 'none'"
        )
    if not os.access(TUN, os.R_OK | os.W_OK):
        raise PrivilegeError(
            f"network 'nat' without root needs {TUN} readable and writable by every user "
            f"(mode 0666, Debian's default): as root, chmod 0666 {TUN}; or use network 'none'"
        )


class UserModeAttachment(nat.Attachment):
    """The rootless ``nat`` network of one container (see the module docstring)."""

    def __init__(
        self, container_id: str, config: NatConfig, run_dir: Path, start_time: StartTime
    ) -> None:
        super().__init__(container_id, config)
        self.run_dir = run_dir
        self._start_time = start_time
        self.deny: tuple[str, ...] = ()
        self._ns: tuple[int, int] | None = None
        self._stack: subprocess.Popen[bytes] | None = None
        self._exit_w: int | None = None

    def reserve(self, owner: int, owner_start: str | None) -> None:
        """Check the host, resolve the allow-list, fix the addresses (every container has
        its own stack, so nothing is shared or leased). Called by ``Container.create``."""
        check_host()
        problem = subnet_problem(self.config.subnet)
        if problem:
            raise SpecError(problem)
        self.allowed = resolve_allow(self.config.allow, nat.resolve_host)
        self.dns = self.config.dns if self.config.dns is not None else nat.host_resolvers()
        net = ipaddress.IPv4Network(self.config.subnet)
        self.deny = (str(net), *links.host_addresses())
        self.lease = nat.Lease(
            str(net.network_address + 100), str(net.network_address + 2), self.name
        )

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request to ``network.inside`` in the container's namespaces."""
        if self._ns is None:
            raise SandboxError(f"container {self.container_id} has no network attached")
        user, net = self._ns
        cmd = [sys.executable, "-I", "-c", _HELPER, _PACKAGE_PARENT, str(user), str(net)]
        try:
            done = subprocess.run(
                cmd,
                input=json.dumps(request).encode(),
                pass_fds=(user, net),
                capture_output=True,
                timeout=REQUEST_S,
                check=False,
                env=_ENV,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(
                f"container {self.container_id}: network {request['op']} in its namespace: {exc}"
            ) from None
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise SandboxError(
                f"container {self.container_id}: network {request['op']} in its namespace: "
                f"{why[-1] if why else f'exit {done.returncode}'}"
            )
        answer = json.loads(done.stdout or b"{}")
        return answer if isinstance(answer, dict) else {}

    def _rules(self, allowed: tuple[tuple[str, int | None], ...], replace: bool) -> None:
        self._request(
            {"op": "rules", "allowed": [list(a) for a in allowed], "dns": list(self.dns),
             "deny": list(self.deny), "replace": replace}
        )  # fmt: skip

    def attach(self, pid: int) -> None:
        """Namespaces opened, rules, the stack, the caps (the module docstring's steps),
        while the container's init ``pid`` waits for ``go``. On failure what was made is
        undone and the error raised. Called by ``Container.start`` on the ``netns`` line."""
        assert self.lease is not None, "reserve() first"
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(user)
                raise
            self._ns = (user, net)
            self._pid = pid
            self._rules(self.allowed, replace=False)
            self._start_stack()
            if self.bandwidth is not None:
                self._request({"op": "shape", "rate": self.bandwidth})
        except BaseException:
            self._stop()
            raise

    def _start_stack(self) -> None:
        assert self._ns is not None and self.lease is not None
        user, net = self._ns
        exit_r, exit_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self._exit_w = exit_w
        log = os.open(
            self.run_dir / "net.log",
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            self._stack = subprocess.Popen(
                [
                    STACK, "--configure", f"--mtu={MTU}", "--disable-host-loopback",
                    f"--cidr={self.config.subnet}", f"--exit-fd={exit_r}",
                    f"--ready-fd={ready_w}", "--enable-seccomp",
                    f"--userns-path=/proc/self/fd/{user}", "--netns-type=path",
                    f"/proc/self/fd/{net}", links.INSIDE_NAME,
                ],
                pass_fds=(exit_r, ready_w, user, net), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        finally:
            for fd in (exit_r, ready_w, log):
                os.close(fd)
        try:
            start = self._start_time(self._stack.pid)
            (self.run_dir / PID_FILE).write_text(f"{self._stack.pid} {start}\n")
            deadline = time.monotonic() + READY_S
            got = b""
            while not got:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                    raise SandboxError(
                        f"container {self.container_id}: {STACK} did not bring the network "
                        f"up in {READY_S:.0f} s{self._stack_log()}"
                    )
                got = os.read(ready_r, 16)
                if not got:
                    raise SandboxError(
                        f"container {self.container_id}: {STACK} ended{self._stack_log()}"
                    )
        finally:
            os.close(ready_r)

    def _stack_log(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.run_dir / "net.log").read_text(errors="replace").strip().splitlines()
            if lines:
                return f": {'; '.join(lines[-4:])}"
        return ""

    def refresh(self) -> bool:
        """As ``nat.Attachment.refresh``, the rules in the container's namespace."""
        if self.lease is None or not any(e.is_name for e in self.config.allow):
            return False
        allowed = resolve_allow(self.config.allow, nat.resolve_host)
        if allowed == self.allowed:
            return False
        self._rules(allowed, replace=True)
        self.allowed = allowed
        return True

    def set_bandwidth(self, rate_bits: int | None) -> None:
        """Change the caps of the running container (both directions)."""
        self._request({"op": "shape", "rate": rate_bits})
        self.bandwidth = rate_bits

    def _stop(self) -> None:
        """The stack killed, the namespaces and the exit fd closed, the pid file gone."""
        if self._stack is not None:
            with contextlib.suppress(ProcessLookupError):
                self._stack.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._stack.wait(10)
            self._stack = None
        for fd in (*(self._ns or ()), *((self._exit_w,) if self._exit_w is not None else ())):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ns = None
        self._exit_w = None
        (self.run_dir / PID_FILE).unlink(missing_ok=True)

    def detach(self) -> None:
        """The stack and everything of ``attach``; idempotent. Called by
        ``Container.destroy`` (and when a create fails after ``reserve``)."""
        self._stop()
        self.lease = None

    def _counters(self) -> dict[str, Any]:
        """As ``nat.Attachment._counters``, read inside the container's namespace."""
        if self._ns is None:
            return {}
        try:
            counted = self._request({"op": "stats"})
        except SandboxError:
            return {}
        return {k: counted[k] for k in ("bytes_in", "bytes_out", "refused") if k in counted}


def attachment(
    container_id: str, config: NatConfig, run_dir: Path, start_time: StartTime
) -> nat.Attachment:
    """The ``nat`` attachment of a new container: the host's veth and table
    (``nat.Attachment``) for a root owner, a user-mode stack in the container's own
    namespace (``UserModeAttachment``) for an unprivileged one. ``start_time(pid)``: a
    process's start time (the stack's pid file). Called by ``Container.create``. (Here, not
    in ``nat``, because this module builds on that one.)"""
    if os.geteuid() == 0:
        return nat.Attachment(container_id, config)
    return UserModeAttachment(container_id, config, run_dir, start_time)


def collect_run_dir(run_dir: Path, alive: nat.Alive, uid: int) -> list[str]:
    """The user-mode stack a dead container's run dir names (``net.pid``: pid and start
    time), killed when it still runs (its exit fd normally ends it with its owner): only a
    process named ``slirp4netns``, of user ``uid`` (the run dir's owner: root's gc never
    kills another user's process on the word of a file a user wrote), started when the file
    says. Called by gc (``runtime.leftovers``) before it removes the run dir; returns what
    it removed."""
    try:
        fd = os.open(run_dir / PID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            fields = f.read(128).decode("ascii", "replace").split()
    except OSError:
        return []
    if len(fields) != 2 or not fields[0].isdigit():
        return []
    pid, start = int(fields[0]), fields[1]
    if not alive(pid, start):
        return []
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            if f.read().strip() != STACK or os.fstat(f.fileno()).st_uid != uid:
                return []
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return []
    return [f"{STACK} {pid}"]
