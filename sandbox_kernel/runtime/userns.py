"""User namespaces: whose ids a container's ids are on the host.

Layer: OS (runtime). Every container gets a user namespace; the callers (the provisioner,
``sandbox-kernel run``) pick its maps here, once per container, with ``for_caller``:

* rootless (the caller is an ordinary user U): the container's user is U itself, mapped to
  U (podman's ``--userns=keep-id``), so files it writes in a mounted folder belong to U.
  With a subordinate range for U in /etc/subuid and /etc/subgid and the setuid helpers
  ``newuidmap``/``newgidmap`` (Debian's ``uidmap``), every other container id, root
  included, maps into U's range; without them the map is U alone, and ``notice`` says so.
* root: container ids ``0..count-1`` map to a range reserved for the product (the
  subordinate range of the system user ``sandbox-kernel``, made by ``reserve_range`` on
  first use), so container root is never host root and host uid 0 is in no map. Mounted
  folders are idmapped (the executor's ``bindmap``) so that their on-disk owners stay.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import PrivilegeError, SandboxError
from .spec import Bind, ContainerSpec, IdMap

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
#: The system user whose subordinate range root-mode containers use.
PRODUCT_USER = "sandbox-kernel"
PRODUCT_USER_ENV = "SANDBOX_KERNEL_USERNS_USER"
#: Size of the range reserved for root mode: every uid a kernel may run as must fit in it.
RANGE_SIZE = 65536
HELPER_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
SINGLE_MAP_NOTICE = (
    "sandbox-kernel: notice: no subordinate id range for {user} in /etc/subuid and "
    "/etc/subgid, or no newuidmap/newgidmap (apt-get install uidmap): the sandbox maps only "
    "your own uid; there is no root inside it"
)


@dataclass(frozen=True)
class SubRange:
    """One subordinate id range: ids ``start .. start+count-1``."""

    start: int
    count: int


def subordinate_range(path: Path, name: str, uid: int) -> SubRange | None:
    """The first range of user ``name`` (or of its numeric ``uid``) in ``path``
    (/etc/subuid or /etc/subgid: ``owner:start:count`` lines), or None."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start > 0 and count > 0:
            return SubRange(start, count)
    return None


def map_helpers() -> tuple[str, str] | None:
    """The setuid ``newuidmap`` and ``newgidmap`` (root-owned, setuid), or None."""
    found = []
    for name in ("newuidmap", "newgidmap"):
        path = next((f"{d}/{name}" for d in HELPER_DIRS if os.path.isfile(f"{d}/{name}")), None)
        if path is None:
            return None
        st = os.stat(path)
        if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
            return None
        found.append(path)
    return found[0], found[1]


@dataclass(frozen=True)
class UserNamespace:
    """The maps of one container's user namespace (what ``ContainerSpec.uid_map`` and
    ``gid_map`` carry), and how they are written."""

    uid_map: tuple[IdMap, ...]
    gid_map: tuple[IdMap, ...]
    #: (newuidmap, newgidmap) when an unprivileged caller's maps use its subordinate range.
    helpers: tuple[str, str] | None = None
    #: One line for the user when the map had to be reduced (empty otherwise).
    notice: str = ""
    #: "rootless" or "root": who made it.
    mode: str = "rootless"

    @staticmethod
    def _to_host(maps: tuple[IdMap, ...], inside: int) -> int | None:
        for m in maps:
            if m.inside <= inside < m.inside + m.count:
                return m.outside + inside - m.inside
        return None

    def host_uid(self, uid: int) -> int | None:
        """The host uid of container uid ``uid`` (None: unmapped)."""
        return self._to_host(self.uid_map, uid)

    def host_gid(self, gid: int) -> int | None:
        """The host gid of container gid ``gid`` (None: unmapped)."""
        return self._to_host(self.gid_map, gid)

    def apply(self, spec: ContainerSpec) -> ContainerSpec:
        """``spec`` in this user namespace: its maps and helpers; in root mode the image
        layers idmapped, and the binds the caller flagged ``idmap`` (host folders whose files
        keep their on-disk owners) stay so; rootless, no mount can be idmapped (the flags are
        dropped: the caller's own files are its own already). Called by ``sandbox-kernel
        run`` and the kernel launcher for each container."""
        root_mode = self.mode == "root"
        mounts = tuple(
            replace(m, idmap=False) if not root_mode and isinstance(m, Bind) else m
            for m in spec.mounts
        )
        return replace(
            spec,
            uid_map=self.uid_map,
            gid_map=self.gid_map,
            map_helpers=self.helpers or (),
            idmap_layers=root_mode,
            mounts=mounts,
        )

    @property
    def has_root(self) -> bool:
        """Does the container have a root (container uid 0 mapped)?"""
        return self.host_uid(0) is not None


def keep_id(own: int, sub: SubRange) -> tuple[IdMap, ...]:
    """Container ids for an unprivileged ``own`` id with range ``sub``: ``own`` maps to
    itself, the ids below and above it to the range, in order (podman's keep-id)."""
    maps = []
    if own > 0:
        maps.append(IdMap(0, sub.start, min(own, sub.count)))
    maps.append(IdMap(own, own, 1))
    if sub.count > own:
        maps.append(IdMap(own + 1, sub.start + own, sub.count - own))
    return tuple(maps)


def rootless(uid: int, gid: int) -> UserNamespace:
    """The user namespace of a container made by unprivileged user ``uid``/``gid``."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    subu = subordinate_range(SUBUID, name, uid)
    subg = subordinate_range(SUBGID, name, uid)
    helpers = map_helpers()
    if subu is not None and subg is not None and helpers is not None:
        return UserNamespace(keep_id(uid, subu), keep_id(gid, subg), helpers)
    single_u, single_g = (IdMap(uid, uid, 1),), (IdMap(gid, gid, 1),)
    return UserNamespace(single_u, single_g, None, SINGLE_MAP_NOTICE.format(user=name))


def _free_start(paths: tuple[Path, ...], size: int) -> int:
    """A start for a new range of ``size`` ids above every range in ``paths`` and every uid
    and gid of the host's accounts, aligned to ``size``."""
    top = 100000
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                top = max(top, int(parts[1]) + int(parts[2]))
    for entry in pwd.getpwall():
        if entry.pw_uid < 2**31 - 1:
            top = max(top, entry.pw_uid + 1, entry.pw_gid + 1)
    return (top + size - 1) // size * size


def reserve_range(name: str | None = None) -> SubRange:
    """The subordinate range of the product's system user (root only): made on first use —
    the system user, then one range in both /etc/subuid and /etc/subgid that overlaps no
    other range and no account of the host. Called for every root-mode container."""
    name = name or os.environ.get(PRODUCT_USER_ENV) or PRODUCT_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is not None:
        subu = subordinate_range(SUBUID, name, entry.pw_uid)
        subg = subordinate_range(SUBGID, name, entry.pw_uid)
        if subu is not None and subg is not None and subu == subg and subu.count >= RANGE_SIZE:
            return subu
    if os.geteuid() != 0:
        raise PrivilegeError(f"reserving the id range of {name!r} needs root")
    with open("/run/sandbox-kernel-userns.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_range(name)


def _make_range(name: str) -> SubRange:
    if shutil.which("useradd") is None:
        raise SandboxError("useradd is missing (Debian's passwd package); cannot make users")
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        _run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            f"creating the system user {name!r}",
        )
        uid = pwd.getpwnam(name).pw_uid
    subu = subordinate_range(SUBUID, name, uid)
    subg = subordinate_range(SUBGID, name, uid)
    if subu is not None and subg is not None and subu == subg and subu.count >= RANGE_SIZE:
        return subu
    start = _free_start((SUBUID, SUBGID), RANGE_SIZE)
    for path in (SUBUID, SUBGID):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name}:{start}:{RANGE_SIZE}\n")
        os.chmod(path, 0o644)
    return SubRange(start, RANGE_SIZE)


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SandboxError(f"{what} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def root_mode(sub: SubRange) -> UserNamespace:
    """The user namespace of a root-mode container: container ids 0..count-1 are ``sub``."""
    maps = (IdMap(0, sub.start, sub.count),)
    return UserNamespace(maps, maps, None, "", "root")


#: (sysctl file, value that blocks unprivileged user namespaces, the fix).
_USERNS_SYSCTLS = (
    (
        "/proc/sys/kernel/unprivileged_userns_clone",
        "0",
        "sysctl -w kernel.unprivileged_userns_clone=1 (older Debian kernels)",
    ),
    ("/proc/sys/user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        "1",
        "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile "
        "allowing userns for the executor (Ubuntu 23.10+)",
    ),
)


def userns_problems() -> list[str]:
    """Why an unprivileged user cannot create user namespaces here, one line each with the
    fix (the host's sysctls); empty when nothing blocks them. Called by
    ``Container.create`` for unprivileged callers and by ``sandbox-kernel doctor``."""
    out = []
    for path, bad, fix in _USERNS_SYSCTLS:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == bad:
            out.append(f"user namespaces are disabled for ordinary users ({path} = {bad}); {fix}")
    return out


def root_mode_keeping(sub: SubRange, uid: int, gid: int) -> UserNamespace:
    """Root mode for a notebook folder whose filesystem cannot be idmapped (NFS, CIFS, 9p,
    tmpfs before Linux 6.3): container ids map into ``sub`` as in ``root_mode``, except the
    folder owner's ``uid`` and ``gid``, which map to themselves, so that the kernel's files
    there still belong to the owner (podman's keep-id for that one id). Only a regular
    account's id is kept (``_keepable``: never root, a system id or nobody); an id that is
    not stays in the range. Called by the kernel launcher."""
    whole = root_mode(sub)
    uids = keep_id(uid, sub) if _keepable(uid, sub) else whole.uid_map
    gids = keep_id(gid, sub) if _keepable(gid, sub) else whole.gid_map
    return UserNamespace(uids, gids, None, "", "root")


#: The first id of a regular account (Debian's UID_MIN/GID_MIN): ids below are the
#: system's, never kept as the host's.
FIRST_REGULAR_ID = 1000
NOBODY = 65534


def _keepable(i: int, sub: SubRange) -> bool:
    """May host id ``i`` appear in a root-mode map as itself? Only a regular account's
    (not root, not a system id, not nobody, which daemons share) inside the range size."""
    return FIRST_REGULAR_ID <= i < sub.count and i != NOBODY


_IDMAP_CACHE: dict[int, bool] = {}


def idmap_supported(path: str) -> bool:
    """Can the filesystem of the directory ``path`` be idmapped (``mount_setattr`` with
    MOUNT_ATTR_IDMAP, which root mode uses for notebook folders)? The folder is opened once
    (``O_PATH``, no link followed at its last component) and that very directory is probed by
    the executor (``sk-runtime --probe-idmap /proc/self/fd/N``); a definite answer is kept
    per filesystem (device) for the process, a failed probe is not (and counts as no).
    Root only. Called by the kernel launcher before each root-mode kernel start and by
    ``doctor``."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return True  # the start reports the missing folder itself
    try:
        dev = os.fstat(fd).st_dev
        cached = _IDMAP_CACHE.get(dev)
        if cached is not None:
            return cached
        from .executor import runtime_binary

        try:
            proc = subprocess.run(
                [runtime_binary(), "--probe-idmap", f"/proc/self/fd/{fd}"],
                capture_output=True,
                timeout=10,
                check=False,
                pass_fds=(fd,),
            )
        except (OSError, subprocess.TimeoutExpired, SandboxError):
            return False
        if proc.returncode in (0, 1):
            _IDMAP_CACHE[dev] = proc.returncode == 0
        return proc.returncode == 0
    finally:
        os.close(fd)


def for_caller() -> UserNamespace:
    """The user namespace for a container made by this process: root mode when it runs as
    root, rootless otherwise. Called by the provisioner and ``sandbox-kernel run``."""
    if os.geteuid() == 0:
        return root_mode(reserve_range())
    return rootless(os.geteuid(), os.getegid())
