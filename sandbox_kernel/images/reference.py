"""Image references as docker reads them (``[REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST]``).

Layer: images. The one parser of a registry reference: ``registry.pull`` and ``push`` use it
to know where to go, and the store's lookup (``ImageStore.resolve``) uses it to find a pulled
image by the short name it was pulled by (``python:2.7-slim`` is
``docker.io/library/python:2.7-slim``) or by the digest it was pulled by.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from ..errors import ImageError
from . import oci

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: The tag a pull by digest is stored under, before the digest's hex.
DIGEST_TAG_PREFIX = "sha256-"


def digest_tag(digest: str) -> str:
    """The tag a pull by ``digest`` (a manifest's or an index's) is stored under:
    ``sha256-<hex>``."""
    return DIGEST_TAG_PREFIX + oci.digest_hex(digest)


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: ``registry`` (as written, ``docker.io`` for Docker Hub),
    ``repository`` (``library/python``), and a ``tag`` and/or a ``digest``."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """The full name the store keeps a pulled image under (``docker.io/library/python``)."""
        return f"{self.registry}/{self.repository}"

    @property
    def store_tag(self) -> str:
        """The tag the store keeps it under: the reference's tag, else ``digest_tag``."""
        if self.tag:
            return self.tag
        assert self.digest is not None
        return digest_tag(self.digest)

    def names(self, image_name: str, image_tag: str, image_digest: str) -> bool:
        """Whether this reference names the stored image ``image_name:image_tag`` (manifest
        ``image_digest``): the same full name, and with a digest the image's own or the one it
        was pulled by (its ``digest_tag``, which also covers an index's digest), else the same
        tag. Called by the store's lookup of a registry reference."""
        if image_name != self.name:
            return False
        if self.digest:
            return image_digest == self.digest or image_tag == digest_tag(self.digest)
        return image_tag == self.tag

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(ref: str) -> Reference:
    """Parse ``ref`` as docker does: the first component is a registry when it has a '.' or
    a ':' or is ``localhost``; otherwise the registry is docker.io, and a one-component name
    is under ``library/``. Default tag ``latest`` unless a digest is given. Called by
    ``registry.pull`` and ``registry.push``, and by the store's lookup for a name that is not
    a local image's (``ImageStore.resolve``)."""
    rest, at, digest = ref.partition("@")
    if at:
        oci.check_digest(digest, f"digest of reference {ref!r}")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if split_url(f"https://{registry}") is None:
        raise ImageError(
            f"invalid image reference {ref!r} (registry {registry!r} is not HOST[:PORT] with a "
            "port 1-65535); use [REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST]"
        )
    tag: str | None = None
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        path, tag = path[:colon], path[colon + 1 :]
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    try:
        oci.check_name(f"{registry}/{path}")
        if tag is not None:
            oci.check_tag(tag)
    except ImageError as exc:
        raise ImageError(
            f"invalid image reference {ref!r} ({exc}); use [REGISTRY[:PORT]/]REPOSITORY[:TAG]"
            "[@sha256:DIGEST]"
        ) from None
    if tag is None and not at:
        tag = "latest"
    return Reference(registry, path, tag, digest if at else None)


def split_url(url: str) -> urllib.parse.SplitResult | None:
    """``url`` split, or None when it is not one (an unclosed IPv6 bracket, a port outside
    1-65535, no host). The one place a URL from a reference, a mirror entry or a registry
    is parsed (``registry.Client.parse_url`` turns None into the client's error)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    if not host or port == 0:
        return None
    return parts
