"""The reference registry server (Debian's docker-registry) on loopback, for the registry
tests and the registry benchmark: a free port on 127.0.0.1, its own storage, config and
htpasswd file, optionally TLS from a CA made here with openssl; stopped by its pid."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import subprocess
import threading
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


#: At most this many connections through a ``CuttingProxy`` at once (a pull opens four).
PROXY_MAX_CONNECTIONS = 32
_HEAD_LIMIT = 64 * 1024
_RELAY_CHUNK = 64 * 1024
_AUTHORIZATION = re.compile(r"^(Authorization:).*?(?=\r?$)", re.IGNORECASE | re.MULTILINE)


class CuttingProxy:
    """A plain-http proxy on 127.0.0.1 (a free port) in front of the registry ``upstream``
    (HOST:PORT), for the tests of a pull that is cut or stopped: one request per connection
    (its head is forwarded with ``Connection: close``), the response relayed as it comes.
    ``cut_after`` N: the first response whose body is over N bytes is cut once, after N of
    them (both sockets closed). ``pause_after`` N: every body over N bytes stops after N of
    them until the proxy is stopped. ``events`` keeps, in order, ``("request", head)`` for
    each request head it forwarded (its Authorization value left out) and ``("cut",
    request line)`` / ``("pause", request line)``. Started by ``start`` on a thread (one
    more per connection, at most ``PROXY_MAX_CONNECTIONS``), stopped by ``stop``; used as
    ``with CuttingProxy(...) as p``."""

    def __init__(
        self, upstream: str, *, cut_after: int | None = None, pause_after: int | None = None
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.pause_after = pause_after
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._cut_done = False
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(PROXY_MAX_CONNECTIONS)
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> CuttingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        t = threading.Thread(target=self._accept, name=f"proxy {self.host}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stop accepting, release paused bodies, close every connection and wait (bounded)
        for the threads. Called by the test in a finally (``__exit__``)."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=30)
        self._listener.close()

    def requests(self) -> list[str]:
        """The request heads forwarded so far, in order."""
        with self._lock:
            return [text for kind, text in self.events if kind == "request"]

    def range_starts(self, digest: str) -> list[int]:
        """N of each ``Range: bytes=N-`` request forwarded for blob ``digest``, in order."""
        out = []
        for head in self.requests():
            if f"/blobs/{digest} " not in head.split("\r\n", 1)[0]:
                continue
            m = re.search(r"^Range: bytes=(\d+)-\r?$", head, re.IGNORECASE | re.MULTILINE)
            if m:
                out.append(int(m.group(1)))
        return out

    def _note(self, kind: str, text: str) -> None:
        with self._lock:
            self.events.append((kind, text))

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(timeout=10):
                conn.close()  # over the bound: the client sees a cut connection
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    self._slots.release()
                    return
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client, socket.create_connection(self.upstream, timeout=60) as up:
                client.settimeout(60)
                with self._lock:
                    self._open |= {client, up}
                try:
                    self._relay(client, up)
                finally:
                    with self._lock:
                        self._open -= {client, up}
        except OSError:
            pass  # a side went away: so does the other
        finally:
            self._slots.release()

    def _relay(self, client: socket.socket, up: socket.socket) -> None:
        request_line = self._forward_request(client, up)
        if request_line is None:
            return
        head, body = _read_head(up)
        if head is None:
            return
        client.sendall(head)
        text = head.decode("latin-1")
        length = _content_length(text)
        if request_line.startswith("HEAD ") or text.split(" ", 2)[1:2] in (["204"], ["304"]):
            length = 0
        stop_at, kind = self._stop_point(length)
        sent = 0
        while length is None or sent < length:
            data = body or up.recv(_RELAY_CHUNK)
            body = b""
            if not data:
                return
            end = min(x for x in (length, stop_at, sent + len(data)) if x is not None)
            client.sendall(data[: end - sent])
            sent = end
            if sent == stop_at:
                self._note(kind, request_line)
                if kind == "pause":
                    self._stop.wait(timeout=300)
                client.shutdown(socket.SHUT_RDWR)
                return

    def _forward_request(self, client: socket.socket, up: socket.socket) -> str | None:
        """Read one request from ``client``, note its head and send it on to ``up`` with
        ``Connection: close`` (its body too, by its Content-Length); its request line, or
        None when the client went away first."""
        head, rest = _read_head(client)
        if head is None:
            return None
        text = head.decode("latin-1")
        self._note("request", _AUTHORIZATION.sub(r"\1 <not kept>", text))
        request_line, *lines = text.split("\r\n")
        kept = [
            ln for ln in lines if ln and not ln.lower().startswith(("connection:", "keep-alive:"))
        ]
        out = "\r\n".join([request_line, *kept, "Connection: close"]) + "\r\n\r\n"
        up.sendall(out.encode("latin-1"))
        left = _content_length(text) or 0
        while left > 0:  # a request body (a pull sends none), streamed as it comes
            data = (rest or client.recv(_RELAY_CHUNK))[:left]
            rest = b""
            if not data:
                return None
            up.sendall(data)
            left -= len(data)
        return request_line

    def _stop_point(self, length: int | None) -> tuple[int | None, str]:
        """Where the body of ``length`` bytes stops early: (N, "cut") for the first one over
        ``cut_after``, (N, "pause") for one over ``pause_after``, else (None, "")."""
        if length is None:
            return None, ""
        if self.cut_after is not None and length > self.cut_after:
            with self._lock:
                if not self._cut_done:
                    self._cut_done = True
                    return self.cut_after, "cut"
        if self.pause_after is not None and length > self.pause_after:
            return self.pause_after, "pause"
        return None, ""


def _read_head(s: socket.socket) -> tuple[bytes | None, bytes]:
    """(the HTTP head read from ``s`` through its blank line, the bytes read after it);
    (None, b"") when ``s`` closes first or the head is over ``_HEAD_LIMIT``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _HEAD_LIMIT:
            return None, b""
        data = s.recv(_RELAY_CHUNK)
        if not data:
            return None, b""
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _content_length(head: str) -> int | None:
    m = re.search(r"^Content-Length:\s*(\d+)\s*$", head, re.IGNORECASE | re.MULTILINE)
    return int(m.group(1)) if m else None
