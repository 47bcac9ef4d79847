"""Build the shipped kernel images from nothing and prove they work, without the project runtime.

Each image is built into a fresh temporary store (set SANDBOX_KERNEL_BUILD_TEST_STATE to a
directory to keep and reuse a store between runs). A kernel is then started in the image with
``unshare`` + overlayfs + ``chroot`` (the builder's own runner), over an ipc connection file in a
short directory bound into the chroot at the same path, and the host's jupyter_client must get a
``kernel_info_reply`` from it and run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.images.build import build_image, run_in_image
from sandbox_kernel.images.labels import LABEL_ARGV, LABEL_DISPLAY_NAME, LABEL_INTERRUPT_MODE
from sandbox_kernel.images.store import Image, ImageStore
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import Bind, ContainerSpec

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root"),
]

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
STEP_RE = re.compile(r"^\[(\d+)/(\d+)\] (base|pip|files|compile|config): .*, [0-9.]+ s")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    keep = os.environ.get("SANDBOX_KERNEL_BUILD_TEST_STATE")
    root = Path(keep) if keep else tmp_path_factory.mktemp("skb-state")
    yield ImageStore(root)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def built(store: ImageStore) -> dict[str, tuple[Image, list[str]]]:
    return {}


def build(store: ImageStore, built: dict[str, tuple[Image, list[str]]], name: str) -> Image:
    if name not in built:
        lines: list[str] = []
        t0 = time.monotonic()
        image = build_image(str(REPO / "images" / name), store, progress=lines.append)
        print(f"built {name} in {time.monotonic() - t0:.1f} s:", *lines, sep="\n  ")
        built[name] = (image, lines)
    return built[name][0]


def image_env(image: Image) -> dict[str, str]:
    return dict(image.config.env)


def run(image: Image, argv: list[str], tmp: Path, binds: tuple[tuple[str, str], ...] = ()) -> str:
    upper = tmp / "upper"
    shutil.rmtree(upper, ignore_errors=True)
    proc = run_in_image(image.lowerdirs(), upper, argv, image_env(image), binds=binds, timeout=300)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def kernel_roundtrip(image: Image, tmp: Path) -> dict[str, object]:
    """Start the image's kernel command in the image; return kernel_info_reply content and the
    output of a small execution."""
    from jupyter_client.blocking.client import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    labels = dict(image.config.labels)
    argv_tmpl = json.loads(labels[LABEL_ARGV])
    conn_dir = Path(tempfile.mkdtemp(prefix="skt", dir="/tmp"))  # short: unix socket paths
    cf = conn_dir / "k.json"
    write_connection_file(str(cf), transport="ipc", ip=str(conn_dir / "s"), key=b"test-key")
    os.chmod(conn_dir, 0o755)
    argv = [a.replace("{connection_file}", str(cf)) for a in argv_tmpl]
    os.chown(conn_dir, NOBODY, NOBODY)
    os.chown(cf, NOBODY, NOBODY)
    spec = ContainerSpec(
        id=new_container_id(),
        layers=image.lowerdirs(),
        command=tuple(argv),
        env=tuple(image_env(image).items()),
        mounts=(Bind(str(conn_dir), str(conn_dir), readonly=False),),
    )
    kc = None
    with Container.create(spec) as container:
        log = open(tmp / "kernel.log", "w")  # noqa: SIM115
        container.start(stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            kc = BlockingKernelClient(connection_file=str(cf))
            kc.load_connection_file()
            # no heartbeat channel: without a kernel manager the client would call a kernel
            # that is still importing (no beat yet) dead; proc.poll() below tells a real death
            kc.start_channels(hb=False)
            try:
                kc.wait_for_ready(timeout=120)
            except RuntimeError:
                log_text = (tmp / "kernel.log").read_text()
                pytest.fail(f"kernel did not answer (exit {container.poll()}): {log_text}")
            msg_id = kc.kernel_info()
            reply = kc.get_shell_msg(timeout=30)
            while reply["parent_header"].get("msg_id") != msg_id:  # wait_for_ready's replies
                reply = kc.get_shell_msg(timeout=30)
            assert reply["header"]["msg_type"] == "kernel_info_reply"
            out: list[str] = []

            def hook(msg: dict[str, object]) -> None:
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])  # type: ignore[index]

            res = kc.execute_interactive(
                "import sys, os; print('%d.%d|%s|%s' % (sys.version_info[0], "
                "sys.version_info[1], os.getpid(), sys.executable))",
                output_hook=hook,
                timeout=60,
            )
            assert res["content"]["status"] == "ok", res
            content = dict(reply["content"])
            content["_out"] = "".join(out)
            kc.shutdown()
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.wait(timeout=20)
            return content
        finally:
            if kc is not None:
                kc.stop_channels()
            log.close()
            shutil.rmtree(conn_dir, ignore_errors=True)


def check_progress(lines: list[str]) -> None:
    assert lines, "no progress lines"
    steps = [ln for ln in lines if STEP_RE.match(ln)]
    assert steps, lines
    total = int(STEP_RE.match(steps[-1]).group(2))  # type: ignore[union-attr]
    assert steps[-1].startswith(f"[{total}/{total}] config:")


def check_base_layer(image: Image) -> None:
    base = image.layers[0].snapshot
    for d in ("proc", "sys", "tmp"):
        assert (base / d).is_dir() and not list((base / d).iterdir()), d
    # /dev keeps mmdebstrap's symlinks (fd, stdin...), never a device node (the extractor
    # does not make them; the runtime mounts its own /dev over it anyway)
    dev = list((base / "dev").rglob("*"))
    assert (base / "dev").is_dir() and all(p.is_symlink() or p.is_dir() for p in dev), dev
    assert (base / "etc/hostname").read_text() == ""
    assert not list(base.glob("usr/share/man/*/*"))  # dpkg path-exclude applied
    assert list(base.glob("usr/share/doc/*/copyright"))  # path-include kept


@pytest.mark.parametrize(
    ("name", "version", "display"),
    [("python2.7", "2.7", "Python 2.7"), ("python3", "3.11", "Python 3.11")],
)
def test_kernel_image_builds_and_kernel_starts(
    store: ImageStore,
    built: dict[str, tuple[Image, list[str]]],
    tmp_path: Path,
    name: str,
    version: str,
    display: str,
) -> None:
    image = build(store, built, name)
    check_progress(built[name][1])
    assert store.resolve(name).digest == image.digest
    assert len(image.layers) == 3  # base, pip, compile
    labels = dict(image.config.labels)
    assert labels[LABEL_DISPLAY_NAME] == display
    assert labels[LABEL_INTERRUPT_MODE] == "signal"
    env = image_env(image)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["LANG"] == "C.UTF-8" and "PATH" in env
    check_base_layer(image)

    # No host artefacts in the pip layer: no host-built byte code or foreign extension modules,
    # scripts use the image's interpreter.
    pip_layer = image.layers[1].snapshot
    site = pip_layer / f"usr/local/lib/python{version}/dist-packages"
    assert (site / "ipykernel").is_dir()
    assert not list(pip_layer.rglob("__pycache__")) and not list(pip_layer.rglob("*.pyc"))
    if version == "2.7":
        assert not list(pip_layer.rglob("*.cpython-3*.so"))
        assert not list(pip_layer.rglob("*.abi3.so"))
        assert (site / "tornado" / "ioloop.py").is_file()  # built from source, pure Python kept
    else:
        foreign = [p for p in pip_layer.rglob("*.cpython-*.so") if "cpython-311" not in p.name]
        assert not foreign
    for script in (pip_layer / "usr/local/bin").iterdir():
        first = script.read_bytes().split(b"\n", 1)[0]
        if first.startswith(b"#!"):
            assert first == b"#!/usr/bin/python" + version.encode(), (script, first)
    # The compile layer holds byte code written by the image's interpreter.
    comp = image.layers[2].snapshot
    if version == "2.7":
        assert (comp / "usr/local/lib/python2.7/dist-packages/ipykernel/kernelapp.pyc").is_file()
    else:
        assert list(
            (comp / f"usr/local/lib/python{version}/dist-packages/ipykernel/__pycache__").glob(
                "kernelapp.cpython-311.pyc"
            )
        )

    info = kernel_roundtrip(image, tmp_path)
    lang = info["language_info"]
    assert lang["name"] == "python"  # type: ignore[index]
    assert str(lang["version"]).startswith(version)  # type: ignore[index]
    major_minor, pid, exe = str(info["_out"]).strip().split("|")
    assert major_minor == version
    assert exe.startswith("/usr/bin/python")
    assert int(pid) < 100  # its own pid namespace


def test_rebuild_is_fully_cached(
    store: ImageStore, built: dict[str, tuple[Image, list[str]]]
) -> None:
    first = build(store, built, "python3")
    lines: list[str] = []
    t0 = time.monotonic()
    again = build_image("python3", store, progress=lines.append)  # by name: ./images etc.
    assert time.monotonic() - t0 < 60
    assert [layer.digest for layer in again.layers] == [layer.digest for layer in first.layers]
    steps = [ln for ln in lines if STEP_RE.match(ln)]
    assert all(ln.endswith("cached") for ln in steps[:-1]), lines


PLOT = (
    "import numpy, matplotlib\n"
    "matplotlib.use('Agg')\n"
    "import matplotlib.pyplot as plt\n"
    "x = numpy.linspace(0, 6.28, 100)\n"
    "plt.plot(x, numpy.sin(x))\n"
    "plt.savefig('/plot.png')\n"
    "print(numpy.__version__ + ' ' + matplotlib.__version__)\n"
)


@pytest.mark.parametrize(
    ("name", "numpy_version"), [("python2.7-plot", "1.16.6"), ("python3-plot", "2.4.6")]
)
def test_plot_variant_renders_png(
    store: ImageStore,
    built: dict[str, tuple[Image, list[str]]],
    tmp_path: Path,
    name: str,
    numpy_version: str,
) -> None:
    parent = build(store, built, name.replace("-plot", ""))
    image = build(store, built, name)
    # builds on the parent's layers
    assert [x.digest for x in image.layers[: len(parent.layers)]] == [
        x.digest for x in parent.layers
    ]
    assert dict(image.config.env)["MPLCONFIGDIR"] == "/tmp/matplotlib"
    labels = dict(image.config.labels)
    assert labels[LABEL_ARGV] == dict(parent.config.labels)[LABEL_ARGV]
    assert "matplotlib" in labels[LABEL_DISPLAY_NAME]
    # packages the parent has are not installed twice
    pip_layer = image.layers[len(parent.layers)].snapshot
    assert not list(pip_layer.rglob("six-*.dist-info"))
    assert not list(pip_layer.rglob("python_dateutil-*.dist-info"))
    py = dict(image.config.labels)["org.sandbox-kernel.python.executable"]
    text = run(image, [py, "-c", PLOT], tmp_path)
    assert text.split()[0] == numpy_version
    png = (tmp_path / "upper" / "plot.png").read_bytes()  # what the command wrote
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_from_image_with_files_env_and_compile(
    store: ImageStore, built: dict[str, tuple[Image, list[str]]], tmp_path: Path
) -> None:
    parent = build(store, built, "python3")
    d = tmp_path / "teacher"
    (d / "lib").mkdir(parents=True)
    (d / "lib" / "course_helpers.py").write_text("ANSWER = 42\n")
    (d / "recipe.toml").write_text(
        'from = "python3"\n'
        'name = "course-x"\n'
        "[[files]]\n"
        'src = "lib"\n'
        'dst = "/usr/local/lib/python3.11/dist-packages/course"\n'
        'mode = "0640"\n'
        "[env]\n"
        'COURSE = "x"\n'
        "[kernel]\n"
        'display_name = "Course X"\n'
    )
    lines: list[str] = []
    image = build_image(str(d), store, progress=lines.append)
    assert image.ref == "course-x:latest"
    assert len(image.layers) == len(parent.layers) + 2  # files, compile
    files_layer = image.layers[-2].snapshot
    f = files_layer / "usr/local/lib/python3.11/dist-packages/course/course_helpers.py"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    comp = image.layers[-1].snapshot
    assert list(comp.rglob("course_helpers.cpython-311.pyc"))
    assert dict(image.config.env)["COURSE"] == "x"
    assert dict(image.config.labels)[LABEL_DISPLAY_NAME] == "Course X"
    text = run(
        image,
        [
            "/usr/bin/python3.11",
            "-c",
            "from course.course_helpers import ANSWER;"
            "import os; print(ANSWER, os.environ['COURSE'])",
        ],
        tmp_path,
    )
    assert text.split() == ["42", "x"]
    # changing an added file changes the files step's key: rebuilt, the base layers are cached
    (d / "lib" / "course_helpers.py").write_text("ANSWER = 43\n")
    lines2: list[str] = []
    image2 = build_image(str(d), store, progress=lines2.append)
    assert image2.layers[-2].digest != image.layers[-2].digest
    assert not [ln for ln in lines2 if STEP_RE.match(ln) and ln.endswith("cached")]
