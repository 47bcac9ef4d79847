"""sandbox-kernel: every Jupyter kernel in its own lightweight Linux container.

Layers, lowest first (imports only go downwards; checked by tests/unit/test_architecture.py):

* OS side, never imports jupyter_client, traitlets or tornado:

  - leaves: ``errors``, ``units``, ``paths``, ``limits``;
  - ``cgroups/``: one driver per cgroup version behind one interface;
  - ``runtime/``: spec -> validators -> plan -> executor (``native/sk-runtime.c``), the
    container's lifecycle, gc;
  - ``images/``: the image store, import, export and builds (on the runtime).

* Jupyter side on top: ``jupyter/`` (the provisioner, settings, control socket,
  kernelspecs, demo), then ``cli/`` (the ``sandbox-kernel`` command) and ``__main__``.
* ``magics/`` stands apart: the in-kernel ``%sandbox`` extension (Python 2.7 and 3), which
  imports nothing of the package.

This module is the package's face and imports nothing at load time.
"""

__version__ = "0.1.0"
