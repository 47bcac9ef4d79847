"""OCI image-spec facts: digests, media types, and strict parsing of index / manifest / config.

Everything here treats its input as hostile: JSON documents are size-bounded before they are
parsed, digests are checked against ``sha256:[0-9a-f]{64}`` before any path is built from them,
and media types are checked so that an index cannot pose as a manifest (or a config as a layer).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError, UnsafeArchiveError

# --- media types -------------------------------------------------------------------------------

OCI_LAYOUT_VERSION = "1.0.0"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MT_OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MT_OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
MT_DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MT_OCI_CONFIG, MT_DOCKER_CONFIG})

_LAYER_COMPRESSION: dict[str, str] = {
    MT_OCI_LAYER_TAR: "none",
    MT_OCI_LAYER_GZIP: "gzip",
    MT_OCI_LAYER_ZSTD: "zstd",
    MT_OCI_LAYER_ND_TAR: "none",
    MT_OCI_LAYER_ND_GZIP: "gzip",
    MT_OCI_LAYER_ND_ZSTD: "zstd",
    MT_DOCKER_LAYER_TAR: "none",
    MT_DOCKER_LAYER_GZIP: "gzip",
    MT_DOCKER_LAYER_ZSTD: "zstd",
    MT_DOCKER_FOREIGN_GZIP: "gzip",
}
LAYER_TYPES = frozenset(_LAYER_COMPRESSION)

COMPRESSION_MEDIA_TYPE = {
    "none": MT_OCI_LAYER_TAR,
    "gzip": MT_OCI_LAYER_GZIP,
    "zstd": MT_OCI_LAYER_ZSTD,
}

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"

# Bound on any JSON document (index, manifest, config) read from an archive or the store.
MAX_JSON_BYTES = 4 * 1024 * 1024

# --- digests -----------------------------------------------------------------------------------

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: object, what: str = "digest") -> str:
    """Return ``digest`` if it is exactly ``sha256:<64 lowercase hex>``; else raise ImageError.

    Call this before building any path from a digest.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        shown = digest if isinstance(digest, str) and len(digest) < 200 else type(digest).__name__
        raise UnsafeArchiveError(
            f"invalid {what} {shown!r}: only 'sha256:' followed by 64 lowercase hex digits is "
            "accepted; re-create the image with a tool that writes sha256 digests"
        )
    return digest


def digest_hex(digest: str) -> str:
    """The 64-hex part of a validated digest (validates first)."""
    return check_digest(digest)[len("sha256:") :]


def is_hex64(s: str) -> bool:
    """True for exactly 64 lowercase hex digits. The store checks the diff_ids it remembers
    with it, the importer the digest-like names of docker-save config files."""
    return bool(_HEX_RE.fullmatch(s))


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``. The store names and verifies small blobs (manifests,
    configs) with it; the importer verifies the blobs it reads from an archive."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_compression(media_type: str) -> str:
    """'none', 'gzip' or 'zstd' for a layer media type; UnsafeArchiveError for anything else.

    The store calls it to refuse a non-layer media type before it stores or unpacks a blob.
    """
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsafeArchiveError(
            f"media type {media_type!r} is not a layer type; accepted layer types: "
            + ", ".join(sorted(LAYER_TYPES))
        ) from None


# --- names -------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


# A registry reference's name (docker's grammar): an optional registry host[:port], then
# path components of lowercase letters and digits joined by '.', '_', '__' or dashes.
_REF_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REF_HOST = rf"(?:{_REF_LABEL}(?:\.{_REF_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
_REF_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF_NAME_RE = re.compile(rf"^(?:{_REF_HOST}/)?{_REF_COMPONENT}(?:/{_REF_COMPONENT})*$")
MAX_REF_NAME = 255


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid image name; else raise ImageError. Called by the store
    before it writes an image and by the importer for names given or found in an archive.

    A name is either local (``python2.7``) or, with a '/', a registry reference's full name
    (``docker.io/library/python``, ``127.0.0.1:5000/course/python``) as ``image pull`` stores
    it."""
    if "/" in name:
        if len(name) <= MAX_REF_NAME and _REF_NAME_RE.fullmatch(name):
            return name
        raise ImageError(
            f"invalid image name {name!r}: use [REGISTRY[:PORT]/]PATH with lowercase path "
            "components (e.g. registry.example.edu/course/python)"
        )
    if not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise ImageError(
            f"invalid image name {name!r}: use lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. python2.7)"
        )
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid image tag; else raise ImageError. Called where
    ``check_name`` is."""
    if not _TAG_RE.fullmatch(tag):
        raise ImageError(
            f"invalid image tag {tag!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "not starting with '.' or '-' (e.g. latest)"
        )
    return tag


def split_ref(ref: str, default_tag: str = "latest") -> tuple[str, str]:
    """'name' -> (name, default_tag); 'name:tag' -> (name, tag); both validated. The store
    uses it to resolve a reference and to read the name of each index entry."""
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):  # a tag is after the last '/' (a registry's port is before it)
        return check_name(ref[:colon]), check_tag(ref[colon + 1 :])
    return check_name(ref), check_tag(default_tag)


# --- JSON --------------------------------------------------------------------------------------


def load_json(data: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a bounded JSON object; UnsafeArchiveError if oversized, ImageError if malformed.

    The parsers below call it for every document; the store for its build-cache entries.
    """
    if len(data) > max_bytes:
        raise UnsafeArchiveError(
            f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit for JSON documents; "
            "refusing to parse it (a hostile or corrupt image)"
        )
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{what} is not valid JSON ({exc}); re-export the image") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what} must be a JSON object, not {type(obj).__name__}")
    return obj


def dump_json(obj: object) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same object always has the same digest.

    The store writes configs, manifests and cache entries with it; the exporter its layout.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- documents ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: a blob's media type, digest and size, with annotations and
    platform. Parsed from indexes and manifests by ``parse_descriptor``; the store writes one
    per image (annotated with its ``name:tag``) into its ``index.json``."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a JSON object, as the store and the exporter write it into an
        ``index.json``."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


def _str_map(obj: object, what: str) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        raise ImageError(f"{what} must be an object of strings")
    return dict(obj)


def parse_descriptor(obj: object, what: str) -> Descriptor:
    """Parse one descriptor of an index or a manifest (``what`` names it in errors); the digest
    is validated. Called by ``parse_index`` and ``parse_manifest`` for each entry."""
    if not isinstance(obj, dict):
        raise ImageError(f"{what} must be a JSON object (an OCI descriptor)")
    mt = obj.get("mediaType")
    size = obj.get("size")
    if not isinstance(mt, str) or not mt:
        raise ImageError(f"{what} has no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what} has an invalid size {size!r}; it must be a non-negative integer")
    digest = check_digest(obj.get("digest"), f"{what} digest")
    platform = obj.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ImageError(f"{what} platform must be an object")
    return Descriptor(
        mt, digest, size, _str_map(obj.get("annotations"), f"{what} annotations"), platform
    )


@dataclass(frozen=True)
class Index:
    """A parsed image index (``parse_index``): its manifest descriptors and annotations."""

    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str]


def _check_schema_version(obj: dict[str, Any], what: str) -> None:
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"{what}: schemaVersion must be 2, got {obj.get('schemaVersion')!r}")


def _check_media_type(
    mt: object, accepted: frozenset[str], kind: str, expected: str, what: str
) -> None:
    if mt not in accepted:
        raise UnsafeArchiveError(
            f"{what}: mediaType {mt!r} is not an image {kind} (media-type confusion); "
            f"expected {expected}"
        )


def _descriptors(obj: dict[str, Any], key: str, limit: int, what: str) -> tuple[Descriptor, ...]:
    """The descriptors of the list ``obj[key]`` (at most ``limit`` of them)."""
    items = obj.get(key)
    if not isinstance(items, list):
        raise ImageError(f"{what}: '{key}' must be a list")
    if len(items) > limit:
        raise UnsafeArchiveError(f"{what}: {len(items)} {key} is over the limit ({limit})")
    return tuple(parse_descriptor(x, f"{what} {key}[{i}]") for i, x in enumerate(items))


def parse_index(data: bytes, what: str = "index.json") -> Index:
    """Parse an image index (``index.json`` of a layout, or a nested index); a document of
    another media type is refused. Called by the store for its own index on every read, by
    the importer for an OCI layout's index and the nested indexes it names, and by the
    exporter for the index of a layout it adds to."""
    obj = load_json(data, what)
    _check_schema_version(obj, what)
    mt = obj.get("mediaType")
    if mt is not None:
        _check_media_type(mt, INDEX_TYPES, "index", MT_OCI_INDEX, what)
    descs = _descriptors(obj, "manifests", 100_000, what)
    return Index(descs, _str_map(obj.get("annotations"), f"{what} annotations"))


@dataclass(frozen=True)
class Manifest:
    """A parsed image manifest (``parse_manifest``): its config and layer descriptors."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]


def parse_manifest(data: bytes, what: str = "manifest") -> Manifest:
    """Parse an image manifest; an index, a config or a layer posing as a manifest is refused.

    Called by the store for each image it reads (and by gc), by the importer for each image
    it imports and by the exporter for each image it exports.
    """
    obj = load_json(data, what)
    mt = obj.get("mediaType", MT_OCI_MANIFEST)
    if mt in INDEX_TYPES or "manifests" in obj:
        raise UnsafeArchiveError(
            f"{what} is an image index where an image manifest was expected (media-type confusion)"
        )
    if "rootfs" in obj:
        raise UnsafeArchiveError(
            f"{what} is an image config where an image manifest was expected (media-type confusion)"
        )
    _check_schema_version(obj, what)
    _check_media_type(mt, MANIFEST_TYPES, "manifest", MT_OCI_MANIFEST, what)
    config = parse_descriptor(obj.get("config"), f"{what} config")
    if config.media_type not in CONFIG_TYPES:
        raise UnsafeArchiveError(
            f"{what}: config mediaType {config.media_type!r} is not an image config "
            f"(media-type confusion); expected {MT_OCI_CONFIG}"
        )
    layers = _descriptors(obj, "layers", 500, what)
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise UnsafeArchiveError(
                f"{what}: layers[{i}] mediaType {layer.media_type!r} is not a layer type "
                "(media-type confusion); accepted: " + ", ".join(sorted(LAYER_TYPES))
            )
    return Manifest(mt, config, layers, _str_map(obj.get("annotations"), f"{what} annotations"))


@dataclass(frozen=True)
class ConfigDoc:
    """The parts of an image config this product uses, as ``parse_config`` returns them; the
    store's ``ImageConfig.from_doc`` keeps the runtime part."""

    env: tuple[tuple[str, str], ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    user: str
    labels: tuple[tuple[str, str], ...]
    diff_ids: tuple[str, ...]
    created: str
    history: tuple[str, ...]
    architecture: str
    os: str


def _str_list(obj: object, what: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
        raise ImageError(f"{what} must be a list of strings")
    return tuple(obj)


def parse_config(data: bytes, what: str = "image config") -> ConfigDoc:
    """Parse an image config; a manifest or index posing as one is refused and diff_ids are
    validated. Called by the store for each image it reads (and by gc) and by the importer
    for each image it imports."""
    obj = load_json(data, what)
    if "layers" in obj or "manifests" in obj:
        raise UnsafeArchiveError(
            f"{what} looks like a manifest or index, not an image config (media-type confusion)"
        )
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{what}: rootfs.type must be 'layers'")
    diff_ids = _str_list(rootfs.get("diff_ids"), f"{what} rootfs.diff_ids")
    for d in diff_ids:
        check_digest(d, f"{what} diff_id")
    cfg = obj.get("config") or {}
    if not isinstance(cfg, dict):
        raise ImageError(f"{what}: 'config' must be an object")
    env: list[tuple[str, str]] = []
    for item in _str_list(cfg.get("Env"), f"{what} config.Env"):
        k, _, v = item.partition("=")
        env.append((k, v))
    labels = _str_map(cfg.get("Labels"), f"{what} config.Labels")
    history: list[str] = []
    hist = obj.get("history") or []
    if isinstance(hist, list):
        for h in hist:
            if isinstance(h, dict) and isinstance(h.get("created_by"), str):
                history.append(h["created_by"])
    created = obj.get("created")
    wd = cfg.get("WorkingDir")
    user = cfg.get("User")
    arch = obj.get("architecture")
    os_ = obj.get("os")
    return ConfigDoc(
        env=tuple(env),
        entrypoint=_str_list(cfg.get("Entrypoint"), f"{what} config.Entrypoint"),
        cmd=_str_list(cfg.get("Cmd"), f"{what} config.Cmd"),
        working_dir=wd if isinstance(wd, str) and wd else "/",
        user=user if isinstance(user, str) else "",
        labels=tuple(sorted(labels.items())),
        diff_ids=diff_ids,
        created=created if isinstance(created, str) else "",
        history=tuple(history),
        architecture=arch if isinstance(arch, str) else "",
        os=os_ if isinstance(os_, str) else "",
    )


def host_architecture() -> str:
    """The host's architecture in OCI (GOARCH) spelling. The store writes it into the configs
    it makes; the importer imports only the manifests for it."""
    import platform

    m = platform.machine().lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "i686": "386",
        "i386": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(m, m)
