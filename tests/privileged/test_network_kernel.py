"""Kernels with network mode ``nat`` through jupyter_client, as root: a kernelspec asking
for it under a policy that allows it reaches an allowed upstream port, is refused on
another (the counter that ``%sandbox`` shows moves), has the bandwidth the kernelspec
asked for and changes it live within the administrator's ceiling; without the policy it
does not start, and the error names the setting and the fix.

The upstream is tests/netupstream.py's namespace (198.18.0.0/15 only); kernels get no
resolver (network_dns = []), so no packet leaves the machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox_kernel.cli import ps
from sandbox_kernel.network import links, nat
from tests.netupstream import KERNEL_SUBNET, UPSTREAM_NET, Upstream, check_targets
from tests.privileged.test_magics import KERNELS, Kernels, execute, row, sandboxes
from tests.privileged.test_network import network_untouched

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.root_only,
    pytest.mark.images,
    pytest.mark.slow,
]
# the fixtures, shared with the magics tests and the runtime's network tests (the kernels'
# shutdown removes their links, rules and leases; the last one the table)
__all__ = ["network_untouched", "sandboxes"]

ALLOWED, PORT, DENIED_PORT = "198.19.7.2", 8080, 8081
#: The administrator's policy: nat for this server, the upstream network, a ceiling.
POLICY: dict[str, Any] = {
    "allowed_networks": ["none", "nat"],
    "network_allow": [UPSTREAM_NET],
    "allowed_subnets": [KERNEL_SUBNET],
    "max_bandwidth": "16mbit",
}
#: The kernelspec's settings: one port of one upstream address, no resolver.
NAT: dict[str, Any] = {
    "network": "nat",
    "network_allow": [f"{ALLOWED}:{PORT}"],
    "network_subnet": KERNEL_SUBNET,
    "network_dns": [],
    "bandwidth": "8mbit",
}
#: Python 2.7 and 3: one connection, its answer or the error's name (a refused one is
#: dropped: it times out).
PROBE = f"""
import socket
def probe(port):
    try:
        s = socket.create_connection(("{ALLOWED}", port), timeout=2)
    except (socket.error, socket.timeout) as e:
        return "refused: " + type(e).__name__
    s.sendall(b"hello\\n")
    answer = s.makefile().readline().strip()
    s.close()
    return answer
print(probe({PORT}))
print(probe({DENIED_PORT}))
print(probe({DENIED_PORT}))
"""
REPORT = "r = %sandbox\nprint(repr(r))"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    check_targets([f"{ALLOWED}:{PORT}", f"{ALLOWED}:{DENIED_PORT}", *NAT["network_allow"]])
    with Upstream([f"{ALLOWED}:{PORT}", f"{ALLOWED}:{DENIED_PORT}"]) as up:
        yield up


async def report(km: Any) -> str:
    res = await execute(km, REPORT)
    assert res.ok, res
    return res.stdout


@pytest.mark.parametrize("name", KERNELS)
async def test_nat_kernel_reaches_the_allowed_port_only_and_changes_bandwidth_live(
    sandboxes: Kernels, upstream: Upstream, name: str
) -> None:
    km = await sandboxes.start(name, policy=POLICY, **NAT)
    container = sandboxes.provisioner(km).container
    assert container is not None and container.network is not None
    assert container.network.bandwidth == 8_000_000
    text = await report(km)
    assert row(text, "network").startswith("nat, address 198.18.64.")
    assert row(text, "network allow") == f"{ALLOWED}:{PORT}"
    assert row(text, "bandwidth") == "8mbit each way (server allows up to 16mbit)"
    assert row(text, "network refused") == "0 connections refused by policy"

    res = await execute(km, PROBE)
    assert res.ok, res
    allowed, denied, again = res.stdout.splitlines()
    assert allowed == f"hello from {ALLOWED}:{PORT}"
    assert denied.startswith("refused: ") and again.startswith("refused: "), res.stdout
    text = await report(km)
    refused = re.fullmatch(r"(\d+) connections? refused by policy", row(text, "network refused"))
    assert refused and int(refused.group(1)) >= 2, text
    traffic = re.fullmatch(r"(.+) in, (.+) out", row(text, "network traffic"))
    assert traffic and traffic.group(1) != "0 B", text

    # live, within the ceiling; above it refused with the usual message
    res = await execute(km, "%sandbox bandwidth=4mbit")
    assert res.ok and "bandwidth 4mbit each way" in res.stdout, res
    assert container.network.bandwidth == 4_000_000
    assert row(await report(km), "bandwidth").startswith("4mbit each way")
    res = await execute(km, "%sandbox bandwidth=32mbit")
    assert "bandwidth=32mbit refused: this server allows at most 16mbit" in res.stderr, res
    assert container.network.bandwidth == 4_000_000
    # ps (another process's view): the run dir's bandwidth, the link's counters
    (mine,) = [r for r in ps.collect() if r["container_id"] == container.id]
    assert mine["network"]["bandwidth"] == 4_000_000
    assert mine["network"]["bytes_in"] is not None and mine["network"]["bytes_in"] > 0
    ifname = "skn-" + nat.short_name(container.id)
    assert links.counters(ifname) is not None

    # a restart keeps the live bandwidth, as it keeps memory=
    await km.restart_kernel(now=True)
    again_c = sandboxes.provisioner(km).container
    assert again_c is not None and again_c.network is not None
    assert again_c.network.bandwidth == 4_000_000
    assert row(await report(km), "bandwidth").startswith("4mbit each way")


async def test_nat_kernelspec_without_the_policy_does_not_start(
    sandboxes: Kernels, upstream: Upstream
) -> None:
    with pytest.raises(Exception) as info:
        await sandboxes.start("python3-sandbox", **NAT)
    text = str(info.value)
    assert "network='nat' is not allowed by the administrator" in text, text
    assert "SandboxPolicy.allowed_networks" in text and "use network 'none'" in text
    # allowed, but the kernelspec asks beyond the administrator's allow-list
    wider = dict(NAT, network_allow=["198.18.0.0/15"])
    with pytest.raises(Exception) as info:
        await sandboxes.start("python3-sandbox", policy=POLICY, **wider)
    assert "network_allow entry '198.18.0.0/15' is not inside" in str(info.value)
