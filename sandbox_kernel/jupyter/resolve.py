"""From raw setting values to one validated ``KernelSettings``, against the admin's policy.

Layer: Jupyter (plain data; the traits live in ``settings``). The provisioner calls
``read_policy`` and ``resolve_settings`` in ``pre_launch``, so that every problem reaches the
user at kernel start, all at once, one line each naming the field, the value and the
accepted form. The caps use the one limits policy (``sandbox_kernel.limits``): the same
bounds and ceilings as live changes from the ``%sandbox`` magics.
"""

from __future__ import annotations

import ipaddress
import math
import os
import posixpath
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .. import policy as host_policy
from ..errors import SpecError
from ..images.ipykernel_layer import NAME as IPYKERNEL_NAME
from ..limits import BANDWIDTH, BOUNDS, DISK_QUOTA, Ceilings, Limits
from ..network import DEFAULT_SUBNET
from ..network.config import (
    AllowEntry,
    NatConfig,
    config_problems,
    parse_allow_list,
    parse_subnet,
)
from ..network.nat import host_resolvers
from ..runtime.spec import (
    BYTES_PER_INODE,
    VOLUME_FORMS,
    Bind,
    NetworkMode,
    bytes_per_inode_problem,
    env_key_problem,
)
from ..units import SIZE_FORMS, format_size, parse_size
from .relay import MIN_MESSAGE_SIZE, OutputLimits
from .settings import (
    DNS_FORMS,
    IMAGE_FORMS,
    NETWORK_FORMS,
    NOTEBOOK_FOLDER_FORMS,
    NOTEBOOK_FOLDER_MODES,
    USER_FORMS,
    SandboxPolicy,
    setting_forms,
)

NOBODY = 65534
MAX_ID = 2**32 - 2
_USER_RE = re.compile(r"^([0-9]+)(?::([0-9]+))?$")
#: The caps of a kernel start, in the order they are reported.
CAP_SETTINGS = ("memory", "cpus", "pids", "tmp_size", "writable_size")
#: The bound of ``SandboxPolicy.max_pool_size`` (idle sandboxes per kernelspec).
MAX_POOL_SIZE = 64
#: The settings of network mode ``nat`` (an error with network 'none').
NAT_SETTINGS = ("network_allow", "bandwidth", "network_subnet", "network_dns")
#: The resolvers' port, which a kernelspec's network_dns needs allowed by the administrator.
DNS_PORT = 53


def allow_inside(entry: AllowEntry, ceiling: AllowEntry) -> bool:
    """Does allow-list entry ``entry`` (a kernelspec's) lie inside ``ceiling`` (an
    administrator's)? A network inside its network, with its port (any port when the
    ceiling names none; a ceiling with a port never covers "every port"); a host name
    only inside the same name (a name resolves to anything, so no network covers it, and
    a name never covers a network). Called by ``resolve_settings`` for each entry, against
    ``SandboxPolicy.network_allow`` and the policy file's."""
    if ceiling.port is not None and entry.port != ceiling.port:
        return False
    if entry.is_name or ceiling.is_name:
        return entry.is_name and ceiling.is_name and entry.target == ceiling.target
    inner = ipaddress.IPv4Network(entry.target)
    return inner.subnet_of(ipaddress.IPv4Network(ceiling.target))


@dataclass(frozen=True)
class Policy:
    """The administrator's policy for kernel starts, parsed by ``read_policy``: the server's
    ``SandboxPolicy`` and the host's policy file (``sandbox_kernel.policy``); ``for_user``
    narrows it to one kernel user."""

    ceilings: Ceilings = field(default_factory=Ceilings)
    #: Image names (or name:tag) kernels may use; empty: every image of the store.
    images: tuple[str, ...] = ()
    #: Host directories extra_mounts may take their source under.
    mount_sources: tuple[str, ...] = ()
    allow_root: bool = False
    #: A rootless server without a delegated cgroup may run kernels with unenforced caps.
    allow_unenforced_limits: bool = False
    #: Most kernels one user may run at once (None: no limit).
    max_kernels: int | None = None
    #: Where ``max_kernels`` was set, for the refusal.
    max_kernels_source: str = "SandboxPolicy.max_kernels"
    #: The host's policy file (None: there is none).
    host: host_policy.HostPolicy | None = None
    #: The policy file's allowed images for the user (empty: every image), checked besides
    #: ``images``; and the file's section names, for messages.
    file_images: tuple[str, ...] = ()
    file_where: str = ""
    #: Disk quota of each kernel's notebook folder, bytes and files (None: none asked for).
    notebook_quota: int | None = None
    notebook_quota_files: int | None = None
    #: The policy file's ``home_quota`` for the kernel's user (``for_user``): the most a
    #: notebook folder's quota may be, checked at each start; and where it was set.
    file_home_quota: int | None = None
    #: Most idle pool members per kernelspec (``SandboxPolicy.max_pool_size``).
    max_pool_size: int = 4
    #: Network modes kernels may use (``SandboxPolicy.allowed_networks``).
    networks: tuple[str, ...] = ("none",)
    #: What a ``nat`` kernel may reach at most (``SandboxPolicy.network_allow``).
    network_allow: tuple[AllowEntry, ...] = ()
    #: Networks a kernelspec's network_subnet must lie in (``SandboxPolicy.allowed_subnets``).
    subnets: tuple[str, ...] = (DEFAULT_SUBNET,)
    #: The policy file's network modes and allow-list for the user (``for_user``; None: the
    #: file sets none), checked besides ``networks`` and ``network_allow``.
    file_networks: tuple[str, ...] | None = None
    file_allow: tuple[AllowEntry, ...] | None = None

    def for_user(self, uid: int) -> Policy:
        """This policy with the policy file's values for kernel user ``uid`` applied: the
        tighter of each ceiling, both image lists, the lower kernel count. Called by
        ``resolve_settings`` once the kernel's user is known, and for each live change."""
        if self.host is None:
            return self
        mine = self.host.for_user(uid)
        kernels, source = self.max_kernels, self.max_kernels_source
        if mine.max_kernels is not None and (kernels is None or mine.max_kernels < kernels):
            kernels, source = mine.max_kernels, f"max_kernels in {mine.where}"
        return replace(
            self,
            ceilings=self.ceilings.tighter(mine.ceilings),
            max_kernels=kernels,
            max_kernels_source=source,
            host=None,
            file_images=mine.images,
            file_where=mine.where,
            file_networks=mine.networks,
            file_allow=(
                None
                if mine.network_allow is None
                else parse_allow_list(mine.network_allow, f"network_allow in {mine.where}")
            ),
            file_home_quota=mine.home_quota,
        )


@dataclass(frozen=True)
class KernelSettings:
    """Validated settings of one kernel start (plain data, built by ``resolve_settings``)."""

    image: str
    limits: Limits  # memory, cpus, pids (cpus deferred until the kernel answered)
    tmp_size: int
    writable_size: int
    mounts: tuple[Bind, ...]
    env: tuple[tuple[str, str], ...]
    network: NetworkMode
    uid: int
    gid: int
    cpu_defer_timeout: float
    #: The administrator allows a rootless kernel to run without enforced caps
    #: (``SandboxPolicy.allow_unenforced_limits``).
    unenforced_ok: bool = False
    #: The policy for this kernel's host user (``Policy.for_user``): the kernel count limit.
    policy: Policy = field(default_factory=Policy)
    #: That host user (a rootless server's own uid; a root server's kernel uid).
    host_uid: int = -1
    #: The notebook folder is mounted read-only (``notebook_folder='ro'``).
    notebook_readonly: bool = False
    #: What the kernel may send to Jupyter (the relay's limits).
    output: OutputLimits = field(default_factory=OutputLimits)
    #: The product's ipykernel layer image (``ipykernel_layer``), "" for none.
    ipykernel_layer: str = ""
    #: The tmpfs inode cap's rule (``ContainerSpec.bytes_per_inode``).
    bytes_per_inode: int = BYTES_PER_INODE
    #: Idle sandboxes kept warm for this kernelspec and folder (``pool_size``; 0: none).
    pool_size: int = 0
    #: Network ``nat``'s settings (``ContainerSpec.nat``); None with network 'none'.
    nat: NatConfig | None = None


def read_policy(policy: SandboxPolicy) -> Policy:
    """Parse the server's ``SandboxPolicy`` and load the host's policy file; the
    provisioner calls it at each start and each live request. A malformed ceiling or policy
    file is the administrator's error, named as such (SpecError)."""
    problems: list[str] = []

    def size(name: str, value: str) -> int | None:
        if not value:
            return None
        try:
            return parse_size(value, f"SandboxPolicy.{name}")
        except SpecError as exc:
            problems.append(str(exc))
            return None

    sources = []
    for src in policy.allowed_mount_sources:
        if not src.startswith("/"):
            problems.append(
                f"SandboxPolicy.allowed_mount_sources entry {src!r} must be an absolute path"
            )
        else:
            sources.append(posixpath.normpath(src))
    networks, allow, subnets, bandwidth = _read_network(policy, problems)
    ceilings = Ceilings(
        bandwidth=bandwidth,
        memory=size("max_memory", policy.max_memory),
        cpus=policy.max_cpus if policy.max_cpus > 0 else None,
        pids=policy.max_pids if policy.max_pids > 0 else None,
        tmp_size=size("max_tmp_size", policy.max_tmp_size),
        writable_size=size("max_writable_size", policy.max_writable_size),
    )
    quota = None
    if policy.notebook_quota:
        try:
            quota = DISK_QUOTA.parse(policy.notebook_quota, "SandboxPolicy.notebook_quota")
        except SpecError as exc:
            problems.append(str(exc))
    if policy.notebook_quota_files < 0:
        problems.append(
            f"SandboxPolicy.notebook_quota_files={policy.notebook_quota_files} must be a number "
            "of files, or 0 (no file limit)"
        )
    if not 0 <= policy.max_pool_size <= MAX_POOL_SIZE:
        problems.append(
            f"SandboxPolicy.max_pool_size={policy.max_pool_size} must be a number of "
            f"sandboxes in 0..{MAX_POOL_SIZE}"
        )
    if policy.notebook_quota_files > 0 and quota is None:
        problems.append("SandboxPolicy.notebook_quota_files needs SandboxPolicy.notebook_quota")
    if problems:
        raise SpecError(problems, context="the server's SandboxPolicy (jupyter_server_config.py)")
    host = _load_file()
    return Policy(
        networks=networks,
        network_allow=allow,
        subnets=subnets,
        notebook_quota=quota,
        notebook_quota_files=policy.notebook_quota_files or None,
        ceilings=ceilings,
        images=tuple(policy.allowed_images),
        mount_sources=tuple(sources),
        allow_root=bool(policy.allow_root),
        allow_unenforced_limits=bool(policy.allow_unenforced_limits),
        max_kernels=policy.max_kernels if policy.max_kernels > 0 else None,
        max_pool_size=policy.max_pool_size,
        host=host,
    )


def _read_network(
    policy: SandboxPolicy, problems: list[str]
) -> tuple[tuple[str, ...], tuple[AllowEntry, ...], tuple[str, ...], int | None]:
    """``SandboxPolicy``'s network traits parsed: the modes, the allow-list, the subnets and
    the bandwidth ceiling; each problem appended. Called by ``read_policy``."""
    networks, bad = _policy_networks(
        list(policy.allowed_networks), "SandboxPolicy.allowed_networks"
    )
    problems.extend(bad)
    allow: tuple[AllowEntry, ...] = ()
    try:
        allow = parse_allow_list(policy.network_allow, "SandboxPolicy.network_allow")
    except SpecError as exc:
        problems.extend(exc.problems)
    subnets = []
    for subnet in policy.allowed_subnets:
        try:
            subnets.append(parse_subnet(subnet, "SandboxPolicy.allowed_subnets entry"))
        except SpecError as exc:
            problems.extend(exc.problems)
    bandwidth = None
    if policy.max_bandwidth:
        try:
            bandwidth = BANDWIDTH.parse(policy.max_bandwidth, "SandboxPolicy.max_bandwidth")
        except SpecError as exc:
            problems.extend(exc.problems)
    return networks, allow, tuple(subnets), bandwidth


def _policy_networks(raw: list[Any], where: str) -> tuple[tuple[str, ...], list[str]]:
    """An administrator's list of network modes, and its problems (a mode that is none)."""
    modes = {m.value for m in NetworkMode}
    bad = [m for m in raw if m not in modes]
    if bad:
        shown = ", ".join(repr(m) for m in bad)
        return (), [f"{where}: {shown} is not a network mode; use 'none' and/or 'nat'"]
    return tuple(str(m) for m in raw), []


def _load_file() -> host_policy.HostPolicy | None:
    """The host's policy file (``policy.load``), its network keys checked."""
    host = host_policy.load()
    if host is not None:
        _check_file_network(host)
    return host


def _check_file_network(host: host_policy.HostPolicy) -> None:
    """The policy file's network keys in every section, parsed as the server's are: the
    file (a leaf) keeps them as text. SpecError naming the file, the section and the
    entry. Called by ``read_policy`` once the file is loaded, so a typo refuses every
    start (as any other problem of the file does), not only a ``nat`` kernel's."""
    problems: list[str] = []
    sections = [("(top level)", host.top)]
    sections += [(f"[groups.{n}]", r) for n, r in host.groups.items()]
    sections += [(f"[users.{n}]", r) for n, r in host.users.items()]
    for where, rule in sections:
        if rule.networks is not None:
            problems.extend(_policy_networks(list(rule.networks), f"{where} allowed_networks")[1])
        if rule.network_allow is not None:
            try:
                parse_allow_list(rule.network_allow, f"{where} network_allow")
            except SpecError as exc:
                problems.extend(exc.problems)
    if problems:
        raise SpecError(problems, context=f"the policy file {host.path}")


def parse_user(value: object, *, workdir: str | None, server_uid: int) -> tuple[int, int]:
    """Resolve the ``user`` setting to (uid, gid). Root is checked by the caller
    (``resolve_settings``, at each kernel start)."""
    if isinstance(value, bool):
        raise SpecError(f"user={value!r} is not a user; use {USER_FORMS}")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise SpecError(f"user={value!r} is not a user; use {USER_FORMS}")
    if value == "auto":
        return _auto_user(workdir, server_uid)
    m = _USER_RE.match(value)
    if m:
        uid = int(m.group(1))
        if m.group(2) is not None:
            gid = int(m.group(2))
        else:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        if uid > MAX_ID or gid > MAX_ID:
            raise SpecError(f"user={value!r} is out of range; ids go from 0 to {MAX_ID}")
        return uid, gid
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        raise SpecError(f"user={value!r} is no user of this host; use {USER_FORMS}") from None
    return entry.pw_uid, entry.pw_gid


def _auto_user(workdir: str | None, server_uid: int) -> tuple[int, int]:
    """``user='auto'``: a non-root server's own ids; as root, the notebook folder's owner
    (0, 0 for a root-owned folder: the caller decides, nobody unless allow_root)."""
    if server_uid != 0:
        return server_uid, os.getegid()
    if workdir is None:
        return NOBODY, NOBODY
    try:
        st = os.stat(workdir)
    except OSError as exc:
        raise SpecError(
            f"user='auto': the notebook directory {workdir!r} cannot be read "
            f"({exc.strerror}); give an existing directory"
        ) from None
    if st.st_uid == 0:
        return 0, 0
    return st.st_uid, st.st_gid


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class _Resolver:
    """One resolution: collects problems while each field is resolved on its own."""

    def __init__(
        self,
        values: Mapping[str, Any],
        policy: Policy,
        explicit: frozenset[str],
        workdir: str | None,
        server_uid: int,
    ) -> None:
        self.values = values
        self.policy = policy
        self.explicit = explicit
        self.workdir = workdir
        self.server_uid = server_uid
        self.problems: list[str] = []

    def guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            self.problems.extend(exc.problems)
            return None

    def image(self) -> str:
        image = self.values["image"]
        if not isinstance(image, str) or not image.strip():
            self.problems.append(f"image={image!r} is missing or empty; use {IMAGE_FORMS}")
            return ""
        image = image.strip()
        for allowed, where in (
            (self.policy.images, "SandboxPolicy.allowed_images"),
            (self.policy.file_images, f"allowed_images in {self.policy.file_where}"),
        ):
            if allowed and image.split(":", 1)[0] not in allowed and image not in allowed:
                self.problems.append(
                    f"image={image!r} is not allowed by the administrator "
                    f"({where}: {', '.join(allowed)}); use one of those"
                )
                break
        return image

    def cap(self, name: str) -> Any:
        """A cap within its bound and the ceiling: an explicit value above the ceiling is an
        error; a default above it is lowered to the ceiling."""
        raw = self.values[name]
        value = self.guard(BOUNDS[name].parse, raw, name)
        if value is None:
            return None
        ceilings = self.policy.ceilings
        problem = ceilings.start_problem(name, raw, value)
        if problem is None:
            return value
        if name in self.explicit:
            self.problems.append(problem)
            return None
        return ceilings.of(name)

    def mounts(self) -> tuple[Bind, ...]:
        raw = self.values["extra_mounts"]
        if not isinstance(raw, (list, tuple)):
            self.problems.append(
                f"extra_mounts={raw!r} is not a list; use a list of {VOLUME_FORMS}"
            )
            return ()
        out = []
        for entry in raw:
            bind = self.guard(Bind.parse, entry, "extra_mounts entry")
            if bind is None:
                continue
            problem = self._mount_problem(entry, bind)
            if problem:
                self.problems.append(f"extra_mounts entry {entry!r}: {problem}")
            else:
                out.append(bind)
        return tuple(out)

    def _mount_problem(self, entry: str, bind: Bind) -> str | None:
        if not _under(bind.source, self.policy.mount_sources):
            where = ", ".join(self.policy.mount_sources) or "none are allowed"
            return (
                f"source {bind.source} is not under an allowed directory "
                f"(SandboxPolicy.allowed_mount_sources: {where})"
            )
        if not os.path.exists(bind.source):
            return f"{bind.source} does not exist on the host"
        if self.workdir is not None and bind.target == self.workdir:
            return f"{bind.target} is the notebook's directory; pick another target"
        return None

    def env(self) -> tuple[tuple[str, str], ...]:
        raw = self.values["env"]
        if not isinstance(raw, Mapping):
            self.problems.append(f'env={raw!r} is not a mapping; use {{"NAME": "value"}}')
            return ()
        out = []
        for key, val in raw.items():
            problem = env_key_problem(key)
            if problem:
                self.problems.append(problem)
            elif not isinstance(val, str) or "\0" in val:
                self.problems.append(f"env {key}={val!r} must be a string without NUL bytes")
            else:
                out.append((key, val))
        return tuple(out)

    def notebook_readonly(self) -> bool:
        raw = self.values["notebook_folder"]
        if raw not in NOTEBOOK_FOLDER_MODES:
            self.problems.append(
                f"notebook_folder={raw!r} is not a mode; use {NOTEBOOK_FOLDER_FORMS}"
            )
            return True
        return bool(raw == "ro")

    def network(self) -> tuple[NetworkMode, NatConfig | None]:
        """The network mode and, for ``nat``, its settings, held against the
        administrator's: the mode must be allowed, every allow-list entry (and resolver)
        inside the administrator's allow-list, the bandwidth within the ceiling (which a
        kernelspec without one gets), the subnet inside an allowed one."""
        raw = self.values["network"]
        try:
            mode = NetworkMode(raw)
        except ValueError:
            self.problems.append(f"network={raw!r} is not available; use {NETWORK_FORMS}")
            return NetworkMode.NONE, None
        given = [k for k in NAT_SETTINGS if k in self.explicit and self.values.get(k)]
        if mode is NetworkMode.NONE:
            if given:
                self.problems.append(
                    f"{', '.join(given)}: only with network 'nat' (network is 'none'); set "
                    "network='nat', or remove them"
                )
            return mode, None
        policy = self.policy
        for allowed, where in (
            (policy.networks, "SandboxPolicy.allowed_networks"),
            (policy.file_networks, f"allowed_networks in {policy.file_where}"),
        ):
            if allowed is not None and mode.value not in allowed:
                shown = ", ".join(repr(m) for m in allowed) or "none"
                self.problems.append(
                    f"network={mode.value!r} is not allowed by the administrator ({where}: "
                    f"{shown}); the administrator adds {mode.value!r} to {where} (and says "
                    "what kernels may reach in network_allow), or use network 'none'"
                )
                return mode, None
        before = len(self.problems)
        nat = NatConfig(
            allow=self.allow_list(),
            bandwidth=self.bandwidth(),
            subnet=self.subnet(),
            dns=self.dns(),
        )
        if len(self.problems) == before:
            self.problems.extend(config_problems(nat))
        return mode, nat

    def _ceilings_of_allow(self) -> list[tuple[tuple[AllowEntry, ...], str]]:
        """The administrator's allow-lists a kernelspec's entries must lie inside: the
        server's, and the policy file's when it sets one."""
        out = [(self.policy.network_allow, "SandboxPolicy.network_allow")]
        if self.policy.file_allow is not None:
            out.append((self.policy.file_allow, f"network_allow in {self.policy.file_where}"))
        return out

    def _outside(self, entry: AllowEntry, what: str) -> bool:
        """Report ``entry`` (``what`` names it) if it is outside an administrator's list."""
        for ceiling, where in self._ceilings_of_allow():
            if not any(allow_inside(entry, top) for top in ceiling):
                shown = ", ".join(str(e) for e in ceiling) or "nothing"
                self.problems.append(
                    f"{what} is not inside what the administrator allows ({where}: {shown}); "
                    "ask for one of those or a part of one (a network inside a network, the "
                    "same port; a host name only as the administrator lists it)"
                )
                return True
        return False

    def allow_list(self) -> tuple[AllowEntry, ...]:
        raw = self.values["network_allow"]
        if not isinstance(raw, (list, tuple)):
            self.problems.append(
                f"network_allow={raw!r} is not a list; {setting_forms('network_allow')}"
            )
            return ()
        entries: tuple[AllowEntry, ...] | None = self.guard(parse_allow_list, raw, "network_allow")
        if entries is None:
            return ()
        admin = self.policy.network_allow
        if not admin:
            self.problems.append(
                "network='nat': the administrator allows nothing to be reached "
                "(SandboxPolicy.network_allow = []); the administrator lists what kernels may "
                "reach, e.g. c.SandboxPolicy.network_allow = ['198.18.0.0/15', 'pypi.org:443']"
            )
            return ()
        if not entries:  # the administrator's list, within the policy file's
            entries = tuple(e for e in admin if not self._outside_quiet(e))
            if not entries:
                self.problems.append(
                    "network_allow is empty and no entry of SandboxPolicy.network_allow lies "
                    f"inside network_allow in {self.policy.file_where}; list what the kernel "
                    "needs"
                )
            return entries
        for entry in entries:
            self._outside(entry, f"network_allow entry {str(entry)!r}")
        return entries

    def _outside_quiet(self, entry: AllowEntry) -> bool:
        return any(
            not any(allow_inside(entry, top) for top in ceiling)
            for ceiling, _ in self._ceilings_of_allow()
        )

    def bandwidth(self) -> int | None:
        raw = self.values["bandwidth"]
        ceilings = self.policy.ceilings
        top = ceilings.of("bandwidth")
        if raw in ("", None):
            return None if top is None else int(top)
        value = self.guard(BANDWIDTH.parse, raw, "bandwidth")
        if value is None:
            return None
        problem = ceilings.start_problem("bandwidth", raw, value)
        if problem:
            self.problems.append(problem)
            return None
        return int(value)

    def subnet(self) -> str:
        subnet: str | None = self.guard(
            parse_subnet, self.values["network_subnet"], "network_subnet"
        )
        if subnet is None:
            return DEFAULT_SUBNET
        net = ipaddress.IPv4Network(subnet)
        if not any(net.subnet_of(ipaddress.IPv4Network(s)) for s in self.policy.subnets):
            shown = ", ".join(self.policy.subnets) or "none"
            self.problems.append(
                f"network_subnet={subnet!r} is not inside a network the administrator allows "
                f"(SandboxPolicy.allowed_subnets: {shown}); use one of those or a part of one"
            )
        return subnet

    def dns(self) -> tuple[str, ...] | None:
        raw = self.values["network_dns"]
        if raw is None:
            # the host's resolvers, only those the administrator allows on port 53: an
            # allow-list of pypi.org:443 alone must not open DNS (a channel out) to the LAN
            return tuple(
                server
                for server in host_resolvers()
                if all(
                    any(allow_inside(AllowEntry(f"{server}/32", DNS_PORT), top) for top in ceiling)
                    for ceiling, _ in self._ceilings_of_allow()
                )
            )
        if not isinstance(raw, (list, tuple)) or not all(isinstance(x, str) for x in raw):
            self.problems.append(f"network_dns={raw!r} is not valid; use {DNS_FORMS}")
            return ()
        servers = tuple(x.strip() for x in raw)
        for server in servers:
            try:
                address = ipaddress.IPv4Address(server)
            except ValueError:
                continue  # config_problems names it
            self._outside(
                AllowEntry(f"{address}/32", DNS_PORT),
                f"network_dns entry {server!r} (port {DNS_PORT})",
            )
        return servers

    def identity(self) -> tuple[int, int]:
        raw = self.values["user"]
        ids = self.guard(parse_user, raw, workdir=self.workdir, server_uid=self.server_uid)
        if ids is None:
            return NOBODY, NOBODY
        if ids[0] == 0 and not self.policy.allow_root:
            if raw == "auto":
                return NOBODY, NOBODY
            self.problems.append(
                f"user={raw!r} is root, which the administrator does not allow "
                "(SandboxPolicy.allow_root = False); use an unprivileged uid, e.g. 1000"
            )
        elif self.server_uid != 0 and ids[0] not in (0, self.server_uid):
            self.problems.append(
                f"user={raw!r}: this server runs as uid {self.server_uid}, and a rootless "
                f"kernel runs as the server's user (files it writes belong to it); use "
                "'auto', or run the server as root to run kernels as other users"
            )
        return ids  # type: ignore[no-any-return]

    def ipykernel_layer(self) -> str:
        raw = self.values.get("ipykernel_layer", "")
        if raw in ("", None):
            return ""
        if not isinstance(raw, str) or not raw.startswith(IPYKERNEL_NAME + ":"):
            self.problems.append(
                f"ipykernel_layer={raw!r} is not an ipykernel layer; use {IPYKERNEL_NAME}:TAG "
                "as `sandbox-kernel kernelspec add --image` writes it, or remove it"
            )
            return ""
        return raw

    def bytes_per_inode(self) -> int:
        raw = self.values["bytes_per_inode"]
        problem = bytes_per_inode_problem(raw)
        if problem:
            self.problems.append(problem)
            return BYTES_PER_INODE
        return raw  # type: ignore[no-any-return]

    def pool_size(self) -> int:
        raw = self.values["pool_size"]
        top = self.policy.max_pool_size
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            self.problems.append(f"pool_size={raw!r} is not valid; {setting_forms('pool_size')}")
            return 0
        if raw > top:
            if "pool_size" not in self.explicit:
                return top
            self.problems.append(
                f"pool_size={raw} is above the server's SandboxPolicy.max_pool_size={top}; "
                f"use at most {top}"
            )
            return 0
        return raw

    def cpu_defer_timeout(self) -> float:
        timeout = self.values["cpu_defer_timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            self.problems.append(
                f"cpu_defer_timeout={timeout!r} must be a positive number of seconds, e.g. 60"
            )
            return 60.0
        return float(timeout)

    def output(self) -> OutputLimits:
        """The relay's limits: sizes in the size forms, rates non-negative numbers."""
        v = self.values
        size = self.guard(parse_size, v["max_message_size"], "max_message_size")
        if size is not None and size < MIN_MESSAGE_SIZE:
            self.problems.append(
                f"max_message_size={v['max_message_size']!r} is below "
                f"{format_size(MIN_MESSAGE_SIZE)}; use {SIZE_FORMS}, e.g. 16M"
            )
        data = self.guard(parse_size, v["iopub_data_rate_limit"], "iopub_data_rate_limit")
        rates = {}
        for name in ("iopub_msg_rate_limit", "rate_limit_window"):
            raw = v[name]
            ok = not isinstance(raw, bool) and isinstance(raw, (int, float)) and raw >= 0
            if not ok or not math.isfinite(raw) or (name == "rate_limit_window" and raw <= 0):
                self.problems.append(f"{name}={raw!r} is not valid; {setting_forms(name)}")
            else:
                rates[name] = float(raw)
        default = OutputLimits()
        return OutputLimits(
            max_message_size=size if size is not None else default.max_message_size,
            msg_rate=rates.get("iopub_msg_rate_limit", default.msg_rate),
            data_rate=data if data is not None else default.data_rate,
            window=rates.get("rate_limit_window", default.window),
        )


def resolve_settings(
    values: Mapping[str, Any],
    policy: Policy,
    *,
    explicit: frozenset[str],
    workdir: str | None,
    context: str,
    server_uid: int | None = None,
) -> KernelSettings:
    """Validate raw setting values against their forms and the administrator's policy.

    ``values`` maps every name of ``settings.SETTING_NAMES`` to its raw value; ``explicit``
    names those set by a kernelspec or a config file (a default above a ceiling is lowered to
    the ceiling, an explicit value above it is an error). Raises one SpecError listing every
    problem, with ``context`` (e.g. "kernelspec 'python3-sandbox'") in front.
    """
    r = _Resolver(
        values, policy, explicit, workdir, os.geteuid() if server_uid is None else server_uid
    )
    uid, gid = r.identity()
    # the host user the policy names: a rootless server's own (whatever id the kernel has
    # inside); a root server's kernel runs as that host uid (its id maps to itself)
    host_uid = r.server_uid if r.server_uid != 0 else uid
    r.policy = policy = policy.for_user(host_uid)
    image = r.image()
    caps = {name: r.cap(name) for name in CAP_SETTINGS}
    mounts, env, (network, nat) = r.mounts(), r.env(), r.network()
    readonly = r.notebook_readonly()
    timeout = r.cpu_defer_timeout()
    output = r.output()
    ipykernel_layer = r.ipykernel_layer()
    per_inode = r.bytes_per_inode()
    pool_size = r.pool_size()
    if r.problems:
        raise SpecError(r.problems, context=context)
    return KernelSettings(
        image=image,
        limits=Limits(memory=caps["memory"], cpus=caps["cpus"], pids=caps["pids"], defer_cpu=True),
        tmp_size=caps["tmp_size"],
        writable_size=caps["writable_size"],
        mounts=mounts,
        env=env,
        network=network,
        uid=uid,
        gid=gid,
        cpu_defer_timeout=timeout,
        unenforced_ok=policy.allow_unenforced_limits,
        policy=policy,
        host_uid=host_uid,
        notebook_readonly=readonly,
        output=output,
        ipykernel_layer=ipykernel_layer,
        bytes_per_inode=per_inode,
        pool_size=pool_size,
        nat=nat,
    )
