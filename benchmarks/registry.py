"""G: pulling an image from a registry on loopback, against skopeo, and a pull that finds
every layer already present.

The reference registry (Debian's docker-registry, htpasswd auth, plain http on 127.0.0.1)
holds the store's ``python3`` image, pushed once by ``sandbox-kernel image push``. Each round,
interleaved: ``sandbox-kernel image pull`` into an empty state dir (fetch, verify every
blob's size and digest, unpack the layers into snapshots: the image is ready to run), then
``skopeo copy docker://... oci:DIR`` of the same image (fetch and write the blobs only),
then the product's pull again into the same state dir (every layer present: only the
manifest and config are fetched). Whole commands, timed from outside.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox_kernel.images.store import ImageStore
from sandbox_kernel.paths import state_dir
from tests.registryserver import PASSWORD, USER, need, running_registry

from .stats import Figure, ratio

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "python3"


def _cli(*args: str, state: Path | None = None) -> float:
    """Seconds one ``sandbox-kernel`` command takes (it must succeed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(state or "/nonexistent"))
    for var in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR"):
        env.pop(var, None)
    if state is not None:
        env["SANDBOX_KERNEL_STATE_DIR"] = str(state)
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sandbox_kernel", *args, "--username", USER, "--password-stdin"],
        input=PASSWORD,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"sandbox-kernel {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return took


def _skopeo(skopeo: str, ref: str, dest: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [skopeo, "copy", "--quiet", "--src-tls-verify=false", "--src-creds",
         f"{USER}:{PASSWORD}", f"docker://{ref}", f"oci:{dest}:bench"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return time.monotonic() - t0


def _compressed_size(store: ImageStore) -> int:
    image = store.resolve(SOURCE, unpack=False)
    manifest = json.loads(store.read_blob(image.digest))
    return sum(int(layer["size"]) for layer in manifest["layers"])


def measure(runs: int = 5) -> list[Figure]:
    """The G figures: ``runs`` interleaved rounds of the three pulls."""
    skopeo = need("skopeo")
    size = _compressed_size(ImageStore())
    base = Path(tempfile.mkdtemp(prefix="skb-r-", dir=state_dir()))
    try:
        with running_registry(base / "registry") as reg:
            ref = f"{reg.host}/bench/py:1"
            _cli("image", "push", SOURCE, ref)
            ours: list[float] = []
            theirs: list[float] = []
            again: list[float] = []
            for r in range(runs + 1):  # the first round warms the caches, not counted
                state = base / f"state-{r}"
                a = _cli("image", "pull", ref, state=state)
                b = _skopeo(skopeo, ref, base / f"oci-{r}")
                c = _cli("image", "pull", ref, state=state)
                shutil.rmtree(state, ignore_errors=True)
                shutil.rmtree(base / f"oci-{r}", ignore_errors=True)
                if r:
                    ours.append(a)
                    theirs.append(b)
                    again.append(c)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    mib = size / 2**20
    what = f"{SOURCE}, {mib:.0f} MiB compressed"
    return [
        Figure(f"G1 pull, ready to run ({what})", "s", ours),
        Figure(f"G1 pull throughput ({what})", "MiB/s", [mib / t for t in ours]),
        Figure(f"G1 skopeo copy to an OCI layout ({what})", "s", theirs),
        ratio(
            "G1 pull / skopeo copy",
            ours,
            theirs,
            note="the pull also verifies and unpacks every layer; skopeo writes the blobs only",
        ),
        Figure("G2 second pull, every layer present", "s", again),
    ]
