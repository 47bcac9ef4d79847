"""Build hook: compile the small C executor (sk-runtime) into the package.

The executor is a standalone program, not a Python extension: it is what runs
between the Python planner and the contained command, so it must start in
microseconds and stay small while the container runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

NATIVE = Path("sandbox_kernel/runtime/native")
SOURCE = NATIVE / "sk-runtime.c"
# The compiler flags, shared with the Makefile and the executor tests.
CFLAGS = (NATIVE / "cflags").read_text().split()


class BuildRuntime(build_ext):
    def run(self) -> None:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise SystemExit("sandbox-kernel needs a C compiler to build sk-runtime: apt-get install gcc")
        if self.inplace:
            out_dir = Path("sandbox_kernel/runtime/_bin")
        else:
            out_dir = Path(self.build_lib) / "sandbox_kernel" / "runtime" / "_bin"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "sk-runtime"
        subprocess.check_call([cc, *CFLAGS, "-o", str(out), str(SOURCE)])


class BuildPyWithData(build_py):
    """Ship the top-level recipe, kernelspec and notebook folders inside the package (the
    mapping is ``sandbox_kernel.paths.SHIPPED``, reversed; a unit test keeps them equal)."""

    DATA = {"images": "recipes", "kernelspecs": "kernelspecs_data", "notebooks": "notebooks_data"}

    def run(self) -> None:
        super().run()
        for src, dst in self.DATA.items():
            if Path(src).is_dir():
                target = Path(self.build_lib) / "sandbox_kernel" / dst
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


class BinaryDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # the wheel carries a native program
        return True


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildRuntime, "build_py": BuildPyWithData})
