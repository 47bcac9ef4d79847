"""The container spec: pure data, no system calls.

A ContainerSpec says everything about one container. ``validate.validate_spec``
checks it, ``plan.compile_plan`` turns it into the ordered low-level operations
that the executor (native/sk-runtime.c) performs, and ``container.Container``
drives the lifecycle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NetworkMode(str, enum.Enum):
    """How the container reaches the network.

    ``none``: a fresh network namespace with only loopback up (the only mode today;
    Jupyter talks to the kernel over unix sockets bind-mounted into the container).
    """

    NONE = "none"


@dataclass(frozen=True)
class Bind:
    """Bind-mount a host path into the container.

    ``target`` is an absolute path inside the container; it is resolved inside the
    new root (symlinks in the image can never point it at the host).
    """

    source: str
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class Tmpfs:
    """Mount a size-capped tmpfs at ``target`` inside the container."""

    target: str
    size: int
    mode: int = 0o1777


MountOp = Bind | Tmpfs


@dataclass(frozen=True)
class IdMap:
    """One uid or gid map line for a user namespace (rootless mode)."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class Limits:
    """Resource caps. ``None`` means no cap.

    memory: bytes; swap is off (memory+swap = memory) unless ``memory_swap`` is set.
    cpus: fractional CPUs, applied as a CFS quota over a 100 ms period.
    cpu_weight: relative share 1..10000 (v2 cpu.weight; v1 cpu.shares is derived).
    pids: maximum number of tasks.
    defer_cpu: create the container without the CPU quota; apply it later with
    ``Container.apply_deferred_cpu()`` (kernel start is CPU-bound).
    """

    memory: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    cpu_weight: int | None = None
    pids: int | None = None
    defer_cpu: bool = False


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
    """Everything about one container, as data.

    layers: read-only layer directories of the image, top-most first (overlay lowerdir order).
    command: argv of the main process (argv[0] looked up in the container's PATH).
    user/group: ids the main process runs as (0 only when ``allow_root``).
    writable_size: bytes of the tmpfs holding the overlay's writable layer.
    """

    id: str
    layers: tuple[str, ...]
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: int = 65534
    group: int = 65534
    allow_root: bool = False
    hostname: str = "sandbox"
    writable_size: int = 256 * 1024**2
    tmp_size: int = 256 * 1024**2
    shm_size: int = 64 * 1024**2
    mounts: tuple[MountOp, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network: NetworkMode = NetworkMode.NONE
    uid_map: tuple[IdMap, ...] = ()
    gid_map: tuple[IdMap, ...] = ()
    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY_PATHS
    seccomp: bool = True
    nofile: int = 4096
    image: str = ""
    image_digest: str = ""  # manifest digest of the image (written to the run dir for `image rm`)
    labels: tuple[tuple[str, str], ...] = ()

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)
