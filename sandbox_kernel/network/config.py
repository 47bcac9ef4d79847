"""The settings of network mode ``nat`` as data, and their one parser each.

Layer: network (pure). ``jupyter.resolve`` (kernelspecs and ``SandboxPolicy``) and
``sandbox-kernel run`` parse with ``parse_allow`` and ``parse_subnet``; the bandwidth is the
``limits.BANDWIDTH`` bound. ``runtime.validate`` checks a ``NatConfig`` with
``config_problems``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import SpecError
from . import DEFAULT_SUBNET, IF_PREFIX

ALLOW_FORMS = (
    "an IPv4 address or network with an optional port (198.18.0.7, 198.18.0.0/15, "
    "198.18.0.7:443) or a host name with an optional port (pypi.org, pypi.org:443)"
)
SUBNET_FORMS = "an IPv4 network of at least 4 addresses, e.g. 10.213.0.0/16"
#: Networks a kernel subnet may not overlap: this network, loopback, link-local, multicast,
#: reserved, broadcast.
SPECIAL = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
#: At most this many allow-list entries, and addresses once host names are resolved.
MAX_ALLOW = 64
MAX_ALLOW_ADDRESSES = 256
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}\.?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


@dataclass(frozen=True)
class AllowEntry:
    """One entry of an egress allow-list: ``target`` a normalised IPv4 network
    (``198.18.0.7/32``) or a host name (resolved when the container is made), ``port``
    a TCP/UDP port (None: every port and protocol)."""

    target: str
    port: int | None = None

    @property
    def is_name(self) -> bool:
        """Is ``target`` a host name (resolved at create) rather than a network?"""
        return "/" not in self.target

    def __str__(self) -> str:
        shown = self.target.removesuffix("/32")
        return f"{shown}:{self.port}" if self.port is not None else shown


@dataclass(frozen=True)
class NatConfig:
    """Network mode ``nat`` of one container (``ContainerSpec.nat``).

    allow: what the container may connect to; everything else is refused and counted.
    The host itself and other containers are never reachable, whatever it says.
    bandwidth: bits per second in each direction (None: no cap).
    subnet: the IPv4 network the container's address comes from (its first address is the
    gateway, the host side of every container's veth).
    dns: IPv4 resolvers written into the container's /etc/resolv.conf and allowed on port
    53; None: the host's own non-loopback resolvers.
    """

    allow: tuple[AllowEntry, ...] = ()
    bandwidth: int | None = None
    subnet: str = DEFAULT_SUBNET
    dns: tuple[str, ...] | None = None


def parse_allow(text: object, field: str = "network_allow") -> AllowEntry:
    """One allow-list entry (see ``ALLOW_FORMS``); SpecError naming the field, the entry
    and the accepted forms. Used by ``run --allow``, the kernelspec's ``network_allow``
    and the policy's."""
    if not isinstance(text, str) or not text.strip() or len(text) > 260:
        raise SpecError(f"{field} entry {text!r} is not valid; use {ALLOW_FORMS}")
    raw = text.strip()
    if raw.startswith("[") or raw.count(":") > 1:
        raise SpecError(
            f"{field} entry {raw!r}: IPv6 is not supported for kernels yet; use {ALLOW_FORMS}"
        )
    host, sep, port_text = raw.partition(":")
    port = None
    if sep:
        if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
            raise SpecError(f"{field} entry {raw!r}: the port must be 1 to 65535")
        port = int(port_text)
    if re.match(r"^[0-9./]+$", host):
        try:
            net = ipaddress.IPv4Network(host, strict=False)
        except ValueError:
            raise SpecError(f"{field} entry {raw!r} is not valid; use {ALLOW_FORMS}") from None
        if host.count(".") != 3:
            raise SpecError(f"{field} entry {raw!r} is not valid; use {ALLOW_FORMS}")
        return AllowEntry(str(net), port)
    if len(host) > 253 or not _HOST_RE.match(host) or host.replace(".", "").isdigit():
        raise SpecError(f"{field} entry {raw!r} is not valid; use {ALLOW_FORMS}")
    return AllowEntry(host.rstrip(".").lower(), port)


def parse_allow_list(
    items: Iterable[object], field: str = "network_allow"
) -> tuple[AllowEntry, ...]:
    """Every entry of ``items`` through ``parse_allow``, duplicates dropped, at most
    ``MAX_ALLOW``."""
    out: list[AllowEntry] = []
    for item in items:
        entry = parse_allow(item, field)
        if entry not in out:
            out.append(entry)
    if len(out) > MAX_ALLOW:
        raise SpecError(f"{field} has {len(out)} entries; at most {MAX_ALLOW} are allowed")
    return tuple(out)


def parse_subnet(text: object, field: str = "network_subnet") -> str:
    """An IPv4 subnet for container addresses (see ``SUBNET_FORMS``), normalised."""
    try:
        net = ipaddress.IPv4Network(str(text), strict=False)
    except ValueError:
        raise SpecError(f"{field}={text!r} is not valid; use {SUBNET_FORMS}") from None
    if not isinstance(text, str) or net.num_addresses < 4 or not re.match(r"^[0-9./]+$", text):
        raise SpecError(f"{field}={text!r} is not valid; use {SUBNET_FORMS}")
    for special in SPECIAL:
        if net.overlaps(ipaddress.IPv4Network(special)):
            raise SpecError(
                f"{field}={text!r} overlaps {special}, which is never a kernel's; "
                f"use {SUBNET_FORMS}"
            )
    return str(net)


def route_conflicts(subnet: str, routes: Iterable[tuple[str, str]]) -> list[str]:
    """The host's routes (interface, network) other than the product's links and the
    default route that ``subnet`` overlaps: giving kernels those addresses would take them
    from the host's own networks (the gateway address made local, /32 routes over them).
    ``nat.Attachment.reserve`` refuses a subnet with any."""
    net = ipaddress.IPv4Network(subnet)
    out = []
    for ifname, dest in routes:
        route = ipaddress.IPv4Network(dest)
        if ifname.startswith(IF_PREFIX) or route.prefixlen == 0:
            continue
        if net.overlaps(route):
            out.append(f"{route} on {ifname}")
    return out


Resolver = Callable[[str], list[str]]


def resolve_allow(
    entries: Iterable[AllowEntry], resolver: Resolver
) -> tuple[tuple[str, int | None], ...]:
    """The allow-list as (IPv4 network, port) pairs: host names resolved by ``resolver``
    (name -> IPv4 addresses). SpecError naming an entry that does not resolve. Called by
    ``nat.Attachment`` when the container is made."""
    out: list[tuple[str, int | None]] = []
    for entry in entries:
        if not entry.is_name:
            pairs = [(entry.target, entry.port)]
        else:
            try:
                addresses = resolver(entry.target)
            except OSError as exc:
                raise SpecError(
                    f"network_allow entry {str(entry)!r}: the host name does not resolve "
                    f"({exc.strerror or exc}); fix the name or give an address"
                ) from None
            if not addresses:
                raise SpecError(
                    f"network_allow entry {str(entry)!r}: the host name has no IPv4 address"
                )
            pairs = [(f"{a}/32", entry.port) for a in addresses]
        for pair in pairs:
            if pair not in out:
                out.append(pair)
    if len(out) > MAX_ALLOW_ADDRESSES:
        raise SpecError(
            f"network_allow resolves to {len(out)} addresses; at most {MAX_ALLOW_ADDRESSES}"
        )
    return tuple(out)


def config_problems(nat: NatConfig) -> list[str]:
    """Why ``nat`` cannot be used, one line each (``runtime.validate``)."""
    out = []
    try:
        parse_subnet(nat.subnet)
    except SpecError as exc:
        out.append(str(exc))
    if not nat.allow:
        out.append(
            "network 'nat' needs an allow-list (network_allow / --allow): every connection "
            "would be refused; use CIDRs or HOST[:PORT], 0.0.0.0/0 for everything"
        )
    if len(nat.allow) > MAX_ALLOW:
        out.append(f"network_allow has {len(nat.allow)} entries; at most {MAX_ALLOW}")
    for server in nat.dns or ():
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            out.append(f"network_dns entry {server!r} is not an IPv4 address")
    return out
