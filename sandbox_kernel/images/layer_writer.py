"""Writing a layer: an overlay upper dir -> a deterministic OCI layer tar.

``ImageStore.add_layer_from_dir`` calls ``write_layer_tar`` (with ``scrub``) on the upper dir
of each build step, streaming the tar through the compressor into a new blob; the tests call it
to check the round trip. It is the inverse of ``extract``: overlay whiteouts (char devices 0:0)
become ``.wh.NAME`` entries and opaque directories get a ``.wh..wh..opq`` entry, so that
extracting the tar gives back the same tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from .compression import COPY_CHUNK
from .extract import (
    OPAQUE_XATTR,
    USER_OPAQUE_XATTR,
    WH_OPAQUE,
    WH_PREFIX,
    file_mode,
    is_whiteout,
    set_opaque,
)

log = logging.getLogger(__name__)

#: The xattrs that mark an opaque directory: overlayfs' own, and the one it sets instead when
#: mounted with ``userxattr``.
OPAQUE_XATTRS = (OPAQUE_XATTR, USER_OPAQUE_XATTR)


def _is_opaque_dir(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _scrub_xattrs(path: str) -> None:
    """Remove every xattr from a snapshot entry (the opaque markers are set again by the
    caller), so that it matches what extraction would produce."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.removexattr(path, name, follow_symlinks=False)


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """A tar header for ``name`` with the mode, numeric owner and mtime of ``st`` (no owner
    names). Called by ``_LayerTarWriter`` for every entry but whiteouts and opaque markers."""
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = int(st.st_mtime)
    return ti


def _empty_file(name: str) -> tarfile.TarInfo:
    """The header of an empty root-owned 0644 file with mtime 0: what ``.wh.NAME`` whiteouts
    and ``.wh..wh..opq`` markers are written as by ``_LayerTarWriter``."""
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


def _sorted_entries(dirpath: str) -> tuple[list[str], list[os.DirEntry[str]]]:
    """The entries of ``dirpath``: the names of its overlay whiteouts, sorted, and the other
    entries sorted by their name's bytes. Called by ``_LayerTarWriter.walk`` per directory."""
    with os.scandir(dirpath) as it:
        entries = list(it)
    wh = sorted(e.name for e in entries if is_whiteout(e.stat(follow_symlinks=False)))
    wh_set = set(wh)
    others = [e for e in entries if e.name not in wh_set]
    others.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    return wh, others


class _LayerTarWriter:
    """Writes the tree below ``src`` to the tar stream ``tf``, scrubbing it in place when
    ``scrub``; one per layer, created by ``write_layer_tar``. Hard-linked files are stored
    once, later names as links to the first one."""

    def __init__(
        self, src: Path, tf: tarfile.TarFile, scrub: bool, owner: tuple[int, int] | None
    ) -> None:
        self.src = src
        self.tf = tf
        self.scrub = scrub
        self.owner = owner
        self.seen_inodes: dict[tuple[int, int], str] = {}

    def _info(self, name: str, st: os.stat_result) -> tarfile.TarInfo:
        ti = _info(name, st)
        if self.owner is not None:
            ti.uid, ti.gid = self.owner
        return ti

    def walk(self, dirpath: str, rel: str) -> None:
        """Write the entries of directory ``dirpath`` (``rel`` is its name in the tar, empty
        or ending in '/'), whiteouts first, recursing into subdirectories. Called by
        ``write_layer_tar`` for the root and by ``_directory`` for each subdirectory."""
        wh, others = _sorted_entries(dirpath)
        for name in wh:
            self.tf.addfile(_empty_file(f"{rel}{WH_PREFIX}{name}"))
        for e in others:
            p = e.path
            st = e.stat(follow_symlinks=False)
            name = rel + e.name
            if stat.S_ISDIR(st.st_mode):
                self._directory(p, name, st)
            elif stat.S_ISREG(st.st_mode):
                self._regular(p, name, st)
            elif stat.S_ISLNK(st.st_mode):
                self._symlink(p, name, st)
            else:
                # devices other than whiteouts, fifos, sockets: extraction would skip them
                log.warning("layer %s: not storing special file %s", self.src, p)
                if self.scrub:
                    os.unlink(p)

    def _directory(self, p: str, name: str, st: os.stat_result) -> None:
        """Write directory ``p``, its opaque marker when it is opaque, then its content.
        Called by ``walk``."""
        ti = self._info(name, st)
        ti.type = tarfile.DIRTYPE
        self.tf.addfile(ti)
        opaque = _is_opaque_dir(p)
        if self.scrub:
            _scrub_xattrs(p)
            if opaque:
                set_opaque(p)
        if opaque:
            self.tf.addfile(_empty_file(f"{name}/{WH_OPAQUE}"))
        self.walk(p, name + "/")

    def _regular(self, p: str, name: str, st: os.stat_result) -> None:
        """Write regular file ``p`` with its data, or as a hard link to the name an earlier
        link of the same inode was written under. Called by ``walk``."""
        if self.scrub:
            _scrub_xattrs(p)
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):  # the tar keeps them; see extract
                os.chmod(p, file_mode(st.st_mode))
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.seen_inodes:
            ti = self._info(name, st)
            ti.type = tarfile.LNKTYPE
            ti.linkname = self.seen_inodes[key]
            self.tf.addfile(ti)
            return
        self.seen_inodes[key] = name
        ti = self._info(name, st)
        ti.size = st.st_size
        with open(p, "rb") as f:
            self.tf.addfile(ti, f)

    def _symlink(self, p: str, name: str, st: os.stat_result) -> None:
        """Write symlink ``p`` with its target. Called by ``walk``."""
        if self.scrub:
            _scrub_xattrs(p)
        ti = self._info(name, st)
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(p)
        self.tf.addfile(ti)


def write_layer_tar(
    src: Path,
    out: BinaryIO,
    *,
    scrub: bool = False,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write ``src`` (a layer in overlay upper form) as a deterministic OCI layer tar to ``out``.

    Names are sorted (whiteouts first within each directory), owners numeric, mtimes kept,
    overlay whiteouts become ``.wh.NAME`` and opaque directories get ``.wh..wh..opq``. With
    ``scrub`` the tree is also normalised in place into snapshot form (xattrs removed but the
    opaque markers, set as extraction sets them; setuid/setgid dropped from files), so that
    ``ImageStore.add_layer_from_dir`` can rename ``src`` into the snapshot store as is.
    ``owner``: write every entry as owned by this (uid, gid) instead of its owner on disk
    (the build steps whose files are all the image's root's, whoever made them).
    """
    tf = tarfile.open(  # noqa: SIM115 - closed at the end
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_CHUNK
    )
    if scrub:
        _scrub_xattrs(str(src))
    # The root directory itself gets no entry, as with most layer writers.
    _LayerTarWriter(src, tf, scrub, owner).walk(str(src), "")
    tf.close()
