"""Where the product keeps things on the host, and how containers are named.

Layer: leaf (imports nothing of the package). Read by the runtime, the image store, the
provisioner and the CLI; nothing else computes these paths.

* state dir (the writable image store, snapshots, build cache): ``/var/lib/sandbox-kernel``
  for root, ``$XDG_DATA_HOME/sandbox-kernel`` (default ``~/.local/share/sandbox-kernel``)
  otherwise; ``SANDBOX_KERNEL_STATE_DIR`` overrides.
* system state dir: the store the administrator builds for every user of the host,
  ``/var/lib/sandbox-kernel`` (``SANDBOX_KERNEL_SYSTEM_STATE_DIR`` overrides); other users
  read it, after their own store.
* run dir (one short directory per running container, named from its id):
  ``/run/sandbox-kernel`` for root, ``$XDG_RUNTIME_DIR/sandbox-kernel`` otherwise, or, with
  no XDG_RUNTIME_DIR (runuser, cron, JupyterHub's LocalProcessSpawner), a private
  ``/tmp/sk-UID`` (``rundir.ensure_run_root`` checks its owner and mode);
  ``SANDBOX_KERNEL_RUN_DIR`` overrides. No socket lives there (a kernel's are in a tmpfs
  of its container, reached by descriptor), so its length does not matter.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Collection
from pathlib import Path

#: The package's own directory (shipped data and the compiled executor live below it).
PACKAGE_DIR = Path(__file__).resolve().parent

#: Data shipped with the package: kind -> (folder inside the installed package, folder of a
#: source checkout). setup.py copies each checkout folder to its package folder.
SHIPPED: dict[str, tuple[str, str]] = {
    "recipes": ("recipes", "images"),
    "kernelspecs": ("kernelspecs_data", "kernelspecs"),
    "notebooks": ("notebooks_data", "notebooks"),
}

ID_PREFIX = "sk-"
ID_RE = re.compile(r"^sk-[0-9a-f]{12}$")


def new_container_id() -> str:
    """A fresh container id; every host resource of the container is named from it.

    Called by whoever builds a ContainerSpec: the provisioner (once per kernel, kept across
    restarts), ``sandbox-kernel run`` and the image builder's ``run_in_image``.
    """
    return ID_PREFIX + secrets.token_hex(6)


def is_container_id(name: str) -> bool:
    """Is ``name`` shaped like a container id? Called by gc, ``ps``, ``find_container`` and the
    provisioner's re-attach to tell container run dirs and cgroups from anything else."""
    return bool(ID_RE.match(name))


def shipped_dirs(kind: str) -> tuple[Path, Path]:
    """Where shipped data of ``kind`` (a key of ``SHIPPED``) may be, in search order: inside
    the installed package, then in the source checkout. Callers (kernelspecs, the demo, the
    recipe search) take the first that holds what they look for."""
    installed, checkout = SHIPPED[kind]
    return PACKAGE_DIR / installed, PACKAGE_DIR.parent / checkout


def state_dir() -> Path:
    """The state dir (see the module docstring). Called by the image store, the image builder
    and the ``host`` pseudo-image when no root is given to them."""
    env = os.environ.get("SANDBOX_KERNEL_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return system_state_dir()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "sandbox-kernel"


def run_dir() -> Path:
    """The run root holding one run dir per container (see the module docstring). Called by
    ``Container.create``, gc, ``ps``, ``find_container``, the store's in-use check and the
    provisioner (connection paths, kept exit reasons) when no root is given to them."""
    env = os.environ.get("SANDBOX_KERNEL_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/sandbox-kernel")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and is_private_dir(Path(xdg)):
        return Path(xdg) / "sandbox-kernel"
    return _private_run_root(os.geteuid())


def _private_run_root(uid: int) -> Path:
    return Path("/tmp") / f"sk-{uid}"


#: the per-user run roots root's ``ps``, ``stats`` and ``gc`` look at (see ``user_run_roots``)
_USER_ROOT_GLOBS = (
    ("/tmp", re.compile(r"^sk-([0-9]+)$"), ""),
    ("/run/user", re.compile(r"^([0-9]+)$"), "sandbox-kernel"),
)


def user_run_roots(skip: Collection[str] = ()) -> list[tuple[int, Path]]:
    """(uid, run root) of every other user's servers that use a default run root: the
    private ``/tmp/sk-UID`` and ``/run/user/UID/sandbox-kernel`` (a server with
    ``SANDBOX_KERNEL_RUN_DIR`` set is not found). Only directories that are what that user's
    ``ensure_run_root`` makes count: a real directory, owned by that uid, closed to others.
    ``skip``: paths not to touch at all (mount points: a user's FUSE mount could block an
    lstat). Called by root's ``ps``, ``stats`` and ``gc`` (``runtime.owners.run_roots``)."""
    found: list[tuple[int, Path]] = []
    for base, pattern, below in _USER_ROOT_GLOBS:
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            m = pattern.match(name)
            if m is None or str(int(m.group(1))) != m.group(1):
                continue  # one name per uid: no leading zeros
            uid = int(m.group(1))
            path = Path(base) / name / below if below else Path(base) / name
            if any(str(p) in skip for p in (path, path.parent)):
                continue
            if uid != os.geteuid() and is_private_dir(path, uid):
                found.append((uid, path))
    return found


def is_private_dir(path: Path, uid: int | None = None) -> bool:
    """Is ``path`` a real directory (not a symlink) of ``uid`` (default: the caller), closed
    to others (as systemd makes XDG_RUNTIME_DIR)?"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    owner = os.geteuid() if uid is None else uid
    return stat.S_ISDIR(st.st_mode) and st.st_uid == owner and (st.st_mode & 0o077) == 0


def system_state_dir() -> Path:
    """The system image store's directory (see the module docstring). Called by the image
    store lookup, which reads it after the caller's own store."""
    return Path(os.environ.get("SANDBOX_KERNEL_SYSTEM_STATE_DIR") or "/var/lib/sandbox-kernel")


_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape_mount(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space...) of the kernel's mount tables.
    Called by the cgroup detection and by ``mount_points``."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> set[str]:
    """The mount points this process sees (/proc/self/mountinfo, escapes decoded). Root
    touches none of another user's paths that is one (a FUSE mount of theirs could block):
    gc and ps (``runtime.owners``) and the quota walk (``quota``) skip them."""
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    out.add(unescape_mount(fields[4].decode(errors="surrogateescape")))
    except OSError:
        pass
    return out
