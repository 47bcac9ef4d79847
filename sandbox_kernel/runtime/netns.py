"""Network namespace configuration with pyroute2 (all netlink messages are built by it).

Layer: runtime (OS side). Mode ``none``: the container's fresh network namespace gets only
loopback. The request is built with pyroute2 (``link_up_request``) and goes into the plan;
the executor's init, which is in the container's network namespace and holds CAP_NET_ADMIN
there, sends it on a netlink socket of that namespace and reports the reply, which
``check_reply`` reads. So nothing joins the container's namespaces from the host: no
thread setns, no fork of the server for a rootless one (a fork of a big server process and
a user-namespace setns cost milliseconds on every start).

pyroute2's package import costs ~0.15 s of CPU, more than a whole ``sandbox-kernel run``
should take. So it is imported only to build a request that is not known in advance: the
one request of every start (``lo`` up) is pyroute2's encoding kept as ``LOOPBACK_UP`` (a
unit test builds it with pyroute2 and compares), and a reply is the kernel's fixed
``struct nlmsgerr`` (an ack: a netlink header and an errno), read with ``struct`` (a unit
test checks the reading against pyroute2's decoder).
"""

from __future__ import annotations

import os
import socket
import struct

from ..errors import RuntimeStartError

RTM_NEWLINK = 16
NLMSG_ERROR = 2
IFF_UP = 0x1
#: RTM_NEWLINK (acked, sequence 1) setting the link named ``lo`` up: ``link_up_request("lo")``
LOOPBACK_UP = "2800000010000500010000000000000000000000000000000100000001000000070003006c6f0000"
#: struct nlmsghdr (length, type, flags, sequence, port id) followed by the ack's errno
_ACK = struct.Struct("=IHHIIi")
_cache: dict[str, str] = {"lo": LOOPBACK_UP}


def link_up_request(ifname: str) -> str:
    """The RTM_NEWLINK request (hex, acked) that sets ``ifname`` up, the link named by
    IFLA_IFNAME (its index in the container's namespace is not known here), built by
    pyroute2 (cached: the bytes never change). Called through ``loopback_request`` by
    ``Container.start`` for each container; the tests build others."""
    cached = _cache.get(ifname)
    if cached is not None:
        return cached
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = 0
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["attrs"] = [("IFLA_IFNAME", ifname)]
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    _cache[ifname] = bytes(msg.data).hex()
    return _cache[ifname]


def loopback_request() -> str:
    """The request of network mode ``none``: loopback up."""
    return link_up_request("lo")


def check_reply(hex_reply: str) -> None:
    """Read the kernel's reply to a request (``netlink HEX`` from the executor) and raise
    RuntimeStartError (stage ``network``) unless it is an ack without error. Called by
    ``Container.start`` for each such status line, before the command runs."""
    try:
        data = bytes.fromhex(hex_reply)
        length, kind, _flags, _seq, _port, error = _ACK.unpack_from(data)
    except (ValueError, struct.error) as exc:
        raise RuntimeStartError(f"unreadable netlink reply: {exc}", stage="network") from None
    if kind != NLMSG_ERROR:
        raise RuntimeStartError(f"unexpected netlink reply type {kind}", stage="network")
    if length < _ACK.size or length > len(data):
        raise RuntimeStartError(
            f"unreadable netlink reply: length {length} of {len(data)} bytes", stage="network"
        )
    if error != 0:
        raise RuntimeStartError(
            f"bringing loopback up: {os.strerror(-error)}", stage="network", errno=-error
        )
