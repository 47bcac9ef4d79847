"""sandbox-kernel: every Jupyter kernel in its own lightweight Linux container.

Layers (imports only go downwards; checked by tests/unit/test_architecture.py):

* OS layer, never imports jupyter_client or traitlets:
  errors, units, paths, spec, validate, plan, protocol, native, netns, seccomp,
  cgroups/, container, gc, images/
* Jupyter layer on top: provisioner, kernelspecs, config, cli, magics (in-kernel).
"""

__version__ = "0.1.0"
