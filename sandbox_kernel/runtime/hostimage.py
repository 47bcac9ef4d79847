"""The built-in pseudo-image ``host``: the host's /usr read-only, and a sanitised /etc.

Layer: runtime (OS side). ``sandbox-kernel run host -- CMD`` and the benchmarks use it.

It makes the runtime usable and testable without building an image: a lower layer
holding the usr-merge symlinks (bin, lib, lib64, sbin -> usr/...) and a copy of the few
/etc files programs need (an allowlist: never shadow, sudoers, keys or certificates),
plus a read-only bind mount of the host's /usr. The layer is rebuilt when the host's
/etc files it copies change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from ..errors import SandboxError
from ..paths import state_dir
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


def _copy_etc(dst: Path) -> None:
    for name in ETC_ALLOWLIST:
        src = Path("/etc") / name
        if src.is_symlink():
            os.symlink(os.readlink(src), dst / name)
        elif src.is_dir():
            shutil.copytree(src, dst / name, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    for sub in dst.rglob("*"):
        if not sub.is_symlink():
            os.chmod(sub, 0o755 if sub.is_dir() else 0o644)


def _versions_dir(base: Path | None) -> Path:
    return (base or state_dir()) / "host-layers"


def _version_path(versions: Path, stamp: str) -> Path:
    """The directory of the layer version for ``stamp`` (the state of the copied files)."""
    return versions / hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _build(versions: Path, final: Path, stamp: str) -> None:
    """Build a fresh layer beside ``final`` and rename it into place (a new name: never a
    rename over an existing directory, which fails across filesystems and would pull the
    layer from under running containers)."""
    tmp = versions / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True, mode=0o755)
    try:
        for d in _DIRS:
            (tmp / d).mkdir(mode=0o755)
        for name in _LINKS:
            if os.path.lexists(f"/{name}"):
                os.symlink(f"usr/{name}", tmp / name)
        _copy_etc(tmp / "etc")
        (tmp / ".stamp").write_text(stamp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def layer_dir(base: Path | None = None) -> Path:
    """The host image's lower layer for the host's /etc files as they are now (under the
    state dir unless ``base`` is given): one directory per version of those files, made
    when first needed. Called by ``sandbox-kernel run host`` at each run.

    A rebuild that fails (the host changing /etc while it is copied, a read-only state dir)
    never fails a container start while an earlier version exists: that one is used."""
    versions = _versions_dir(base)
    stamp = _stamp()
    final = _version_path(versions, stamp)
    if (final / ".stamp").is_file():
        return final
    errors = []
    for _attempt in range(2):  # /etc may change under the copy: try once more
        try:
            versions.mkdir(parents=True, exist_ok=True, mode=0o755)
            _build(versions, final, stamp)
            return final
        except (OSError, shutil.Error) as exc:
            errors.append(exc)
    fallback = _newest(versions)
    if fallback is not None:
        log.warning(
            "the host image layer could not be refreshed (%s); using %s", errors[-1], fallback
        )
        return fallback
    raise SandboxError(
        f"cannot make the host image layer in {versions}: {errors[-1]}; check that the state "
        "directory is writable (SANDBOX_KERNEL_STATE_DIR)"
    )


def _newest(versions: Path) -> Path | None:
    try:
        done = [p for p in versions.iterdir() if (p / ".stamp").is_file()]
    except OSError:
        return None
    return max(done, key=lambda p: p.stat().st_mtime, default=None)


def collect(
    in_use: set[str], unknown: bool, base: Path | None = None, *, grace_s: float = 3600.0
) -> list[str]:
    """Remove the host layer versions no container uses (``in_use``: the layer paths of the
    live containers; ``unknown``: some live container did not record its layers, so the
    layer of version 0.1 stays) but the current one, and build leftovers older than
    ``grace_s``; returns what went. Called by ``leftovers.collect_leftovers``."""
    versions = _versions_dir(base)
    newest = _version_path(versions, _stamp())
    removed = []
    try:
        entries = list(versions.iterdir())
    except OSError:
        return []
    now = time.time()
    for p in entries:
        if p == newest or str(p) in in_use:
            continue
        if p.name.startswith(".tmp-"):
            try:
                if now - p.stat().st_mtime < grace_s:
                    continue
            except OSError:
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    legacy = (base or state_dir()) / "host-layer"  # the single layer of version 0.1
    if legacy.is_dir() and not unknown and str(legacy) not in in_use:
        shutil.rmtree(legacy, ignore_errors=True)
        removed.append(legacy.name)
    return removed


def binds() -> tuple[Bind, ...]:
    """The bind mounts the ``host`` image adds to a spec: the host's /usr, read-only. Called
    by ``sandbox-kernel run host`` next to ``layer_dir``."""
    return (Bind("/usr", "/usr", readonly=True),)
