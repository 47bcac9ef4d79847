"""A small client of the OCI distribution protocol (Docker Registry HTTP API v2): pull and push.

Layer: images (no Jupyter). Written on the standard library (``http.client`` and ``ssl``); see
docs/registries.md for why, for the order of the credential files, for mirrors and for what is
verified. Everything a registry sends is hostile: manifests and indexes are size-bounded and
their media types checked strictly (``oci.parse_*``), every blob's size and digest is verified
before the store installs it, layers go through the store's safe extractor, and credentials
never follow a redirect to another host.

``sandbox-kernel image pull`` calls ``pull``; ``sandbox-kernel image push`` calls ``push``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import DigestMismatch, ImageError, RegistryError, UnsafeArchiveError
from . import oci
from .compression import COPY_CHUNK
from .extract import ExtractLimits
from .reference import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Reference,
    digest_tag,
    parse_reference,
    split_url,
)
from .store import Image, ImageStore, Layer

#: Mirrors: ``REGISTRY=URL[,REGISTRY=URL...]`` (see docs/registries.md).
MIRRORS_ENV = "SANDBOX_KERNEL_REGISTRY_MIRRORS"
MANIFEST_ACCEPT = ", ".join(
    [oci.MT_OCI_MANIFEST, oci.MT_DOCKER_MANIFEST, oci.MT_OCI_INDEX, oci.MT_DOCKER_LIST]
)
MAX_REDIRECTS = 5
MAX_AUTH_FILE_BYTES = 1 << 20
MAX_ERROR_BYTES = 64 * 1024
PULL_THREADS = 4
#: Bytes per PATCH of a chunked upload (a registry may ask for more: OCI-Chunk-Min-Length).
UPLOAD_CHUNK = 8 << 20
RESUME_ATTEMPTS = 5
TIMEOUT_S = 60.0

# --- references and hosts ----------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (plain http is used for them straight away)."""
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL split by ``split_url``: what 'the same host' means."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str, limit: int = 300) -> str:
    """Registry-provided ``text`` (error codes and messages, HTTP reasons) fit to print: control
    characters become '?', at most ``limit`` characters."""
    return _CONTROL.sub("?", text[:limit])


def _host_only(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1 : hostport.index("]")]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


# --- credentials -------------------------------------------------------------------------------


def auth_files() -> list[Path]:
    """The credential files, in the order they are read (the first with an entry for the
    repository wins; see docs/registries.md): ``$REGISTRY_AUTH_FILE``; podman's
    (containers-auth.json(5)) ``$XDG_RUNTIME_DIR/containers/auth.json``, or
    ``/run/containers/$UID/auth.json`` when ``XDG_RUNTIME_DIR`` is unset, then
    ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``; docker's
    ``$DOCKER_CONFIG/config.json`` and ``~/.docker/config.json``. Called by
    ``credentials_from_files``."""
    out: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    else:
        out.append(Path("/run/containers") / str(os.geteuid()) / "auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    out.append(Path(config_home) / "containers" / "auth.json")
    if os.environ.get("DOCKER_CONFIG"):
        out.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    out.append(Path.home() / ".docker" / "config.json")
    return out


def _auth_keys(registry: str, repository: str) -> list[str]:
    """The auth-file keys that name ``registry/repository``, most specific first:
    ``REGISTRY/NS/REPO``, ``REGISTRY/NS``, ..., ``REGISTRY`` (Docker Hub under each of its
    host names). Called by ``credentials_from_files``."""
    hosts = (
        [DOCKER_HUB, "index.docker.io", DOCKER_HUB_API] if registry == DOCKER_HUB else [registry]
    )
    parts = [p for p in repository.split("/") if p]
    return [
        f"{host}/{'/'.join(parts[:n])}" if n else host
        for n in range(len(parts), -1, -1)
        for host in hosts
    ]


def _norm_auth_key(key: str) -> str:
    """An auth-file key as ``_auth_keys`` spells them: a URL key (``https://host/v1/``,
    docker's) and a key whose only path is ``/v1`` or ``/v2`` name the host alone; any other
    key is ``registry[/namespace[/repo]]`` (podman's), trailing '/' dropped."""
    if "://" in key:
        return key.split("://", 1)[1].split("/", 1)[0]
    key = key.rstrip("/")
    host, _, path = key.partition("/")
    return host if path in ("v1", "v2") else key


@dataclass(frozen=True)
class Credentials:
    """A user name and password for one registry (never printed: ``repr`` hides it)."""

    username: str
    password: str = field(repr=False)
    source: str = ""  # where they came from, for error messages


def credentials_from_files(
    registry: str, repository: str = "", files: Sequence[Path] | None = None
) -> Credentials | None:
    """The credentials for ``repository`` of ``registry`` from the first auth file
    (``auth_files``) that has a base64 ``auth`` entry for it, the most specific key of that
    file winning (``_auth_keys``); None when none has. A file that is not valid JSON is an
    ImageError naming it. Called by ``pull`` and ``push`` unless ``--username`` is given."""
    keys = _auth_keys(registry, repository)
    for path in files if files is not None else auth_files():
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_AUTH_FILE_BYTES + 1)
        except OSError:
            continue
        if len(raw) > MAX_AUTH_FILE_BYTES:
            raise ImageError(f"credential file {path} is over {MAX_AUTH_FILE_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ImageError(f"credential file {path} is not valid JSON ({exc}); fix it") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        found: list[tuple[int, str, str]] = []  # (rank in keys, key, auth)
        for key, entry in auths.items():
            if not isinstance(key, str) or _norm_auth_key(key) not in keys:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
                continue
            found.append((keys.index(_norm_auth_key(key)), key, entry["auth"]))
        for _rank, key, auth in sorted(found):
            try:
                user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ImageError(
                    f"credential file {path}: the 'auth' entry for {key} is not base64 of "
                    "USER:PASSWORD; log in again"
                ) from None
            if sep:
                return Credentials(user, password, str(path))
    return None


def password_from_stdin(stream: IO[str]) -> str:
    """The password read from ``stream`` (``--password-stdin``), one trailing newline
    stripped."""
    data = stream.read()
    if data.endswith("\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith("\n") else data


# --- mirrors -----------------------------------------------------------------------------------


def mirrors(registry: str, env: str | None = None, *, insecure: bool = False) -> list[str]:
    """The mirror base URLs configured for ``registry`` in ``$SANDBOX_KERNEL_REGISTRY_MIRRORS``
    (``docker.io=http://127.0.0.1:5000,quay.io=https://mirror.example``), in order; a pull
    tries them before the registry itself. An entry must be ``REGISTRY=SCHEME://HOST[:PORT]``
    (a path of '/' at most; no user name or password, query or fragment); plain http only to
    a loopback mirror unless ``insecure``. A bad entry is an ImageError naming its position,
    never its text (it may hold a password)."""
    raw = os.environ.get(MIRRORS_ENV, "") if env is None else env
    out = []
    for n, item in enumerate(raw.split(","), 1):
        item = item.strip()
        if not item:
            continue
        key, sep, url = item.partition("=")
        parts = split_url(url.strip())
        if (
            not sep
            or parts is None
            or parts.scheme not in ("http", "https")
            or "@" in parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or url.strip().endswith(("?", "#"))
        ):
            raise ImageError(
                f"{MIRRORS_ENV}: entry {n} is not REGISTRY=http(s)://HOST[:PORT] (no user, "
                "password, path, query or fragment); fix it"
            )
        if key.strip() != registry:
            continue
        if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname or ""):
            raise ImageError(
                f"{MIRRORS_ENV}: entry {n} is a plain http mirror of {registry} on another "
                "host; use https, or --insecure to allow it"
            )
        out.append(f"{parts.scheme}://{parts.netloc}")
    return out


# --- HTTP --------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    resp: http.client.HTTPResponse
    conn: http.client.HTTPConnection
    url: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "") or ""

    def read_bounded(self, limit: int, what: str) -> bytes:
        length = self.header("Content-Length")
        if length.isdigit() and int(length) > limit:
            self.close()
            raise UnsafeArchiveError(
                f"{what} is {length} bytes, over the {limit}-byte limit for JSON documents; "
                "refusing it (a hostile or broken registry)"
            )
        data = self.resp.read(limit + 1)
        self.close()
        if len(data) > limit:
            raise UnsafeArchiveError(
                f"{what} is over the {limit}-byte limit for JSON documents; refusing it "
                "(a hostile or broken registry)"
            )
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.resp.close()
        self.conn.close()


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """A verifying TLS context: the system CA store, plus the CAs of ``ca`` (``--ca FILE``)
    when given: the extra CA is added, never in place of the system's, so a token realm,
    blob storage or a mirror with a publicly trusted certificate stays verifiable. Made by
    ``Client`` for each registry it talks to."""
    ctx = ssl.create_default_context()
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ImageError(
                f"--ca {ca}: cannot load it as PEM certificates ({exc}); give a PEM file"
            ) from None
    return ctx


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest))


class Client:
    """One registry endpoint (``base`` = ``scheme://host[:port]``) with its credentials, TLS
    settings and bearer tokens (one per scope). Made by ``pull`` and ``push``; safe to use
    from the download threads."""

    def __init__(
        self,
        base: str,
        reference: str,
        *,
        creds: Credentials | None = None,
        ca: Path | None = None,
        insecure: bool = False,
    ) -> None:
        self.base = base.rstrip("/")
        self.host = urllib.parse.urlsplit(self.base).netloc
        self.reference = reference
        self.creds = creds
        self.insecure = insecure
        self.origin = _origin(self.parse_url(self.base, "base URL"))
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        #: Guards what the download threads of one pull share.
        self.lock = threading.Lock()
        #: Set when a pull stops (an error in one download, or Ctrl-C): the others stop too.
        self.cancel = threading.Event()
        #: Every host but the registry's own is always verified (``--insecure`` or not).
        self._verified = tls_context(ca)
        self._ssl = tls_context(ca)
        if insecure:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE

    # URLs ----------------------------------------------------------------------------------
    def parse_url(self, url: str, what: str) -> urllib.parse.SplitResult:
        """``url`` split (``split_url``); one that is not a URL is this client's error."""
        parts = split_url(url)
        if parts is None:
            raise self.error(
                f"sent a {what} that is not a valid URL ({_clean(url, 100)!r})",
                "ask the registry's owner",
            )
        return parts

    def handed_url(self, url: str, location: str, what: str) -> str:
        """The absolute URL of ``location`` (relative to ``url``) that the registry handed over
        (a redirect, the Location of an upload): the one check for all of them. Only
        http(s); https never becomes plain http unless to loopback or with ``--insecure``."""
        try:
            new = urllib.parse.urljoin(url, location)
        except ValueError:
            new = location  # not a URL: parse_url says so
        parts = self.parse_url(new, what)
        if parts.scheme not in ("http", "https"):
            raise self.error(
                f"sent a {what} with scheme {_clean(parts.scheme, 20)!r}", "use an http(s) registry"
            )
        if (
            parts.scheme == "http"
            and urllib.parse.urlsplit(url).scheme == "https"
            and not (self.insecure or is_loopback(parts.hostname or ""))
        ):
            raise self.error(
                f"sent a {what} to plain http ({_clean(parts.netloc, 100)})",
                "refused; ask the registry's owner to serve https",
            )
        return new

    def may_authorize(self, parts: urllib.parse.SplitResult) -> bool:
        """Whether an Authorization header (Basic or Bearer) may go with a request to
        ``parts``: only to this registry's own (scheme, host, port), and only over https, to
        loopback, or with ``--insecure``. Checked by ``request`` for every request."""
        return _origin(parts) == self.origin and (
            parts.scheme == "https" or is_loopback(parts.hostname or "") or self.insecure
        )

    # errors --------------------------------------------------------------------------------
    def error(self, answered: str, fix: str) -> RegistryError:
        """The product's error for this reference and registry: what it answered, the fix."""
        fix = fix or "ask the registry's owner"
        return RegistryError(f"{self.reference}: registry {self.host} {answered}; {fix}")

    def _http_error(self, r: _Response, what: str) -> RegistryError:
        detail = ""
        with contextlib.suppress(Exception):
            doc = json.loads(r.resp.read(MAX_ERROR_BYTES))
            errs = doc.get("errors") or []
            detail = _clean(
                "; ".join(
                    f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                    for e in errs
                    if isinstance(e, dict)
                )
            )
        r.close()
        answered = f"answered {r.status} {_clean(r.reason, 100)} to {what}" + (
            f" ({detail})" if detail else ""
        )
        if r.status == 401:
            fix = (
                "check the user name and password (--username U --password-stdin, or the "
                "registry's entry in the credential file"
                + (f" {self.creds.source}" if self.creds and self.creds.source else "")
                + ")"
            )
        elif r.status == 403:
            fix = "this account may not do that on this repository; ask the registry's owner"
        elif r.status == 404:
            fix = "check the repository name and the tag or digest (is it pushed?)"
        elif r.status == 429:
            fix = "the registry limits requests; wait and try again, or use a mirror"
        else:
            fix = "try again later or ask the registry's owner"
        return self.error(answered, fix)

    # transport -----------------------------------------------------------------------------
    def _open(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: IO[bytes] | bytes | None,
    ) -> _Response:
        parts = self.parse_url(url, "URL")
        host = parts.hostname or ""
        port = parts.port
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            own = _origin(parts) == self.origin
            ctx = self._ssl if own else self._verified
            conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT_S, context=ctx)
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        else:
            raise self.error(f"sent a URL with scheme {parts.scheme!r}", "use an http(s) registry")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                if body is None:
                    raise
                # the registry answered before it took the whole body (a 413 for a blob too
                # large for one request, a 401): its answer is what counts
            resp = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise self.error(
                f"has a certificate this host does not trust ({exc.verify_message})",
                "give its CA with --ca FILE (or install it in the system CA store)",
            ) from None
        except ssl.SSLError as exc:
            conn.close()
            raise self.error(
                f"failed the TLS handshake ({exc.reason})",
                "check that it speaks https (plain http needs --insecure unless on loopback)",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self.error(
                f"could not be reached at {parts.scheme}://{parts.netloc} ({exc})",
                "check the address and that the registry is running",
            ) from None
        return _Response(resp.status, resp.reason, resp.headers, resp, conn, url)

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        headers: dict[str, str] | None = None,
        body: IO[bytes] | bytes | None = None,
        scope: str = "",
        follow: bool = True,
    ) -> _Response:
        """``method`` on this registry (a path under it, or an absolute URL it gave), with
        credentials: a 401 challenge is answered once (Bearer token from its realm for
        ``scope``, or Basic). Redirects are followed (at most ``MAX_REDIRECTS``); the
        Authorization header goes only to this registry's own host."""
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        tried_auth = False
        redirects = 0
        while True:
            h = dict(headers or {})
            same_host = self.may_authorize(self.parse_url(url, "URL"))
            if same_host:
                auth = self._auth_header(scope)
                if auth:
                    h["Authorization"] = auth
            _rewind(body)
            r = self._open(method, url, h, body)
            if r.status in (301, 302, 303, 307, 308) and follow:
                location = r.header("Location")
                r.close()
                redirects += 1
                if not location or redirects > MAX_REDIRECTS:
                    raise self.error(
                        f"redirected {method} {path_or_url} more than {MAX_REDIRECTS} times",
                        "ask the registry's owner",
                    )
                url = self.handed_url(url, location, "redirect")
                if r.status == 303:
                    method, body = "GET", None
                continue
            if r.status == 401 and same_host and not tried_auth:
                tried_auth = True
                challenge = r.header("WWW-Authenticate")
                r.close()
                if self._answer(challenge, scope):
                    continue
                _rewind(body)
                r = self._open(method, url, h, body)  # for the error text
            return r

    def _auth_header(self, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get(scope) or self._tokens.get("*basic*")
        if token:
            return token
        return None

    def _answer(self, challenge: str, scope: str) -> bool:
        """Remember the Authorization for ``scope`` that ``challenge`` asks for; False when
        there is nothing to answer it with."""
        kind, params = _challenge(challenge)
        if kind == "basic":
            if self.creds is None:
                return False
            with self._lock:
                self._tokens["*basic*"] = "Basic " + _basic(self.creds)
            return True
        if kind != "bearer" or "realm" not in params:
            raise self.error(
                f"asked for authentication of an unknown kind ({_clean(challenge, 100)!r})",
                "this client knows Basic and Bearer tokens",
            )
        realm = params["realm"]
        rparts = self.parse_url(realm, "token realm")
        if rparts.scheme not in ("http", "https"):
            raise self.error(f"named a token realm that is not a URL ({_clean(realm, 100)!r})", "")
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for s in (scope or params.get("scope", "")).split(" "):
            if s:
                query.append(("scope", s))
        url = realm + ("&" if rparts.query else "?") + urllib.parse.urlencode(query)
        h = {"Accept": "application/json"}
        own = _origin(rparts) == self.origin
        verified = rparts.scheme == "https" and (not own or not self.insecure)
        send_creds = self.creds is not None and (verified or is_loopback(rparts.hostname or ""))
        if send_creds:
            assert self.creds is not None
            h["Authorization"] = "Basic " + _basic(self.creds)
        r = self._open("GET", url, h, None)
        token = self._token(r, _clean(rparts.netloc, 100))
        with self._lock:
            self._tokens[scope] = "Bearer " + token
        return True

    def _token(self, r: _Response, netloc: str) -> str:
        """The bearer token in the answer ``r`` of token realm ``netloc``: printable ASCII
        only (it goes into a header), never shown. Called by ``_answer``."""
        if r.status != 200:
            raise self._http_error(r, f"the token request to {netloc}")
        try:
            doc = json.loads(r.read_bounded(MAX_ERROR_BYTES, "token answer"))
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token:
            raise self.error(f"token realm {netloc} answered without a token", "")
        if not re.fullmatch(r"[\x21-\x7e]+", token):
            raise self.error(
                f"token realm {netloc} answered with a token that is not printable ASCII "
                "(refused; it is not shown)",
                "",
            )
        return token


def _rewind(body: IO[bytes] | bytes | None) -> None:
    """Send a file body from its start again (a retry after a 401 or a redirect)."""
    if body is not None and not isinstance(body, bytes):
        body.seek(0)


def _basic(creds: Credentials) -> str:
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def endpoint(registry: str, *, ca: Path | None, insecure: bool) -> str:
    """The base URL of ``registry``: https, except plain http straight away for a loopback
    registry or with ``insecure`` (unless ``ca`` is given, which means https)."""
    host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
    if ca is None and (insecure or is_loopback(_host_only(host))):
        return f"http://{host}"
    return f"https://{host}"


# --- pull --------------------------------------------------------------------------------------


class Progress:
    """What a pull reports as it goes; the CLI subclasses it (a bar on a terminal, quiet lines
    otherwise). Methods are called from the download threads."""

    def start(self, total: int, layers: int, present: int) -> None:
        """``total`` bytes in ``layers`` layers are to be fetched; ``present`` already are."""

    def advance(self, n: int) -> None:
        """``n`` more bytes arrived."""

    def layer_done(self, digest: str, size: int) -> None:
        """Layer ``digest`` is fetched and verified."""

    def finish(self) -> None:
        """All layers are there."""


def _pick_platform(index: oci.Index, platform: str, client: Client) -> oci.Descriptor:
    os_, _, arch = platform.partition("/")
    arch, _, variant = arch.partition("/")
    found = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.get("os") == os_
        and d.platform.get("architecture") == arch
        and (not variant or d.platform.get("variant") == variant)
    ]
    if not found:
        have = sorted(
            {
                f"{d.platform.get('os')}/{d.platform.get('architecture')}"
                for d in index.manifests
                if d.platform
            }
        )
        raise client.error(
            f"has no image for {platform} in this index (it has: {', '.join(have) or 'none'})",
            "pick one with --platform OS/ARCH",
        )
    d = found[0]
    if d.media_type not in oci.MANIFEST_TYPES:
        raise UnsafeArchiveError(
            f"{client.reference}: the index entry for {platform} is {d.media_type!r}, not an "
            "image manifest (media-type confusion); refused"
        )
    return d


def _fetch_manifest(client: Client, repo: str, ref: str, scope: str) -> tuple[bytes, str, str]:
    """(body, media type, digest) of manifest or index ``ref`` (a tag or a digest), bounded
    and its digest checked (against ``ref`` when it is one, else against the registry's
    Docker-Content-Digest header when sent)."""
    r = client.request(
        "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}, scope=scope
    )
    if r.status != 200:
        raise client._http_error(r, f"the manifest request for {repo}:{ref}")
    header_type = r.header("Content-Type").split(";")[0].strip()
    header_digest = r.header("Docker-Content-Digest")
    body = r.read_bounded(oci.MAX_JSON_BYTES, f"{client.reference}: manifest {ref}")
    digest = oci.sha256_digest(body)
    expect = ref if ref.startswith("sha256:") else header_digest
    if expect and expect != digest:
        raise DigestMismatch(
            f"{client.reference}: registry {client.host} sent a manifest with digest {digest} "
            f"for {expect} (digest mismatch); refused, nothing stored"
        )
    doc = oci.load_json(body, f"{client.reference}: manifest {ref}")
    body_type = doc.get("mediaType")
    media_type = body_type if isinstance(body_type, str) else header_type
    if (
        isinstance(body_type, str)
        and header_type != body_type
        and header_type in oci.INDEX_TYPES | oci.MANIFEST_TYPES
    ):
        raise UnsafeArchiveError(
            f"{client.reference}: registry {client.host} labelled a {body_type!r} document "
            f"as {header_type!r} (media-type confusion); refused"
        )
    if media_type not in oci.INDEX_TYPES | oci.MANIFEST_TYPES:
        media_type = oci.MT_OCI_INDEX if "manifests" in doc else oci.MT_OCI_MANIFEST
    return body, media_type, digest


def _part_path(store: ImageStore, digest: str) -> Path:
    return store.tmp_dir / f"pull-{oci.digest_hex(digest)}.part"


@contextlib.contextmanager
def _blob_lock(store: ImageStore, client: Client, digest: str) -> Iterator[None]:
    """Hold the lock of blob ``digest``'s download into ``store`` (an flock on
    ``pull-<hex>.lock`` in its tmp dir) for the block: two pulls into one store never
    append to one ``.part`` together; the second waits, then finds the blob stored. The
    file is removed by its holder before it lets go (a waiter that then holds a removed
    file opens it anew). Called by ``_fetch_layer`` around a blob's download and install."""
    path = store.tmp_dir / f"pull-{oci.digest_hex(digest)}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ImageError(
                f"{client.reference}: cannot open the download lock {path} ({exc.strerror}); "
                "remove it and pull again"
            ) from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another pull downloads this blob: wait for it
                    if client.cancel.is_set():
                        raise RegistryError(
                            f"{client.reference}: the pull stopped; run it again"
                        ) from None
                    time.sleep(0.1)
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _open_part(client: Client, dest: Path) -> int:
    """A descriptor of the ``.part`` file ``dest`` (made 0600 when new), opened without
    following a link, for appending and reading; it must be a regular file of the caller.
    Called by ``_download``."""
    try:
        fd = os.open(
            dest, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise ImageError(
            f"{client.reference}: cannot open the download file {dest} ({exc.strerror}); "
            "remove it and pull again"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ImageError(
            f"{client.reference}: the download file {dest} is not a regular file of this "
            "user; remove it and pull again"
        )
    return fd


def _hash_fd(fd: int, size: int) -> hashlib._Hash:
    """A sha256 of the first ``size`` bytes of ``fd`` (what an earlier pull left)."""
    h = hashlib.sha256()
    off = 0
    while off < size and (chunk := os.pread(fd, min(COPY_CHUNK, size - off), off)):
        h.update(chunk)
        off += len(chunk)
    return h


def _download(
    client: Client,
    repo: str,
    desc: oci.Descriptor,
    dest: Path,
    scope: str,
    progress: Progress,
) -> bool:
    """Fetch blob ``desc`` into ``dest``, resuming with Range from what ``dest`` holds (a
    cut connection is resumed up to ``RESUME_ATTEMPTS`` times). Size is bounded by the
    descriptor; ``dest`` is written and hashed through one descriptor (``_open_part``).
    True when what it holds has the descriptor's digest (the store checks again when it
    installs the file). Called by ``_fetch_layer``."""
    fd = _open_part(client, dest)
    try:
        have = os.fstat(fd).st_size
        if have > desc.size:
            os.ftruncate(fd, 0)
            have = 0
        h = _hash_fd(fd, have)
        attempts = 0
        while have < desc.size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            r = client.request(
                "GET", f"/v2/{repo}/blobs/{desc.digest}", headers=headers, scope=scope
            )
            if r.status == 200 and have:
                os.ftruncate(fd, 0)  # the registry ignored Range: start again
                have, h = 0, hashlib.sha256()
            elif r.status not in (200, 206):
                raise client._http_error(r, f"the request for blob {desc.digest}")
            if r.status == 206 and not r.header("Content-Range").startswith(f"bytes {have}-"):
                r.close()
                raise client.error(
                    f"answered a Range request for blob {desc.digest} with another range", ""
                )
            try:
                have = _copy_body(client, r, desc, fd, h, have, progress)
            except DigestMismatch:
                dest.unlink()  # longer than declared: nothing of it is kept
                raise
            except (OSError, http.client.HTTPException) as exc:
                attempts += 1
                if attempts >= RESUME_ATTEMPTS:
                    raise client.error(
                        f"cut the download of blob {desc.digest} {attempts} times ({exc})",
                        "run the pull again: it resumes where it stopped",
                    ) from None
                have = os.fstat(fd).st_size
                h = _hash_fd(fd, have)
                continue
            finally:
                r.close()
            if have == desc.size:
                break
            attempts += 1
            if attempts >= RESUME_ATTEMPTS:
                raise client.error(
                    f"cut the download of blob {desc.digest} {attempts} times",
                    "run the pull again: it resumes where it stopped",
                )
        return "sha256:" + h.hexdigest() == desc.digest
    finally:
        os.close(fd)


def _copy_body(
    client: Client,
    r: _Response,
    desc: oci.Descriptor,
    fd: int,
    h: hashlib._Hash,
    have: int,
    progress: Progress,
) -> int:
    """Append the body of ``r`` to ``fd`` (which holds ``have`` bytes), hashing it into
    ``h``; the bytes ``fd`` then holds. More than the descriptor's size is a DigestMismatch.
    Called by ``_download``."""
    got = have
    while chunk := r.resp.read(COPY_CHUNK):
        if client.cancel.is_set():
            raise RegistryError(
                f"{client.reference}: the pull stopped; run it again: it resumes where it stopped"
            )
        got += len(chunk)
        if got > desc.size:
            raise DigestMismatch(
                f"{client.reference}: blob {desc.digest} from {client.host} is longer "
                f"than the {desc.size} bytes its descriptor declares (size mismatch); "
                "refused, nothing stored"
            )
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        h.update(chunk)
        progress.advance(len(chunk))
    return got


def _fetch_config(client: Client, repo: str, desc: oci.Descriptor, scope: str) -> bytes:
    if desc.size > oci.MAX_JSON_BYTES:
        raise UnsafeArchiveError(
            f"{client.reference}: its config declares {desc.size} bytes, over the "
            f"{oci.MAX_JSON_BYTES}-byte limit for JSON documents; refused"
        )
    r = client.request("GET", f"/v2/{repo}/blobs/{desc.digest}", scope=scope)
    if r.status != 200:
        raise client._http_error(r, f"the request for config {desc.digest}")
    data = r.read_bounded(oci.MAX_JSON_BYTES, f"{client.reference}: config")
    if len(data) != desc.size or oci.sha256_digest(data) != desc.digest:
        raise DigestMismatch(
            f"{client.reference}: registry {client.host} sent a config that does not match "
            f"its digest {desc.digest} or size {desc.size}; refused, nothing stored"
        )
    return data


def _clients(
    ref: Reference,
    *,
    creds: Credentials | None,
    ca: Path | None,
    insecure: bool,
) -> list[Client]:
    """The clients a pull tries in order: each mirror, with only the credentials the auth
    files hold for the mirror's own host, then the registry itself, with ``creds`` (from
    ``--username``) or its auth-file entry. Called by ``pull``."""
    out = []
    for base in mirrors(ref.registry, insecure=insecure):
        host = urllib.parse.urlsplit(base).netloc
        c = credentials_from_files(host, ref.repository)
        out.append(Client(base, str(ref), creds=c, ca=ca, insecure=insecure))
    base = endpoint(ref.registry, ca=ca, insecure=insecure)
    c = creds if creds is not None else credentials_from_files(ref.registry, ref.repository)
    out.append(Client(base, str(ref), creds=c, ca=ca, insecure=insecure))
    return out


def pull(
    store: ImageStore,
    ref_text: str,
    *,
    name: str | None = None,
    platform: str | None = None,
    creds: Credentials | None = None,
    ca: Path | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
) -> Image:
    """Pull ``ref_text`` into ``store`` and return the image, stored under its full reference
    (and ``name`` 'NAME[:TAG]' too); a pull by digest is stored under the tag
    ``sha256-<hex>`` of that digest (also when the reference has a tag, and when it is an
    index's), so that ``ImageStore.resolve`` finds it again by the same reference. Mirrors
    are tried first; a mirror's failure falls back to the next one, then to the registry.
    Called by ``sandbox-kernel image pull``."""
    ref = parse_reference(ref_text)
    names = [(ref.name, ref.store_tag)]
    if ref.digest and ref.tag:  # found again by REF@DIGEST too (an index's digest as well)
        names.append((ref.name, digest_tag(ref.digest)))
    if name is not None:
        names.append(oci.split_ref(name))
    progress = progress or Progress()
    clients = _clients(ref, creds=creds, ca=ca, insecure=insecure)
    for i, client in enumerate(clients):
        try:
            return _pull_from(store, client, ref, names, platform, progress)
        except RegistryError:
            if i == len(clients) - 1:
                raise
    raise AssertionError("unreachable")


def _pull_from(
    store: ImageStore,
    client: Client,
    ref: Reference,
    names: list[tuple[str, str]],
    platform: str | None,
    progress: Progress,
) -> Image:
    repo = ref.repository
    scope = f"repository:{repo}:pull"
    body, media_type, _digest = _fetch_manifest(
        client, repo, ref.digest or ref.tag or "latest", scope
    )
    if media_type in oci.INDEX_TYPES:
        index = oci.parse_index(body, f"{client.reference}: index")
        want = platform or f"linux/{oci.host_architecture()}"
        chosen = _pick_platform(index, want, client)
        body, media_type, _digest = _fetch_manifest(client, repo, chosen.digest, scope)
        if media_type not in oci.MANIFEST_TYPES:
            raise UnsafeArchiveError(
                f"{client.reference}: the index names {chosen.digest} as a manifest but the "
                f"registry sent {media_type!r} (media-type confusion); refused"
            )
    manifest = oci.parse_manifest(body, f"{client.reference}: manifest")
    config = _fetch_config(client, repo, manifest.config, scope)
    cfg = oci.parse_config(config, f"{client.reference}: config")
    if len(cfg.diff_ids) != len(manifest.layers):
        raise ImageError(
            f"{client.reference}: manifest has {len(manifest.layers)} layers but the config "
            f"lists {len(cfg.diff_ids)} diff_ids; the image is corrupt"
        )
    if cfg.os and cfg.os != "linux":
        raise ImageError(f"{client.reference} is an image for {cfg.os!r}, not linux")
    store._init()
    _check_sizes(client, manifest, store.limits)
    missing = [d for d in manifest.layers if not store.has_blob(d.digest)]
    progress.start(sum(d.size for d in missing), len(missing), len(manifest.layers) - len(missing))
    with store.import_budget():
        layers = _fetch_layers(store, client, repo, manifest, cfg.diff_ids, progress)
    progress.finish()
    return store.write_pulled_image(names, body, config, layers)


def _check_sizes(client: Client, manifest: oci.Manifest, limits: ExtractLimits) -> None:
    """Refuse, before anything is downloaded, a layer whose descriptor declares more than one
    layer may unpack to (``limits.max_total_bytes``) or layers declaring more together than
    one image may (``limits.max_image_bytes``). Called by ``_pull_from``."""
    for i, d in enumerate(manifest.layers):
        if d.size > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{client.reference}: layer {i} ({d.digest}) declares {d.size} bytes, over "
                f"the {limits.max_total_bytes}-byte limit for one layer (ExtractLimits."
                "max_total_bytes); refused, nothing downloaded"
            )
    total = sum({d.digest: d.size for d in manifest.layers}.values())
    if total > limits.max_image_bytes:
        raise UnsafeArchiveError(
            f"{client.reference}: its layers declare {total} bytes together, over the "
            f"{limits.max_image_bytes}-byte limit for one image (ExtractLimits.max_image_bytes); "
            "refused, nothing downloaded"
        )


def _fetch_layer(
    store: ImageStore,
    client: Client,
    repo: str,
    i: int,
    d: oci.Descriptor,
    diff_id: str,
    progress: Progress,
) -> Layer:
    """Layer ``i`` (descriptor ``d``) in the store: taken from the store when its blob is
    there, else downloaded (resuming a ``.part`` an earlier pull left; one that proves bad
    is fetched once more from the start) and installed once verified, one pull at a time
    (``_blob_lock``). Called by ``_fetch_layers`` in a download thread."""
    what = f"{client.reference} layer {i} ({d.digest})"
    if store.has_blob(d.digest):
        return store.layer_from_blob(d.digest, d.media_type, d.size, diff_id, what)
    with _blob_lock(store, client, d.digest):
        if store.has_blob(d.digest):  # another pull fetched it while this one waited
            return store.layer_from_blob(d.digest, d.media_type, d.size, diff_id, what)
        return _fetch_layer_locked(store, client, repo, d, diff_id, progress, what)


def _fetch_layer_locked(
    store: ImageStore,
    client: Client,
    repo: str,
    d: oci.Descriptor,
    diff_id: str,
    progress: Progress,
    what: str,
) -> Layer:
    """The download and install of ``_fetch_layer``, under the blob's ``_blob_lock``."""
    part = _part_path(store, d.digest)
    stale = part.exists()
    scope = f"repository:{repo}:pull"
    while True:
        if not _download(client, repo, d, part, scope, progress) and stale:
            part.unlink()  # what an earlier pull left proved bad: once more from the start
            stale = False
            continue
        try:
            layer = store.add_layer_file(
                part,
                d.media_type,
                d.digest,
                expected_size=d.size,
                expected_diff_id=diff_id,
                what=what,
            )
        except DigestMismatch as exc:
            if stale:
                stale = False
                continue
            raise DigestMismatch(f"{exc}; nothing stored") from None
        except UnsafeArchiveError as exc:  # the extractor's refusal: name the image and layer
            raise UnsafeArchiveError(f"{what} from {client.host}: {exc}; nothing stored") from None
        progress.layer_done(d.digest, d.size)
        return layer


def _fetch_layers(
    store: ImageStore,
    client: Client,
    repo: str,
    manifest: oci.Manifest,
    diff_ids: Sequence[str],
    progress: Progress,
) -> list[Layer]:
    """Every layer of ``manifest`` in the store, ``PULL_THREADS`` at a time. The first
    failure (or Ctrl-C) stops the other downloads (their ``.part`` files stay for the next
    pull) and is raised. Called by ``_pull_from``."""
    locks = {d.digest: threading.Lock() for d in manifest.layers}
    first_error: list[BaseException] = []

    def fetch(i: int) -> Layer:
        d = manifest.layers[i]
        try:
            with locks[d.digest]:  # a layer listed twice is fetched once
                return _fetch_layer(store, client, repo, i, d, diff_ids[i], progress)
        except BaseException as exc:
            with client.lock:
                first_error.append(exc)
            client.cancel.set()
            raise

    with ThreadPoolExecutor(max_workers=PULL_THREADS) as pool:
        futures = [pool.submit(fetch, i) for i in range(len(manifest.layers))]
        try:
            return [fut.result() for fut in futures]
        except BaseException as exc:
            client.cancel.set()
            for fut in futures:
                with contextlib.suppress(BaseException):
                    fut.result()
            if first_error and not isinstance(exc, KeyboardInterrupt):
                raise first_error[0] from None
            raise


# --- push --------------------------------------------------------------------------------------


def _location(client: Client, r: _Response, what: str) -> str:
    loc = r.header("Location")
    r.close()
    if not loc:
        raise client.error(f"answered {what} without a Location", "ask the registry's owner")
    return client.handed_url(client.base + "/", loc, f"Location for {what}")


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params)


def _push_blob(
    client: Client,
    repo: str,
    digest: str,
    size: int,
    path: Path,
    scope: str,
    mount_from: str | None,
    say: Callable[[str], None],
) -> None:
    r = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope)
    r.close()
    if r.status == 200:
        say(f"blob {digest[:19]} already there")
        return
    if mount_from and mount_from != repo:
        q = urllib.parse.urlencode({"mount": digest, "from": mount_from})
        r = client.request("POST", f"/v2/{repo}/blobs/uploads/?{q}", scope=scope)
        if r.status == 201:
            r.close()
            say(f"blob {digest[:19]} mounted from {mount_from}")
            return
        if r.status != 202:
            raise client._http_error(r, f"the mount of blob {digest}")
        upload = _location(client, r, "the upload request")
    else:
        upload = _start_upload(client, repo, digest, scope)[0]
    with open(path, "rb") as f:
        r = client.request(
            "PUT",
            _with_query(upload, digest=digest),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=f,
            scope=scope,
        )
    if r.status == 413:  # too large for one request: a new upload, in chunks
        r.close()
        _push_chunked(client, repo, digest, size, path, scope)
        say(f"blob {digest[:19]} pushed in chunks ({size} bytes)")
        return
    if r.status != 201:
        raise client._http_error(r, f"the upload of blob {digest}")
    r.close()
    say(f"blob {digest[:19]} pushed ({size} bytes)")


def _start_upload(client: Client, repo: str, digest: str, scope: str) -> tuple[str, int]:
    """A new upload session of blob ``digest``: (its Location, the chunk size the registry
    asks for in OCI-Chunk-Min-Length, 0 when none). Called by ``_push_blob`` and
    ``_push_chunked``."""
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope)
    if r.status != 202:
        raise client._http_error(r, f"the upload request for blob {digest}")
    least = r.header("OCI-Chunk-Min-Length")
    return _location(client, r, "the upload request"), int(least) if least.isdigit() else 0


def _push_chunked(
    client: Client, repo: str, digest: str, size: int, path: Path, scope: str
) -> None:
    """Upload blob ``digest`` (``size`` bytes of ``path``) in chunks: a new session (POST),
    one PATCH per ``UPLOAD_CHUNK`` bytes (or the registry's OCI-Chunk-Min-Length) with its
    Content-Range, each to the Location the last answer gave, then ``PUT ?digest=`` with no
    body. Called by ``_push_blob`` when the registry refuses the whole blob in one request
    (413)."""
    upload, least = _start_upload(client, repo, digest, scope)
    chunk = max(UPLOAD_CHUNK, least)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            data = f.read(min(chunk, size - start))
            if not data:
                raise ImageError(f"blob {digest}: {path} is shorter than its {size} bytes")
            end = start + len(data) - 1
            r = client.request(
                "PATCH",
                upload,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(data)),
                    "Content-Range": f"{start}-{end}",
                },
                body=data,
                scope=scope,
            )
            if r.status != 202:
                raise client._http_error(r, f"the chunk {start}-{end} of blob {digest}")
            upload = _location(client, r, f"the chunk {start}-{end}")
            start = end + 1
    r = client.request(
        "PUT",
        _with_query(upload, digest=digest),
        headers={"Content-Type": "application/octet-stream", "Content-Length": "0"},
        body=b"",
        scope=scope,
    )
    if r.status != 201:
        raise client._http_error(r, f"the end of the chunked upload of blob {digest}")
    r.close()


def push(
    image: Image,
    store: ImageStore,
    dest_text: str,
    *,
    creds: Credentials | None = None,
    ca: Path | None = None,
    insecure: bool = False,
    say: Callable[[str], None] = lambda _m: None,
) -> str:
    """Push ``image`` (of ``store``) to ``dest_text`` and return the manifest digest the
    registry names it by: each blob is checked with HEAD, mounted from the image's own
    repository when that is on the same registry, else uploaded (POST, then PUT ?digest=;
    in PATCH chunks when the registry answers 413 to the whole blob); then the manifest is
    PUT. Called by ``sandbox-kernel image push``."""
    dest = parse_reference(dest_text)
    if dest.digest and not dest.tag:
        raise ImageError(f"push {dest_text}: push to a tag, not a digest (REGISTRY/REPO:TAG)")
    base = endpoint(dest.registry, ca=ca, insecure=insecure)
    c = creds if creds is not None else credentials_from_files(dest.registry, dest.repository)
    client = Client(base, str(dest), creds=c, ca=ca, insecure=insecure)
    repo = dest.repository
    mount_from: str | None = None
    if "/" in image.name:
        with contextlib.suppress(ImageError):
            src = parse_reference(image.name)
            if src.registry == dest.registry:
                mount_from = src.repository
    scope = f"repository:{repo}:pull,push" + (
        f" repository:{mount_from}:pull" if mount_from and mount_from != repo else ""
    )
    manifest_bytes = store.read_blob(image.digest)
    manifest = oci.parse_manifest(manifest_bytes, f"manifest of '{image.ref}'")
    for d in [*manifest.layers, manifest.config]:
        _push_blob(
            client, repo, d.digest, d.size, store.blob_path(d.digest), scope, mount_from, say
        )
    r = client.request(
        "PUT",
        f"/v2/{repo}/manifests/{dest.tag}",
        headers={"Content-Type": manifest.media_type},
        body=manifest_bytes,
        scope=scope,
    )
    if r.status not in (200, 201):
        raise client._http_error(r, "the manifest upload")
    answered = r.header("Docker-Content-Digest")
    r.close()
    if answered and answered != image.digest:
        raise client.error(
            f"names the pushed manifest {answered}, not {image.digest}", "ask the registry's owner"
        )
    return image.digest
