"""Layer extraction: entry types, OCI whiteouts -> overlay form, compression, tar writing."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from sandbox_kernel.errors import ImageError, UnsafeArchiveError
from sandbox_kernel.images.extract import (
    DEFAULT_LIMITS,
    ExtractLimits,
    ExtractReport,
    extract_layer_file,
    extract_tar_stream,
)
from sandbox_kernel.images.layer_writer import write_layer_tar

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="overlay whiteouts need CAP_MKNOD / trusted xattrs"
)


# (name, kind, payload, mode[, pax headers]): a file's data, a link's target, None otherwise
Payload = str | bytes | None
TarEntry = tuple[str, str, Payload, int] | tuple[str, str, Payload, int, dict[str, str]]


def tar_bytes(entries: list[TarEntry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, kind, payload, mode[, extra]) with kind in f/d/l/h/c/p."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            name, kind, payload, mode = e[:4]
            ti = tarfile.TarInfo(name)
            ti.mode = mode
            ti.mtime = 1_600_000_000
            ti.uid, ti.gid = 1234, 5678
            if len(e) > 4:
                ti.pax_headers = e[4]
            if kind == "f":
                assert payload is not None
                data = payload if isinstance(payload, bytes) else payload.encode()
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {
                "d": tarfile.DIRTYPE,
                "l": tarfile.SYMTYPE,
                "h": tarfile.LNKTYPE,
                "c": tarfile.CHRTYPE,
                "b": tarfile.BLKTYPE,
                "p": tarfile.FIFOTYPE,
            }[kind]
            if kind in "lh":
                assert isinstance(payload, str)
                ti.linkname = payload
            tf.addfile(ti)
    return buf.getvalue()


def extract(data: bytes, dest: Path) -> ExtractReport:
    dest.mkdir(exist_ok=True)
    return extract_tar_stream(io.BytesIO(data), dest)


def is_wh(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def test_basic_entry_types(tmp_path: Path) -> None:
    data = tar_bytes(
        [
            ("./", "d", None, 0o755),
            ("etc/", "d", None, 0o750),
            ("etc/passwd", "f", "root:x:0:0\n", 0o644),
            ("usr/bin/su", "f", "ELF", 0o4755),  # parent dirs created implicitly
            ("usr/bin/sh", "l", "dash", 0o777),
            ("etc/passwd-link", "h", "etc/passwd", 0o644),
            ("/abs/file", "f", "abs", 0o600),  # leading / stripped
        ]
    )
    d = tmp_path / "out"
    rep = extract(data, d)
    assert (d / "etc/passwd").read_text() == "root:x:0:0\n"
    assert stat.S_IMODE(os.stat(d / "usr/bin/su").st_mode) == 0o755  # setuid stripped
    assert stat.S_IMODE(os.stat(d / "etc").st_mode) == 0o750
    assert os.readlink(d / "usr/bin/sh") == "dash"
    assert os.stat(d / "etc/passwd").st_ino == os.stat(d / "etc/passwd-link").st_ino
    assert (d / "abs/file").read_text() == "abs"
    assert int(os.stat(d / "etc/passwd").st_mtime) == 1_600_000_000
    assert int(os.stat(d / "etc").st_mtime) == 1_600_000_000
    if ROOT:
        assert os.stat(d / "etc/passwd").st_uid == 1234
        assert os.stat(d / "etc/passwd").st_gid == 5678
    assert rep.entries == 7
    import hashlib

    assert rep.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_long_names_gnu_and_pax(tmp_path: Path) -> None:
    long = "d/" + "x" * 150 + "/" + "y" * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        d = tmp_path / f"o{fmt}"
        extract(tar_bytes([(long, "f", "deep", 0o644)], fmt), d)
        assert (d / long).read_text() == "deep"


def test_big_file_and_many_chunks(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    d = tmp_path / "o"
    extract(tar_bytes([("big", "f", payload, 0o644), ("after", "f", "x", 0o644)]), d)
    assert (d / "big").read_bytes() == payload
    assert (d / "after").read_text() == "x"


@needs_root
def test_whiteouts_become_overlay_form(tmp_path: Path) -> None:
    data = tar_bytes(
        [
            ("a/", "d", None, 0o755),
            ("a/.wh.gone", "f", "", 0o644),
            ("a/.wh..wh..opq", "f", "", 0o644),
            ("a/kept", "f", "k", 0o644),
            ("b/.wh.sub", "f", "", 0o644),  # whiteout in a dir created implicitly
            (".wh.top", "f", "", 0o644),
        ]
    )
    d = tmp_path / "o"
    rep = extract(data, d)
    assert is_wh(d / "a/gone") and is_wh(d / "b/sub") and is_wh(d / "top")
    assert opaque(d / "a") and not opaque(d / "b")
    assert (d / "a/kept").read_text() == "k"
    assert not any(p.name.startswith(".wh.") for p in d.rglob("*"))
    assert rep.whiteouts == 3 and rep.opaque_dirs == 1


@needs_root
def test_same_layer_entry_wins_over_its_whiteout(tmp_path: Path) -> None:
    """OCI: whiteouts only hide lower layers; a same-layer entry stays visible."""
    data = tar_bytes(
        [
            (".wh.f", "f", "", 0o644),
            ("f", "f", "new", 0o644),  # file after its whiteout replaces it
            (".wh.dir", "f", "", 0o644),
            ("dir/x", "f", "x", 0o644),  # dir replacing a whiteout must hide the lower dir
            ("g", "f", "g", 0o644),
            (".wh.g", "f", "", 0o644),  # whiteout after the entry: entry kept
            ("h/", "d", None, 0o755),
            (".wh.h", "f", "", 0o644),  # whiteout after a dir: dir kept, made opaque
        ]
    )
    d = tmp_path / "o"
    extract(data, d)
    assert (d / "f").read_text() == "new"
    assert (d / "dir/x").read_text() == "x" and opaque(d / "dir")
    assert (d / "g").read_text() == "g"
    assert (d / "h").is_dir() and opaque(d / "h")


def _can_overlay(tmp_path: Path) -> bool:
    lo, up, wk, mnt = (tmp_path / n for n in ("lo", "up", "wk", "mnt"))
    for p in (lo, up, wk, mnt):
        p.mkdir(parents=True)
    r = subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lo},upperdir={up},workdir={wk}",
            str(mnt),
        ],
        capture_output=True,
    )
    if r.returncode == 0:
        subprocess.run(["umount", str(mnt)], check=False)
        return True
    return False


@needs_root
def test_multilayer_overlay_view_matches_oci_semantics(tmp_path: Path) -> None:
    """Three crafted layers, mounted with overlayfs: the merged view is what the OCI spec says."""
    if not _can_overlay(tmp_path / "probe"):
        pytest.skip("overlayfs mounts not possible here")
    l1 = tar_bytes(
        [
            ("etc/a", "f", "a1", 0o644),
            ("etc/b", "f", "b1", 0o644),
            ("opq/old1", "f", "o", 0o644),
            ("opq/old2", "f", "o", 0o644),
            ("dirgone/x", "f", "x", 0o644),
            ("keep/k", "f", "k", 0o644),
        ]
    )
    l2 = tar_bytes(
        [
            ("etc/.wh.a", "f", "", 0o644),  # delete etc/a
            ("etc/c", "f", "c2", 0o644),
            ("opq/.wh..wh..opq", "f", "", 0o644),  # hide opq/* from layer 1
            ("opq/new", "f", "n2", 0o644),
            (".wh.dirgone", "f", "", 0o644),  # delete a whole directory
        ]
    )
    l3 = tar_bytes(
        [
            ("etc/a", "f", "a3", 0o644),  # re-create after deletion
            ("dirgone/y", "f", "y3", 0o644),  # re-create dir: must not show old x
        ]
    )
    snaps = []
    for i, data in enumerate((l1, l2, l3)):
        d = tmp_path / f"s{i}"
        extract(data, d)
        snaps.append(str(d))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = ":".join(reversed(snaps))  # top-most first
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(mnt)], check=True
    )
    try:
        seen = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert seen == sorted(
            [
                "etc",
                "etc/a",
                "etc/b",
                "etc/c",
                "opq",
                "opq/new",
                "dirgone",
                "dirgone/y",
                "keep",
                "keep/k",
            ]
        )
        assert (mnt / "etc/a").read_text() == "a3"
        assert (mnt / "etc/b").read_text() == "b1"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _compress(data: bytes, comp: str, path: Path) -> Path:
    if comp == "gzip":
        path.write_bytes(gzip.compress(data))
    elif comp == "zstd":
        path.write_bytes(
            subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
        )
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
def test_compressed_layers(tmp_path: Path, comp: str) -> None:
    if comp == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    data = tar_bytes([("x/y", "f", "hello", 0o644)])
    blob = _compress(data, comp, tmp_path / "blob")
    d = tmp_path / "o"
    d.mkdir()
    import hashlib

    want = "sha256:" + hashlib.sha256(data).hexdigest()
    rep = extract_layer_file(blob, comp, d, expected_diff_id=want)
    assert (d / "x/y").read_text() == "hello"
    assert rep.diff_id == want


def test_wrong_compression_is_an_error(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(tar_bytes([("a", "f", "a", 0o644)]))
    d = tmp_path / "o"
    d.mkdir()
    with pytest.raises((ImageError, OSError, EOFError)):
        extract_layer_file(blob, "gzip", d)


def test_garbage_is_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"checksum|truncated|invalid number"):
        extract(b"x" * 2048, tmp_path / "o")


@needs_root
def test_write_layer_tar_converts_overlay_upper_form(tmp_path: Path) -> None:
    src = tmp_path / "upper"
    (src / "d").mkdir(parents=True)
    (src / "d/file").write_text("f")
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    os.mknod(src / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (src / "z").write_text("z")
    os.link(src / "z", src / "zlink")
    os.symlink("/etc/passwd", src / "sym")
    out = io.BytesIO()
    write_layer_tar(src, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        names = tf.getnames()
        assert names == [".wh.gone", "d", "d/.wh..wh..opq", "d/file", "sym", "z", "zlink"]
        assert tf.getmember("zlink").islnk() and tf.getmember("zlink").linkname == "z"
        assert tf.getmember("z").uname == ""
    # and extraction gives back the overlay form
    d = tmp_path / "back"
    extract(out.getvalue(), d)
    assert is_wh(d / "gone") and opaque(d / "d") and (d / "d/file").read_text() == "f"
    # deterministic
    out2 = io.BytesIO()
    write_layer_tar(src, out2)
    assert out.getvalue() == out2.getvalue()


@pytest.mark.parametrize("comp", ["gzip", "zstd"])
def test_a_layer_expands_at_most_its_ratio_of_the_blob(tmp_path: Path, comp: str) -> None:
    """A decompression bomb (16 MiB of zeros, a few KiB compressed) is refused as soon as
    its stream passes ``max_ratio`` times the blob's size (above ``ratio_floor``), with an
    ImageError naming the bound; the same layer within the bound is accepted."""
    if comp == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    data = tar_bytes([("zeros", "f", bytes(16 << 20), 0o644)])
    blob = _compress(data, comp, tmp_path / "blob")
    size = blob.stat().st_size
    assert size * 100 < len(data)
    tight = ExtractLimits(max_ratio=10, ratio_floor=1 << 20)
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"max_ratio 10x") as info:
        extract_layer_file(blob, comp, tmp_path / "a", limits=tight)
    assert isinstance(info.value, ImageError) and "decompression bomb" in str(info.value)
    assert f"{tight.layer_budget(size)} bytes" in str(info.value)
    # the floor lets a small layer expand further: here past the whole stream
    (tmp_path / "b").mkdir()
    roomy = ExtractLimits(max_ratio=10, ratio_floor=32 << 20)
    assert extract_layer_file(blob, comp, tmp_path / "b", limits=roomy).tar_bytes == len(data)
    # the defaults are far below the old fixed 20 GiB for a small blob
    assert DEFAULT_LIMITS.layer_budget(size) == DEFAULT_LIMITS.ratio_floor < 1 << 30


def test_an_image_expands_at_most_max_image_bytes(tmp_path: Path) -> None:
    """Within one import (``ImageStore.import_budget``), the layers unpacked together stop
    at ``max_image_bytes``: two layers, each within its own bound, refused together."""
    from sandbox_kernel.images import oci
    from sandbox_kernel.images.store import ImageStore

    limits = ExtractLimits(ratio_floor=8 << 20, max_image_bytes=6 << 20)
    store = ImageStore(tmp_path / "store", limits=limits)
    blobs = []
    for i in range(2):
        data = tar_bytes([(f"f{i}", "f", os.urandom(4 << 20), 0o644)])
        blobs.append(_compress(data, "gzip", tmp_path / f"l{i}.tar.gz"))
    with store.import_budget():
        store.add_layer_blob(blobs[0], oci.MT_OCI_LAYER_GZIP)  # 4 of the 6 MiB
        with pytest.raises(UnsafeArchiveError, match="max_image_bytes"):
            store.add_layer_blob(blobs[1], oci.MT_OCI_LAYER_GZIP)
    layer = store.add_layer_blob(blobs[1], oci.MT_OCI_LAYER_GZIP)  # alone it fits
    assert layer.snapshot.is_dir()


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6755, 0o6711, 0o2700])
def test_setuid_and_setgid_bits_are_stripped_at_unpack(tmp_path: Path, mode: int) -> None:
    data = tar_bytes(
        [
            ("usr/bin/tool", "f", "ELF", mode),
            ("usr/bin/link", "h", "usr/bin/tool", mode),  # a hard link keeps no bit either
            ("usr/share/", "d", None, 0o2775),  # a setgid folder is only inheritance: kept
        ]
    )
    d = tmp_path / "out"
    extract(data, d)
    for name in ("usr/bin/tool", "usr/bin/link"):
        got = stat.S_IMODE(os.lstat(d / name).st_mode)
        assert got == mode & 0o777, (name, oct(got))
        assert not got & (stat.S_ISUID | stat.S_ISGID)


def test_harden_snapshot_strips_bits_and_file_capabilities(tmp_path: Path) -> None:
    from sandbox_kernel.images.extract import CAPABILITY_XATTR, harden_snapshot

    snap = tmp_path / "snap"
    (snap / "usr/bin").mkdir(parents=True)
    modes = {"su": 0o4755, "wall": 0o2755, "both": 0o6755, "plain": 0o755}
    for name, mode in modes.items():
        p = snap / "usr/bin" / name
        p.write_text("ELF")
        os.chmod(p, mode)
    outside = tmp_path / "outside"
    outside.write_text("host")
    os.chmod(outside, 0o4755)
    (snap / "usr/bin/out").symlink_to(outside)  # never followed
    capped = snap / "usr/bin/ping"
    capped.write_text("ELF")
    # a file capability as setcap writes it (v2: cap_net_raw+ep); root only
    cap = bytes.fromhex("0100000200200000000000000000000000000000")
    try:
        os.setxattr(capped, CAPABILITY_XATTR, cap)
        has_cap = True
    except OSError:
        has_cap = False
    harden_snapshot(snap)
    for name, mode in modes.items():
        assert stat.S_IMODE(os.lstat(snap / "usr/bin" / name).st_mode) == mode & 0o777, name
    assert stat.S_IMODE(os.lstat(outside).st_mode) == 0o4755  # the link's target untouched
    if ROOT:
        assert has_cap, "root could not set a file capability on this filesystem"
    if has_cap:
        assert CAPABILITY_XATTR not in os.listxattr(capped, follow_symlinks=False)
