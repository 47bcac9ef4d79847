"""The demo: Python 2.7 and Python 3 notebooks executed side by side, each in its sandbox.

Layer: Jupyter (a program on top of the provisioner; nbclient and nbformat, imported where
used).

``python -m sandbox_kernel.jupyter.demo [--output DIR]``:

1. builds the python2.7 and python3 images if they are missing (first run: a few minutes);
2. installs the two kernelspecs into this Python's prefix (``--sys-prefix``);
3. executes notebooks/python2-demo.ipynb and notebooks/python3-demo.ipynb CONCURRENTLY with
   nbclient, each on its sandbox kernel, with the output directory as their folder;
4. writes the executed notebooks there, prints their key outputs side by side, and how to
   open them in JupyterLab.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import beneath
from ..errors import ImageError, SandboxError
from ..paths import shipped_dirs
from . import kernelspecs

DEMOS: tuple[tuple[str, str, str], ...] = (
    # (notebook file, kernelspec, image)
    ("python2-demo.ipynb", "python2.7-sandbox", "python2.7-plot"),
    ("python3-demo.ipynb", "python3-sandbox", "python3-plot"),
)
# Every image the shipped kernelspecs use, parents before the images built on them.
IMAGES: tuple[str, ...] = ("python2.7", "python2.7-plot", "python3", "python3-plot")
KEYS: tuple[tuple[str, str], ...] = (
    ("Python ", "python"),
    ("hostname: ", "hostname"),
    ("pids: ", "pids"),
    ("uid: ", "identity"),
    ("cgroup v", "limits"),
    ("127.0.0.1:1", "loopback"),
    ("198.18.0.1:443", "internet"),
    ("wrote ", "file"),
    ("hello from Python 2", "py2 syntax"),
    ("plot: ", "plot"),
)


def notebooks_dir() -> Path:
    """The folder of the shipped demo notebooks (``run_demo`` reads them from there;
    ``main`` names it in its closing advice)."""
    candidates = shipped_dirs("notebooks")
    for candidate in candidates:
        if (candidate / DEMOS[0][0]).is_file():
            return candidate
    raise SandboxError(
        f"the demo notebooks are missing (looked in {candidates[0]} and {candidates[1]}); "
        "reinstall sandbox-kernel"
    )


def ensure_images(names: Sequence[str], say: Any = print) -> None:
    """Build each image of ``names`` that the store lacks, in order (parents first), saying
    what it does through ``say``. Called by ``main`` unless ``--no-build``."""
    from ..images.build import build_image
    from ..images.store import ImageStore

    for name in names:
        store = ImageStore()
        try:
            image = store.resolve(name)
        except ImageError:
            say(f"building image {name} (first run only; a few minutes)...")
            t0 = time.monotonic()
            image = build_image(name, store, progress=lambda line: say(f"  {line}"))
            say(f"built {image.ref} in {time.monotonic() - t0:.0f} s")
        else:
            say(f"image {image.ref} present ({image.digest[:19]})")


def prepare_output(path: Path) -> tuple[int, int]:
    """Create the output folder; when root, give it to the invoking user (sudo) or to nobody,
    because sandbox kernels never run as root and write their files there. Returns the
    folder's owner; called by ``main``."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if os.geteuid() == 0 and st.st_uid == 0:
        uid = int(os.environ.get("SUDO_UID") or 65534)
        gid = int(os.environ.get("SUDO_GID") or 65534)
        os.chown(path, uid, gid)
        return uid, gid
    return st.st_uid, st.st_gid


@dataclass
class Result:
    """One executed notebook: its kernelspec, time, error (if any), key output lines and
    where the executed copy went. Made by ``run_one``; printed by ``main``."""

    notebook: str
    kernelspec: str
    seconds: float = 0.0
    error: str | None = None
    key: dict[str, str] = field(default_factory=dict)
    output: Path | None = None


def key_outputs(nb: Any) -> dict[str, str]:
    """The first output line of each ``KEYS`` prefix (and whether a PNG plot was drawn) in an
    executed notebook. Called by ``run_one`` and by the notebook tests."""
    found: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png") if "data" in out else None
            if png and "plot" not in found:
                found["plot"] = f"PNG plot drawn in the sandbox ({len(png) * 3 // 4 // 1024} KiB)"
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for line in str(text).splitlines():
                for prefix, key in KEYS:
                    if line.startswith(prefix) and key not in found:
                        found[key] = line
    return found


async def run_one(src: Path, kernel_name: str, outdir: Path, timeout: int) -> Result:
    """Execute notebook ``src`` on kernelspec ``kernel_name`` with ``outdir`` as its folder
    and write the executed copy there; a failure is kept in the Result, not raised. Called by
    ``run_demo``, once per demo notebook, concurrently."""
    import nbformat
    from nbclient import NotebookClient

    result = Result(src.name, kernel_name)
    nb = nbformat.read(src, as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=timeout, resources={"metadata": {"path": str(outdir)}}
    )
    t0 = time.monotonic()
    try:
        await client.async_execute()
    except Exception as exc:  # report per notebook; the other one keeps going
        result.error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        )
    result.seconds = time.monotonic() - t0
    result.key = key_outputs(nb)
    out = outdir / src.name.replace(".ipynb", ".executed.ipynb")
    # the folder is the kernels': a link planted under this name is replaced, not followed
    text = nbformat.writes(nb)  # type: ignore[no-untyped-call]
    beneath.write_bytes(str(outdir), out.name, text.encode("utf-8"))
    result.output = out
    return result


def side_by_side(results: Sequence[Result], width: int = 60) -> str:
    """The key outputs of the notebooks as columns, one row per key. Called by ``main``."""
    keys = [k for _, k in KEYS if any(k in r.key for r in results)]
    head = "".ljust(11) + " | ".join(
        f"{r.kernelspec} ({r.seconds:.1f} s)".ljust(width) for r in results
    )
    lines = [head, "-" * len(head)]
    for key in keys:
        cells = []
        for r in results:
            value = r.key.get(key, "-")
            if len(value) > width:
                value = value[: width - 3] + "..."
            cells.append(value.ljust(width))
        lines.append(key.ljust(11) + " | ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


async def run_demo(outdir: Path, timeout: int) -> list[Result]:
    """Execute the demo notebooks concurrently (``run_one`` each). Called by ``main``."""
    src = notebooks_dir()
    return list(
        await asyncio.gather(
            *(run_one(src / nb, kernel, outdir, timeout) for nb, kernel, _ in DEMOS)
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox_kernel.jupyter.demo``: the steps of the module docstring; returns
    the exit status (1 when a notebook failed or the host is not ready)."""
    parser = argparse.ArgumentParser(
        prog="python -m sandbox_kernel.jupyter.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output", "-o", default="demo-output", help="folder for the executed notebooks"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    parser.add_argument(
        "--no-build", action="store_true", help="fail instead of building missing images"
    )
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print(
            "the demo needs root (namespaces, mounts, cgroups): run it with sudo", file=sys.stderr
        )
        return 1
    try:
        if args.no_build:
            from ..images.store import ImageStore

            for _, _, image in DEMOS:
                ImageStore().resolve(image)
        else:
            ensure_images(IMAGES)
        for k in kernelspecs.install([kernel for _, kernel, _ in DEMOS], prefix=sys.prefix):
            print(f"kernelspec {k.name} installed in {k.resource_dir}")
    except SandboxError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    if not kernelspecs.provisioner_registered():
        kernelspecs.register_provisioner_in_process()

    outdir = Path(args.output).resolve()
    uid, _gid = prepare_output(outdir)
    print(
        f"\nexecuting {' and '.join(nb for nb, _, _ in DEMOS)} concurrently "
        f"(kernels run as uid {uid})...\n"
    )
    results = asyncio.run(run_demo(outdir, args.timeout))
    print(side_by_side(results))
    print()
    failed = False
    for r in results:
        status = f"FAILED: {r.error}" if r.error else "ok"
        print(f"{r.notebook}: {status}; executed notebook: {r.output}")
        failed = failed or bool(r.error)
    written = sorted(p.name for p in outdir.glob("written-by-*.txt"))
    if written:
        print(f"files the kernels wrote into {outdir}: {', '.join(written)}")
    venv_bin = Path(sys.prefix) / "bin"
    print(
        "\nOpen them in JupyterLab (the kernels 'Python 2.7 (sandbox)' and "
        "'Python 3 (sandbox)' are installed):\n"
        f"  {venv_bin / 'jupyter'} lab --allow-root --ip 127.0.0.1 --no-browser "
        f"--ServerApp.root_dir={outdir}\n"
        f"  (the source notebooks are in {notebooks_dir()}; "
        "`sandbox-kernel ps` lists the running sandboxes)"
    )
    if not kernelspecs.provisioner_registered():
        print(
            "  note: Jupyter finds the sandbox provisioner only once this package is installed "
            f"in that Python: {Path(sys.prefix) / 'bin' / 'pip'} install -e ."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
