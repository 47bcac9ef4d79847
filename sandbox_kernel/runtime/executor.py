"""The compiled executor (sk-runtime) as the Python side meets it: where the binary is, and
the reader of its status pipe. The protocol is docs/runtime-protocol.md; ``protocol`` encodes
plans and decodes status lines; ``container`` drives the lifecycle.

Layer: runtime (OS side).
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from ..errors import SandboxError
from .protocol import decode_status

_HERE = Path(__file__).resolve().parent
RUNTIME_ENV = "SANDBOX_KERNEL_RUNTIME"


def runtime_binary() -> str:
    """The executor's path: ``$SANDBOX_KERNEL_RUNTIME``, else the one built into the package
    (``runtime/_bin/sk-runtime``, by setup.py or ``make native``). Called by
    ``Container.start`` at each start and by ``sandbox-kernel doctor``."""
    env = os.environ.get(RUNTIME_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(_HERE / "_bin" / "sk-runtime")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise SandboxError(
        f"the executor sk-runtime is missing (looked in {', '.join(str(c) for c in candidates)}); "
        "reinstall the package with a C compiler present (apt-get install gcc), "
        "or in a checkout run: make native"
    )


class StatusPipe:
    """Line reader for the executor's status fd (docs/runtime-protocol.md). ``Container``
    reads it while the container starts (until ``exec``) and once more when it ended."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def read_line(self, deadline: float | None) -> list[str] | None:
        """The next status line's fields; None at EOF; TimeoutError past ``deadline``.
        ``Container`` calls it in a loop until ``exec`` (start) and until EOF (exit)."""
        # poll(), not select(): a server holding many kernels has descriptors above 1024
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while b"\n" not in self.buf:
            if self.eof:
                return None
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if timeout is None else int(timeout * 1000) + 1):
                raise TimeoutError
            chunk = os.read(self.fd, 4096)
            if not chunk:
                self.eof = True
                if not self.buf:
                    return None
                self.buf += b"\n"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return decode_status(line.decode("utf-8", "surrogateescape"))

    def close(self) -> None:
        """Close the descriptor (idempotent); ``Container`` calls it once the executor
        exited, and in ``destroy``."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
