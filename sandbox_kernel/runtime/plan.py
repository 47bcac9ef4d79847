"""Compile a ContainerSpec into the executor's ordered operations (pure; no system calls
except reading the type of bind-mount sources).

The order of the mount phase matters and is the container's filesystem layout:
writable scratch -> overlay root -> /proc -> /dev -> /sys and the read-only cgroup view
-> /tmp, home -> /etc files -> user volumes -> masked and read-only paths -> pivot.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .spec import Bind, ContainerSpec, Tmpfs

Record = tuple[str, ...]

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOME = "/home/sandbox"


@dataclass(frozen=True)
class HostContext:
    """Facts about the host the plan depends on (gathered by container.py)."""

    scratch_dir: (
        str  # empty host directory; the writable layer's tmpfs is mounted on it (in the ns only)
    )
    cgroup_dirs: tuple[str, ...]  # container cgroup dirs to join (v1: one per hierarchy)
    cgroup_version: int  # 1 or 2
    cgroup_v1_mounts: tuple[
        tuple[str, str], ...
    ] = ()  # (dir name under /sys/fs/cgroup, mount options)
    seccomp_file: str | None = None
    sync_net: bool = True
    keep_writable_dir: bool = False  # scratch is a persistent host dir (image builds), no tmpfs


def _size(n: int) -> str:
    return str(int(n))


def _mkdirs_for_bind(m: Bind) -> Record:
    is_dir = stat.S_ISDIR(os.stat(m.source).st_mode)
    return ("mkdir", m.target, "755") if is_dir else ("touch", m.target, "644")


def compile_plan(spec: ContainerSpec, host: HostContext) -> list[Record]:
    uid, gid = spec.user, spec.group
    recs: list[Record] = [
        ("id", spec.id),
        ("namespaces", "mount,pid,uts,ipc,net,cgroup"),
    ]
    recs += [("cgroup", d) for d in host.cgroup_dirs]
    if host.seccomp_file:
        recs.append(("seccomp", host.seccomp_file))
    if host.sync_net:
        recs.append(("sync", "net"))

    # --- mount phase, in order -------------------------------------------------------
    recs.append(("hostname", spec.hostname))
    recs.append(
        ("scratch", host.scratch_dir, "-" if host.keep_writable_dir else _size(spec.writable_size))
    )
    recs.append(("rootfs", ":".join(spec.layers)))

    recs += [("mkdir", "/proc", "555"), ("realdir", "/proc")]
    recs.append(("mount", "proc", "proc", "/proc", "nosuid,nodev,noexec", "-"))

    recs += [("mkdir", "/dev", "755"), ("realdir", "/dev")]
    recs.append(
        ("mount", "tmpfs", "tmpfs", "/dev", "nosuid,noexec,strictatime", "mode=755,size=65536")
    )
    for node in DEV_NODES:
        recs.append(("touch", f"/dev/{node}", "666"))
        recs.append(("bind", f"/dev/{node}", f"/dev/{node}", "nosuid,noexec"))
    recs.append(("mkdir", "/dev/pts", "755"))
    recs.append(
        (
            "mount",
            "devpts",
            "devpts",
            "/dev/pts",
            "nosuid,noexec",
            "newinstance,ptmxmode=0666,mode=0620",
        )
    )
    recs.append(("symlink", "pts/ptmx", "/dev/ptmx"))
    recs.append(("symlink", "/proc/self/fd", "/dev/fd"))
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        recs.append(("symlink", f"/proc/self/fd/{i}", f"/dev/{name}"))
    recs.append(("mkdir", "/dev/shm", "1777"))
    recs.append(
        (
            "mount",
            "tmpfs",
            "shm",
            "/dev/shm",
            "nosuid,nodev,noexec",
            f"mode=1777,size={spec.shm_size}",
        )
    )
    recs.append(("mkdir", "/dev/mqueue", "755"))
    recs.append(("mount", "mqueue", "mqueue", "/dev/mqueue", "nosuid,nodev,noexec", "-"))
    # populated: nothing more is ever created in /dev
    recs.append(("remount", "/dev", "ro,nosuid,noexec"))

    # /sys read-only, with the container's own cgroup visible read-only (cgroup namespace)
    recs += [("mkdir", "/sys", "555"), ("realdir", "/sys")]
    recs.append(("mount", "sysfs", "sysfs", "/sys", "ro,nosuid,nodev,noexec", "-"))
    if host.cgroup_version == 2:
        recs.append(
            ("mount", "cgroup2", "cgroup2", "/sys/fs/cgroup", "ro,nosuid,nodev,noexec", "-")
        )
    else:
        recs.append(
            (
                "mount",
                "tmpfs",
                "cgroup",
                "/sys/fs/cgroup",
                "nosuid,nodev,noexec",
                "mode=755,size=4096",
            )
        )
        for name, opts in host.cgroup_v1_mounts:
            recs.append(("mkdir", f"/sys/fs/cgroup/{name}", "555"))
            recs.append(
                (
                    "mount",
                    "cgroup",
                    "cgroup",
                    f"/sys/fs/cgroup/{name}",
                    "ro,nosuid,nodev,noexec",
                    opts,
                )
            )
        recs.append(("remount", "/sys/fs/cgroup", "ro,nosuid,nodev,noexec"))

    recs += [("mkdir", "/tmp", "1777"), ("realdir", "/tmp")]
    recs.append(
        ("mount", "tmpfs", "tmpfs", "/tmp", "nosuid,nodev", f"mode=1777,size={spec.tmp_size}")
    )
    recs.append(("mkdir", HOME, "755"))
    recs.append(
        (
            "mount",
            "tmpfs",
            "home",
            HOME,
            "nosuid,nodev",
            f"mode=700,uid={uid},gid={gid},size={spec.tmp_size}",
        )
    )

    recs.append(("mkdir", "/etc", "755"))
    recs.append(("file", "/etc/hostname", "644", spec.hostname + "\n"))
    recs.append(
        (
            "file",
            "/etc/hosts",
            "644",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{spec.hostname}\n",
        )
    )
    recs.append(("file", "/etc/resolv.conf", "644", "# no network in this sandbox\n"))

    for m in spec.mounts:
        if isinstance(m, Bind):
            recs.append(_mkdirs_for_bind(m))
            flags = "rec,nosuid,nodev" + (",ro" if m.readonly else "")
            recs.append(("bind", m.source, m.target, flags))
        elif isinstance(m, Tmpfs):
            recs.append(("mkdir", m.target, "755"))
            recs.append(
                (
                    "mount",
                    "tmpfs",
                    "tmpfs",
                    m.target,
                    "nosuid,nodev",
                    f"mode={m.mode:o},size={m.size}",
                )
            )

    recs += [("mask", p) for p in spec.masked_paths]
    recs += [("readonly", p) for p in spec.readonly_paths]
    recs.append(("pivot",))

    # --- main process ----------------------------------------------------------------
    env = {"PATH": DEFAULT_PATH, "HOME": HOME, "HOSTNAME": spec.hostname, "LANG": "C.UTF-8"}
    env.update(spec.env_dict())
    recs += [("env", f"{k}={v}") for k, v in env.items()]
    recs.append(("cwd", spec.workdir))
    recs.append(("user", str(uid), str(gid)))
    recs.append(("umask", "022"))
    recs.append(("rlimit", "core", "0", "0"))
    recs.append(("rlimit", "nofile", str(spec.nofile), str(spec.nofile)))
    recs.append(("nonewprivs", "1"))
    recs += [("argv", a) for a in spec.command]
    return recs
