"""Disk quotas of notebook folders: project quotas of the host's filesystem.

Layer: leaf (imports ``errors`` and ``units`` only). A kernel's notebook folder is a writable
bind of a host folder, so what the kernel writes there lands on the host's disk. The only
bound the kernel cannot lift from inside is the filesystem's own: a *project quota* (XFS
mounted with ``prjquota``; ext4 with the ``project`` and ``quota`` features). A folder gets a
project id and the inherit flag; every file and folder made below it inherits the id, the
kernel then gets EDQUOT ("Disk quota exceeded") at the limit, and ``df`` inside shows the
limit as the folder's size. Changing a project id is refused outside the host's initial user
namespace, so a kernel (in its own user namespace) cannot move files out of the project.

Callers:

* the provisioner at each kernel start when ``SandboxPolicy.notebook_quota`` is set:
  ``apply`` as root (a root server), ``verify`` otherwise (a rootless server cannot set a
  quota; root did it with ``sandbox-kernel quota set``, e.g. from the hub's spawn hook);
* ``sandbox-kernel quota show|set|clear``.

A folder that already has a project id keeps it (one an administrator made, or an earlier
start's): its limit is set there. One without gets a fresh id (``PROJECT_BASE`` plus low bits
of the folder's inode number, the next free one when that is in use) and its existing files
are tagged by a walk that never follows links nor leaves the filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from . import beneath
from .errors import QuotaError
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
#: The most entries the first tagging walk visits (a bigger folder: QuotaError, not a hang).
MAX_WALK_ENTRIES = 2_000_000
MAX_DEPTH = 512

FIX = (
    "enable project quotas on that filesystem (XFS: mount with -o prjquota; ext4: "
    "tune2fs -O project,quota -Q prjquota on the unmounted device), or leave "
    "SandboxPolicy.notebook_quota unset"
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


def open_folder(folder: str) -> int:
    """A descriptor of ``folder`` (an absolute path), every folder on the way reached
    without following a link (``beneath``'s fd walk from ``/``): root acts on what the path
    names, never on where a link a kernel swapped in on the way points. QuotaError when
    something on the way is a link or the folder is missing."""
    try:
        with beneath.parent("/", os.path.abspath(folder)) as (dfd, name):
            return os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
            )
    except beneath.Refused as e:
        raise QuotaError(f"notebook folder {folder}: not for a quota: /{e}") from None
    except OSError as e:
        raise QuotaError(
            f"notebook folder {folder}: cannot open it for its quota ({e.strerror}); "
            "it must be an existing folder, reached without links"
        ) from None


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


def _unsupported(folder: str, e: OSError) -> QuotaError:
    return QuotaError(
        f"notebook folder {folder}: its filesystem has no project quotas ({e.strerror}); {FIX}"
    )


def read(folder: str) -> Usage:
    """The quota of ``folder``: as root from the filesystem's quota records, otherwise from
    ``statvfs`` (which reports a project's limit as the folder's size where it has one).
    Called by ``sandbox-kernel quota show`` and ``verify``."""
    fd = open_folder(folder)
    try:
        projid, inherit = get_project(fd)
        if not projid or not inherit:
            return Usage(folder, 0, None, None)
        if os.geteuid() == 0:
            try:
                blim, used, ilim, files = _get(fd, projid)
            except OSError as e:
                raise _unsupported(folder, e) from None
            return Usage(folder, projid, blim or None, used, ilim or None, files)
        st = os.fstatvfs(fd)
        return Usage(
            folder,
            projid,
            st.f_blocks * st.f_frsize,
            (st.f_blocks - st.f_bfree) * st.f_frsize,
            st.f_files or None,
            st.f_files - st.f_ffree if st.f_files else None,
        )
    finally:
        os.close(fd)


def _allocate(fd: int, folder: str) -> int:
    """A project id no file on the folder's filesystem uses yet."""
    ino = os.fstat(fd).st_ino
    for i in range(PROBES):
        candidate = PROJECT_BASE + ((ino + i) % PROJECT_SPAN)
        try:
            _, used, _, files = _get(fd, candidate)
        except OSError as e:
            if e.errno == errno.ENOENT:  # no record: unused
                return candidate
            raise _unsupported(folder, e) from None
        if not used and not files:
            return candidate
    raise QuotaError(
        f"notebook folder {folder}: no free project id in {PROBES} tries from "
        f"{PROJECT_BASE + ino % PROJECT_SPAN}; give the folder one (chattr -p ID +P) and try again"
    )


def _open_child(dfd: int, name: str, dev: int) -> tuple[int, bool] | None:
    """(descriptor, is a folder) of entry ``name`` of the open folder ``dfd`` when it is a
    folder or regular file on device ``dev``; None for anything else (links are never
    followed, other types and other filesystems left alone, a swap mid-walk is noticed)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if st.st_dev != dev:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if stat.S_ISDIR(st.st_mode):
        flags |= os.O_DIRECTORY
    elif stat.S_ISREG(st.st_mode):
        flags |= os.O_NONBLOCK | os.O_NOCTTY
    else:
        return None
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except OSError:  # gone, or swapped for a link: not ours to follow
        return None
    fst = os.fstat(fd)
    if fst.st_dev != dev or stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
        os.close(fd)
        return None
    return fd, stat.S_ISDIR(fst.st_mode)


def _tag_tree(top: int, projid: int, folder: str) -> int:
    """Give every folder and regular file below the open folder ``top`` project ``projid``
    (folders also the inherit flag), never following a link, never leaving the filesystem;
    other file types are left alone. Returns how many entries were seen."""
    dev = os.fstat(top).st_dev
    stack: list[tuple[int, int]] = [(os.dup(top), 0)]
    seen = 0
    try:
        while stack:
            dfd, depth = stack.pop()
            try:
                for name in os.listdir(dfd):
                    seen += 1
                    if seen > MAX_WALK_ENTRIES:
                        raise QuotaError(
                            f"notebook folder {folder}: more than {MAX_WALK_ENTRIES} entries to "
                            "put under its quota; set it on a smaller folder, or tag it "
                            f"yourself (chattr -R -p {projid} +P) and start again"
                        )
                    child = _open_child(dfd, name, dev)
                    if child is None:
                        continue
                    fd, is_dir = child
                    try:
                        _set_project(fd, projid, is_dir)
                    except BaseException:
                        os.close(fd)
                        raise
                    if is_dir and depth < MAX_DEPTH:
                        stack.append((fd, depth + 1))
                    else:
                        os.close(fd)
            finally:
                os.close(dfd)
    finally:
        for dfd, _ in stack:
            os.close(dfd)
    return seen


def _limits(bytes_limit: int, files_limit: int) -> ctypes.Array[ctypes.c_char]:
    """A ``struct if_dqblk`` setting both limits (0: none) for Q_SETQUOTA."""
    blocks = -(-bytes_limit // QUOTA_BLOCK)
    valid = QIF_BLIMITS | QIF_ILIMITS
    return ctypes.create_string_buffer(
        _DQBLK.pack(blocks, 0, 0, files_limit, 0, 0, 0, 0, valid), _DQBLK.size
    )


def is_ours(projid: int) -> bool:
    """Whether project id ``projid`` is one this product hands out (``_allocate``)."""
    return PROJECT_BASE <= projid < PROJECT_BASE + PROJECT_SPAN


def apply(
    folder: str, bytes_limit: int, files_limit: int | None = None, *, foreign: bool = False
) -> Usage:
    """Put ``folder`` under a project quota of ``bytes_limit`` bytes (and ``files_limit``
    files and folders, None: no file limit), as root. The folder's existing project id is
    kept; a folder without one gets a fresh id and its contents are tagged. A project id
    the administrator made (outside this product's range) has its limit changed only with
    ``foreign`` (``sandbox-kernel quota set``, an explicit request); otherwise it must
    already be at most ``bytes_limit``, as ``verify`` checks. Called by the provisioner
    (root server) at each kernel start and by ``sandbox-kernel quota set``. QuotaError
    names the folder and the fix when the filesystem has no project quotas."""
    if os.geteuid() != 0:
        raise QuotaError(
            f"notebook folder {folder}: only root can set a quota (run `sandbox-kernel quota "
            f"set {folder} SIZE` as root)"
        )
    fd = open_folder(folder)
    try:
        try:
            projid, inherit = get_project(fd)
            fresh = projid == 0
            if not fresh and not foreign and not is_ours(projid):
                return verify(folder, bytes_limit)
            if fresh:
                projid = _allocate(fd, folder)
            if fresh or not inherit:
                _set_project(fd, projid, True)
        except QuotaError:  # already the product's error (verify, _allocate)
            raise
        except OSError as e:
            raise _unsupported(folder, e) from None
        if fresh:
            _tag_tree(fd, projid, folder)
        buf = _limits(bytes_limit, files_limit or 0)
        try:
            _quotactl(fd, Q_SETQUOTA, projid, buf)
        except OSError as e:
            raise _unsupported(folder, e) from None
    finally:
        os.close(fd)
    return read(folder)


def clear(folder: str) -> Usage:
    """Lift the limits of ``folder``'s project (the id stays, so use is still counted).
    Called by ``sandbox-kernel quota clear``, as root."""
    fd = open_folder(folder)
    try:
        projid, _ = get_project(fd)
        if projid:
            buf = _limits(0, 0)
            try:
                _quotactl(fd, Q_SETQUOTA, projid, buf)
            except OSError as e:
                raise _unsupported(folder, e) from None
    finally:
        os.close(fd)
    return read(folder)


def verify(folder: str, bytes_limit: int, source: str = "SandboxPolicy.notebook_quota") -> Usage:
    """Check, without privilege, that ``folder`` has a project quota of at most
    ``bytes_limit`` bytes. Called by a rootless server's provisioner at each kernel start
    when the policy asks for a quota: the server cannot set one, so a folder without it
    must not get a kernel (``source`` names the setting that asks). QuotaError names the
    fix (root runs ``quota set``)."""
    usage = read(folder)
    if not usage.project:
        raise QuotaError(
            f"notebook folder {folder} has no disk quota, and the administrator asks for one "
            f"of {format_size(bytes_limit)} ({source}); an administrator "
            f"sets it as root: sandbox-kernel quota set {folder} {format_size(bytes_limit)}"
        )
    if usage.bytes_limit is None or usage.bytes_limit > bytes_limit:
        have = format_size(usage.bytes_limit) if usage.bytes_limit else "no limit"
        raise QuotaError(
            f"notebook folder {folder}: its disk quota ({have}) is above the "
            f"{format_size(bytes_limit)} the administrator asks for "
            f"({source}); as root: sandbox-kernel quota set {folder} "
            f"{format_size(bytes_limit)}"
        )
    return usage
