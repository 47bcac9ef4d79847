"""The product's JupyterLab extension (``sandbox-kernel-lab``): where its built files are
and how they reach a Jupyter data folder.

Layer: Jupyter (no jupyter import here). The extension's sources are ``labextension/`` of
the source tree; ``make labextension`` builds them (npm, JupyterLab's builder) into
``sandbox_kernel/labextension/`` (``package.json`` + ``static/``), which is committed, so no
install needs node. The wheel puts those files into
``share/jupyter/labextensions/sandbox-kernel-lab/`` as data files; ``kernelspecs.install``
(``sandbox-kernel kernelspec install``, the demo) copies them with ``install`` into the data
folder beside the kernelspecs it writes, so an editable install (which gets no data files
from pip) and a ``--user`` install show it too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import SandboxError
from ..paths import PACKAGE_DIR

#: the extension's npm name: its folder under ``<data dir>/labextensions/``
NAME = "sandbox-kernel-lab"
#: the built extension inside the package (a source checkout or an installed package)
BUILT = PACKAGE_DIR / "labextension"


def built_dir() -> Path:
    """The built extension (``package.json`` and ``static/``), checked. Called by
    ``install``; SandboxError naming the fix when it is missing."""
    if not (BUILT / "package.json").is_file() or not (BUILT / "static").is_dir():
        raise SandboxError(
            f"the built JupyterLab extension is missing from {BUILT}; reinstall "
            "sandbox-kernel, or in a source checkout run `make labextension`"
        )
    return BUILT


def install(data_dir: Path) -> Path:
    """Copy the built extension to ``data_dir/labextensions/sandbox-kernel-lab`` (replacing
    what an older install left there) and return that folder. Called by
    ``kernelspecs.install`` with the data folder of the kernelspecs it installs."""
    source = built_dir()
    dest = data_dir / "labextensions" / NAME
    if dest.resolve() == source.resolve():
        return dest
    staging = dest.with_name(f".{NAME}.new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("*.sha256"))
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest
