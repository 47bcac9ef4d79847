"""The container runtime: a container is a data spec, checked, planned and executed.

Layer: OS. Imports the leaves (errors, units, paths, limits) and ``cgroups``; never Jupyter.

Flow (each step its own module)::

    spec.ContainerSpec  --validate.validate_spec-->  plan.compile_plan  --protocol-->
    executor (sk-runtime, native/sk-runtime.c)  <--container.Container drives the lifecycle

* ``spec``: the pure data (``ContainerSpec``, ``Bind``, ``Tmpfs``, ``Limits``).
* ``validate``: the list of validators, run before anything touches the system.
* ``plan``: the typed operations (``ops``) the executor performs, in order.
* ``protocol``: their wire encoding and the executor's status lines.
* ``executor``: where the compiled executor is, and the reader of its status pipe.
* ``container``: create, start, signal, wait, update, stats, destroy.
* ``rundir``: a container's run directory as any process sees it (``ps``, gc, the store).
* ``leftovers``: finding and removing what crashed containers left behind.
* ``netns``, ``seccomp``, ``hostimage``: network namespace setup, the syscall filter, the
  built-in ``host`` pseudo-image.
"""

from .container import Container, ExitResult
from .spec import Bind, ContainerSpec, IdMap, Limits, NetworkMode, Tmpfs

__all__ = [
    "Bind",
    "Container",
    "ContainerSpec",
    "ExitResult",
    "IdMap",
    "Limits",
    "NetworkMode",
    "Tmpfs",
]
