"""Build the JupyterLab extension and keep the stamp that says from which sources.

  python tools/labextension.py build   npm ci, tsc, `jupyter labextension build` into
                                       sandbox_kernel/labextension/, then write the stamp
  python tools/labextension.py check   exit 1 when the built files are older than the sources

Run by `make labextension` (build) and CI's unit tests (tests/unit/test_labextension.py
recomputes ``sources_digest`` and compares it with the stamp). The stamp is the sha256 of
every source file (package.json, package-lock.json, tsconfig.json, install.json, src/,
style/) with its path, so any edit there without a rebuild fails the unit test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "labextension"
BUILT = REPO / "sandbox_kernel" / "labextension"
STAMP = BUILT / "sources.sha256"
#: what the stamp covers, relative to SOURCE (folders: every file below them)
SOURCES = ("package.json", "package-lock.json", "tsconfig.json", "install.json", "src", "style")


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = SOURCE / name
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"{path} is missing: the extension's sources are incomplete")
    return sorted(files)


def sources_digest() -> str:
    h = hashlib.sha256()
    for path in source_files():
        rel = path.relative_to(SOURCE).as_posix()
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def read_stamp() -> str:
    return STAMP.read_text().split()[0] if STAMP.is_file() else ""


def build() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is missing: apt-get install nodejs npm (node 20 or newer)")
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    import jupyterlab  # the venv's JupyterLab: its core package is what the build shares

    core = Path(jupyterlab.__file__).parent / "staging" / "package.json"
    subprocess.check_call([npm, "ci", "--no-audit", "--no-fund"], cwd=SOURCE, env=env)
    subprocess.check_call([npm, "run", "build:lib"], cwd=SOURCE, env=env)
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "jupyterlab.labextensions",
            "build",
            f"--core-package-file={core}",
            ".",
        ],
        cwd=SOURCE,
        env=env,
    )
    # the builder empties its output folder: JupyterLab's "installed by" note goes in after
    shutil.copy2(SOURCE / "install.json", BUILT / "install.json")
    STAMP.write_text(f"{sources_digest()}  labextension/ (tools/labextension.py build)\n")
    print(f"built {BUILT.relative_to(REPO)} (stamp {read_stamp()[:12]})")


def check() -> int:
    if read_stamp() != sources_digest():
        print(
            f"{BUILT.relative_to(REPO)} is not built from the current labextension/ sources: "
            "run `make labextension` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "build":
        build()
    elif command == "check":
        sys.exit(check())
    else:
        raise SystemExit("usage: tools/labextension.py build|check")
