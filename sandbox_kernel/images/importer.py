"""Import images into the store.

Accepted inputs (detected automatically):

* an OCI image layout directory (has ``oci-layout``), e.g. from ``skopeo copy ... oci:DIR`` or
  ``umoci``; nested indexes are followed to the manifest for linux/<host architecture>;
* an OCI image layout as a tar archive;
* a ``docker save`` archive (``manifest.json`` with Config / RepoTags / Layers);
* a plain root filesystem tarball (tar, tar+gzip or tar+zstd), imported as a one-layer image.

Every blob is verified (size and digest) as it is copied in, every layer's uncompressed content
is checked against the config's diff_id, and layers are unpacked with the safe extractor.
Imported images get a manifest and config written by this store (the original config's Env,
Entrypoint, Cmd, WorkingDir, User, Labels and history are kept), so the manifest digest differs
from the source's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import DigestMismatch, ImageError, UnsafeArchiveError
from . import oci
from .compression import compression_of, sniff_compression, unsupported_compression
from .store import Image, ImageConfig, ImageStore, Layer

log = logging.getLogger(__name__)

MAX_ARCHIVE_MEMBERS = 200_000
DEFAULT_ENV = (("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),)

Opener = Callable[[str], IO[bytes]]


def ref_to_name_tag(ref: str, what: str) -> tuple[str, str]:
    """'docker.io/library/python:3.11' -> ('python', '3.11'); 'foo' -> ('foo', 'latest').

    The importer names images with it from the ref annotations, RepoTags or file names it finds.
    """
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    name, sep, tag = last.partition(":")
    try:
        return oci.check_name(name.lower()), oci.check_tag(tag if sep else "latest")
    except ImageError as exc:
        raise ImageError(
            f"{what}: cannot use reference {ref!r} as a name ({exc}); pass --name"
        ) from None


def _read_bounded(f: IO[bytes], what: str, limit: int = oci.MAX_JSON_BYTES) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeArchiveError(
            f"{what} is over the {limit}-byte limit for JSON documents; refusing to parse it"
        )
    return data


# --- sources -----------------------------------------------------------------------------------


class _DirSource:
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, rel: str) -> IO[bytes]:
        path = self.root / rel
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"{path} is missing; the image layout is incomplete") from None
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from None
        return os.fdopen(fd, "rb", buffering=1 << 20)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()


class _TarSource:
    """Random access to the members of an (uncompressed) tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
            self.members: dict[str, tarfile.TarInfo] = {}
            for i, m in enumerate(self.tf):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise UnsafeArchiveError(
                        f"{path}: more than {MAX_ARCHIVE_MEMBERS} entries in an image archive"
                    )
                self.members[self._norm(m.name)] = m
        except tarfile.TarError as exc:
            raise ImageError(f"{path} is not a readable tar archive ({exc})") from None

    @staticmethod
    def _norm(name: str) -> str:
        return "/".join(c for c in name.split("/") if c not in ("", "."))

    def exists(self, rel: str) -> bool:
        m = self.members.get(self._norm(rel))
        return m is not None and (m.isfile() or m.issym() or m.islnk())

    def open(self, rel: str) -> IO[bytes]:
        m = self.members.get(self._norm(rel))
        if m is None:
            raise ImageError(f"{self.path}: member {rel!r} is missing; the archive is incomplete")
        try:
            f = self.tf.extractfile(m)
        except (tarfile.TarError, KeyError, RecursionError) as exc:
            raise ImageError(f"{self.path}: cannot read member {rel!r} ({exc})") from None
        if f is None:
            raise ImageError(f"{self.path}: member {rel!r} is not a file")
        return f

    def close(self) -> None:
        self.tf.close()


Source = _DirSource | _TarSource


# --- OCI layout --------------------------------------------------------------------------------


@dataclass
class _Found:
    desc: oci.Descriptor
    ref: str | None


def _read_blob(src: Source, desc: oci.Descriptor, what: str) -> bytes:
    if desc.size > oci.MAX_JSON_BYTES:
        raise UnsafeArchiveError(
            f"{what} {desc.digest} declares {desc.size} bytes, over the "
            f"{oci.MAX_JSON_BYTES}-byte limit for JSON documents"
        )
    with src.open(f"blobs/sha256/{oci.digest_hex(desc.digest)}") as f:
        data = _read_bounded(f, what)
    if len(data) != desc.size:
        raise DigestMismatch(
            f"{what} {desc.digest}: {len(data)} bytes but its descriptor declares {desc.size} "
            "(size mismatch)"
        )
    if oci.sha256_digest(data) != desc.digest:
        raise DigestMismatch(f"{what}: content does not match its digest {desc.digest}")
    return data


def _pick_manifests(src: Source, index: oci.Index, depth: int = 0) -> list[_Found]:
    arch = oci.host_architecture()
    out: list[_Found] = []
    for d in index.manifests:
        ref = d.annotations.get(oci.ANNOTATION_REF_NAME) or d.annotations.get(
            "io.containerd.image.name"
        )
        if d.media_type in oci.INDEX_TYPES:
            if depth >= 2:
                raise UnsafeArchiveError("image indexes nested more than 2 deep; refused")
            sub = oci.parse_index(_read_blob(src, d, "nested index"), f"index {d.digest}")
            candidates = [
                m
                for m in sub.manifests
                if m.media_type in oci.MANIFEST_TYPES
                and (
                    m.platform is None
                    or (m.platform.get("os") == "linux" and m.platform.get("architecture") == arch)
                )
            ]
            if not candidates:
                raise ImageError(
                    f"index {d.digest} ({ref or 'unnamed'}) has no manifest for linux/{arch}"
                )
            out.append(_Found(candidates[0], ref))
        elif d.media_type in oci.MANIFEST_TYPES:
            plat = d.platform
            if plat and plat.get("architecture") not in (None, arch):
                log.info("skipping %s for %s", d.digest, plat.get("architecture"))
                continue
            out.append(_Found(d, ref))
        else:
            raise UnsafeArchiveError(
                f"index.json entry {d.digest} has media type {d.media_type!r}, which is neither "
                "a manifest nor an index (media-type confusion)"
            )
    return out


def _import_manifest(
    store: ImageStore, src: Source, desc: oci.Descriptor, name: str, tag: str
) -> Image:
    if desc.media_type not in oci.MANIFEST_TYPES:
        raise UnsafeArchiveError(
            f"'{name}:{tag}': descriptor {desc.digest} is {desc.media_type!r}, not a manifest "
            "(media-type confusion)"
        )
    manifest = oci.parse_manifest(_read_blob(src, desc, "manifest"), f"manifest {desc.digest}")
    cfg = oci.parse_config(_read_blob(src, manifest.config, "config"), "image config")
    if len(cfg.diff_ids) != len(manifest.layers):
        raise ImageError(
            f"'{name}:{tag}': manifest has {len(manifest.layers)} layers but the config lists "
            f"{len(cfg.diff_ids)} diff_ids; the image is corrupt"
        )
    if cfg.os and cfg.os != "linux":
        raise ImageError(f"'{name}:{tag}' is an image for {cfg.os!r}, not linux")
    layers: list[Layer] = []
    for i, (ld, diff_id) in enumerate(zip(manifest.layers, cfg.diff_ids, strict=True)):
        with src.open(f"blobs/sha256/{oci.digest_hex(ld.digest)}") as f:
            layers.append(
                store.add_layer_stream(
                    f,
                    ld.media_type,
                    ld.digest,
                    expected_size=ld.size,
                    expected_diff_id=diff_id,
                    what=f"'{name}:{tag}' layer {i} ({ld.digest})",
                )
            )
    return _write(store, name, tag, layers, cfg)


def _write(
    store: ImageStore, name: str, tag: str, layers: list[Layer], cfg: oci.ConfigDoc
) -> Image:
    return store.write_image(
        name,
        tag,
        layers,
        ImageConfig.from_doc(cfg),
        history=cfg.history,
        created=cfg.created or None,
    )


def _import_oci(
    store: ImageStore, src: Source, where: str, name: str | None, tag: str | None
) -> list[Image]:
    with src.open("index.json") as f:
        index = oci.parse_index(_read_bounded(f, f"{where}/index.json"), f"{where}/index.json")
    found = _pick_manifests(src, index)
    if not found:
        raise ImageError(f"{where}: the image layout holds no image for this platform")
    if name is not None:
        if len(found) > 1:
            wanted = [f for f in found if f.ref and ref_to_name_tag(f.ref, where)[0] == name]
            if tag is not None:
                wanted = [f for f in wanted if f.ref and ref_to_name_tag(f.ref, where)[1] == tag]
            if len(wanted) != 1:
                refs = ", ".join(sorted(f.ref or f.desc.digest for f in found))
                raise ImageError(
                    f"{where} holds several images ({refs}); --name must pick exactly one"
                )
            found = wanted
        return [_import_manifest(store, src, found[0].desc, name, tag or "latest")]
    images = []
    for fnd in found:
        if not fnd.ref:
            raise ImageError(
                f"{where}: manifest {fnd.desc.digest} has no "
                f"{oci.ANNOTATION_REF_NAME} annotation; pass --name NAME[:TAG]"
            )
        n, t = ref_to_name_tag(fnd.ref, where)
        images.append(_import_manifest(store, src, fnd.desc, n, t))
    return images


# --- docker save -------------------------------------------------------------------------------


def _import_docker(
    store: ImageStore, src: _TarSource, where: str, name: str | None, tag: str | None
) -> list[Image]:
    """Import every image of the docker-save archive ``src`` (``name``/``tag`` rename a single
    one). Called by ``import_path`` for a tar with a ``manifest.json``."""
    entries = _docker_manifest(src, where)
    if name is not None and len(entries) > 1:
        raise ImageError(f"{where} holds {len(entries)} images; --name needs a single image")
    return [_import_docker_entry(store, src, where, e, name, tag) for e in entries]


def _docker_manifest(src: _TarSource, where: str) -> list[object]:
    """The entries of the archive's ``manifest.json`` (a non-empty JSON list, not yet checked
    further). Called by ``_import_docker``."""
    with src.open("manifest.json") as f:
        raw = _read_bounded(f, f"{where}: manifest.json")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: manifest.json must be a non-empty list (docker save format)")
    return entries


def _import_docker_entry(
    store: ImageStore,
    src: _TarSource,
    where: str,
    e: object,
    name: str | None,
    tag: str | None,
) -> Image:
    """Import the image that one ``manifest.json`` entry ``e`` describes: its config
    (verified against the digest in its file name), its name and tag, then its layers.
    Called by ``_import_docker`` for each entry, in order."""
    if not isinstance(e, dict):
        raise ImageError(f"{where}: manifest.json entries must be objects")
    cfg_name, layer_names, tags = e.get("Config"), e.get("Layers"), e.get("RepoTags") or []
    if not isinstance(cfg_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{where}: manifest.json entry lacks Config or Layers")
    cfg = _docker_config(src, where, cfg_name)
    if len(cfg.diff_ids) != len(layer_names):
        raise ImageError(
            f"{where}: {len(layer_names)} layers but the config lists "
            f"{len(cfg.diff_ids)} diff_ids; the archive is corrupt"
        )
    if name is not None:
        n, t = name, tag or "latest"
    elif tags and isinstance(tags[0], str):
        n, t = ref_to_name_tag(tags[0], where)
    else:
        raise ImageError(f"{where}: image {cfg_name} has no RepoTags; pass --name NAME[:TAG]")
    layers = [
        _docker_layer(store, src, where, i, lname, diff_id)
        for i, (lname, diff_id) in enumerate(zip(layer_names, cfg.diff_ids, strict=True))
    ]
    return _write(store, n, t, layers, cfg)


def _docker_config(src: _TarSource, where: str, cfg_name: str) -> oci.ConfigDoc:
    """The image config ``cfg_name`` of the archive, parsed; DigestMismatch when its file
    name is a sha256 hex that its content does not match. Called by ``_import_docker_entry``."""
    with src.open(cfg_name) as f:
        cfg_bytes = _read_bounded(f, f"{where}: {cfg_name}")
    stem = Path(cfg_name).name.removesuffix(".json")
    if oci.is_hex64(stem) and oci.sha256_digest(cfg_bytes) != f"sha256:{stem}":
        raise DigestMismatch(f"{where}: {cfg_name} does not match the digest in its name")
    return oci.parse_config(cfg_bytes, f"{where}: {cfg_name}")


def _docker_layer(
    store: ImageStore, src: _TarSource, where: str, i: int, lname: object, diff_id: str
) -> Layer:
    """Store layer ``i`` (archive member ``lname``), its compression sniffed from its first
    bytes and its content checked against ``diff_id``. Called by ``_import_docker_entry`` for
    each layer, in order."""
    if not isinstance(lname, str):
        raise ImageError(f"{where}: layer names must be strings")
    with src.open(lname) as f:
        head = f.read(4)
    comp = compression_of(head)
    mt = oci.COMPRESSION_MEDIA_TYPE[comp]
    with src.open(lname) as f:
        return store.add_layer_stream(
            f, mt, expected_diff_id=diff_id, what=f"{where}: layer {i} ({lname})"
        )


# --- rootfs tarball ----------------------------------------------------------------------------


def _import_rootfs(store: ImageStore, path: Path, name: str | None, tag: str | None) -> Image:
    if name is None:
        stem = path.name
        for suffix in (".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tar"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        name, tag = ref_to_name_tag(stem, str(path))
    mt = oci.COMPRESSION_MEDIA_TYPE[sniff_compression(path)]
    layer = store.add_layer_blob(path, mt)
    return store.write_image(
        name,
        tag or "latest",
        [layer],
        ImageConfig(env=DEFAULT_ENV),
        history=[f"import {path.name}"],
    )


# --- entry point -------------------------------------------------------------------------------


@contextlib.contextmanager
def _tar_source(path: Path) -> Iterator[_TarSource]:
    src = _TarSource(path)
    try:
        yield src
    finally:
        src.close()


def import_path(store: ImageStore, path: Path, name_ref: str | None = None) -> list[Image]:
    """Import the image(s) at ``path``; ``name_ref`` ('NAME' or 'NAME:TAG') renames it.

    Called by ``sandbox-kernel image import``: an OCI layout (directory or tar), a docker-save
    tar or a rootfs tarball; every layer goes through the safe extractor.
    """
    with store.import_budget():
        return _import_path(store, Path(path), name_ref)


def _import_path(store: ImageStore, path: Path, name_ref: str | None) -> list[Image]:
    name: str | None = None
    tag: str | None = None
    if name_ref is not None:
        name, _, t = name_ref.partition(":")
        oci.check_name(name)
        tag = oci.check_tag(t) if t else None
    if path.is_dir():
        if not (path / "oci-layout").is_file():
            raise ImageError(
                f"{path} is a directory but not an OCI image layout (no oci-layout file); "
                "give an OCI layout directory or a tar archive"
            )
        return _import_oci(store, _DirSource(path), str(path), name, tag)
    if not path.is_file():
        raise ImageError(f"{path} does not exist; give an OCI layout, docker-save or rootfs tar")
    unsupported = unsupported_compression(path)
    if unsupported:
        raise ImageError(unsupported)
    if sniff_compression(path) != "none":
        return [_import_rootfs(store, path, name, tag)]
    with _tar_source(path) as src:
        if src.exists("oci-layout") and src.exists("index.json"):
            return _import_oci(store, src, str(path), name, tag)
        if src.exists("manifest.json"):
            return _import_docker(store, src, str(path), name, tag)
    return [_import_rootfs(store, path, name, tag)]
