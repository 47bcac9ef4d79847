"""A ``nat`` container's links, with pyroute2: a veth pair, addresses, routes and tbf.

Layer: network. ``nat.Attachment`` is its only caller. The design is a routed point-to-point
link per container (no bridge): the host side ``skn-NAME`` carries the subnet's gateway
address (/32) and a route to the container's address (/32); the container side is ``eth0``
(interface index 2, made directly in the container's network namespace) with the
container's address and a default route to the gateway (on-link). Every host-side
interface is the container's own, so the firewall tells kernels apart by interface, and
no layer-2 path joins two kernels.

Every request is built with pyroute2's message classes and sent on a plain netlink socket
(``Requests``). The container side is configured from the host before the container's
command runs,
through a netlink socket made inside the container's network namespace (a short-lived
thread joins it with setns, as root of the host may, makes the socket, and ends: the
socket stays in that namespace, and no other thread of the caller ever changes
namespace).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import SandboxError

_T = TypeVar("_T")

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


_ACK = struct.Struct("=IHHIIi")  # struct nlmsghdr, then nlmsgerr's errno
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 17, 20, 24
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
IFF_UP = 0x1
#: seconds a netlink request may wait for its ack
REPLY_TIMEOUT = 5.0
TC_H_ROOT = 0xFFFFFFFF
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1


def route_socket() -> socket.socket:
    """A NETLINK_ROUTE socket of the caller's network namespace (acks without the request
    echoed back)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    return sock


class Requests:
    """rtnetlink requests built with pyroute2's message classes and sent, one at a time,
    on one socket, each checked against its ack. (pyroute2's own IPRoute costs about a
    millisecond per call in its event loop; a start makes eight of them.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    def __enter__(self) -> Requests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, msg: Any, kind: int, flags: int = 0) -> None:
        """Send ``msg`` (a pyroute2 message) as request ``kind``; OSError with the kernel's
        errno when it refuses."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        self.seq += 1
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        self.sock.settimeout(REPLY_TIMEOUT)  # the kernel answers within the send
        self.sock.send(bytes(msg.data))
        for _ in range(64):  # replies to other requests (none are sent): skipped, bounded
            reply = self.sock.recv(65536)
            try:
                _length, rtype, _flags, seq, _port, error = _ACK.unpack_from(reply)
            except struct.error:
                raise OSError(errno.EPROTO, "a short netlink reply") from None
            if seq == self.seq and rtype == NLMSG_ERROR:
                break
        else:
            raise OSError(errno.EPROTO, "no netlink ack")
        if error:
            raise OSError(-error, os.strerror(-error))

    def link_up(self, index: int) -> None:
        """Set link ``index`` up."""
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

        m = ifinfmsg()
        m["family"], m["index"], m["flags"], m["change"] = 0, index, IFF_UP, IFF_UP
        self.send(m, RTM_NEWLINK)

    def address(self, index: int, address: str) -> None:
        """Give link ``index`` the IPv4 ``address`` (/32)."""
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

        m = ifaddrmsg()
        m["family"], m["prefixlen"], m["index"] = socket.AF_INET, 32, index
        m["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
        self.send(m, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)

    def route(self, index: int, dst: str | None, gateway: str | None = None) -> None:
        """A route to ``dst`` (an address; None: the default route) out of link ``index``,
        on-link through ``gateway`` when given."""
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        m = rtmsg()
        m["family"], m["table"], m["proto"], m["type"] = (
            socket.AF_INET,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            RTN_UNICAST,
        )
        m["dst_len"] = 32 if dst else 0
        m["scope"] = RT_SCOPE_LINK if gateway is None else 0
        m["flags"] = RTNH_F_ONLINK if gateway is not None else 0
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", RT_TABLE_MAIN), ("RTA_OIF", index)]
        if dst:
            attrs.append(("RTA_DST", dst))
        if gateway:
            attrs.append(("RTA_GATEWAY", gateway))
        m["attrs"] = attrs
        self.send(m, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)

    def veth(self, ifname: str, pid: int) -> None:
        """The pair ``ifname`` (here) and ``INSIDE_NAME`` (index ``INSIDE_INDEX``) in the
        network namespace of process ``pid``."""
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

        peer = {
            "index": INSIDE_INDEX,
            "attrs": [("IFLA_IFNAME", INSIDE_NAME), ("IFLA_NET_NS_PID", pid)],
        }
        data = {"attrs": [("VETH_INFO_PEER", peer)]}
        info = {"attrs": [("IFLA_INFO_KIND", "veth"), ("IFLA_INFO_DATA", data)]}
        m = ifinfmsg()
        m["family"], m["index"] = 0, 0
        m["attrs"] = [("IFLA_IFNAME", ifname), ("IFLA_LINKINFO", info)]
        self.send(m, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)

    def delete_link(self, index: int) -> None:
        """Remove link ``index`` (a veth's peer goes with it)."""
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

        m = ifinfmsg()
        m["family"], m["index"] = 0, index
        self.send(m, RTM_DELLINK)

    def shape(self, index: int, rate_bits: int | None, *, first: bool) -> None:
        """Put (or replace, or with None remove) the tbf root qdisc of link ``index``."""
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
        from pyroute2.netlink.rtnl.tcmsg import plugins, tcmsg

        m = tcmsg()
        m["family"], m["index"], m["handle"], m["parent"] = 0, index, 0x10000, TC_H_ROOT
        if rate_bits is None:
            if first:
                return
            m["attrs"] = [("TCA_KIND", "tbf")]
            try:
                self.send(m, RTM_DELQDISC)
            except OSError as exc:  # no qdisc: nothing to remove
                if exc.errno not in (errno.ENOENT, errno.EINVAL):
                    raise
            return
        options = plugins["tbf"].get_parameters(
            {"rate": f"{rate_bits}bit", "burst": _burst(rate_bits), "latency": TBF_LATENCY}
        )
        m["attrs"] = [("TCA_KIND", "tbf"), ("TCA_OPTIONS", options)]
        self.send(m, RTM_NEWQDISC, NLM_F_CREATE | (NLM_F_EXCL if first else NLM_F_REPLACE))


_libc: list[Any] = []


def _setns() -> Any:
    """libc's setns, loaded once."""
    if not _libc:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _libc.append((libc.setns, ctypes.get_errno))
    return _libc[0]


def in_netns(pid: int, work: Callable[[], _T]) -> _T:
    """``work()`` run by a thread that joined the network namespace of process ``pid``
    first, and then ends (no other thread of the caller ever changes namespace); its
    result, or its exception. LinkError when the namespace cannot be joined. What ``work``
    makes there (a netlink socket, an nft context) stays in that namespace."""
    setns, get_errno = _setns()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["join"] = exc
            return
        try:
            if setns(fd, CLONE_NEWNET) != 0:
                err = get_errno()
                result["join"] = OSError(err, os.strerror(err))
                return
        finally:
            os.close(fd)
        try:
            result["value"] = work()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "join" in result:
        raise LinkError(f"joining the network namespace of process {pid}: {result['join']}")
    if "error" in result:
        raise result["error"]
    value: _T = result["value"]
    return value


def netns_socket(pid: int) -> socket.socket:
    """A NETLINK_ROUTE socket in the network namespace of process ``pid``
    (``in_netns``). LinkError when it cannot be made."""
    return in_netns(pid, route_socket)


def _burst(rate_bits: int) -> int:
    """tbf's bucket for ``rate_bits``: 20 ms of traffic, at least 16 KiB (TCP needs a bucket
    well above one packet to reach the rate)."""
    return max(16 * 1024, rate_bits // 8 // 50)


def create(ifname: str, pid: int, gateway: str, address: str, rate_bits: int | None) -> None:
    """Make the veth pair of the container whose init is ``pid`` and configure both sides
    (addresses, routes, links up, tbf on both sides' egress when ``rate_bits``: the host
    side caps what the kernel downloads, the container side what it sends). LinkError
    naming the interface on failure (the caller removes what was made with ``delete``).
    Called by ``nat.Attachment.attach`` while init waits for ``go``."""
    try:
        with Requests(route_socket()) as host:
            host.veth(ifname, pid)
            index = socket.if_nametoindex(ifname)
            host.address(index, gateway)
            host.link_up(index)
            host.route(index, address)
            host.shape(index, rate_bits, first=True)
        with Requests(netns_socket(pid)) as inside:
            inside.address(INSIDE_INDEX, address)
            inside.link_up(INSIDE_INDEX)
            inside.route(INSIDE_INDEX, None, gateway)
            inside.shape(INSIDE_INDEX, rate_bits, first=True)
    except LinkError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise LinkError(f"network link {ifname}: {exc}") from None


def set_rate(ifname: str, pid: int, rate_bits: int | None) -> None:
    """Change the running container's bandwidth cap (both directions; None: uncapped).
    Called by ``nat.Attachment.set_bandwidth`` (a live ``%sandbox bandwidth=`` change)."""
    try:
        with Requests(route_socket()) as host:
            host.shape(socket.if_nametoindex(ifname), rate_bits, first=False)
        with Requests(netns_socket(pid)) as inside:
            inside.shape(INSIDE_INDEX, rate_bits, first=False)
    except LinkError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise LinkError(f"network link {ifname}: changing its bandwidth: {exc}") from None


def delete(ifname: str) -> None:
    """Remove the host side ``ifname`` (its peer, address and routes go with it); nothing
    when it is gone already. Called by ``nat.Attachment.detach`` and ``nat.collect``."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return
    try:
        with Requests(route_socket()) as host:
            host.delete_link(index)
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            raise LinkError(f"removing network link {ifname}: {exc}") from None


def forget_connections(address: str) -> int:
    """Delete the connections the host tracks from ``address`` (a kernel's, once it is
    gone: an address given again must not inherit its established entries). How many.
    Called by ``nat`` when a kernel's network is removed."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    count = 0
    with Conntrack() as ct:
        selector = NFCTAttrTuple(saddr=address)
        for entry in list(ct.dump_entries(tuple_orig=selector)):
            with contextlib.suppress(Exception):  # one gone meanwhile: nothing to delete
                ct.delete(entry)
                count += 1
    return count


def host_addresses(path: str = "/proc/net/fib_trie") -> tuple[str, ...]:
    """The host's own IPv4 addresses as /32 networks, loopback left out (a kernel's rules
    refuse them: its way to the host itself), from the routing trie's ``LOCAL`` entries
    (no netlink dump: every ``nat`` start asks)."""
    found: set[str] = set()
    last = ""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f.read(1 << 22).splitlines():
                text = line.strip()
                if text.startswith("|--"):
                    last = text[3:].strip()
                elif text.startswith("/32 host LOCAL") and last:
                    found.add(last)
    except OSError:
        return ()
    out = []
    for address in sorted(found):
        try:
            if not ipaddress.IPv4Address(address).is_loopback:
                out.append(f"{address}/32")
        except ValueError:
            continue
    return tuple(out)


def counters(ifname: str) -> tuple[int, int] | None:
    """(bytes the container received, bytes it sent) through host side ``ifname``, from
    the host's sysfs (no netlink); None when the link is gone."""
    base = f"/sys/class/net/{ifname}/statistics"
    try:
        with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
            return int(tx.read()), int(rx.read())
    except (OSError, ValueError):
        return None
