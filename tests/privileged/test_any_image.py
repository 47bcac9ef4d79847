"""Any Python image as a kernel: images without ipykernel (the python3 and python2.7 images'
Debian base layer alone, and a Debian 11 whose only Python is its python3, 3.9, built here from
a recipe of a [base] alone), `kernelspec add --image`, started through jupyter_client's
AsyncKernelManager: code runs, %sandbox works, the image is unchanged."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.cli import main as cli_main
from sandbox_kernel.images import ipykernel_layer, lookup
from sandbox_kernel.images.build import build_image
from sandbox_kernel.images.store import Image, ImageConfig, ImageStore
from sandbox_kernel.jupyter import kernelspecs
from tests.privileged.test_provisioner import execute

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]


#: A Debian 11 with the distribution's python3 (3.9) and nothing of the product: no ipykernel,
#: no python or kernel labels. libstdc++ is in every distribution image through apt (the
#: essential variant has no apt); the layer's pyzmq needs it.
BULLSEYE_PYTHON3 = """
[base]
suite = "bullseye"
variant = "essential"
include = ["python3", "libstdc++6"]
exclude = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"]
"""

#: The test images: the shipped image whose base layer is taken, or the recipe built, and the
#: Python version the kernel must report.
BARE = {
    "python3": "3.11",
    "python2.7": "2.7",
    "bullseye-python3": "3.9",
}


def make_bare_image(kind: str, store: ImageStore, tmp_path: Path) -> Image:
    """A new image in ``store`` without ipykernel or any product label (the caller removes
    it): the Debian base layer of the shipped image ``kind`` names (python3 / python2.7), or
    ``bullseye-python3`` built by the product's builder from ``BULLSEYE_PYTHON3``. Used by
    ``bare_image`` and by the registry test that pulls such images back."""
    name = f"skt-any-{kind.replace('.', '')}-{uuid.uuid4().hex[:8]}"
    if kind == "bullseye-python3":
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.toml").write_text(BULLSEYE_PYTHON3)
        image = build_image(str(tmp_path / name), store)
        assert not any(k.startswith("org.sandbox-kernel.") for k, _ in image.config.labels)
        return image
    source = lookup.find(kind)
    cfg = ImageConfig(env=(("PATH", "/usr/local/bin:/usr/bin:/bin"), ("LANG", "C.UTF-8")))
    return store.write_image(name, "latest", source.layers[:1], cfg)


@pytest.fixture
def bare_image(request: pytest.FixtureRequest, images: None, tmp_path: Path) -> Iterator[str]:
    """``make_bare_image`` of the kind the test names, in the default store, removed
    afterwards."""
    store = ImageStore()
    image = make_bare_image(request.param, store, tmp_path)
    try:
        yield image.ref
    finally:
        store.remove(image.ref)


@pytest.mark.parametrize("bare_image", list(BARE), indirect=True)
async def test_image_without_ipykernel_runs_as_kernel(
    bare_image: str,
    tmp_path: Path,
    notebook_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    version = BARE[request.node.callspec.params["bare_image"]]
    before = lookup.find(bare_image)
    layer_digests = [layer.digest for layer in before.layers]
    prefix = tmp_path / "prefix"
    name = bare_image.split(":")[0]
    add = ["kernelspec", "add", name, "--image", bare_image, "--prefix", str(prefix)]
    rc = cli_main([*add, "--memory", "512M", "--pids", "100"])
    first = capsys.readouterr()
    assert rc == 0, first.err
    assert f": Python {version}." in first.out, first.out
    spec_dir = prefix / "share" / "jupyter" / "kernels" / name
    data = json.loads((spec_dir / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    assert config["image"] == bare_image
    assert config["ipykernel_layer"].startswith(ipykernel_layer.NAME + ":")
    # the layer is cached: a second add builds nothing
    rc = cli_main([*add, "--memory", "512M", "--pids", "100"])
    assert rc == 0
    assert "building the ipykernel layer" not in capsys.readouterr().out

    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    if not kernelspecs.provisioner_registered():
        kernelspecs.register_provisioner_in_process()
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel(cwd=str(notebook_dir))
    try:
        code = "import sys, ipykernel; print('%d.%d' % sys.version_info[:2]); print(6 * 7)"
        reply, out = await execute(km, code)
        assert reply["status"] == "ok", out
        assert out.split() == [version, "42"], out
        reply, out = await execute(km, "r = %sandbox\nprint(r)")
        assert reply["status"] == "ok", out
        assert "memory limit         512 MiB" in out and "process limit        100" in out
        reply, out = await execute(km, "%sandbox pids=90")
        assert reply["status"] == "ok" and "pids 90" in out, out
        reply, out = await execute(km, "print(ipykernel.__file__)")
        assert out.strip().startswith(ipykernel_layer.TARGET + "/")
        reply, out = await execute(km, "print(ipykernel.__version__)")
        major = {"2.7": "4.", "3.9": "6.29."}.get(version, "7.")
        assert out.strip().startswith(major), out
    finally:
        await km.shutdown_kernel(now=True)
    after = lookup.find(bare_image)
    assert after.digest == before.digest
    assert [layer.digest for layer in after.layers] == layer_digests


def test_image_with_ipykernel_needs_no_layer(
    tmp_path: Path, images: None, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "prefix"
    name = f"skt-own-{uuid.uuid4().hex[:8]}"
    rc = cli_main(["kernelspec", "add", name, "--image", "python3", "--prefix", str(prefix)])
    out = capsys.readouterr().out
    assert rc == 0 and "ipykernel 7." in out, out
    data = json.loads((prefix / "share/jupyter/kernels" / name / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    assert config == {"image": "python3:latest"}
    assert data["argv"][0] == "/usr/bin/python3"
    assert data["display_name"] == "Python 3.11 (python3:latest, sandbox)"


def test_errors_are_one_line_naming_the_image(
    tmp_path: Path, images: None, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = str(tmp_path / "prefix")
    missing = f"skt-missing-{uuid.uuid4().hex[:8]}"
    assert cli_main(["kernelspec", "add", "k", "--image", missing, "--prefix", prefix]) == 125
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err, err
    args = ["kernelspec", "add", "k", "--image", "python3", "--python", "2.7", "--prefix", prefix]
    assert cli_main(args) == 125
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python3:latest" in err and "3.11" in err, err
    assert not (tmp_path / "prefix").exists()


#: An interpreter of a version the product has no ipykernel for: it answers the probe as a
#: Python 3.7 would (the probe reads only its report line).
OLD_PYTHON = """#!/bin/sh
echo 'SKPROBE1 {"exe": "/usr/local/bin/python3.7", "real": "/usr/local/bin/python3.7", \
"version": "3.7.3", "implementation": "cpython", "abi": "cp37m", "libc": "glibc 2.36", \
"machine": "x86_64", "site_dir": "/usr/lib/python3/dist-packages", "ipykernel": ""}'
"""


def test_a_python_without_ipykernel_for_it_is_refused_in_one_line(
    tmp_path: Path, images: None, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ImageStore()
    top = tmp_path / "layer"
    (top / "usr/local/bin").mkdir(parents=True)
    (top / "usr/local/bin/python3.7").write_text(OLD_PYTHON)
    (top / "usr/local/bin/python3.7").chmod(0o755)
    base = lookup.find("python2.7").layers[0]  # Debian 11 with /usr/bin/python2.7
    layer = store.add_layer_from_dir(top, owner=(0, 0))
    name = f"skt-old-{uuid.uuid4().hex[:8]}"
    image = store.write_image(name, "latest", [base, layer], ImageConfig())
    prefix = tmp_path / "prefix"
    try:
        args = ["kernelspec", "add", "k", "--image", image.ref, "--prefix", str(prefix)]
        assert cli_main([*args, "--python", "3.7"]) == 125
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert image.ref in err and "Python 3.7.3 (/usr/local/bin/python3.7)" in err, err
        assert "2.7 and 3.8 or newer" in err and "/usr/bin/python2.7 (2.7." in err, err
        assert not prefix.exists()
        # left to choose, kernelspec add takes the newest Python the layer can serve
        assert cli_main(args) == 0
        assert ": Python 2.7." in capsys.readouterr().out
    finally:
        store.remove(image.ref)
