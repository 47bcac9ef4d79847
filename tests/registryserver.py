"""The reference registry server (Debian's docker-registry) on loopback, for the registry
tests and the registry benchmark: a free port on 127.0.0.1, its own storage, config and
htpasswd file, optionally TLS from a CA made here with openssl; stopped by its pid."""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox_kernel.images import oci

USER, PASSWORD = "teacher", "pw-course-2026"


class ToolMissing(RuntimeError):
    """A program the registry needs is not installed (``make deps`` installs it)."""


def need(tool: str) -> str:
    """The path of ``tool``; ToolMissing naming the fix when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        raise ToolMissing(f"{tool} is not installed (make deps installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str
    storage: Path
    ca: Path | None
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}"

    def blob_file(self, digest: str) -> Path:
        hexd = oci.digest_hex(digest)
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def put(self, path: str, body: bytes, content_type: str) -> None:
        """PUT with basic auth (the test's own requests, e.g. an index)."""
        req = urllib.request.Request(self.url + path, data=body, method="PUT")
        req.add_header("Content-Type", content_type)
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {auth}")
        with urllib.request.urlopen(req, timeout=30) as r:  # loopback, no TLS here
            assert r.status == 201


def _make_ca(d: Path) -> Path:
    openssl = need("openssl")

    def run(*a: str) -> None:
        subprocess.run([openssl, *a], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=skt test CA",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"))  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"),
        "-out", str(d / "srv.pem"))  # fmt: skip
    return d / "ca.pem"


def start_registry(tmp: Path, tls: bool) -> Registry:
    binary = need("docker-registry")
    htpasswd = need("htpasswd")
    tmp.mkdir(parents=True)
    pw = subprocess.run(
        [htpasswd, "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
    ).stdout
    (tmp / "htpasswd").write_text(pw)
    port = free_port()
    ca = _make_ca(tmp) if tls else None
    tls_cfg = (
        f"  tls:\n    certificate: {tmp / 'srv.pem'}\n    key: {tmp / 'srv.key'}\n" if tls else ""
    )
    (tmp / "config.yml").write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{tls_cfg}"
        f"auth:\n  htpasswd:\n    realm: skt-test\n    path: {tmp / 'htpasswd'}\n"
    )
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115 - kept for the registry's life
    proc = subprocess.Popen([binary, "serve", str(tmp / "config.yml")], stdout=log, stderr=log)
    reg = Registry(f"127.0.0.1:{port}", tmp / "data", ca, proc)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return reg
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError((tmp / "registry.log").read_text())


def stop_registry(reg: Registry) -> None:
    reg.proc.terminate()  # by its pid: the Popen we started
    try:
        reg.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reg.proc.kill()
        reg.proc.wait()


@contextlib.contextmanager
def running_registry(tmp: Path, tls: bool = False) -> Iterator[Registry]:
    """A registry for the block (see ``start_registry``), stopped after it."""
    r = start_registry(tmp, tls=tls)
    try:
        yield r
    finally:
        stop_registry(r)
