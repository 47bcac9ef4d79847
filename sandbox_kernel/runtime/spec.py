"""The container spec: pure data, no system calls.

Layer: runtime (OS side; imports only ``errors`` and ``limits``).

A ``ContainerSpec`` says everything about one container. Its callers build one (the
provisioner for a kernel, ``sandbox-kernel run`` for a command, the image builder for a
recipe step); ``validate.validate_spec`` checks it, ``plan.compile_plan`` turns it into the
ordered operations that the executor (``native/sk-runtime.c``) performs, and
``container.Container`` drives the lifecycle.

The rules that every caller shares live here, once: what a container path looks like
(``is_clean_abs``), what an environment variable name is (``env_key_problem``), and the
``SRC:DST[:ro|rw]`` volume form (``Bind.parse``).
"""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SpecError
from ..limits import Limits

if TYPE_CHECKING:
    from ..network.config import NatConfig

__all__ = [
    "BYTES_PER_INODE",
    "DEFAULT_MASKED_PATHS",
    "DEFAULT_READONLY_PATHS",
    "MIN_TMPFS_INODES",
    "VOLUME_FORMS",
    "Bind",
    "ContainerSpec",
    "IdMap",
    "Limits",
    "MountOp",
    "NetworkMode",
    "Tmpfs",
    "bytes_per_inode_problem",
    "env_key_problem",
    "is_clean_abs",
]

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VOLUME_FORMS = "SRC:DST, SRC:DST:ro or SRC:DST:rw with absolute paths (read-only unless :rw)"


def is_clean_abs(path: str) -> bool:
    """An absolute, normalised path without ``..``, empty components or NUL bytes: the only
    form a container path (mount target, working directory, layer, masked path) may take."""
    return (
        path.startswith("/")
        and "\0" not in path
        and posixpath.normpath(path) == path
        and ".." not in path.split("/")
    )


def env_key_problem(key: object, where: str = "env") -> str | None:
    """Why ``key`` is not a valid environment variable name, or None. Used by the validators,
    the kernel settings, the provisioner (kernelspec env) and image recipes."""
    if isinstance(key, str) and _ENV_KEY_RE.match(key):
        return None
    return f"{where} key {key!r} is invalid; use letters, digits and '_' (not first a digit)"


class NetworkMode(str, enum.Enum):
    """How the container reaches the network.

    ``none``: a fresh network namespace with only loopback up (Jupyter talks to the kernel
    over unix sockets in its connection folder, never over the network).
    ``nat``: also a veth link to the host, an address, a default route and masquerading out
    of the host, for what ``ContainerSpec.nat`` allows (``network.nat``; without root a
    user-mode stack, ``network.usermode``).
    """

    NONE = "none"
    NAT = "nat"


@dataclass(frozen=True)
class Bind:
    """Bind-mount a host path into the container.

    source: absolute host path (a directory or a file), opened by the executor on the host.
    target: absolute path inside the container, resolved inside the new root (a symlink in
    the image can never point it at the host).
    readonly: mount read-only (the default).
    idmap: show the source's on-disk owners as the same ids inside the container (root mode,
    whose container ids are an unprivileged host range): the notebook folder, so that the
    kernel's files keep the folder owner's uid on the host.
    """

    source: str
    target: str
    readonly: bool = True
    idmap: bool = False

    @classmethod
    def parse(cls, text: object, what: str = "volume") -> Bind:
        """``SRC:DST[:ro|rw]`` (read-only unless ``:rw``) -> Bind; SpecError naming ``what``
        and the accepted form. Used by ``run --volume`` and, at kernel start, by
        ``jupyter.resolve`` for each ``extra_mounts`` entry."""
        if not isinstance(text, str):
            raise SpecError(f"{what} {text!r} is not a string; use {VOLUME_FORMS}")
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise SpecError(f"{what} {text!r} is malformed; use {VOLUME_FORMS}")
        src, dst = parts[0], parts[1]
        for path in (src, dst):
            if not is_clean_abs(path):
                raise SpecError(
                    f"{what} {text!r}: {path!r} is not an absolute normalised path; "
                    f"use {VOLUME_FORMS}"
                )
        return cls(source=src, target=dst, readonly=len(parts) == 2 or parts[2] == "ro")


@dataclass(frozen=True)
class Tmpfs:
    """Mount a size-capped tmpfs (``size`` bytes, counted in the memory cap; files capped by
    ``ContainerSpec.bytes_per_inode``) at ``target`` inside the container, with directory
    ``mode``.

    shared: owned by the container's user and group, and handed to the container's owner
    as a directory descriptor (``Container.shared_dir``) through which the host reaches what
    the container makes there: a kernel's sockets, which need a writable folder that is no
    host directory (the host side of such a folder would be an unbounded host write).
    """

    target: str
    size: int
    mode: int = 0o1777
    shared: bool = False


MountOp = Bind | Tmpfs

#: The fewest files a tmpfs of the container may hold, however small it is.
MIN_TMPFS_INODES = 1024
#: The default of ``ContainerSpec.bytes_per_inode`` (and of the kernel setting).
BYTES_PER_INODE = 16 * 1024


def bytes_per_inode_problem(value: object) -> str | None:
    """Why ``value`` is no valid ``bytes_per_inode`` (an int in 1K..1G), or None. Used by
    ``validate.check_sizes`` and by the kernel settings."""
    if isinstance(value, int) and not isinstance(value, bool) and 1024 <= value <= 1 << 30:
        return None
    return f"bytes_per_inode={value!r} is out of range; use a number of bytes in 1024..1073741824"


@dataclass(frozen=True)
class IdMap:
    """One uid or gid map line of a user namespace: ids ``inside .. inside+count-1`` of the
    container are ids ``outside ..`` of the host."""

    inside: int
    outside: int
    count: int


DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",  # RAPL energy counters (CVE-2020-8694)
)
DEFAULT_READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


@dataclass(frozen=True)
class ContainerSpec:
    """Everything about one container, as data (checked by ``validate.validate_spec``)."""

    #: Container id, ``sk-`` and 12 hex digits (``paths.new_container_id``); every host
    #: resource of the container (run dir, cgroups) is named from it.
    id: str
    #: Read-only layer directories of the image, top-most first (overlay lowerdir order).
    layers: tuple[str, ...]
    #: argv of the main process; an argv[0] without '/' is looked up in the container's PATH.
    command: tuple[str, ...]
    #: Environment of the main process, (name, value) pairs; nothing of the caller's
    #: environment is inherited. PATH, HOME, HOSTNAME and LANG get defaults (``plan``;
    #: HOME is /home/sandbox, or /tmp with ``upper_dir``).
    env: tuple[tuple[str, str], ...] = ()
    #: Working directory of the main process, an absolute path inside the container.
    workdir: str = "/"
    #: uid the main process runs as inside the container (0 only with ``allow_root``).
    user: int = 65534
    #: gid the main process runs as inside the container.
    group: int = 65534
    #: Allow ``user == 0`` (root inside the container, still without capabilities); such a
    #: container may have no writable host volume (``validate.check_root_mode``).
    allow_root: bool = False
    #: Hostname in the container's own uts namespace (also written to /etc/hostname and
    #: /etc/hosts, except with ``upper_dir``).
    hostname: str = "sandbox"
    #: Bytes of the tmpfs holding the overlay's writable layer (counted in the memory cap;
    #: unused with ``upper_dir``).
    writable_size: int = 256 * 1024**2
    #: Bytes of the container's /tmp and of its home directory (each a tmpfs; no home tmpfs
    #: with ``upper_dir``).
    tmp_size: int = 256 * 1024**2
    #: Bytes of /dev/shm.
    shm_size: int = 64 * 1024**2
    #: Bytes of tmpfs size per inode: every writable tmpfs of the container (writable layer,
    #: /tmp, home, /dev/shm, extra tmpfs mounts) may hold ``size // bytes_per_inode`` files
    #: (at least ``MIN_TMPFS_INODES``), so that a flood of tiny files ends in ENOSPC
    #: instead of filling the memory cap with inodes (``plan.tmpfs_inodes``).
    bytes_per_inode: int = BYTES_PER_INODE
    #: Volumes and extra tmpfs mounts, mounted in this order after the standard layout.
    mounts: tuple[MountOp, ...] = ()
    #: Files written into the container once the volumes are mounted, (path, mode,
    #: content), owned by the container's root: a kernel's connection file, in its shared
    #: socket folder (the content passes through the plan file, private to the owner).
    files: tuple[tuple[str, int, str], ...] = ()
    #: cgroup caps (memory, CPU, processes).
    limits: Limits = field(default_factory=Limits)
    #: Refuse to start when the caps cannot be enforced (an unprivileged caller with no
    #: delegated cgroup). False: start without cgroups, which ``ps`` and ``%sandbox`` say;
    #: only the administrator's ``SandboxPolicy.allow_unenforced_limits`` sets it.
    enforce_limits: bool = True
    #: How the container reaches the network.
    network: NetworkMode = NetworkMode.NONE
    #: The settings of network ``nat`` (allow-list, bandwidth, subnet, resolvers); None
    #: with ``none``.
    nat: NatConfig | None = None
    #: User-namespace uid map (``userns.UserNamespace``); empty: no user namespace, which
    #: only root may ask for (image builds). Container ``user`` must be mapped.
    uid_map: tuple[IdMap, ...] = ()
    #: User-namespace gid map; set together with ``uid_map``.
    gid_map: tuple[IdMap, ...] = ()
    #: (newuidmap, newgidmap): an unprivileged caller's maps use its subordinate range and
    #: are written by these setuid helpers. Empty: the caller writes the maps itself.
    map_helpers: tuple[str, ...] = ()
    #: Idmap the image layers with ``uid_map`` (root mode): files owned by host root appear
    #: owned by container root instead of the overflow uid.
    idmap_layers: bool = False
    #: Paths hidden inside the container (an empty read-only tmpfs over a directory,
    #: /dev/null over a file; paths the image lacks are skipped).
    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS
    #: Paths made read-only inside the container.
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY_PATHS
    #: Load the allow-list seccomp filter before exec.
    seccomp: bool = True
    #: RLIMIT_NOFILE of the main process (soft and hard).
    nofile: int = 4096
    #: Image reference shown by ``ps`` (``python3:latest``, ``host``).
    image: str = ""
    #: Manifest digest of the image; written to the run dir so that ``image rm`` can refuse
    #: to remove an image a running container uses.
    image_digest: str = ""
    #: Free-form (key, value) labels kept in the run dir's metadata (e.g. the kernelspec).
    labels: tuple[tuple[str, str], ...] = ()
    #: A host directory that keeps the writable layer on disk (its ``upper/``) instead of a
    #: tmpfs: image builds, where what a step writes becomes the new layer. Such a container
    #: gets no /etc files written by the runtime and no home tmpfs (HOME is /tmp), so the
    #: layer holds exactly what the command wrote. Empty: the usual tmpfs.
    upper_dir: str = ""

    def env_dict(self) -> dict[str, str]:
        """The environment as a mapping (later duplicates win); ``plan`` lays it over the
        defaults."""
        return dict(self.env)
