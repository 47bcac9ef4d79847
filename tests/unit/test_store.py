"""The image store: layers, images, resolve/list/remove/gc, build cache, import and export."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from sandbox_kernel.errors import DigestMismatch, ImageError, ImageInUse, ImageNotFound
from sandbox_kernel.images import oci
from sandbox_kernel.images.exporter import export_images
from sandbox_kernel.images.importer import import_path
from sandbox_kernel.images.labels import LABEL_ARGV
from sandbox_kernel.images.store import (
    Image,
    ImageConfig,
    ImageStore,
    image_in_use,
    running_image_digests,
)

ROOT = os.geteuid() == 0


def tar_bytes(files: dict[str, str | None]) -> bytes:
    """name -> content (None: directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if content is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                data = content.encode()
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layout(
    root: Path, layers: list[bytes], ref: str | None = "img:1", compression: str = "gzip"
) -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        d = sha(data)
        (blobs / d[7:]).write_bytes(data)
        return d

    descs = []
    for raw in layers:
        blob = gzip.compress(raw) if compression == "gzip" else raw
        descs.append(
            {
                "mediaType": oci.COMPRESSION_MEDIA_TYPE[compression],
                "digest": put(blob),
                "size": len(blob),
            }
        )
    cfg = json.dumps(
        {
            "architecture": oci.host_architecture(),
            "os": "linux",
            "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        }
    ).encode()
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": put(cfg), "size": len(cfg)},
            "layers": descs,
        }
    ).encode()
    entry: dict[str, object] = {
        "mediaType": oci.MT_OCI_MANIFEST,
        "digest": put(man),
        "size": len(man),
    }
    if ref:
        entry["annotations"] = {oci.ANNOTATION_REF_NAME: ref}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return root


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "state")


def layer_dir(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    d = tmp_path / name
    for rel, content in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(content)
    return d


def test_layout_files(store: ImageStore) -> None:
    store.list()
    assert json.loads((store.root / "oci/oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    assert json.loads((store.root / "oci/index.json").read_text())["manifests"] == []


def test_add_layer_from_dir_write_image_resolve(store: ImageStore, tmp_path: Path) -> None:
    base = store.add_layer_from_dir(layer_dir(tmp_path, "l1", {"etc/os": "base"}))
    top = store.add_layer_from_dir(
        layer_dir(tmp_path, "l2", {"opt/app": "app"}), compression="zstd"
    )
    assert not (tmp_path / "l1").exists()  # the source dir was given up (moved)
    assert base.snapshot == store.root / "snapshots" / base.diff_id[7:]
    assert (base.snapshot / "etc/os").read_text() == "base"
    assert top.media_type == oci.MT_OCI_LAYER_ZSTD
    cfg = ImageConfig(
        env=(("PATH", "/usr/bin"),),
        cmd=("python3",),
        labels=((LABEL_ARGV, '["python3","-m","ipykernel","-f","{connection_file}"]'),),
    )
    im = store.write_image("python2.7", "latest", [base, top], cfg, history=["a", "b", "env"])
    assert im.lowerdirs() == (str(top.snapshot), str(base.snapshot))
    assert im.size == base.size + top.size
    assert im.kernel_argv() == ("python3", "-m", "ipykernel", "-f", "{connection_file}")
    again = store.resolve("python2.7")
    assert again == im
    assert store.resolve("python2.7:latest").digest == im.digest
    assert store.resolve(im.digest[:15]).digest == im.digest
    assert store.resolve(im.digest).config.env == (("PATH", "/usr/bin"),)
    # the layer tar is deterministic: the same tree (same mtimes) gives the same digest
    trees = []
    for name in ("t1", "t2"):
        d = layer_dir(tmp_path, name, {"etc/os": "base", "etc/b": "b"})
        for p in (d / "etc/os", d / "etc/b", d / "etc"):
            os.utime(p, (1_600_000_000, 1_600_000_000))
        trees.append(store.add_layer_from_dir(d))
    assert trees[0] == trees[1]


def test_layer_blob_digest_verified(store: ImageStore, tmp_path: Path) -> None:
    raw = tar_bytes({"a": "a"})
    blob = tmp_path / "layer.tar"
    blob.write_bytes(raw)
    layer = store.add_layer_blob(blob, oci.MT_OCI_LAYER_TAR, sha(raw))
    assert layer.diff_id == sha(raw) == layer.digest
    with pytest.raises(DigestMismatch):
        store.add_layer_blob(blob, oci.MT_OCI_LAYER_TAR, "sha256:" + "0" * 64)


def test_not_found_message_lists_images_and_build_hint(store: ImageStore, tmp_path: Path) -> None:
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "l", {"x": "x"}))
    store.write_image("python3", "latest", [layer], ImageConfig())
    with pytest.raises(ImageNotFound) as ei:
        store.resolve("python2.7")
    msg = str(ei.value)
    assert "'python2.7' not found" in msg and "python3:latest" in msg
    assert "sandbox-kernel image build python2.7" in msg
    with pytest.raises(ImageError):
        store.write_image("Bad/Name", "latest", [layer], ImageConfig())


def test_retag_replaces_and_list(store: ImageStore, tmp_path: Path) -> None:
    l1 = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "1"}))
    l2 = store.add_layer_from_dir(layer_dir(tmp_path, "b", {"x": "2"}))
    store.write_image("py", "latest", [l1], ImageConfig())
    store.write_image("py", "v2", [l2], ImageConfig())
    im = store.write_image("py", "latest", [l2], ImageConfig(cmd=("x",)))
    assert [(i.name, i.tag) for i in store.list()] == [("py", "latest"), ("py", "v2")]
    assert store.resolve("py").digest == im.digest


def test_remove_refuses_in_use_then_gc(store: ImageStore, tmp_path: Path) -> None:
    keep = store.add_layer_from_dir(layer_dir(tmp_path, "k", {"k": "k"}))
    gone = store.add_layer_from_dir(layer_dir(tmp_path, "g", {"g": "g"}))
    store.write_image("keep", "latest", [keep], ImageConfig())
    im = store.write_image("gone", "latest", [keep, gone], ImageConfig())
    with pytest.raises(ImageInUse, match="gone:latest"):
        store.remove("gone", in_use=lambda image: image.digest == im.digest)
    assert store.resolve("gone").digest == im.digest
    assert store.gc(grace_seconds=0) == (0, 0)  # everything referenced
    store.remove("gone", in_use=lambda image: False)
    with pytest.raises(ImageNotFound):
        store.resolve("gone")
    assert store.gc(grace_seconds=3600) == (0, 0)  # grace protects fresh data
    blobs, snaps = store.gc(grace_seconds=0)
    assert (blobs, snaps) == (3, 1)  # layer, config, manifest; one snapshot
    assert not gone.snapshot.exists() and not store.blob_path(gone.digest).exists()
    assert keep.snapshot.exists() and store.resolve("keep").layers == (keep,)


def test_in_use_from_run_dir(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "l", {"x": "x"}))
    im = store.write_image("py", "latest", [layer], ImageConfig())
    (run / "sk-000000000001").mkdir(parents=True)
    (run / "sk-000000000001/image").write_text(im.digest + "\n")
    (run / "sk-000000000001/pid").write_text("999999999")  # dead
    assert running_image_digests(run) == set()
    (run / "sk-000000000001/pid").write_text(str(os.getpid()))  # alive
    assert running_image_digests(run) == {im.digest}
    # the runtime's JSON form; a different start time means the pid was reused
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        start = f.read().rsplit(b")", 1)[-1].split()[19].decode()
    pidfile = run / "sk-000000000001/pid"
    pidfile.write_text(json.dumps({"pid": os.getpid(), "start": start}))
    assert running_image_digests(run) == {im.digest}
    pidfile.write_text(json.dumps({"pid": os.getpid(), "start": "1"}))
    assert running_image_digests(run) == set()
    pidfile.write_text(json.dumps({"pid": os.getpid(), "start": start}))
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(run))
    assert image_in_use(im)
    with pytest.raises(ImageInUse):
        store.remove("py")  # default check reads the run dir


def test_layer_cache(store: ImageStore, tmp_path: Path) -> None:
    assert store.layer_cache_get("step-1") is None
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "l", {"x": "x"}))
    store.layer_cache_put("step-1", layer)
    assert store.layer_cache_get("step-1") == layer
    # snapshot removed by hand: re-unpacked from the blob
    import shutil

    shutil.rmtree(layer.snapshot)
    assert store.layer_cache_get("step-1") == layer
    assert (layer.snapshot / "x").read_text() == "x"
    store.blob_path(layer.digest).unlink()
    assert store.layer_cache_get("step-1") is None


def test_kernel_argv_label_validation() -> None:
    def img(label: str | None) -> Image:
        labels = () if label is None else ((LABEL_ARGV, label),)
        return Image("a", "b", "sha256:" + "0" * 64, ImageConfig(labels=labels), (), "", 0)

    assert img(None).kernel_argv() is None
    for bad in ('["python"]', "not json", '{"a": 1}', "[]", '[1, "{connection_file}"]'):
        with pytest.raises(ImageError, match="connection_file"):
            img(bad).kernel_argv()


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_import_oci_layout_dir(store: ImageStore, tmp_path: Path, compression: str) -> None:
    layers = [tar_bytes({"etc/": None, "etc/a": "1"}), tar_bytes({"etc/b": "2"})]
    layout = make_layout(tmp_path / "layout", layers, "docker.io/library/thing:1.0", compression)
    (im,) = import_path(store, layout)
    assert (im.name, im.tag) == ("thing", "1.0")
    assert [layer.diff_id for layer in im.layers] == [sha(x) for x in layers]
    assert (im.layers[0].snapshot / "etc/a").read_text() == "1"
    assert im.config.env == (("A", "1"),) and im.config.cmd == ("/bin/sh",)
    (renamed,) = import_path(store, layout, "other:x")
    assert renamed.ref == "other:x"


def test_import_layout_without_ref_needs_name(store: ImageStore, tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "layout", [tar_bytes({"a": "a"})], ref=None)
    with pytest.raises(ImageError, match="--name"):
        import_path(store, layout)
    (im,) = import_path(store, layout, "named")
    assert im.ref == "named:latest"


def test_import_docker_save_archive(store: ImageStore, tmp_path: Path) -> None:
    layers = [tar_bytes({"bin/": None, "bin/sh": "sh"}), tar_bytes({"etc/x": "x"})]
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "WorkingDir": "/root"},
            "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        }
    ).encode()
    cfg_name = sha(cfg)[7:] + ".json"
    members = {cfg_name: cfg}
    names = []
    for i, raw in enumerate(layers):
        members[f"l{i}/layer.tar"] = raw
        names.append(f"l{i}/layer.tar")
    members["manifest.json"] = json.dumps(
        [{"Config": cfg_name, "RepoTags": ["example/py:3.11"], "Layers": names}]
    ).encode()
    archive = tmp_path / "save.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (im,) = import_path(store, archive)
    assert im.ref == "py:3.11"
    assert im.config.working_dir == "/root"
    assert (im.layers[0].snapshot / "bin/sh").read_text() == "sh"
    assert im.layers[0].media_type == oci.MT_OCI_LAYER_TAR


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
def test_import_rootfs_tarball(store: ImageStore, tmp_path: Path, comp: str) -> None:
    raw = tar_bytes({"./": None, "./usr/": None, "./usr/hello": "hi"})
    path = (
        tmp_path / {"none": "rootfs.tar", "gzip": "rootfs.tar.gz", "zstd": "rootfs.tar.zst"}[comp]
    )
    if comp == "gzip":
        path.write_bytes(gzip.compress(raw))
    elif comp == "zstd":
        path.write_bytes(
            subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
        )
    else:
        path.write_bytes(raw)
    (im,) = import_path(store, path)
    assert im.ref == "rootfs:latest"
    assert (im.layers[0].snapshot / "usr/hello").read_text() == "hi"
    assert im.layers[0].diff_id == sha(raw)
    assert dict(im.config.env)["PATH"].startswith("/usr/local/sbin")
    (im2,) = import_path(store, path, "mine:v1")
    assert im2.ref == "mine:v1"


@pytest.mark.parametrize("as_tar", [False, True])
def test_export_then_reimport_round_trip(store: ImageStore, tmp_path: Path, as_tar: bool) -> None:
    l1 = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"etc/a": "a"}))
    l2 = store.add_layer_from_dir(layer_dir(tmp_path, "b", {"etc/b": "b"}), compression="zstd")
    im = store.write_image("rt", "v1", [l1, l2], ImageConfig(env=(("X", "1"),), user="1000"))
    dest = tmp_path / ("exp.tar" if as_tar else "exp")
    export_images(store, ["rt:v1"], dest)
    if not as_tar:
        index = json.loads((dest / "index.json").read_text())
        assert index["manifests"][0]["annotations"][oci.ANNOTATION_REF_NAME] == "rt:v1"
        assert index["manifests"][0]["digest"] == im.digest
    other = ImageStore(tmp_path / "other")
    (back,) = import_path(other, dest)
    assert back.ref == "rt:v1"
    assert back.config == im.config
    assert [x.digest for x in back.layers] == [x.digest for x in im.layers]
    assert [x.diff_id for x in back.layers] == [x.diff_id for x in im.layers]
    assert (back.layers[1].snapshot / "etc/b").read_text() == "b"


def test_export_refuses_foreign_dir(store: ImageStore, tmp_path: Path) -> None:
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "x"}))
    store.write_image("e", "latest", [layer], ImageConfig())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/file").write_text("mine")
    with pytest.raises(ImageError, match="not an OCI layout"):
        export_images(store, ["e"], tmp_path / "junk")


def test_corrupted_store_blob_detected(store: ImageStore, tmp_path: Path) -> None:
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "x"}))
    im = store.write_image("c", "latest", [layer], ImageConfig())
    store.blob_path(im.digest).write_bytes(b'{"schemaVersion":2}')
    with pytest.raises(ImageNotFound):
        store.resolve("c")  # unreadable entries are skipped by list()
    with pytest.raises(DigestMismatch):
        store.read_blob(im.digest)


@pytest.mark.skipif(not ROOT, reason="whiteouts need root")
def test_add_layer_from_dir_with_whiteouts(store: ImageStore, tmp_path: Path) -> None:
    src = layer_dir(tmp_path, "up", {"d/f": "f"})
    os.mknod(src / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "d/f", "trusted.overlay.origin", b"junk")
    layer = store.add_layer_from_dir(src)
    snap = layer.snapshot
    assert stat.S_ISCHR(os.lstat(snap / "gone").st_mode)
    assert os.getxattr(snap / "d", "trusted.overlay.opaque") == b"y"
    assert os.listxattr(snap / "d/f") == []  # other overlay xattrs scrubbed
    # the blob unpacks to the same thing
    with gzip.open(store.blob_path(layer.digest)) as f, tarfile.open(fileobj=f) as tf:
        assert ".wh.gone" in tf.getnames() and "d/.wh..wh..opq" in tf.getnames()


def test_cli_ls_inspect_rm(
    store: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sandbox_kernel.cli import main

    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(store.root))
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(tmp_path / "run"))
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "x"}))
    im = store.write_image("python2.7", "latest", [layer], ImageConfig())
    assert main(["image", "ls"]) == 0
    out = capsys.readouterr().out
    assert "python2.7" in out and im.digest[7:19] in out and "NAME" in out
    assert main(["image", "inspect", "python2.7"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["digest"] == im.digest and doc["lowerdirs"] == [str(layer.snapshot)]
    assert main(["image", "inspect", "nope"]) == 125
    assert "not found" in capsys.readouterr().err
    assert main(["image", "rm", "python2.7"]) == 0
    assert layer.snapshot.exists()  # fresh data is kept for the grace period
    assert main(["image", "gc", "--grace", "0"]) == 0
    assert "1 snapshot" in capsys.readouterr().out
    assert not layer.snapshot.exists()
    assert main(["image", "export", "nope", str(tmp_path / "x")]) == 125


def test_concurrent_unpack_of_the_same_layer(tmp_path: Path) -> None:
    """Two stores (as two processes would) unpack the same layer at once: one snapshot wins,
    both get a complete one, no temp dir is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    raw = tar_bytes({f"d{i}/f{j}": "x" * 100 for i in range(20) for j in range(20)})
    blob = tmp_path / "l.tar.gz"
    blob.write_bytes(gzip.compress(raw))
    stores = [ImageStore(tmp_path / "state") for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        layers = list(pool.map(lambda s: s.add_layer_blob(blob, oci.MT_OCI_LAYER_GZIP), stores))
    assert len(set(layers)) == 1
    snap = layers[0].snapshot
    assert len(list(snap.rglob("f*"))) == 400
    assert list(stores[0].tmp_dir.iterdir()) == []
    assert [p.name for p in stores[0].snapshots_dir.iterdir() if p.name != ".format"] == [snap.name]


def test_not_found_without_a_recipe_says_so(store: ImageStore, tmp_path: Path) -> None:
    """No build advice for a name no recipe has: the images there, or write a recipe."""
    with pytest.raises(ImageNotFound) as ei:
        store.resolve("python3-nosuch")
    msg = str(ei.value)
    assert "image build python3-nosuch" not in msg
    assert "no recipe named 'python3-nosuch'" in msg and str(store.root) in msg


@pytest.mark.parametrize(
    "plant",
    ["oci-layout", "index.json", "blob", "blobs-folder", "sha256-folder", "fifo-index"],
)
def test_export_into_a_layout_a_kernel_wrote_never_follows_what_it_planted(
    store: ImageStore, tmp_path: Path, plant: str
) -> None:
    """The layout folder may be in a notebook folder: a link or FIFO planted under any name
    the exporter writes or reads is replaced or refused, never followed or blocked on."""
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "x"}))
    im = store.write_image("e", "latest", [layer], ImageConfig())
    dest = tmp_path / "layout"
    export_images(store, ["e"], dest)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("host secret\n")
    blob = dest / "blobs" / "sha256" / oci.digest_hex(im.digest)
    if plant == "oci-layout":
        (dest / "oci-layout").unlink()
        (dest / "oci-layout").symlink_to(secret)
    elif plant == "index.json":
        (dest / "index.json").unlink()
        (dest / "index.json").symlink_to(secret)
    elif plant == "blob":
        blob.unlink()
        blob.symlink_to(secret)
    elif plant == "blobs-folder":
        shutil.rmtree(dest / "blobs")
        (dest / "blobs").symlink_to(outside)
    elif plant == "sha256-folder":
        shutil.rmtree(dest / "blobs" / "sha256")
        (dest / "blobs" / "sha256").symlink_to(outside)
    elif plant == "fifo-index":
        (dest / "index.json").unlink()
        os.mkfifo(dest / "index.json")
    try:
        export_images(store, ["e"], dest)
    except ImageError as e:
        assert "does not follow" in str(e) or "not an OCI layout" in str(e), e
    else:
        assert not blob.is_symlink() and not (dest / "oci-layout").is_symlink()
    assert secret.read_text() == "host secret\n"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_export_to_tar_leaves_links_out(store: ImageStore, tmp_path: Path) -> None:
    layer = store.add_layer_from_dir(layer_dir(tmp_path, "a", {"x": "x"}))
    store.write_image("e", "latest", [layer], ImageConfig())
    out = tmp_path / "e.tar"
    export_images(store, ["e"], out)
    with tarfile.open(out) as tf:
        members = tf.getmembers()
    assert all(m.isfile() for m in members)
    assert {"oci-layout", "index.json"} <= {m.name for m in members}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".e.tar")]


def _compress(raw: bytes, comp: str) -> bytes:
    if comp == "gzip":
        return gzip.compress(raw)
    tool = {"zstd": ["zstd", "-q", "-c"], "xz": ["xz", "-c"], "bzip2": ["bzip2", "-c"]}[comp]
    return subprocess.run(tool, input=raw, capture_output=True, check=True).stdout


def _damaged(tmp_path: Path, kind: str) -> Path:
    """An archive of ``kind`` whose bytes end early or are overwritten in the middle: a
    rootfs tar (plain, gzip, zstd, xz, bzip2), an OCI layout or a docker-save archive."""
    raw = tar_bytes({"./": None, "./big": os.urandom(96 * 1024).hex(), "./small": "s"})
    if kind.startswith("layout"):
        layout = make_layout(tmp_path / "layout", [raw])
        data = tar_bytes_of_dir(layout)
    else:
        comp = kind.split("-")[0]
        data = raw if comp == "none" else _compress(raw, comp)
    if kind.endswith("-corrupt"):
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :]
    elif kind.endswith("-header"):
        data = data[:10]
    else:
        data = data[: len(data) // 2]
    path = tmp_path / f"damaged-{kind}.tar"
    path.write_bytes(data)
    return path


def tar_bytes_of_dir(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(root)), recursive=False)
    return buf.getvalue()


DAMAGED = [
    "none-truncated",  # ends inside a member
    "gzip-truncated",
    "gzip-header",  # ends inside the gzip header
    "gzip-corrupt",
    "zstd-truncated",
    "zstd-corrupt",
    "xz-truncated",  # xz and bzip2 are not read at all: said so, not a tar error
    "bzip2-truncated",
    "layout-truncated",  # an OCI layout tar ending inside a blob
]


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_archive_is_one_clear_error_naming_it(
    store: ImageStore, tmp_path: Path, kind: str
) -> None:
    path = _damaged(tmp_path, kind)
    with pytest.raises(ImageError) as err:
        import_path(store, path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert store.list() == []


@pytest.mark.parametrize("kind", ["gzip-truncated", "zstd-corrupt", "none-truncated"])
def test_cli_import_of_a_damaged_archive_exits_125(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from sandbox_kernel.cli import main

    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(tmp_path / "run"))
    path = _damaged(tmp_path, kind)
    assert main(["image", "import", str(path)]) == 125
    err = capsys.readouterr().err
    assert err.startswith("sandbox-kernel: error: ") and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_private_parts_are_the_owners_only(tmp_path: Path) -> None:
    from sandbox_kernel.images.store import PRIVATE_PARTS

    root = tmp_path / "state"
    (root / "tmp").mkdir(parents=True, mode=0o777)  # an older store's, or a loose umask
    os.chmod(root / "tmp", 0o777)
    old = os.umask(0)
    try:
        ImageStore(root).list()
    finally:
        os.umask(old)
    assert set(PRIVATE_PARTS) == {"tmp", "cache", "build-tmp"}
    for name in PRIVATE_PARTS:
        assert stat.S_IMODE((root / name).lstat().st_mode) == 0o700, name
    # what rootless users read of the system store stays readable
    for name in ("oci", "snapshots", "layers"):
        assert (root / name).lstat().st_mode & 0o005 == 0o005, name


def test_older_snapshots_are_upgraded_once(tmp_path: Path) -> None:
    from sandbox_kernel.images.store import SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_FILE

    root = tmp_path / "state"
    snap = root / "snapshots" / ("a" * 64)
    (snap / "bin").mkdir(parents=True)
    (snap / "bin/su").write_text("ELF")
    os.chmod(snap / "bin/su", 0o4755)
    (root / "snapshots" / SNAPSHOT_FORMAT_FILE).write_text("2\n")
    ImageStore(root).list()
    assert stat.S_IMODE((snap / "bin/su").lstat().st_mode) == 0o755
    assert (root / "snapshots" / SNAPSHOT_FORMAT_FILE).read_text().strip() == SNAPSHOT_FORMAT
