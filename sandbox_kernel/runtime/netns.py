"""Network namespace configuration with pyroute2 (all netlink work goes through it).

Layer: runtime (OS side). ``Container.start`` calls ``configure_none`` when the executor
reports the container's network namespace (status line ``netns PID``).

Mode ``none``: the container's fresh network namespace gets only loopback, brought up
here. The netlink socket is opened by a short-lived thread that has joined the
container's namespace with setns(2); setns only moves the calling thread, so the
caller's own namespace is never changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading

# Imported at module load: pyroute2's package import is heavy (~0.4 s CPU), and it must be
# paid once per process, never on a container's setup path.
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nlmsgerr
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ..errors import RuntimeStartError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


RTM_NEWLINK = 16
NLMSG_ERROR = 2
IFF_UP = 0x1


def _link_up(ifname: str) -> None:
    """Set ``ifname`` up in the calling thread's network namespace (one RTM_NEWLINK, acked).

    pyroute2's message classes encode and decode the netlink messages; a plain socket
    carries them (an IPRoute object costs ~10 ms to build, this costs well under 1 ms).
    """
    index = socket.if_nametoindex(ifname)
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.bind((0, 0))
        sock.send(msg.data)
        reply = sock.recv(65536)
    ack = nlmsgerr(reply)
    ack.decode()
    if ack["header"]["type"] != NLMSG_ERROR:
        raise RuntimeStartError(
            f"unexpected netlink reply type {ack['header']['type']} for {ifname}", stage="network"
        )
    if ack["error"] != 0:
        err = -ack["error"]
        raise OSError(err, f"setting {ifname} up: {os.strerror(err)}")


def _enter(pid: int, kinds: tuple[tuple[str, int], ...]) -> None:
    """setns into the namespaces ``kinds`` ((name, flag), in order) of host process ``pid``."""
    for name, flag in kinds:
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd, flag)
        finally:
            os.close(fd)


def _in_thread(pid: int) -> None:
    """Root: a short-lived thread joins the container's network namespace (setns moves only
    the calling thread) and brings loopback up."""
    result: list[BaseException] = []

    def work() -> None:
        try:
            _enter(pid, (("net", CLONE_NEWNET),))
            _link_up("lo")
        except BaseException as exc:  # reported to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if result:
        raise result[0]


def _in_child(pid: int) -> None:
    """Rootless: joining a network namespace needs CAP_SYS_ADMIN in the caller's own user
    namespace too, which an ordinary user lacks there; so a forked child (one thread, as
    setns into a user namespace requires) joins the container's user namespace first, where
    its owner has every capability, then the network namespace."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        status = 0
        try:
            os.close(r)
            _enter(pid, (("user", CLONE_NEWUSER), ("net", CLONE_NEWNET)))
            _link_up("lo")
        except BaseException as exc:
            os.write(w, str(exc).encode("utf-8", "replace")[:512])
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    try:
        message = os.read(r, 1024).decode("utf-8", "replace")
    finally:
        os.close(r)
        os.waitpid(child, 0)
    if message:
        raise OSError(message)


def configure_none(pid: int) -> None:
    """Bring up loopback (only) in the network namespace of host process ``pid``; any
    failure is a RuntimeStartError (stage ``network``). Called by ``Container.start``."""
    try:
        if os.geteuid() == 0:
            _in_thread(pid)
        else:
            _in_child(pid)
    except RuntimeStartError:
        raise
    except BaseException as exc:
        raise RuntimeStartError(
            f"configuring the network namespace of process {pid} failed: {exc}", stage="network"
        ) from exc
