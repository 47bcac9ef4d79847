"""Fixtures shared by the privileged tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def images() -> None:
    """The images the shipped kernelspecs use, built into the default store when missing
    (a fresh machine builds them once: a few minutes)."""
    from sandbox_kernel.demo import IMAGES
    from sandbox_kernel.errors import ImageError
    from sandbox_kernel.images.build import build_image
    from sandbox_kernel.images.store import ImageStore

    for name in IMAGES:
        try:
            ImageStore().resolve(name)
        except ImageError:
            build_image(name, ImageStore())
