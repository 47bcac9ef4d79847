"""Hostile-input-safe layer extraction into a snapshot directory.

``ImageStore._unpack`` calls ``extract_layer_file`` for every layer blob it has no snapshot
of (when an image is imported, and again when a snapshot has gone missing); the tests and the
security suite call ``extract_tar_stream`` on tar bytes directly. Decompression and the diff_id
hash live in ``compression``, header parsing in ``tar_reader``; this module decides what each
member may do to the file system. The inverse, writing a layer tar from an overlay upper dir,
is ``layer_writer``.

Extraction turns one OCI layer (a tar stream, maybe gzip or zstd compressed) into a directory in
*overlayfs lower-dir form*:

* ``.wh.NAME`` whiteouts become overlay whiteouts (a char device 0:0 named NAME);
* ``.wh..wh..opq`` in a directory becomes the xattr ``trusted.overlay.opaque=y`` on it;
* per the OCI spec a whiteout only hides lower layers: an entry of the same layer with the same
  name wins, and a directory that replaces a whiteout in the same layer is made opaque.

Safety rules (the archive is hostile):

* No path outside the destination is ever created or written: every path is walked component
  by component from the destination's directory fd with ``O_NOFOLLOW``; ``..`` components are
  refused, leading ``/`` and ``.`` components are dropped; a parent component that is a symlink
  is refused (symlink write-through); an existing symlink at the target is unlinked, never
  written through.
* Hard links must name a regular file already extracted inside the destination.
* Device nodes, fifos and sockets are skipped (counted in the report), never created.
* No xattr from the archive is applied (``trusted.overlay.*``, ``security.capability``...);
  they are counted in the report.
* setuid and setgid bits are stripped from files (kernels run with no_new_privs, so the bits
  never work inside; in a snapshot on the host they would hand a hostile image's root shell
  to any host user). Setgid directories keep the bit (it only gives new files the group).
  The layer blobs keep the original modes, so export loses nothing.
* Opaque directories carry both ``trusted.overlay.opaque`` (overlay in the host's user
  namespace; set only as root) and ``user.overlay.opaque`` (overlay in a container's user
  namespace, which reads user xattrs).
* Limits stop decompression bombs: total bytes, entry count, per-file size, header size.
* Symlinks named ``proc``, ``dev`` or ``sys`` at the top are kept but flagged in the report
  (the runtime refuses such images at start); they are never followed here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from ..errors import DigestMismatch, ImageError, UnsafeArchiveError
from .compression import HashingReader, open_decompressed
from .tar_reader import REGTYPES, T_BLK, T_CHR, T_DIR, T_FIFO, T_LINK, T_SYM, TarMember, TarReader

log = logging.getLogger(__name__)

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
USER_OPAQUE_XATTR = "user.overlay.opaque"
#: A file capability set (what `setcap` writes); never applied, removed from older snapshots.
CAPABILITY_XATTR = "security.capability"
MAX_REPORTED = 1000  # report lists are capped; counts are not
MAX_DEPTH = 256  # path components of one member name

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one layer may expand to (decompression bombs, entry floods).

    Given to ``ImageStore(limits=...)`` (``DEFAULT_LIMITS`` otherwise), which passes them to
    ``extract_layer_file`` for every layer it unpacks.
    """

    max_total_bytes: int = 20 * GiB  # sum of regular file sizes
    max_entries: int = 2_000_000
    max_file_size: int = 20 * GiB
    max_header_bytes: int = 1 << 20  # one PAX header / GNU long name
    #: A layer blob expands (uncompressed tar bytes) to at most ``max_ratio`` times its own
    #: size, and always to ``ratio_floor`` (``layer_budget``): real layers compress 2-10x,
    #: a decompression bomb 1000x.
    max_ratio: int = 40
    ratio_floor: int = 512 * MiB
    #: All the layers one import unpacks, together (``ImageStore.import_budget``).
    max_image_bytes: int = 32 * GiB

    def layer_budget(self, blob_size: int) -> int:
        """The uncompressed tar bytes a layer blob of ``blob_size`` bytes may expand to.
        Called by ``extract_layer_file`` for each layer."""
        return max(self.ratio_floor, blob_size * self.max_ratio)


DEFAULT_LIMITS = ExtractLimits()


@dataclass
class ExtractReport:
    """What extracting one layer did: counts, the diff_id, and what was skipped, dropped or
    flagged. Returned by ``extract_tar_stream``; ``ImageStore._unpack`` logs its findings."""

    entries: int = 0
    file_bytes: int = 0
    tar_bytes: int = 0
    diff_id: str = ""
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes, fifos, sockets, bad whiteouts
    dropped_xattrs: list[str] = field(default_factory=list)  # "path: xattr name" (first ones)
    dropped_xattr_count: int = 0
    flagged: list[str] = field(default_factory=list)  # e.g. top-level /proc as a symlink
    setid_stripped: int = 0  # files whose setuid/setgid bits were dropped


# --- safe fs helpers ---------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HANDLED = frozenset({*REGTYPES, T_DIR, T_SYM, T_LINK})
_KINDS = {T_CHR: "char device", T_BLK: "block device", T_FIFO: "fifo"}


def split_member_name(name: str) -> tuple[str, ...]:
    """Normalised path components of a tar member name; UnsafeArchiveError on '..'.

    Leading '/' (absolute names) and '.' / empty components are dropped. Called by the
    extractor for every member name and hard-link target.
    """
    if "\x00" in name:
        raise UnsafeArchiveError(f"tar member name {name!r} contains a NUL byte")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeArchiveError(
            f"tar member name {name[:100]!r}... has more than {MAX_DEPTH} components; refused"
        )
    if ".." in parts:
        raise UnsafeArchiveError(
            f"tar member {name!r} contains a '..' component (path traversal); the layer is refused"
        )
    if "" in parts or "." in parts:
        return tuple(c for c in parts if c not in ("", "."))
    return tuple(parts)


def _rm_tree_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` (file, link or directory tree) inside ``dir_fd``; never follows links."""
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            _rm_tree_at(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _open_dir_at(fd: int, comps: tuple[str, ...]) -> int:
    """The fd of directory ``comps`` below ``fd`` (which this takes over), walked without
    following symlinks; OSError (``fd`` closed) when a component is missing or no directory."""
    try:
        for c in comps:
            fd2 = os.open(c, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = fd2
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_whiteout(st: os.stat_result) -> bool:
    """True when ``st`` is an overlay whiteout (a char device 0:0). Used by the extractor and
    by ``layer_writer.write_layer_tar``, which turns whiteouts back into ``.wh.`` entries."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def file_mode(mode: int) -> int:
    """The mode a regular file gets in a snapshot: the archive's, without setuid/setgid."""
    return mode & 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)


def set_opaque(target: int | str) -> None:
    """Mark directory ``target`` (an fd or a path) opaque for overlay, in both xattr
    namespaces it reads (trusted only as root). Called by the extractor and by the store's
    snapshot upgrade."""
    names = (OPAQUE_XATTR, USER_OPAQUE_XATTR) if os.geteuid() == 0 else (USER_OPAQUE_XATTR,)
    for name in names:
        if isinstance(target, int):
            os.setxattr(target, name, b"y")
        else:  # never through a symlink
            os.setxattr(target, name, b"y", follow_symlinks=False)


def harden_snapshot(root: Path) -> None:
    """Put snapshot ``root`` (unpacked by an earlier version) into today's form: setuid and
    setgid dropped from files, file capabilities (``security.capability``) removed, opaque
    directories marked in both overlay xattr namespaces. Never follows a symlink. Called
    once per snapshot by ``ImageStore._upgrade_snapshots``."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.getxattr(p, OPAQUE_XATTR, follow_symlinks=False) == b"y":
                    set_opaque(p)
        for name in filenames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(p, file_mode(st.st_mode))
                with contextlib.suppress(OSError):
                    os.removexattr(p, CAPABILITY_XATTR, follow_symlinks=False)


class _Extractor:
    """Applies tar members to the snapshot rooted at ``root_fd``; one per layer, created by
    ``extract_tar_stream``."""

    def __init__(self, root_fd: int, limits: ExtractLimits, report: ExtractReport, what: str):
        self.root_fd = root_fd
        self.limits = limits
        self.report = report
        self.what = what
        self.is_root = os.geteuid() == 0
        um = os.umask(0o022)
        os.umask(um)
        self.umask = um
        self.setgid_seen = bool(os.fstat(root_fd).st_mode & stat.S_ISGID)
        self.whiteouts: set[tuple[str, ...]] = set()  # whiteouts made by this layer
        self.dirs: list[tuple[tuple[str, ...], int, int]] = []  # (path, mtime, mode) fixed at end
        self._fds: dict[tuple[str, ...], int] = {}  # open directory fds by path

    # parent directory fds -------------------------------------------------------------------
    def close(self) -> None:
        """Close the cached directory fds (the root fd belongs to the caller)."""
        self._drop_cache()

    def _drop_cache(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _parent_fd(self, comps: tuple[str, ...]) -> int:
        """fd of the directory ``comps`` (created 0755 if missing), walked without symlinks.

        The returned fd is owned by the cache; do not close it.
        """
        if not comps:
            return self.root_fd
        fd = self._fds.get(comps)
        if fd is not None:
            return fd
        if len(self._fds) > 512:
            self._drop_cache()
        parent = self._parent_fd(comps[:-1])
        fd = self._step(parent, comps[-1], comps)
        self._fds[comps] = fd
        return fd

    def _step(self, fd: int, c: str, path: tuple[str, ...]) -> int:
        try:
            return os.open(c, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(c, dir_fd=fd)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(
                    f"{self.what}: tar member path {'/'.join(path)!r} goes through a symlink "
                    "(symlink write-through); the layer is refused"
                ) from None
            if is_whiteout(st) and path in self.whiteouts:
                os.unlink(c, dir_fd=fd)  # a directory of this layer replaces its whiteout
                self.whiteouts.discard(path)
                os.mkdir(c, 0o755, dir_fd=fd)
                sub = os.open(c, _DIR_FLAGS, dir_fd=fd)
                set_opaque(sub)
                return sub
            raise UnsafeArchiveError(
                f"{self.what}: tar member path {'/'.join(path)!r} uses a non-directory as a "
                "directory; the layer is refused"
            ) from None
        os.mkdir(c, 0o755, dir_fd=fd)
        return os.open(c, _DIR_FLAGS, dir_fd=fd)

    def _clear_target(self, pfd: int, name: str, path: tuple[str, ...], keep_dir: bool) -> bool:
        """Remove whatever is at ``name`` unless it's a directory and ``keep_dir``.

        Returns True when the removed thing was a whiteout of this layer.
        """
        st = _lstat_at(pfd, name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return False
            self._drop_cache_under(path)
            _rm_tree_at(pfd, name)
            return False
        was_wh = is_whiteout(st) and path in self.whiteouts
        self.whiteouts.discard(path)
        os.unlink(name, dir_fd=pfd)
        return was_wh

    def _drop_cache_under(self, path: tuple[str, ...]) -> None:
        n = len(path)
        for key in [k for k in self._fds if k[:n] == path]:
            os.close(self._fds.pop(key))

    # entries --------------------------------------------------------------------------------
    def _chown(self, name: str | int, pfd: int | None, m: TarMember) -> None:
        if not self.is_root:
            return
        if isinstance(name, int):
            os.fchown(name, m.uid, m.gid)
        else:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)

    def entry(self, tr: TarReader, m: TarMember) -> None:
        """Apply member ``m`` (its data read from ``tr``); called by ``extract_tar_stream`` for
        each member in order. The entry count and the name are checked before anything is
        created; a skipped type creates nothing, not even its parent directories."""
        self._count_entry()
        comps = split_member_name(m.name)
        self._drop_xattrs(m)
        if not comps:
            if m.isdir():
                self._attrs_fd(self.root_fd, m)
            return
        if comps[-1].startswith(WH_PREFIX):
            self._whiteout(comps, m)
            return
        if m.type not in _HANDLED:
            self._skip(m)
            return
        pfd = self._parent_fd(comps[:-1])
        if m.isdir():
            self._directory(pfd, comps, m)
        elif m.isreg():
            self._regular(tr, pfd, comps, m)
        elif m.type == T_SYM:
            self._symlink(pfd, comps, m)
        elif m.type == T_LINK:
            self._hard_link(pfd, comps, m)
        else:  # pragma: no cover - _HANDLED covers the rest
            raise AssertionError(m.type)

    def _count_entry(self) -> None:
        """Count one more member; UnsafeArchiveError past ``max_entries`` (entry flood).
        Called by ``entry`` first, for every member."""
        rep = self.report
        rep.entries += 1
        if rep.entries > self.limits.max_entries:
            raise UnsafeArchiveError(
                f"{self.what}: more than {self.limits.max_entries} tar entries (entry flood); "
                "raise the extraction limits if this is a real layer"
            )

    def _drop_xattrs(self, m: TarMember) -> None:
        """Record the xattrs of ``m`` as dropped (none is ever applied). Called by ``entry``
        for every member once its name is checked."""
        rep = self.report
        for x in m.xattrs:
            rep.dropped_xattr_count += 1
            if len(rep.dropped_xattrs) < MAX_REPORTED:
                rep.dropped_xattrs.append(f"{m.name}: {x}")

    def _skip(self, m: TarMember) -> None:
        """Record and log member ``m`` of a type never created (device nodes, fifos, unknown
        types). Called by ``entry`` before any parent directory of ``m`` is created."""
        rep = self.report
        kind = _KINDS.get(m.type, f"unsupported entry type {m.type!r}")
        if len(rep.skipped) < MAX_REPORTED:
            rep.skipped.append(f"{m.name} ({kind})")
        log.warning("%s: skipped %s %s (not created)", self.what, kind, m.name)

    def _directory(self, pfd: int, comps: tuple[str, ...], m: TarMember) -> None:
        """Create (or keep) directory ``comps`` in ``pfd`` with the owner and mode of ``m``;
        a non-directory there is removed first, and a directory replacing a whiteout of this
        layer is made opaque. Its mtime is set by ``finish``. Called by ``entry``."""
        base = comps[-1]
        was_wh = False
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            was_wh = self._clear_target(pfd, base, comps, keep_dir=True)
            if _lstat_at(pfd, base) is None:
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            if was_wh:
                set_opaque(fd)
            self._chown(fd, None, m)
            os.fchmod(fd, m.mode & 0o7777)
        finally:
            os.close(fd)
        if m.mode & stat.S_ISGID:
            self.setgid_seen = True
        self.dirs.append((comps, int(m.mtime), m.mode & 0o7777))

    def _charge_file(self, m: TarMember) -> None:
        """Check regular file ``m`` against the per-file and total size limits and add its
        size to the report (decompression bombs). Called by ``_regular`` before the file is
        created."""
        rep = self.report
        size = m.size
        if size > self.limits.max_file_size:
            raise UnsafeArchiveError(
                f"{self.what}: file {m.name!r} is {size} bytes, over the per-file limit "
                f"{self.limits.max_file_size}"
            )
        rep.file_bytes += size
        if rep.file_bytes > self.limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{self.what}: layer expands to more than {self.limits.max_total_bytes} bytes "
                "(decompression bomb?); raise the extraction limits if this is a real layer"
            )

    def _regular(self, tr: TarReader, pfd: int, comps: tuple[str, ...], m: TarMember) -> None:
        """Create regular file ``comps`` in ``pfd`` as a new file (whatever is there, symlink
        included, is removed first, never written through) with the data of ``m`` from
        ``tr``, its owner, mode and mtime. Called by ``entry``."""
        self._charge_file(m)
        base = comps[-1]
        perm = m.mode & 0o777
        try:
            fd = os.open(base, _NEW_FILE_FLAGS, perm, dir_fd=pfd)
        except FileExistsError:
            # never written through: whatever is there (symlink included) is removed first
            self._clear_target(pfd, base, comps, keep_dir=False)
            fd = os.open(base, _NEW_FILE_FLAGS, perm, dir_fd=pfd)
        try:
            tr.read_data(fd, m)
            # Syscalls saved on the common case: a new file is already root-owned (unless
            # a setgid directory gave it another group) and has perm & ~umask.
            if self.is_root and (m.uid or m.gid or self.setgid_seen):
                os.fchown(fd, m.uid, m.gid)
            if m.mode & 0o7000 or perm & self.umask:
                os.fchmod(fd, file_mode(m.mode))
                if m.mode & (stat.S_ISUID | stat.S_ISGID):
                    self.report.setid_stripped += 1
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, comps: tuple[str, ...], m: TarMember) -> None:
        """Create symlink ``comps`` in ``pfd`` (replacing whatever is there) to the link name
        of ``m``, never following it; a top-level ``proc``, ``dev`` or ``sys`` symlink is
        flagged in the report. Called by ``entry``."""
        rep = self.report
        base = comps[-1]
        self._clear_target(pfd, base, comps, keep_dir=False)
        os.symlink(m.linkname, base, dir_fd=pfd)
        self._chown(base, pfd, m)
        with contextlib.suppress(OSError):
            os.utime(base, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
        if len(comps) == 1 and base in ("proc", "dev", "sys"):
            rep.flagged.append(f"/{base} is a symlink to {m.linkname!r}")
            log.warning("%s: /%s is a symlink (the runtime will refuse it)", self.what, base)

    def _hard_link(self, pfd: int, comps: tuple[str, ...], m: TarMember) -> None:
        """Create ``comps`` in ``pfd`` as a hard link to the link name of ``m``, which must be
        a regular file already extracted inside the destination (reached without symlinks);
        whatever is at ``comps`` is replaced, a link to itself is a no-op. Called by
        ``entry``."""
        base = comps[-1]
        tcomps = split_member_name(m.linkname)
        if not tcomps:
            raise UnsafeArchiveError(f"{self.what}: hard link {m.name!r} has an empty target")
        tpfd = self._parent_fd_nocreate(tcomps[:-1], m)
        try:
            st = _lstat_at(tpfd, tcomps[-1])
            if st is None or not stat.S_ISREG(st.st_mode):
                raise UnsafeArchiveError(
                    f"{self.what}: hard link {m.name!r} -> {m.linkname!r}: the target is not "
                    "a regular file already extracted in this layer; the layer is refused"
                )
            if tcomps == comps:
                return
            self._clear_target(pfd, base, comps, keep_dir=False)
            os.link(tcomps[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tpfd)

    def _parent_fd_nocreate(self, comps: tuple[str, ...], m: TarMember) -> int:
        fd = os.dup(self.root_fd)
        try:
            return _open_dir_at(fd, comps)
        except OSError:
            raise UnsafeArchiveError(
                f"{self.what}: hard link {m.name!r} -> {m.linkname!r}: the target is not "
                "inside this layer (or its path goes through a symlink); refused"
            ) from None

    def _attrs_fd(self, fd: int, m: TarMember) -> None:
        self._chown(fd, None, m)
        os.fchmod(fd, m.mode & 0o7777)
        self.dirs.append(((), int(m.mtime), m.mode & 0o7777))

    def _whiteout(self, comps: tuple[str, ...], m: TarMember) -> None:
        rep = self.report
        base = comps[-1]
        parent = comps[:-1]
        if base == WH_OPAQUE:
            pfd = self._parent_fd(parent)
            set_opaque(pfd)
            rep.opaque_dirs += 1
            return
        target = base[len(WH_PREFIX) :]
        if target.startswith(WH_PREFIX):
            rep.skipped.append(f"{m.name} (reserved .wh..wh. name)")
            log.warning("%s: ignored reserved whiteout name %s", self.what, m.name)
            return
        if target in ("", ".", ".."):
            raise UnsafeArchiveError(
                f"{self.what}: whiteout {m.name!r} names {target!r}, which is not a valid "
                "file name (whiteout traversal); the layer is refused"
            )
        pfd = self._parent_fd(parent)
        path = (*parent, target)
        st = _lstat_at(pfd, target)
        if st is not None:
            # An entry of this layer wins over its whiteout; a directory also hides lower content.
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(target, _DIR_FLAGS, dir_fd=pfd)
                try:
                    set_opaque(fd)
                finally:
                    os.close(fd)
            return
        try:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        except PermissionError:
            raise ImageError(
                f"{self.what}: creating the overlay whiteout for {'/'.join(path)!r} needs "
                "CAP_MKNOD; unpack images as root"
            ) from None
        self.whiteouts.add(path)
        rep.whiteouts += 1

    def finish(self) -> None:
        """Set directory mtimes; called once after the last member."""
        # Directory modes and mtimes last, deepest first, so writes inside don't disturb them.
        self._drop_cache()
        for comps, mtime, _mode in sorted(self.dirs, key=lambda d: len(d[0]), reverse=True):
            try:
                fd = os.dup(self.root_fd) if not comps else self._open_dir(comps)
            except OSError:
                continue
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    def _open_dir(self, comps: tuple[str, ...]) -> int:
        return _open_dir_at(os.dup(self.root_fd), comps)


def extract_tar_stream(
    stream: IO[bytes],
    dest: Path,
    *,
    limits: ExtractLimits = DEFAULT_LIMITS,
    what: str = "layer",
    max_bytes: int | None = None,
    bound: str = "",
) -> ExtractReport:
    """Extract an uncompressed tar stream into the existing empty directory ``dest``.

    The report's ``diff_id`` is the sha256 of the whole uncompressed stream. Called by
    ``extract_layer_file`` (and by the tests on in-memory tars); ``what`` names the layer in
    errors; ``max_bytes``: a tighter bound on the stream, which ``bound`` explains.
    """
    report = ExtractReport()
    # Raw tar bytes are bounded by the file bytes plus headers and padding.
    budget = limits.max_total_bytes + limits.max_entries * 1536 + 64 * (1 << 20)
    if max_bytes is not None and max_bytes < budget:
        budget = max_bytes
    else:
        bound = ""
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        ex = _Extractor(root_fd, limits, report, what)
        reader = HashingReader(stream, budget, what, bound)
        try:
            tr = TarReader(cast(IO[bytes], reader), limits.max_header_bytes, what)
            while (m := tr.next()) is not None:
                try:
                    ex.entry(tr, m)
                except OSError as exc:
                    raise ImageError(
                        f"{what}: cannot extract {m.name[:300]!r}: {exc.strerror or exc}; "
                        "the layer is refused"
                    ) from exc
            ex.finish()
            reader.drain()
        except BaseException:
            reader.abort()
            raise
        finally:
            ex.close()
    finally:
        os.close(root_fd)
    report.tar_bytes = reader.count
    report.diff_id = reader.finish()
    return report


def extract_layer_file(
    blob: Path,
    compression: str,
    dest: Path,
    *,
    limits: ExtractLimits = DEFAULT_LIMITS,
    expected_diff_id: str | None = None,
    what: str | None = None,
    image_left: int | None = None,
) -> ExtractReport:
    """Decompress and extract the layer blob ``blob`` into the empty directory ``dest``,
    within ``limits.layer_budget`` of its size and ``image_left`` (what the import being
    made may still unpack; None: no import).

    Called by ``ImageStore._unpack`` for each layer blob without a snapshot; DigestMismatch
    when the uncompressed content is not ``expected_diff_id`` (from the image config),
    UnsafeArchiveError (an ImageError) past the bounds.
    """
    label = what or f"layer {blob.name}"
    size = blob.stat().st_size
    cap = limits.layer_budget(size)
    bound = (
        f"the most a {size}-byte layer blob may expand to (ExtractLimits: max_ratio "
        f"{limits.max_ratio}x, at least ratio_floor {limits.ratio_floor} bytes)"
    )
    if image_left is not None and image_left < cap:
        cap = max(image_left, 0)
        bound = (
            f"what this image may still unpack (ExtractLimits.max_image_bytes "
            f"{limits.max_image_bytes} for all its layers)"
        )
    with open_decompressed(blob, compression, label) as stream:
        report = extract_tar_stream(
            stream, dest, limits=limits, what=label, max_bytes=cap, bound=bound
        )
    if expected_diff_id is not None and report.diff_id != expected_diff_id:
        raise DigestMismatch(
            f"{label}: uncompressed content has diff_id {report.diff_id}, but the image config "
            f"says {expected_diff_id}; the image is corrupt or was tampered with"
        )
    return report
