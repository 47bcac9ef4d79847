"""A container's run dir as other processes see it: ``<run_root>/<id>/``.

Layer: runtime (OS side; imports only the leaves).
The container runtime writes it (``meta.json``, ``pid``, ``image``, ``exit.json``); gc, ``ps``,
``stats``, the provisioner and the image store's in-use check read it. Liveness checks use the
process start time from /proc, so a reused pid is never taken for the original process.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import ContainerNotFound, SandboxError
from ..paths import is_container_id, run_dir


def proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None if gone.
    ``Container`` records it next to each pid it writes; ``process_alive`` compares it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # after the ")" that ends the command name (which may itself contain ")" or spaces)
    rest = data.rsplit(b")", 1)[-1].split()
    return rest[19].decode() if len(rest) > 19 else None


def process_alive(pid: int, starttime: str | None) -> bool:
    """Is ``pid`` alive and, when ``starttime`` is known, still the same process? Called by
    ``ContainerInfo`` and by the provisioner for a kernel it re-attached to."""
    if pid <= 0:
        return False
    now = proc_starttime(pid)
    return now is not None and (starttime is None or now == starttime)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (readers never see a half-written file). Called by
    ``Container`` (meta.json, pid, exit.json) and by ``jupyter.exits``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


#: The meta.json field (True) of an idle member of a server's warm pool: ``ps`` shows it,
#: the kernel count counts it with the kernels, a claim drops it (jupyter/pool.py).
META_POOL = "pool"
#: The most a run dir file may hold: each is a few hundred bytes when the runtime writes
#: it. Root's ``ps`` and ``gc`` read other users' run dirs, where anything may be planted.
MAX_RUN_FILE = 64 << 10


def read_small(path: Path, limit: int = MAX_RUN_FILE) -> bytes | None:
    """The bytes of the regular file ``path`` (never through a symlink at its last
    component, at most ``limit`` bytes: None when longer), or None when it is missing or
    unreadable. Every read of a run dir file goes through here."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable, too big or not an
    object. Called by ``ContainerInfo`` and by ``Container`` when it updates meta.json."""
    raw = read_small(path)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." planted by anyone
        return None
    return data if isinstance(data, dict) else None


def _read_pidfile(path: Path) -> dict[str, Any]:
    """``{"pid": N, "start": T}`` as the runtime writes it; a bare number is read as the pid."""
    data = read_json(path)
    if data is not None:
        return data
    raw = read_small(path, 64)
    try:
        return {"pid": int(raw.strip())} if raw is not None else {}
    except ValueError:
        return {}


class ContainerInfo:
    """What another process can know about a container from its run dir. Made by
    ``find_container`` (``ps``, the provisioner's re-attach), by gc for each run dir and by the
    image store's in-use check."""

    def __init__(self, path: Path, container_id: str | None = None) -> None:
        """Read the metadata and pid files of the run dir at ``path`` now (the path may be a
        ``/proc/self/fd`` one, valid only while its opener holds it: then ``container_id``
        names the container)."""
        self.path = path
        self.id = container_id or path.name
        self.meta: dict[str, Any] = read_json(path / "meta.json") or {}
        self.pidinfo: dict[str, Any] = _read_pidfile(path / "pid")

    @property
    def supervisor_pid(self) -> int | None:
        """The executor's host pid from the ``pid`` file (None before start, or malformed)."""
        pid = self.pidinfo.get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None

    def running(self) -> bool:
        """Is the executor still the process that was started (pid and start time)?"""
        pid = self.supervisor_pid
        start = self.pidinfo.get("start")
        return pid is not None and process_alive(pid, start if isinstance(start, str) else None)

    def owner_alive(self) -> bool:
        """Is the process that created the container still alive? gc keeps a run dir whose
        executor has not started yet while its owner lives."""
        pid = self.meta.get("owner_pid")
        return isinstance(pid, int) and process_alive(pid, self.meta.get("owner_start"))

    def image_digest(self) -> str | None:
        """Manifest digest of the image the container runs (the ``image`` file), if recorded.
        Read by the image store's in-use check (``image rm``)."""
        raw = read_small(self.path / "image", 200)
        return (raw.decode(errors="replace").strip() or None) if raw is not None else None

    def exit_result(self) -> dict[str, Any] | None:
        """The ``exit.json`` the owner wrote when the container ended (``ExitResult.to_json``),
        or None while it runs."""
        return read_json(self.path / "exit.json")


def ensure_run_root(root: Path) -> Path:
    """Create the run root if needed and make sure nobody else controls it: as root, mode
    0711 (kernels reach their own run dirs only); otherwise owned by the caller, not a
    symlink, mode 0700 (a directory someone else made in /tmp is refused). Called by
    ``Container.create``."""
    if os.geteuid() == 0:
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        return root
    with contextlib.suppress(FileExistsError):
        root.mkdir(parents=True, mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(
            f"the run directory {root} is not a private directory of uid {os.geteuid()} "
            f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it, or set "
            "SANDBOX_KERNEL_RUN_DIR to a directory of your own with mode 0700"
        )
    return root


def container_dirs(root: Path) -> list[Path]:
    """The run dirs under the run root ``root``: directories (not symlinks) named like a
    container id, sorted. Called by gc, ``ps`` and ``runtime.owners``."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for name in names:
        if not is_container_id(name):
            continue
        try:
            if stat.S_ISDIR(os.lstat(root / name).st_mode):
                out.append(root / name)
        except OSError:
            continue
    return out


def running_containers(root: Path) -> list[ContainerInfo]:
    """The containers of the run root ``root`` whose executor runs (``ContainerInfo.running``).
    Called by the provisioner's count of a user's kernels."""
    return [info for info in (ContainerInfo(p) for p in container_dirs(root)) if info.running()]


def find_container(container_id: str, *, root: Path | None = None) -> ContainerInfo:
    """The run dir of container ``container_id`` under the run root (default
    ``paths.run_dir()``), for a process other than the container's owner: ``ps``, ``stats``,
    a provisioner re-attaching after a server restart. ContainerNotFound when there is none.
    """
    root = root or run_dir()
    if not is_container_id(container_id) or not (root / container_id / "meta.json").is_file():
        raise ContainerNotFound(
            f"no container {container_id!r} under {root}; list them with: sandbox-kernel ps"
        )
    return ContainerInfo(root / container_id)


#: remove_tree's bounds: entries removed, directory depth.
REMOVE_MAX_ENTRIES = 200_000
REMOVE_MAX_DEPTH = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove the directory ``name`` of the directory open at ``parent_fd`` and all it holds,
    as root may in another user's run dir: every directory opened relative to its parent
    without following a link and without blocking (a FIFO or device swapped in is unlinked,
    never opened), no recursion, bounded in entries and depth (OSError past them). Called
    by root's gc for other users' dead run dirs."""
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    stack: list[tuple[int, str, int]] = [(parent_fd, name, top)]
    removed = 0
    try:
        while stack:
            pfd, here, fd = stack[-1]
            child: tuple[int, str, int] | None = None
            with os.scandir(fd) as it:
                for entry in it:
                    removed += 1
                    if removed > REMOVE_MAX_ENTRIES:
                        raise OSError(f"more than {REMOVE_MAX_ENTRIES} entries below {name}")
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            child = (fd, entry.name, os.open(entry.name, _DIR_FLAGS, dir_fd=fd))
                        except OSError:  # swapped for something else meanwhile
                            with contextlib.suppress(OSError):
                                os.unlink(entry.name, dir_fd=fd)
                            continue
                        break
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(entry.name, dir_fd=fd)
            if child is not None:
                if len(stack) >= REMOVE_MAX_DEPTH:
                    os.close(child[2])
                    raise OSError(f"deeper than {REMOVE_MAX_DEPTH} directories below {name}")
                stack.append(child)
                continue
            stack.pop()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(here, dir_fd=pfd)
    finally:
        for _, _, fd in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
