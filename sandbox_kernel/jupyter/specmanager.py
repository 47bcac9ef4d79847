"""A KernelSpecManager that offers only the kernelspecs the sandbox provisioner runs.

Layer: Jupyter. Set ``c.ServerApp.kernel_spec_manager_class =
"sandbox_kernel.jupyter.specmanager.SandboxOnlyKernelSpecManager"`` in a server's config;
the JupyterHub hook (``sandbox_kernel.hub``) passes it to a user's server when the host's
policy file says ``sandboxed_only = true`` for that user. JupyterLab's launcher then shows
no plain "Python 3 (ipykernel)", and a request for one by name is refused as unknown.

This is the administrator's offer, not a boundary: a student's server runs as the student,
who can start any program as themselves (a terminal does; whether terminals are offered is
the administrator's choice, ``ServerApp.terminals_enabled``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from .kernelspecs import PROVISIONER_NAME

#: A kernel.json larger than this is not a sandbox kernelspec (it is read on each listing).
MAX_KERNEL_JSON = 64 * 1024


def sandboxed(resource_dir: str) -> bool:
    """Does the kernelspec in ``resource_dir`` run under the sandbox provisioner? Read from
    its kernel.json (a missing, oversized or malformed one: no)."""
    try:
        with open(os.path.join(resource_dir, "kernel.json"), "rb") as f:
            data = f.read(MAX_KERNEL_JSON + 1)
        if len(data) > MAX_KERNEL_JSON:
            return False
        spec = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return False
    return bool(_provisioner(spec) == PROVISIONER_NAME)


def _provisioner(spec: Any) -> Any:
    meta = spec.get("metadata") if isinstance(spec, dict) else None
    prov = meta.get("kernel_provisioner") if isinstance(meta, dict) else None
    return prov.get("provisioner_name") if isinstance(prov, dict) else None


class SandboxOnlyKernelSpecManager(KernelSpecManager):
    """Lists and returns only sandbox kernelspecs. The server calls ``find_kernel_specs``
    and ``get_all_specs`` for the launcher and ``get_kernel_spec`` at each kernel start."""

    def find_kernel_specs(self) -> dict[str, str]:
        """The sandbox kernelspecs of the Jupyter path, name -> resource dir."""
        specs: dict[str, str] = super().find_kernel_specs()
        return {name: d for name, d in specs.items() if sandboxed(d)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """The kernelspec ``kernel_name`` if the sandbox provisioner runs it; NoSuchKernel
        otherwise (the server answers 404, as for a name that does not exist)."""
        spec = super().get_kernel_spec(kernel_name)
        if _provisioner({"metadata": spec.metadata}) != PROVISIONER_NAME:
            raise NoSuchKernel(kernel_name)
        return spec
