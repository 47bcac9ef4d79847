"""What pip really builds carries the prebuilt JupyterLab extension, the server extension's
config and the kernelspecs' logos: a wheel from a copy of the tracked tree (so files left
untracked in the checkout cannot make it pass), and a wheel from the sdist of that copy.
The wheel installed into a throwaway prefix shows the extension in ``jupyter labextension
list``. Offline: no index is asked (``--no-deps --no-build-isolation``: the build backend,
setuptools and wheel, comes from the test extra)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.jupyter import kernelspecs, labext

REPO = Path(__file__).resolve().parents[2]
EXT = f"share/jupyter/labextensions/{labext.NAME}"
SERVER_CONFIG = "etc/jupyter/jupyter_server_config.d/sandbox_kernel.json"
LOGOS = ("logo-64x64.png", "logo-svg.svg")
PIP = (sys.executable, "-m", "pip")

pytestmark = pytest.mark.slow


def tracked_copy(dest: Path) -> Path:
    """The tracked files of the checkout (as they are in the work tree) copied to ``dest``."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise AssertionError(
            f"{REPO} must be a git checkout with git installed (the test builds from its "
            f"tracked files): {err}"
        ) from err
    for name in listed.decode().split("\0"):
        src = REPO / name
        if not name or not os.path.lexists(src):
            continue  # a tracked file deleted in the work tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(
        cmd, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def pip_wheel(source: Path, out: Path) -> Path:
    """Build one wheel of ``source`` (a tree or an sdist) into ``out`` with pip, offline."""
    out.mkdir()
    run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        out,
    )
    wheels = list(out.glob("sandbox_kernel-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def installed_here() -> list[tuple[str, str]]:
    """This environment's installs of the package: (version, where its metadata is)."""
    return sorted(
        (d.version, str(d.locate_file("")))
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().replace("_", "-") == "sandbox-kernel"
    )


def built_files() -> set[str]:
    """The files of the committed build, relative to it (the stamp stays in the checkout)."""
    return {
        p.relative_to(labext.BUILT).as_posix()
        for p in labext.BUILT.rglob("*")
        if p.is_file() and p.suffix != ".sha256"
    }


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """{"tree": the wheel of the tracked tree, "sdist": the wheel built from its sdist}."""
    base = tmp_path_factory.mktemp("dists")
    tree = tracked_copy(base / "tree")
    from_tree = pip_wheel(tree, base / "tree-wheel")
    sdist_dir = base / "sdist"
    sdist_dir.mkdir()
    # the PEP 517 hook a frontend calls (pip builds no sdists), without isolation
    run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
            str(sdist_dir),
        ],
        tree,
    )
    (sdist,) = sdist_dir.glob("sandbox[-_]kernel-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    missing = {f for f in built_files() if f"{top}/sandbox_kernel/labextension/{f}" not in names}
    assert not missing, f"the sdist lacks the built extension's {sorted(missing)}"
    from_sdist = pip_wheel(sdist, base / "sdist-wheel")
    yield {"tree": from_tree, "sdist": from_sdist}
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", ["tree", "sdist"])
def test_the_wheel_carries_the_extension_its_config_and_the_logos(
    wheels: dict[str, Path], kind: str
) -> None:
    with zipfile.ZipFile(wheels[kind]) as whl:
        names = set(whl.namelist())
        (data,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".data")}
        shipped = {
            n[len(f"{data}/data/{EXT}/") :] for n in names if n.startswith(f"{data}/data/{EXT}/")
        }
        built = built_files()
        assert "package.json" in built and any(
            re.fullmatch(r"static/remoteEntry\.[0-9a-f]+\.js", f) for f in built
        ), built
        assert shipped == built, f"{kind} wheel: missing {built - shipped}, extra {shipped - built}"
        for rel in built:
            ours = (labext.BUILT / rel).read_bytes()
            assert whl.read(f"{data}/data/{EXT}/{rel}") == ours, f"{kind} wheel: {rel} differs"
        meta = json.loads(whl.read(f"{data}/data/{EXT}/package.json"))
        assert meta["name"] == labext.NAME
        assert f"{data}/data/{EXT}/{meta['jupyterlab']['_build']['load']}" in names
        config = json.loads(whl.read(f"{data}/data/{SERVER_CONFIG}"))
        assert config == json.loads((REPO / "jupyter-config" / "sandbox_kernel.json").read_text())
        # the package data kernelspec install copies from (an installed, not editable, package)
        for rel in built:
            assert f"sandbox_kernel/labextension/{rel}" in names, rel
        for spec in kernelspecs.KERNELSPEC_NAMES:
            for logo in LOGOS:
                got = whl.read(f"sandbox_kernel/kernelspecs_data/{spec}/{logo}")
                assert got == (REPO / "kernelspecs" / spec / logo).read_bytes(), (spec, logo)
        assert "sandbox_kernel/runtime/_bin/sk-runtime" in names


def test_the_installed_wheel_shows_the_extension_enabled(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    prefix = tmp_path / "prefix"
    before = installed_here()
    # --ignore-installed: else pip takes the package installed in this environment (an
    # editable install) for the one to replace, and uninstalls it from here
    install = [*PIP, "install", "-q", "--no-deps", "--no-compile", "--ignore-installed"]
    run([*install, "--prefix", str(prefix), str(wheels["tree"])], tmp_path)
    assert installed_here() == before, "the install into the prefix changed this environment"
    data = prefix / "share" / "jupyter"
    assert (data / "labextensions" / labext.NAME / "package.json").is_file()
    assert (prefix / SERVER_CONFIG).is_file()
    env = offline_env()
    env.update(
        JUPYTER_PATH=str(data),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_CONFIG_PATH=str(prefix / "etc" / "jupyter"),
        NO_COLOR="1",
    )
    listed = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)
    assert listed.returncode == 0, out
    # the section of the prefix's folder (an extension elsewhere on the machine is no proof)
    sections = re.split(r"^(?=\S)", out, flags=re.M)
    ours = [s for s in sections if s.startswith(str(data / "labextensions"))]
    assert ours, out
    line = re.search(rf"^\s+{re.escape(labext.NAME)} v\S+ (.*)$", ours[0], flags=re.M)
    assert line, out
    assert "enabled" in line.group(1) and "OK" in line.group(1), line.group(0)
