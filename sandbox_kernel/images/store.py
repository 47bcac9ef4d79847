"""The image store: an OCI image layout plus shared unpacked layer snapshots.

Layout under the state dir (``paths.state_dir()``):

* ``oci/`` - an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``); the
  index holds one manifest descriptor per image with the annotation
  ``org.opencontainers.image.ref.name`` = ``name:tag``.
* ``snapshots/<diff_id hex>/`` - each layer unpacked once, read-only, shared by every image that
  has it, in overlayfs lower-dir form (whiteouts are char devices 0:0, opaque directories carry
  ``trusted.overlay.opaque=y``). Created atomically: unpacked in ``tmp/`` then renamed.
* ``layers/<blob hex>`` - the diff_id of each stored layer blob (so a known blob is not
  decompressed again).
* ``cache/<sha256 of key>.json`` - the build cache: step key -> layer.
* ``tmp/`` - work space on the same filesystem; ``index.lock`` - flock for index updates.
* ``build-tmp/`` - the builder's scratch folders (``build``, ``ipykernel_layer``).

Modes (``PRIVATE_PARTS``, ``private_dir``): ``tmp/``, ``cache/`` and ``build-tmp/`` are the
owner's work (partial downloads and unpacks, build scratch with whatever a build step left,
the build cache's keys) and are made 0700 at every start of the store, an older store's
included. ``oci/``, ``snapshots/`` and ``layers/`` stay readable by every host user: an
ordinary user's rootless kernels read the system store (``lookup``). That is safe because a
snapshot holds nothing that gains privileges when a host user runs it: setuid and setgid
bits are stripped at unpack, no xattr of an archive (``security.capability`` among them) is
ever applied, and ``harden_snapshot`` takes both off snapshots of older versions; what is
left is an image's ordinary files, which any user could unpack from the image themselves.

All writes are temp + rename. Digests are validated before a path is built from them and
verified whenever a blob is read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .. import paths
from ..errors import DigestMismatch, ImageError, ImageInUse, ImageNotFound
from ..runtime.rundir import ContainerInfo
from . import oci
from .compression import COPY_CHUNK
from .extract import (
    DEFAULT_LIMITS,
    ExtractLimits,
    ExtractReport,
    extract_layer_file,
    harden_snapshot,
)
from .labels import LABEL_ARGV
from .layer_writer import write_layer_tar
from .recipe import available_recipes
from .reference import parse_reference

log = logging.getLogger(__name__)

HISTORY_EMPTY = "empty_layer"
#: The form of the snapshots (``_upgrade_snapshots``): 2 = setuid/setgid stripped from files,
#: opaque directories marked in both overlay xattr namespaces; 3 = file capabilities
#: (``security.capability``) removed too.
SNAPSHOT_FORMAT = "3"
SNAPSHOT_FORMAT_FILE = ".format"
#: The store's parts that only its owner uses: mode 0700 (see the module docstring).
PRIVATE_PARTS = ("tmp", "cache", "build-tmp")
PRIVATE_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Make the folder ``path`` (one of a store's ``PRIVATE_PARTS``) if missing and give it
    mode 0700 whatever the umask or an older version made; ``path``. Called by
    ``ImageStore._init`` and by the builders for ``build-tmp``."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_MODE)
    if stat.S_IMODE(path.lstat().st_mode) != PRIVATE_MODE:
        os.chmod(path, PRIVATE_MODE)
    return path


@dataclass(frozen=True)
class Layer:
    """One layer of an image: its blob, its diff_id and its snapshot. Returned by the
    ``add_layer_*`` methods (the importer and the builder collect them for ``write_image``)
    and read from the manifest for every image the store lists."""

    digest: str  # "sha256:<hex>" of the (compressed) blob
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # blob size in bytes
    media_type: str
    snapshot: Path  # unpacked read-only dir (overlay lower form)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime part of an image config: environment, command, working directory, user,
    labels. The builder and the importer give one to ``write_image``; ``sandbox-kernel run``
    and the provisioner start containers from the one ``resolve`` returns."""

    env: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = "/"
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_doc(cls, cfg: oci.ConfigDoc) -> ImageConfig:
        """The runtime part of a parsed OCI image config. Called by the store for each image
        it reads and by the importer for each image it imports."""
        return cls(
            env=cfg.env,
            entrypoint=cfg.entrypoint,
            cmd=cfg.cmd,
            working_dir=cfg.working_dir,
            user=cfg.user,
            labels=cfg.labels,
        )


@dataclass(frozen=True)
class Image:
    """An image of the store: its name, tag, manifest digest, config and layers. Returned by
    ``list``, ``resolve`` and ``write_image``; ``lowerdirs`` gives the runtime its root."""

    name: str
    tag: str
    digest: str  # manifest digest
    config: ImageConfig
    layers: tuple[Layer, ...]  # base first (OCI order)
    created: str  # RFC 3339
    size: int  # sum of blob sizes

    @property
    def ref(self) -> str:
        """``name:tag``, as written in the index annotation and shown by the CLI."""
        return f"{self.name}:{self.tag}"

    def lowerdirs(self) -> tuple[str, ...]:
        """Snapshot dirs, top-most first (the order of overlayfs ``lowerdir=``). The
        provisioner and ``sandbox-kernel run`` put them in the container spec's layers."""
        return tuple(str(layer.snapshot) for layer in reversed(self.layers))

    def kernel_argv(self) -> tuple[str, ...] | None:
        """The kernel command from the label ``org.sandbox-kernel.kernel.argv``, or None.

        The label is a JSON list of strings, one of which contains ``{connection_file}``.
        Called by ``jupyter.launch.find_image`` when a kernel is launched and by
        ``sandbox-kernel image inspect``.
        """
        raw = dict(self.config.labels).get(LABEL_ARGV)
        if raw is None:
            return None
        try:
            argv = json.loads(raw)
        except ValueError:
            argv = None
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) for a in argv)
            or not any("{connection_file}" in a for a in argv)
        ):
            raise ImageError(
                f"image '{self.ref}': label {LABEL_ARGV} must be a JSON list of "
                f"strings containing '{{connection_file}}', got {raw[:200]!r}; rebuild the image "
                "with a valid kernel command"
            )
        return tuple(argv)


# --- in-use check ------------------------------------------------------------------------------


def running_image_digests(run_root: Path | None = None) -> set[str]:
    """Manifest digests of images used by live containers.

    A container uses an image when its run dir (``paths.run_dir()/<id>/``) has a file ``image``
    holding the image's manifest digest and a file ``pid`` naming a live process (JSON
    ``{"pid": N, "start": T}``, T the /proc starttime guarding against pid reuse, or a bare pid).
    """
    root = run_root if run_root is not None else paths.run_dir()
    found: set[str] = set()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return found
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        info = ContainerInfo(Path(e.path))
        digest = info.image_digest()
        if digest and info.running():
            found.add(digest)
    return found


def image_in_use(image: Image, run_root: Path | None = None) -> bool:
    """True when a live container (see ``running_image_digests``) uses ``image``. The default
    check of ``ImageStore.remove``; ``sandbox-kernel image rm`` passes it explicitly."""
    return image.digest in running_image_digests(run_root)


# --- helpers -----------------------------------------------------------------------------------


def _now_rfc3339() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        t = datetime.fromtimestamp(int(epoch), timezone.utc)
    else:
        t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rmtree(path: Path) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        # a read-only directory from an archive (mode 0555) when not root
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            func(p)

    if path.is_symlink() or not path.exists():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    shutil.rmtree(path, onerror=onerror)


class _Sink:
    """Receives an uncompressed layer tar; hashes it and writes it compressed to a file."""

    def __init__(self, out: IO[bytes], compression: str) -> None:
        self.diff = hashlib.sha256()
        self.out = out
        self.compression = compression
        self.zobj: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        if compression == "gzip":
            self.zobj = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif compression == "zstd":
            zstd = shutil.which("zstd")
            if zstd is None:
                raise ImageError(
                    "cannot write a zstd layer: the 'zstd' program is not installed; install it "
                    "(apt-get install zstd) or use compression='gzip'"
                )
            self.proc = subprocess.Popen(
                [zstd, "-q", "-c", "-3"], stdin=subprocess.PIPE, stdout=out
            )
        elif compression != "none":
            raise ImageError(f"unknown layer compression {compression!r}; use gzip, zstd or none")

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        if self.zobj is not None:
            self.out.write(self.zobj.compress(data))
        elif self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
        else:
            self.out.write(data)
        return len(data)

    def close(self) -> None:
        if self.zobj is not None:
            self.out.write(self.zobj.flush())
        elif self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            if self.proc.wait() != 0:
                raise ImageError("zstd failed while compressing a layer")
        self.out.flush()


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


def _older_than(p: Path, now: float, grace_seconds: float, use_ctime: bool = False) -> bool:
    """True when ``p`` was last modified (or, with ``use_ctime``, last changed) at least
    ``grace_seconds`` before ``now``; False when it is gone. ``ImageStore.gc`` keeps blobs and
    snapshots younger than that."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return False
    t = max(st.st_mtime, st.st_ctime) if use_ctime else st.st_mtime
    return now - t >= grace_seconds


# --- the store ---------------------------------------------------------------------------------


class ImageStore:
    """The image store under ``root`` (by default ``paths.state_dir()``); see the module
    docstring for the layout. Made by the CLI commands, the kernel launcher (``jupyter.launch``)
    and the demo; the builder, importer and exporter work on the one they are given.
    ``limits`` bound every layer it unpacks."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        limits: ExtractLimits = DEFAULT_LIMITS,
        readonly: bool = False,
    ) -> None:
        self.root = Path(root) if root is not None else paths.state_dir()
        self.limits = limits
        #: Uncompressed bytes the import under way may still unpack (``import_budget``).
        self._image_left: int | None = None
        self._budget_lock = threading.Lock()
        #: Only read (another user's store: the system store as seen by an ordinary user).
        self.readonly = readonly
        self.oci_dir = self.root / "oci"
        self.blobs_dir = self.oci_dir / "blobs" / "sha256"
        self.snapshots_dir = self.root / "snapshots"
        self.layers_dir = self.root / "layers"
        self.cache_dir = self.root / "cache"
        self.tmp_dir = self.root / "tmp"
        self._lock_path = self.root / "index.lock"
        self._ready = False

    # setup ---------------------------------------------------------------------------------
    def _init(self) -> None:
        if self._ready:
            return
        if self.readonly:
            self._ready = True
            return
        try:
            for d in (self.blobs_dir, self.snapshots_dir, self.layers_dir):
                d.mkdir(parents=True, exist_ok=True)
            for name in PRIVATE_PARTS:
                private_dir(self.root / name)
            layout = self.oci_dir / "oci-layout"
            if not layout.exists():
                self._atomic_write(
                    layout, oci.dump_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION})
                )
            if not (self.oci_dir / "index.json").exists():
                with self._locked():
                    if not (self.oci_dir / "index.json").exists():
                        self._write_index([])
            self._upgrade_snapshots()
        except PermissionError as exc:
            raise ImageError(
                f"cannot write the image store at {self.root}: {exc.strerror}; run as root or set "
                "SANDBOX_KERNEL_STATE_DIR to a writable directory"
            ) from None
        self._ready = True

    def _upgrade_snapshots(self) -> None:
        """Bring snapshots unpacked by an earlier version to today's form, once (the
        ``snapshots/.format`` file says which form they are in): setuid/setgid and file
        capabilities dropped from files, and opaque directories marked for overlay in a user
        namespace too."""
        marker = self.snapshots_dir / SNAPSHOT_FORMAT_FILE
        try:
            if marker.read_text().strip() == SNAPSHOT_FORMAT:
                return
        except FileNotFoundError:
            pass
        with self._locked():
            for snap in self.snapshots_dir.iterdir():
                if snap.is_dir() and not snap.is_symlink() and oci.is_hex64(snap.name):
                    harden_snapshot(snap)
            self._atomic_write(marker, SNAPSHOT_FORMAT.encode() + b"\n")

    def _tmp_name(self, kind: str) -> Path:
        return self.tmp_dir / f"{kind}-{os.getpid()}-{secrets.token_hex(6)}"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # blobs ---------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """The path of blob ``digest`` (validated first); the exporter copies blobs from it."""
        return self.blobs_dir / oci.digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        """True when blob ``digest`` is stored; checked before a layer is used or cached."""
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str, max_bytes: int = oci.MAX_JSON_BYTES) -> bytes:
        """A small blob (manifest, config), size-bounded and digest-verified. The store reads
        images with it; the exporter reads the manifests it exports."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise ImageError(
                f"blob {digest} is missing from the store {self.oci_dir}; re-import or rebuild "
                "the image"
            ) from None
        if len(data) > max_bytes:
            raise ImageError(f"blob {digest} is over {max_bytes} bytes; refusing to load it")
        if oci.sha256_digest(data) != digest:
            raise DigestMismatch(
                f"blob {path} does not match its digest {digest} (corrupted store); remove the "
                "image and import or build it again"
            )
        return data

    def put_blob_bytes(self, data: bytes) -> str:
        """Store a small blob (``write_image``'s config and manifest); returns its digest."""
        self._init()
        digest = oci.sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            self._atomic_write(path, data)
        return digest

    def put_blob_stream(
        self,
        src: IO[bytes],
        expected_digest: str | None = None,
        expected_size: int | None = None,
        what: str = "blob",
    ) -> tuple[str, int]:
        """Copy a stream into the blob store, verifying digest and size before it is installed.

        Called by ``add_layer_stream`` for each layer blob the importer brings in.
        """
        self._init()
        if expected_digest is not None:
            oci.check_digest(expected_digest, f"{what} digest")
        h = hashlib.sha256()
        n = 0
        with self._new_blob() as tmp:
            with open(tmp, "wb") as out:
                while chunk := src.read(COPY_CHUNK):
                    n += len(chunk)
                    if expected_size is not None and n > expected_size:
                        raise DigestMismatch(
                            f"{what}: more than the {expected_size} bytes its descriptor declares "
                            "(size mismatch); the image is corrupt or was tampered with"
                        )
                    h.update(chunk)
                    out.write(chunk)
            digest = "sha256:" + h.hexdigest()
            if expected_size is not None and n != expected_size:
                raise DigestMismatch(
                    f"{what}: {n} bytes but its descriptor declares {expected_size} (size "
                    "mismatch); the image is corrupt or was tampered with"
                )
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatch(
                    f"{what}: content has digest {digest} but {expected_digest} was expected "
                    "(digest mismatch); the image is corrupt or was tampered with"
                )
            self._install_blob(tmp, digest)
        return digest, n

    @contextlib.contextmanager
    def _new_blob(self) -> Iterator[Path]:
        """A temp path in the store's tmp dir for a blob being written; removed when the block
        fails. Used by ``put_blob_stream`` and ``add_layer_from_dir``."""
        tmp = self._tmp_name("blob")
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _install_blob(self, tmp: Path, digest: str) -> None:
        """Move the verified blob ``tmp`` to its place; when the blob is there already (same
        content) ``tmp`` is dropped and the blob touched, so gc's grace period starts again."""
        final = self.blob_path(digest)
        if final.exists():
            os.utime(final)
            tmp.unlink()
        else:
            os.replace(tmp, final)

    # layers --------------------------------------------------------------------------------
    def snapshot_path(self, diff_id: str) -> Path:
        """The snapshot directory of the layer with ``diff_id`` (validated first)."""
        return self.snapshots_dir / oci.digest_hex(diff_id)

    def _known_diff_id(self, digest: str) -> str | None:
        try:
            raw = (self.layers_dir / oci.digest_hex(digest)).read_text().strip()
        except OSError:
            return None
        return (
            raw if oci.is_hex64(raw.removeprefix("sha256:")) and raw.startswith("sha256:") else None
        )

    def _remember_diff_id(self, digest: str, diff_id: str) -> None:
        self._atomic_write(self.layers_dir / oci.digest_hex(digest), diff_id.encode())

    def _unpack(
        self, digest: str, media_type: str, expected_diff_id: str | None, what: str | None = None
    ) -> tuple[str, ExtractReport | None]:
        """Make sure the snapshot of blob ``digest`` exists; returns its diff_id. ``what``
        names the layer in errors (where it came from; its digest by default)."""
        known = self._known_diff_id(digest)
        if expected_diff_id is not None:
            oci.check_digest(expected_diff_id, "diff_id")
            if known is not None and known != expected_diff_id:
                raise DigestMismatch(
                    f"layer {digest}: its diff_id is {known}, but the image config says "
                    f"{expected_diff_id}; the image is corrupt or was tampered with"
                )
        if known is not None and self.snapshot_path(known).is_dir():
            return known, None
        compression = oci.layer_compression(media_type)
        tmp = self._tmp_name("snap")
        tmp.mkdir(mode=0o755)
        os.chmod(tmp, 0o755)
        try:
            with self._reserve(self.blob_path(digest)) as (image_left, used):
                report = extract_layer_file(
                    self.blob_path(digest),
                    compression,
                    tmp,
                    limits=self.limits,
                    expected_diff_id=expected_diff_id,
                    what=what or f"layer {digest}",
                    image_left=image_left,
                )
                used.append(report.tar_bytes)
            diff_id = report.diff_id
            self._install_snapshot(tmp, diff_id)
            if report.skipped:
                # a base system's /dev nodes are expected (the runtime makes its own /dev)
                only_dev = all(e.lstrip("./").startswith("dev/") for e in report.skipped)
                (log.info if only_dev else log.warning)(
                    "layer %s: %d special entries not created (e.g. %s)",
                    digest,
                    len(report.skipped),
                    report.skipped[0],
                )
            if report.dropped_xattr_count:
                log.info("layer %s: %d xattrs not applied", digest, report.dropped_xattr_count)
            for flag in report.flagged:
                log.warning("layer %s: %s; containers will refuse this image", digest, flag)
        except BaseException:
            _rmtree(tmp)
            raise
        self._remember_diff_id(digest, diff_id)
        return diff_id, report

    @contextlib.contextmanager
    def import_budget(self) -> Iterator[None]:
        """Within it, the layers unpacked together expand to at most
        ``limits.max_image_bytes`` (one image's import). Used by ``importer.import_path``
        around a whole import."""
        outer = self._image_left
        self._image_left = self.limits.max_image_bytes
        try:
            yield
        finally:
            self._image_left = outer

    @contextlib.contextmanager
    def _reserve(self, blob: Path) -> Iterator[tuple[int | None, list[int]]]:
        """Within ``import_budget``, take what the layer ``blob`` may unpack to out of what the
        image may still unpack, and give back what it did not use (the bytes the block
        appends to the list): layers unpacked by several threads (a pull's downloads) share
        the budget without over-spending it. Outside an import: (None, list). Called by
        ``_unpack``."""
        used: list[int] = []
        with self._budget_lock:
            left = self._image_left
            if left is not None:
                take = min(max(left, 0), self.limits.layer_budget(blob.stat().st_size))
                self._image_left = left - take
        if left is None:
            yield None, used
            return
        try:
            yield take, used
        finally:
            with self._budget_lock:
                if self._image_left is not None:
                    self._image_left += take - sum(used)

    def _install_snapshot(self, tmp: Path, diff_id: str) -> None:
        final = self.snapshot_path(diff_id)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or final.is_dir():
                _rmtree(tmp)  # somebody else installed it first: same content
            else:
                raise

    def add_layer_blob(
        self,
        blob: Path,
        media_type: str,
        expected_digest: str | None = None,
        *,
        expected_size: int | None = None,
        expected_diff_id: str | None = None,
    ) -> Layer:
        """Store a layer blob (verifying digest/size) and unpack it safely to its snapshot.

        Called by the importer for a rootfs tarball.
        """
        oci.layer_compression(media_type)
        with open(blob, "rb") as f:
            return self.add_layer_stream(
                f,
                media_type,
                expected_digest,
                expected_size=expected_size,
                expected_diff_id=expected_diff_id,
                what=f"layer {blob}",
            )

    def add_layer_stream(
        self,
        src: IO[bytes],
        media_type: str,
        expected_digest: str | None = None,
        *,
        expected_size: int | None = None,
        expected_diff_id: str | None = None,
        what: str = "layer",
    ) -> Layer:
        """Store a layer blob read from ``src`` and unpack it safely to its snapshot. Called by
        the importer for each layer of an OCI layout or docker-save archive (and by
        ``add_layer_blob``); the blob is verified before it is installed or unpacked."""
        oci.layer_compression(media_type)
        digest, size = self.put_blob_stream(src, expected_digest, expected_size, what)
        diff_id, _ = self._unpack(digest, media_type, expected_diff_id, what)
        return Layer(digest, diff_id, size, media_type, self.snapshot_path(diff_id))

    def add_layer_file(
        self,
        path: Path,
        media_type: str,
        expected_digest: str,
        *,
        expected_size: int,
        expected_diff_id: str,
        what: str = "layer",
    ) -> Layer:
        """Install the downloaded layer blob ``path`` (a file in this store's ``tmp/``) by
        renaming it, once its size and digest are verified, and unpack it safely to its
        snapshot; ``path`` is gone afterwards either way (a bad blob is deleted). Called by
        ``registry.pull`` for each layer it fetched."""
        self._init()
        oci.layer_compression(media_type)
        oci.check_digest(expected_digest, f"{what} digest")
        if Path(path).parent != self.tmp_dir:
            raise ImageError(f"{what}: {path} is not in the store's tmp dir {self.tmp_dir}")
        with self._new_blob() as tmp:
            os.replace(path, tmp)
            digest, size = _hash_file(tmp)
            if size != expected_size:
                raise DigestMismatch(
                    f"{what}: {size} bytes but its descriptor declares {expected_size} (size "
                    "mismatch); the image is corrupt or was tampered with"
                )
            if digest != expected_digest:
                raise DigestMismatch(
                    f"{what}: content has digest {digest} but {expected_digest} was expected "
                    "(digest mismatch); the image is corrupt or was tampered with"
                )
            existed = self.has_blob(digest)
            self._install_blob(tmp, digest)
        try:
            diff_id, _ = self._unpack(digest, media_type, expected_diff_id, what)
        except ImageError:
            if not existed:  # refused content (diff_id, unsafe entries) is not kept
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()
            raise
        return Layer(digest, diff_id, size, media_type, self.snapshot_path(diff_id))

    def layer_from_blob(
        self, digest: str, media_type: str, size: int, expected_diff_id: str, what: str
    ) -> Layer:
        """The layer of the stored blob ``digest`` (its diff_id checked against
        ``expected_diff_id``, its snapshot unpacked when missing). Called by ``registry.pull``
        for a layer already in the store, instead of fetching it again."""
        oci.layer_compression(media_type)
        if not self.has_blob(digest):
            raise ImageError(f"{what}: blob {digest} is not in the store")
        diff_id, _ = self._unpack(digest, media_type, expected_diff_id, what)
        return Layer(digest, diff_id, size, media_type, self.snapshot_path(diff_id))

    def add_layer_from_dir(
        self, src: Path, *, compression: str = "gzip", owner: tuple[int, int] | None = None
    ) -> Layer:
        """Store the directory ``src`` (a layer in overlay upper form) as a layer.

        Writes a deterministic tar, compresses it (gzip, zstd or none), stores the blob and
        installs ``src`` itself as the snapshot (renamed; the caller gives ``src`` up). When
        ``src`` is on another filesystem the blob is unpacked instead and ``src`` removed.
        Called by the builder for the output of each build step; ``owner``: every entry of
        the layer is this (uid, gid)'s (see ``write_layer_tar``).
        """
        self._init()
        src = Path(src)
        if not src.is_dir() or src.is_symlink():
            raise ImageError(f"layer source {src} is not a directory")
        media_type = oci.COMPRESSION_MEDIA_TYPE.get(compression)
        if media_type is None:
            raise ImageError(f"unknown layer compression {compression!r}; use gzip, zstd or none")
        with self._new_blob() as tmp:
            with open(tmp, "wb") as out:
                sink = _Sink(out, compression)
                write_layer_tar(src, sink, scrub=True, owner=owner)  # type: ignore[arg-type]
                sink.close()
            diff_id = "sha256:" + sink.diff.hexdigest()
            if compression in ("gzip", "zstd"):
                digest, size = _hash_file(tmp)
            else:
                digest, size = diff_id, tmp.stat().st_size
            self._install_blob(tmp, digest)
        snap = self.snapshot_path(diff_id)
        if snap.is_dir():
            _rmtree(src)
        else:
            try:
                os.rename(src, snap)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    self._unpack(digest, media_type, diff_id)
                    _rmtree(src)
                elif snap.is_dir():
                    _rmtree(src)
                else:
                    raise
        self._remember_diff_id(digest, diff_id)
        return Layer(digest, diff_id, size, media_type, snap)

    def ensure_snapshot(self, layer: Layer) -> Path:
        """Re-unpack a layer whose snapshot is missing (e.g. removed by hand). Called by
        ``resolve`` for each layer, by ``layer_cache_get`` and by the builder."""
        if not layer.snapshot.is_dir():
            if self.readonly:
                raise ImageError(
                    f"layer {layer.digest} of the store {self.root} is not unpacked, and this "
                    "store is not yours to write; ask its owner (the administrator for the "
                    "system store) to run: sandbox-kernel image ls"
                )
            if not self.has_blob(layer.digest):
                raise ImageError(
                    f"layer {layer.digest} has neither a snapshot nor a blob in {self.root}; "
                    "remove the image and import or build it again"
                )
            self._unpack(layer.digest, layer.media_type, layer.diff_id)
        return layer.snapshot

    # images --------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Has this store been made (its index exists)?"""
        return (self.oci_dir / "index.json").is_file()

    def _read_index(self) -> oci.Index:
        self._init()
        data = (self.oci_dir / "index.json").read_bytes()
        return oci.parse_index(data, f"{self.oci_dir}/index.json")

    def _write_index(self, manifests: Sequence[oci.Descriptor]) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_INDEX,
            "manifests": [d.to_json() for d in manifests],
        }
        self._atomic_write(self.oci_dir / "index.json", json.dumps(doc, indent=2).encode() + b"\n")

    def write_image(
        self,
        name: str,
        tag: str,
        layers: Sequence[Layer],
        config: ImageConfig,
        *,
        history: Sequence[str] = (),
        created: str | None = None,
    ) -> Image:
        """Write config + manifest blobs for ``layers`` and point ``name:tag`` at them.

        Called by the builder at the end of a build and by the importer for each image.
        """
        self._init()
        oci.check_name(name)
        oci.check_tag(tag)
        for layer in layers:
            if not self.has_blob(layer.digest):
                raise ImageError(
                    f"image '{name}:{tag}': layer blob {layer.digest} is not in the store; "
                    "add it with add_layer_from_dir or add_layer_blob first"
                )
            oci.check_digest(layer.diff_id, "diff_id")
            oci.layer_compression(layer.media_type)
        created = created or _now_rfc3339()
        arch = oci.host_architecture()
        cfg: dict[str, Any] = {}
        if config.env:
            cfg["Env"] = [f"{k}={v}" for k, v in config.env]
        if config.entrypoint:
            cfg["Entrypoint"] = list(config.entrypoint)
        if config.cmd:
            cfg["Cmd"] = list(config.cmd)
        if config.working_dir:
            cfg["WorkingDir"] = config.working_dir
        if config.user:
            cfg["User"] = config.user
        if config.labels:
            cfg["Labels"] = dict(config.labels)
        hist = []
        for i, h in enumerate(history):
            entry: dict[str, Any] = {"created": created, "created_by": h}
            if i >= len(layers):
                entry[HISTORY_EMPTY] = True
            hist.append(entry)
        config_doc: dict[str, Any] = {
            "created": created,
            "architecture": arch,
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
        if hist:
            config_doc["history"] = hist
        config_bytes = oci.dump_json(config_doc)
        config_digest = self.put_blob_bytes(config_bytes)
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {
                "mediaType": oci.MT_OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
            "annotations": {oci.ANNOTATION_CREATED: created},
        }
        manifest_bytes = oci.dump_json(manifest_doc)
        manifest_digest = self.put_blob_bytes(manifest_bytes)
        return self._point(
            name, tag, oci.MT_OCI_MANIFEST, manifest_digest, len(manifest_bytes), arch
        )

    def _point(
        self, name: str, tag: str, media_type: str, digest: str, size: int, arch: str
    ) -> Image:
        """Point ``name:tag`` at the stored manifest ``digest`` (replacing what it named) and
        return the image. Called by ``write_image`` and ``write_pulled_image``."""
        ref = f"{name}:{tag}"
        desc = oci.Descriptor(
            media_type,
            digest,
            size,
            {oci.ANNOTATION_REF_NAME: ref},
            {"architecture": arch, "os": "linux"},
        )
        image = self._image_from_desc(desc)  # every blob it names is stored and readable
        with self._locked():
            index = self._read_index()
            kept = [d for d in index.manifests if d.annotations.get(oci.ANNOTATION_REF_NAME) != ref]
            self._write_index([*kept, desc])
        return image

    def write_pulled_image(
        self,
        names: Sequence[tuple[str, str]],
        manifest: bytes,
        config: bytes,
        layers: Sequence[Layer],
    ) -> Image:
        """Store a registry's manifest and config exactly as they came (so the image keeps
        the registry's digest) and point each ``(name, tag)`` of ``names`` at it. The layers
        must be stored already (``add_layer_file`` / ``layer_from_blob``). Called by
        ``registry.pull`` once every blob is verified: the image becomes visible only here."""
        self._init()
        for name, tag in names:
            oci.check_name(name)
            oci.check_tag(tag)
        parsed = oci.parse_manifest(manifest, "pulled manifest")
        for layer in layers:
            if not self.has_blob(layer.digest):
                raise ImageError(f"pulled layer {layer.digest} is not in the store")
        cfg = oci.parse_config(config, "pulled config")
        if oci.sha256_digest(config) != parsed.config.digest:
            raise DigestMismatch(
                f"pulled config does not match the digest {parsed.config.digest} of its manifest"
            )
        self.put_blob_bytes(config)
        digest = self.put_blob_bytes(manifest)
        arch = cfg.architecture or oci.host_architecture()
        images = [
            self._point(name, tag, parsed.media_type, digest, len(manifest), arch)
            for name, tag in names
        ]
        return images[0]

    def _image_from_desc(self, desc: oci.Descriptor) -> Image:
        ref = desc.annotations.get(oci.ANNOTATION_REF_NAME, "")
        name, tag = oci.split_ref(ref)
        if desc.media_type not in oci.MANIFEST_TYPES:
            raise ImageError(f"image '{ref}': index entry is not a manifest ({desc.media_type})")
        manifest = oci.parse_manifest(self.read_blob(desc.digest), f"manifest of '{ref}'")
        cfg = oci.parse_config(self.read_blob(manifest.config.digest), f"config of '{ref}'")
        if len(cfg.diff_ids) != len(manifest.layers):
            raise ImageError(
                f"image '{ref}': manifest has {len(manifest.layers)} layers but the config lists "
                f"{len(cfg.diff_ids)} diff_ids; remove and rebuild the image"
            )
        layers = tuple(
            Layer(d.digest, diff, d.size, d.media_type, self.snapshot_path(diff))
            for d, diff in zip(manifest.layers, cfg.diff_ids, strict=True)
        )
        return Image(
            name=name,
            tag=tag,
            digest=desc.digest,
            config=ImageConfig.from_doc(cfg),
            layers=layers,
            created=cfg.created or manifest.annotations.get(oci.ANNOTATION_CREATED, ""),
            size=sum(layer.size for layer in layers),
        )

    def list(self) -> list[Image]:
        """Every image in the store (entries that cannot be read are logged and skipped).
        Called by ``resolve``, ``sandbox-kernel image ls`` and ``sandbox-kernel doctor``."""
        out: list[Image] = []
        for desc in self._read_index().manifests:
            if oci.ANNOTATION_REF_NAME not in desc.annotations:
                continue
            try:
                out.append(self._image_from_desc(desc))
            except ImageError as exc:
                log.warning("skipping unreadable image: %s", exc)
        out.sort(key=lambda im: (im.name, im.tag))
        return out

    def _not_found(self, ref: str) -> ImageNotFound:
        return not_found(ref, [("the store", self)])

    def resolve(self, ref: str, *, unpack: bool = True, docker_names: bool = True) -> Image:
        """'name' (tag latest), 'name:tag' or a 'sha256:' manifest digest prefix -> Image.

        A name is looked up as given first (local images such as ``python3``); when no image
        has it, and ``docker_names``, it is read as docker reads a registry reference
        (``reference.parse_reference``): ``python:2.7-slim`` finds the pulled
        ``docker.io/library/python:2.7-slim``, and ``REGISTRY/REPO@sha256:...`` the image
        pulled by that digest (a manifest's or an index's). The snapshots of the returned
        image exist (missing ones are unpacked again) unless ``unpack`` is False. Called by
        ``lookup.find`` (kernel starts, ``kernelspec add``, ``sandbox-kernel run``, ``image
        inspect``), by the exporter, and by the builder for a parent image.
        """
        return self._resolve(ref, unpack=unpack, docker_names=docker_names)

    def _resolve(self, ref: str, *, unpack: bool, docker_names: bool = True) -> Image:
        images = self.list()
        if ref.startswith("sha256:"):
            prefix = ref[len("sha256:") :]
            if not prefix or not all(c in "0123456789abcdef" for c in prefix) or len(prefix) > 64:
                raise ImageError(f"invalid digest reference {ref!r}: use sha256:<hex prefix>")
            hits = {im.digest: im for im in images if im.digest.startswith(ref)}
            if len(hits) > 1:
                raise ImageError(
                    f"digest prefix {ref!r} is ambiguous: "
                    + ", ".join(sorted(hits))
                    + "; give more digits"
                )
            if not hits:
                raise self._not_found(ref)
            image = next(iter(hits.values()))
        else:
            found = _local_matches(images, ref)
            if not found and docker_names:
                found = _reference_matches(images, ref)
            if not found:
                raise self._not_found(ref)
            image = found[0]
        if unpack:
            for layer in image.layers:
                self.ensure_snapshot(layer)
        return image

    def remove(self, ref: str, *, in_use: Callable[[Image], bool] | None = None) -> None:
        """Untag an image (blobs and snapshots are freed by ``gc``).

        ``in_use`` defaults to ``image_in_use`` (live containers found under the run dir);
        ImageInUse is raised when it says the image is used. Called by
        ``sandbox-kernel image rm``.
        """
        image = self._resolve(ref, unpack=False)
        check = in_use if in_use is not None else image_in_use
        if check(image):
            raise ImageInUse(
                f"image '{image.ref}' ({image.digest[:19]}) is used by a running container; "
                "stop the kernel/container that uses it, then remove the image"
            )
        by_digest = ref.startswith("sha256:")
        with self._locked():
            index = self._read_index()
            kept = [
                d
                for d in index.manifests
                if not (
                    d.digest == image.digest
                    if by_digest
                    else d.annotations.get(oci.ANNOTATION_REF_NAME) == image.ref
                )
            ]
            self._write_index(kept)

    def gc(self, *, grace_seconds: float = 300.0) -> tuple[int, int]:
        """Remove blobs and snapshots no image references; returns (blobs, snapshots) removed.

        Blobs and snapshots younger than ``grace_seconds`` are kept, so that the layers of a
        build in progress (stored but not yet in an image) survive a concurrent gc. Build-cache
        entries whose blob is gone are removed too. Called by ``sandbox-kernel image gc`` (and
        after ``image rm``).
        """
        self._init()
        now = time.time()
        with self._locked():
            keep_blobs, keep_snaps = self._referenced()
            blobs_removed = self._gc_blobs(keep_blobs, now, grace_seconds)
            self._gc_layer_links(keep_blobs)
            snaps_removed = self._gc_snapshots(keep_snaps, now, grace_seconds)
            self._gc_cache()
            self._gc_tmp(now, grace_seconds)
        return blobs_removed, snaps_removed

    def _referenced(self) -> tuple[set[str], set[str]]:
        """The blob hexes (manifests, configs, layers) and snapshot hexes (diff_ids) that the
        images in the index reference. Called by ``gc`` under the store lock; an image whose
        manifest or config cannot be read keeps only what was read of it (with a warning)."""
        index = self._read_index()
        keep_blobs: set[str] = set()
        keep_snaps: set[str] = set()
        for desc in index.manifests:
            keep_blobs.add(oci.digest_hex(desc.digest))
            try:
                manifest = oci.parse_manifest(self.read_blob(desc.digest))
                keep_blobs.add(oci.digest_hex(manifest.config.digest))
                cfg = oci.parse_config(self.read_blob(manifest.config.digest))
            except ImageError as exc:
                log.warning("gc: cannot read image %s: %s", desc.digest, exc)
                continue
            keep_blobs.update(oci.digest_hex(d.digest) for d in manifest.layers)
            keep_snaps.update(oci.digest_hex(d) for d in cfg.diff_ids)
        return keep_blobs, keep_snaps

    def _gc_blobs(self, keep_blobs: set[str], now: float, grace_seconds: float) -> int:
        """Remove the unreferenced blobs older than the grace period (and their diff_id link
        in ``layers/``); returns how many. Called by ``gc`` under the store lock."""
        removed = 0
        for p in self.blobs_dir.iterdir():
            if p.name not in keep_blobs and _older_than(p, now, grace_seconds):
                p.unlink()
                removed += 1
                with contextlib.suppress(FileNotFoundError):
                    (self.layers_dir / p.name).unlink()
        return removed

    def _gc_layer_links(self, keep_blobs: set[str]) -> None:
        """Remove the diff_id records in ``layers/`` whose blob is gone. Called by ``gc``
        under the store lock, after ``_gc_blobs``."""
        for p in self.layers_dir.iterdir():
            if p.name not in keep_blobs and not (self.blobs_dir / p.name).exists():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _gc_snapshots(self, keep_snaps: set[str], now: float, grace_seconds: float) -> int:
        """Remove the unreferenced snapshots older than the grace period (by mtime or ctime,
        whichever is later); returns how many. Called by ``gc`` under the store lock."""
        removed = 0
        for p in self.snapshots_dir.iterdir():
            if p.name == SNAPSHOT_FORMAT_FILE:
                continue
            if p.name not in keep_snaps and _older_than(p, now, grace_seconds, use_ctime=True):
                _rmtree(p)
                removed += 1
        return removed

    def _gc_cache(self) -> None:
        """Remove the build-cache entries that are unreadable or whose blob is gone. Called
        by ``gc`` under the store lock, after the blobs are collected."""
        for p in self.cache_dir.glob("*.json"):
            layer = self._cache_read(p)
            if layer is None or not self.has_blob(layer.digest):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _gc_tmp(self, now: float, grace_seconds: float) -> None:
        """Remove leftovers in ``tmp/`` older than the grace period and at least an hour.
        Called by ``gc`` under the store lock."""
        for p in self.tmp_dir.iterdir():
            if now - p.lstat().st_mtime > max(grace_seconds, 3600.0):
                _rmtree(p)

    # build cache ---------------------------------------------------------------------------
    def _cache_file(self, key: str) -> Path:
        return self.cache_dir / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _cache_read(self, path: Path) -> Layer | None:
        try:
            doc = oci.load_json(path.read_bytes(), f"cache entry {path}", 64 * 1024)
            digest = oci.check_digest(doc["digest"])
            diff_id = oci.check_digest(doc["diff_id"])
            size = doc["size"]
            media_type = doc["media_type"]
            if not isinstance(size, int) or not isinstance(media_type, str):
                return None
            oci.layer_compression(media_type)
        except (OSError, KeyError, ImageError):
            return None
        return Layer(digest, diff_id, size, media_type, self.snapshot_path(diff_id))

    def layer_cache_get(self, key: str) -> Layer | None:
        """The layer stored for build step ``key``, or None (also when its blob vanished).
        Called by the builder before it runs a step."""
        self._init()
        layer = self._cache_read(self._cache_file(key))
        if layer is None or not self.has_blob(layer.digest):
            return None
        try:
            self.ensure_snapshot(layer)
        except ImageError as exc:
            log.warning("build cache entry %r unusable: %s", key, exc)
            return None
        os.utime(self.blob_path(layer.digest))
        return layer

    def layer_cache_put(self, key: str, layer: Layer) -> None:
        """Remember ``layer`` as the output of build step ``key``; called by the builder after
        it ran the step."""
        self._init()
        doc = {
            "key": key,
            "digest": layer.digest,
            "diff_id": layer.diff_id,
            "size": layer.size,
            "media_type": layer.media_type,
        }
        self._atomic_write(self._cache_file(key), oci.dump_json(doc))


def _local_matches(images: Sequence[Image], ref: str) -> list[Image]:
    """The images named ``ref`` ('name' or 'name:tag') exactly; none when ``ref`` is not a
    valid NAME[:TAG]. Called by ``ImageStore._resolve``."""
    try:
        name, tag = oci.split_ref(ref)
    except ImageError:
        return []
    return [im for im in images if im.name == name and im.tag == tag]


def _reference_matches(images: Sequence[Image], ref: str) -> list[Image]:
    """The images ``ref`` names read as a registry reference (``Reference.names``): the
    pulled ``docker.io/library/python:2.7-slim`` for ``python:2.7-slim``; none when ``ref``
    is not one. Called by ``ImageStore._resolve`` after ``_local_matches`` found none."""
    try:
        parsed = parse_reference(ref)
    except ImageError:
        return []
    return [im for im in images if parsed.names(im.name, im.tag, im.digest)]


def not_found(ref: str, looked: Sequence[tuple[str, ImageStore]]) -> ImageNotFound:
    """The one "image not found" error: every store looked in (label, store), what they
    hold, and how the caller gets the image (build it when a recipe of that name exists, as
    root into the system store or into the user's own; else pull it when ``ref`` is a
    registry reference). Raised by ``ImageStore.resolve``
    and ``lookup.find``."""
    where = " and ".join(f"{label} ({store.root})" for label, store in looked)
    have = sorted({im.ref for _, store in looked if store.exists() for im in store.list()})
    pull = ""
    if not ref.startswith("sha256:"):
        with contextlib.suppress(ImageError):
            parse_reference(ref)
            pull = f"sandbox-kernel image pull {ref}"
    name = ref.split(":", 1)[0] if not ref.startswith("sha256:") else ""
    advice = ""
    if "/" in ref or "@" in ref:  # a registry reference: no recipe has such a name
        advice = f"; pull it with: {pull}" if pull else ""
    elif name and name in available_recipes():
        advice = f"; build it with: sandbox-kernel image build {name}"
        if os.geteuid() != 0 and len(looked) > 1:
            advice += " (into your store), or ask the administrator to build it as root"
    elif name:
        advice = (
            f"; there is no recipe named {name!r} either: pick one of the images there, "
            "or write a recipe (images/README.md) and build it with sandbox-kernel image build"
        )
        if pull:
            advice += f", or pull it from a registry: {pull}"
    return ImageNotFound(
        f"image '{ref}' not found in {where}; images there: {', '.join(have) or '(none)'}{advice}"
    )
