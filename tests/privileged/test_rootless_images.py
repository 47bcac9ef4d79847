"""Images without root: a build from an image of the system store, and an import, into the
user's own store, used by the user's containers (the rootless rerun runs this module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_kernel.images import lookup
from sandbox_kernel.images.build import build_image
from sandbox_kernel.images.exporter import export_images
from sandbox_kernel.images.importer import import_path
from sandbox_kernel.images.store import ImageStore

pytestmark = [pytest.mark.privileged, pytest.mark.rootless_only]


@pytest.fixture(autouse=True)
def own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: None) -> Path:
    """A fresh store of the user's own for each test (the system store is the real one)."""
    state = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    return state


def run_in(image: str, code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox_kernel", "run", image, "--", "python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_build_from_the_system_store(tmp_path: Path) -> None:
    """The parent comes from the system store (copied, its digest kept); the files and
    compile steps run rootless; the kernel user reads the result."""
    system = lookup.places()[-1].store
    parent = system.resolve("python3", unpack=False)
    recipe = tmp_path / "course"
    (recipe / "lib").mkdir(parents=True)
    (recipe / "lib" / "course_helpers.py").write_text("ANSWER = 42\n")
    (recipe / "recipe.toml").write_text(
        'from = "python3"\n'
        "[[files]]\n"
        'src = "lib"\n'
        'dst = "/usr/local/lib/python3.11/dist-packages"\n'
    )
    own = ImageStore()
    lines: list[str] = []
    image = build_image(str(recipe), own, tag="rl-test", progress=lines.append)
    assert any("copied from the system store" in ln for ln in lines), lines
    assert own.resolve("python3:latest", unpack=False).digest == parent.digest
    assert run_in(image.ref, "import course_helpers; print(course_helpers.ANSWER)") == "42\n"
    own.remove(image.ref)
    # nothing of the steps is left, not even what the namespace's root made (overlayfs's
    # work dir, the shim layer): the caller could not remove it
    scratch = own.root / "build-tmp"
    assert not scratch.exists() or list(scratch.iterdir()) == [], list(scratch.iterdir())


def test_import_into_the_own_store(tmp_path: Path) -> None:
    system = lookup.places()[-1].store
    export_images(system, ["python3:latest"], tmp_path / "layout")
    own = ImageStore()
    (image,) = import_path(own, tmp_path / "layout", "rl-imported:v1")
    assert lookup.find("rl-imported:v1").digest == image.digest
    assert run_in("rl-imported:v1", "import sys; print(sys.version_info[0])") == "3\n"
    own.remove("rl-imported:v1")
