"""The Jupyter layer: the kernel provisioner and what it needs from Jupyter.

Layer: Jupyter. Builds on the runtime and the image store; imports jupyter_client and
traitlets. The entry point ``sandbox-provisioner`` names ``SandboxProvisioner`` here.

* ``provisioner``: jupyter_client's provisioner contract (``SandboxProvisioner``).
* ``launch``: the steps of a kernel start (image, connection paths, command, env, spec).
* ``settings``: the per-kernel traits (``SandboxSettings``) and the admin's ``SandboxPolicy``.
* ``resolve``: raw setting values -> one validated ``KernelSettings``, against the policy.
* ``control``: the per-kernel control socket served for the ``%sandbox`` magics.
* ``exits``: why a kernel died, kept across its restarts.
* ``errors``: the two errors the server shows to the user (REST 400 and 500).
* ``kernelspecs``: the shipped kernelspecs, install and list.
* ``demo``: the side-by-side demo (``python -m sandbox_kernel.jupyter.demo``).
* ``docs``: docs/configuration.md generated from the traits.
"""

from .provisioner import SandboxProvisioner
from .settings import SandboxPolicy, SandboxSettings

__all__ = ["SandboxPolicy", "SandboxProvisioner", "SandboxSettings"]
