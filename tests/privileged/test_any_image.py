"""Any Python image as a kernel: images without ipykernel (the python3 and python2.7 images'
Debian base layer alone, made here), `kernelspec add --image`, started through
jupyter_client's AsyncKernelManager: code runs, %sandbox works, the image is unchanged."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.cli import main as cli_main
from sandbox_kernel.images import ipykernel_layer, lookup
from sandbox_kernel.images.store import ImageConfig, ImageStore
from sandbox_kernel.jupyter import kernelspecs
from tests.privileged.test_provisioner import execute

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]


@pytest.fixture
def bare_image(request: pytest.FixtureRequest, images: None) -> Iterator[str]:
    """A new image of the store: the Debian base layer of the shipped image the test names
    (python3 / python2.7), without ipykernel or any product label; removed afterwards."""
    source = lookup.find(request.param)
    store = ImageStore()
    name = f"skt-any-{request.param.replace('.', '')}-{uuid.uuid4().hex[:8]}"
    cfg = ImageConfig(env=(("PATH", "/usr/local/bin:/usr/bin:/bin"), ("LANG", "C.UTF-8")))
    image = store.write_image(name, "latest", source.layers[:1], cfg)
    try:
        yield image.ref
    finally:
        store.remove(image.ref)


@pytest.mark.parametrize("bare_image", ["python3", "python2.7"], indirect=True)
async def test_image_without_ipykernel_runs_as_kernel(
    bare_image: str,
    tmp_path: Path,
    notebook_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = lookup.find(bare_image)
    layer_digests = [layer.digest for layer in before.layers]
    prefix = tmp_path / "prefix"
    name = bare_image.split(":")[0]
    add = ["kernelspec", "add", name, "--image", bare_image, "--prefix", str(prefix)]
    rc = cli_main([*add, "--memory", "512M", "--pids", "100"])
    first = capsys.readouterr()
    assert rc == 0, first.err
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
        reply, out = await execute(km, "import sys, ipykernel; print(sys.version_info[0] * 7)")
        assert reply["status"] == "ok", out
        major = 2 if "-python27-" in bare_image else 3
        assert out.strip() == str(major * 7)
        reply, out = await execute(km, "r = %sandbox\nprint(r)")
        assert reply["status"] == "ok", out
        assert "memory limit         512 MiB" in out and "process limit        100" in out
        reply, out = await execute(km, "%sandbox pids=90")
        assert reply["status"] == "ok" and "pids 90" in out, out
        reply, out = await execute(km, "print(ipykernel.__file__)")
        assert out.strip().startswith(ipykernel_layer.TARGET + "/")
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
