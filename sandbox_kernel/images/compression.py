"""Reading layer blobs: compression sniffing, streaming decompression and the hashing reader.

A layer blob is a tar stream that may be gzip- or zstd-compressed. ``sniff_compression`` (and
``compression_of`` for bytes already read) tells which from the first bytes; the image importer
calls them for docker-save layers and rootfs tarballs, whose compression no media type states.
``open_decompressed`` streams the uncompressed bytes of a blob (gzip in-process, zstd through
the ``zstd`` program); ``extract.extract_layer_file`` calls it for every layer it unpacks.
``HashingReader`` sits between the decompressor and ``tar_reader.TarReader``: it computes the
layer's diff_id and stops a decompression bomb at a byte budget.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import ImageError, UnsafeArchiveError

#: The read and copy size of every layer and blob stream of the image store.
COPY_CHUNK = 1 << 20


class HashingReader:
    """Reads from ``inner``, hashes every byte and enforces a byte budget.

    Created by ``extract.extract_tar_stream`` around the uncompressed layer stream: the sha256
    of all bytes read is the layer's diff_id (``finish``), and more than ``limit`` bytes raise
    UnsafeArchiveError (a decompression bomb).
    """

    def __init__(self, inner: IO[bytes], limit: int, what: str, bound: str = "") -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.limit = limit
        self.what = what
        self.bound = bound  # what ``limit`` is, for the message

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (a chunk when ``n`` is negative), hashed and counted. Called by
        the tar reader as it fills its buffer."""
        data = self.inner.read(n if n is not None and n >= 0 else COPY_CHUNK)
        if data:
            self.count += len(data)
            if self.count > self.limit:
                bound = f", {self.bound}" if self.bound else ""
                raise UnsafeArchiveError(
                    f"{self.what}: uncompressed tar stream exceeds {self.limit} bytes{bound} "
                    "(decompression bomb?); the image is refused: raise the extraction limits "
                    "(ExtractLimits) if this is a real layer"
                )
            self.sha.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the stream. Called after the end-of-archive marker, so
        that the diff_id covers the trailing padding too."""
        while self.read(COPY_CHUNK):
            pass

    def finish(self) -> str:
        """The ``sha256:`` digest of every byte read: the diff_id, once the stream is drained."""
        return "sha256:" + self.sha.hexdigest()

    def abort(self) -> None:
        """Called when extraction fails; nothing is held open here, so there is nothing to do."""
        pass


def compression_of(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first (up to four) bytes of a blob. Called by
    ``sniff_compression`` and by the importer for docker-save layers read from a tar."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


#: First bytes of compressions the store does not read, and the program that decompresses them.
_UNSUPPORTED = ((b"\xfd7zXZ\x00", "xz", "xz -d"), (b"BZh", "bzip2", "bunzip2"))


def unsupported_compression(path: Path) -> str | None:
    """A one-line reason when ``path`` is compressed in a way the store does not read (xz,
    bzip2), naming the file and how to decompress it; None otherwise. Called by the importer
    before it takes a file for a tar archive."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name, tool in _UNSUPPORTED:
        if head.startswith(magic):
            return (
                f"{path} is {name}-compressed, which image import does not read; decompress it "
                f"({tool}) or recompress it with gzip or zstd"
            )
    return None


def sniff_compression(path: Path) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes of a file. Called by the importer to tell
    a compressed rootfs tarball from an image archive, and to pick its layer media type."""
    with open(path, "rb") as f:
        head = f.read(4)
    return compression_of(head)


@contextlib.contextmanager
def open_decompressed(path: Path, compression: str, what: str | None = None) -> Iterator[IO[bytes]]:
    """A streaming reader of the decompressed bytes of ``path``; a truncated or corrupt
    compressed stream is an ImageError naming ``what`` (the layer and the file it came from).

    Called by ``extract.extract_layer_file`` for each layer blob the store unpacks;
    ``compression`` comes from the layer's media type (``oci.layer_compression``).
    """
    label = what or f"layer {path}"
    if compression == "none":
        with open(path, "rb", buffering=COPY_CHUNK) as f:
            yield f
    elif compression == "gzip":
        with open(path, "rb", buffering=COPY_CHUNK) as raw, gzip.GzipFile(fileobj=raw) as g:
            try:
                yield g  # type: ignore[misc]
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise ImageError(
                    f"{label}: the gzip stream is truncated or corrupt ({exc}); "
                    "fetch or export the archive again"
                ) from None
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
                    why = err.splitlines()[-1] if err else f"exit status {rc}"
                    raise ImageError(
                        f"{label}: the zstd stream is truncated or corrupt ({why}); "
                        "fetch or export the archive again"
                    )
    else:
        raise ImageError(f"unknown layer compression {compression!r} (use none, gzip or zstd)")
