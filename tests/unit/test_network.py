"""Network mode ``nat`` without root: the parsers of its settings, the firewall's
commands, the leases and the gc of what a crash left (libnftables and pyroute2 replaced by
recording fakes), the plan's records, the spec validator and ``run``'s options."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel import network
from sandbox_kernel.errors import SandboxError, SpecError
from sandbox_kernel.limits import BANDWIDTH
from sandbox_kernel.network import DEFAULT_SUBNET, firewall, links, nat, nft
from sandbox_kernel.network.config import (
    AllowEntry,
    NatConfig,
    config_problems,
    parse_allow,
    parse_allow_list,
    parse_subnet,
    resolve_allow,
    route_conflicts,
)
from sandbox_kernel.runtime import ops
from sandbox_kernel.runtime.plan import HostContext, compile_plan
from sandbox_kernel.runtime.spec import ContainerSpec, NetworkMode
from sandbox_kernel.runtime.validate import check_network
from sandbox_kernel.units import format_rate, parse_rate


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("16mbit", 16_000_000),
        ("512kbit", 512_000),
        ("1gbit", 1_000_000_000),
        ("1.5gbit", 1_500_000_000),
        ("2mbps", 16_000_000),
        ("1mibit", 1024**2),
        (" 8Mbit ", 8_000_000),
    ],
)
def test_rates_as_tc_writes_them(text: str, bits: int) -> None:
    assert parse_rate(text) == bits
    assert parse_rate(format_rate(bits)) == pytest.approx(bits, rel=1e-3)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("16", "has no unit"),
        ("16 furlongs", "unknown unit"),
        ("\u0661\u0666mbit", "is not a rate"),  # Arabic-Indic digits
        ("-1mbit", "is not a rate"),
        ("mbit", "is not a rate"),
    ],
)
def test_bad_rates_name_the_field_and_the_forms(text: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        BANDWIDTH.parse(text, "--bandwidth")
    assert words in str(err.value) and "--bandwidth" in str(err.value)
    assert "16mbit" in str(err.value)


def test_the_bandwidth_bound() -> None:
    with pytest.raises(SpecError, match="too small"):
        BANDWIDTH.parse("1kbit")
    with pytest.raises(SpecError, match="too large"):
        BANDWIDTH.parse("100gbit")
    assert BANDWIDTH.parse("64kbit") == 64_000


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("198.18.0.0/15", AllowEntry("198.18.0.0/15")),
        ("198.18.3.7/15", AllowEntry("198.18.0.0/15")),  # normalised
        ("198.18.0.7", AllowEntry("198.18.0.7/32")),
        ("198.18.0.7:443", AllowEntry("198.18.0.7/32", 443)),
        ("198.18.0.0/24:8080", AllowEntry("198.18.0.0/24", 8080)),
        ("PyPI.org", AllowEntry("pypi.org")),
        ("files.pythonhosted.org:443", AllowEntry("files.pythonhosted.org", 443)),
        ("0.0.0.0/0", AllowEntry("0.0.0.0/0")),
    ],
)
def test_allow_entries(text: str, entry: AllowEntry) -> None:
    assert parse_allow(text) == entry


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("198.18.0.0/33", "is not valid"),
        ("198.18.0", "is not valid"),
        ("198.18.0.7:0", "port must be 1 to 65535"),
        ("198.18.0.7:70000", "port must be 1 to 65535"),
        ("198.18.0.7:http", "port must be 1 to 65535"),
        ("[2001:db8::1]:443", "IPv6"),
        ("2001:db8::/32", "IPv6"),
        ("bad_name.example", "is not valid"),
        ("-x.example", "is not valid"),
        ("", "is not valid"),
        ("a" * 300, "is not valid"),
    ],
)
def test_bad_allow_entries(text: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_allow(text, "--allow")
    assert words in str(err.value) and "--allow" in str(err.value)


def test_allow_lists_drop_duplicates_and_are_bounded() -> None:
    assert parse_allow_list(["198.18.0.7", "198.18.0.7/32", "x.example"]) == (
        AllowEntry("198.18.0.7/32"),
        AllowEntry("x.example"),
    )
    with pytest.raises(SpecError, match="at most 64"):
        parse_allow_list([f"198.18.0.{i}" for i in range(65)])


def test_names_resolve_when_the_container_is_made() -> None:
    calls: list[str] = []

    def resolver(name: str) -> list[str]:
        calls.append(name)
        return {"a.example": ["198.18.1.1", "198.18.1.2"]}.get(name, [])

    entries = parse_allow_list(["a.example:443", "198.18.9.0/24"])
    assert resolve_allow(entries, resolver) == (
        ("198.18.1.1/32", 443),
        ("198.18.1.2/32", 443),
        ("198.18.9.0/24", None),
    )
    assert calls == ["a.example"]
    with pytest.raises(SpecError, match="no IPv4 address"):
        resolve_allow(parse_allow_list(["b.example"]), resolver)

    def failing(name: str) -> list[str]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(SpecError, match=r"does not resolve .Name or service not known"):
        resolve_allow(parse_allow_list(["c.example"]), failing)


def test_subnets() -> None:
    assert parse_subnet("198.18.64.7/24") == "198.18.64.0/24"
    assert parse_subnet(DEFAULT_SUBNET) == DEFAULT_SUBNET
    for bad in ("198.18.64.0/31", "10.0.0.0/8/2", "fd00::/64", "net"):
        with pytest.raises(SpecError, match="network_subnet"):
            parse_subnet(bad)
    for special in ("127.0.0.0/24", "169.254.0.0/16", "224.0.0.0/24", "0.0.0.0/0"):
        with pytest.raises(SpecError, match="never a kernel's"):
            parse_subnet(special)


def test_a_subnet_over_the_hosts_own_networks_is_refused(fake_host: dict[str, Any]) -> None:
    routes = [
        ("eth0", "0.0.0.0/0"),
        ("eth0", "192.0.2.0/24"),
        ("skn-aaaaaaaaaaa", "198.18.64.2/32"),
    ]
    assert route_conflicts("192.0.2.128/25", routes) == ["192.0.2.0/24 on eth0"]
    assert route_conflicts("198.18.64.0/24", routes) == []  # the product's own links do not count
    assert route_conflicts("10.213.0.0/16", routes) == []  # nor the default route
    config = NatConfig(allow=parse_allow_list(["198.18.9.0/24"]), subnet="192.0.2.0/26", dns=())
    with pytest.raises(
        SpecError, match=r"overlaps the host's own network \(192.0.2.0/24 on eth0\)"
    ):
        nat.Attachment("sk-aaaaaaaaaaaa", config).reserve(1, "1")
    assert nat.leftovers() == []


def test_the_hosts_routes_are_read_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "route"
    proc.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "junk\n"
    )
    assert nat.host_routes(str(proc)) == [("eth0", "0.0.0.0/0"), ("eth0", "192.0.2.0/24")]
    assert nat.host_routes(str(tmp_path / "missing")) == []


def test_the_validator_wants_an_allow_list_and_settings_only_with_nat() -> None:
    base = ContainerSpec(id="sk-0123456789ab", layers=("/x",), command=("true",))
    assert check_network(base) == []
    nat_spec = ContainerSpec(
        id="sk-0123456789ab", layers=("/x",), command=("true",), network=NetworkMode.NAT
    )
    assert "needs its settings" in check_network(nat_spec)[0]
    empty = ContainerSpec(
        id="sk-0123456789ab",
        layers=("/x",),
        command=("true",),
        network=NetworkMode.NAT,
        nat=NatConfig(),
    )
    assert "needs an allow-list" in check_network(empty)[0]
    stray = ContainerSpec(id="sk-0123456789ab", layers=("/x",), command=("true",), nat=NatConfig())
    assert "need network 'nat'" in check_network(stray)[0]
    assert config_problems(NatConfig(allow=(AllowEntry("0.0.0.0/0"),), dns=("nope",))) == [
        "network_dns entry 'nope' is not an IPv4 address"
    ]


def test_the_plan_waits_for_the_network_and_writes_the_resolvers() -> None:
    spec = ContainerSpec(
        id="sk-0123456789ab",
        layers=("/x",),
        command=("true",),
        network=NetworkMode.NAT,
        nat=NatConfig(allow=(AllowEntry("0.0.0.0/0"),)),
    )
    host = HostContext(
        scratch_dir="/s",
        cgroup_dirs=(),
        cgroup_version=2,
        netlink=("00" * 16,),
        resolv_conf="nameserver 198.18.0.53\n",
    )
    plan = compile_plan(spec, host)
    assert sum(isinstance(op, ops.SyncNet) for op in plan) == 1
    files = {op.path: op.content for op in plan if isinstance(op, ops.WriteFile)}
    assert files["/etc/resolv.conf"] == "nameserver 198.18.0.53\n"
    none = compile_plan(
        ContainerSpec(id="sk-0123456789ab", layers=("/x",), command=("true",)),
        HostContext(scratch_dir="/s", cgroup_dirs=(), cgroup_version=2),
    )
    assert not any(isinstance(op, ops.SyncNet) for op in none)


def _exprs(cmds: list[dict[str, Any]], chain: str) -> list[str]:
    return [
        json.dumps(c["add"]["rule"]["expr"])
        for c in cmds
        if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == chain
    ]


def test_the_table_never_lets_anything_reach_a_kernel_or_the_host() -> None:
    cmds = firewall.table_commands(router_before=False)
    assert {c["add"].get("table", {}).get("name") for c in cmds if "table" in c["add"]} == {
        "sandbox_kernel"
    }
    forward = _exprs(cmds, "forward")
    assert '"oifname"' in forward[0] and "established" in forward[0] and "accept" in forward[0]
    assert '"oifname"' in forward[1] and '"drop"' in forward[1]
    assert "@kernels" in forward[2]
    # the host was no router: it stays none for IPv4 (its IPv6 forwarding is not ours)
    assert forward[-1] == (
        '[{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}, '
        '{"drop": null}]'
    )
    assert len(_exprs(firewall.table_commands(router_before=True), "forward")) == 4
    assert _exprs(cmds, "input") == [
        '[{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "skn-*"}}, '
        '{"drop": null}]'
    ]
    # before conntrack and DNAT: no packet of a kernel to any address of the host
    (pre,) = [
        c["add"]["chain"] for c in cmds if c["add"].get("chain", {}).get("name") == "prerouting"
    ]
    assert pre["hook"] == "prerouting" and pre["prio"] == -300
    (rule,) = _exprs(cmds, "prerouting")
    assert '"fib"' in rule and '"local"' in rule and '"multicast"' in rule and "drop" in rule
    assert "masquerade" in _exprs(cmds, "postrouting")[0]
    # every object lives in the product's table
    for c in cmds:
        (obj,) = c["add"].values()
        assert obj.get("table", obj.get("name")) == "sandbox_kernel"


def test_a_kernels_chain_allows_its_list_and_counts_the_rest() -> None:
    cmds = firewall.kernel_commands(
        "0123456789a",
        "198.18.64.9",
        (("198.18.9.0/24", None), ("198.18.1.1/32", 443)),
        ("198.18.0.53",),
    )
    rules = _exprs(cmds, "k-0123456789a")
    # IPv4 from its own address only, then what is never reachable, then replies
    assert '"nfproto"' in rules[0] and '"!="' in rules[0] and "drop" in rules[0]
    assert '"saddr"' in rules[1] and '"198.18.64.9"' in rules[1] and '"!="' in rules[1]
    never = rules[2 : 2 + len(firewall.NEVER)]
    assert any('"addr": "169.254.0.0", "len": 16' in r and "drop" in r for r in never)
    rest = rules[2 + len(firewall.NEVER) :]
    assert "established" in rest[0]
    # a kernel holds at most MAX_CONNECTIONS of the host's conntrack entries
    assert '"ct count": {"val": 1024, "inv": true}' in rest[1] and "refused-" in rest[1]
    assert '"prefix": {"addr": "198.18.9.0", "len": 24}' in rest[2]
    assert '"right": "198.18.1.1"' in rest[3] and '"right": 443' in rest[3]
    assert '"right": "198.18.0.53"' in rest[4] and '"right": 53' in rest[4]
    assert '"counter": "refused-0123456789a"' in rest[5] and '"new"' in rest[5]
    assert "tcp reset" in rest[6] and "admin-prohibited" in rest[7]
    (elem,) = [c["add"]["element"] for c in cmds if "element" in c["add"]]
    assert elem["elem"] == [["skn-0123456789a", {"jump": {"target": "k-0123456789a"}}]]
    # an entry inside link-local (an admin's own service there) lifts that drop only
    opened = _exprs(
        firewall.kernel_commands("0123456789a", "198.18.64.9", (("169.254.1.0/24", 80),), ()),
        "k-0123456789a",
    )
    assert not any('"169.254.0.0"' in r for r in opened)
    assert any('"127.0.0.0"' in r for r in opened)
    everything = _exprs(
        firewall.kernel_commands("0123456789a", "198.18.64.9", (("0.0.0.0/0", None),), ()),
        "k-0123456789a",
    )
    assert any('"169.254.0.0"' in r for r in everything), "0.0.0.0/0 does not open metadata"


class FakeNft:
    """libnftables replaced: a table kept as JSON objects."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.calls: list[list[dict[str, Any]]] = []
        self.table = False

    def run(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        self.calls.append(commands)
        out: list[dict[str, Any]] = []
        for cmd in commands:
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            if verb == "list":
                if not self.table:
                    raise nft.NftError(f"{what}: no such table")
                out += self.objects
            elif verb == "add" and kind == "table":
                self.table = True
            elif verb == "add" and kind in ("chain", "counter"):
                self.objects.append({kind: {"name": obj["name"]}})
            elif verb == "add" and kind == "element":
                self.objects.append({"map": {"name": "kernels", "elem": obj["elem"]}})
            elif verb == "delete" and kind == "table":
                self.table, self.objects = False, []
            elif verb == "delete" and kind == "element":
                self.objects = [
                    o
                    for o in self.objects
                    if "map" not in o or o["map"]["elem"][0][0] != obj["elem"][0]
                ]
            elif verb == "delete":
                self.objects = [
                    o for o in self.objects if o.get(kind, {}).get("name") != obj["name"]
                ]
        return out


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """nat's host state in ``tmp_path``: a fake table, fake links, a fake sysctl; as if
    root."""
    fake = FakeNft()
    made: set[str] = set()
    forgotten: list[str] = []
    forward = tmp_path / "ip_forward"
    forward.write_text("0\n")
    monkeypatch.setattr(nft, "run", fake.run)
    inner = FakeNft()  # the tables in the kernels' own namespaces
    monkeypatch.setattr(nft, "run_here", inner.run)
    monkeypatch.setattr(links, "in_netns", lambda pid, work: work())
    monkeypatch.setattr(links, "host_addresses", lambda: ("192.0.2.2/32",))
    monkeypatch.setattr(nat, "NET_DIR", tmp_path / "net")
    monkeypatch.setattr(network, "NET_DIR", tmp_path / "net")
    monkeypatch.setattr(nat, "_FORWARD", forward)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(links, "create", lambda ifname, *a: made.add(ifname))
    monkeypatch.setattr(links, "delete", lambda ifname: made.discard(ifname))
    monkeypatch.setattr(links, "counters", lambda ifname: (10, 20))
    monkeypatch.setattr(
        nat, "host_routes", lambda: [("eth0", "0.0.0.0/0"), ("eth0", "192.0.2.0/24")]
    )
    monkeypatch.setattr(links, "forget_connections", lambda address: forgotten.append(address))
    monkeypatch.setattr(nat, "host_links", lambda: sorted(made))
    monkeypatch.setattr(network, "host_links", lambda: sorted(made))
    return {
        "nft": fake,
        "links": made,
        "forward": forward,
        "forgotten": forgotten,
        "inner": inner,
    }


def _config() -> NatConfig:
    return NatConfig(allow=parse_allow_list(["198.18.9.0/24"]), subnet="198.18.64.0/29", dns=())


def test_leases_take_free_addresses_and_the_last_detach_undoes_the_host(
    fake_host: dict[str, Any],
) -> None:
    a, b = (
        nat.Attachment("sk-aaaaaaaaaaaa", _config()),
        nat.Attachment("sk-bbbbbbbbbbbb", _config()),
    )
    a.reserve(1, "1")
    b.reserve(1, "1")
    assert a.lease is not None and b.lease is not None
    assert (a.lease.address, b.lease.address, a.lease.gateway) == (
        "198.18.64.2",
        "198.18.64.3",
        "198.18.64.1",
    )
    assert fake_host["forward"].read_text() == "1\n" and fake_host["nft"].table
    a.attach(os.getpid())
    b.attach(os.getpid())
    assert fake_host["links"] == {"skn-aaaaaaaaaaa", "skn-bbbbbbbbbbb"}
    # the second layer, in each kernel's own namespace: the host's addresses refused first
    (inner,) = [c for c in fake_host["inner"].calls if any("table" in x.get("add", {}) for x in c)][
        :1
    ]
    rules = json.dumps(inner)
    assert '"198.18.64.1"' in rules and '"192.0.2.2"' in rules and '"198.18.9.0"' in rules
    assert a.stats()["bytes_in"] == 10 and a.stats()["address"] == "198.18.64.2"
    a.detach()
    a.detach()  # a second call does nothing more
    assert fake_host["nft"].table and fake_host["forward"].read_text() == "1\n"
    b.detach()
    assert not fake_host["nft"].table and fake_host["links"] == set()
    assert fake_host["forward"].read_text() == "0\n"  # turned off again: it was off
    assert nat.leftovers() == []


def test_a_refresh_swaps_the_rules_when_a_name_moves(
    fake_host: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"a.example": ["198.18.1.1"]}
    monkeypatch.setattr(nat, "resolve_host", lambda name: answers[name])
    config = NatConfig(allow=parse_allow_list(["a.example:443"]), subnet="198.18.64.0/29", dns=())
    a = nat.Attachment("sk-aaaaaaaaaaaa", config)
    a.reserve(1, "1")
    a.attach(os.getpid())
    assert a.allowed == (("198.18.1.1/32", 443),)
    calls = len(fake_host["nft"].calls)
    assert a.refresh() is False and len(fake_host["nft"].calls) == calls  # unchanged: no-op
    answers["a.example"] = ["198.18.1.9"]
    assert a.refresh() is True
    (swap,) = fake_host["nft"].calls[calls:]
    assert swap[0] == {
        "flush": {"chain": {"family": "inet", "table": "sandbox_kernel", "name": "k-aaaaaaaaaaa"}}
    }
    assert any('"198.18.1.9"' in json.dumps(c) for c in swap)
    assert not any('"198.18.1.1"' in json.dumps(c) for c in swap)
    a.detach()


def test_addresses_go_round_and_a_gone_kernels_connections_are_forgotten(
    fake_host: dict[str, Any],
) -> None:
    a = nat.Attachment("sk-aaaaaaaaaaaa", _config())
    a.reserve(1, "1")
    a.attach(os.getpid())
    a.detach()
    assert fake_host["forgotten"] == ["198.18.64.2"]
    b = nat.Attachment("sk-bbbbbbbbbbbb", _config())
    b.reserve(1, "1")
    assert b.lease is not None and b.lease.address == "198.18.64.3", "not .2 again at once"
    b.detach()
    c = [nat.Attachment(f"sk-c{i:011x}", _config()) for i in range(4)]
    for att in c:
        att.reserve(1, "1")
    assert [att.lease.address for att in c if att.lease] == [
        "198.18.64.4",
        "198.18.64.5",
        "198.18.64.6",
        "198.18.64.2",
    ]
    for att in c:
        att.detach()


def test_a_state_folder_not_roots_alone_is_refused(fake_host: dict[str, Any]) -> None:
    a = nat.Attachment("sk-aaaaaaaaaaaa", _config())
    a.reserve(1, "1")
    a.detach()
    network.NET_DIR.chmod(0o755)
    with pytest.raises(SandboxError, match="closed to others"):
        nat.Attachment("sk-bbbbbbbbbbbb", _config()).reserve(1, "1")
    network.NET_DIR.chmod(0o700)


def test_collect_does_not_wait_for_a_busy_lock(fake_host: dict[str, Any]) -> None:
    a = nat.Attachment("sk-aaaaaaaaaaaa", _config())
    a.reserve(200, "6")
    with nat._locked():
        assert nat.collect(lambda pid, start: False) == []  # busy: the next gc will do
    assert "network lease 198.18.64.2" in nat.collect(lambda pid, start: False)


def test_a_router_keeps_forwarding(fake_host: dict[str, Any]) -> None:
    fake_host["forward"].write_text("1\n")
    a = nat.Attachment("sk-aaaaaaaaaaaa", _config())
    a.reserve(1, "1")
    a.detach()
    assert fake_host["forward"].read_text() == "1\n"


def test_a_full_subnet_is_a_clear_error(fake_host: dict[str, Any]) -> None:
    taken = []
    for i in range(5):  # a /29 has .2 to .6 for kernels
        att = nat.Attachment(f"sk-{i:012x}", _config())
        att.reserve(1, "1")
        taken.append(att)
    with pytest.raises(SpecError, match=r"no free address .* larger network_subnet"):
        nat.Attachment("sk-ffffffffffff", _config()).reserve(1, "1")
    for att in taken:
        att.detach()
    assert nat.leftovers() == []


def test_collect_removes_what_dead_owners_left_and_keeps_the_living(
    fake_host: dict[str, Any],
) -> None:
    live, dead = (
        nat.Attachment("sk-aaaaaaaaaaaa", _config()),
        nat.Attachment("sk-bbbbbbbbbbbb", _config()),
    )
    live.reserve(100, "5")
    dead.reserve(200, "6")
    live.attach(os.getpid())
    dead.attach(os.getpid())
    fake_host["links"].add("skn-ccccccccccc")  # a link no lease names
    removed = nat.collect(lambda pid, start: pid == 100 and start == "5")
    assert "network lease 198.18.64.3" in removed and "network link skn-ccccccccccc" in removed
    assert fake_host["links"] == {"skn-aaaaaaaaaaa"}
    assert firewall.kernels() == ["aaaaaaaaaaa"]
    assert nat.collect(lambda pid, start: False) == [
        "network lease 198.18.64.2",
        "firewall table inet sandbox_kernel",
    ]
    assert nat.leftovers() == [] and fake_host["forward"].read_text() == "0\n"
    assert nat.collect(lambda pid, start: False) == []  # nothing there: nothing done


def test_a_failed_attach_removes_what_it_made(
    fake_host: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ifname: str, *a: Any) -> None:
        fake_host["links"].add(ifname)
        raise links.LinkError(f"network link {ifname}: no")

    monkeypatch.setattr(links, "create", broken)
    a = nat.Attachment("sk-aaaaaaaaaaaa", _config())
    a.reserve(1, "1")
    with pytest.raises(links.LinkError):
        a.attach(os.getpid())
    assert fake_host["links"] == set() and firewall.kernels() == []
    a.detach()
    assert nat.leftovers() == []


def test_host_resolvers_leave_out_loopback(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "nameserver 127.0.0.53\nnameserver 198.18.0.53\nnameserver ::1\n"
        "search example\nnameserver 198.18.0.54\nnameserver 198.18.0.53\n"
    )
    assert nat.host_resolvers(str(conf)) == ("198.18.0.53", "198.18.0.54")
    assert nat.host_resolvers(str(tmp_path / "missing")) == ()


def test_run_takes_the_network_options_only_with_nat() -> None:
    from sandbox_kernel.cli.run import _nat_config

    def args(**kw: Any) -> argparse.Namespace:
        base: dict[str, Any] = dict(network="none", allow=[], bandwidth=None, subnet=None, dns=None)
        base.update(kw)
        return argparse.Namespace(**base)

    assert _nat_config(args()) is None
    with pytest.raises(SpecError, match="--allow, --bandwidth: only with --network nat"):
        _nat_config(args(allow=["198.18.0.1"], bandwidth="1mbit"))
    cfg = _nat_config(
        args(
            network="nat",
            allow=["198.18.0.1:80"],
            bandwidth="2mbit",
            subnet="198.18.64.0/24",
            dns=["198.18.0.53"],
        )
    )
    assert cfg == NatConfig(
        allow=(AllowEntry("198.18.0.1/32", 80),),
        bandwidth=2_000_000,
        subnet="198.18.64.0/24",
        dns=("198.18.0.53",),
    )
    with pytest.raises(SpecError, match="--subnet"):
        _nat_config(args(network="nat", allow=["198.18.0.1"], subnet="x"))


def test_destroy_removes_the_network_even_when_the_cgroup_will_not_go(tmp_path: Path) -> None:
    from sandbox_kernel.errors import CgroupError
    from sandbox_kernel.runtime.container import Container

    calls: list[str] = []

    class StuckCgroup:
        def remove(self) -> None:
            calls.append("cgroup")
            raise CgroupError("cgroup sk-0123456789ab: busy (a process in D state)")

    class Network:
        def detach(self) -> None:
            calls.append("network")

    spec = ContainerSpec(id="sk-0123456789ab", layers=("/x",), command=("true",))
    (tmp_path / spec.id).mkdir()
    c = Container(spec, None, StuckCgroup(), tmp_path, None, Network())  # type: ignore[arg-type]
    with pytest.raises(CgroupError, match="busy"):
        c.destroy()
    assert calls == ["cgroup", "network"]
    assert not (tmp_path / spec.id).exists()


def test_the_hosts_addresses_come_from_the_routing_tries_local_entries(tmp_path: Path) -> None:
    trie = tmp_path / "fib_trie"
    trie.write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     |-- 192.0.2.2\n        /32 host LOCAL\n     |-- 192.0.2.0\n"
        "        /24 link UNICAST\n  |-- 127.0.0.1\n     /32 host LOCAL\n"
        "Local:\n     |-- 192.0.2.2\n        /32 host LOCAL\n     |-- 198.19.7.1\n"
        "        /32 host LOCAL\n     |-- 192.0.2.255\n        /32 link BROADCAST\n"
    )
    assert links.host_addresses(str(trie)) == ("192.0.2.2/32", "198.19.7.1/32")
    assert links.host_addresses(str(tmp_path / "missing")) == ()
