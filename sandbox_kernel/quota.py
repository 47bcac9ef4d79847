"""Disk quotas of notebook folders: project quotas of the host's filesystem.

Layer: leaf (imports ``beneath``, ``errors``, ``paths`` and ``units`` only). A kernel's
notebook folder is a writable bind of a host folder, so what the kernel writes there lands
on the host's disk. The only bound the kernel cannot lift from inside is the filesystem's
own: a *project quota* (XFS mounted with ``prjquota``; ext4 with the ``project`` and
``quota`` features, mounted with ``prjquota``). A folder gets a
project id and the inherit flag; every file and folder made below it inherits the id, the
kernel then gets EDQUOT ("Disk quota exceeded") at the limit, and ``df`` inside shows the
limit as the folder's size. Changing a project id is refused outside the host's initial user
namespace, so a kernel (in its own user namespace) cannot move files out of the project; the
files' owner can, from outside a sandbox (a terminal of the server, a plain kernel): see
docs/security.md.

Callers:

* the provisioner at each kernel start when ``SandboxPolicy.notebook_quota`` is set:
  ``apply`` as root (a root server), ``verify`` otherwise (a rootless server cannot set a
  quota; root did it with ``sandbox-kernel quota set``, e.g. from the hub's spawn hook);
* ``sandbox-kernel quota show|set|clear``.

A folder that owns a project of this product keeps it and gets the limit set; one without
gets a fresh id (``PROJECT_BASE`` plus low bits of the folder's inode number, the next free
one when that is in use) and its existing files are tagged by a walk that never follows a
link, never enters a mount point and never leaves the filesystem; the limit is set only once
the walk finished, so a walk cut short is done again at the next start. A folder inside a
project a folder above it owns (a student's notebook folder in a home with a quota), or in a
project an administrator made, is only checked, never changed. All this happens under one
lock (``quota.lock`` in root's run dir), so two first starts in one folder cannot split it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from . import beneath
from .errors import QuotaError
from .paths import mount_points, run_dir
from .units import format_size

# linux/fs.h: struct fsxattr and its ioctls
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x00000200
_FSXATTR = struct.Struct("=IIIII8x")  # xflags, extsize, nextents, projid, cowextsize

# linux/quota.h: quotactl_fd(2) (Linux 5.14+), Q_GETQUOTA / Q_SETQUOTA on project quotas
SYS_QUOTACTL_FD = 443  # the same number on x86_64 and the generic table (arm64)
PRJQUOTA = 2
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
QIF_BLIMITS = 1
QIF_ILIMITS = 4
QUOTA_BLOCK = 1024  # dqb_*limit blocks are 1 KiB
_DQBLK = struct.Struct("=QQQQQQQQI4x")  # bhard, bsoft, curspace, ihard, isoft, curinodes, ...

#: Project ids this product hands out: PROJECT_BASE + (inode & PROJECT_SPAN - 1), probed up.
PROJECT_BASE = 0x5B000000
PROJECT_SPAN = 1 << 24
PROBES = 64
#: The most entries the first tagging walk visits, and the deepest folder it goes into
#: (beyond either: QuotaError, never a folder left out of the quota without a word).
MAX_WALK_ENTRIES = 2_000_000
MAX_DEPTH = 128

FIX = (
    "enable project quotas on that filesystem (XFS: mount it with -o prjquota; ext4: "
    "tune2fs -O project,quota -Q prjquota on the unmounted device, then mount it with "
    "-o prjquota, in /etc/fstab too), or remove the quota setting"
)


@dataclass(frozen=True)
class Usage:
    """A folder's quota: its project id (0: none), the limits (None: unlimited) and use."""

    folder: str
    project: int
    bytes_limit: int | None
    bytes_used: int | None
    files_limit: int | None = None
    files_used: int | None = None

    def describe(self) -> str:
        """One line: 'project 1526726656: 12.0 MiB used of 1.0 GiB, 40 of 10000 files'."""
        if not self.project:
            return f"{self.folder}: no project quota"
        used = format_size(self.bytes_used) if self.bytes_used is not None else "?"
        limit = format_size(self.bytes_limit) if self.bytes_limit else "no limit"
        text = f"{self.folder}: project {self.project}: {used} used of {limit}"
        if self.files_limit or self.files_used is not None:
            files = str(self.files_limit) if self.files_limit else "no limit"
            text += f", {self.files_used if self.files_used is not None else '?'} of {files} files"
        return text


def _open(folder: str, what: str) -> tuple[int, int]:
    """(descriptor of ``folder``, the project id of the folder holding it), every folder on
    the way reached without following a link (``beneath``'s fd walk from ``/``): root acts
    on what the path names, never where a link a kernel swapped in on the way points.
    QuotaError when something on the way is a link or the folder is missing."""
    try:
        with beneath.parent("/", os.path.abspath(folder)) as (dfd, name):
            up = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                parent = get_project(up)[0]
            finally:
                os.close(up)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, dir_fd=dfd), parent
    except beneath.Refused as e:
        raise QuotaError(f"{what} {folder}: not for a quota: /{e}") from None
    except OSError as e:
        raise QuotaError(
            f"{what} {folder}: cannot open it for its quota ({e.strerror}); "
            "it must be an existing folder, reached without links"
        ) from None


def open_folder(folder: str, what: str = "notebook folder") -> int:
    """A descriptor of ``folder`` reached as ``_open`` does; closed by the caller."""
    return _open(folder, what)[0]


def get_project(fd: int) -> tuple[int, bool]:
    """(project id, inherit flag) of the open file or folder ``fd``; (0, False) where the
    filesystem has no such attribute. Any user may read them."""
    try:
        buf = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return 0, False
        raise
    xflags, _, _, projid, _ = _FSXATTR.unpack(buf)
    return projid, bool(xflags & FS_XFLAG_PROJINHERIT)


def _set_project(fd: int, projid: int, inherit: bool) -> None:
    buf = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    xflags, extsize, nextents, _, cow = _FSXATTR.unpack(buf)
    if inherit:
        xflags |= FS_XFLAG_PROJINHERIT
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags, extsize, nextents, projid, cow))


def _quotactl(fd: int, cmd: int, projid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    qcmd = (cmd << 8) | PRJQUOTA
    rc = libc.syscall(
        ctypes.c_long(SYS_QUOTACTL_FD),
        ctypes.c_uint(fd),
        ctypes.c_uint(qcmd),
        ctypes.c_uint(projid),
        buf,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _get(fd: int, projid: int) -> tuple[int, int, int, int]:
    """(bytes limit, bytes used, files limit, files used) of project ``projid`` (root)."""
    buf = ctypes.create_string_buffer(_DQBLK.size)
    _quotactl(fd, Q_GETQUOTA, projid, buf)
    bhard, _, curspace, ihard, _, curinodes, _, _, _ = _DQBLK.unpack(buf.raw)
    return bhard * QUOTA_BLOCK, curspace, ihard, curinodes


def _has_quotactl_fd() -> bool:
    """Whether this Linux has quotactl_fd(2) (5.14+): ENOSYS also means a filesystem with no
    quota support at all, so the call is tried on a descriptor that cannot be valid."""
    try:
        _quotactl(-1, Q_GETQUOTA, 0, ctypes.create_string_buffer(_DQBLK.size))
    except OSError as e:
        return e.errno != errno.ENOSYS
    return True


def _unsupported(folder: str, e: OSError, what: str = "notebook folder") -> QuotaError:
    if e.errno == errno.ENOSYS and not _has_quotactl_fd():
        return QuotaError(
            f"{what} {folder}: this Linux has no quotactl_fd (Linux 5.14 or newer sets "
            "project quotas); upgrade the kernel, or remove the quota setting"
        )
    return QuotaError(
        f"{what} {folder}: its filesystem has no project quotas ({e.strerror}); {FIX}"
    )


def read(folder: str, what: str = "notebook folder") -> Usage:
    """The quota of ``folder``: as root from the filesystem's quota records, otherwise from
    ``statvfs`` (which reports a project's limit as the folder's size where it has one and
    it is enforced; the file figures are then not the project's, so none are given).
    Called by ``sandbox-kernel quota show``, ``verify`` and ``%sandbox``'s figures."""
    fd = open_folder(folder, what)
    try:
        projid, inherit = get_project(fd)
        if not projid or not inherit:
            return Usage(folder, 0, None, None)
        if os.geteuid() == 0:
            try:
                blim, used, ilim, files = _get(fd, projid)
            except OSError as e:
                raise _unsupported(folder, e, what) from None
            return Usage(folder, projid, blim or None, used, ilim or None, files)
        st = os.fstatvfs(fd)
        return Usage(
            folder, projid, st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
        )
    finally:
        os.close(fd)


def _allocate(fd: int, folder: str, what: str) -> int:
    """A project id no file on the folder's filesystem uses yet (under ``_lock``)."""
    ino = os.fstat(fd).st_ino
    for i in range(PROBES):
        candidate = PROJECT_BASE + ((ino + i) % PROJECT_SPAN)
        try:
            _, used, _, files = _get(fd, candidate)
        except OSError as e:
            if e.errno == errno.ENOENT:  # no record: unused
                return candidate
            raise _unsupported(folder, e, what) from None
        if not used and not files:
            return candidate
    raise QuotaError(
        f"{what} {folder}: no free project id in {PROBES} tries from "
        f"{PROJECT_BASE + ino % PROJECT_SPAN}; give the folder one (chattr -p ID +P) and try again"
    )


#: What an entry that vanished or was swapped for another kind mid-walk answers.
_RACED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)


def _open_child(dfd: int, name: str, dev: int, rel: str, where: str) -> tuple[int, bool] | None:
    """(descriptor, is a folder) of entry ``name`` of the open folder ``dfd`` when it is a
    folder or regular file on device ``dev``; None for anything else (links are never
    followed, other types and other filesystems left alone, a swap mid-walk is noticed).
    Any other failure is a QuotaError naming ``rel``: an entry the walk cannot tag would
    stay outside the quota for good."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if st.st_dev != dev:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if stat.S_ISDIR(st.st_mode):
            flags |= os.O_DIRECTORY
        elif stat.S_ISREG(st.st_mode):
            flags |= os.O_NONBLOCK | os.O_NOCTTY
        else:
            return None
        fd = os.open(name, flags, dir_fd=dfd)
    except OSError as e:
        if e.errno in _RACED:
            return None
        raise QuotaError(f"{where}: cannot put {rel} under the quota ({e.strerror})") from None
    fst = os.fstat(fd)
    if fst.st_dev != dev or stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
        os.close(fd)
        return None
    return fd, stat.S_ISDIR(fst.st_mode)


def _tag_tree(top: int, projid: int, folder: str, what: str = "notebook folder") -> int:
    """Give every folder and regular file below the open folder ``top`` project ``projid``
    (folders also the inherit flag), depth first (open descriptors bounded by the depth),
    never following a link, never entering a mount point (a bind or FUSE mount inside is not
    the folder's, and could block), never leaving the filesystem; other file types are left
    alone. Returns how many entries were seen; QuotaError for anything it could not tag."""
    where = f"{what} {folder}"
    dev = os.fstat(top).st_dev
    mounts = mount_points()
    root = os.path.abspath(folder)
    seen = 0
    first = os.dup(top)
    stack: list[tuple[int, Iterator[os.DirEntry[str]], str]] = []
    try:
        stack.append((first, os.scandir(first), ""))
    except BaseException:
        os.close(first)
        raise
    try:
        while stack:
            dfd, entries, rel = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                _close(dfd, entries)
                continue
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise QuotaError(
                    f"{where}: more than {MAX_WALK_ENTRIES} entries to put under its quota; "
                    f"set it on a smaller folder, or tag it yourself (chattr -R -p {projid} +P) "
                    "and start again"
                )
            sub = f"{rel}/{entry.name}" if rel else entry.name
            if os.path.join(root, sub) in mounts:
                continue
            fd = _tag_entry(dfd, entry.name, dev, sub, where, projid, len(stack))
            if fd is not None:
                try:
                    stack.append((fd, os.scandir(fd), sub))
                except OSError as e:
                    os.close(fd)
                    raise QuotaError(f"{where}: cannot list {sub} ({e.strerror})") from None
    finally:
        for dfd, entries, _ in stack:
            _close(dfd, entries)
    return seen


def _tag_entry(
    dfd: int, name: str, dev: int, sub: str, where: str, projid: int, depth: int
) -> int | None:
    """Tag entry ``name`` of the open folder ``dfd`` (``sub`` below the top, ``depth``
    folders down); the descriptor of a folder to go into, else None."""
    child = _open_child(dfd, name, dev, sub, where)
    if child is None:
        return None
    fd, is_dir = child
    try:
        _set_project(fd, projid, is_dir)
        if is_dir and depth > MAX_DEPTH:
            raise QuotaError(
                f"{where}: {sub} is more than {MAX_DEPTH} folders deep; move it up and start again"
            )
    except OSError as e:
        os.close(fd)
        if isinstance(e, QuotaError):
            raise
        raise QuotaError(f"{where}: cannot put {sub} under the quota ({e.strerror})") from None
    if not is_dir:
        os.close(fd)
        return None
    return fd


def _close(fd: int, entries: Iterator[os.DirEntry[str]]) -> None:
    close = getattr(entries, "close", None)
    if close is not None:
        close()
    os.close(fd)


def _limits(bytes_limit: int, files_limit: int | None) -> ctypes.Array[ctypes.c_char]:
    """A ``struct if_dqblk`` for Q_SETQUOTA: the byte limit (rounded up to the 1 KiB quota
    block; 0: none) and, when ``files_limit`` is not None, the file limit (0: none); a file
    limit not given is left as it is."""
    blocks = _blocks(bytes_limit)
    valid = QIF_BLIMITS | (QIF_ILIMITS if files_limit is not None else 0)
    return ctypes.create_string_buffer(
        _DQBLK.pack(blocks, 0, 0, files_limit or 0, 0, 0, 0, 0, valid), _DQBLK.size
    )


def _blocks(nbytes: int) -> int:
    return -(-nbytes // QUOTA_BLOCK)


def _as_set(nbytes: int) -> int:
    """``nbytes`` as a limit is stored (whole 1 KiB quota blocks): what every comparison of a
    limit read back with the one asked for uses."""
    return _blocks(nbytes) * QUOTA_BLOCK


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Root's one lock over every quota change of this host (a file in root's run dir, which
    no kernel can reach): two first starts in one folder never give it two projects."""
    folder = run_dir()
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(
        folder / "quota.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_ours(projid: int) -> bool:
    """Whether project id ``projid`` is one this product hands out (``_allocate``)."""
    return PROJECT_BASE <= projid < PROJECT_BASE + PROJECT_SPAN


def apply(
    folder: str,
    bytes_limit: int,
    files_limit: int | None = None,
    *,
    foreign: bool = False,
    source: str = "SandboxPolicy.notebook_quota",
    what: str = "notebook folder",
) -> Usage:
    """Put ``folder`` under a project quota of ``bytes_limit`` bytes (and ``files_limit``
    files and folders; None leaves the file limit as it is), as root, under ``_lock``.

    * a folder without a project gets a fresh id, its contents are tagged, then the limit
      is set (a project of ours without a limit is one whose walk was cut short, or cleared:
      tagged again);
    * a folder inside a project a folder above it owns is only checked (``verify``): a start
      never changes the quota of a folder above the notebook's;
    * a project the administrator made (outside this product's range) has its limit changed
      only with ``foreign`` (``sandbox-kernel quota set``, an explicit request); otherwise it
      is checked.

    Then the limit must show in ``statvfs``: a quota recorded but not enforced (ext4 mounted
    without ``prjquota``) is a QuotaError. Called by the provisioner (root server) at each
    kernel start, the hub hook (``what="home"``) and ``sandbox-kernel quota set``."""
    if os.geteuid() != 0:
        raise QuotaError(
            f"{what} {folder}: only root can set a quota (run `sandbox-kernel quota set "
            f"{folder} SIZE` as root)"
        )
    with _lock():
        fd, parent = _open(folder, what)
        try:
            try:
                projid, inherit = get_project(fd)
            except OSError as e:
                raise _unsupported(folder, e, what) from None
            if projid and projid == parent:
                return _check_inherited(folder, bytes_limit, projid, source, what)
            if projid and not foreign and not is_ours(projid):
                return verify(folder, bytes_limit, source, what)
            _set_up(fd, folder, projid, inherit, bytes_limit, files_limit, what)
        finally:
            os.close(fd)
    return read(folder, what)


def _set_up(
    fd: int,
    folder: str,
    projid: int,
    inherit: bool,
    bytes_limit: int,
    files_limit: int | None,
    what: str,
) -> None:
    """``apply``'s work on a folder that owns (or gets) its project."""
    try:
        walk = projid == 0
        if walk:
            projid = _allocate(fd, folder, what)
        elif is_ours(projid):
            walk = _get(fd, projid)[0] == 0  # no limit yet: an earlier walk did not finish
        if walk or not inherit:
            _set_project(fd, projid, True)
    except OSError as e:
        if isinstance(e, QuotaError):
            raise
        raise _unsupported(folder, e, what) from None
    if walk:
        _tag_tree(fd, projid, folder, what)
    try:
        _quotactl(fd, Q_SETQUOTA, projid, _limits(bytes_limit, files_limit))
    except OSError as e:
        raise _unsupported(folder, e, what) from None
    st = os.fstatvfs(fd)
    shown = st.f_blocks * st.f_frsize
    if shown > _as_set(bytes_limit):
        raise QuotaError(
            f"{what} {folder}: the quota of {format_size(bytes_limit)} is recorded but not "
            f"enforced (the filesystem still shows {format_size(shown)} there): mount it with "
            "-o prjquota (ext4; in /etc/fstab too) or without pqnoenforce (XFS)"
        )


def _check_inherited(folder: str, bytes_limit: int, projid: int, source: str, what: str) -> Usage:
    """A folder inside a project a folder above it owns: that quota, read, must be at most
    ``bytes_limit``; it is never changed from here."""
    usage = read(folder, what)
    if usage.bytes_limit is None or usage.bytes_limit > _as_set(bytes_limit):
        have = format_size(usage.bytes_limit) if usage.bytes_limit else "no limit"
        raise QuotaError(
            f"{what} {folder} is inside the disk quota of a folder above it (project "
            f"{projid}, {have}), more than the {format_size(bytes_limit)} asked for "
            f"({source}); set the quota on that folder (sandbox-kernel quota set FOLDER SIZE, "
            "as root), or ask for no more than it"
        )
    return usage


def clear(folder: str, what: str = "notebook folder") -> Usage:
    """Lift the limits of the project ``folder`` owns (the id stays, so use is still
    counted; a folder inside another folder's project is refused). Called by
    ``sandbox-kernel quota clear``, as root."""
    with _lock():
        fd, parent = _open(folder, what)
        try:
            projid, _ = get_project(fd)
            if projid and projid == parent:
                raise QuotaError(
                    f"{what} {folder} is inside the disk quota of a folder above it (project "
                    f"{projid}); clear it on that folder"
                )
            if projid:
                try:
                    _quotactl(fd, Q_SETQUOTA, projid, _limits(0, 0))
                except OSError as e:
                    raise _unsupported(folder, e, what) from None
        finally:
            os.close(fd)
    return read(folder, what)


def verify(
    folder: str,
    bytes_limit: int,
    source: str = "SandboxPolicy.notebook_quota",
    what: str = "notebook folder",
) -> Usage:
    """Check, without privilege, that ``folder`` has a project quota of at most
    ``bytes_limit`` bytes (rounded up to the 1 KiB quota block, as set). Called by a
    rootless server's provisioner at each kernel start when the policy asks for a quota:
    the server cannot set one, so a folder without it must not get a kernel (``source``
    names the setting that asks). QuotaError names the fix (root runs ``quota set``)."""
    usage = read(folder, what)
    want = format_size(bytes_limit)
    if not usage.project:
        raise QuotaError(
            f"{what} {folder} has no disk quota, and the administrator asks for one "
            f"of {want} ({source}); an administrator sets it as root: "
            f"sandbox-kernel quota set {folder} {want}"
        )
    if usage.bytes_limit is None or usage.bytes_limit > _as_set(bytes_limit):
        have = format_size(usage.bytes_limit) if usage.bytes_limit else "no limit"
        raise QuotaError(
            f"{what} {folder}: its disk quota ({have}) is above the {want} the administrator "
            f"asks for ({source}); as root: sandbox-kernel quota set {folder} {want}"
        )
    return usage
