"""The sandbox kernelspecs: templates shipped with the package, install and list.

Layer: Jupyter (jupyter_client's ``KernelSpecManager``, imported where used). Used by
``sandbox-kernel kernelspec``, ``doctor``, the demo, the tests and the benchmarks.

The templates are the directories ``kernelspecs/<name>/`` of the source tree (installed
as ``sandbox_kernel/kernelspecs_data/<name>/`` by setup.py). ``install`` writes them, with optional
overrides of the sandbox settings, through jupyter_client's ``KernelSpecManager``, so that
``jupyter kernelspec list`` shows them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SandboxError, SpecError
from ..limits import BOUNDS
from ..paths import shipped_dirs
from . import serverext

PROVISIONER_NAME = "sandbox-provisioner"
PROVISIONER_OBJECT = "sandbox_kernel.jupyter.provisioner:SandboxProvisioner"
ENTRY_POINT_GROUP = "jupyter_client.kernel_provisioners"
KERNELSPEC_NAMES: tuple[str, ...] = ("python2.7-sandbox", "python3-sandbox")


def templates_dir() -> Path:
    """Where the kernelspec templates are: installed package data, else the source tree.
    Called by ``available``, ``load_template`` and ``install``."""
    candidates = shipped_dirs("kernelspecs")
    for candidate in candidates:
        if candidate.is_dir() and any(
            (candidate / n / "kernel.json").is_file() for n in KERNELSPEC_NAMES
        ):
            return candidate
    raise SandboxError(
        f"the kernelspec templates are missing (looked in {candidates[0]} and "
        f"{candidates[1]}); reinstall sandbox-kernel"
    )


def available() -> list[str]:
    """Names of the shipped kernelspec templates. Called by ``kernelspec install`` without
    names (all of them) and in the message about an unknown name."""
    root = templates_dir()
    return sorted(p.name for p in root.iterdir() if (p / "kernel.json").is_file())


def load_template(name: str) -> dict[str, Any]:
    """The template kernel.json of ``name`` as a dict; SpecError for a name not shipped.
    Called by ``render``."""
    path = templates_dir() / name / "kernel.json"
    if not path.is_file():
        raise SpecError(
            f"kernelspec {name!r} is not one of the shipped kernelspecs; "
            f"use one of: {', '.join(available())}"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise SandboxError(f"{path} is not a JSON object; reinstall sandbox-kernel")
    return data


def render(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kernel.json of ``name`` with sandbox settings overridden (validated forms); one
    SpecError listing every bad override. Called by ``install`` for each name, before any is
    written."""
    data = load_template(name)
    prov = data.setdefault("metadata", {}).setdefault("kernel_provisioner", {})
    prov["provisioner_name"] = PROVISIONER_NAME
    config = prov.setdefault("config", {})
    problems: list[str] = []
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        try:
            config[key] = _install_value(key, value)
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems, context=f"kernelspec {name!r}")
    return data


def _install_value(key: str, value: object) -> object:
    """An override of ``kernelspec install`` as it goes into kernel.json: caps checked with
    the bounds of the one limits policy (``limits.BOUNDS``) and kept in the form given."""
    if key in ("memory", "tmp_size", "writable_size"):
        BOUNDS[key].parse(value, key)
        return value
    if key in ("cpus", "pids"):
        return BOUNDS[key].parse(value, key)
    if key == "image":
        if not isinstance(value, str) or not value:
            raise SpecError(f"image={value!r} must be an image name, e.g. python3")
        return value
    raise SpecError(f"{key!r} cannot be set at install time")


@dataclass(frozen=True)
class Installed:
    """One kernelspec as installed: name, directory, display name and its sandbox config
    (what ``install`` and ``installed`` return; ``kernelspec ls`` and ``doctor`` show it)."""

    name: str
    resource_dir: str
    display_name: str
    config: dict[str, Any]


def install(
    names: list[str] | None = None,
    *,
    user: bool = False,
    prefix: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Installed]:
    """Install the named kernelspecs (default: all shipped) and return where they went.

    Default destination: the system-wide Jupyter data dir; ``user=True``: the user's;
    ``prefix``: ``<prefix>/share/jupyter/kernels`` (``sys.prefix`` for --sys-prefix). The
    file enabling the product's server extension (the guarded contents manager) goes into
    the matching config folder (``server_config_dir``), so a server that finds these
    kernels also guards their folders, editable installs included.
    Called by ``sandbox-kernel kernelspec install`` and by the demo.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    names = names or available()
    rendered = {name: render(name, overrides) for name in names}  # validate all first
    ksm = KernelSpecManager()
    out: list[Installed] = []
    src_root = templates_dir()
    for name, data in rendered.items():
        with tempfile.TemporaryDirectory(prefix="sk-kernelspec-") as tmp:
            staging = Path(tmp) / name
            shutil.copytree(src_root / name, staging)
            (staging / "kernel.json").write_text(json.dumps(data, indent=2) + "\n")
            dest = ksm.install_kernel_spec(str(staging), kernel_name=name, user=user, prefix=prefix)
        out.append(
            Installed(
                name=name,
                resource_dir=str(dest),
                display_name=str(data.get("display_name", name)),
                config=dict(data["metadata"]["kernel_provisioner"].get("config", {})),
            )
        )
    serverext.write_config(server_config_dir(user=user, prefix=prefix))
    return out


def server_config_dir(*, user: bool = False, prefix: str | None = None) -> Path:
    """The Jupyter config folder that goes with a kernelspec destination (``prefix``:
    ``<prefix>/etc/jupyter``; ``user``: the user's config dir; else the first system one),
    where ``install`` enables the server extension."""
    from jupyter_core.paths import SYSTEM_CONFIG_PATH, jupyter_config_dir

    if prefix is not None:
        return Path(prefix) / "etc" / "jupyter"
    if user:
        return Path(jupyter_config_dir())
    return Path(SYSTEM_CONFIG_PATH[0])


def installed() -> list[Installed]:
    """Every installed kernelspec that uses the sandbox provisioner (as jupyter sees them).
    Called by ``sandbox-kernel kernelspec ls`` and ``doctor``."""
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    out: list[Installed] = []
    for name, resource_dir in sorted(ksm.find_kernel_specs().items()):
        try:
            data = json.loads((Path(resource_dir) / "kernel.json").read_text())
        except (OSError, ValueError):
            continue
        prov = (data.get("metadata") or {}).get("kernel_provisioner") or {}
        if prov.get("provisioner_name") != PROVISIONER_NAME:
            continue
        out.append(
            Installed(
                name=name,
                resource_dir=str(resource_dir),
                display_name=str(data.get("display_name", name)),
                config=dict(prov.get("config") or {}),
            )
        )
    return out


def provisioner_registered() -> bool:
    """Is the ``sandbox-provisioner`` entry point installed (``pip install`` of this package)?
    Checked by ``kernelspec install`` (a warning), ``doctor``, the demo and the tests."""
    from importlib.metadata import entry_points

    return any(ep.name == PROVISIONER_NAME for ep in entry_points(group=ENTRY_POINT_GROUP))


def register_provisioner_in_process() -> None:
    """Make jupyter_client find the provisioner in this process, when running from a source
    checkout that was not pip-installed (the demo and the tests use it; an installed package
    declares the entry point in pyproject.toml)."""
    from importlib.metadata import EntryPoint

    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    KernelProvisionerFactory.provisioners[PROVISIONER_NAME] = EntryPoint(
        name=PROVISIONER_NAME, value=PROVISIONER_OBJECT, group=ENTRY_POINT_GROUP
    )


def entry_point_dir(dest: Path) -> Path:
    """Write a minimal ``.dist-info`` declaring the provisioner entry point under ``dest``;
    put ``dest`` on PYTHONPATH of a child Jupyter process run from a source checkout (the
    server tests do)."""
    info = dest / "sandbox_kernel_provisioner_dev-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sandbox-kernel-provisioner-dev\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{PROVISIONER_NAME} = {PROVISIONER_OBJECT}\n"
    )
    return dest
