"""Hostile images: every case names its attack class and checks the host stays untouched.

"The host" is a sentinel directory next to the snapshot (``tmp_path/host``); absolute paths in
the archives point at it, never at real system paths.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from sandbox_kernel.errors import DigestMismatch, ImageError, UnsafeArchiveError
from sandbox_kernel.images import oci
from sandbox_kernel.images.extract import ExtractLimits, ExtractReport, extract_tar_stream
from sandbox_kernel.images.importer import import_path
from sandbox_kernel.images.store import ImageStore

ROOT = os.geteuid() == 0


# (name, kind, payload[, pax headers]): a file's data, a link's target, a device's
# (major, minor), None otherwise
Payload = str | bytes | tuple[int, int] | None
TarEntry = tuple[str, str, Payload] | tuple[str, str, Payload, dict[str, str]]


def tar_bytes(entries: list[TarEntry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, kind, payload, [pax headers]) with kind f/d/l/h/c/b/p."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            name, kind, payload = e[:3]
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "d" else 0o644
            if len(e) > 3:
                ti.pax_headers = e[3]
            if kind == "f":
                assert isinstance(payload, (str, bytes))
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
            if kind in "cb":
                assert isinstance(payload, tuple)
                ti.devmajor, ti.devminor = payload
            tf.addfile(ti)
    return buf.getvalue()


class Host:
    """A sentinel directory standing for the host filesystem."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "host"
        self.dir.mkdir()
        (self.dir / "secret").write_text("top secret")
        (self.dir / "target").write_text("original")
        self.snap = tmp_path / "snap"
        self.snap.mkdir()
        self.before = self.listing()

    def listing(self) -> dict[str, tuple[int, bytes]]:
        out = {}
        for p in sorted(self.dir.rglob("*")):
            st = os.lstat(p)
            out[str(p)] = (st.st_mode, p.read_bytes() if p.is_file() else b"")
        return out

    def assert_untouched(self) -> None:
        assert self.listing() == self.before
        # and nothing was created next to the snapshot either
        assert sorted(x.name for x in self.dir.parent.iterdir()) == ["host", "snap"]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def run(host: Host, entries: list[TarEntry], limits: ExtractLimits | None = None) -> ExtractReport:
    data = tar_bytes(entries)
    if limits:
        return extract_tar_stream(io.BytesIO(data), host.snap, limits=limits)
    return extract_tar_stream(io.BytesIO(data), host.snap)


# --- path traversal ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../host/pwned", "a/../../host/pwned", "./../host/pwned", "././a/./../../host/pwned"],
    ids=["dotdot", "nested-dotdot", "dot-slash-dotdot", "dot-tricks"],
)
def test_cve_2019_14271_like_path_traversal(host: Host, name: str) -> None:
    """CVE-2019-14271-like path traversal: '..' components in member names are refused."""
    with pytest.raises(UnsafeArchiveError, match=r"\.\."):
        run(host, [(name, "f", "pwned")])
    host.assert_untouched()


def test_absolute_member_name_is_neutralised(host: Host) -> None:
    """Absolute path names: the leading '/' is stripped, the file lands inside the snapshot."""
    target = host.dir / "pwned"
    run(host, [(str(target), "f", "x"), (str(host.dir / "target"), "f", "overwritten")])
    inside = host.snap / str(target).lstrip("/")
    assert inside.read_text() == "x"
    assert (host.snap / str(host.dir / "target").lstrip("/")).read_text() == "overwritten"
    host.assert_untouched()


# --- symlinks ----------------------------------------------------------------------------------


def test_symlink_write_through_cve_2018_15664_class(host: Host) -> None:
    """Symlink write-through (CVE-2018-15664 class): relative symlink out, then a file under it."""
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        run(host, [("link", "l", "../host"), ("link/pwned", "f", "x")])
    host.assert_untouched()


def test_absolute_symlink_then_write_through(host: Host) -> None:
    """Absolute symlink to the host, then writes through it: refused, never followed."""
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        run(host, [("abs", "l", str(host.dir)), ("abs/target", "f", "overwritten")])
    host.assert_untouched()


def test_symlink_then_same_name_file_replaces_link(host: Host) -> None:
    """Symlink then a regular file of the same name: the link is replaced, not written through."""
    run(host, [("evil", "l", str(host.dir / "target")), ("evil", "f", "inside")])
    assert (host.snap / "evil").read_text() == "inside"
    assert not (host.snap / "evil").is_symlink()
    host.assert_untouched()


def test_symlink_then_directory_entry_through_it(host: Host) -> None:
    """Symlink then a directory entry below it (mkdir through a link): refused."""
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        run(host, [("d", "l", str(host.dir)), ("d/newdir/", "d", None)])
    host.assert_untouched()


def test_proc_and_dev_symlinks_flagged_not_followed(host: Host) -> None:
    """/proc or /dev as a symlink in a layer: kept (the runtime refuses it) but flagged, and
    never followed during extraction."""
    rep = run(host, [("proc", "l", str(host.dir)), ("dev", "l", "/dev")])
    assert os.readlink(host.snap / "proc") == str(host.dir)
    assert any("/proc" in f for f in rep.flagged) and any("/dev" in f for f in rep.flagged)
    with pytest.raises(UnsafeArchiveError):
        run(host, [("proc/self", "f", "x")])
    host.assert_untouched()


# --- hard links --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["../host/secret", "HOSTABS", "etc/not-extracted", "dir"],
    ids=["relative-outside", "absolute-outside", "not-yet-extracted", "directory"],
)
def test_hardlink_to_outside_or_missing(host: Host, target: str) -> None:
    """Hard link to a file outside the snapshot (or not a regular file extracted before)."""
    if target == "HOSTABS":
        target = str(host.dir / "secret")
    with pytest.raises(UnsafeArchiveError):
        run(host, [("dir/", "d", None), ("hl", "h", target)])
    assert not (host.snap / "hl").exists()
    host.assert_untouched()


def test_hardlink_through_symlink(host: Host) -> None:
    """Hard link whose target path goes through a symlink to the host: refused."""
    with pytest.raises(UnsafeArchiveError):
        run(host, [("s", "l", str(host.dir)), ("hl", "h", "s/secret")])
    host.assert_untouched()
    assert os.stat(host.dir / "secret").st_nlink == 1


# --- whiteouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a/.wh..", "a/.wh.", ".wh.", "../.wh.secret"], ids=["dotdot", "bare-a", "bare", "up"]
)
def test_bad_whiteouts(host: Host, name: str) -> None:
    """'..' whiteout and bare '.wh.': refused, nothing deleted or created outside."""
    with pytest.raises(UnsafeArchiveError):
        run(host, [("a/", "d", None), (name, "f", "")])
    host.assert_untouched()


def test_whiteout_through_symlink(host: Host) -> None:
    """Whiteout under a symlinked dir (would delete/mknod on the host): refused."""
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        run(host, [("s", "l", str(host.dir)), ("s/.wh.secret", "f", "")])
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        run(host, [("s2", "l", str(host.dir)), ("s2/.wh..wh..opq", "f", "")])
    host.assert_untouched()
    assert not {"trusted.overlay.opaque", "user.overlay.opaque"} & set(os.listxattr(host.dir))


# --- special files and xattrs ------------------------------------------------------------------


def test_device_nodes_skipped(host: Host) -> None:
    """Device nodes (a raw disk, /dev/mem) in a layer: skipped with a warning, never created."""
    rep = run(host, [("dev/", "d", None), ("dev/sda", "b", (8, 0)), ("dev/mem", "c", (1, 1))])
    assert not (host.snap / "dev/sda").exists() and not (host.snap / "dev/mem").exists()
    assert len(rep.skipped) == 2
    host.assert_untouched()


def test_fifo_skipped(host: Host) -> None:
    """FIFOs (blocking opens in the kernel's container): skipped, never created."""
    rep = run(host, [("pipe", "p", None)])
    assert not os.path.lexists(host.snap / "pipe")
    assert rep.skipped == ["pipe (fifo)"]


def test_overlay_xattrs_from_archive_not_applied(host: Host) -> None:
    """Overlay xattrs (trusted.overlay.*) smuggled in PAX headers: not applied, reported."""
    pax = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
    }
    rep = run(host, [("d/", "d", None, pax), ("d/f", "f", "x", {"SCHILY.xattr.user.x": "1"})])
    assert os.listxattr(host.snap / "d") == []
    assert os.listxattr(host.snap / "d/f") == []
    assert len(rep.dropped_xattrs) == 3


def test_security_capability_xattr_stripped(host: Host) -> None:
    """File capabilities (security.capability xattr) and the setuid bit in a layer: both
    stripped (kernels run with no_new_privs; on the host a setuid file in a snapshot would
    give any user the image's root)."""
    cap = "\x01\x00\x00\x02\xff\xff\xff\xff" + "\x00" * 12
    tarb = io.BytesIO()
    with tarfile.open(fileobj=tarb, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("bin/ping")
        ti.size, ti.mode = 3, 0o4755
        ti.pax_headers = {"SCHILY.xattr.security.capability": cap}
        tf.addfile(ti, io.BytesIO(b"ELF"))
    rep = extract_tar_stream(io.BytesIO(tarb.getvalue()), host.snap)
    assert "security.capability" not in os.listxattr(host.snap / "bin/ping")
    assert stat.S_IMODE(os.stat(host.snap / "bin/ping").st_mode) == 0o755
    assert rep.dropped_xattrs == ["bin/ping: security.capability"]
    assert rep.setid_stripped == 1


# --- bombs -------------------------------------------------------------------------------------


def test_decompression_bomb_total_bytes(tmp_path: Path) -> None:
    """Decompression bomb: a small gzip layer expanding past the total-bytes limit."""
    raw = tar_bytes([(f"z{i}", "f", b"\0" * (1 << 20)) for i in range(4)])
    blob = gzip.compress(raw)
    assert len(blob) < 50_000
    store = ImageStore(tmp_path / "state", limits=ExtractLimits(max_total_bytes=3 << 20))
    (tmp_path / "l.gz").write_bytes(blob)
    with pytest.raises(UnsafeArchiveError, match="bomb"):
        store.add_layer_blob(tmp_path / "l.gz", oci.MT_OCI_LAYER_GZIP)
    assert [p for p in store.snapshots_dir.iterdir() if p.name != ".format"] == []
    assert list(store.tmp_dir.iterdir()) == []  # the partial unpack was removed


@pytest.mark.parametrize("kind", ["per-file", "entries", "pax-header"])
def test_bomb_limits(host: Host, kind: str) -> None:
    """Decompression bomb variants: one huge file, an entry flood, a huge PAX header."""
    entries: list[TarEntry]
    if kind == "per-file":
        entries = [("big", "f", b"\0" * 5000)]
        limits = ExtractLimits(max_file_size=4096)
    elif kind == "entries":
        entries = [(f"f{i}", "f", "") for i in range(20)]
        limits = ExtractLimits(max_entries=10)
    else:
        entries = [("x", "f", "", {"comment": "A" * 10000})]
        limits = ExtractLimits(max_header_bytes=4096)
    with pytest.raises(UnsafeArchiveError):
        run(host, entries, limits)
    host.assert_untouched()


# --- manifests, digests, media types -----------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layout(tmp_path: Path, *, tamper: str = "") -> Path:
    """An OCI layout with one gzip layer; ``tamper`` breaks one thing."""
    root = tmp_path / "layout"
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        (blobs / sha(data)[7:]).write_bytes(data)
        return sha(data)

    raw = tar_bytes([("etc/a", "f", "a")])
    blob = gzip.compress(raw)
    ldig = put(blob)
    lsize = len(blob)
    if tamper == "digest":
        (blobs / ldig[7:]).write_bytes(gzip.compress(tar_bytes([("etc/a", "f", "EVIL")])))
    if tamper == "size":
        lsize -= 1
    diff = sha(raw) if tamper != "diff_id" else sha(b"other")
    cfg = json.dumps(
        {
            "architecture": oci.host_architecture(),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff]},
        }
    ).encode()
    cdig = put(cfg)
    layer_mt = oci.MT_OCI_CONFIG if tamper == "layer-mt" else oci.MT_OCI_LAYER_GZIP
    man = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_MANIFEST,
        "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": cdig, "size": len(cfg)},
        "layers": [{"mediaType": layer_mt, "digest": ldig, "size": lsize}],
    }
    if tamper == "oversized":
        man["annotations"] = {"pad": "x" * (oci.MAX_JSON_BYTES + 10)}
    mbytes = json.dumps(man).encode()
    mdig = put(mbytes)
    entry = {
        "mediaType": oci.MT_OCI_MANIFEST,
        "digest": mdig,
        "size": len(mbytes),
        "annotations": {oci.ANNOTATION_REF_NAME: "evil:1"},
    }
    if tamper == "index-as-manifest":
        idx = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": []})
        idig = put(idx.encode())
        entry.update(digest=idig, size=len(idx))  # an index behind a manifest media type
    if tamper == "config-as-manifest":
        entry.update(digest=cdig, size=len(cfg))
    if tamper == "path-digest":
        entry["digest"] = "sha256:../../../../host/secret"
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return root


@pytest.mark.parametrize(
    ("tamper", "exc"),
    [
        ("digest", DigestMismatch),
        ("size", DigestMismatch),
        ("diff_id", DigestMismatch),
        ("layer-mt", UnsafeArchiveError),
        ("index-as-manifest", UnsafeArchiveError),
        ("config-as-manifest", UnsafeArchiveError),
        ("oversized", UnsafeArchiveError),
        ("path-digest", UnsafeArchiveError),
    ],
    ids=[
        "digest-mismatch",
        "size-mismatch",
        "diff-id-mismatch",
        "media-type-confusion-layer",
        "media-type-confusion-index-as-manifest",
        "media-type-confusion-config-as-manifest",
        "oversized-manifest",
        "digest-path-traversal",
    ],
)
def test_hostile_layouts_rejected(tmp_path: Path, tamper: str, exc: type[Exception]) -> None:
    """Digest / size / diff_id mismatch, media-type confusion, oversized manifest, digest
    traversal: the import is refused and the store holds no image and no snapshot."""
    assert issubclass(exc, ImageError)
    (tmp_path / "host").mkdir()
    (tmp_path / "host/secret").write_text("s")
    store = ImageStore(tmp_path / "state")
    with pytest.raises(exc):
        import_path(store, layout(tmp_path, tamper=tamper))
    assert store.list() == []
    assert [p for p in store.snapshots_dir.iterdir() if p.name != ".format"] == []
    assert list(store.tmp_dir.iterdir()) == []


def test_sanity_untampered_layout_imports(tmp_path: Path) -> None:
    """Control for the cases above: the same layout, untampered, imports."""
    store = ImageStore(tmp_path / "state")
    (im,) = import_path(store, layout(tmp_path))
    assert (im.layers[0].snapshot / "etc/a").read_text() == "a"


@pytest.mark.parametrize("kind", ["deep", "long-component"])
def test_path_depth_and_length_bombs(host: Host, kind: str) -> None:
    """Path bombs: thousands of components (recursion/stack exhaustion) or a component longer
    than NAME_MAX: refused with a clear error, not a crash."""
    name = "a/" * 5000 + "f" if kind == "deep" else "d/" + "x" * 300
    with pytest.raises(ImageError):
        run(host, [(name, "f", "x")])
    host.assert_untouched()
