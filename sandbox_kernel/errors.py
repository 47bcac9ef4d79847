"""One exception tree for the whole product.

Layer: leaf (imports nothing of the package). Every message names the object, the path or
value involved, and the fix. The CLI prints any ``SandboxError`` as one line and exits 125;
the provisioner turns one into a Jupyter-facing error (below). The tree::

    SandboxError              anything refused or failed on purpose; also wrap_oserror's result
    ├── SpecError             a spec, setting or user input is invalid (validators, parsers)
    ├── PrivilegeError        not root, or a cgroup file refuses writes (EACCES/EPERM/EROFS)
    ├── CgroupError           a cgroup operation failed, or no usable cgroup setup was found
    ├── RuntimeStartError     the executor could not set the container up or start its command
    ├── ContainerNotFound     no run dir or cgroup for that container id
    ├── ImageError            image store, import, export and build problems
    │   ├── ImageNotFound     the name or digest is not in the store
    │   ├── ImageInUse        ``image rm`` of an image a container uses
    │   ├── UnsafeArchiveError  an archive or manifest tried something hostile
    │   ├── DigestMismatch    a blob's content does not match its digest or size
    │   ├── RegistryError     a registry refused or failed a pull or push
    │   └── BuildError        a recipe is invalid or a build step failed
    ├── QuotaError            a notebook folder's disk quota cannot be set, read, or is missing
    └── LimitRefused          a live ``%sandbox`` limit change was refused

SpecError is also a ValueError, PrivilegeError a PermissionError, CgroupError an OSError,
ContainerNotFound and ImageNotFound LookupErrors, so plain ``except`` clauses still work.

Note: the two errors the Jupyter server shows to the user live in ``jupyter/errors.py``,
not here: ``KernelSpecSettingsError`` (a SpecError, REST status 400) and
``KernelSandboxError`` (a SandboxError, REST status 500). Both are also tornado HTTPErrors;
``jupyter.errors.for_user`` makes one of them from any SandboxError of a kernel start.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error raised on purpose by sandbox-kernel.

    Caught by the CLI's ``main`` (one line, exit 125) and by the provisioner (``for_user``).
    """


class SpecError(SandboxError, ValueError):
    """A container spec, a setting or a user input is invalid.

    Raised by ``runtime.validate.validate_spec``, the parsers of ``units`` and ``limits``,
    ``jupyter.resolve.resolve_settings`` and ``sandbox-kernel run``'s options. ``problems`` lists
    one line per invalid field: field, bad value, accepted form; ``context`` names the whole
    (``container sk-...``, ``kernelspec 'python3-sandbox'``).
    """

    def __init__(self, problems: list[str] | str, context: str = "") -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.context = context
        head = f"{context}: " if context else ""
        if len(self.problems) == 1:
            super().__init__(head + self.problems[0])
        else:
            super().__init__(head + "invalid settings:\n  - " + "\n  - ".join(self.problems))


class PrivilegeError(SandboxError, PermissionError):
    """The host lacks a privilege or a kernel feature the runtime needs.

    Raised by ``runtime.container.require_privileges`` (not root) and by the cgroup drivers
    when a cgroup file refuses a write (EACCES, EPERM, EROFS).
    """


class CgroupError(SandboxError, OSError):
    """A cgroup operation failed (message names the cgroup path and the fix).

    Raised by ``cgroups`` (detection, the v1 and v2 drivers); ``errno`` is set when an
    OSError caused it.
    """


class RuntimeStartError(SandboxError):
    """The container could not be set up or its command could not be started.

    Raised by ``Container.start`` from the executor's ``error`` status line (``stage`` and
    ``errno`` are the executor's), on a start timeout, and by ``netns`` setup.
    """

    def __init__(self, message: str, stage: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = errno


class ContainerNotFound(SandboxError, LookupError):
    """No container with that id exists.

    Raised by ``runtime.rundir.find_container`` and by the cgroup drivers' ``open`` and
    ``stats`` when the container's cgroup is gone.
    """


class ImageError(SandboxError):
    """Base for image store, build and import problems (raised throughout ``images``)."""


class ImageNotFound(ImageError, LookupError):
    """The named image is not in the store (``ImageStore.resolve``; the message lists what is)."""


class ImageInUse(ImageError):
    """The image is used by a running container and cannot be removed (``ImageStore.remove``)."""


class UnsafeArchiveError(ImageError):
    """An archive or manifest tried something hostile (path escape, device node, bomb...).

    Raised while reading tars, OCI layouts and docker-save archives (import and unpack).
    """


class DigestMismatch(ImageError):
    """A blob's content does not match its digest or size (store writes, import, unpack)."""


class RegistryError(ImageError):
    """A registry refused or failed a pull or push (``images.registry``): the message names
    the reference, the registry, what it answered and the fix."""


class BuildError(ImageError):
    """An image recipe is invalid or a build step failed (``images.recipe``, ``images.build``)."""


class QuotaError(SandboxError, OSError):
    """A notebook folder's disk quota cannot be set, read or is missing (``quota``)."""


class LimitRefused(SandboxError):
    """A live limit change was refused (above the admin's ceiling, or malformed).

    Raised by ``limits.plan_change``; the control socket sends its text back to the kernel's
    ``%sandbox`` magics as the reply's error.
    """


class CeilingRefused(LimitRefused):
    """A live limit change above the administrator's (or the kernelspec's) ceiling: allowed
    by the bounds, refused by the policy (the REST API answers 403, a malformed value 400)."""


def wrap_oserror(exc: OSError, action: str, path: str, fix: str = "") -> SandboxError:
    """Turn a bare OSError into a SandboxError naming the action, the path and the fix.

    Called where an OSError would otherwise escape as a traceback (e.g. ``seccomp.write_filter``).
    """
    msg = f"{action} {path!s}: {exc.strerror or exc}"
    if fix:
        msg += f"; {fix}"
    err = SandboxError(msg)
    err.__cause__ = exc
    return err
