"""Compile a ContainerSpec into the executor's ordered operations (pure; no system calls
except reading the type of bind-mount sources).

Layer: runtime (OS side). ``Container.start`` calls ``compile_plan`` with the facts of the
host it gathered (``HostContext``) and hands the result to ``protocol.encode_plan``. The
order of the mount phase is the container's filesystem layout:

writable scratch -> overlay root -> /proc -> /dev -> /sys and the read-only cgroup view
-> /tmp, home -> /etc files -> user volumes -> masked and read-only paths -> pivot.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import ops
from .shim import ShimEntry
from .spec import MIN_TMPFS_INODES, Bind, ContainerSpec, IdMap, Tmpfs

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME = "/home/sandbox"
NAMESPACES = ("mount", "pid", "uts", "ipc", "net", "cgroup")
#: Flags of the read-only kernel filesystems and of the cgroup view.
_RO_KERNEL_FS = ("ro", "nosuid", "nodev", "noexec")


@dataclass(frozen=True)
class HostContext:
    """Facts about the host the plan depends on (gathered by ``Container.start``)."""

    #: Empty host directory; the writable layer's tmpfs is mounted on it (in the ns only).
    scratch_dir: str
    #: The container's cgroup directories to join (v1: one per hierarchy).
    cgroup_dirs: tuple[str, ...]
    #: 1 or 2.
    cgroup_version: int
    #: v1: (directory name under /sys/fs/cgroup, controllers) of each joined hierarchy.
    cgroup_v1_mounts: tuple[tuple[str, str], ...] = ()
    #: The compiled seccomp filter file, or None for no filter.
    seccomp_file: str | None = None
    #: rtnetlink requests (hex, made with pyroute2 by ``runtime.netns``) init sends in the
    #: container's network namespace: loopback up, for network "none".
    netlink: tuple[str, ...] = ()
    #: Rootless: the shim layer's entries (``runtime.shim``), made before the root.
    shim: tuple[ShimEntry, ...] = ()
    #: Network ``nat``: init waits for ``go`` while the owner makes its links
    #: (``network.nat.Attachment.attach``), and this is its /etc/resolv.conf.
    resolv_conf: str | None = None


def tmpfs_inodes(spec: ContainerSpec, size: int) -> int:
    """How many files a writable tmpfs of ``size`` bytes may hold in ``spec``'s container:
    one per ``spec.bytes_per_inode`` bytes, at least ``MIN_TMPFS_INODES``. The one rule for
    every tmpfs the plan makes (a tiny-file flood then ends in ENOSPC, not an OOM kill)."""
    return max(MIN_TMPFS_INODES, size // spec.bytes_per_inode)


def tmpfs_data(spec: ContainerSpec, size: int, mode: int, extra: str = "") -> str:
    """The options of a writable tmpfs of the plan: mode, size and inode cap, then
    ``extra`` (``uid=..,gid=..``)."""
    data = f"mode={mode:o},size={size},nr_inodes={tmpfs_inodes(spec, size)}"
    return f"{data},{extra}" if extra else data


def _setup(spec: ContainerSpec, host: HostContext) -> list[ops.Op]:
    names = (*NAMESPACES, "user") if spec.uid_map else NAMESPACES
    out: list[ops.Op] = [ops.ContainerId(spec.id), ops.Namespaces(names)]
    out += _userns(spec)
    out += [ops.JoinCgroup(d) for d in host.cgroup_dirs]
    if host.seccomp_file:
        out.append(ops.Seccomp(host.seccomp_file))
    if host.resolv_conf is not None:
        out.append(ops.SyncNet())
    out += [ops.Netlink(request) for request in host.netlink]
    return out


def _host_id(maps: tuple[IdMap, ...], inside: int) -> int:
    return next(m.outside + inside - m.inside for m in maps if 0 <= inside - m.inside < m.count)


def _userns(spec: ContainerSpec) -> list[ops.Op]:
    """The user namespace's maps, how they are written, and its idmapped mounts: binds
    flagged ``idmap`` show their on-disk owner ids as the same container ids, for the
    container's user and group only (container root stays out: it cannot write there)."""
    if not spec.uid_map:
        return []
    out: list[ops.Op] = [ops.UidMap(m.inside, m.outside, m.count) for m in spec.uid_map]
    out += [ops.GidMap(m.inside, m.outside, m.count) for m in spec.gid_map]
    if spec.map_helpers:
        out.append(ops.IdmapHelper(spec.map_helpers[0], spec.map_helpers[1]))
    out.append(ops.NoUserns())
    if any(isinstance(m, Bind) and m.idmap for m in spec.mounts):
        ids = {
            (spec.user, _host_id(spec.uid_map, spec.user)),
            (spec.group, _host_id(spec.gid_map, spec.group)),
        }
        out += [ops.BindMap(inside, outside, 1) for inside, outside in sorted(ids)]
    if spec.idmap_layers:
        out += [ops.LowerMap(m.inside, m.outside, m.count) for m in spec.uid_map]
    return out


def _root(spec: ContainerSpec, host: HostContext) -> list[ops.Op]:
    scratch = (
        ops.Scratch(spec.upper_dir, None)
        if spec.upper_dir
        else ops.Scratch(
            host.scratch_dir, spec.writable_size, tmpfs_inodes(spec, spec.writable_size)
        )
    )
    return [
        ops.Hostname(spec.hostname),
        scratch,
        *(entry.op() for entry in host.shim),
        ops.RootFs(spec.layers),
        ops.Mkdir("/proc", 0o555),
        ops.RealDir("/proc"),
        ops.Mount("proc", "proc", "/proc", ("nosuid", "nodev", "noexec"), None),
    ]


def _dev(spec: ContainerSpec) -> list[ops.Op]:
    out: list[ops.Op] = [
        ops.Mkdir("/dev", 0o755),
        ops.RealDir("/dev"),
        ops.Mount(
            "tmpfs", "tmpfs", "/dev", ("nosuid", "noexec", "strictatime"), "mode=755,size=65536"
        ),
    ]
    for node in DEV_NODES:
        out += [
            ops.Touch(f"/dev/{node}", 0o666),
            ops.BindMount(f"/dev/{node}", f"/dev/{node}", ("nosuid", "noexec")),
        ]
    out += [
        ops.Mkdir("/dev/pts", 0o755),
        ops.Mount(
            "devpts",
            "devpts",
            "/dev/pts",
            ("nosuid", "noexec"),
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        ops.Symlink("pts/ptmx", "/dev/ptmx"),
        ops.Symlink("/proc/self/fd", "/dev/fd"),
    ]
    out += [
        ops.Symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
        for i, name in enumerate(("stdin", "stdout", "stderr"))
    ]
    out += [
        ops.Mkdir("/dev/shm", 0o1777),
        ops.Mount(
            "tmpfs",
            "shm",
            "/dev/shm",
            ("nosuid", "nodev", "noexec"),
            tmpfs_data(spec, spec.shm_size, 0o1777),
        ),
        ops.Mkdir("/dev/mqueue", 0o755),
        ops.Mount("mqueue", "mqueue", "/dev/mqueue", ("nosuid", "nodev", "noexec"), None),
        # populated: nothing more is ever created in /dev
        ops.Remount("/dev", ("ro", "nosuid", "noexec")),
    ]
    return out


def _sys(host: HostContext) -> list[ops.Op]:
    """/sys read-only, with the container's own cgroup visible read-only (cgroup namespace)."""
    out: list[ops.Op] = [
        ops.Mkdir("/sys", 0o555),
        ops.RealDir("/sys"),
        ops.Mount("sysfs", "sysfs", "/sys", _RO_KERNEL_FS, None),
    ]
    if host.cgroup_version == 2:
        out.append(ops.Mount("cgroup2", "cgroup2", "/sys/fs/cgroup", _RO_KERNEL_FS, None))
        return out
    out.append(
        ops.Mount(
            "tmpfs", "cgroup", "/sys/fs/cgroup", ("nosuid", "nodev", "noexec"), "mode=755,size=4096"
        )
    )
    for name, controllers in host.cgroup_v1_mounts:
        out += [
            ops.Mkdir(f"/sys/fs/cgroup/{name}", 0o555),
            ops.Mount("cgroup", "cgroup", f"/sys/fs/cgroup/{name}", _RO_KERNEL_FS, controllers),
        ]
    out.append(ops.Remount("/sys/fs/cgroup", _RO_KERNEL_FS))
    return out


def _scratch_dirs(spec: ContainerSpec) -> list[ops.Op]:
    """/tmp and the home directory: size-capped tmpfs, home private to the user (none in a
    container whose writable layer is kept: it would leave the home directory in it)."""
    tmp: list[ops.Op] = [
        ops.Mkdir("/tmp", 0o1777),
        ops.RealDir("/tmp"),
        ops.Mount(
            "tmpfs", "tmpfs", "/tmp", ("nosuid", "nodev"), tmpfs_data(spec, spec.tmp_size, 0o1777)
        ),
    ]
    if spec.upper_dir:
        return tmp
    return [
        *tmp,
        ops.Mkdir(HOME, 0o755),
        ops.Mount(
            "tmpfs",
            "home",
            HOME,
            ("nosuid", "nodev"),
            tmpfs_data(spec, spec.tmp_size, 0o700, f"uid={spec.user},gid={spec.group}"),
        ),
    ]


def _etc(spec: ContainerSpec, host: HostContext) -> list[ops.Op]:
    """/etc/hostname, /etc/hosts and /etc/resolv.conf of the container (written into its
    writable layer; none when that layer is kept, as for image builds)."""
    if spec.upper_dir:
        return []
    hosts = (
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{spec.hostname}\n"
    )
    return [
        ops.Mkdir("/etc", 0o755),
        ops.WriteFile("/etc/hostname", 0o644, spec.hostname + "\n"),
        ops.WriteFile("/etc/hosts", 0o644, hosts),
        ops.WriteFile(
            "/etc/resolv.conf",
            0o644,
            host.resolv_conf if host.resolv_conf is not None else "# no network in this sandbox\n",
        ),
    ]


def _volume(spec: ContainerSpec, m: Bind | Tmpfs) -> list[ops.Op]:
    if isinstance(m, Bind):
        is_dir = stat.S_ISDIR(os.stat(m.source).st_mode)
        made: ops.Op = ops.Mkdir(m.target, 0o755) if is_dir else ops.Touch(m.target, 0o644)
        flags = (
            "rec",
            "nosuid",
            "nodev",
            *(("ro",) if m.readonly else ()),
            *(("idmap",) if m.idmap else ()),
        )
        return [made, ops.BindMount(m.source, m.target, flags)]
    owner = f"uid={spec.user},gid={spec.group}" if m.shared else ""
    return [
        ops.Mkdir(m.target, 0o755),
        ops.Mount(
            "tmpfs",
            "tmpfs",
            m.target,
            # shared: the host resolves paths in it, never through a link planted there
            ("nosuid", "nodev", *(("noexec", "nosymfollow") if m.shared else ())),
            tmpfs_data(spec, m.size, m.mode, owner),
        ),
        *((ops.Share(m.target),) if m.shared else ()),
    ]


def _process(spec: ContainerSpec) -> list[ops.Op]:
    home = "/tmp" if spec.upper_dir else HOME
    env = {"PATH": DEFAULT_PATH, "HOME": home, "HOSTNAME": spec.hostname, "LANG": "C.UTF-8"}
    env.update(spec.env_dict())
    out: list[ops.Op] = [ops.Env(k, v) for k, v in env.items()]
    out += [
        ops.Cwd(spec.workdir),
        ops.User(spec.user, spec.group),
        ops.Umask(0o022),
        ops.Rlimit("core", 0, 0),
        ops.Rlimit("nofile", spec.nofile, spec.nofile),
        ops.NoNewPrivs(),
    ]
    out += [ops.Argv(a) for a in spec.command]
    return out


def compile_plan(spec: ContainerSpec, host: HostContext) -> list[ops.Op]:
    """The ordered operations of ``spec`` on this host (the spec is already validated).
    Called by ``Container.start``, once per start."""
    plan = _setup(spec, host) + _root(spec, host) + _dev(spec) + _sys(host)
    plan += _scratch_dirs(spec) + _etc(spec, host)
    for m in spec.mounts:
        plan += _volume(spec, m)
    plan += [ops.WriteFile(path, mode, content) for path, mode, content in spec.files]
    plan += [ops.Mask(p) for p in spec.masked_paths]
    plan += [ops.ReadOnly(p) for p in spec.readonly_paths]
    plan.append(ops.Pivot())
    return plan + _process(spec)
