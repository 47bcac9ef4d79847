"""The built-in pseudo-image ``host``: the host's /usr read-only, and a sanitised /etc.

Layer: runtime (OS side). ``sandbox-kernel run host -- CMD`` and the benchmarks use it.

It makes the runtime usable and testable without building an image: a lower layer
holding the usr-merge symlinks (bin, lib, lib64, sbin -> usr/...) and a copy of the few
/etc files programs need (an allowlist: never shadow, sudoers, keys or certificates),
plus a read-only bind mount of the host's /usr. The layer is rebuilt when the host's
/etc files it copies change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..paths import state_dir
from .spec import Bind

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


def layer_dir(base: Path | None = None) -> Path:
    """Create (or refresh) and return the host image's lower layer (under the state dir
    unless ``base`` is given). Called by ``sandbox-kernel run host`` at each run."""
    root = (base or state_dir()) / "host-layer"
    stamp = _stamp()
    try:
        if (root / ".stamp").read_text() == stamp:
            return root
    except OSError:
        pass
    tmp = root.with_name(f"host-layer.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o755)
    for d in _DIRS:
        (tmp / d).mkdir(mode=0o755)
    for name in _LINKS:
        if os.path.lexists(f"/{name}"):
            os.symlink(f"usr/{name}", tmp / name)
    _copy_etc(tmp / "etc")
    (tmp / ".stamp").write_text(stamp)
    old = root.with_name(f"host-layer.old{os.getpid()}")
    if root.exists():
        os.rename(root, old)  # running containers keep their mounts of the old one
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race; use its layer
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return root


def binds() -> tuple[Bind, ...]:
    """The bind mounts the ``host`` image adds to a spec: the host's /usr, read-only. Called
    by ``sandbox-kernel run host`` next to ``layer_dir``."""
    return (Bind("/usr", "/usr", readonly=True),)
