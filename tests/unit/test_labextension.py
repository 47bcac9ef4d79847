"""The JupyterLab extension as shipped: the committed build matches its sources (the stamp),
the wheel's data files carry every built file, ``kernelspec install`` copies it beside the
kernelspecs (editable installs get it so), and the kernelspecs' logos are there."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree

import pytest

from sandbox_kernel.jupyter import kernelspecs, labext

REPO = Path(__file__).resolve().parents[2]
LOGOS = ("logo-64x64.png", "logo-svg.svg")


def build_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "labextension_tool", REPO / "tools" / "labextension.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_build_is_made_from_the_current_sources() -> None:
    tool = build_tool()
    assert tool.read_stamp(), f"{tool.STAMP} is missing: run `make labextension`"
    assert tool.read_stamp() == tool.sources_digest(), (
        "labextension/ changed since sandbox_kernel/labextension/ was built: run "
        "`make labextension` and commit the result"
    )
    assert tool.check() == 0


def test_the_stamp_follows_every_source_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit anywhere in the sources (here: a copy of them) changes the digest."""
    import shutil

    tool = build_tool()
    copy = tmp_path / "labextension"
    for name in tool.SOURCES:
        src = tool.SOURCE / name
        if src.is_dir():
            shutil.copytree(src, copy / name)
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy2(src, copy / name)
    monkeypatch.setattr(tool, "SOURCE", copy)
    same = tool.sources_digest()
    assert same == tool.read_stamp()
    for path in tool.source_files():
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert tool.sources_digest() != same, f"an edit of {path.name} is not in the stamp"
        path.write_bytes(original)
    assert tool.sources_digest() == same


def test_the_build_is_a_federated_extension_named_as_the_package_expects() -> None:
    meta = json.loads((labext.BUILT / "package.json").read_text())
    assert meta["name"] == labext.NAME
    load = meta["jupyterlab"]["_build"]["load"]
    assert (labext.BUILT / load).is_file(), load
    source = json.loads((REPO / "labextension" / "package.json").read_text())
    assert source["name"] == labext.NAME and source["version"] == meta["version"]
    install = json.loads((labext.BUILT / "install.json").read_text())
    assert install["packageName"] == "sandbox-kernel"


def test_the_wheel_ships_every_built_file_where_jupyterlab_finds_it() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped: set[str] = set()
    prefix = f"share/jupyter/labextensions/{labext.NAME}"
    for dest, patterns in setuptools["data-files"].items():
        if not dest.startswith(prefix):
            continue
        for pattern in patterns:
            for found in glob.glob(str(REPO / pattern)):
                rel = Path(found).relative_to(labext.BUILT).as_posix()
                assert Path(dest, Path(rel).name).as_posix() == f"{prefix}/{rel}"
                shipped.add(rel)
    built = {
        p.relative_to(labext.BUILT).as_posix()
        for p in labext.BUILT.rglob("*")
        if p.is_file() and p.suffix != ".sha256"
    }
    assert built and shipped == built
    # the package data too: kernelspec install of an installed package copies from there
    package_data = setuptools["package-data"]["sandbox_kernel"]
    in_package = {
        Path(f).relative_to(labext.BUILT).as_posix()
        for pattern in package_data
        for f in glob.glob(str(REPO / "sandbox_kernel" / pattern))
        if Path(f).is_relative_to(labext.BUILT)
    }
    assert built <= in_package


def test_kernelspec_install_copies_the_extension_and_the_logos(tmp_path: Path) -> None:
    data = tmp_path / "share" / "jupyter"
    stale = data / "labextensions" / labext.NAME / "static" / "remoteEntry.old.js"
    stale.parent.mkdir(parents=True)
    stale.write_text("an older build")
    done = kernelspecs.install(None, prefix=str(tmp_path))
    assert kernelspecs.data_dir(prefix=str(tmp_path)) == data
    ext = data / "labextensions" / labext.NAME
    meta = json.loads((ext / "package.json").read_text())
    assert (ext / meta["jupyterlab"]["_build"]["load"]).is_file()
    assert not stale.exists(), "the older build was left beside the new one"
    assert not list(ext.glob("*.sha256"))
    assert {k.name for k in done} == set(kernelspecs.KERNELSPEC_NAMES)
    for k in done:
        for logo in LOGOS:
            got = Path(k.resource_dir) / logo
            assert got.read_bytes() == (REPO / "kernelspecs" / k.name / logo).read_bytes()


def test_install_names_the_fix_when_the_build_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(labext, "BUILT", tmp_path / "nothing")
    with pytest.raises(Exception, match="make labextension"):
        labext.install(tmp_path / "data")


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_the_two_logos_are_valid_and_tell_the_versions_apart() -> None:
    pngs = {}
    for name in kernelspecs.KERNELSPEC_NAMES:
        folder = REPO / "kernelspecs" / name
        width, height, raw = png_pixels(folder / "logo-64x64.png")
        assert (width, height) == (64, 64)
        assert len(raw) == 64 * (1 + 64 * 4)
        pngs[name] = raw
        svg = ElementTree.parse(folder / "logo-svg.svg").getroot()
        assert svg.get("viewBox") == "0 0 64 64"
        version = "2.7" if name.startswith("python2.7") else "3"
        texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
        assert texts == [version], texts
    assert len(set(pngs.values())) == 2
