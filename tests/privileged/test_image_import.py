"""Interoperability of the image store with skopeo and umoci (OCI layouts both ways)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sandbox_kernel.images.exporter import export_images
from sandbox_kernel.images.importer import import_path
from sandbox_kernel.images.store import Image, ImageConfig, ImageStore

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (whiteouts, ownership)"),
]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "state")


def two_layer_image(store: ImageStore, tmp_path: Path, compression: str = "gzip") -> Image:
    l1 = tmp_path / "l1"
    (l1 / "etc").mkdir(parents=True)
    (l1 / "etc/keep").write_text("keep")
    (l1 / "etc/gone").write_text("gone")
    (l1 / "opq").mkdir()
    (l1 / "opq/old").write_text("old")
    (l1 / "bin").mkdir()
    (l1 / "bin/tool").write_text("#!/bin/sh\n")
    os.chmod(l1 / "bin/tool", 0o4755)
    os.symlink("tool", l1 / "bin/alias")
    base = store.add_layer_from_dir(l1, compression=compression)
    l2 = tmp_path / "l2"
    (l2 / "etc").mkdir(parents=True)
    os.mknod(l2 / "etc/gone", stat.S_IFCHR, os.makedev(0, 0))
    (l2 / "opq").mkdir()
    os.setxattr(l2 / "opq", "trusted.overlay.opaque", b"y")
    (l2 / "opq/new").write_text("new")
    top = store.add_layer_from_dir(l2, compression=compression)
    cfg = ImageConfig(env=(("PATH", "/bin"),), cmd=("/bin/tool",), labels=(("k", "v"),))
    return store.write_image("interop", "v1", [base, top], cfg)


def check_rootfs(rootfs: Path, tool_mode: int = 0o4755) -> None:
    """What the two-layer image holds; ``tool_mode``: the setuid tool's mode (the exported
    blobs keep it, our own snapshots drop setuid)."""
    assert (rootfs / "etc/keep").read_text() == "keep"
    assert not (rootfs / "etc/gone").exists()
    assert sorted(p.name for p in (rootfs / "opq").iterdir()) == ["new"]
    assert stat.S_IMODE(os.stat(rootfs / "bin/tool").st_mode) == tool_mode
    assert os.readlink(rootfs / "bin/alias") == "tool"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_skopeo_reads_our_export(store: ImageStore, tmp_path: Path, compression: str) -> None:
    skopeo = need("skopeo")
    im = two_layer_image(store, tmp_path, compression)
    export_images(store, ["interop:v1"], tmp_path / "exp")
    info = json.loads(sh(skopeo, "inspect", f"oci:{tmp_path}/exp:interop:v1"))
    assert info["Digest"] == im.digest and len(info["Layers"]) == 2
    assert "PATH=/bin" in info["Env"]
    sh(skopeo, "copy", f"oci:{tmp_path}/exp:interop:v1", f"oci:{tmp_path}/copy:copied")
    (back,) = import_path(ImageStore(tmp_path / "s2"), tmp_path / "copy", "copied:v1")
    assert [x.diff_id for x in back.layers] == [x.diff_id for x in im.layers]


def test_umoci_lists_and_unpacks_our_export(store: ImageStore, tmp_path: Path) -> None:
    umoci = need("umoci")
    two_layer_image(store, tmp_path)
    export_images(store, ["interop:v1"], tmp_path / "exp")
    assert sh(umoci, "ls", "--layout", str(tmp_path / "exp")).split() == ["interop:v1"]
    sh(umoci, "unpack", "--image", f"{tmp_path}/exp:interop:v1", str(tmp_path / "bundle"))
    check_rootfs(tmp_path / "bundle/rootfs")  # umoci applied our .wh. entries per the spec


def test_import_umoci_built_layout(store: ImageStore, tmp_path: Path) -> None:
    umoci = need("umoci")
    lay = f"{tmp_path}/um"
    sh(umoci, "init", "--layout", lay)
    sh(umoci, "new", "--image", f"{lay}:base")
    sh(umoci, "unpack", "--image", f"{lay}:base", str(tmp_path / "b"))
    rootfs = tmp_path / "b/rootfs"
    (rootfs / "srv").mkdir()
    (rootfs / "srv/data").write_text("from umoci")
    (rootfs / "srv/old").write_text("old")
    sh(umoci, "repack", "--image", f"{lay}:base", str(tmp_path / "b"))
    sh(umoci, "unpack", "--image", f"{lay}:base", str(tmp_path / "b2"))
    (tmp_path / "b2/rootfs/srv/old").unlink()  # umoci writes a .wh.old in the next layer
    sh(umoci, "repack", "--image", f"{lay}:base", str(tmp_path / "b2"))
    sh(umoci, "config", "--image", f"{lay}:base", "--config.env", "FOO=bar")
    (im,) = import_path(store, Path(lay))
    assert im.ref == "base:latest"
    assert ("FOO", "bar") in im.config.env
    top, lower = (Path(d) for d in im.lowerdirs()[:2])
    assert stat.S_ISCHR(os.lstat(top / "srv/old").st_mode)  # overlay whiteout form
    assert (lower / "srv/data").read_text() == "from umoci"


def test_import_skopeo_oci_archive_and_docker_archive(store: ImageStore, tmp_path: Path) -> None:
    skopeo = need("skopeo")
    im = two_layer_image(store, tmp_path)
    export_images(store, ["interop:v1"], tmp_path / "exp")
    src = f"oci:{tmp_path}/exp:interop:v1"
    sh(skopeo, "copy", src, f"oci-archive:{tmp_path}/img.tar:arch:v2")
    sh(skopeo, "copy", src, f"docker-archive:{tmp_path}/docker.tar:dock:v3")
    other = ImageStore(tmp_path / "s2")
    (a,) = import_path(other, tmp_path / "img.tar")
    (d,) = import_path(other, tmp_path / "docker.tar")
    assert a.ref == "arch:v2" and d.ref == "dock:v3"
    for got in (a, d):
        assert [x.diff_id for x in got.layers] == [x.diff_id for x in im.layers]
        assert got.config.cmd == ("/bin/tool",)
    # our export as a tar is also read by skopeo
    export_images(store, ["interop:v1"], tmp_path / "ours.tar")
    sh(skopeo, "inspect", f"oci-archive:{tmp_path}/ours.tar:interop:v1")


def test_export_import_round_trip_through_overlay_mount(store: ImageStore, tmp_path: Path) -> None:
    im = two_layer_image(store, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            "lowerdir=" + ":".join(im.lowerdirs()),
            str(mnt),
        ],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"overlay mount not possible: {r.stderr!r}")
    try:
        check_rootfs(mnt, tool_mode=0o755)  # snapshots drop setuid
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
