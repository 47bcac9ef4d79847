"""Network of a container, mode ``nat``: a veth pair, an address, a default route,
masquerading out of the host, an egress allow-list and bandwidth caps.

Layer: network (OS side, between ``cgroups`` and ``runtime``; imports only the leaves).
``runtime.container.Container`` uses it for a spec whose ``network`` is ``nat``; the CLI's
``gc`` and ``Container.create`` collect what a crash left (``nat.collect``).

* ``config``: the mode's settings as data, and their parsers (allow-list entries, subnets).
* ``nft``: libnftables' JSON interface, through ctypes.
* ``firewall``: the product's own nftables table (``inet sandbox_kernel``), never another.
* ``links``: the veth pair, addresses, routes and tbf qdiscs, with pyroute2.
* ``nat``: one container's attachment (plan, attach, detach) and the host's shared state
  (the table, IPv4 forwarding), with the leases that name every host resource of a
  container.
* ``usermode``: without root, a user-mode stack (slirp4netns) per container instead, the
  same rules and caps applied inside the container's own namespace by ``inside`` (a short
  process that joins it); docs/network-rootless.md.

The design (a routed point-to-point veth per container, no bridge) is in docs/network.md.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

#: The host's network state of the product (root's, 0700): leases, the lock, marks.
NET_DIR = Path("/run/sandbox-kernel-net")
#: Every host-side veth of the product is named ``IF_PREFIX`` + the container's name.
IF_PREFIX = "skn-"
#: The subnet kernels get addresses from unless a kernelspec or ``--subnet`` says otherwise.
DEFAULT_SUBNET = "10.213.0.0/16"


def host_links() -> list[str]:
    """The host's interfaces of the product's prefix."""
    return sorted(name for _, name in socket.if_nameindex() if name.startswith(IF_PREFIX))


def anything_there() -> bool:
    """Is any network state of the product on the host (a lease, a mark of the shared
    state, a link of its prefix)? A look without the lock, libnftables or pyroute2, so that
    gc, which every container create runs, pays nothing on a host that never used ``nat``.
    Called by ``runtime.leftovers`` before ``nat.collect``."""
    if os.geteuid() != 0:
        return False
    try:
        if os.listdir(NET_DIR / "leases"):
            return True
    except OSError:
        pass
    if (NET_DIR / "table").exists() or (NET_DIR / "forwarding").exists():
        return True
    return bool(host_links())
