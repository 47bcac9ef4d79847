"""P8: preparing a container root does not grow with the image's size.

The overlay mount only records its lower directories; nothing of the image is read or
copied. Measured: the executor's setup time (start -> execve of the main process) and the
whole Python create+start -> exec, for a tiny image (one layer: a static busybox), the
python3 kernel image (3 layers), and a large image (one layer holding a hard-linked copy of
the host's /usr: every file of it, no data copied). Variants interleaved; ratios per round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sandbox_kernel.images.store import ImageStore
from sandbox_kernel.paths import new_container_id, state_dir
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import ContainerSpec, Limits

from .stats import Figure, ratio


def _tree(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            files += 1
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, n)).st_size
    return files, size


def _tiny(base: Path) -> Path:
    layer = base / "tiny"
    (layer / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", layer / "bin" / "busybox")
    for d in ("proc", "dev", "tmp", "sys", "etc"):
        (layer / d).mkdir()
    return layer


def _large(base: Path) -> Path | None:
    layer = base / "large"
    layer.mkdir()
    for d in ("proc", "dev", "tmp", "sys", "etc"):
        (layer / d).mkdir()
    r = subprocess.run(["cp", "-al", "/usr", str(layer / "usr")], capture_output=True, check=False)
    if r.returncode != 0:
        return None
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{name}"):
            (layer / name).symlink_to(os.readlink(f"/{name}"))
    return layer


def _one(layers: tuple[str, ...], argv: list[str]) -> tuple[float, float]:
    spec = ContainerSpec(
        id=new_container_id(),
        layers=layers,
        command=tuple(argv),
        limits=Limits(memory=128 << 20, pids=64, cpus=1.0),
    )
    t0 = time.perf_counter()
    c = Container.create(spec)
    try:
        c.start(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        c.wait(30)
        assert c.setup_us is not None
        return c.setup_us / 1000, wall * 1000
    finally:
        c.destroy()


def measure(runs: int = 30, large: bool = True) -> list[Figure]:
    # same file system as the store, so that the hard links work
    base = Path(tempfile.mkdtemp(prefix="skb-p8-", dir=state_dir()))
    os.chmod(base, 0o755)
    try:
        tiny = _tiny(base)
        variants: dict[str, tuple[tuple[str, ...], list[str]]] = {
            "tiny": ((str(tiny),), ["/bin/busybox", "true"]),
            "python3": (ImageStore().resolve("python3").lowerdirs(), ["/bin/true"]),
        }
        big_layer = _large(base) if large else None
        if big_layer is not None:
            variants["large"] = ((str(big_layer),), ["/usr/bin/true"])
        sizes = {"tiny": _tree(tiny)}
        py3 = [_tree(Path(p)) for p in variants["python3"][0]]
        sizes["python3"] = (sum(f for f, _ in py3), sum(b for _, b in py3))
        if big_layer is not None:
            sizes["large"] = _tree(big_layer)
        setup: dict[str, list[float]] = {k: [] for k in variants}
        wall: dict[str, list[float]] = {k: [] for k in variants}
        for layers, argv in variants.values():  # warm-up
            _one(layers, argv)
        for r in range(runs):
            keys = list(variants)
            keys = keys[r % len(keys) :] + keys[: r % len(keys)]
            for k in keys:
                s, w = _one(*variants[k])
                setup[k].append(s)
                wall[k].append(w)
        figs: list[Figure] = []
        for k in variants:
            files, size = sizes[k]
            what = f"{k} ({files} files, {size / 2**20:.0f} MiB)"
            figs.append(Figure(f"P8 setup (executor start -> exec), {what}", "ms", setup[k]))
            figs.append(Figure(f"P8 create+start -> exec, {what}", "ms", wall[k]))
        figs.append(
            ratio("P8 setup ratio python3/tiny", setup["python3"], setup["tiny"], target="~1.0")
        )
        big = "large" if "large" in variants else "python3"
        figs.append(ratio(f"P8 setup ratio {big}/tiny", setup[big], setup["tiny"], target="~1.0"))
        figs.append(
            Figure(
                f"P8 setup difference {big} - tiny",
                "ms",
                [a - b for a, b in zip(setup[big], setup["tiny"], strict=True)],
                target="<= 5 ms",
                limit=5.0,
            )
        )
        return figs
    finally:
        shutil.rmtree(base, ignore_errors=True)
