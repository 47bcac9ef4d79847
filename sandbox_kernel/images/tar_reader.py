"""A lean streaming tar reader for layer streams: ``TarReader`` and its ``TarMember``.

Written for the image store (rather than tarfile's stream mode) for speed and control:
extended headers (PAX, GNU long names) are size-bounded before they are read, sparse files are
refused, header checksums are verified, and file data is written to the destination straight
from the read buffer. It parses headers only; what a member may do to the file system is
decided by its one caller, the extractor (``extract.extract_tar_stream``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import IO

from ..errors import ImageError, UnsafeArchiveError
from .compression import COPY_CHUNK

REGTYPES = (b"0", b"\x00", b"7")
_ZERO_BLOCK = bytes(512)
_TRUNCATED = "tar stream truncated; the layer is corrupt"
T_LINK, T_SYM, T_CHR, T_BLK, T_DIR, T_FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
T_PAX, T_GPAX, T_GNU_LONGNAME, T_GNU_LONGLINK = b"x", b"g", b"L", b"K"
T_GNU_SPARSE = b"S"


@dataclass
class TarMember:
    """One member of a tar stream, as ``TarReader.next`` returns it: the name and link name
    after PAX / GNU long-name overrides, numeric owner, mode, mtime, the data size (0 for
    types that carry none) and the names of the xattrs its PAX header carried."""

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
        """True for a regular file (types '0', NUL and '7')."""
        return self.type in REGTYPES

    def isdir(self) -> bool:
        """True for a directory."""
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


@dataclass
class _Extended:
    """The extended headers read so far for the next member: PAX records, GNU long name and
    long link name. ``TarReader.next`` starts one per member and ``_member`` applies it."""

    pax: dict[str, str] = field(default_factory=dict)
    longname: str | None = None
    longlink: str | None = None


class TarReader:
    """Iterates over the members of an uncompressed tar stream.

    Created by ``extract.extract_tar_stream`` for each layer; it calls ``next`` for each
    member and then consumes the member's data with ``read_data`` (or leaves it for ``next``
    to skip). ``max_header_bytes`` bounds one PAX header or GNU long name; ``what`` names the
    layer in errors.
    """

    def __init__(self, stream: IO[bytes], max_header_bytes: int, what: str) -> None:
        self.stream = stream
        self.max_header_bytes = max_header_bytes
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
            raise ImageError(f"{self.what}: {_TRUNCATED}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _consume(self, n: int, fd: int | None, truncated: str) -> None:
        """Consume the next n bytes, writing them to ``fd`` unless it is None; ImageError
        ``truncated`` when the stream ends first."""
        while n > 0:
            have = len(self.buf) - self.pos
            if have == 0:
                if not self._fill(1):
                    raise ImageError(f"{self.what}: {truncated}")
                continue
            k = min(have, n)
            if fd is not None:
                view = memoryview(self.buf)[self.pos : self.pos + k]
                while view:
                    w = os.write(fd, view)
                    view = view[w:]
            self.pos += k
            n -= k

    def skip(self, n: int) -> None:
        """Skip the next n bytes (padding, extended headers, unread member data)."""
        self._consume(n, None, _TRUNCATED)

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next n bytes of member data to fd."""
        self._consume(n, fd, "tar stream ends inside a file; corrupt layer")

    def _ext_data(self, size: int, kind: str) -> bytes:
        if size > self.max_header_bytes:
            raise UnsafeArchiveError(
                f"{self.what}: {kind} of {size} bytes exceeds the {self.max_header_bytes}"
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
        """The next member, or None at the end of the archive.

        Its data is then consumed with ``read_data``; whatever is left of it is skipped by the
        next call. Extended headers (PAX, GNU long name/link) are applied to the member they
        precede; sparse members raise UnsafeArchiveError.
        """
        if self.pending:
            self.skip(self.pending)
            self.pending = 0
        ext = _Extended()
        while True:
            hdr = self._header()
            if hdr is None:
                return None
            typ = hdr[156:157]
            size = self._size(hdr)
            if not self._extended(typ, size, ext):
                return self._member(hdr, typ, size, ext)

    def _header(self) -> bytes | None:
        """The next 512-byte header block, its checksum verified; None at the end of the
        archive (a zero block, or the end of the stream between members). Called by ``next``
        for each header block, extended headers included."""
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
        return hdr

    def _size(self, hdr: bytes) -> int:
        """The size field of header ``hdr``; UnsafeArchiveError when negative. Called by
        ``next`` for each header block once its checksum is verified."""
        try:
            size = int(hdr[124:136].split(b"\x00", 1)[0] or b"0", 8)
        except ValueError:
            size = _num(hdr[124:136], "size")
        if size < 0:
            raise UnsafeArchiveError(f"{self.what}: negative size in tar header")
        return size

    def _extended(self, typ: bytes, size: int, ext: _Extended) -> bool:
        """When ``typ`` is an extended header (PAX, global PAX, GNU long name or link), read
        its ``size`` bytes (bounded) into ``ext`` and return True; False for any other type.
        Called by ``next`` for each header block; a global PAX header is read and ignored."""
        if typ == T_PAX:
            ext.pax.update(self._parse_pax(self._ext_data(size, "PAX header")))
        elif typ == T_GPAX:
            self._ext_data(size, "global PAX header")
        elif typ == T_GNU_LONGNAME:
            ext.longname = _str(self._ext_data(size, "GNU long name"))
        elif typ == T_GNU_LONGLINK:
            ext.longlink = _str(self._ext_data(size, "GNU long link name"))
        else:
            return False
        return True

    def _member(self, hdr: bytes, typ: bytes, size: int, ext: _Extended) -> TarMember:
        """The member that header ``hdr`` (of type ``typ`` and ``size``) describes, with the
        extended headers ``ext`` that preceded it applied; sets ``pending`` to its data and
        padding. Called by ``next`` for the first header that is not an extended one."""
        pax = ext.pax
        if typ == T_GNU_SPARSE or any(k.startswith("GNU.sparse.") for k in pax):
            raise UnsafeArchiveError(f"{self.what}: GNU sparse files are not supported in layers")
        name = _str(hdr[0:100])
        if hdr[257:262] == b"ustar":
            prefix = _str(hdr[345:500]) if hdr[257:263] == b"ustar\x00" else ""
            if prefix:
                name = prefix + "/" + name
        if ext.longname is not None:
            name = ext.longname
        linkname = ext.longlink if ext.longlink is not None else _str(hdr[157:257])
        mtime = _num(hdr[136:148], "mtime")
        uid = _num(hdr[108:116], "uid")
        gid = _num(hdr[116:124], "gid")
        # mode is parsed after the PAX numbers, so a bad PAX number is what gets reported
        m = TarMember(
            name=name, mode=0, uid=uid, gid=gid, size=size, mtime=mtime, type=typ, linkname=linkname
        )
        if pax:
            self._apply_pax(m, pax)
        # Like tarfile: only regular files and unknown types carry data in the archive.
        data_size = 0 if typ in (T_DIR, T_SYM, T_LINK, T_CHR, T_BLK, T_FIFO) else m.size
        self.pending = data_size + (-data_size % 512)
        m.mode = _num(hdr[100:108], "mode") & 0o7777
        m.size = data_size
        return m

    def _apply_pax(self, m: TarMember, pax: dict[str, str]) -> None:
        """Override the name, link name, size, owner and mtime of ``m`` with the PAX records
        ``pax`` and list the xattrs they carry (never applied: the extractor only counts them).
        Called by ``_member``; UnsafeArchiveError on a bad or negative number."""
        m.name = pax.get("path", m.name)
        m.linkname = pax.get("linkpath", m.linkname)
        try:
            m.size = int(pax.get("size", m.size))
            m.uid = int(pax.get("uid", m.uid))
            m.gid = int(pax.get("gid", m.gid))
            m.mtime = int(float(pax.get("mtime", m.mtime)))
        except ValueError:
            raise UnsafeArchiveError(f"{self.what}: bad number in PAX header") from None
        if m.size < 0:
            raise UnsafeArchiveError(f"{self.what}: negative size in PAX header")
        for k in pax:
            if k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")):
                m.xattrs.append(k.split(".", 2)[2])

    def read_data(self, fd: int, m: TarMember) -> None:
        """Copy the current member's data to fd (then only padding is left to skip)."""
        self.copy_to(fd, m.size)
        self.pending -= m.size
