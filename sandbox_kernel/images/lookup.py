"""Which image a name means: the caller's own store first, then the system store.

Layer: images. On a teaching host the administrator builds each image once into the system
store (``paths.system_state_dir()``, readable by every user); what a user builds or imports
goes to their own store (``paths.state_dir()``). Kernel starts (``jupyter.launch``),
``sandbox-kernel run`` and ``image ls``/``inspect`` look images up here, so that "not
found" names both stores and gives advice that works for the user who asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import paths
from ..errors import ImageNotFound
from .store import Image, ImageStore, not_found


@dataclass(frozen=True)
class Place:
    """One store in lookup order, with the words that name it."""

    store: ImageStore
    label: str  # "your store", "the system store", "the store"


def places() -> list[Place]:
    """The stores to look in, in order: the caller's own (when it exists), then the system
    store (read-only for anyone but its owner) when it is another directory."""
    own = paths.state_dir()
    system = paths.system_state_dir()
    if own.resolve() == system.resolve() or os.geteuid() == 0:
        return [Place(ImageStore(own), "the store")]
    out = [Place(ImageStore(own), "your store")]
    sys_store = ImageStore(system, readonly=True)
    if sys_store.exists():
        out.append(Place(sys_store, "the system store"))
    return out


def find(ref: str, *, unpack: bool = True) -> Image:
    """The image ``ref`` names (``name``, ``name:tag``, a ``sha256:`` prefix, or a registry
    reference a pulled image is found by: ``ImageStore.resolve``), from the first store that
    has it: first as the name is written, in every store, then read as docker reads it
    (``python:2.7-slim`` -> ``docker.io/library/python:2.7-slim``), so a local image such as
    ``python3`` of either store comes before a pulled one. ImageNotFound naming every store
    looked in, what they hold, and how this user gets the image."""
    looked = [p for p in places() if p.store.exists()]
    for docker_names in (False, True):
        for place in looked:
            try:
                return place.store.resolve(ref, unpack=unpack, docker_names=docker_names)
            except ImageNotFound:
                pass
    raise _not_found(ref, places())


def list_all() -> list[tuple[Place, Image]]:
    """Every image of every store, with the store it is in (``image ls``)."""
    return [(p, im) for p in places() if p.store.exists() for im in p.store.list()]


def _not_found(ref: str, looked: list[Place]) -> ImageNotFound:
    return not_found(ref, [(p.label, p.store) for p in looked])


def copy_to_own(ref: str, store: ImageStore) -> Image | None:
    """Copy image ``ref`` from the system store into ``store`` (the caller's own) through
    the importer (its blobs verified, its digest kept), and return the copy; None when the
    system store has no such image. A rootless build ``from`` an image of the system store
    calls it: layers unpacked in its own store belong to the caller, so the build's steps
    can write over them."""
    from .importer import import_path

    for place in places()[1:]:
        if not place.store.exists():
            continue
        try:
            image = place.store.resolve(ref, unpack=False)
        except ImageNotFound:
            continue
        (copied,) = import_path(store, place.store.oci_dir, image.ref)
        return copied
    return None
