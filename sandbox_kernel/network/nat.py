"""Network mode ``nat``: one container's attachment, and the host state all of them share.

Layer: network. ``runtime.container.Container`` owns one ``Attachment`` per ``nat``
container: ``reserve`` at create (an address lease, the allow-list resolved, the shared
state made), ``attach`` while the container's init waits for ``go`` (firewall rules, then
the links), ``detach`` at destroy (links, rules, lease, then the shared state when it was
the last; each step tolerates "already gone", so a second call does nothing). ``collect``
(gc, and every ``Container.create``) removes what a crash left, found by name.

Host state, all under ``NET_DIR`` (root's, 0700) and its lock file:

* ``leases/ADDRESS``: one per container (JSON: container id, interface, owner pid and
  start time): the address is taken by creating the file (O_EXCL), and the lease names
  every host resource of that container.
* ``forwarding``: present when the product turned IPv4 forwarding on (it was off); the
  last container's detach turns it off again and removes the table.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import select
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PrivilegeError, SandboxError, SpecError
from ..paths import is_private_dir
from . import IF_PREFIX, NET_DIR, anything_there, firewall, host_links, links, nft
from .config import NatConfig, resolve_allow, route_conflicts

_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
#: A lease file is at most this big (the host reads what it wrote, but bounds it anyway).
_LEASE_MAX = 4096
#: How often the owner of a kernel whose allow-list names hosts resolves them again.
REFRESH_S = 300.0
#: ``alive(pid, start)``: is the process that made a lease still that process?
Alive = Callable[[int, str], bool]


def short_name(container_id: str) -> str:
    """The 11 hex digits of ``sk-`` + 12 that name the container's network objects
    (``skn-NAME`` fits the kernel's 15-character interface names)."""
    return container_id.removeprefix("sk-")[:11]


def resolve_host(name: str) -> list[str]:
    """The IPv4 addresses of host name ``name`` (the allow-list's resolver)."""
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def host_resolvers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The host's IPv4 resolvers that a container can reach (loopback ones, such as
    systemd-resolved's 127.0.0.53, are the host's own and are left out)."""
    out: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return ()
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = ipaddress.IPv4Address(fields[1])
            except ValueError:
                continue
            if not addr.is_loopback and str(addr) not in out:
                out.append(str(addr))
    return tuple(out[:3])


def host_routes(path: str = "/proc/net/route") -> list[tuple[str, str]]:
    """The host's IPv4 routes as (interface, network), from /proc/net/route (no netlink)."""
    out: list[tuple[str, str]] = []
    try:
        with open(path) as f:
            lines = f.read(1 << 20).splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest = ipaddress.IPv4Address(struct.pack("<I", int(fields[1], 16)))
            mask = ipaddress.IPv4Address(struct.pack("<I", int(fields[7], 16)))
            out.append((fields[0], str(ipaddress.IPv4Network(f"{dest}/{mask}"))))
        except ValueError:
            continue
    return out


@contextlib.contextmanager
def _locked(wait: bool = True) -> Iterator[None]:
    """The host lock of the network state (made on first use, root's, 0700: a folder that
    is anything else is refused). ``wait=False``: raise ``Busy`` instead of waiting."""
    if os.geteuid() != 0:
        raise PrivilegeError(
            "the host's network state of network 'nat' is root's (an unprivileged server's "
            "kernels get a user-mode stack instead, network.usermode); run this as root"
        )
    for folder in (NET_DIR, NET_DIR / "leases"):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        if not is_private_dir(folder, os.getuid()):
            raise SandboxError(
                f"{folder} is not a directory of root's closed to others: remove it (the "
                "product makes it anew) or fix its owner and mode (root, 0700)"
            )
    fd = os.open(NET_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if not wait else 0))
        except BlockingIOError:
            raise Busy() from None
        yield
    finally:
        os.close(fd)


class Busy(Exception):
    """The network state's lock is held by another process (``collect`` then skips)."""


def _write_mark(name: str, text: str) -> None:
    fd = os.open(
        NET_DIR / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _leases() -> dict[str, dict[str, Any]]:
    """address -> lease (unreadable ones as ``{}``), under the lock."""
    out: dict[str, dict[str, Any]] = {}
    base = NET_DIR / "leases"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return out
    for name in names:
        try:
            fd = os.open(base / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read(_LEASE_MAX))
            out[name] = doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            out[name] = {}
    return out


def _read_mark(name: str) -> str:
    try:
        fd = os.open(NET_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd) as f:
        return f.read(256).strip()


def _ensure_shared() -> None:
    """The table, and IPv4 forwarding on (remembering that it was off), under the lock."""
    if firewall.table_exists():
        return
    # the mark says the product turned forwarding on: a table gone meanwhile (the host's
    # ruleset flushed) is made anew as it was, never as for a router
    router_before = not (NET_DIR / "forwarding").exists() and _FORWARD.read_text().strip() == "1"
    _write_mark("table", "made\n")  # before the table: collect's quick look
    firewall.ensure_table(router_before)
    if not router_before:
        _write_mark("forwarding", "0\n")
        _FORWARD.write_text("1\n")


def _release_shared() -> None:
    """When no lease is left: the table goes, and forwarding is turned off again if the
    product turned it on. Under the lock."""
    if _leases():
        return
    firewall.drop_table()
    mark = NET_DIR / "forwarding"
    if mark.exists():
        with contextlib.suppress(OSError):
            _FORWARD.write_text("0\n")
        mark.unlink(missing_ok=True)
    (NET_DIR / "table").unlink(missing_ok=True)


@dataclass
class Lease:
    """A container's address and the names of its network objects."""

    address: str
    gateway: str
    name: str

    @property
    def ifname(self) -> str:
        """The host side of its veth pair."""
        return IF_PREFIX + self.name


class Attachment:
    """The ``nat`` network of one container (see the module docstring)."""

    def __init__(self, container_id: str, config: NatConfig) -> None:
        self.container_id = container_id
        self.config = config
        self.name = short_name(container_id)
        self.lease: Lease | None = None
        self.allowed: tuple[tuple[str, int | None], ...] = ()
        self.dns: tuple[str, ...] = ()
        self.bandwidth = config.bandwidth
        self._pid: int | None = None
        self._pidfd: int | None = None  # init's, while attached
        #: what the rules in the kernel's own namespace refuse before its allow-list: the
        #: host's addresses (root mode: the gateway's and the host's own)
        self.deny: tuple[str, ...] = ()

    def reserve(self, owner: int, owner_start: str | None) -> None:
        """Resolve the allow-list, take an address, make the shared state. SpecError for
        a host name that does not resolve or a full subnet. Called by
        ``Container.create``; ``owner``/``owner_start`` identify the creating process."""
        self.allowed = resolve_allow(self.config.allow, resolve_host)
        self.dns = self.config.dns if self.config.dns is not None else host_resolvers()
        subnet = ipaddress.IPv4Network(self.config.subnet)
        conflicts = route_conflicts(str(subnet), host_routes())
        if conflicts:
            raise SpecError(
                f"network subnet {subnet} overlaps the host's own network "
                f"({', '.join(conflicts)}); give a network_subnet (--subnet) clear of it"
            )
        hosts = subnet.hosts()
        gateway = str(next(hosts))
        doc = json.dumps(
            {"id": self.container_id, "name": self.name, "owner": owner, "start": owner_start}
        ).encode()
        with _locked():
            # round robin from after the last address given: an address comes back only
            # after the whole subnet went round (and its old connections are forgotten)
            candidates = list(hosts)
            last = _read_mark("last")
            start = next((i + 1 for i, a in enumerate(candidates) if str(a) == last), 0)
            for candidate in candidates[start:] + candidates[:start]:
                path = NET_DIR / "leases" / str(candidate)
                try:
                    fd = os.open(
                        path,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                    )
                except FileExistsError:
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(doc)
                self.lease = Lease(str(candidate), gateway, self.name)
                _write_mark("last", str(candidate))
                break
            else:
                raise SpecError(
                    f"network subnet {subnet} has no free address for container "
                    f"{self.container_id}; give a larger network_subnet"
                )
            _ensure_shared()

    def resolv_conf(self) -> str:
        """The container's /etc/resolv.conf."""
        if not self.dns:
            return "# no resolver: the host's are on loopback; set network_dns to give one\n"
        return "".join(f"nameserver {server}\n" for server in self.dns)

    def attach(self, pid: int) -> None:
        """Rules first, then the links of the container whose init is ``pid`` (waiting for
        ``go``). On failure what was made is removed and the error raised. Called by
        ``Container.start`` on the executor's ``netns`` line."""
        assert self.lease is not None, "reserve() first"
        # the links go to the namespace of whatever process has the pid ``pid`` then: a
        # descriptor of init, taken first, tells afterwards whether it was still init
        pidfd = os.pidfd_open(pid)
        try:
            firewall.add_kernel(self.name, self.lease.address, self.allowed, self.dns)
            links.create(
                self.lease.ifname, pid, self.lease.gateway, self.lease.address, self.bandwidth
            )
            # a second layer in the kernel's own namespace, where its processes have no
            # capabilities: the same rules hold when the host's table is gone (the host's
            # whole ruleset flushed, e.g. by a reload of its nftables service)
            self.deny = (f"{self.lease.gateway}/32", *links.host_addresses())
            self._inner_rules(pid, self.allowed, replace=False)
            if select.select([pidfd], [], [], 0)[0]:
                raise links.LinkError(
                    f"container {self.container_id}: its init ended while its network was "
                    "made (the links may have gone elsewhere: removed)"
                )
        except BaseException:
            os.close(pidfd)
            self._undo_links_and_rules()
            raise
        self._pid, self._pidfd = pid, pidfd

    def _inner_rules(
        self, pid: int, allowed: tuple[tuple[str, int | None], ...], *, replace: bool
    ) -> None:
        """The product's table in the kernel's own network namespace (root mode: made by
        a thread of this process that joined it)."""
        commands = firewall.namespace_commands(allowed, self.dns, self.deny, replace=replace)
        links.in_netns(
            pid, lambda: nft.run_here(commands, "firewall rules in the kernel's network namespace")
        )

    def _inner_refused(self) -> int | None:
        """The refused counter of the kernel's own namespace (None when unreadable)."""
        if self._pid is None or self._pidfd is None or select.select([self._pidfd], [], [], 0)[0]:
            return None
        try:
            return links.in_netns(
                self._pid, lambda: firewall.counter_packets(firewall.NS_COUNTER, here=True)
            )
        except SandboxError:
            return None

    def refresh(self) -> bool:
        """Resolve the allow-list's host names again and, when their addresses changed,
        swap the kernel's rules for ones naming the new addresses (its counter and open
        connections stay). True when the rules changed. SpecError when a name no longer
        resolves (the old rules stay). Called by ``Container.refresh_network`` (the
        provisioner, every ``REFRESH_S`` seconds, for kernels whose list has names)."""
        if self.lease is None or not any(e.is_name for e in self.config.allow):
            return False
        allowed = resolve_allow(self.config.allow, resolve_host)
        if allowed == self.allowed:
            return False
        firewall.replace_kernel_rules(self.name, self.lease.address, allowed, self.dns)
        if self._pid is not None:
            self._inner_rules(self._pid, allowed, replace=True)
        self.allowed = allowed
        return True

    def set_bandwidth(self, rate_bits: int | None) -> None:
        """Change the cap of the running container (both directions)."""
        if self.lease is None or self._pid is None or self._pidfd is None:
            raise SandboxError(f"container {self.container_id} has no network attached")
        if select.select([self._pidfd], [], [], 0)[0]:  # its pid may be another's now
            raise SandboxError(f"container {self.container_id} has ended")
        links.set_rate(self.lease.ifname, self._pid, rate_bits)
        self.bandwidth = rate_bits

    def _undo_links_and_rules(self) -> None:
        if self.lease is not None:
            _remove_kernel(self.name, self.lease.address)

    def detach(self) -> None:
        """Links, rules, lease, then the shared state if this was the last. Idempotent.
        Called by ``Container.destroy`` (and when a create fails after ``reserve``)."""
        lease = self.lease
        if lease is None:
            return
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        try:
            self._undo_links_and_rules()
        finally:
            self.lease = None
            with _locked():
                with contextlib.suppress(FileNotFoundError):
                    (NET_DIR / "leases" / lease.address).unlink()
                _release_shared()

    def stats(self) -> dict[str, Any]:
        """Address, allow-list, bandwidth, bytes in and out, refused connections (for
        ``%sandbox``, ``ps`` and ``stats``)."""
        out: dict[str, Any] = {
            "mode": "nat",
            "address": self.lease.address if self.lease else None,
            "allow": [str(e) for e in self.config.allow],
            "bandwidth": self.bandwidth,
        }
        if self.lease is not None:
            out.update(self._counters())
        return out

    def _counters(self) -> dict[str, Any]:
        """``bytes_in``, ``bytes_out`` and ``refused`` where they can be read (``stats``)."""
        assert self.lease is not None
        out: dict[str, Any] = {}
        counted = links.counters(self.lease.ifname)
        if counted is not None:
            out["bytes_in"], out["bytes_out"] = counted
        # the kernel's own namespace refuses first; the host's chain counts what reached it
        counts = [c for c in (self._inner_refused(), firewall.refused(self.name)) if c is not None]
        out["refused"] = sum(counts) if counts else None
        return out


def collect(alive: Alive) -> list[str]:
    """Remove the network objects of containers that are gone: leases whose creator is
    dead (``alive(pid, start)`` false), links and rules of the product's prefix that no
    lease names; then the shared state when nothing is left. Returns what was removed.
    Called by gc (``runtime.leftovers``) as root; nothing to do when ``NET_DIR`` is
    absent."""
    if not anything_there():
        return []
    try:
        return _collect(alive)
    except Busy:
        return []  # another process is making or removing a network: the next gc will do


def _remove_kernel(name: str, address: str | None) -> list[str]:
    """Remove what kernel ``name`` has on the host, step by step (a failing step does not
    keep the others from running): its link, its rules, and the connections tracked for
    its address (so that an address given again carries none of them). The errors, one
    line each."""
    errors = []
    steps: list[tuple[str, Callable[[], object]]] = [
        ("link", lambda: links.delete(IF_PREFIX + name)),
        ("rules", lambda: firewall.remove_kernel(name)),
    ]
    if address:
        steps.append(("connections", lambda: links.forget_connections(address)))
    for what, step in steps:
        try:
            step()
        except (OSError, SandboxError) as exc:
            errors.append(f"{IF_PREFIX}{name} {what}: {exc}")
    return errors


def _collect(alive: Alive) -> list[str]:
    removed: list[str] = []
    with _locked(wait=False):
        live_names: set[str] = set()
        for address, lease in _leases().items():
            pid, start, name = lease.get("owner"), lease.get("start"), lease.get("name")
            if (
                isinstance(pid, int)
                and isinstance(start, str)
                and isinstance(name, str)
                and alive(pid, start)
            ):
                live_names.add(name)
                continue
            if isinstance(name, str) and name.isalnum():
                removed += _remove_kernel(name, address)
            with contextlib.suppress(FileNotFoundError):
                (NET_DIR / "leases" / address).unlink()
            removed.append(f"network lease {address}")
        for ifname in host_links():
            if ifname[len(IF_PREFIX) :] not in live_names:
                removed += _remove_kernel(ifname[len(IF_PREFIX) :], None)
                removed.append(f"network link {ifname}")
        for name in firewall.kernels():
            if name not in live_names:
                removed += _remove_kernel(name, None)
                removed.append(f"firewall chain k-{name}")
        if not live_names:
            had_table = firewall.table_exists()
            _release_shared()
            if had_table:
                removed.append(f"firewall table {firewall.FAMILY} {firewall.TABLE}")
    return removed


def leftovers() -> list[str]:
    """What of the product's network is on the host now (tests assert it is empty after
    the last ``nat`` container): leases, links, the table, the forwarding mark."""
    out: list[str] = []
    if NET_DIR.is_dir():
        out += [f"lease {a}" for a in _leases()]
        out += [f"{m} mark" for m in ("forwarding", "table") if (NET_DIR / m).exists()]
    out += [f"link {n}" for n in host_links()]
    if os.geteuid() == 0 and firewall.table_exists():
        out.append(f"table {firewall.FAMILY} {firewall.TABLE}")
    return out
