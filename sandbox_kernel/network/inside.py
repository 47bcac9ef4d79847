"""Rootless ``nat``: the work done inside a kernel's own network namespace.

Layer: network. ``usermode.UserModeAttachment`` runs this module in a short-lived process
(a fresh Python, single-threaded) that joins the container's user and network namespaces
itself, through the descriptors it inherited (the owner, a multithreaded server, cannot
join a user namespace; and a program exec'd after joining would lose the namespace's
capabilities, the owner's uid not being the namespace's root), with one JSON request on
stdin and one JSON answer on stdout:

* ``{"op": "rules", "allowed": [[NET, PORT], ...], "dns": [...], "deny": [...],
  "replace": false}``: the product's table in the namespace (``firewall.namespace_commands``);
* ``{"op": "shape", "rate": BITS | null}``: the caps. Upload: tbf on the tap device's
  egress. Download: what comes in on the tap device is redirected (u32 + mirred) to an ifb
  device whose egress has the same tbf (this kernel has no policing action);
* ``{"op": "stats"}``: ``{"refused": N, "bytes_in": N, "bytes_out": N}``.

Nothing here is reachable by the kernel: its processes have no capabilities.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from . import firewall, links

#: The tap device the user-mode stack makes, and the ifb device of the download cap.
TAP = links.INSIDE_NAME
IFB = "sk-ifb"
_ETH_P_ALL = 3
_INGRESS = 0xFFFF0000


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def shape(rate: int | None) -> None:
    """Put, change or remove (None) both caps (see the module docstring)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        tap = _index(ipr, TAP)
        if tap is None:
            raise links.LinkError(f"network link {TAP}: not in the kernel's namespace")
        ifb = _index(ipr, IFB)
        if ifb is None and rate is not None:
            ipr.link("add", ifname=IFB, kind="ifb")
            ifb = _index(ipr, IFB)
            assert ifb is not None
            ipr.link("set", index=ifb, state="up")
            ipr.tc("add", "ingress", index=tap, handle=_INGRESS)
            ipr.tc(
                "add-filter",
                "u32",
                index=tap,
                parent=_INGRESS,
                protocol=_ETH_P_ALL,
                prio=10,
                target=0x10001,
                keys=["0x0/0x0+0"],
                action={
                    "kind": "mirred",
                    "direction": "egress",
                    "action": "redirect",
                    "ifindex": ifb,
                },
            )
    # the tbf of both: the one request builder of root mode too
    with links.Requests(links.route_socket()) as requests:
        requests.shape(tap, rate, first=False)
        if ifb is not None:
            requests.shape(ifb, rate, first=False)


def device_bytes(text: str, name: str = TAP) -> tuple[int, int] | None:
    """(bytes received, bytes sent) of device ``name`` in ``/proc/net/dev``'s ``text``."""
    for line in text.splitlines():
        device, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and device.strip() == name and len(fields) >= 9:
            return int(fields[0]), int(fields[8])
    return None


def stats() -> dict[str, Any]:
    """The refused counter and the tap device's bytes (in: what the kernel received), the
    latter from this process's own ``/proc/net/dev`` (its network namespace's; no netlink
    library to load)."""
    out: dict[str, Any] = {"refused": firewall.counter_packets(firewall.NS_COUNTER)}
    with open("/proc/thread-self/net/dev", encoding="ascii", errors="replace") as f:
        counted = device_bytes(f.read())
    if counted is not None:
        out["bytes_in"], out["bytes_out"] = counted
    return out


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Do one request (see the module docstring)."""
    op = request.get("op")
    if op == "rules":
        allowed = tuple((str(n), None if p is None else int(p)) for n, p in request["allowed"])
        cmds = firewall.namespace_commands(
            allowed,
            tuple(request["dns"]),
            tuple(request["deny"]),
            replace=bool(request.get("replace")),
        )
        from . import nft

        nft.run(cmds, "firewall rules in the kernel's network namespace")
        return {"ok": True}
    if op == "shape":
        rate = request.get("rate")
        shape(None if rate is None else int(rate))
        return {"ok": True}
    if op == "stats":
        return stats()
    raise ValueError(f"unknown request {op!r}")


CLONE_NEWUSER = 0x10000000


def join(user_fd: int, net_fd: int) -> None:
    """Join the user namespace, then the network namespace, of those descriptors (this
    process must be single-threaded: the kernel refuses a user namespace to any other)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for fd, kind, what in ((user_fd, CLONE_NEWUSER, "user"), (net_fd, links.CLONE_NEWNET, "net")):
        if libc.setns(fd, kind) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"joining the container's {what} namespace: {os.strerror(err)}")
        os.close(fd)


def main(argv: list[str]) -> int:
    """Entry point of the process ``usermode`` starts: ``argv`` the user and network
    namespace descriptors; one request on stdin, one answer on stdout."""
    try:
        join(int(argv[0]), int(argv[1]))
        answer = handle(json.loads(sys.stdin.read(1 << 20)))
    except Exception as exc:  # the owner reports it, naming the container
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0
