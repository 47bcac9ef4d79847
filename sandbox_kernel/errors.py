"""One exception tree for the whole product.

Every message names the object, the path or value involved, and the fix.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error raised on purpose by sandbox-kernel."""


class SpecError(SandboxError, ValueError):
    """A container spec, a setting or a user input is invalid.

    ``problems`` lists one line per invalid field: field, bad value, accepted form.
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
    """The host lacks a privilege or a kernel feature the runtime needs."""


class CgroupError(SandboxError, OSError):
    """A cgroup operation failed (message names the cgroup path and the fix)."""


class RuntimeStartError(SandboxError):
    """The container could not be set up or its command could not be started."""

    def __init__(self, message: str, stage: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = errno


class ContainerNotFound(SandboxError, LookupError):
    """No container with that id exists."""


class ImageError(SandboxError):
    """Base for image store, build and import problems."""


class ImageNotFound(ImageError, LookupError):
    """The named image is not in the store."""


class ImageInUse(ImageError):
    """The image is used by a running container and cannot be removed."""


class UnsafeArchiveError(ImageError):
    """An archive or manifest tried something hostile (path escape, device node, bomb...)."""


class DigestMismatch(ImageError):
    """A blob's content does not match its digest or size."""


class BuildError(ImageError):
    """An image recipe is invalid or a build step failed."""


class LimitRefused(SandboxError):
    """A live limit change was refused (above the admin's ceiling, or malformed)."""


def wrap_oserror(exc: OSError, action: str, path: str, fix: str = "") -> SandboxError:
    """Turn a bare OSError into a SandboxError naming the action, the path and the fix."""
    msg = f"{action} {path!s}: {exc.strerror or exc}"
    if fix:
        msg += f"; {fix}"
    err = SandboxError(msg)
    err.__cause__ = exc
    return err
