"""The product's nftables table: ``inet sandbox_kernel``, and nothing outside it.

Layer: network. ``nat`` calls it: ``ensure_table`` when the first ``nat`` container of the
host is attached, ``add_kernel``/``remove_kernel`` for each container, ``drop_table`` when
the last one is gone, ``refused`` for ``%sandbox`` and ``stats``.

The table (docs/network.md has the reasoning):

* chain ``forward`` (filter hook): packets into a kernel's veth pass only as replies
  (established, related): nothing opens a connection to a kernel, from outside or from
  another kernel. Packets out of a kernel's veth go to that kernel's chain through the map
  ``kernels`` (interface name -> jump); an interface of the product's prefix without an
  entry is dropped. When the host did not forward IPv4 before the product turned it on,
  any other forwarded packet is dropped too, so the host does not become a router.
* chain ``prerouting`` (filter hook, before conntrack and DNAT): nothing from a kernel's
  veth to any address of the host (nor broadcast or multicast), so a port the host
  publishes by DNAT (Docker, NodePorts) is out of reach too.
* chain ``k-NAME`` per kernel: only IPv4 from its own address; link-local (cloud metadata)
  and never-routed networks dropped unless an entry lies inside them; replies pass; past
  ``MAX_CONNECTIONS`` tracked connections
  of the kernel a new one is refused; new connections to an allowed network (and port)
  pass; DNS to the kernel's resolvers passes; the rest is counted in the counter
  ``refused-NAME`` and refused (TCP reset, ICMP administratively prohibited), so that a
  refused ``pip`` fails at once instead of hanging.
* chain ``input``: nothing from a kernel's veth reaches the host itself (its services on
  any address, the gateway address included).
* chain ``postrouting`` (nat hook): what leaves a kernel for anywhere but another kernel is
  masqueraded to the address of the interface the host routes it out of.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from . import IF_PREFIX, nft

FAMILY = "inet"
TABLE = "sandbox_kernel"
_T = {"family": FAMILY, "table": TABLE}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _ifname(key: str, op: str = "==") -> dict[str, Any]:
    return _match(_meta(key), IF_PREFIX + "*", op)


#: address types (``fib daddr type``) a kernel's packet may never be sent to: the host's own
#: addresses, and broadcast and multicast ones
_HOST_TYPES = ("local", "broadcast", "multicast", "anycast")
#: networks never reachable unless an allow-list entry lies inside one of them: link-local
#: (cloud metadata services at 169.254.169.254 answer with the host's credentials), and
#: what is never routed (this network, loopback, multicast, reserved)
NEVER = ("169.254.0.0/16", "0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")

_REPLIES = _match({"ct": {"key": "state"}}, {"set": ["established", "related"]})
_NEW = _match({"ct": {"key": "state"}}, "new")


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {**_T, "chain": chain, "expr": list(expr)}}}


def _base_chain(name: str, kind: str, hook: str, prio: int) -> dict[str, Any]:
    chain = {**_T, "name": name, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}
    return {"add": {"chain": chain}}


def table_commands(router_before: bool) -> list[dict[str, Any]]:
    """The commands making the table (see the module docstring). ``router_before``: the
    host forwarded IPv4 before (else other forwarded traffic is dropped)."""
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"map": {**_T, "name": "kernels", "type": "ifname", "map": "verdict"}}},
        _base_chain("forward", "filter", "forward", 0),
        _rule("forward", _ifname("oifname"), _REPLIES, {"accept": None}),
        _rule("forward", _ifname("oifname"), {"drop": None}),
        _rule("forward", {"vmap": {"key": _meta("iifname"), "data": "@kernels"}}),
        _rule("forward", _ifname("iifname"), {"drop": None}),
    ]
    if not router_before:  # IPv4 only: the host's IPv6 forwarding is not the product's
        cmds.append(_rule("forward", _match(_meta("nfproto"), "ipv4"), {"drop": None}))
    cmds += [
        # before conntrack and any DNAT (Docker's published ports, NodePorts rewrite a host
        # address before the input hook): nothing from a kernel to a host address at all
        _base_chain("prerouting", "filter", "prerouting", -300),
        _rule(
            "prerouting",
            _ifname("iifname"),
            _match({"fib": {"result": "type", "flags": ["daddr"]}}, {"set": list(_HOST_TYPES)}),
            {"drop": None},
        ),
        _base_chain("input", "filter", "input", 0),
        _rule("input", _ifname("iifname"), {"drop": None}),
        _base_chain("postrouting", "nat", "postrouting", 100),
        _rule("postrouting", _ifname("iifname"), _ifname("oifname", "!="), {"masquerade": None}),
    ]
    return cmds


def table_exists() -> bool:
    """Is the product's table there? (``nat`` asks under its lock.)"""
    try:
        nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "list the table")
    except nft.NftError:
        return False
    return True


def ensure_table(router_before: bool) -> None:
    """Make the table unless it is there. Called by ``nat`` under its host lock."""
    if not table_exists():
        nft.run(table_commands(router_before), f"create table {FAMILY} {TABLE}")


def drop_table() -> None:
    """Remove the table (nothing when it is gone already). Called by ``nat`` under its
    host lock once no ``nat`` container is left."""
    if table_exists():
        nft.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}], "remove the table")


def _network(net: str) -> dict[str, Any]:
    n = ipaddress.IPv4Network(net)
    if n.prefixlen == 32:
        return {"match": {"op": "==", "left": _daddr(), "right": str(n.network_address)}}
    prefix = {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
    return {"match": {"op": "==", "left": _daddr(), "right": prefix}}


def _daddr() -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": "daddr"}}


def _port(port: int) -> list[dict[str, Any]]:
    return [
        _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
        _match({"payload": {"protocol": "th", "field": "dport"}}, port),
    ]


#: At most this many connections of one kernel tracked at once (the host's conntrack table
#: is shared by every kernel and the host itself); past it new ones are refused and counted.
MAX_CONNECTIONS = 1024


def _kernel_rules(
    name: str,
    address: str | None,
    allowed: tuple[tuple[str, int | None], ...],
    dns: tuple[str, ...],
    *,
    chain: str | None = None,
    counter_name: str | None = None,
    table: dict[str, str] | None = None,
    deny: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The rules of kernel ``name``'s chain, in order (see the module docstring): the one
    rule list of both modes. Root mode: the host table's ``k-NAME`` and ``refused-NAME``
    (the defaults), only from ``address``. Rootless (``namespace_commands``): the table in
    the kernel's own network namespace (``table``), its chain ``kernel`` and counter
    ``refused``, no source check (``address`` None), and ``deny``: the networks refused and
    counted before the allow-list (the user-mode stack's own subnet and the host's
    addresses, which that stack would reach as the host itself)."""
    t = table if table is not None else _T
    chain = chain if chain is not None else f"k-{name}"
    counter = {"counter": counter_name if counter_name is not None else f"refused-{name}"}
    reject = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    named = [ipaddress.IPv4Network(net) for net, _ in allowed]
    never = [
        n
        for n in NEVER
        if not any(a.subnet_of(ipaddress.IPv4Network(n)) for a in named if a.prefixlen > 0)
    ]

    def rule(*expr: dict[str, Any]) -> dict[str, Any]:
        return {"add": {"rule": {**t, "chain": chain, "expr": list(expr)}}}

    # IPv4 only (its IPv6 link-local goes nowhere), and root mode: only its own address
    rules = [rule(_match(_meta("nfproto"), "ipv4", "!="), {"drop": None})]
    if address is not None:
        rules.append(rule(_match(saddr, address, "!="), {"drop": None}))
    rules += [rule(_network(n), {"drop": None}) for n in never]
    rules += [
        rule(_REPLIES, {"accept": None}),
        rule(_NEW, {"ct count": {"val": MAX_CONNECTIONS, "inv": True}}, counter, reject),
    ]
    for net in deny:
        rules.append(rule(_network(net), counter, reject))
    for net, port in allowed:
        rules.append(rule(_network(net), *(_port(port) if port else []), {"accept": None}))
    for server in dns:
        rules.append(rule(_network(f"{server}/32"), *_port(53), {"accept": None}))
    rules += [
        rule(_NEW, counter),
        rule(_match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}),
        rule(reject),
    ]
    return rules


#: Rootless: the table's chain and counter in the kernel's own network namespace.
NS_CHAIN = "kernel"
NS_COUNTER = "refused"


def namespace_commands(
    allowed: tuple[tuple[str, int | None], ...],
    dns: tuple[str, ...],
    deny: tuple[str, ...],
    *,
    replace: bool = False,
) -> list[dict[str, Any]]:
    """Rootless: the commands making the product's table inside a kernel's own network
    namespace (the user-mode stack's tap device is its only way out): chain ``output``
    (filter hook) lets loopback pass and sends the rest through chain ``kernel``, the rules
    of ``_kernel_rules``; chain ``input`` lets in only loopback and replies. ``replace``:
    only swap chain ``kernel``'s rules (``Attachment.refresh``; the counter stays). Applied
    by ``network.inside`` in that namespace, never on the host."""
    rules = _kernel_rules(
        "", None, allowed, dns, chain=NS_CHAIN, counter_name=NS_COUNTER, table=_T, deny=deny
    )
    if replace:
        return [{"flush": {"chain": {**_T, "name": NS_CHAIN}}}, *rules]
    lo_out = _match(_meta("oifname"), "lo")
    lo_in = _match(_meta("iifname"), "lo")
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"counter": {**_T, "name": NS_COUNTER}}},
        {"add": {"chain": {**_T, "name": NS_CHAIN}}},
        *rules,
        _base_chain("output", "filter", "output", 0),
        _rule("output", lo_out, {"accept": None}),
        _rule("output", {"jump": {"target": NS_CHAIN}}),
        {
            "add": {
                "chain": {
                    **_T,
                    "name": "input",
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "drop",
                }
            }
        },
        _rule("input", lo_in, {"accept": None}),
        _rule("input", _REPLIES, {"accept": None}),
    ]


def counter_packets(name: str, *, here: bool = False) -> int | None:
    """The packets of counter ``name`` of the product's table (None when it has none).
    ``here``: the table of the calling thread's network namespace (``nft.run_here``: a root
    kernel's own, read from a thread that joined it)."""
    run = nft.run_here if here else nft.run
    try:
        items = run([{"list": {"counter": {**_T, "name": name}}}], "read a counter")
    except nft.NftError:
        return None
    for item in items:
        c = item.get("counter")
        if isinstance(c, dict) and isinstance(c.get("packets"), int):
            return int(c["packets"])
    return None


def kernel_commands(
    name: str,
    address: str,
    allowed: tuple[tuple[str, int | None], ...],
    dns: tuple[str, ...],
) -> list[dict[str, Any]]:
    """The commands adding kernel ``name``'s chain, counter and map entry. ``allowed``:
    (IPv4 network, port or None) pairs; ``dns``: resolvers allowed on port 53."""
    chain = f"k-{name}"
    element = [[IF_PREFIX + name, {"jump": {"target": chain}}]]
    return [
        {"add": {"chain": {**_T, "name": chain}}},
        {"add": {"counter": {**_T, "name": f"refused-{name}"}}},
        *_kernel_rules(name, address, allowed, dns),
        {"add": {"element": {**_T, "name": "kernels", "elem": element}}},
    ]


def replace_kernel_rules(
    name: str,
    address: str,
    allowed: tuple[tuple[str, int | None], ...],
    dns: tuple[str, ...],
) -> None:
    """Swap kernel ``name``'s rules for new ones in one transaction (its counter and its
    open connections stay). Called by ``nat.Attachment.refresh`` when the allow-list's host
    names resolve to other addresses."""
    nft.run(
        [
            {"flush": {"chain": {**_T, "name": f"k-{name}"}}},
            *_kernel_rules(name, address, allowed, dns),
        ],
        f"firewall rules of {IF_PREFIX}{name}",
    )


def add_kernel(
    name: str,
    address: str,
    allowed: tuple[tuple[str, int | None], ...],
    dns: tuple[str, ...],
) -> None:
    """Add kernel ``name``'s rules in one transaction (before its veth carries a packet).
    Called by ``nat.Attachment.attach``."""
    nft.run(kernel_commands(name, address, allowed, dns), f"firewall rules of {IF_PREFIX}{name}")


def kernels() -> list[str]:
    """The names of the kernels that have rules (for ``nat.collect``)."""
    try:
        items = nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "list")
    except nft.NftError:
        return []
    out = []
    for item in items:
        chain = item.get("chain")
        if isinstance(chain, dict) and str(chain.get("name", "")).startswith("k-"):
            out.append(str(chain["name"])[2:])
    return out


def remove_kernel(name: str) -> None:
    """Remove kernel ``name``'s map entry, chain and counter, each only if there (so a
    second call, or one after a crash that left part of them, does nothing more). Called
    by ``nat.Attachment.detach`` and ``nat.collect``."""
    try:
        items = nft.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "list")
    except nft.NftError:
        return  # no table: nothing of any kernel is left
    chain = f"k-{name}"
    cmds: list[dict[str, Any]] = []
    ifname = IF_PREFIX + name
    for item in items:
        m = item.get("map")
        if isinstance(m, dict) and m.get("name") == "kernels":
            for elem in m.get("elem", []) or []:
                if isinstance(elem, list) and elem and elem[0] == ifname:
                    cmds.append(
                        {"delete": {"element": {**_T, "name": "kernels", "elem": [ifname]}}}
                    )
    names = {
        (kind, str(obj.get("name")))
        for item in items
        for kind, obj in item.items()
        if kind in ("chain", "counter") and isinstance(obj, dict)
    }
    if ("chain", chain) in names:
        cmds.append({"flush": {"chain": {**_T, "name": chain}}})
        cmds.append({"delete": {"chain": {**_T, "name": chain}}})
    if ("counter", f"refused-{name}") in names:
        cmds.append({"delete": {"counter": {**_T, "name": f"refused-{name}"}}})
    if cmds:
        nft.run(cmds, f"remove the firewall rules of {ifname}")


def refused(name: str) -> int | None:
    """How many connections kernel ``name`` had refused (its counter's packets; None when
    it has none)."""
    return counter_packets(f"refused-{name}")
