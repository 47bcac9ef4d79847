"""N: what network mode ``nat`` costs, against mode ``none`` and the host's own loopback.

N1: container setup time, create -> the command's execve, ``nat`` vs ``none`` interleaved
(the added time is the per-pair difference; the issue's goal is <= 5 ms), with the
``network`` phase (rules and links made while init waits) on its own.
N2: bulk TCP throughput, a kernel downloading from an upstream host through its veth,
NAT and firewall vs the same client on the host against a server on 127.0.0.1.
N3: the round trip of a small TCP message (ping-pong on one connection), the same two
ways: the latency ``nat`` adds per packet.

The upstream host is the tests' (tests/netupstream.py: a namespace on 198.18.0.0/15; no
packet goes anywhere else). Needs root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from sandbox_kernel.network.config import NatConfig, parse_allow_list
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, NetworkMode

from .stats import Figure

UPSTREAM = "198.19.7.2"
PORT = 8080
PY = "/usr/bin/python3"

CLIENT = r"""
import json, socket, sys, time
host, port, kind, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if kind == "bulk":
    s.sendall(b"bulk %d\n" % n)
    got, t0 = 0, None
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        t0 = t0 or time.perf_counter()
        got += len(data)
    print(json.dumps({"bits_per_s": got * 8 / (time.perf_counter() - t0)}))
else:
    s.sendall(b"echo\n")
    f = s.makefile("rb")
    rtts = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(b"x\n")
        f.readline()
        rtts.append(time.perf_counter() - t)
    rtts.sort()
    print(json.dumps({"rtt_us": rtts[len(rtts) // 2] * 1e6}))
"""


def _spec(command: list[str], nat: NatConfig | None) -> ContainerSpec:
    spec = ContainerSpec(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=tuple(command),
        mounts=hostimage.binds(),
        network=NetworkMode.NAT if nat else NetworkMode.NONE,
        nat=nat,
    )
    return userns.for_caller().apply(spec)


def _in_kernel(config: NatConfig, *args: str) -> dict[str, float]:
    spec = _spec([PY, "-c", CLIENT, *args], config)
    with Container.create(spec) as c:
        r, w = os.pipe()
        c.start(stdin=subprocess.DEVNULL, stdout=w)
        os.close(w)
        with open(r) as out:
            line = out.readline()
        c.wait(120)
    return dict(json.loads(line))


def _on_host(*args: str) -> dict[str, float]:
    out = subprocess.run([PY, "-c", CLIENT, *args], capture_output=True, text=True, timeout=120)
    return dict(json.loads(out.stdout))


def _loopback_server() -> tuple[int, subprocess.Popen[str]]:
    """The upstream's server script on the host's 127.0.0.1 (the loopback baseline)."""
    from tests.netupstream import SERVER

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, f"127.0.0.1:{port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return port, proc


def measure(runs: int = 30, transfers: int = 5, size: int = 200_000_000) -> list[Figure]:
    from tests.netupstream import KERNEL_SUBNET, Upstream

    config = NatConfig(allow=parse_allow_list([f"{UPSTREAM}:{PORT}"]), subnet=KERNEL_SUBNET, dns=())
    setup = {m: Figure(f"N1 setup, network {m}: create -> execve", "ms") for m in ("none", "nat")}
    phase = Figure("N1 nat: rules and links made (init waits meanwhile)", "ms")
    added = Figure("N1 setup added by nat (per pair)", "ms", target="<= 5 ms", limit=5.0)
    for warm in (None, config):  # the first of each loads libnftables, pyroute2, the image
        with Container.create(_spec(["/bin/true"], warm)) as c:
            c.start(stdout=subprocess.DEVNULL)
            c.wait(30)
    for _ in range(runs):
        pair = {}
        for mode in ("none", "nat"):
            t0 = time.perf_counter()
            with Container.create(_spec(["/bin/true"], config if mode == "nat" else None)) as c:
                c.start(stdout=subprocess.DEVNULL)
                pair[mode] = (time.perf_counter() - t0) * 1000
                if mode == "nat":
                    phase.values.append(c.phases.ms["(network attach)"])
                c.wait(30)
            setup[mode].values.append(pair[mode])
        added.values.append(pair["nat"] - pair["none"])
    figs = [setup["none"], setup["nat"], added, phase]
    down = {k: Figure(f"N2 bulk TCP {k}", "Gbit/s") for k in ("nat kernel", "host loopback")}
    rtt = {k: Figure(f"N3 round trip {k}", "us") for k in ("nat kernel", "host loopback")}
    port, lo = _loopback_server()
    try:
        with Upstream([f"{UPSTREAM}:{PORT}"]):
            for _ in range(transfers):
                down["nat kernel"].values.append(
                    _in_kernel(config, UPSTREAM, str(PORT), "bulk", str(size))["bits_per_s"] / 1e9
                )
                down["host loopback"].values.append(
                    _on_host("127.0.0.1", str(port), "bulk", str(size))["bits_per_s"] / 1e9
                )
                rtt["nat kernel"].values.append(
                    _in_kernel(config, UPSTREAM, str(PORT), "echo", "2000")["rtt_us"]
                )
                rtt["host loopback"].values.append(
                    _on_host("127.0.0.1", str(port), "echo", "2000")["rtt_us"]
                )
    finally:
        if lo.stdin:
            lo.stdin.close()
        lo.kill()
        lo.wait(10)
    share = Figure(
        "N2 throughput ratio nat kernel / host loopback",
        "x",
        [
            a / b
            for a, b in zip(down["nat kernel"].values, down["host loopback"].values, strict=True)
        ],
    )
    extra = Figure(
        "N3 latency added by nat per round trip",
        "us",
        [a - b for a, b in zip(rtt["nat kernel"].values, rtt["host loopback"].values, strict=True)],
    )
    return [*figs, *down.values(), share, *rtt.values(), extra]
