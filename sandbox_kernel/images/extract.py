"""Hostile-input-safe layer extraction, and deterministic layer tar writing.

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
  they are counted in the report. setuid/setgid mode bits are kept.
* Limits stop decompression bombs: total bytes, entry count, per-file size, header size.
* Symlinks named ``proc``, ``dev`` or ``sys`` at the top are kept but flagged in the report
  (the runtime refuses such images at start); they are never followed here.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, cast

from ..errors import DigestMismatch, ImageError, UnsafeArchiveError

log = logging.getLogger(__name__)

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
COPY_CHUNK = 1 << 20
MAX_REPORTED = 1000  # report lists are capped; counts are not
MAX_DEPTH = 256  # path components of one member name

GiB = 1024**3


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one layer may expand to (decompression bombs, entry floods)."""

    max_total_bytes: int = 20 * GiB  # sum of regular file sizes
    max_entries: int = 2_000_000
    max_file_size: int = 20 * GiB
    max_header_bytes: int = 1 << 20  # one PAX header / GNU long name


DEFAULT_LIMITS = ExtractLimits()


@dataclass
class ExtractReport:
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


# --- decompression -----------------------------------------------------------------------------


class _HashingReader:
    """Reads from ``inner``, hashes every byte and enforces a byte budget."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.limit = limit
        self.what = what

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n if n is not None and n >= 0 else COPY_CHUNK)
        if data:
            self.count += len(data)
            if self.count > self.limit:
                raise UnsafeArchiveError(
                    f"{self.what}: uncompressed tar stream exceeds {self.limit} bytes "
                    "(decompression bomb?); raise the extraction limits if this is a real layer"
                )
            self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass

    def finish(self) -> str:
        return "sha256:" + self.sha.hexdigest()

    def abort(self) -> None:
        pass


def sniff_compression(path: Path) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes of a file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_decompressed(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """A streaming reader of the decompressed bytes of ``path``."""
    if compression == "none":
        with open(path, "rb", buffering=COPY_CHUNK) as f:
            yield f
    elif compression == "gzip":
        with open(path, "rb", buffering=COPY_CHUNK) as raw, gzip.GzipFile(fileobj=raw) as g:
            yield g  # type: ignore[misc]
    elif compression == "zstd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(
                f"cannot read zstd-compressed layer {path}: the 'zstd' program is not installed; "
                "install it (apt-get install zstd)"
            )
        with open(path, "rb") as raw:
            proc = subprocess.Popen(
                [zstd, "-d", "-c", "-q", "--no-progress"],
                stdin=raw,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=COPY_CHUNK,
            )
            assert proc.stdout is not None and proc.stderr is not None
            ok = False
            try:
                yield proc.stdout
                ok = True
            finally:
                if not ok:
                    proc.kill()
                proc.stdout.close()
                err = proc.stderr.read().decode(errors="replace").strip()
                proc.stderr.close()
                rc = proc.wait()
                if ok and rc != 0:
                    raise ImageError(f"zstd could not decompress layer {path}: {err or rc}")
    else:
        raise ImageError(f"unknown layer compression {compression!r} (use none, gzip or zstd)")


# --- a lean streaming tar reader -------------------------------------------------------------
#
# Written for this module (rather than tarfile's stream mode) for speed and control: extended
# headers are size-bounded before they are read, sparse files are refused, header checksums are
# verified, and file data is written to the destination straight from the read buffer.

REGTYPES = (b"0", b"\x00", b"7")
_ZERO_BLOCK = bytes(512)
T_LINK, T_SYM, T_CHR, T_BLK, T_DIR, T_FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
T_PAX, T_GPAX, T_GNU_LONGNAME, T_GNU_LONGLINK = b"x", b"g", b"L", b"K"
T_GNU_SPARSE = b"S"


@dataclass
class TarMember:
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    type: bytes
    linkname: str
    xattrs: list[str] = field(default_factory=list)

    def isreg(self) -> bool:
        return self.type in REGTYPES

    def isdir(self) -> bool:
        return self.type == T_DIR


def _num(field_: bytes, what: str) -> int:
    if field_[:1] not in (b"\x80", b"\xff"):
        try:
            return int(field_.split(b"\x00", 1)[0] or b"0", 8)
        except ValueError:
            pass
    if field_[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            n -= 1 << (8 * (len(field_) - 1))
        return n
    s = field_.split(b"\x00", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise UnsafeArchiveError(f"invalid number {field_!r} in tar header field {what}") from None


def _signed_chksum(hdr: bytes) -> int:
    """The checksum some old tar writers computed over signed chars."""
    values: tuple[int, ...] = struct.unpack("148b8x356b", hdr)
    return sum(values) + 256


def _str(field_: bytes) -> str:
    return field_.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


class TarReader:
    """Iterates over the members of an uncompressed tar stream."""

    def __init__(self, stream: IO[bytes], limits: ExtractLimits, what: str) -> None:
        self.stream = stream
        self.limits = limits
        self.what = what
        self.buf = b""
        self.pos = 0
        self.pending = 0  # data + padding of the current member not consumed yet

    def _fill(self, n: int) -> bool:
        """Make at least n bytes available at self.pos; False at end of stream."""
        have = len(self.buf) - self.pos
        if have >= n:
            return True
        if have == 0:  # the common case: no copy of the new chunk
            chunk = self.stream.read(max(COPY_CHUNK, n))
            self.buf, self.pos = chunk, 0
            if len(chunk) >= n:
                return True
            if not chunk:
                return False
            have = len(chunk)
        parts = [self.buf[self.pos :]]
        while have < n:
            chunk = self.stream.read(max(COPY_CHUNK, n - have))
            if not chunk:
                self.buf, self.pos = b"".join(parts), 0
                return False
            parts.append(chunk)
            have += len(chunk)
        self.buf, self.pos = b"".join(parts), 0
        return True

    def _read(self, n: int) -> bytes:
        if not self._fill(n):
            raise ImageError(f"{self.what}: tar stream truncated; the layer is corrupt")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            have = len(self.buf) - self.pos
            if have == 0:
                if not self._fill(1):
                    raise ImageError(f"{self.what}: tar stream truncated; the layer is corrupt")
                continue
            k = min(have, n)
            self.pos += k
            n -= k

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next n bytes of member data to fd."""
        while n > 0:
            have = len(self.buf) - self.pos
            if have == 0:
                if not self._fill(1):
                    raise ImageError(f"{self.what}: tar stream ends inside a file; corrupt layer")
                continue
            k = min(have, n)
            view = memoryview(self.buf)[self.pos : self.pos + k]
            while view:
                w = os.write(fd, view)
                view = view[w:]
            self.pos += k
            n -= k

    def _ext_data(self, size: int, kind: str) -> bytes:
        if size > self.limits.max_header_bytes:
            raise UnsafeArchiveError(
                f"{self.what}: {kind} of {size} bytes exceeds the {self.limits.max_header_bytes}"
                "-byte limit (header bomb); the layer is refused"
            )
        data = self._read(size)
        self.skip(-size % 512)
        return data

    def _parse_pax(self, data: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            sp = data.find(b" ", pos)
            if sp < 0:
                break
            try:
                length = int(data[pos:sp])
            except ValueError:
                raise UnsafeArchiveError(f"{self.what}: malformed PAX header") from None
            if length <= 0 or pos + length > len(data):
                raise UnsafeArchiveError(f"{self.what}: malformed PAX header record length")
            rec = data[sp + 1 : pos + length - 1]
            key, eq, val = rec.partition(b"=")
            if not eq:
                raise UnsafeArchiveError(f"{self.what}: malformed PAX header record")
            out[key.decode("utf-8", "surrogateescape")] = val.decode("utf-8", "surrogateescape")
            pos += length
        return out

    def next(self) -> TarMember | None:
        """The next member (its data must then be consumed with copy_to/skip_data)."""
        if self.pending:
            self.skip(self.pending)
            self.pending = 0
        pax: dict[str, str] = {}
        longname: str | None = None
        longlink: str | None = None
        while True:
            if not self._fill(512):
                if len(self.buf) - self.pos == 0:
                    return None  # end of stream without end-of-archive blocks: accepted
                raise ImageError(f"{self.what}: tar stream truncated inside a header")
            hdr = self.buf[self.pos : self.pos + 512]
            self.pos += 512
            if hdr == _ZERO_BLOCK:
                return None
            try:  # fast path for the usual octal fields; _num handles the rest
                chk = int(hdr[148:156].split(b"\x00", 1)[0] or b"0", 8)
            except ValueError:
                chk = _num(hdr[148:156], "chksum")
            if chk != sum(hdr) - sum(hdr[148:156]) + 256 and chk != _signed_chksum(hdr):
                raise ImageError(
                    f"{self.what}: tar header checksum mismatch; not a tar stream or corrupt"
                )
            typ = hdr[156:157]
            try:
                size = int(hdr[124:136].split(b"\x00", 1)[0] or b"0", 8)
            except ValueError:
                size = _num(hdr[124:136], "size")
            if size < 0:
                raise UnsafeArchiveError(f"{self.what}: negative size in tar header")
            if typ == T_PAX:
                pax.update(self._parse_pax(self._ext_data(size, "PAX header")))
                continue
            if typ == T_GPAX:
                self._ext_data(size, "global PAX header")
                continue
            if typ == T_GNU_LONGNAME:
                longname = _str(self._ext_data(size, "GNU long name"))
                continue
            if typ == T_GNU_LONGLINK:
                longlink = _str(self._ext_data(size, "GNU long link name"))
                continue
            if typ == T_GNU_SPARSE or any(k.startswith("GNU.sparse.") for k in pax):
                raise UnsafeArchiveError(
                    f"{self.what}: GNU sparse files are not supported in layers"
                )
            name = _str(hdr[0:100])
            if hdr[257:262] == b"ustar":
                prefix = _str(hdr[345:500]) if hdr[257:263] == b"ustar\x00" else ""
                if prefix:
                    name = prefix + "/" + name
            if longname is not None:
                name = longname
            linkname = longlink if longlink is not None else _str(hdr[157:257])
            mtime = _num(hdr[136:148], "mtime")
            uid = _num(hdr[108:116], "uid")
            gid = _num(hdr[116:124], "gid")
            xattrs: list[str] = []
            if pax:
                name = pax.get("path", name)
                linkname = pax.get("linkpath", linkname)
                try:
                    size = int(pax.get("size", size))
                    uid = int(pax.get("uid", uid))
                    gid = int(pax.get("gid", gid))
                    mtime = int(float(pax.get("mtime", mtime)))
                except ValueError:
                    raise UnsafeArchiveError(f"{self.what}: bad number in PAX header") from None
                if size < 0:
                    raise UnsafeArchiveError(f"{self.what}: negative size in PAX header")
                for k in pax:
                    if k.startswith("SCHILY.xattr.") or k.startswith("LIBARCHIVE.xattr."):
                        xattrs.append(k.split(".", 2)[2])
            # Like tarfile: only regular files and unknown types carry data in the archive.
            data_size = 0 if typ in (T_DIR, T_SYM, T_LINK, T_CHR, T_BLK, T_FIFO) else size
            self.pending = data_size + (-data_size % 512)
            return TarMember(
                name=name,
                mode=_num(hdr[100:108], "mode") & 0o7777,
                uid=uid,
                gid=gid,
                size=data_size,
                mtime=mtime,
                type=typ,
                linkname=linkname,
                xattrs=xattrs,
            )

    def read_data(self, fd: int, m: TarMember) -> None:
        """Copy the current member's data to fd (then only padding is left to skip)."""
        self.copy_to(fd, m.size)
        self.pending -= m.size


# --- safe fs helpers ---------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HANDLED = frozenset({*REGTYPES, T_DIR, T_SYM, T_LINK})
_KINDS = {T_CHR: "char device", T_BLK: "block device", T_FIFO: "fifo"}


def split_member_name(name: str) -> tuple[str, ...]:
    """Normalised path components of a tar member name; UnsafeArchiveError on '..'.

    Leading '/' (absolute names) and '.' / empty components are dropped.
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


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _set_opaque_fd(fd: int) -> None:
    os.setxattr(fd, "trusted.overlay.opaque", b"y")


class _Extractor:
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
            if _is_whiteout(st) and path in self.whiteouts:
                os.unlink(c, dir_fd=fd)  # a directory of this layer replaces its whiteout
                self.whiteouts.discard(path)
                os.mkdir(c, 0o755, dir_fd=fd)
                sub = os.open(c, _DIR_FLAGS, dir_fd=fd)
                _set_opaque_fd(sub)
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
        was_wh = _is_whiteout(st) and path in self.whiteouts
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
        rep = self.report
        rep.entries += 1
        if rep.entries > self.limits.max_entries:
            raise UnsafeArchiveError(
                f"{self.what}: more than {self.limits.max_entries} tar entries (entry flood); "
                "raise the extraction limits if this is a real layer"
            )
        comps = split_member_name(m.name)
        for x in m.xattrs:
            rep.dropped_xattr_count += 1
            if len(rep.dropped_xattrs) < MAX_REPORTED:
                rep.dropped_xattrs.append(f"{m.name}: {x}")
        if not comps:
            if m.isdir():
                self._attrs_fd(self.root_fd, m)
            return
        base = comps[-1]
        parent = comps[:-1]
        if base.startswith(WH_PREFIX):
            self._whiteout(comps, m)
            return
        if m.type not in _HANDLED:
            kind = _KINDS.get(m.type, f"unsupported entry type {m.type!r}")
            if len(rep.skipped) < MAX_REPORTED:
                rep.skipped.append(f"{m.name} ({kind})")
            log.warning("%s: skipped %s %s (not created)", self.what, kind, m.name)
            return
        pfd = self._parent_fd(parent)
        if m.isdir():
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
                    _set_opaque_fd(fd)
                self._chown(fd, None, m)
                os.fchmod(fd, m.mode & 0o7777)
            finally:
                os.close(fd)
            if m.mode & stat.S_ISGID:
                self.setgid_seen = True
            self.dirs.append((comps, int(m.mtime), m.mode & 0o7777))
        elif m.isreg():
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
                    os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
        elif m.type == T_SYM:
            self._clear_target(pfd, base, comps, keep_dir=False)
            os.symlink(m.linkname, base, dir_fd=pfd)
            self._chown(base, pfd, m)
            with contextlib.suppress(OSError):
                os.utime(base, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
            if len(comps) == 1 and base in ("proc", "dev", "sys"):
                rep.flagged.append(f"/{base} is a symlink to {m.linkname!r}")
                log.warning("%s: /%s is a symlink (the runtime will refuse it)", self.what, base)
        elif m.type == T_LINK:
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
                pfd = self._parent_fd(parent)
                if tcomps == comps:
                    return
                self._clear_target(pfd, base, comps, keep_dir=False)
                os.link(tcomps[-1], base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(tpfd)
        else:  # pragma: no cover - _HANDLED covers the rest
            raise AssertionError(m.type)

    def _parent_fd_nocreate(self, comps: tuple[str, ...], m: TarMember) -> int:
        fd = os.dup(self.root_fd)
        try:
            for c in comps:
                try:
                    fd2 = os.open(c, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    raise UnsafeArchiveError(
                        f"{self.what}: hard link {m.name!r} -> {m.linkname!r}: the target is not "
                        "inside this layer (or its path goes through a symlink); refused"
                    ) from None
                os.close(fd)
                fd = fd2
        except BaseException:
            os.close(fd)
            raise
        return fd

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
            _set_opaque_fd(pfd)
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
                    _set_opaque_fd(fd)
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
        fd = os.dup(self.root_fd)
        try:
            for c in comps:
                fd2 = os.open(c, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = fd2
        except BaseException:
            os.close(fd)
            raise
        return fd


def extract_tar_stream(
    stream: IO[bytes],
    dest: Path,
    *,
    limits: ExtractLimits = DEFAULT_LIMITS,
    what: str = "layer",
) -> ExtractReport:
    """Extract an uncompressed tar stream into the existing empty directory ``dest``.

    The report's ``diff_id`` is the sha256 of the whole uncompressed stream.
    """
    report = ExtractReport()
    # Raw tar bytes are bounded by the file bytes plus headers and padding.
    budget = limits.max_total_bytes + limits.max_entries * 1536 + 64 * (1 << 20)
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        ex = _Extractor(root_fd, limits, report, what)
        reader = _HashingReader(stream, budget, what)
        try:
            tr = TarReader(cast(IO[bytes], reader), limits, what)
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
) -> ExtractReport:
    """Decompress and extract the layer blob ``blob`` into the empty directory ``dest``."""
    label = what or f"layer {blob.name}"
    with open_decompressed(blob, compression) as stream:
        report = extract_tar_stream(stream, dest, limits=limits, what=label)
    if expected_diff_id is not None and report.diff_id != expected_diff_id:
        raise DigestMismatch(
            f"{label}: uncompressed content has diff_id {report.diff_id}, but the image config "
            f"says {expected_diff_id}; the image is corrupt or was tampered with"
        )
    return report


# --- writing a layer tar from an overlay upper dir --------------------------------------------


def _is_opaque_dir(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _scrub_xattrs(path: str, keep_opaque: bool) -> None:
    """Remove xattrs from a snapshot entry so it matches what extraction would produce."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if keep_opaque and name == "trusted.overlay.opaque":
            continue
        with contextlib.suppress(OSError):
            os.removexattr(path, name, follow_symlinks=False)


def write_layer_tar(
    src: Path,
    out: BinaryIO,
    *,
    scrub: bool = False,
) -> None:
    """Write ``src`` (a layer in overlay upper form) as a deterministic OCI layer tar to ``out``.

    Names are sorted (whiteouts first within each directory), owners numeric, mtimes kept,
    overlay whiteouts become ``.wh.NAME`` and opaque directories get ``.wh..wh..opq``. With
    ``scrub`` the tree is also normalised in place into snapshot form (xattrs other than the
    opaque marker removed, user.overlay.opaque turned into trusted.overlay.opaque).
    """
    tf = tarfile.open(  # noqa: SIM115 - closed at the end
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_CHUNK
    )
    seen_inodes: dict[tuple[int, int], str] = {}

    def info(name: str, st: os.stat_result) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = int(st.st_mtime)
        return ti

    def empty_file(name: str) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mode = 0o644
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    def walk(dirpath: str, rel: str) -> None:
        with os.scandir(dirpath) as it:
            entries = list(it)
        wh = sorted(e.name for e in entries if _is_whiteout(e.stat(follow_symlinks=False)))
        wh_set = set(wh)
        others = [e for e in entries if e.name not in wh_set]
        others.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        for name in wh:
            tf.addfile(empty_file(f"{rel}{WH_PREFIX}{name}"))
        for e in others:
            p = e.path
            st = e.stat(follow_symlinks=False)
            name = rel + e.name
            if stat.S_ISDIR(st.st_mode):
                ti = info(name, st)
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                opaque = _is_opaque_dir(p)
                if scrub:
                    _scrub_xattrs(p, keep_opaque=True)
                    if opaque:
                        os.setxattr(p, "trusted.overlay.opaque", b"y", follow_symlinks=False)
                if opaque:
                    tf.addfile(empty_file(f"{name}/{WH_OPAQUE}"))
                walk(p, name + "/")
            elif stat.S_ISREG(st.st_mode):
                if scrub:
                    _scrub_xattrs(p, keep_opaque=False)
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    ti = info(name, st)
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen_inodes[key]
                    tf.addfile(ti)
                    continue
                seen_inodes[key] = name
                ti = info(name, st)
                ti.size = st.st_size
                with open(p, "rb") as f:
                    tf.addfile(ti, f)
            elif stat.S_ISLNK(st.st_mode):
                if scrub:
                    _scrub_xattrs(p, keep_opaque=False)
                ti = info(name, st)
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(p)
                tf.addfile(ti)
            else:
                # devices other than whiteouts, fifos, sockets: extraction would skip them
                log.warning("layer %s: not storing special file %s", src, p)
                if scrub:
                    os.unlink(p)

    if scrub:
        _scrub_xattrs(str(src), keep_opaque=False)
    # The root directory itself gets no entry, as with most layer writers.
    walk(str(src), "")
    tf.close()
