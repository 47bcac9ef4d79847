"""Export images from the store as an OCI image layout (directory or tar archive).

The result is read by skopeo (``oci:DIR:NAME:TAG``) and umoci (``--image DIR:NAME:TAG``): each
manifest descriptor in ``index.json`` carries ``org.opencontainers.image.ref.name`` =
``name:tag``. Blobs are verified against their digests while they are copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .. import beneath
from ..errors import DigestMismatch, ImageError
from . import oci
from .compression import COPY_CHUNK
from .store import Image, ImageStore

#: Where the blobs of a layout go, below its folder.
BLOBS = "blobs/sha256"


def _copy_blob(store: ImageStore, digest: str, root: str) -> None:
    """Copy one blob of the store into the layout at ``root`` (verified while copied; kept
    when a regular file of that name is there). The layout may be in a folder a kernel
    writes: every name is opened below ``root`` without following links (``beneath``), the
    blob is written to a new file and renamed over whatever had its name."""
    rel = f"{BLOBS}/{oci.digest_hex(digest)}"
    if beneath.kind(root, rel) == "a regular file":
        return
    tmp = f"{BLOBS}/.tmp-{secrets.token_hex(6)}"
    h = hashlib.sha256()
    out_fd = beneath.open_file(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(store.blob_path(digest), "rb") as src, os.fdopen(out_fd, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise DigestMismatch(
                f"store blob {store.blob_path(digest)} does not match its digest {digest}; "
                "remove the image and import or build it again"
            )
        with beneath.parent(root, rel) as (dfd, name):
            os.replace(tmp.rsplit("/", 1)[1], name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        with contextlib.suppress(OSError), beneath.parent(root, tmp) as (dfd, name):
            os.unlink(name, dir_fd=dfd)


def _write_layout(store: ImageStore, images: Sequence[Image], dest: Path) -> None:
    """Write (or add to) the OCI layout folder ``dest``; names below it are never followed
    (``beneath``), an ``index.json`` there is read bounded, regular files only."""
    dest.mkdir(parents=True, exist_ok=True)
    root = str(dest)
    beneath.make_folders(root, BLOBS)
    beneath.write_bytes(
        root, "oci-layout", oci.dump_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION})
    )
    existing: list[oci.Descriptor] = []
    if beneath.kind(root, "index.json") is not None:
        raw = beneath.read_bytes(root, "index.json", limit=oci.MAX_JSON_BYTES)
        existing = list(oci.parse_index(raw, str(dest / "index.json")).manifests)
    new_refs = {im.ref for im in images}
    manifests = [
        d.to_json() for d in existing if d.annotations.get(oci.ANNOTATION_REF_NAME) not in new_refs
    ]
    for im in images:
        manifest_bytes = store.read_blob(im.digest)
        manifest = oci.parse_manifest(manifest_bytes)
        for digest in (im.digest, manifest.config.digest, *(ld.digest for ld in manifest.layers)):
            _copy_blob(store, digest, root)
        manifests.append(
            {
                "mediaType": manifest.media_type,
                "digest": im.digest,
                "size": len(manifest_bytes),
                "annotations": {oci.ANNOTATION_REF_NAME: im.ref},
            }
        )
    doc = {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": manifests}
    beneath.write_bytes(root, "index.json", json.dumps(doc, indent=2).encode() + b"\n")


def _tar_dir(src: Path, out: Path) -> None:
    """Pack the layout folder ``src`` into the tar ``out`` (written to a new file, renamed
    over the name): regular files and folders only, each opened below ``src`` without
    following links, in sorted order."""
    root = str(src)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            files: list[str] = []
            folders = [""]
            while folders:
                here = folders.pop()
                if len(files) + len(folders) > beneath.COPY_MAX_ENTRIES:
                    raise ImageError(f"{src} holds more than {beneath.COPY_MAX_ENTRIES} entries")
                for name in beneath.list_folder(root, here or "."):
                    rel = f"{here}/{name}" if here else name
                    what = beneath.kind(root, rel)
                    if what == "a folder":
                        folders.append(rel)
                    elif what == "a regular file":
                        files.append(rel)
            for rel in sorted(files):
                _add_file(tf, root, rel)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _add_file(tf: tarfile.TarFile, root: str, rel: str) -> None:
    """One regular file of the layout into the tar, read through its descriptor."""
    fd = beneath.open_file(root, rel)
    with os.fdopen(fd, "rb") as f:
        ti = tarfile.TarInfo(rel)
        ti.size = os.fstat(f.fileno()).st_size
        ti.mtime = int(os.fstat(f.fileno()).st_mtime)
        ti.mode = 0o644
        tf.addfile(ti, f)


def export_images(store: ImageStore, refs: Sequence[str], dest: Path) -> list[Image]:
    """Export the images ``refs`` to ``dest``: an OCI layout directory, or a tar if it ends
    in ``.tar``. An existing layout directory is added to (same name:tag replaced); a link,
    FIFO or other special file inside it is never followed (ImageError naming it). Called
    by ``sandbox-kernel image export``."""
    dest = Path(dest)
    images = [store.resolve(r, unpack=False) for r in refs]
    try:
        if dest.name.endswith(".tar"):
            work = dest.with_name(f".{dest.name}.layout-{secrets.token_hex(4)}")
            try:
                work.mkdir()
                _write_layout(store, images, work)
                _tar_dir(work, dest)
            finally:
                shutil.rmtree(work, ignore_errors=True)  # rmtree never follows links
            return images
        if dest.exists():
            if not dest.is_dir():
                raise ImageError(
                    f"{dest} exists and is not a directory; choose another export path"
                )
            if any(dest.iterdir()) and beneath.kind(str(dest), "oci-layout") != "a regular file":
                raise ImageError(
                    f"{dest} is a non-empty directory that is not an OCI layout; choose an "
                    "empty or new directory (or a path ending in .tar)"
                )
        _write_layout(store, images, dest)
    except beneath.Refused as e:
        raise ImageError(
            f"cannot export into {dest}: {e}, which the exporter does not follow; remove it "
            "or export to a new directory"
        ) from None
    return images
