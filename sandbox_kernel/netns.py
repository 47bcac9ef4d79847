"""Network namespace configuration with pyroute2 (all netlink work goes through it).

Mode ``none``: the container's fresh network namespace gets only loopback, brought up
here. The netlink socket is opened by a short-lived thread that has joined the
container's namespace with setns(2); setns only moves the calling thread, so the
caller's own namespace is never changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from .errors import RuntimeStartError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def configure_none(pid: int) -> None:
    """Bring up loopback (only) in the network namespace of host process ``pid``."""
    result: list[BaseException] = []

    def work() -> None:
        try:
            from pyroute2 import IPRoute

            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname="lo")
                if not idx:
                    raise RuntimeStartError("network namespace has no loopback device", stage="network")
                ipr.link("set", index=idx[0], state="up")
        except BaseException as exc:  # reported to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if result:
        exc = result[0]
        if isinstance(exc, RuntimeStartError):
            raise exc
        raise RuntimeStartError(
            f"configuring the network namespace of process {pid} failed: {exc}", stage="network"
        ) from exc
