"""Network mode ``nat`` end to end, as root: real veth links, the product's nftables table,
tbf caps, against an upstream host the test makes (tests/netupstream.py: a network
namespace with addresses from 198.18.0.0/15 only; no packet goes anywhere else: the
kernels get no resolver, and every address a test names is checked against that range).

Every container uses the ``host`` pseudo-image (the host's /usr/bin/python3 runs the
client code), so nothing needs building.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.network import NET_DIR, nat
from sandbox_kernel.network.config import NatConfig, parse_allow_list
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.leftovers import collect_leftovers
from sandbox_kernel.runtime.spec import NetworkMode
from tests.netupstream import HOST_SIDE, KERNEL_SUBNET, Upstream, check_targets
from tests.privileged.test_runtime import PY, make_spec

pytestmark = [pytest.mark.privileged, pytest.mark.root_only, pytest.mark.slow]

ALLOWED = "198.19.7.2"
OTHER = "198.19.7.5"  # an upstream address no allow-list below names
SERVERS = [f"{ALLOWED}:8080", f"{ALLOWED}:8081", f"{OTHER}:8080"]
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

#: The client inside a kernel: one probe per argument (``hello ADDR PORT``, ``bulk ADDR
#: PORT N``, ``sink ADDR PORT N``), one JSON line of results each.
CLIENT = r"""
import json, socket, sys, time

def connect(addr, port, timeout):
    return socket.create_connection((addr, int(port)), timeout=timeout)

def probe(words):
    kind, addr, port = words[:3]
    t0 = time.monotonic()
    if kind == "udp":  # a connected datagram socket hears an ICMP refusal as an error
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((addr, int(port)))
        try:
            s.send(b"x")
            s.recv(16)
            return {"reply": "udp answered"}
        except OSError as e:
            return {"error": type(e).__name__, "errno": e.errno, "after": time.monotonic() - t0}
        finally:
            s.close()
    try:
        s = connect(addr, port, float(words[4]) if kind == "hello" and len(words) > 4 else 3)
    except OSError as e:
        return {"error": type(e).__name__, "errno": e.errno, "after": time.monotonic() - t0}
    with s:
        s.settimeout(30)
        if kind == "hello":
            s.sendall(b"hello\n")
            return {"reply": s.makefile().readline().strip()}
        n = int(words[3])
        if kind == "bulk":
            s.sendall(("bulk %d\n" % n).encode())
            got, first = 0, None
            while True:
                data = s.recv(65536)
                if not data:
                    break
                if first is None:
                    first = time.monotonic()
                got += len(data)
            return {"bytes": got, "seconds": time.monotonic() - first}
        s.sendall(b"sink\n")
        t = time.monotonic()
        chunk = b"y" * 65536
        left = n
        while left > 0:
            s.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile().readline().strip()
        return {"reply": reply, "bytes": n, "seconds": time.monotonic() - t}

args = sys.argv[1:]
if args[:1] == ["--hold"]:  # probe only once the test says so
    sys.stdin.readline()
    args = args[1:]
for arg in args:
    print(json.dumps(probe(arg.split())), flush=True)
if sys.stdin.readline() == "wait\n":
    sys.stdin.readline()
"""


def nat_config(*allow: str, bandwidth: int | None = None) -> NatConfig:
    check_targets(list(allow))
    return NatConfig(
        allow=parse_allow_list(allow, "allow"), bandwidth=bandwidth, subnet=KERNEL_SUBNET, dns=()
    )


def nat_spec(command: list[str], config: NatConfig, **kw: Any) -> Any:
    return make_spec(command, network=NetworkMode.NAT, nat=config, **kw)


def client(*probes: str) -> list[str]:
    for p in probes:
        check_targets([p.split()[1]])
    return [PY, "-c", CLIENT, *probes]


class Running:
    """A started ``nat`` container running ``CLIENT``; its results read line by line, then
    it waits on stdin (``finish`` ends it)."""

    def __init__(self, config: NatConfig, *probes: str, hold: bool = False) -> None:
        command = client(*probes)
        if hold:  # the probes wait for ``start_probes``
            command.insert(3, "--hold")
        self.container = Container.create(nat_spec(command, config))
        self.r, w = os.pipe()
        self.stdin_r, self.stdin_w = os.pipe()
        try:
            self.container.start(stdin=self.stdin_r, stdout=w, stderr=subprocess.DEVNULL)
        finally:
            os.close(w)
            os.close(self.stdin_r)
        if not hold:
            os.write(self.stdin_w, b"wait\n")
        self.out = os.fdopen(self.r)

    def start_probes(self) -> None:
        """Let a held client probe (then wait, as the others do)."""
        os.write(self.stdin_w, b"go\nwait\n")

    def results(self, n: int) -> list[dict[str, Any]]:
        return [json.loads(self.out.readline()) for _ in range(n)]

    def finish(self) -> None:
        os.close(self.stdin_w)
        self.container.wait(30)
        self.out.close()
        self.container.destroy()


def run_client(config: NatConfig, *probes: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the probes in a fresh ``nat`` kernel: their results and the kernel's network
    figures read before it ends."""
    running = Running(config, *probes)
    try:
        results = running.results(len(probes))
        return results, running.container.network_stats()
    finally:
        running.finish()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream(SERVERS) as up:
        yield up


@pytest.fixture(autouse=True)
def network_untouched() -> Iterator[None]:
    """Each test leaves no lease, link, table or forwarding change of the product."""
    before = FORWARD.read_text()
    assert nat.leftovers() == [], "the product's network state was there before the test"
    yield
    deadline = time.monotonic() + 10
    while nat.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nat.leftovers() == []
    assert FORWARD.read_text() == before


def test_allowed_upstream_answers_the_rest_is_refused_and_counted(upstream: Upstream) -> None:
    results, stats = run_client(
        nat_config(f"{ALLOWED}:8080"),
        f"hello {ALLOWED} 8080",
        f"hello {ALLOWED} 8081",
        f"hello {OTHER} 8080",
        f"hello {ALLOWED} 8080",
    )
    assert results[0] == {"reply": f"hello from {ALLOWED}:8080"}
    assert results[3] == results[0]
    # refused at once (a TCP reset), not left to time out
    for r in results[1:3]:
        assert r["error"] == "ConnectionRefusedError" and r["after"] < 1, r
    assert stats["mode"] == "nat" and stats["refused"] == 2, stats
    assert stats["address"].startswith("198.18.64."), stats
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0, stats
    assert stats["allow"] == [f"{ALLOWED}:8080"]


def test_a_network_entry_allows_every_port(upstream: Upstream) -> None:
    results, stats = run_client(
        nat_config("198.19.7.0/30"),
        f"hello {ALLOWED} 8080",
        f"hello {ALLOWED} 8081",
        f"hello {OTHER} 8080",
    )
    assert results[0]["reply"].endswith(":8080") and results[1]["reply"].endswith(":8081")
    assert results[2]["error"] == "ConnectionRefusedError"  # .5 is outside /30
    assert stats["refused"] == 1


def test_the_host_and_other_kernels_are_out_of_reach(upstream: Upstream) -> None:
    """Allowing the whole test range (the host's own upstream address is in it) still
    reaches neither the host (its listener there, the gateway) nor another kernel."""
    listener = socket.create_server((HOST_SIDE, 0))
    port = listener.getsockname()[1]
    listener.settimeout(0)
    other = Running(nat_config("198.18.0.0/15"))
    try:
        peer = other.container.network_stats()["address"]
        check_targets([peer])
        results, _ = run_client(
            nat_config("198.18.0.0/15"),
            f"hello {HOST_SIDE} {port} 1",
            f"hello 198.18.64.1 {port} 1",
            f"hello {peer} 8080 1",
            f"hello {ALLOWED} 8080",
        )
    finally:
        other.finish()
    # the host's addresses: refused inside the kernel's own namespace (host unreachable,
    # at once) before a packet leaves it; the other kernel's: dropped by the host (a
    # timeout); the host never answers (its listener saw no connection, below)
    for r in results[:2]:
        assert r.get("errno") == errno.EHOSTUNREACH and r["after"] < 1, results
    assert results[2].get("error") == "TimeoutError", results
    assert results[3]["reply"] == f"hello from {ALLOWED}:8080"
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


NO_ADMIN = r"""
import socket, subprocess
out = []
for family, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                            (socket.AF_PACKET, socket.SOCK_RAW, 0)):
    try:
        socket.socket(family, kind, proto)
        out.append("raw socket opened")
    except OSError:  # EPERM (no CAP_NET_RAW), or a family the syscall filter refuses
        pass
for cmd in ("ip addr add 198.18.64.200/32 dev eth0", "ip route del default",
            "ip link set eth0 down", "tc qdisc del dev eth0 root",
            "ip link add x type dummy"):
    r = subprocess.run(cmd.split(), capture_output=True)
    if r.returncode == 0:
        out.append("allowed: " + cmd)
print(subprocess.run(["ip", "-o", "-4", "addr", "show", "eth0"], capture_output=True,
                     text=True).stdout.split()[3])
print(subprocess.run(["ip", "route"], capture_output=True, text=True).stdout.strip())
print(out)
"""


def test_a_kernel_cannot_change_its_network_nor_open_raw_sockets() -> None:
    spec = nat_spec([PY, "-c", NO_ADMIN], nat_config(f"{ALLOWED}:8080", bandwidth=8_000_000))
    out_path = Path(f"/tmp/{spec.id}.out")
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            assert c.wait(30).status == 0
            address = c.network_stats()["address"]
            out.seek(0)
            lines = out.read().splitlines()
    finally:
        out_path.unlink(missing_ok=True)
    assert lines[0] == f"{address}/32"
    assert lines[1] == "default via 198.18.64.1 dev eth0 proto static onlink"
    assert lines[2] == "[]"


def test_mode_none_has_only_loopback() -> None:
    spec = make_spec(["cat", "/proc/net/dev"])
    out_path = Path(f"/tmp/{spec.id}.out")
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            assert c.wait(30).status == 0
            out.seek(0)
            names = [line.split(":")[0].strip() for line in out.read().splitlines()[2:]]
    finally:
        out_path.unlink(missing_ok=True)
    assert names == ["lo"]
    assert nat.leftovers() == []


#: tbf caps what goes on the link: a bulk TCP transfer's payload is 1448 of each 1514
#: bytes there (Ethernet, IPv4 and TCP headers with timestamps, at MTU 1500)
ON_THE_LINK = 1514 / 1448


def _rate(result: dict[str, Any]) -> float:
    """The transfer's rate on the link, bits per second (its payload's, headers added)."""
    return float(result["bytes"]) * 8 / float(result["seconds"]) * ON_THE_LINK


CAP, SIZE = 16_000_000, 8_000_000  # 4 s at the cap


def check_caps_both_ways(allowed: str) -> None:
    """A kernel capped at 16 mbit/s downloads and uploads 5 MB from ``allowed``:8080 within
    10% of its cap (also the rootless tests' check)."""
    results, _ = run_client(
        nat_config(f"{allowed}:8080", bandwidth=CAP),
        f"bulk {allowed} 8080 {SIZE}",
        f"sink {allowed} 8080 {SIZE}",
    )
    down, up = _rate(results[0]), _rate(results[1])
    assert results[0]["bytes"] == SIZE and results[1]["reply"] == f"got {SIZE}"
    assert abs(down - CAP) / CAP < 0.10, f"download {down / 1e6:.2f} mbit/s, cap 16"
    assert abs(up - CAP) / CAP < 0.10, f"upload {up / 1e6:.2f} mbit/s, cap 16"


def test_bandwidth_caps_both_directions_and_each_kernel_gets_its_own(upstream: Upstream) -> None:
    check_caps_both_ways(ALLOWED)
    cap, size = CAP, SIZE
    # two kernels at once: each gets its own cap
    pair = [
        Running(nat_config(f"{ALLOWED}:8080", bandwidth=cap), f"bulk {ALLOWED} 8080 {size}")
        for _ in range(2)
    ]
    try:
        rates = [_rate(p.results(1)[0]) for p in pair]
    finally:
        for p in pair:
            p.finish()
    for rate in rates:
        assert abs(rate - cap) / cap < 0.10, [f"{r / 1e6:.2f}" for r in rates]


def test_a_live_bandwidth_change_applies_to_the_running_kernel(upstream: Upstream) -> None:
    running = Running(nat_config(f"{ALLOWED}:8080", bandwidth=64_000_000))
    try:
        running.container.set_bandwidth(8_000_000)
        stats = running.container.network_stats()
        assert stats["bandwidth"] == 8_000_000
        out = subprocess.run(
            ["tc", "qdisc", "show", "dev", f"skn-{nat.short_name(running.container.id)}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "rate 8Mbit" in out, out
    finally:
        running.finish()


def test_200_create_destroy_cycles_leave_nothing() -> None:
    config = nat_config(f"{ALLOWED}:8080")
    for _ in range(200):
        with Container.create(nat_spec(["true"], config)) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            assert c.wait(30).status == 0
    assert nat.leftovers() == []


OWNER = r"""
import subprocess, sys
from sandbox_kernel.network.config import NatConfig, parse_allow_list
from sandbox_kernel.runtime.spec import NetworkMode
from tests.privileged.test_runtime import make_spec
from sandbox_kernel.runtime.container import Container
config = NatConfig(allow=parse_allow_list(["198.19.7.2:8080"]), subnet=sys.argv[1], dns=())
print("go", flush=True)
c = Container.create(make_spec(["sleep", "60"], network=NetworkMode.NAT, nat=config))
c.start(stdin=subprocess.DEVNULL)
print("started", flush=True)
sys.stdin.read()
"""


def test_kill_9_of_the_owner_at_any_moment_leaves_nothing_gc_does_not_remove() -> None:
    rng = random.Random(os.getpid())
    for round_ in range(6):
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER, KERNEL_SUBNET],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        try:
            assert owner.stdout is not None and owner.stdout.readline() == "go\n"
            if round_ == 5:
                assert owner.stdout.readline() == "started\n"  # once with everything made
            else:
                time.sleep(rng.uniform(0, 0.15))  # somewhere in create or start
        finally:
            owner.kill()
            owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its executor takes the container down
            collect_leftovers()
            if nat.leftovers() == []:
                break
            time.sleep(0.2)
        assert nat.leftovers() == [], f"round {round_}"


def test_gc_removes_a_crashed_kernels_network(upstream: Upstream) -> None:
    """A kernel whose server died by SIGKILL (forged here) leaves its lease, link and rules;
    gc removes them, and then the table and the forwarding change go too."""
    running = Running(nat_config(f"{ALLOWED}:8080"))
    c = running.container
    lease_dir = NET_DIR / "leases"
    (lease,) = list(lease_dir.iterdir())
    doc = json.loads(lease.read_text())
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    doc["owner"] = dead.pid
    lease.write_text(json.dumps(doc))
    assert c.proc is not None
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(5)
    assert any(x.startswith("link ") for x in nat.leftovers())
    report = collect_leftovers()
    assert any(x.startswith("network lease 198.18.64.") for x in report.network), report
    assert nat.leftovers() == []
    c.network = None  # gone already: destroy only removes the rest
    running.finish()


def test_parallel_starts_get_distinct_addresses(upstream: Upstream) -> None:
    config = nat_config(f"{ALLOWED}:8080")
    got: list[Any] = []

    def one() -> None:
        got.append(run_client(config, f"hello {ALLOWED} 8080"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 4
    assert all(r[0][0]["reply"] == f"hello from {ALLOWED}:8080" for r in got)
    assert len({r[1]["address"] for r in got}) == 4


def test_the_cli_runs_a_command_with_nat(upstream: Upstream) -> None:
    code = textwrap.dedent(
        f"""
        import socket
        s = socket.create_connection(("{ALLOWED}", 8080), timeout=3)
        s.sendall(b"hello\\n"); print(s.makefile().readline().strip())
        """
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox_kernel",
            "run",
            "--network",
            "nat",
            "--allow",
            f"{ALLOWED}:8080",
            "--subnet",
            KERNEL_SUBNET,
            "--dns",
            "198.19.7.53",
            "--bandwidth",
            "16mbit",
            "host",
            "--",
            PY,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"hello from {ALLOWED}:8080"


def test_udp_out_of_the_list_is_refused_at_once_and_counted(upstream: Upstream) -> None:
    results, stats = run_client(
        nat_config(f"{ALLOWED}:8080"), f"udp {ALLOWED} 9999", f"udp {OTHER} 53"
    )
    # refused, not left to time out: in the kernel's own namespace the send itself fails
    # (EPERM), or the host's ICMP administratively prohibited answers it
    for r in results:
        assert r.get("errno") in (errno.EPERM, errno.ECONNREFUSED, errno.EHOSTUNREACH), results
        assert r["after"] < 1, results
    assert stats["refused"] == 2, stats


def test_a_refresh_moves_a_names_rules_to_its_new_addresses(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real table: a host name resolved at create, then again after it moved."""
    answers = {"upstream.test": [ALLOWED]}
    monkeypatch.setattr(nat, "resolve_host", lambda name: answers[name])
    config = NatConfig(allow=parse_allow_list(["upstream.test:8080"]), subnet=KERNEL_SUBNET, dns=())
    check_targets([ALLOWED, OTHER])
    running = Running(config)
    try:
        assert running.container.refresh_network() is False  # unchanged: nothing swapped
        answers["upstream.test"] = [OTHER]
        assert running.container.refresh_network() is True
        name = nat.short_name(running.container.id)
        listed = subprocess.run(
            ["nft", "list", "chain", "inet", "sandbox_kernel", f"k-{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert OTHER in listed and f"{ALLOWED} " not in listed, listed
        assert running.container.network_stats()["refused"] == 0
    finally:
        running.finish()


def test_the_kernels_own_namespace_holds_its_rules_when_the_hosts_table_is_gone(
    upstream: Upstream,
) -> None:
    """The host's ruleset flushed while a kernel runs (the product's table deleted, as a
    reload of the host's nftables service does): the rules in the kernel's own namespace
    still refuse what its allow-list does not name and the host's addresses, at once."""
    listener = socket.create_server((HOST_SIDE, 0))
    port = listener.getsockname()[1]
    listener.settimeout(0)
    probes = (
        f"hello {ALLOWED} 8080",
        f"hello {ALLOWED} 8081",
        f"hello {OTHER} 8080",
        f"hello {HOST_SIDE} {port} 1",
    )
    running = Running(nat_config(f"{ALLOWED}:8080"), *probes, hold=True)
    try:
        subprocess.run(["nft", "delete", "table", "inet", "sandbox_kernel"], check=True)
        running.start_probes()
        results = running.results(len(probes))
    finally:
        running.finish()
        listener_got = True
        try:
            listener.accept()
        except BlockingIOError:
            listener_got = False
        listener.close()
    # (what is allowed may not get through without the host's masquerade: not asserted)
    for r in results[1:]:
        assert r.get("errno") in (errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EPERM), results
        assert r["after"] < 1, results
    assert not listener_got, "the host's listener was reached"
