"""Network mode ``nat`` without root: a user-mode stack (slirp4netns) per kernel, the
allow-list, refused counter and caps in the kernel's own network namespace
(docs/network-rootless.md). Run by tools/rootless-tests.sh as its unprivileged users (with
and without a subordinate id range), against the upstream that script makes as root first
(``python -m tests.netupstream --rootless``: a namespace on 198.19.9.0/24, joined to the
host by a veth pair; an unprivileged user cannot make one). Every address here is in
198.18.0.0/15 or loopback, and the kernels get no resolver.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.network.usermode import PID_FILE, STACK
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.leftovers import collect_leftovers
from tests.conftest import ROOTLESS
from tests.netupstream import ROOTLESS_ALLOWED as ALLOWED
from tests.netupstream import ROOTLESS_HOST_SIDE as HOST_SIDE
from tests.netupstream import ROOTLESS_OTHER as OTHER
from tests.privileged.test_magics import sandboxes
from tests.privileged.test_network import (
    Running,
    check_caps_both_ways,
    nat_config,
    nat_spec,
    run_client,
)

pytestmark = [pytest.mark.privileged, pytest.mark.rootless_only, pytest.mark.slow]
__all__ = ["sandboxes"]  # the fixture, shared with the magics tests

#: The user-mode stack puts the kernel at the subnet's address 100 and stands for the host
#: at its address 2.
ADDRESS = "198.18.64.100"
GATEWAY = "198.18.64.2"


def stacks() -> list[int]:
    """The pids of this user's user-mode stacks."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != STACK:
                    continue
            if os.stat(f"/proc/{entry}").st_uid == os.getuid():
                out.append(int(entry))
        except OSError:
            continue
    return out


@pytest.fixture(scope="module", autouse=True)
def upstream() -> None:
    """The upstream of tools/rootless-tests.sh answers (a failure there, not a skip, in
    its run)."""
    try:
        with socket.create_connection((ALLOWED, 8080), timeout=3) as s:
            s.sendall(b"hello\n")
            assert s.makefile().readline().startswith("hello from")
    except OSError as exc:
        if ROOTLESS:
            raise AssertionError(f"the upstream of tools/rootless-tests.sh: {exc}") from None
        pytest.skip("needs the upstream tools/rootless-tests.sh makes as root")


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    """Each test leaves no user-mode stack running."""
    assert stacks() == [], "a user-mode stack ran before the test"
    yield
    deadline = time.monotonic() + 10
    while stacks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stacks() == []


def test_allowed_upstream_answers_the_rest_is_refused_and_counted() -> None:
    results, stats = run_client(
        nat_config(f"{ALLOWED}:8080"),
        f"hello {ALLOWED} 8080",
        f"hello {ALLOWED} 8081",
        f"hello {OTHER} 8080",
        f"hello {ALLOWED} 8080",
    )
    assert results[0] == {"reply": f"hello from {ALLOWED}:8080"}
    assert results[3] == results[0]
    for r in results[1:3]:  # refused at once (a TCP reset), not left to time out
        assert r["error"] == "ConnectionRefusedError" and r["after"] < 1, r
    assert stats["mode"] == "nat" and stats["refused"] == 2, stats
    assert stats["address"] == ADDRESS, stats
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0, stats


def test_the_hosts_loopback_and_own_addresses_are_out_of_reach() -> None:
    """Allowing the whole test range (the stack's gateway, which stands for the host's
    loopback, and the host's own upstream address are in it) reaches neither a listener
    on the host's loopback nor one on the host's address."""
    loop = socket.create_server(("127.0.0.1", 0))
    own = socket.create_server((HOST_SIDE, 0))
    try:
        lport, oport = loop.getsockname()[1], own.getsockname()[1]
        results, stats = run_client(
            nat_config("198.18.0.0/15"),
            f"hello {GATEWAY} {lport} 2",
            f"hello {HOST_SIDE} {oport} 2",
            f"hello {ALLOWED} 8080",
        )
        assert results[0]["error"] in ("ConnectionRefusedError", "OSError"), results
        assert results[1]["error"] in ("ConnectionRefusedError", "OSError"), results
        assert results[2] == {"reply": f"hello from {ALLOWED}:8080"}
        assert stats["refused"] == 2, stats
        for listener in (loop, own):
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        loop.close()
        own.close()


@pytest.mark.parametrize(
    "as_root", [False, pytest.param(True, marks=pytest.mark.container_root)], ids=["user", "root"]
)
def test_a_kernel_cannot_change_its_network_nor_open_raw_sockets(as_root: bool) -> None:
    """Not even the namespace's root (with a subordinate range): no capabilities."""
    probe = textwrap.dedent(
        """
        import socket, subprocess
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            print("raw: opened")
        except PermissionError:
            print("raw: refused")
        for cmd in (["ip", "link", "set", "eth0", "down"], ["nft", "flush", "ruleset"],
                    ["tc", "qdisc", "del", "dev", "eth0", "root"]):
            rc = subprocess.run(cmd, capture_output=True).returncode
            print(cmd[0], "refused" if rc else "changed")
        """
    )
    out_path = Path(f"/tmp/sk-net-rl-{os.getpid()}.out")
    root = {"user": 0, "group": 0, "allow_root": True} if as_root else {}
    spec = nat_spec(["/usr/bin/python3", "-c", probe], nat_config(f"{ALLOWED}:8080"), **root)
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            c.wait(60)
            out.seek(0)
            text = out.read()
    finally:
        out_path.unlink(missing_ok=True)
    assert text.split("\n")[:4] == ["raw: refused", "ip refused", "nft refused", "tc refused"], text


def test_bandwidth_caps_both_directions() -> None:
    check_caps_both_ways(ALLOWED)


SHOW_QDISCS = """
import subprocess, sys
while sys.stdin.readline() == "show\\n":
    for dev in ("eth0", "sk-ifb"):
        out = subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True)
        print(dev, " ".join(out.stdout.split()), flush=True)
"""


def test_a_live_bandwidth_change_and_its_removal() -> None:
    """The kernel itself may read its qdiscs (not change them): both directions' tbf
    follow a live change, and go with its removal."""
    spec = nat_spec(["/usr/bin/python3", "-c", SHOW_QDISCS], nat_config(f"{ALLOWED}:8080"))
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    with Container.create(spec) as c:
        try:
            c.start(stdin=stdin_r, stdout=out_w, stderr=subprocess.DEVNULL)
        finally:
            os.close(stdin_r)
            os.close(out_w)
        with os.fdopen(stdin_w, "w") as to_kernel, os.fdopen(out_r) as from_kernel:

            def qdiscs() -> dict[str, str]:
                to_kernel.write("show\n")
                to_kernel.flush()
                lines = [from_kernel.readline().strip().partition(" ") for _ in range(2)]
                return {dev: rest for dev, _, rest in lines}

            assert "tbf" not in qdiscs()["eth0"]
            c.set_bandwidth(8_000_000)
            assert c.network_stats()["bandwidth"] == 8_000_000
            shown = qdiscs()
            for dev in ("eth0", "sk-ifb"):
                assert "tbf" in shown[dev] and "rate 8Mbit" in shown[dev], shown
            c.set_bandwidth(None)
            assert c.network_stats()["bandwidth"] is None
            shown = qdiscs()
            assert not any("tbf" in v for v in shown.values()), shown
        c.wait(30)


def test_the_stack_ends_with_the_kernel_and_its_pid_file_goes() -> None:
    running = Running(nat_config(f"{ALLOWED}:8080"))
    run_dir = running.container.run_dir
    try:
        (pid,) = stacks()
        assert (run_dir / PID_FILE).read_text().split()[0] == str(pid)
    finally:
        running.finish()
    assert stacks() == [] and not run_dir.exists()


OWNER = """
import sys, subprocess
sys.path[:0] = sys.argv[1:]
from tests.privileged.test_network import nat_config, nat_spec
from sandbox_kernel.runtime.container import Container
c = Container.create(nat_spec(["sleep", "60"], nat_config("198.19.9.2:8080")))
c.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(c.id, flush=True)
sys.stdin.read()
"""


def test_kill_9_of_the_owner_leaves_nothing_gc_does_not_remove() -> None:
    """The stack ends by itself with a SIGKILLed owner (its exit fd), and gc removes the
    rest (the run dir with its pid file)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, *sys.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().strip()
        assert line.startswith("sk-"), line
        assert len(stacks()) == 1
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    deadline = time.monotonic() + 10
    while stacks() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stacks() == [], "the stack outlived its owner"
    while time.monotonic() < deadline + 20:
        report = collect_leftovers()
        if line in report.run_dirs:
            break
        time.sleep(0.5)  # the executor takes its container down first
    else:
        raise AssertionError(f"gc did not remove {line}")


@pytest.mark.images
async def test_a_rootless_servers_nat_kernel_through_jupyter_client(sandboxes: Any) -> None:
    """A kernelspec with network nat under a policy allowing it, started by this
    unprivileged server through jupyter_client: the allowed upstream answers, a refused port
    is counted in ``%sandbox``, and the bandwidth changes live within the ceiling."""
    from tests.netupstream import KERNEL_SUBNET, ROOTLESS_NET
    from tests.privileged.test_magics import execute, row

    policy = {
        "allowed_networks": ["none", "nat"],
        "network_allow": [ROOTLESS_NET],
        "allowed_subnets": [KERNEL_SUBNET],
        "max_bandwidth": "16mbit",
    }
    km = await sandboxes.start(
        "python3-sandbox",
        policy=policy,
        network="nat",
        network_allow=[f"{ALLOWED}:8080"],
        network_subnet=KERNEL_SUBNET,
        network_dns=[],
        bandwidth="8mbit",
    )
    probe = textwrap.dedent(
        f"""
        import socket
        for port in (8080, 8081):
            try:
                s = socket.create_connection(("{ALLOWED}", port), timeout=2)
                s.sendall(b"hello\\n"); print(s.makefile().readline().strip()); s.close()
            except OSError as e:
                print("refused:", type(e).__name__)
        """
    )
    res = await execute(km, probe)
    assert res.ok, res
    answered, refused = res.stdout.splitlines()
    assert answered == f"hello from {ALLOWED}:8080" and refused.startswith("refused: "), res
    report = await execute(km, "r = %sandbox\nprint(repr(r))")
    assert row(report.stdout, "network").startswith("nat"), report.stdout
    counted = re.fullmatch(
        r"(\d+) connections? refused by policy", row(report.stdout, "network refused")
    )
    assert counted and int(counted.group(1)) >= 1, report.stdout
    res = await execute(km, "%sandbox bandwidth=4mbit")
    assert res.ok and "bandwidth 4mbit each way" in res.stdout, res
    res = await execute(km, "%sandbox bandwidth=32mbit")
    assert "refused: this server allows at most 16mbit" in res.stderr, res
