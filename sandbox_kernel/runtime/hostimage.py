"""The built-in pseudo-image ``host``: the host's /usr read-only, and a sanitised /etc.

Layer: runtime (OS side). ``sandbox-kernel run host -- CMD`` and the benchmarks use it.

It makes the runtime usable and testable without building an image: a lower layer
holding the usr-merge symlinks (bin, lib, lib64, sbin -> usr/...) and a copy of the few
/etc files programs need (an allowlist: never shadow, sudoers, keys or certificates),
plus a read-only bind mount of the host's /usr. The layer is rebuilt when the host's
/etc files it copies change.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from ..errors import SandboxError
from ..paths import state_dir
from .rundir import process_alive
from .spec import Bind

log = logging.getLogger(__name__)

NAME = "host"
_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
_DIRS = ("usr", "etc", "proc", "dev", "sys", "tmp", "home", "root", "run", "var")
# /etc entries programs commonly need; nothing secret (no shadow, sudoers, ssh/ssl keys).
ETC_ALLOWLIST = (
    "passwd",
    "group",
    "nsswitch.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "alternatives",
    "mime.types",
    "protocols",
    "services",
    "login.defs",
    "bash.bashrc",
    "profile",
    "environment",
)
_VERSION = "2"


def _stamp() -> str:
    """Changes when the copied host files change (or when this module's layout does)."""
    parts = [_VERSION]
    for name in ETC_ALLOWLIST:
        try:
            st = os.lstat(f"/etc/{name}")
            parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
        except FileNotFoundError:
            pass
    return "\n".join(parts)


#: errnos that mean an entry under /etc vanished or changed type while it was copied
_CHANGED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EISDIR})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_entry(parent: int, name: str, dst: Path) -> None:
    """Copy the entry ``name`` of the open directory ``parent`` (under /etc) to ``dst`` as it
    is at this instant, never following a link (a link is copied as a link, every open is
    relative to its parent's fd with O_NOFOLLOW): a directory entry by entry, 0755, a regular
    file 0644; FIFOs, sockets and devices are skipped, and so is an entry that vanishes or
    changes type while it is copied (dpkg replacing /etc/alternatives). Whether the copy as
    a whole is consistent is ``_build``'s stamp check. Called by ``_copy_etc``."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=parent), dst)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                os.mkdir(dst, 0o755)
                os.chmod(dst, 0o755)  # whatever the umask
                for child in sorted(os.listdir(fd)):
                    _copy_entry(fd, child, dst / child)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(parent, name, dst)
    except OSError as exc:
        if exc.errno not in _CHANGED:
            raise


def _copy_file(parent: int, name: str, dst: Path) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            return  # replaced by something else since the stat
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(out, "wb") as fout:
            os.fchmod(fout.fileno(), 0o644)
            shutil.copyfileobj(fin, fout)


def _copy_etc(dst: Path, etc: str = "/etc") -> None:
    """Copy the allowlisted entries of ``etc`` into ``dst`` (the layer's etc). Called by
    ``_build``; tests pass a fake ``etc``."""
    fd = os.open(etc, _DIR_FLAGS)
    try:
        for name in ETC_ALLOWLIST:
            _copy_entry(fd, name, dst / name)
    finally:
        os.close(fd)


def _versions_dir(base: Path | None) -> Path:
    return (base or state_dir()) / "host-layers"


def _version_path(versions: Path, stamp: str) -> Path:
    """The directory of the layer version for ``stamp`` (the state of the copied files)."""
    return versions / hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _build(versions: Path, final: Path, stamp: str, *, settle: bool) -> bool:
    """Build a fresh layer beside ``final`` and rename it into place (a new name: never a
    rename over an existing directory, which fails across filesystems and would pull the
    layer from under running containers). With ``settle``, a copy during which the copied
    /etc files changed (their stamp is no longer ``stamp``) is dropped and False returned,
    for ``layer_dir`` to try again. Nothing half-built is left, whatever fails."""
    tmp = versions / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True, mode=0o755)
    try:
        for d in _DIRS:
            (tmp / d).mkdir(mode=0o755)
        for name in _LINKS:
            if os.path.lexists(f"/{name}"):
                os.symlink(f"usr/{name}", tmp / name)
        _copy_etc(tmp / "etc")
        if settle and _stamp() != stamp:
            return False
        (tmp / ".stamp").write_text(stamp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Prefix of a layer being built in the versions dir (then the builder's pid and a nonce).
_TMP_PREFIX = ".tmp-"
#: The single layer of version 0.1 (in the state dir), and its build and replaced leftovers.
_LEGACY = "host-layer"
_LEGACY_LEFTOVER = re.compile(r"host-layer\.(tmp|old)([0-9]+)")
#: How long after its last use by ``layer_dir`` a version is kept whatever the run dirs say
#: (the container it was handed to records it in its run dir moments later).
USE_GRACE_S = 600.0


def _mark_used(version: Path) -> None:
    """Record that ``version`` was just handed out (the mtime of its .stamp), so that a gc
    between ``layer_dir`` and the run dir recording it keeps it; an unwritable store records
    nothing (and nothing there is collected either)."""
    with contextlib.suppress(OSError):
        os.utime(version / ".stamp")


def layer_dir(base: Path | None = None) -> Path:
    """The host image's lower layer for the host's /etc files as they are now (under the
    state dir unless ``base`` is given): one directory per version of those files, made
    when first needed. Called by ``sandbox-kernel run host`` (and the builder, benchmarks)
    for each container.

    A rebuild never fails a container start while an earlier layer exists: /etc changing
    during the copy is retried, and a rebuild that cannot be made (a read-only or full state
    dir) uses the newest earlier version, or the layer of version 0.1, with a warning."""
    versions = _versions_dir(base)
    error: OSError | None = None
    for attempt in range(3):  # /etc may change under the copy: the last try keeps it anyway
        stamp = _stamp()
        final = _version_path(versions, stamp)
        if (final / ".stamp").is_file():
            _mark_used(final)
            return final
        try:
            versions.mkdir(parents=True, exist_ok=True, mode=0o755)
            if _build(versions, final, stamp, settle=attempt < 2):
                return final
        except OSError as exc:  # shutil.Error included
            error = exc
            break
    fallback = _newest(versions) or _legacy(base)
    if fallback is not None:
        log.warning(
            "the host image layer could not be refreshed (%s); using the earlier %s",
            error,
            fallback,
        )
        _mark_used(fallback)
        return fallback
    raise SandboxError(
        f"cannot make the host image layer in {versions}: {error}; check that the state "
        "directory is writable and has space (SANDBOX_KERNEL_STATE_DIR)"
    )


def _legacy(base: Path | None) -> Path | None:
    legacy = (base or state_dir()) / _LEGACY
    return legacy if (legacy / ".stamp").is_file() else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0  # removed meanwhile


def _newest(versions: Path) -> Path | None:
    try:
        done = [p for p in versions.iterdir() if (p / ".stamp").is_file()]
    except OSError:
        return None
    return max(done, key=_mtime, default=None)


def _stale_build(pid: int, path: Path, now: float, grace_s: float) -> bool:
    """Is the build leftover ``path`` of process ``pid`` dead? Its builder is gone, or (its
    pid reused) it is older than ``grace_s``."""
    return not process_alive(pid, None) or now - _mtime(path) >= grace_s


def collect(
    in_use: set[str], unknown: bool, base: Path | None = None, *, grace_s: float = 3600.0
) -> list[str]:
    """Remove the host layer versions no container uses (``in_use``: the layer paths of the
    live containers; ``unknown``: some live container did not record its layers, so the
    layers of version 0.1 stay) but the current one and those handed out in the last
    ``USE_GRACE_S``, and build leftovers (``.tmp-PID-*``, and 0.1's ``host-layer.tmpPID``)
    whose builder is gone or older than ``grace_s``; returns the names removed. Called by
    ``leftovers.collect_host_layers`` (``sandbox-kernel gc``, ``image gc``, each create)."""
    root = base or state_dir()
    versions = _versions_dir(base)
    newest = _version_path(versions, _stamp())
    removed = []
    now = time.time()
    try:
        entries = list(versions.iterdir())
    except OSError:
        entries = []
    for p in entries:
        if p == newest or str(p) in in_use:
            continue
        if p.name.startswith(_TMP_PREFIX):
            pid = p.name[len(_TMP_PREFIX) :].split("-", 1)[0]
            if pid.isdecimal() and not _stale_build(int(pid), p, now, grace_s):
                continue
        elif now - _mtime(p / ".stamp") < USE_GRACE_S:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    try:
        legacy = [
            p for p in root.iterdir() if p.name == _LEGACY or _LEGACY_LEFTOVER.fullmatch(p.name)
        ]
    except OSError:
        legacy = []
    for p in legacy:
        m = _LEGACY_LEFTOVER.fullmatch(p.name)
        if m and m.group(1) == "tmp":
            if not _stale_build(int(m.group(2)), p, now, grace_s):
                continue
        elif unknown or str(p) in in_use:  # 0.1's containers did not record their layers
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def binds() -> tuple[Bind, ...]:
    """The bind mounts the ``host`` image adds to a spec: the host's /usr, read-only. Called
    by ``sandbox-kernel run host`` next to ``layer_dir``."""
    return (Bind("/usr", "/usr", readonly=True),)
