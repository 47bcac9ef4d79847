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

from ..errors import DigestMismatch, ImageError
from . import oci
from .compression import COPY_CHUNK
from .store import Image, ImageStore


def _copy_blob(store: ImageStore, digest: str, blobs: Path) -> None:
    dst = blobs / oci.digest_hex(digest)
    if dst.exists():
        return
    tmp = blobs / f".tmp-{secrets.token_hex(6)}"
    h = hashlib.sha256()
    try:
        with open(store.blob_path(digest), "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise DigestMismatch(
                f"store blob {store.blob_path(digest)} does not match its digest {digest}; "
                "remove the image and import or build it again"
            )
        os.replace(tmp, dst)
    except FileNotFoundError:
        raise ImageError(f"blob {digest} is missing from the store; rebuild the image") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_layout(store: ImageStore, images: Sequence[Image], dest: Path) -> None:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_bytes(oci.dump_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION}))
    index_path = dest / "index.json"
    existing: list[oci.Descriptor] = []
    if index_path.exists():
        existing = list(oci.parse_index(index_path.read_bytes(), str(index_path)).manifests)
    new_refs = {im.ref for im in images}
    manifests = [
        d.to_json() for d in existing if d.annotations.get(oci.ANNOTATION_REF_NAME) not in new_refs
    ]
    for im in images:
        manifest_bytes = store.read_blob(im.digest)
        manifest = oci.parse_manifest(manifest_bytes)
        for digest in (im.digest, manifest.config.digest, *(ld.digest for ld in manifest.layers)):
            _copy_blob(store, digest, blobs)
        manifests.append(
            {
                "mediaType": manifest.media_type,
                "digest": im.digest,
                "size": len(manifest_bytes),
                "annotations": {oci.ANNOTATION_REF_NAME: im.ref},
            }
        )
    doc = {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": manifests}
    tmp = dest / f".index.json.tmp-{secrets.token_hex(4)}"
    tmp.write_bytes(json.dumps(doc, indent=2).encode() + b"\n")
    os.replace(tmp, index_path)


def _tar_dir(src: Path, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel = os.path.relpath(dirpath, src)
                for name in sorted(filenames):
                    arc = name if rel == "." else f"{rel}/{name}"
                    ti = tf.gettarinfo(os.path.join(dirpath, name), arcname=arc)
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    ti.mode = 0o644
                    with open(os.path.join(dirpath, name), "rb") as f:
                        tf.addfile(ti, f)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def export_images(store: ImageStore, refs: Sequence[str], dest: Path) -> list[Image]:
    """Export the images ``refs`` to ``dest``: an OCI layout directory, or a tar if it ends
    in ``.tar``. An existing layout directory is added to (same name:tag replaced). Called by
    ``sandbox-kernel image export``."""
    dest = Path(dest)
    images = [store.resolve(r, unpack=False) for r in refs]
    if dest.name.endswith(".tar"):
        work = dest.with_name(f".{dest.name}.layout-{secrets.token_hex(4)}")
        try:
            _write_layout(store, images, work)
            _tar_dir(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return images
    if dest.exists():
        if not dest.is_dir():
            raise ImageError(f"{dest} exists and is not a directory; choose another export path")
        if any(dest.iterdir()) and not (dest / "oci-layout").is_file():
            raise ImageError(
                f"{dest} is a non-empty directory that is not an OCI layout; choose an empty or "
                "new directory (or a path ending in .tar)"
            )
    _write_layout(store, images, dest)
    return images
