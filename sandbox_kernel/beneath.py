"""Paths beneath a folder a kernel can write, opened without following what the kernel made.

Layer: OS (no Jupyter imports). A kernel writes its notebook folder; everything in it is
hostile: a file may be a symbolic link to ``/etc/shadow``, a folder a link to ``/root``, a
notebook a FIFO that blocks whoever opens it. A host process (the Jupyter server, often
root) that opens ``<root>/sub/out.txt`` by path follows all of that. Every host-side reader
and writer of such a folder goes through this module instead:

* the path is split below ``root`` into names (``..``, ``.`` and empty names refused);
* each folder on the way is opened relative to its parent's descriptor with ``O_NOFOLLOW``
  and ``O_DIRECTORY`` (an fd walk: no ``openat2`` needed, so it works on every kernel), so
  a link anywhere on the way is refused, not followed, and a folder swapped for a link after
  it was opened changes nothing: the operation works on the descriptor;
* the last name is opened with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` and must be a regular
  file (``fstat`` on the descriptor, not ``stat`` on the name), so a FIFO, socket or device
  named like a notebook neither blocks nor is read;
* renames, removals and folder creation act on names relative to the pinned parent, which
  never follow the last name either.

Callers: ``jupyter.contents`` (the Jupyter server's contents manager and checkpoints),
``jupyter.demo`` (the executed notebooks it writes next to the kernels' files),
``batch.engine`` (papermill's output notebook), ``images.exporter``, ``quota``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

#: How a folder on the way is opened: a descriptor only (no read permission needed).
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How a folder is opened to list it.
_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Added to every open of a last name.
_LEAF = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: Bounds of copy_tree: entries copied, folder depth.
COPY_MAX_ENTRIES = 100_000
COPY_MAX_DEPTH = 64


class Refused(OSError):
    """A path beneath a kernel's folder that the host side will not use.

    ``rel`` is the path below the root (what a user sees), ``what`` says why: "a symbolic
    link", "a FIFO", "a socket", "a device", "not a folder", "not a plain name".
    """

    def __init__(self, rel: str, what: str) -> None:
        super().__init__(errno.ELOOP if what == "a symbolic link" else errno.EACCES, what, rel)
        self.rel = rel
        self.what = what

    def __str__(self) -> str:
        return (
            f"{self.rel} is {self.what}"
            if self.what.startswith("a")
            else f"{self.rel}: {self.what}"
        )


def kind_of(mode: int) -> str:
    """What an ``st_mode`` is, in the words of Refused: "a regular file", "a folder", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def names(root: str, path: str) -> list[str]:
    """The names of ``path`` below ``root`` (``path`` absolute under ``root`` or relative to
    it). Refused for ``..``, ``.``, empty names and a path outside ``root``."""
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to(PurePosixPath(os.path.abspath(root)))
        except ValueError:
            raise Refused(path, "outside the folder") from None
    parts = list(p.parts)
    if any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise Refused(path, "not a plain name")
    return parts


def _rel(parts: list[str]) -> str:
    return "/".join(parts) or "."


def _walk(root: str, parts: list[str]) -> int:
    """A descriptor (``O_PATH``) of the folder ``parts`` names below ``root``; each step
    relative to the last, never following a link. FileNotFoundError when one is missing."""
    fd = os.open(root, _WALK & ~os.O_NOFOLLOW)  # the root itself is the admin's path
    try:
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, _WALK, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    raise Refused(_rel(parts[: i + 1]), kind_of(st.st_mode)) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def parent(root: str, path: str) -> Iterator[tuple[int, str]]:
    """``(descriptor of the folder holding the last name, last name)`` for ``path`` below
    ``root``, the folder reached without following a link; closed after the block. The
    root itself has no last name: Refused."""
    parts = names(root, path)
    if not parts:
        raise Refused(path, "the folder itself")
    fd = _walk(root, parts[:-1])
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def check_folders(root: str, path: str) -> None:
    """Refused when a folder on the way to ``path`` (not the last name) is a link or not a
    folder; a missing one is no error here (whoever uses the path says so)."""
    parts = names(root, path)
    with contextlib.suppress(FileNotFoundError):
        os.close(_walk(root, parts[:-1]))


def lstat(root: str, path: str) -> os.stat_result:
    """``lstat`` of ``path`` below ``root``, its folders reached without following links."""
    parts = names(root, path)
    if not parts:
        return os.stat(root)
    with parent(root, path) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def kind(root: str, path: str) -> str | None:
    """What ``path`` below ``root`` is (kind_of's words), None when it does not exist."""
    try:
        return kind_of(lstat(root, path).st_mode)
    except FileNotFoundError:
        return None


def open_file(root: str, path: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """A descriptor of the regular file ``path`` below ``root`` (``flags`` as for os.open;
    with ``O_CREAT`` the file may be new). Refused for a link anywhere on the way or at the
    end, and for anything but a regular file, before a byte is read; the descriptor is
    blocking again once it is known to be a regular file."""
    with parent(root, path) as (dfd, name):
        try:
            fd = os.open(name, flags | _LEAF, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                raise Refused(
                    path if not os.path.isabs(path) else _rel(names(root, path)),
                    kind_of(st.st_mode),
                ) from None
            raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(_rel(names(root, path)), kind_of(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def list_folder(root: str, path: str) -> list[str]:
    """The names in the folder ``path`` below ``root`` (the folder itself and every one on
    the way reached without following a link)."""
    parts = names(root, path)
    fd = _walk(root, parts)
    try:
        lfd = os.open(".", _LIST, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        return os.listdir(lfd)
    finally:
        os.close(lfd)


def read_bytes(root: str, path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` below ``root`` (at most ``limit``: OSError
    EFBIG past it)."""
    fd = open_file(root, path)
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data


def write_bytes(root: str, path: str, data: bytes | BinaryIO, mode: int = 0o644) -> None:
    """Replace the file ``path`` below ``root`` with ``data`` (bytes, or a binary file read
    to its end): written to a new file in the same folder, then renamed over the name (a
    link or FIFO there is replaced, never followed). Called by writers that make whole
    files: the demo's executed notebooks, the contents manager's checkpoints, papermill's
    output notebook (``batch.engine.write_output``), the exporter's index."""
    with parent(root, path) as (dfd, name):
        tmp = f".~{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _LEAF, mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise


def copy_tree(
    src_fd: int, dst_fd: int, *, entries: list[int] | None = None, depth: int = 0
) -> None:
    """Copy the contents of the folder open at ``src_fd`` into the (empty) folder open at
    ``dst_fd``: regular files and folders only (links, FIFOs, sockets and devices skipped,
    never opened), every name relative to its parent's descriptor, bounded in entries and
    depth (OSError past them). Called by the contents manager's folder copy."""
    count = entries if entries is not None else [0]
    if depth > COPY_MAX_DEPTH:
        raise OSError(errno.ELOOP, f"deeper than {COPY_MAX_DEPTH} folders")
    lfd = os.open(".", _LIST, dir_fd=src_fd)
    try:
        listing = os.listdir(lfd)
    finally:
        os.close(lfd)
    for name in listing:
        count[0] += 1
        if count[0] > COPY_MAX_ENTRIES:
            raise OSError(errno.EFBIG, f"more than {COPY_MAX_ENTRIES} entries")
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _copy_folder(src_fd, dst_fd, name, stat.S_IMODE(st.st_mode), count, depth)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src_fd, dst_fd, name, stat.S_IMODE(st.st_mode))


def _copy_folder(
    src_fd: int, dst_fd: int, name: str, mode: int, count: list[int], depth: int
) -> None:
    """copy_tree's step for one folder: made in ``dst_fd``, filled from ``src_fd``'s."""
    try:
        sub = os.open(name, _WALK, dir_fd=src_fd)
    except OSError:
        return  # swapped for something else meanwhile: skipped like any link
    try:
        os.mkdir(name, mode | 0o700, dir_fd=dst_fd)
        dsub = os.open(name, _WALK, dir_fd=dst_fd)
        try:
            copy_tree(sub, dsub, entries=count, depth=depth + 1)
        finally:
            os.close(dsub)
    finally:
        os.close(sub)


def _copy_file(src_fd: int, dst_fd: int, name: str, mode: int) -> None:
    """copy_tree's step for one regular file (checked on its descriptor, not its name)."""
    try:
        rfd = os.open(name, os.O_RDONLY | _LEAF, dir_fd=src_fd)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(rfd).st_mode):
            return
        wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _LEAF, mode, dir_fd=dst_fd)
        try:
            os.set_blocking(rfd, True)
            while chunk := os.read(rfd, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(wfd, view) :]
        finally:
            os.close(wfd)
    finally:
        os.close(rfd)


def make_folders(root: str, path: str, mode: int = 0o755) -> None:
    """Make the folder ``path`` below ``root`` and every missing one on the way, each
    relative to its parent's descriptor; Refused when one of them is a link or not a
    folder (``mkdir -p`` that never follows). Called by the checkpoints of the contents
    manager and by the image exporter."""
    parts = names(root, path)
    for i in range(1, len(parts) + 1):
        here = "/".join(parts[:i])
        what = kind(root, here)
        if what is None:
            with parent(root, here) as (dfd, name), contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=dfd)
            what = kind(root, here)
        if what != "a folder":
            raise Refused(here, what or "missing")


def open_folder(root: str, path: str) -> int:
    """A descriptor (``O_PATH``) of the folder ``path`` below ``root``, reached without
    following a link (the root itself for ``path`` equal to it). Closed by the caller."""
    return _walk(root, names(root, path))
