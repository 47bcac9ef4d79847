"""Find out how cgroups are set up on this host, from /proc/self/mountinfo and /proc/self/cgroup.

Layer: cgroups (OS side). ``get_manager`` calls ``detect`` once per cached manager; the
drivers read the resulting ``CgroupLayout``.

Everything takes injectable inputs (a filesystem ``root`` prefix and the texts of the mount table
and of /proc/self/cgroup) so that tests run against a fake tree without root.

Modes (same rules as crun/systemd):

- unified: a cgroup2 filesystem and no v1 hierarchy for memory, cpu or pids;
- hybrid: v1 hierarchies for the controllers plus a cgroup2 mount elsewhere (systemd's
  /sys/fs/cgroup/unified, which holds no controllers);
- legacy: v1 hierarchies only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import CgroupError
from ..paths import unescape_mount
from .base import CgroupMode

#: The v1 controllers a container cgroup is created in (cpuacct gives CPU usage on v1).
V1_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids")
#: The v2 controllers enabled for container cgroups.
V2_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class Mount:
    """One cgroup-ish mount: where it is, its type, its options and which hierarchy dir it shows."""

    mountpoint: str
    fstype: str
    options: frozenset[str]
    root: str = "/"  # the directory of the hierarchy mounted there (mountinfo field 4)


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo or /proc/self/mounts text (the format is recognised per line).
    Called by ``detect``."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if " - " in line and fields[0].isdigit() and len(fields) >= 10:
            # mountinfo: id parent dev root mountpoint opts [optional...] - fstype src superopts
            left, _, right = line.partition(" - ")
            lf = left.split()
            rf = right.split()
            if len(lf) < 6 or len(rf) < 3:
                continue
            opts = set(lf[5].split(",")) | set(rf[2].split(","))
            mounts.append(
                Mount(
                    mountpoint=unescape_mount(lf[4]),
                    fstype=rf[0],
                    options=frozenset(opts),
                    root=unescape_mount(lf[3]),
                )
            )
        elif len(fields) >= 4:
            # mounts: source mountpoint fstype options dump pass
            mounts.append(
                Mount(
                    mountpoint=unescape_mount(fields[1]),
                    fstype=fields[2],
                    options=frozenset(fields[3].split(",")),
                )
            )
    return mounts


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Parse /proc/<pid>/cgroup: ({v1 controller or name=...: path}, v2 path or None).

    A co-mounted hierarchy (``1:cpu,cpuacct:/x``) gives one entry per controller. Called by
    ``detect``.
    """
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, ctrls, path = parts
        if hier_id == "0" and ctrls == "":
            v2 = path
            continue
        for ctrl in ctrls.split(","):
            if ctrl:
                v1[ctrl] = path
    return v1, v2


def host_path(root: str, path: str) -> str:
    """``path`` (absolute, as the kernel shows it) seen through the filesystem prefix ``root``."""
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


def cgroup_dir(mount: Mount, cgroup_path: str, root: str = "/") -> str:
    """The directory of the cgroup ``cgroup_path`` (as in /proc/self/cgroup) in ``mount``.

    A mount that shows a sub-directory of the hierarchy (mountinfo root, e.g. inside a container)
    is taken into account: ``/a/b`` seen through a mount of ``/a`` is ``<mountpoint>/b``.
    """
    rel = cgroup_path
    mroot = mount.root.rstrip("/")
    if mroot and (rel == mroot or rel.startswith(mroot + "/")):
        rel = rel[len(mroot) :]
    rel = rel.strip("/")
    base = host_path(root, mount.mountpoint)
    return os.path.join(base, rel) if rel else base


@dataclass
class CgroupLayout:
    """What ``detect`` found; the drivers take their parent directories from it."""

    mode: CgroupMode
    root: str = "/"
    #: v1 controller -> its mount (co-mounted controllers share one Mount).
    v1_mounts: dict[str, Mount] = field(default_factory=dict)
    #: v1 controller -> the caller's cgroup path in that hierarchy (from /proc/self/cgroup).
    v1_own: dict[str, str] = field(default_factory=dict)
    #: the cgroup2 mount (None on legacy hosts).
    v2_mount: Mount | None = None
    #: the caller's v2 cgroup path ("0::" line), None if absent.
    v2_own: str | None = None

    def v1_dir(self, controller: str) -> str | None:
        """The caller's own cgroup directory in a v1 hierarchy (None if not mounted); the v1
        driver's default parent."""
        mount = self.v1_mounts.get(controller)
        if mount is None:
            return None
        return cgroup_dir(mount, self.v1_own.get(controller, "/"), self.root)

    def v2_dir(self) -> str | None:
        """The caller's own cgroup directory in the cgroup2 hierarchy (None if none); the v2
        driver's default parent."""
        if self.v2_mount is None:
            return None
        return cgroup_dir(self.v2_mount, self.v2_own or "/", self.root)

    def v2_mountpoint(self) -> str | None:
        """Where the cgroup2 filesystem is mounted, seen through ``root`` (None on legacy
        hosts); the v2 driver resolves a configured parent against it."""
        return None if self.v2_mount is None else host_path(self.root, self.v2_mount.mountpoint)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        err = CgroupError(
            f"reading {path}: {exc.strerror or exc}; /proc must be mounted to find the cgroups"
        )
        err.errno = exc.errno
        raise err from exc


def _pick(mounts: list[Mount]) -> Mount:
    """Prefer the mount under /sys/fs/cgroup when a hierarchy is mounted more than once."""
    for m in mounts:
        if m.mountpoint.startswith("/sys/fs/cgroup"):
            return m
    return mounts[0]


def detect(
    root: str = "/",
    mounts_text: str | None = None,
    cgroup_text: str | None = None,
) -> CgroupLayout:
    """Detect the cgroup mode, the hierarchies' mount points and the caller's own cgroups.

    ``root`` prefixes every filesystem path (a fake tree in tests). ``mounts_text`` (mountinfo
    or mounts format) and ``cgroup_text`` default to the files of ``/proc/self`` (not prefixed).
    Called by ``get_manager``; CgroupError when no cgroup filesystem is mounted.
    """
    if mounts_text is None:
        mounts_text = _read_text("/proc/self/mountinfo")
    if cgroup_text is None:
        cgroup_text = _read_text("/proc/self/cgroup")
    mounts = parse_mounts(mounts_text)
    v1_own, v2_own = parse_proc_cgroup(cgroup_text)

    v1_candidates: dict[str, list[Mount]] = {}
    v2_candidates: list[Mount] = []
    for m in mounts:
        if m.fstype == "cgroup2":
            v2_candidates.append(m)
        elif m.fstype == "cgroup":
            for ctrl in V1_CONTROLLERS:
                if ctrl in m.options:
                    v1_candidates.setdefault(ctrl, []).append(m)
    v1_mounts = {ctrl: _pick(ms) for ctrl, ms in v1_candidates.items()}
    v2_mount: Mount | None = None
    if v2_candidates:
        exact = [m for m in v2_candidates if m.mountpoint == "/sys/fs/cgroup"]
        v2_mount = exact[0] if exact else _pick(v2_candidates)

    needed_v1 = any(c in v1_mounts for c in V2_CONTROLLERS)
    if v2_mount is not None and not needed_v1:
        mode = CgroupMode.UNIFIED
    elif needed_v1:
        mode = CgroupMode.HYBRID if v2_mount is not None else CgroupMode.LEGACY
    else:
        raise CgroupError(
            "no cgroup filesystem found in the mount table (neither cgroup2 nor v1 memory/cpu/"
            "pids hierarchies); mount cgroup2 on /sys/fs/cgroup (or the v1 hierarchies) so that "
            "kernels can be given limits"
        )
    return CgroupLayout(
        mode=mode,
        root=root,
        v1_mounts=v1_mounts if mode is not CgroupMode.UNIFIED else {},
        v1_own=v1_own,
        v2_mount=v2_mount,
        v2_own=v2_own,
    )
