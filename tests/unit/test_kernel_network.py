"""Network mode ``nat`` for kernels: the kernelspec settings, the administrator's policy
(``SandboxPolicy`` and the policy file: modes, the allow-list ceiling, the bandwidth
ceiling, subnets) and the live bandwidth change's checks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sandbox_kernel import policy as hp
from sandbox_kernel.errors import CeilingRefused, LimitRefused, SpecError
from sandbox_kernel.jupyter import resolve as resolve_mod
from sandbox_kernel.jupyter.resolve import Policy, allow_inside, read_policy, resolve_settings
from sandbox_kernel.jupyter.settings import SETTING_NAMES, SandboxPolicy, SandboxSettings
from sandbox_kernel.limits import Ceilings, Limits, check_live, plan_change
from sandbox_kernel.network.config import parse_allow
from sandbox_kernel.runtime.spec import NetworkMode


@pytest.fixture(autouse=True)
def _no_policy_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hp.ENV, hp.NO_FILE)


def values(**over: Any) -> dict[str, Any]:
    s = SandboxSettings()
    out = {name: getattr(s, name) for name in SETTING_NAMES}
    out["image"] = "python3"
    out.update(over)
    return out


def admin(**traits: Any) -> Policy:
    """The server's SandboxPolicy with ``traits`` set, parsed as a kernel start does."""
    return read_policy(SandboxPolicy(**traits))


NAT_OK = {"allowed_networks": ["none", "nat"], "network_allow": ["198.18.0.0/15", "pypi.org:443"]}


def resolve(
    vals: dict[str, Any], policy: Policy, *, server_uid: int = 0, explicit: tuple[str, ...] = ()
) -> Any:
    given = frozenset(explicit) | frozenset(
        k
        for k in ("network", "network_allow", "bandwidth", "network_subnet", "network_dns")
        if vals.get(k) != getattr(SandboxSettings(), k)
    )
    return resolve_settings(
        vals,
        policy,
        explicit=given,
        workdir=None,
        context="kernelspec 'k'",
        server_uid=server_uid,
    )


def problems(vals: dict[str, Any], policy: Policy, **kw: Any) -> str:
    with pytest.raises(SpecError) as info:
        resolve(vals, policy, **kw)
    return str(info.value)


def test_network_none_is_the_default_and_has_no_nat_settings() -> None:
    s = resolve(values(), admin())
    assert s.network is NetworkMode.NONE and s.nat is None


def test_nat_is_refused_by_default_naming_the_policy_and_the_fix() -> None:
    text = problems(values(network="nat", network_allow=["198.18.0.7"]), admin())
    assert "network='nat' is not allowed by the administrator" in text
    assert "SandboxPolicy.allowed_networks: 'none'" in text
    assert "adds 'nat' to SandboxPolicy.allowed_networks" in text


def test_nat_allowed_without_an_admin_allow_list_reaches_nothing() -> None:
    text = problems(values(network="nat"), admin(allowed_networks=["none", "nat"]))
    assert "SandboxPolicy.network_allow = []" in text and "c.SandboxPolicy.network_allow" in text


def test_nat_kernel_gets_its_allow_list_subnet_and_resolvers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = resolve(
        values(network="nat", network_allow=["198.18.1.0/24:80", "pypi.org:443"], network_dns=[]),
        admin(**NAT_OK),
    )
    assert s.network is NetworkMode.NAT and s.nat is not None
    assert [str(e) for e in s.nat.allow] == ["198.18.1.0/24:80", "pypi.org:443"]
    assert s.nat.dns == () and s.nat.subnet == "10.213.0.0/16" and s.nat.bandwidth is None
    # without an allow-list of its own: the administrator's whole list; null dns: the host's
    # resolvers, only those the administrator allows on port 53
    monkeypatch.setattr(resolve_mod, "host_resolvers", lambda: ("198.18.0.53", "10.9.9.9"))
    s = resolve(values(network="nat"), admin(**NAT_OK))
    assert s.nat is not None and [str(e) for e in s.nat.allow] == ["198.18.0.0/15", "pypi.org:443"]
    assert s.nat.dns == ("198.18.0.53",), "10.9.9.9:53 is in no administrator's entry"
    only_pypi = {**NAT_OK, "network_allow": ["pypi.org:443"]}
    s = resolve(values(network="nat"), admin(**only_pypi))
    assert s.nat is not None and s.nat.dns == (), "pypi.org:443 alone opens no DNS"


@pytest.mark.parametrize(
    ("entry", "ceiling", "inside"),
    [
        ("198.18.0.7", "198.18.0.0/15", True),
        ("198.18.0.0/16", "198.18.0.0/15", True),
        ("198.18.0.0/15", "198.18.0.0/15", True),
        ("198.16.0.0/12", "198.18.0.0/15", False),  # wider
        ("198.20.0.1", "198.18.0.0/15", False),  # beside
        ("198.18.0.7:443", "198.18.0.0/15", True),  # any port of the ceiling's
        ("198.18.0.7:443", "198.18.0.0/15:443", True),
        ("198.18.0.7:80", "198.18.0.0/15:443", False),  # another port
        ("198.18.0.7", "198.18.0.0/15:443", False),  # every port is wider than one
        ("pypi.org:443", "pypi.org", True),
        ("pypi.org", "pypi.org", True),
        ("pypi.org", "pypi.org:443", False),
        ("files.pypi.org", "pypi.org", False),  # a name covers only itself
        ("pypi.org", "0.0.0.0/0", False),  # a name may resolve to anything
        ("198.18.0.7", "pypi.org", False),  # and never covers a network
        ("10.0.0.1", "0.0.0.0/0", True),
    ],
)
def test_allow_entry_inside_the_administrators(entry: str, ceiling: str, inside: bool) -> None:
    assert allow_inside(parse_allow(entry), parse_allow(ceiling)) is inside


def test_a_kernelspec_entry_outside_the_admins_list_is_refused_with_both_named() -> None:
    text = problems(
        values(network="nat", network_allow=["198.18.0.7:443", "203.0.113.0/24", "evil.org"]),
        admin(**NAT_OK),
    )
    assert "network_allow entry '198.18.0.7:443'" not in text
    assert "network_allow entry '203.0.113.0/24' is not inside what the administrator" in text
    assert "SandboxPolicy.network_allow: 198.18.0.0/15, pypi.org:443" in text
    assert "network_allow entry 'evil.org'" in text


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("network", "bridge", "network='bridge' is not available; use 'none' (loopback only)"),
        ("network_allow", ["198.18.0.300"], "network_allow entry '198.18.0.300' is not valid"),
        ("network_allow", ["198.18.0.7:0"], "the port must be 1 to 65535"),
        ("network_allow", ["[::1]:80"], "IPv6 is not supported"),
        ("network_allow", "198.18.0.7", "network_allow='198.18.0.7' is not a list"),
        ("bandwidth", "16", "bandwidth='16' has no unit; use bits per second as tc writes"),
        ("bandwidth", "16 furlongs", "unknown unit"),
        ("bandwidth", "1kbit", "bandwidth='1kbit' is too small; use 64kbit to 10gbit"),
        ("network_subnet", "10.0.0.0/31", "network_subnet='10.0.0.0/31' is not valid"),
        ("network_subnet", "192.168.1.0/24", "is not inside a network the administrator allows"),
        ("network_dns", ["resolver"], "network_dns entry 'resolver' is not an IPv4 address"),
        ("network_dns", "198.18.0.53", "network_dns='198.18.0.53' is not valid; use a list"),
    ],
)
def test_bad_forms_name_the_field_and_the_accepted_form(
    field: str, value: Any, expected: str
) -> None:
    vals = values(**{"network": "nat", field: value})
    assert expected in problems(vals, admin(**NAT_OK))


def test_a_resolver_must_be_allowed_on_port_53() -> None:
    ok = {"allowed_networks": ["nat"], "network_allow": ["198.18.0.53:53", "198.18.1.0/24:80"]}
    s = resolve(values(network="nat", network_dns=["198.18.0.53"]), admin(**ok))
    assert s.nat is not None and s.nat.dns == ("198.18.0.53",)
    text = problems(values(network="nat", network_dns=["198.18.1.9"]), admin(**ok))
    assert "network_dns entry '198.18.1.9' (port 53) is not inside" in text


def test_bandwidth_ceiling_caps_a_kernelspec_without_one_and_refuses_one_above() -> None:
    policy = admin(**NAT_OK, max_bandwidth="16mbit")
    s = resolve(values(network="nat"), policy)
    assert s.nat is not None and s.nat.bandwidth == 16_000_000
    s = resolve(values(network="nat", bandwidth="512kbit"), policy)
    assert s.nat is not None and s.nat.bandwidth == 512_000
    text = problems(values(network="nat", bandwidth="1gbit"), policy)
    assert "bandwidth='1gbit' is above the administrator's ceiling" in text
    assert "SandboxPolicy.max_bandwidth = 16mbit" in text


def test_nat_settings_with_network_none_are_an_error() -> None:
    text = problems(values(network_allow=["198.18.0.7"], bandwidth="8mbit"), admin(**NAT_OK))
    assert "network_allow, bandwidth: only with network 'nat'" in text


def test_a_rootless_server_gives_nat_under_the_same_policy() -> None:
    """(Its kernels get a user-mode stack: docs/network-rootless.md.)"""
    s = resolve(values(network="nat"), admin(**NAT_OK), server_uid=1000, explicit=("user",))
    assert s.network is NetworkMode.NAT and s.nat is not None
    text = problems(values(network="nat"), admin(), server_uid=1000, explicit=("user",))
    assert "SandboxPolicy.allowed_networks" in text


@pytest.mark.parametrize(
    ("traits", "expected"),
    [
        ({"allowed_networks": ["none", "host"]}, "SandboxPolicy.allowed_networks: 'host' is not"),
        ({"network_allow": ["198.18.0.0/33"]}, "SandboxPolicy.network_allow entry '198.18.0.0/33'"),
        ({"max_bandwidth": "fast"}, "SandboxPolicy.max_bandwidth='fast' is not a rate"),
        ({"allowed_subnets": ["10.0.0.0/31"]}, "SandboxPolicy.allowed_subnets entry='10.0.0.0/31'"),
    ],
)
def test_a_bad_admin_network_setting_is_the_administrators_error(
    traits: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        admin(**traits)
    assert expected in str(info.value) and "SandboxPolicy (jupyter_server_config.py)" in str(
        info.value
    )


# ---- the policy file: the same keys, the tighter of both wins ---------------------------


def with_file(policy: Policy, raw: dict[str, Any]) -> Policy:
    return replace(policy, host=hp.parse(raw, "/etc/sandbox-kernel/policy.toml"))


def test_policy_file_narrows_modes_allow_list_and_bandwidth() -> None:
    server = admin(**NAT_OK, max_bandwidth="16mbit")
    # the file allows no nat: refused, naming the file
    text = problems(values(network="nat"), with_file(server, {"allowed_networks": ["none"]}))
    assert "allowed_networks in /etc/sandbox-kernel/policy.toml: 'none'" in text
    # the file's list is narrower: a kernelspec entry must lie inside both
    narrow = with_file(server, {"network_allow": ["198.18.5.0/24"], "max_bandwidth": "4mbit"})
    s = resolve(values(network="nat", network_allow=["198.18.5.1"]), narrow)
    assert s.nat is not None and s.nat.bandwidth == 4_000_000, "the file's tighter ceiling"
    text = problems(values(network="nat", network_allow=["198.18.6.1"]), narrow)
    assert "network_allow in /etc/sandbox-kernel/policy.toml: 198.18.5.0/24" in text
    # no list of the kernelspec's: the server's entries that lie inside the file's
    wide = with_file(server, {"network_allow": ["198.0.0.0/8", "pypi.org"]})
    s = resolve(values(network="nat"), wide)
    assert s.nat is not None and [str(e) for e in s.nat.allow] == ["198.18.0.0/15", "pypi.org:443"]
    text = problems(values(network="nat"), narrow)
    assert "no entry of SandboxPolicy.network_allow lies inside network_allow in" in text
    # the file cannot open what the server's config does not
    text = problems(
        values(network="nat"),
        with_file(admin(network_allow=["198.18.0.0/15"]), {"allowed_networks": ["nat"]}),
    )
    assert "SandboxPolicy.allowed_networks: 'none'" in text


def test_policy_file_groups_add_up_and_a_user_section_overrides() -> None:
    raw = {
        "allowed_networks": ["none"],
        "groups": {
            "a": {"allowed_networks": ["nat"], "network_allow": ["198.18.0.0/24"]},
            "b": {"network_allow": ["198.18.1.0/24"], "max_bandwidth": "8mbit"},
        },
        "users": {"0": {"max_bandwidth": "2mbit"}},
    }
    pol = hp.parse(raw, "/p.toml")
    merged = hp._generous([pol.groups["a"], pol.groups["b"]])
    assert merged.networks == ("nat",)
    assert merged.network_allow == ("198.18.0.0/24", "198.18.1.0/24")
    mine = pol.for_user(0)
    assert mine.networks == ("none",) and mine.ceilings.bandwidth == 2_000_000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"network_allow": "198.18.0.0/15"}, "(top level) network_allow must be a list of strings"),
        ({"allowed_networks": [1]}, "(top level) allowed_networks must be a list of strings"),
        ({"max_bandwidth": "16"}, "(top level) max_bandwidth='16' has no unit"),
    ],
)
def test_policy_file_bad_network_keys_are_named(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        hp.parse(raw, "/p.toml")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"groups": {"s": {"network_allow": ["a..b"]}}}, "[groups.s] network_allow entry 'a..b'"),
        ({"users": {"x": {"allowed_networks": ["host"]}}}, "[users.x] allowed_networks: 'host'"),
    ],
)
def test_policy_file_network_entries_are_checked_at_every_start(
    monkeypatch: pytest.MonkeyPatch, raw: dict[str, Any], expected: str
) -> None:
    parsed = hp.parse(raw, "/p.toml")
    monkeypatch.setattr(hp, "load", lambda: parsed)
    with pytest.raises(SpecError) as info:
        admin()
    assert expected in str(info.value) and "the policy file /p.toml" in str(info.value)


# ---- live changes ----------------------------------------------------------------------


def test_live_bandwidth_within_the_ceiling_or_the_kernelspecs() -> None:
    admin_top = Ceilings(bandwidth=16_000_000)
    assert check_live("bandwidth", "8mbit", admin_top) == 8_000_000
    with pytest.raises(CeilingRefused, match="at most 16mbit in each direction per kernel"):
        check_live("bandwidth", "20mbit", admin_top)
    with pytest.raises(LimitRefused, match="has no unit"):
        check_live("bandwidth", "8", admin_top)  # as %sandbox bandwidth=8 sends it
    with pytest.raises(LimitRefused, match="too small"):
        check_live("bandwidth", "1kbit", admin_top)
    # no administrator's ceiling: the kernelspec's start value is the most; none: any
    live = Ceilings().or_start(Limits(), bandwidth=4_000_000)
    with pytest.raises(CeilingRefused, match="the kernelspec's value"):
        check_live("bandwidth", "8mbit", live)
    assert check_live("bandwidth", "1gbit", Ceilings().or_start(Limits())) == 1_000_000_000


def test_plan_change_leaves_bandwidth_to_its_caller_and_refuses_it_without_nat() -> None:
    limits = Limits(memory=1024**3)
    new, _ = plan_change({"bandwidth": "8mbit"}, limits, Ceilings(), None, network=True)
    assert new == limits
    new, _ = plan_change(
        {"bandwidth": "8mbit", "memory": "512M"}, limits, Ceilings(), None, network=True
    )
    assert new.memory == 512 * 1024**2
    with pytest.raises(LimitRefused, match="this kernel has network 'none'"):
        plan_change({"bandwidth": "8mbit"}, limits, Ceilings(), None)
    with pytest.raises(LimitRefused, match="you can change: memory, cpus, pids, bandwidth"):
        plan_change({"speed": "1"}, limits, Ceilings(), None, network=True)
