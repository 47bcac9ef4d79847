"""The Jupyter layer: the kernel provisioner and what it needs from Jupyter.

Layer: Jupyter. Builds on the runtime and the image store; imports jupyter_client and
traitlets. The entry point ``sandbox-provisioner`` names ``SandboxProvisioner`` here.

* ``provisioner``: jupyter_client's provisioner contract (``SandboxProvisioner``).
* ``settings``: the per-kernel traits (``SandboxSettings``) and the admin's ``SandboxPolicy``.
* ``control``: the per-kernel control socket served for the ``%sandbox`` magics.
* ``kernelspecs``: the shipped kernelspecs, install and list.
* ``demo``: the side-by-side demo (``python -m sandbox_kernel.jupyter.demo``).
"""

from .provisioner import SandboxProvisioner
from .settings import SandboxPolicy, SandboxSettings

__all__ = ["SandboxPolicy", "SandboxProvisioner", "SandboxSettings"]
