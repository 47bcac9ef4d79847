"""Digest grammar, names, and strict index / manifest / config parsing."""

from __future__ import annotations

import json

import pytest

from sandbox_kernel.errors import ImageError, UnsafeArchiveError
from sandbox_kernel.images import oci

HEX = "a" * 64
D = f"sha256:{HEX}"


def desc(mt: str, digest: str = D, size: int = 10) -> dict[str, object]:
    return {"mediaType": mt, "digest": digest, "size": size}


def manifest(**over: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_MANIFEST,
        "config": desc(oci.MT_OCI_CONFIG),
        "layers": [desc(oci.MT_OCI_LAYER_GZIP), desc(oci.MT_OCI_LAYER_ZSTD)],
    }
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("good", [D, "sha256:" + "0123456789abcdef" * 4])
def test_digest_accepts_sha256(good: str) -> None:
    assert oci.check_digest(good) == good
    assert oci.digest_hex(good) == good[7:]


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:" + "A" * 64,  # uppercase
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 128,
        "sha256:../../../etc/passwd",
        "sha256:" + "a" * 63 + "/",
        HEX,
        "",
        "sha256:" + "a" * 64 + "\n",
        None,
        42,
    ],
)
def test_digest_rejects_everything_else(bad: object) -> None:
    with pytest.raises(UnsafeArchiveError):
        oci.check_digest(bad)


def test_names_and_tags() -> None:
    assert oci.split_ref("python2.7") == ("python2.7", "latest")
    assert oci.split_ref("py3:v1.0") == ("py3", "v1.0")
    for bad in ("Python", ".x", "-x", "a//b", "/a", "a/", "a/B", "", "a b", "h:99999999/a"):
        with pytest.raises(ImageError):
            oci.check_name(bad)
    # a pulled image's full name: the registry (with its port) is not mistaken for a tag
    assert oci.split_ref("127.0.0.1:5000/course/py:2.7") == ("127.0.0.1:5000/course/py", "2.7")
    assert oci.split_ref("docker.io/library/python") == ("docker.io/library/python", "latest")
    assert oci.split_ref("[::1]:5000/a") == ("[::1]:5000/a", "latest")
    for bad in (".t", "-t", "t" * 129, "a:b", ""):
        with pytest.raises(ImageError):
            oci.check_tag(bad)
    assert oci.check_tag("_x") == "_x"


def test_manifest_parses() -> None:
    m = oci.parse_manifest(manifest())
    assert m.config.media_type == oci.MT_OCI_CONFIG
    assert [x.media_type for x in m.layers] == [oci.MT_OCI_LAYER_GZIP, oci.MT_OCI_LAYER_ZSTD]
    assert oci.layer_compression(m.layers[1].media_type) == "zstd"


def test_docker_manifest_accepted() -> None:
    m = oci.parse_manifest(
        manifest(
            mediaType=oci.MT_DOCKER_MANIFEST,
            config=desc(oci.MT_DOCKER_CONFIG),
            layers=[desc(oci.MT_DOCKER_LAYER_GZIP)],
        )
    )
    assert oci.layer_compression(m.layers[0].media_type) == "gzip"


@pytest.mark.parametrize(
    "over",
    [
        {"mediaType": oci.MT_OCI_INDEX},
        {"manifests": []},
        {"mediaType": oci.MT_OCI_CONFIG},
        {"config": desc(oci.MT_OCI_LAYER_GZIP)},
        {"layers": [desc(oci.MT_OCI_CONFIG)]},
        {"layers": [desc(oci.MT_OCI_MANIFEST)]},
    ],
    ids=[
        "index-as-manifest",
        "manifests-key",
        "config-as-manifest",
        "layer-as-config",
        "config-as-layer",
        "manifest-as-layer",
    ],
)
def test_manifest_media_type_confusion(over: dict[str, object]) -> None:
    with pytest.raises(UnsafeArchiveError, match="media-type confusion"):
        oci.parse_manifest(manifest(**over))


@pytest.mark.parametrize(
    "over",
    [
        {"schemaVersion": 1},
        {"layers": "x"},
        {"config": desc(oci.MT_OCI_CONFIG, size=-1)},
        {"config": desc(oci.MT_OCI_CONFIG, size=True)},
        {"config": {"mediaType": oci.MT_OCI_CONFIG, "size": 1}},
    ],
)
def test_manifest_malformed(over: dict[str, object]) -> None:
    with pytest.raises(ImageError):
        oci.parse_manifest(manifest(**over))


def test_bad_digest_in_descriptor_rejected_before_use() -> None:
    with pytest.raises(UnsafeArchiveError):
        oci.parse_manifest(manifest(config=desc(oci.MT_OCI_CONFIG, digest="sha256:../../x")))


def test_oversized_and_non_object_json() -> None:
    with pytest.raises(UnsafeArchiveError, match="limit"):
        oci.load_json(b" " * (oci.MAX_JSON_BYTES + 1), "manifest")
    with pytest.raises(ImageError):
        oci.load_json(b"[1,2]", "manifest")
    with pytest.raises(ImageError):
        oci.load_json(b"{", "manifest")


def test_index_parses_and_rejects_manifest_type() -> None:
    doc = {"schemaVersion": 2, "manifests": [desc(oci.MT_OCI_MANIFEST)]}
    idx = oci.parse_index(json.dumps(doc).encode())
    assert idx.manifests[0].digest == D
    doc["mediaType"] = oci.MT_OCI_MANIFEST
    with pytest.raises(UnsafeArchiveError):
        oci.parse_index(json.dumps(doc).encode())


def test_config_parse() -> None:
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "A=b=c"],
            "Cmd": ["python3"],
            "Labels": {"b": "2", "a": "1"},
            "WorkingDir": "/work",
        },
        "rootfs": {"type": "layers", "diff_ids": [D]},
        "history": [{"created_by": "step 1"}, {"created_by": "step 2", "empty_layer": True}],
    }
    c = oci.parse_config(json.dumps(cfg).encode())
    assert c.env == (("PATH", "/bin"), ("A", "b=c"))
    assert c.labels == (("a", "1"), ("b", "2"))
    assert c.working_dir == "/work" and c.cmd == ("python3",)
    assert c.diff_ids == (D,) and c.history == ("step 1", "step 2")
    cfg["rootfs"] = {"type": "layers", "diff_ids": ["md5:abc"]}
    with pytest.raises(UnsafeArchiveError):
        oci.parse_config(json.dumps(cfg).encode())
    with pytest.raises(UnsafeArchiveError, match="confusion"):
        oci.parse_config(manifest())


def test_dump_json_is_canonical() -> None:
    assert oci.dump_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
