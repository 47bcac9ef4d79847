"""Errors as the Jupyter server shows them: our message in the REST reply and the dialog.

Layer: Jupyter. jupyter_server hides exceptions it does not know as "Unhandled error"; an
error that is also a tornado ``HTTPError`` carries our message to JupyterLab's dialog, while
it stays a ``SandboxError`` for Python callers. The provisioner wraps every failure of a
kernel start with ``for_user``.
"""

from __future__ import annotations

from tornado.web import HTTPError

from ..errors import SandboxError, SpecError


class _HTTPMixin(HTTPError):
    """Makes a SandboxError also a tornado HTTPError whose log message is ours."""

    _message = ""

    def _as_http(self, status: int, message: str) -> None:
        self.status_code = status
        self._log_message = message  # tornado's log_message (what the REST error carries)
        self.reason = None
        self._message = message
        self.args = ()  # tornado %-formats log_message with args when logging

    def __str__(self) -> str:
        return self._message


class KernelSpecSettingsError(SpecError, _HTTPMixin):
    """A kernelspec's sandbox settings are invalid (REST status 400); made by ``for_user``
    from a SpecError of a kernel start."""

    def __init__(self, problems: list[str] | str, context: str = "") -> None:
        SpecError.__init__(self, problems, context)
        self._as_http(400, Exception.__str__(self))


class KernelSandboxError(SandboxError, _HTTPMixin):
    """The sandbox of a kernel could not be created or started (REST status 500); made by
    ``for_user`` from any other SandboxError of a kernel start."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self._as_http(500, message)


def for_user(exc: SandboxError, context: str) -> SandboxError:
    """``exc`` as the server should show it, with ``context`` (the kernelspec) in front.
    Called by the provisioner's ``pre_launch`` and ``launch_kernel`` for every failure."""
    if isinstance(exc, (KernelSpecSettingsError, KernelSandboxError)):
        return exc
    if isinstance(exc, SpecError):
        return KernelSpecSettingsError(exc.problems, exc.context or context)
    text = str(exc)
    return KernelSandboxError(text if text.startswith(context) else f"{context}: {text}")
