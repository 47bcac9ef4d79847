"""The ipykernel layer: ipykernel for an image's Python, as a read-only layer of the product.

Layer: images. ``sandbox-kernel kernelspec add --image`` calls ``ensure`` for an image whose
Python has no ipykernel; the kernel start (``jupyter.launch.find_image``) calls ``find`` and
puts the layer on top of the image's layers, with ``TARGET`` on PYTHONPATH. The image itself
is not changed: the layer is an image of its own in the store (``NAME:<tag>``, one layer,
the ``LABEL_IPYKERNEL_LAYER`` label), so that ``gc`` keeps it and ``image ls`` shows it.

The packages are the pinned closures of the shipped recipes, installed by the host's pip for
the image's interpreter (``pip_target``), the recipe chosen by the interpreter's version
(``RECIPES``): ``python2.7`` (ipykernel 4.10, the last for Python 2) for 2.7, ``python3.9``
(ipykernel 6.29, IPython 8.12, the last for Python 3.8) for 3.8 to 3.10, ``python3``
(ipykernel 7, IPython 9, which needs 3.11) for 3.11 and newer. The tag names the ABI, the
wheel platform and a hash of the pins, so a layer is built once per Python and platform and
again only when the pins change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, ImageNotFound
from . import lookup, pip_target
from .labels import LABEL_IPYKERNEL_LAYER
from .probe import CANDIDATE_DIRS, Interpreter
from .probe import choose as probe_choose
from .recipe import PipSpec, PythonSpec, find_recipe, load_recipe
from .store import Image, ImageConfig, ImageStore, private_dir

#: Where the layer's packages are inside the kernel (and on its PYTHONPATH).
TARGET = "/opt/sandbox-kernel/ipykernel"
#: The image name of the layers in the store.
NAME = "sandbox-kernel-ipykernel"
#: Which shipped recipe's pins serve which Pythons: (oldest, newest or None for no upper
#: bound, recipe name), oldest first. Each recipe's pins support every version of its range.
RECIPES: tuple[tuple[tuple[int, int], tuple[int, int] | None, str], ...] = (
    ((2, 7), (2, 7), "python2.7"),
    ((3, 8), (3, 10), "python3.9"),
    ((3, 11), None, "python3"),
)
#: What ``RECIPES`` covers, in words (for the refusals).
SUPPORTED = "2.7 and 3.8 or newer"


def recipe_for(major: int, minor: int) -> str:
    """The name of the recipe whose pins make the layer for Python ``major.minor``; "" when
    none does. Called by ``supported`` and ``closure``."""
    version = (major, minor)
    for oldest, newest, name in RECIPES:
        top = newest if newest is not None else (oldest[0], 999)
        if oldest <= version <= top:
            return name
    return ""


@dataclass(frozen=True)
class Closure:
    """The pins for one interpreter: the recipe they come from and its pip section."""

    recipe: Path
    pip: PipSpec

    def digest(self) -> str:
        """A short hash of the pins and options (part of the layer's tag)."""
        doc = json.dumps(
            [
                sorted(self.pip.packages),
                sorted(self.pip.from_source),
                self.pip.no_deps,
                self.pip.ignore_requires_python,
                self.pip.index_url,
                list(self.pip.extra_index_urls),
            ]
        )
        return hashlib.sha256(doc.encode()).hexdigest()[:12]


def supported(interp: Interpreter) -> str:
    """ "" when an ipykernel layer can be made for ``interp``; else why not, with the fix.
    Called by ``choose`` (for ``kernelspec add``, before anything is built) and ``closure``."""
    if not recipe_for(interp.major, interp.minor):
        return (
            f"Python {interp.version} ({interp.executable}) has no ipykernel, and the product "
            f"supplies ipykernel for Python {SUPPORTED} only; install ipykernel in the image "
            "or use an image with a newer Python"
        )
    if not interp.platform_tag():
        return (
            f"Python {interp.major_minor} ({interp.executable}) has no ipykernel and does not "
            "run on glibc (musl?), for which the product has no wheels; install ipykernel in "
            "the image"
        )
    return ""


def choose(ref: str, interpreters: Sequence[Interpreter], python: str | None = None) -> Interpreter:
    """The interpreter of image ``ref`` a kernelspec runs, from the probe's ``interpreters``:
    ``probe.choose``'s (the one ``python`` names, else the newest with ipykernel, else the
    newest), or without ``python`` the newest this module can supply ipykernel for when the
    newest cannot have it. ImageError naming the image, the versions and what is supported
    when there is no Python, none matching ``python`` or none that can run a kernel. Called by
    ``kernelspec add``."""
    found = ", ".join(f"{i.executable} ({i.version})" for i in interpreters)
    if not interpreters:
        raise ImageError(
            f"image {ref!r}: no Python interpreter found (looked for python3, python3.X, "
            f"python2.7, python2 and python on its PATH and in {', '.join(CANDIDATE_DIRS)}); "
            f"use an image with Python {SUPPORTED}"
        )
    interp = probe_choose(list(interpreters), python)
    if interp is None:
        raise ImageError(f"image {ref!r} has no Python matching --python {python}; it has {found}")
    if interp.ipykernel:
        return interp
    if not python:
        # the newest has no ipykernel (probe.choose prefers one that has): take the newest
        # that the layer can be made for
        interp = probe_choose([i for i in interpreters if not supported(i)]) or interp
    why = supported(interp)
    if why:
        more = f" (it has {found})" if len(interpreters) > 1 else ""
        raise ImageError(f"image {ref!r}: {why}{more}")
    return interp


def closure(interp: Interpreter) -> Closure:
    """The pinned packages for ``interp`` (ImageError when unsupported)."""
    why = supported(interp)
    if why:
        raise ImageError(why)
    path = find_recipe(recipe_for(interp.major, interp.minor))
    recipe = load_recipe(path)
    assert recipe.pip is not None
    return Closure(path, recipe.pip)


def tag_for(interp: Interpreter, pins: Closure) -> str:
    """The layer image's tag for ``interp``: ``cp311-manylinux_2_36_x86_64-<pins hash>``."""
    return f"{interp.abi}-{interp.platform_tag()}-{pins.digest()}"


def find(ref: str) -> Image:
    """The ipykernel layer image ``ref`` (``NAME:<tag>``) of the stores; ImageNotFound for
    another name, a missing one or an image without the layer label (with the fix). Called
    at each kernel start whose kernelspec names one."""
    if not ref.startswith(NAME + ":"):
        raise ImageNotFound(f"ipykernel_layer={ref!r} is not an ipykernel layer ({NAME}:TAG)")
    try:
        image = lookup.find(ref)
    except ImageNotFound:
        raise ImageNotFound(
            f"the ipykernel layer {ref!r} is not in the store; run `sandbox-kernel kernelspec "
            "add NAME --image IMAGE` again to build it"
        ) from None
    if dict(image.config.labels).get(LABEL_IPYKERNEL_LAYER) != TARGET or len(image.layers) != 1:
        raise ImageNotFound(
            f"image {ref!r} is not an ipykernel layer of the product; remove it "
            f"(sandbox-kernel image rm {ref}) and run `sandbox-kernel kernelspec add` again"
        )
    return image


def ensure(
    interp: Interpreter,
    store: ImageStore | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> Image:
    """The ipykernel layer image for ``interp``: found in the stores, else built into
    ``store`` (default: the caller's own). Called by ``kernelspec add``."""
    pins = closure(interp)
    ref = f"{NAME}:{tag_for(interp, pins)}"
    try:
        return find(ref)
    except ImageNotFound:
        pass
    store = store or ImageStore()
    py = PythonSpec(
        executable=interp.executable,
        version=interp.major_minor,
        abi=interp.abi,
        platforms=(interp.platform_tag(),),
        site_dir=TARGET,
    )
    if progress is not None:
        progress(f"building the ipykernel layer for Python {py.version} ({ref})")
    tmp_root = private_dir(store.root / "build-tmp")
    scratch = Path(tempfile.mkdtemp(prefix="ipykernel-", dir=tmp_root))
    try:
        out = scratch / "layer"
        out.mkdir()
        pip_target.install(pins.pip, py, out, [], pins.recipe)
        # console scripts would shadow the image's own programs: the kernel needs none
        shutil.rmtree(out / "usr", ignore_errors=True)
        layer = store.add_layer_from_dir(out, owner=(0, 0))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    labels = (
        (LABEL_IPYKERNEL_LAYER, TARGET),
        ("org.opencontainers.image.description", f"ipykernel for Python {py.version}"),
    )
    history = [f"pip: {len(pins.pip.packages)} packages from {pins.recipe.parent.name}"]
    return store.write_image(
        NAME, ref.split(":", 1)[1], [layer], ImageConfig(labels=labels), history=history
    )
