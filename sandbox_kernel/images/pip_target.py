"""pip for the IMAGE's interpreter, run by the HOST's pip.

The host's pip installs wheels chosen for the image's Python (``--python-version``,
``--implementation cp``, ``--abi``, ``--platform``) with ``--target`` into an empty directory laid
out as the new layer (``<layer>/<site_dir>``). Afterwards the layer is cleaned of host artefacts:
byte code compiled by the host Python, extension modules built for the host Python by source
builds, and console scripts whose shebang names the host interpreter.

Packages an image builds on (``from = ...``) are taken into account: the versions the parent
image already has are passed as constraints, distributions identical to the parent's are dropped
from the new layer, and the files of a parent distribution that the recipe replaces by another
version are hidden with overlay whiteouts.
"""

from __future__ import annotations

import contextlib
import csv
import email.parser
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildError
from .recipe import PipSpec, PythonSpec, canonical_project

_EXT_RE = re.compile(r"\.(cpython-(\d+)[a-z]*-[^.]+|abi3|cpython-[^.]+)\.so$")
_HOST_SHEBANG_RE = re.compile(rb"^#!.*python[0-9.]*[^\n]*\n")


@dataclass(frozen=True)
class Dist:
    """One installed distribution in a site directory."""

    name: str  # canonical
    version: str
    info_dir: Path
    files: tuple[str, ...]  # paths relative to the site dir (from RECORD)


@dataclass
class PipResult:
    """What the pip step did, for the build's progress line. Returned by ``install``."""

    installed: list[Dist] = field(default_factory=list)
    dropped_same_as_parent: list[str] = field(default_factory=list)
    replaced_in_parent: list[str] = field(default_factory=list)
    removed_host_files: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)


def read_dists(site: Path) -> dict[str, Dist]:
    """Distributions installed in ``site`` (``*.dist-info`` and ``*.egg-info``)."""
    out: dict[str, Dist] = {}
    if not site.is_dir():
        return out
    for info in sorted(site.iterdir()):
        if not info.name.endswith((".dist-info", ".egg-info")):
            continue
        meta_file = info / "METADATA" if info.name.endswith(".dist-info") else info / "PKG-INFO"
        name = version = ""
        if info.is_dir() and meta_file.is_file():
            msg = email.parser.Parser().parsestr(
                meta_file.read_text(encoding="utf-8", errors="replace"), headersonly=True
            )
            name, version = msg.get("Name", ""), msg.get("Version", "")
        if not name:
            stem = info.name.rsplit(".", 1)[0]
            name, _, version = stem.partition("-")
            version = version.split("-")[0]
        files: list[str] = []
        record = info / "RECORD"
        if record.is_file():
            with open(record, newline="", encoding="utf-8", errors="replace") as f:
                files = [row[0] for row in csv.reader(f) if row]
        out[canonical_project(name)] = Dist(canonical_project(name), version, info, tuple(files))
    return out


def parent_dists(lowerdirs: Sequence[str], site_dir: str) -> dict[str, Dist]:
    """Distributions visible in the parent image's site dir (top-most layer wins)."""
    seen: dict[str, Dist] = {}
    for lower in reversed(list(lowerdirs)):  # base first, so upper layers override
        for name, dist in read_dists(Path(lower) / site_dir.lstrip("/")).items():
            seen[name] = dist
    return seen


_MANYLINUX_RE = re.compile(r"^manylinux_2_([0-9]+)_([a-z0-9_]+)$")
_LEGACY = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def expand_platforms(platforms: Sequence[str]) -> list[str]:
    """pip matches ``--platform`` tags literally: a glibc level ``manylinux_2_N_ARCH`` (or a
    legacy ``manylinux2014/2010/1_ARCH``) is expanded here to every older manylinux tag of that
    architecture, legacy aliases included, so that ``manylinux_2_36_x86_64`` means "glibc 2.36"."""
    out: list[str] = []
    for plat in platforms:
        m = _MANYLINUX_RE.match(plat)
        level, arch = (int(m.group(1)), m.group(2)) if m else (0, "")
        for legacy, lv in _LEGACY.items():
            if plat.startswith(legacy + "_"):
                level, arch = lv, plat[len(legacy) + 1 :]
        if not level:
            out.append(plat)
            continue
        for minor in range(level, 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            for legacy, lv in _LEGACY.items():
                if lv == minor:
                    out.append(f"{legacy}_{arch}")
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def pip_command(
    spec: PipSpec, py: PythonSpec, target: Path, constraints: Path | None, python: str | None = None
) -> list[str]:
    """The host pip command that installs ``spec``'s packages for the image's interpreter
    ``py`` into ``target`` (``--target``, ``--python-version``, ``--abi``, ``--platform``).
    Called by ``install``."""
    cmd = [
        python or sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(target),
        "--no-compile",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        "--no-input",
        "--python-version",
        py.version,
        "--implementation",
        "cp",
        "--abi",
        py.abi,
    ]
    for plat in expand_platforms(py.platforms):
        cmd += ["--platform", plat]
    cmd.append("--only-binary=:all:")
    if spec.from_source:
        cmd.append("--no-binary=" + ",".join(spec.from_source))
    if spec.no_deps:
        cmd.append("--no-deps")
    if spec.ignore_requires_python:
        cmd.append("--ignore-requires-python")
    if spec.index_url:
        cmd += ["--index-url", spec.index_url]
    for url in spec.extra_index_urls:
        cmd += ["--extra-index-url", url]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    cmd += list(spec.packages)
    return cmd


def _whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _is_foreign_extension(name: str, py: PythonSpec) -> bool:
    """An extension module file built for another interpreter than the image's."""
    m = _EXT_RE.search(name)
    if not m:
        return False
    if m.group(1) == "abi3":
        return py.major == 2
    tag = m.group(2)
    return tag is not None and tag != py.version.replace(".", "")


def install(
    spec: PipSpec,
    py: PythonSpec,
    layer: Path,
    lowerdirs: Sequence[str],
    recipe_file: Path,
    *,
    log: Callable[[str], None] | None = None,
    python: str | None = None,
) -> PipResult:
    """Install ``spec`` for the image interpreter ``py`` into the empty layer dir ``layer``.

    Called by the builder's pip step; ``lowerdirs`` are the parent image's layers (top first),
    ``log`` receives pip's output lines, ``python`` is the host interpreter that runs pip.
    """
    site_rel = py.site_dir.lstrip("/")
    site = layer / site_rel
    site.mkdir(parents=True, exist_ok=True)
    result = PipResult()

    parents = parent_dists(lowerdirs, py.site_dir) if lowerdirs else {}
    constraints = _write_constraints(spec, layer, parents)
    cmd = pip_command(spec, py, site, constraints, python)
    proc = _run_pip(cmd, constraints, recipe_file)
    if log is not None:
        for line in proc.stdout.splitlines():
            log(line)
    _check_pip_exit(proc, cmd, spec, py, recipe_file)
    _move_console_scripts(site, layer, py, result)
    _remove_host_files(layer, py, result)
    _reconcile_with_parent(site, parents, result)
    _prune_empty_dirs(site)
    return result


def _write_constraints(spec: PipSpec, layer: Path, parents: dict[str, Dist]) -> Path | None:
    """Write the versions of the parent's distributions that ``spec`` does not pin as a pip
    constraints file next to ``layer``; its path, or None without parent distributions.
    Called by ``install``, which removes the file once pip has run."""
    if not parents:
        return None
    pinned = {canonical_project(p.split("==")[0].split("[")[0]) for p in spec.packages}
    constraints = layer.parent / (layer.name + ".constraints.txt")
    constraints.write_text(
        "".join(
            f"{d.name}=={d.version}\n"
            for d in parents.values()
            if d.name not in pinned and d.version
        )
    )
    return constraints


def _run_pip(
    cmd: list[str], constraints: Path | None, recipe_file: Path
) -> subprocess.CompletedProcess[str]:
    """Run the pip command ``cmd`` (output captured, stderr in stdout) without the caller's
    PYTHONPATH, then remove the ``constraints`` file; BuildError when it cannot be started.
    Called by ``install``."""
    env = dict(os.environ)
    env["PIP_NO_INPUT"] = "1"
    env.pop("PYTHONPATH", None)
    try:
        return subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
    except OSError as exc:
        raise BuildError(
            f"recipe {recipe_file}: step pip: cannot run the host's pip "
            f"({cmd[0]} -m pip): {exc}; install pip for that Python"
        ) from exc
    finally:
        if constraints is not None:
            constraints.unlink(missing_ok=True)


def _check_pip_exit(
    proc: subprocess.CompletedProcess[str],
    cmd: list[str],
    spec: PipSpec,
    py: PythonSpec,
    recipe_file: Path,
) -> None:
    """BuildError with the tail of pip's output and a hint when pip failed. Called by
    ``install`` after pip has run."""
    if proc.returncode == 0:
        return
    tail = "\n    ".join(proc.stdout.strip().splitlines()[-15:])
    hint = (
        "check the pins exist for Python " + py.version + " (" + py.abi + ") as wheels; "
        "a package without a wheel for the image's Python must be listed in "
        "pip.from_source (which needs no_deps = true and the full pinned closure)"
    )
    if "No module named pip" in proc.stdout:
        hint = f"install pip for the host Python {cmd[0]}"
    raise BuildError(
        f"recipe {recipe_file}: step pip: `pip install` for Python "
        f"{py.version} failed (exit {proc.returncode}) installing "
        f"{', '.join(spec.packages)}:\n    {tail}\n  fix: {hint}"
    )


def _move_console_scripts(site: Path, layer: Path, py: PythonSpec, result: PipResult) -> None:
    """Move the console scripts pip --target put in ``<site>/bin`` (with the host's shebang)
    to ``/usr/local/bin`` of the layer, their shebang naming the image's interpreter.
    Called by ``install``; the names go to ``result.scripts``."""
    bindir = site / "bin"
    if not bindir.is_dir():
        return
    dest = layer / "usr/local/bin"
    dest.mkdir(parents=True, exist_ok=True)
    for script in sorted(bindir.iterdir()):
        target = dest / script.name
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            m = _HOST_SHEBANG_RE.match(data)
            if m:
                data = b"#!" + py.executable.encode() + b"\n" + data[m.end() :]
            target.write_bytes(data)
            os.chmod(target, 0o755)
        else:
            shutil.move(str(script), str(target))
        result.scripts.append(script.name)
    shutil.rmtree(bindir)


def _remove_host_files(layer: Path, py: PythonSpec, result: PipResult) -> None:
    """Remove the host's byte code (``__pycache__``, ``.pyc``, ``.pyo``) and extension modules
    built for another interpreter than ``py`` from the layer. Called by ``install``; the
    removed paths go to ``result.removed_host_files``."""
    for dirpath, dirnames, filenames in os.walk(layer):
        if "__pycache__" in dirnames:
            p = Path(dirpath) / "__pycache__"
            shutil.rmtree(p)
            result.removed_host_files.append(str(p.relative_to(layer)))
            dirnames.remove("__pycache__")
        for fn in filenames:
            if fn.endswith((".pyc", ".pyo")) or _is_foreign_extension(fn, py):
                p = Path(dirpath) / fn
                p.unlink()
                result.removed_host_files.append(str(p.relative_to(layer)))


def _reconcile_with_parent(site: Path, parents: dict[str, Dist], result: PipResult) -> None:
    """Compare the distributions pip installed in ``site`` with the parent's: new ones are
    kept, ones identical to the parent's are dropped, and a parent version replaced by
    another has its files hidden. Called by ``install``; the outcome goes to ``result``."""
    for name, dist in read_dists(site).items():
        old = parents.get(name)
        if old is None:
            result.installed.append(dist)
        elif old.version == dist.version:
            _drop_dist(site, dist)
            result.dropped_same_as_parent.append(f"{name}=={dist.version}")
        else:
            _hide_parent_dist(site, old, dist)
            result.installed.append(dist)
            result.replaced_in_parent.append(f"{name} {old.version} -> {dist.version}")


def _drop_dist(site: Path, dist: Dist) -> None:
    """Remove the files of ``dist`` (per its RECORD, paths leaving ``site`` ignored) and its
    metadata directory from ``site``. Called by ``_reconcile_with_parent`` for a distribution
    the parent already has in the same version."""
    for rel in dist.files:
        if rel.startswith(".."):
            continue
        f = site / os.path.normpath(rel)
        if f.is_file() or f.is_symlink():
            f.unlink()
    shutil.rmtree(dist.info_dir, ignore_errors=True)


def _hide_parent_dist(site: Path, old: Dist, new: Dist) -> None:
    """Whiteout the files of the parent's distribution ``old`` that its replacement ``new``
    does not have, and ``old``'s metadata directory. Called by ``_reconcile_with_parent``."""
    new_files = {os.path.normpath(r) for r in new.files}
    for rel in old.files:
        norm = os.path.normpath(rel)
        if norm.startswith("..") or norm in new_files:
            continue
        _whiteout(site / norm)
    _whiteout(site / old.info_dir.name)


def _prune_empty_dirs(root: Path) -> None:
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        p = Path(dirpath)
        if p != root:
            with contextlib.suppress(OSError):
                p.rmdir()
