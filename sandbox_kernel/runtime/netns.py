"""Network namespace configuration with pyroute2 (all netlink work goes through it).

Layer: runtime (OS side). Mode ``none``: the container's fresh network namespace gets only
loopback. The request is built here with pyroute2 (``loopback_request``) and goes into the
plan; the executor's init, which is in the container's network namespace and holds
CAP_NET_ADMIN there, sends it on a netlink socket of that namespace and reports the reply,
which ``check_reply`` decodes with pyroute2. So nothing joins the container's namespaces
from the host: no thread setns, no fork of the server for a rootless one (a fork of a big
server process and a user-namespace setns cost milliseconds on every start).
"""

from __future__ import annotations

import os
import socket
import struct

# Imported at module load: pyroute2's package import is heavy (~0.4 s CPU), and it must be
# paid once per process, never on a container's setup path.
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nlmsgerr
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ..errors import RuntimeStartError

RTM_NEWLINK = 16
NLMSG_ERROR = 2
IFF_UP = 0x1
_cache: dict[str, str] = {}


def link_up_request(ifname: str) -> str:
    """The RTM_NEWLINK request (hex, acked) that sets ``ifname`` up, the link named by
    IFLA_IFNAME (its index in the container's namespace is not known here). Called by
    ``Container.start`` for each container (cached: the bytes never change)."""
    cached = _cache.get(ifname)
    if cached is not None:
        return cached
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
    """Decode the kernel's reply to a request (``netlink HEX`` from the executor) and raise
    RuntimeStartError (stage ``network``) unless it is an ack without error. Called by
    ``Container.start`` for each such status line, before the command runs."""
    try:
        data = bytes.fromhex(hex_reply)
        ack = nlmsgerr(data)
        ack.decode()
        kind, error = ack["header"]["type"], ack["error"]
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
        raise RuntimeStartError(f"unreadable netlink reply: {exc}", stage="network") from None
    if kind != NLMSG_ERROR:
        raise RuntimeStartError(f"unexpected netlink reply type {kind}", stage="network")
    if error != 0:
        raise RuntimeStartError(
            f"bringing loopback up: {os.strerror(-error)}", stage="network", errno=-error
        )
