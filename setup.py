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

SOURCE = Path("sandbox_kernel/native/sk-runtime.c")
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-D_GNU_SOURCE", "-fstack-protector-strong",
          "-D_FORTIFY_SOURCE=2", "-fPIE", "-pie", "-Wl,-z,relro,-z,now"]


class BuildRuntime(build_ext):
    def run(self) -> None:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise SystemExit("sandbox-kernel needs a C compiler to build sk-runtime: apt-get install gcc")
        if self.inplace:
            out_dir = Path("sandbox_kernel/_bin")
        else:
            out_dir = Path(self.build_lib) / "sandbox_kernel" / "_bin"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "sk-runtime"
        subprocess.check_call([cc, *CFLAGS, "-o", str(out), str(SOURCE)])


class BinaryDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # the wheel carries a native program
        return True


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildRuntime})
