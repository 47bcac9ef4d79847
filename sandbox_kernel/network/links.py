"""A ``nat`` container's links, with pyroute2: a veth pair, addresses, routes and tbf.

Layer: network. ``nat.Attachment`` is its only caller. The design is a routed point-to-point
link per container (no bridge): the host side ``skn-NAME`` carries the subnet's gateway
address (/32) and a route to the container's address (/32); the container side is ``eth0``
(interface index 2, made directly in the container's network namespace) with the
container's address and a default route to the gateway (on-link). Every host-side
interface is the container's own, so the firewall tells kernels apart by interface, and
no layer-2 path joins two kernels.

The container side is configured from the host before the container's command runs,
through a netlink socket made inside the container's network namespace (a short-lived
thread joins it with setns, as root of the host may, makes the socket, and ends: the
socket stays in that namespace, and no other thread of the caller ever changes
namespace).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

from ..errors import SandboxError

CLONE_NEWNET = 0x40000000
#: The container side's name and interface index (lo is 1 in a fresh namespace).
INSIDE_NAME = "eth0"
INSIDE_INDEX = 2
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
#: tbf's latency bound (how long a packet may wait in the shaper before it is dropped).
TBF_LATENCY = "50ms"


class LinkError(SandboxError):
    """A link of a container could not be made or changed."""


def _iproute(sock: socket.socket | None = None) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(use_socket=sock) if sock is not None else IPRoute()


def netns_socket(pid: int) -> socket.socket:
    """A NETLINK_ROUTE socket in the network namespace of process ``pid`` (made by a
    thread that joins that namespace and then ends). LinkError when it cannot."""
    result: dict[str, Any] = {}

    import ctypes

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["error"] = exc
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = OSError(err, os.strerror(err))
                return
        finally:
            os.close(fd)
        # pyroute2's event loop wants a datagram socket (netlink treats both alike)
        result["sock"] = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )

    thread = threading.Thread(target=make, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "sock" not in result:
        raise LinkError(f"joining the network namespace of process {pid}: {result.get('error')}")
    sock: socket.socket = result["sock"]
    return sock


def _burst(rate_bits: int) -> int:
    """tbf's bucket for ``rate_bits``: 20 ms of traffic, at least 16 KiB (TCP needs a bucket
    well above one packet to reach the rate)."""
    return max(16 * 1024, rate_bits // 8 // 50)


def shape(ipr: Any, index: int, rate_bits: int | None, *, first: bool) -> None:
    """Put (or change, or remove with None) the tbf root qdisc of link ``index``."""
    if rate_bits is None:
        if not first:
            try:
                ipr.tc("del", index=index, handle="1:", root=True)
            except Exception as exc:  # pyroute2's NetlinkError; no qdisc: nothing to remove
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise
        return
    ipr.tc(
        "add" if first else "replace",
        "tbf",
        index=index,
        handle="1:",
        rate=f"{rate_bits}bit",
        burst=_burst(rate_bits),
        latency=TBF_LATENCY,
    )


def create(ifname: str, pid: int, gateway: str, address: str, rate_bits: int | None) -> None:
    """Make the veth pair of the container whose init is ``pid`` and configure both sides
    (addresses, routes, links up, tbf on both sides' egress when ``rate_bits``: the host
    side caps what the kernel downloads, the container side what it sends). LinkError
    naming the interface on failure (the caller removes what was made with ``delete``).
    Called by ``nat.Attachment.attach`` while init waits for ``go``."""
    try:
        with _iproute() as ipr:
            ipr.link(
                "add",
                ifname=ifname,
                kind="veth",
                peer={"ifname": INSIDE_NAME, "net_ns_pid": pid, "index": INSIDE_INDEX},
            )
            index = socket.if_nametoindex(ifname)
            ipr.addr("add", index=index, address=gateway, prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst=f"{address}/32", oif=index, scope=RT_SCOPE_LINK)
            shape(ipr, index, rate_bits, first=True)
        with _iproute(netns_socket(pid)) as inside:
            inside.addr("add", index=INSIDE_INDEX, address=address, prefixlen=32)
            inside.link("set", index=INSIDE_INDEX, state="up")
            inside.route(
                "add", dst="0.0.0.0/0", gateway=gateway, oif=INSIDE_INDEX, flags=RTNH_F_ONLINK
            )
            shape(inside, INSIDE_INDEX, rate_bits, first=True)
    except LinkError:
        raise
    except Exception as exc:
        raise LinkError(f"network link {ifname}: {exc}") from None


def set_rate(ifname: str, pid: int, rate_bits: int | None) -> None:
    """Change the running container's bandwidth cap (both directions; None: uncapped).
    Called by ``nat.Attachment.set_bandwidth`` (a live ``%sandbox bandwidth=`` change)."""
    try:
        with _iproute() as ipr:
            shape(ipr, socket.if_nametoindex(ifname), rate_bits, first=False)
        with _iproute(netns_socket(pid)) as inside:
            shape(inside, INSIDE_INDEX, rate_bits, first=False)
    except LinkError:
        raise
    except Exception as exc:
        raise LinkError(f"network link {ifname}: changing its bandwidth: {exc}") from None


def delete(ifname: str) -> None:
    """Remove the host side ``ifname`` (its peer, address and routes go with it); nothing
    when it is gone already. Called by ``nat.Attachment.detach`` and ``nat.collect``."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return
    try:
        with _iproute() as ipr:
            ipr.link("del", index=index)
    except Exception as exc:
        if getattr(exc, "code", None) != errno.ENODEV:
            raise LinkError(f"removing network link {ifname}: {exc}") from None


def counters(ifname: str) -> tuple[int, int] | None:
    """(bytes the container received, bytes it sent) through host side ``ifname``, from
    the host's sysfs (no netlink); None when the link is gone."""
    base = f"/sys/class/net/{ifname}/statistics"
    try:
        with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
            return int(tx.read()), int(rx.read())
    except (OSError, ValueError):
        return None
