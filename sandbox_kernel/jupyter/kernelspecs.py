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
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SandboxError, SpecError
from ..limits import BOUNDS
from ..paths import shipped_dirs
from . import labext, serverext

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
    _apply_overrides(config, overrides, problems)
    if problems:
        raise SpecError(problems, context=f"kernelspec {name!r}")
    return data


def _apply_overrides(
    config: dict[str, Any], overrides: dict[str, Any] | None, problems: list[str]
) -> None:
    """Put the given (not None) ``overrides`` into a kernelspec's provisioner ``config``,
    each checked by ``_install_value``; every refusal appended to ``problems``. Called by
    ``render`` and ``render_image``."""
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        try:
            config[key] = _install_value(key, value)
        except SpecError as exc:
            problems.extend(exc.problems)


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
    kernels also guards their folders, editable installs included; the JupyterLab
    extension (``labext``) is copied into the matching data folder (``data_dir``) likewise.
    Called by ``sandbox-kernel kernelspec install`` and by the demo.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    names = names or available()
    rendered = {name: render(name, overrides) for name in names}  # validate all first
    ksm = KernelSpecManager()
    src_root = templates_dir()
    out = [
        _install_one(ksm, name, data, src_root / name, user=user, prefix=prefix)
        for name, data in rendered.items()
    ]
    serverext.write_config(server_config_dir(user=user, prefix=prefix))
    labext.install(data_dir(user=user, prefix=prefix))
    return out


def _install_one(
    ksm: Any,
    name: str,
    data: dict[str, Any],
    source: Path | None,
    *,
    user: bool,
    prefix: str | None,
) -> Installed:
    """Write kernelspec ``name`` (its kernel.json ``data``, the other files of the template
    folder ``source`` when given) through ``ksm``; where it went. Called by ``install`` and
    ``add_image``."""
    with tempfile.TemporaryDirectory(prefix="sk-kernelspec-") as tmp:
        staging = Path(tmp) / name
        if source is not None:
            shutil.copytree(source, staging)
        else:
            staging.mkdir()
        (staging / "kernel.json").write_text(json.dumps(data, indent=2) + "\n")
        dest = ksm.install_kernel_spec(str(staging), kernel_name=name, user=user, prefix=prefix)
    return Installed(
        name=name,
        resource_dir=str(dest),
        display_name=str(data.get("display_name", name)),
        config=dict(data["metadata"]["kernel_provisioner"].get("config", {})),
    )


_SPEC_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def render_image(
    name: str,
    image: str,
    executable: str,
    display_name: str,
    *,
    ipykernel_layer: str = "",
    interrupt_mode: str = "signal",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The kernel.json of a kernelspec for any Python image (``kernelspec add --image``):
    the sandbox provisioner with ``image``, the interpreter ``executable`` running
    ipykernel_launcher (the magics are added at start, as for the shipped kernels), the
    product's ``ipykernel_layer`` when the image has no ipykernel, and the caps of
    ``overrides`` (checked like ``install``'s). One SpecError listing every problem."""
    problems: list[str] = []
    if not _SPEC_NAME_RE.match(name):
        problems.append(
            f"kernelspec name {name!r} must be letters, digits, '.', '_' or '-' "
            "(at most 64), e.g. course-python2"
        )
    config: dict[str, Any] = {"image": image}
    if ipykernel_layer:
        config["ipykernel_layer"] = ipykernel_layer
    _apply_overrides(config, overrides, problems)
    if problems:
        raise SpecError(problems, context=f"kernelspec {name!r}")
    return {
        "argv": [executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": interrupt_mode,
        "env": {},
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
            "debugger": False,
        },
    }


def add_image(
    name: str, data: dict[str, Any], *, user: bool = False, prefix: str | None = None
) -> Installed:
    """Install the kernelspec ``data`` made by ``render_image`` as ``name`` (destinations as
    ``install``), enable the server extension and copy the JupyterLab extension there.
    Called by ``kernelspec add``."""
    from jupyter_client.kernelspec import KernelSpecManager

    done = _install_one(KernelSpecManager(), name, data, None, user=user, prefix=prefix)
    serverext.write_config(server_config_dir(user=user, prefix=prefix))
    labext.install(data_dir(user=user, prefix=prefix))
    return done


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


def data_dir(*, user: bool = False, prefix: str | None = None) -> Path:
    """The Jupyter data folder of a kernelspec destination (``prefix``:
    ``<prefix>/share/jupyter``; ``user``: the user's data dir; else the first system one, as
    ``KernelSpecManager.install_kernel_spec`` picks), where ``install`` puts the JupyterLab
    extension."""
    from jupyter_core.paths import SYSTEM_JUPYTER_PATH, jupyter_data_dir

    if prefix is not None:
        return Path(prefix) / "share" / "jupyter"
    if user:
        return Path(jupyter_data_dir())
    return Path(SYSTEM_JUPYTER_PATH[0])


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
