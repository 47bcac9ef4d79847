"""Pull and push against the reference registry server (Debian's docker-registry) on loopback.

Each test's registry runs on 127.0.0.1 on a free port with its own storage, config and
htpasswd file; one instance serves TLS from a CA the test makes with openssl. Images are the
product's own (``python3`` from the default store), pushed by ``image push`` and by
``skopeo copy``, pulled back into a separate store (``SANDBOX_KERNEL_STATE_DIR``). A pull
cut or stopped on the way goes through a ``CuttingProxy`` in front of the registry, which
cuts or pauses a blob's body and keeps the request heads (the ``Range`` of the resumes). Two
images without ipykernel (``test_any_image.make_bare_image``) go through the registry and
come back as kernels started through jupyter_client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.images import ipykernel_layer, lookup, oci, probe
from sandbox_kernel.images.importer import import_path
from sandbox_kernel.images.store import ImageStore
from sandbox_kernel.jupyter import kernelspecs
from tests.privileged.test_any_image import make_bare_image
from tests.privileged.test_provisioner import execute
from tests.registryserver import (
    PASSWORD,
    USER,
    CuttingProxy,
    Registry,
    free_port,
    need,
    start_registry,
    stop_registry,
)

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "python3"


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = start_registry(tmp_path / "registry", tls=False)
    try:
        yield r
    finally:
        stop_registry(r)


@pytest.fixture
def tls_reg(tmp_path: Path) -> Iterator[Registry]:
    r = start_registry(tmp_path / "registry-tls", tls=True)
    try:
        yield r
    finally:
        stop_registry(r)


def _env(state: Path | None) -> dict[str, str]:
    """The environment of a CLI run: no credential files of the host, the store ``state``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        env.pop(var, None)
    env["HOME"] = env["XDG_RUNTIME_DIR"] = str(state or "/nonexistent")
    if state is not None:
        env["SANDBOX_KERNEL_STATE_DIR"] = str(state)
    return env


def cli(
    *args: str, state: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox_kernel", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(state),
    )


def _login() -> tuple[str, ...]:
    return ("--username", USER, "--password-stdin")


def _source() -> ImageStore:
    """The store that holds ``SOURCE`` (the caller's own, or rootless the system store)."""
    image = lookup.find(SOURCE, unpack=False)
    return next(p.store for p in lookup.places() if p.store.has_blob(image.digest))


def test_push_then_pull_by_tag_and_digest(reg: Registry, tmp_path: Path, images: None) -> None:
    src = _source().resolve(SOURCE, unpack=False)
    pushed = cli(
        "image", "push", SOURCE, f"{reg.host}/course/py:1", *_login(), stdin=PASSWORD + "\n"
    )
    assert pushed.returncode == 0, pushed.stderr
    assert src.digest in pushed.stdout
    again = cli("image", "push", SOURCE, f"{reg.host}/course/py:1", *_login(), stdin=PASSWORD)
    assert again.returncode == 0 and "already there" in again.stderr
    assert PASSWORD not in pushed.stdout + pushed.stderr + again.stderr

    state = tmp_path / "state"
    p = cli("image", "pull", f"{reg.host}/course/py:1", "--name", "course:1", *_login(),
            state=state, stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    store = ImageStore(state)
    im = store.resolve(f"{reg.host}/course/py:1")
    assert im.digest == src.digest  # the very manifest the store pushed
    assert store.resolve("course:1").digest == src.digest
    assert [la.diff_id for la in im.layers] == [la.diff_id for la in src.layers]
    assert "layer sha256:" in p.stderr  # quiet progress lines off a terminal
    # by digest, into a second store
    state2 = tmp_path / "state2"
    p = cli("image", "pull", f"{reg.host}/course/py@{src.digest}", *_login(), state=state2,
            stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert ImageStore(state2).resolve(src.digest).digest == src.digest
    # a second pull into the first store fetches nothing
    p = cli("image", "pull", f"{reg.host}/course/py:1", *_login(), state=state, stdin=PASSWORD)
    assert p.returncode == 0 and "fetching 0 layer(s)" in p.stderr

    # the pulled image pushed to another repository of its registry: its blobs are mounted
    p = cli("image", "push", f"{reg.host}/course/py:1", f"{reg.host}/course/copy:1", *_login(),
            state=state, stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("mounted from course/py") == len(src.layers) + 1

    # a kernel-style command from the pulled image
    r = cli("run", f"{reg.host}/course/py:1", "--", "python3", "-c", "print(6*7)", state=state)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"


def test_wrong_credentials_one_clear_line(reg: Registry, tmp_path: Path) -> None:
    p = cli("image", "pull", f"{reg.host}/course/py:1", *_login(), state=tmp_path / "s",
            stdin="wrong")  # fmt: skip
    assert p.returncode == 125
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"registry {reg.host} answered 401" in lines[0]
    assert "check the user name and password" in lines[0]
    assert "wrong" not in p.stderr
    p = cli("image", "pull", f"{reg.host}/course/py:1", state=tmp_path / "s")
    assert p.returncode == 125 and "answered 401" in p.stderr


def test_skopeo_push_then_pull_and_manifest_list(
    reg: Registry, tmp_path: Path, images: None
) -> None:
    skopeo = need("skopeo")
    store = _source()
    creds = f"{USER}:{PASSWORD}"
    subprocess.run(
        [skopeo, "copy", "--quiet", "--dest-creds", creds, "--dest-tls-verify=false",
         f"oci:{store.oci_dir}:{SOURCE}:latest", f"docker://{reg.host}/sk/py:s"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    state = tmp_path / "state"
    p = cli("image", "pull", f"{reg.host}/sk/py:s", *_login(), state=state, stdin=PASSWORD)
    assert p.returncode == 0, p.stderr
    pulled = ImageStore(state).resolve(f"{reg.host}/sk/py:s")
    src = store.resolve(SOURCE, unpack=False)
    assert [la.diff_id for la in pulled.layers] == [la.diff_id for la in src.layers]

    # an index with two platforms: the skopeo-pushed image as amd64, python2.7 as arm64
    other = store.resolve("python2.7", unpack=False)
    p = cli("image", "push", "python2.7", f"{reg.host}/sk/py:other", *_login(), stdin=PASSWORD)
    assert p.returncode == 0, p.stderr
    entries = []
    for im, arch in ((pulled, "amd64"), (other, "arm64")):
        body = (ImageStore(state) if im is pulled else store).read_blob(im.digest)
        entries.append(
            {
                "mediaType": json.loads(body).get("mediaType", oci.MT_OCI_MANIFEST),
                "digest": im.digest,
                "size": len(body),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": entries}
    ).encode()
    reg.put("/v2/sk/py/manifests/multi", index, oci.MT_OCI_INDEX)
    for arch, want in (("amd64", pulled.digest), ("arm64", other.digest)):
        s = tmp_path / f"multi-{arch}"
        p = cli("image", "pull", f"{reg.host}/sk/py:multi", "--platform", f"linux/{arch}",
                *_login(), state=s, stdin=PASSWORD)  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert ImageStore(s).resolve(f"{reg.host}/sk/py:multi").digest == want


def test_tampered_blob_refused_nothing_stored(reg: Registry, tmp_path: Path, images: None) -> None:
    src = _source().resolve(SOURCE, unpack=False)
    p = cli("image", "push", SOURCE, f"{reg.host}/t/py:1", *_login(), stdin=PASSWORD)
    assert p.returncode == 0, p.stderr
    top = src.layers[-1]
    data = reg.blob_file(top.digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other content
    data.write_bytes(bytes(raw))
    state = tmp_path / "state"
    p = cli("image", "pull", f"{reg.host}/t/py:1", *_login(), state=state, stdin=PASSWORD)
    assert p.returncode == 125
    assert "digest mismatch" in p.stderr and "nothing stored" in p.stderr
    store = ImageStore(state)
    assert store.list() == []
    assert not store.has_blob(top.digest)


def test_tls_registry_with_ca(tls_reg: Registry, tmp_path: Path, images: None) -> None:
    assert tls_reg.ca is not None
    p = cli("image", "push", SOURCE, f"{tls_reg.host}/tls/py:1", "--ca", str(tls_reg.ca),
            *_login(), stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    state = tmp_path / "state"
    p = cli("image", "pull", f"{tls_reg.host}/tls/py:1", "--ca", str(tls_reg.ca), *_login(),
            state=state, stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    # without the CA the certificate is not trusted: https is kept, one clear line
    system_cas = "/etc/ssl/certs/ca-certificates.crt"
    p = cli("image", "pull", f"{tls_reg.host}/tls/py:1", "--ca", system_cas, *_login(),
            state=tmp_path / "s2", stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 125
    assert "certificate this host does not trust" in p.stderr and "--ca FILE" in p.stderr


def test_bad_ref_and_unreachable_registry(tmp_path: Path) -> None:
    port = free_port()
    p = cli("image", "pull", f"127.0.0.1:{port}/x/y:1", state=tmp_path / "s")
    assert p.returncode == 125
    assert f"registry 127.0.0.1:{port} could not be reached" in p.stderr
    p = cli("image", "pull", "Bad/Name", state=tmp_path / "s")
    assert p.returncode == 125 and "invalid image reference" in p.stderr


CUT_AFTER = 2 << 20  # bytes of a blob relayed before the proxy cuts its connection


def _parts(store: ImageStore) -> dict[str, int]:
    """The ``.part`` files a pull left in the store's tmp dir: blob hex digest -> bytes."""
    if not store.tmp_dir.is_dir():
        return {}
    return {
        p.name.removeprefix("pull-").removesuffix(".part"): p.stat().st_size
        for p in store.tmp_dir.glob("pull-*.part")
    }


def test_pull_through_a_cut_connection_resumes_with_range(
    reg: Registry, tmp_path: Path, images: None
) -> None:
    src = _source().resolve(SOURCE, unpack=False)
    assert max(la.size for la in src.layers) > CUT_AFTER  # there is a blob to cut
    p = cli("image", "push", SOURCE, f"{reg.host}/cut/py:1", *_login(), stdin=PASSWORD)
    assert p.returncode == 0, p.stderr
    state = tmp_path / "state"
    with CuttingProxy(reg.host, cut_after=CUT_AFTER) as proxy:
        p = cli("image", "pull", f"{proxy.host}/cut/py:1", *_login(), state=state,
                stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    cuts = [i for i, (kind, _) in enumerate(proxy.events) if kind == "cut"]
    assert len(cuts) == 1, proxy.events
    cut_line = proxy.events[cuts[0]][1]
    cut = next(la for la in src.layers if f"/blobs/{la.digest} " in cut_line)
    after = [
        head
        for kind, head in proxy.events[cuts[0] + 1 :]
        if kind == "request" and cut.digest in head
    ]
    starts = proxy.range_starts(cut.digest)
    assert after and starts, proxy.requests()  # the cut blob was asked for again, with Range
    assert all(0 < n <= CUT_AFTER for n in starts)  # from what it had, never past the cut
    store = ImageStore(state)
    im = store.resolve(f"{proxy.host}/cut/py:1")
    assert im.digest == src.digest
    assert [la.diff_id for la in im.layers] == [la.diff_id for la in src.layers]
    assert store.has_blob(cut.digest)
    assert _parts(store) == {}


def test_pull_killed_then_pulled_again_reuses_its_part_files(
    reg: Registry, tmp_path: Path, images: None
) -> None:
    src = _source().resolve(SOURCE, unpack=False)
    p = cli("image", "push", SOURCE, f"{reg.host}/kill/py:1", *_login(), stdin=PASSWORD)
    assert p.returncode == 0, p.stderr
    state = tmp_path / "state"
    store = ImageStore(state)
    log = tmp_path / "pull.log"
    with CuttingProxy(reg.host, pause_after=1 << 20) as slow, open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox_kernel", "image", "pull", f"{slow.host}/kill/py:1",
             *_login()],
            stdin=subprocess.PIPE, stdout=out, stderr=out, env=_env(state),
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(PASSWORD.encode())
            proc.stdin.close()
            for _ in range(600):  # up to 60 s for the first bytes on disk
                if any(_parts(store).values()) or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()  # still pulling: the body is paused
            assert any(_parts(store).values()), log.read_text()
            os.kill(proc.pid, signal.SIGKILL)  # the user stops it hard
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    left = {h: n for h, n in _parts(store).items() if n > 0}
    assert left  # what the killed pull had fetched stays for the next one
    assert store.list() == []  # no image is visible
    ls = cli("image", "ls", state=state)
    assert ls.returncode == 0 and "kill/py" not in ls.stdout, ls.stdout + ls.stderr

    with CuttingProxy(reg.host) as proxy:
        p = cli("image", "pull", f"{proxy.host}/kill/py:1", *_login(), state=state,
                stdin=PASSWORD)  # fmt: skip
    assert p.returncode == 0, p.stderr
    for hexd, n in left.items():  # each .part was resumed from exactly what it held
        assert proxy.range_starts(f"sha256:{hexd}") == [n], proxy.requests()
    im = store.resolve(f"{proxy.host}/kill/py:1")
    assert im.digest == src.digest
    assert [la.diff_id for la in im.layers] == [la.diff_id for la in src.layers]
    assert _parts(store) == {}


#: The images without ipykernel that go through the registry: the kind ``make_bare_image``
#: makes, and the Python version the kernel must report.
BARE = {"python3": "3.11", "python2.7": "2.7"}


async def test_images_without_ipykernel_pulled_from_the_registry_run_as_kernels(
    reg: Registry,
    tmp_path: Path,
    images: None,
    notebook_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = ImageStore()
    state = tmp_path / "state"
    pulled = ImageStore(state)
    made = []
    try:
        for kind in BARE:
            bare = make_bare_image(kind, own, tmp_path)
            made.append(bare)
            ref = f"{reg.host}/bare/{kind}:1"
            p = cli("image", "push", bare.ref, ref, *_login(), stdin=PASSWORD)
            assert p.returncode == 0, p.stderr
            # The ipykernel layer for this Python, built once into the default store (the
            # any-image test builds the same one) and copied into the fresh store, so that
            # `kernelspec add` below finds it instead of building it again.
            interp = ipykernel_layer.choose(bare.ref, probe.probe_image(bare).interpreters)
            assert not interp.ipykernel
            layer = ipykernel_layer.ensure(interp, own)
            import_path(pulled, own.oci_dir, layer.ref)
    finally:
        for bare in made:
            own.remove(bare.ref)
    assert [im.name for im in pulled.list()] == [ipykernel_layer.NAME] * len(BARE)

    prefix = tmp_path / "prefix"
    for kind, version in BARE.items():
        ref = f"{reg.host}/bare/{kind}:1"
        p = cli("image", "pull", ref, *_login(), state=state, stdin=PASSWORD)
        assert p.returncode == 0, p.stderr
        add = cli("kernelspec", "add", f"pulled-{kind}", "--image", ref, "--prefix", str(prefix),
                  "--pids", "100", state=state)  # fmt: skip
        assert add.returncode == 0, add.stderr
        assert f"image {ref}: Python {version}." in add.stdout, add.stdout
        assert f"ipykernel from {ipykernel_layer.NAME}:" in add.stdout, add.stdout
        assert "building the ipykernel layer" not in add.stdout

    monkeypatch.setenv("SANDBOX_KERNEL_STATE_DIR", str(state))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    if not kernelspecs.provisioner_registered():
        kernelspecs.register_provisioner_in_process()
    for kind, version in BARE.items():
        km = AsyncKernelManager(kernel_name=f"pulled-{kind}")
        await km.start_kernel(cwd=str(notebook_dir))
        try:
            reply, out = await execute(km, "import sys; print('%d.%d' % sys.version_info[:2])")
            assert reply["status"] == "ok" and out.split() == [version], out
            reply, out = await execute(km, "r = %sandbox\nprint(r)")
            assert reply["status"] == "ok", out
            assert "process limit        100" in out, out
        finally:
            await km.shutdown_kernel(now=True)
