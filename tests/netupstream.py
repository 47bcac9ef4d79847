"""An "upstream host" for the network tests: TCP servers in a network namespace of the
test's own, joined to the host by a veth pair, with addresses from the benchmarking range
198.18.0.0/15 only (RFC 2544). Used by tests/privileged/test_network.py and the network
benchmark. Nothing here sends a packet to any other address: every address it configures
or connects to is checked against that range first.

The servers speak one line: ``hello`` -> ``hello from ADDR:PORT``; ``bulk N`` -> N bytes,
then close; ``sink`` -> read to the end, answer ``got N``; ``echo`` -> every later line
back, until the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from sandbox_kernel.network import links

TEST_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
#: The kernels' subnet in the tests, and the upstream network (host side .1).
KERNEL_SUBNET = "198.18.64.0/24"
UPSTREAM_NET = "198.19.7.0/24"
HOST_SIDE = "198.19.7.1"
#: The rootless tests' upstream (tests/privileged/test_network_rootless.py), made as root
#: by tools/rootless-tests.sh (``python -m tests.netupstream --rootless``): its own network,
#: so that it never meets the root tests' one.
ROOTLESS_NET = "198.19.9.0/24"
ROOTLESS_HOST_SIDE = "198.19.9.1"
ROOTLESS_ALLOWED = "198.19.9.2"
ROOTLESS_OTHER = "198.19.9.5"
ROOTLESS_SERVERS = [
    f"{ROOTLESS_ALLOWED}:8080",
    f"{ROOTLESS_ALLOWED}:8081",
    f"{ROOTLESS_OTHER}:8080",
]

SERVER = r"""
import socket, socketserver, sys, threading, time
socketserver.StreamRequestHandler.disable_nagle_algorithm = True

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(256).decode().split()
        if not line:
            return
        if line[0] == "hello":
            host, port = self.server.server_address[:2]
            self.wfile.write(f"hello from {host}:{port}\n".encode())
        elif line[0] == "bulk":
            left = min(int(line[1]), 1 << 30)
            chunk = b"x" * 65536
            while left > 0:
                n = min(left, len(chunk))
                self.wfile.write(chunk[:n])
                left -= n
        elif line[0] == "echo":
            for got in self.rfile:
                self.wfile.write(got)
                self.wfile.flush()
        elif line[0] == "sink":
            total = 0
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    break
                total += len(data)
            self.wfile.write(f"got {total}\n".encode())

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

servers = []
deadline = time.monotonic() + 20
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    while True:  # the addresses appear once the test configured this namespace
        try:
            servers.append(Server((host, int(port)), Handler))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
"""


def in_test_range(address: str) -> bool:
    """Is ``address`` (an IPv4 address or network) inside 198.18.0.0/15?"""
    net = ipaddress.IPv4Network(address, strict=False)
    return net.subnet_of(TEST_RANGE)


def check_targets(addresses: Sequence[str]) -> None:
    """Refuse (AssertionError) any address outside the test range: a mistake in a test
    must never send a packet off the machine."""
    bad = [
        a for a in addresses if not in_test_range(a.rsplit(":", 1)[0] if a.count(":") == 1 else a)
    ]
    assert not bad, f"network tests may only use 198.18.0.0/15: {bad}"


class Upstream:
    """The upstream namespace and its servers (``start``/``stop``; a context manager)."""

    def __init__(
        self, servers: Sequence[str], net: str = UPSTREAM_NET, host_side: str = HOST_SIDE
    ) -> None:
        check_targets([net, host_side, *servers])
        self.net, self.host_side = net, host_side
        self.servers = list(servers)
        self.addresses = sorted({s.rsplit(":", 1)[0] for s in servers})
        self.host_if = f"skt{secrets.token_hex(4)}"  # never the product's skn- prefix
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        from pyroute2 import IPRoute

        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-c", SERVER, *self.servers],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        pid = self.proc.pid
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "the upstream namespace did not appear"
            time.sleep(0.01)
        prefix = ipaddress.IPv4Network(self.net).prefixlen
        with IPRoute() as ipr:
            ipr.link(
                "add", ifname=self.host_if, kind="veth", peer={"ifname": "up0", "net_ns_pid": pid}
            )
            index = socket.if_nametoindex(self.host_if)
            ipr.addr("add", index=index, address=self.host_side, prefixlen=prefix)
            ipr.link("set", index=index, state="up")
        with IPRoute(use_socket=links.netns_socket(pid)) as inside:
            (lo,) = inside.link_lookup(ifname="lo")
            inside.link("set", index=lo, state="up")
            (up0,) = inside.link_lookup(ifname="up0")
            for address in self.addresses:
                inside.addr("add", index=up0, address=address, prefixlen=prefix)
            inside.link("set", index=up0, state="up")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"the upstream servers did not start: {line!r}"

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                if self.proc.stdin:
                    self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        links.delete(self.host_if)

    def __enter__(self) -> Upstream:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def upstream(
    servers: Sequence[str], net: str = UPSTREAM_NET, host_side: str = HOST_SIDE
) -> Iterator[Upstream]:
    """``with upstream(["198.19.7.2:8080"]) as up:`` the servers run until the block ends."""
    with Upstream(servers, net, host_side) as up:
        yield up


def main(argv: Sequence[str]) -> int:
    """``python -m tests.netupstream --rootless`` (or ``NET HOST_SIDE SERVER...``): as
    root, the upstream namespace and its servers until SIGTERM or SIGINT (prints ``ready``
    once they listen). The rootless network tests' harness (tools/rootless-tests.sh) runs it
    before the unprivileged users' suites: they cannot make a namespace on the host's
    side."""
    if list(argv) == ["--rootless"]:
        net, host_side, servers = ROOTLESS_NET, ROOTLESS_HOST_SIDE, ROOTLESS_SERVERS
    else:
        net, host_side, *servers = argv
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # taken by sigwait, the block's exit runs
    with upstream(servers, net, host_side):
        print("ready", flush=True)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
