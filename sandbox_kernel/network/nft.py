"""libnftables' JSON interface through ctypes (the library behind ``nft -j``).

Layer: network. ``firewall`` is its only caller. Why this path (not pyroute2's nftables
module, which cannot yet build NAT or reject rules, nor the ``nft`` command, which costs a
process per change): docs/network.md. Every command is one JSON document that libnftables
applies as one transaction, so a container's rules appear (and go) all at once.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ..errors import SandboxError

_LIB_NAME = "libnftables.so.1"
_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4
_lock = threading.Lock()
_ctx: tuple[Any, int] | None = None


class NftError(SandboxError):
    """A firewall command was refused (the message carries libnftables' words)."""


def _context() -> tuple[Any, int]:
    """The library and one nft context, made once (guarded by ``_lock``)."""
    global _ctx
    if _ctx is None:
        _ctx = _new_context()
    return _ctx


_lib: list[Any] = []


def _library() -> Any:
    """libnftables through ctypes, loaded once."""
    if not _lib:
        import ctypes  # only a nat container's start pays for it

        try:
            lib = ctypes.CDLL(_LIB_NAME, use_errno=True)
        except OSError:
            raise NftError(
                "network 'nat' needs libnftables (Debian package libnftables1, installed "
                "with nftables): install it, or use network 'none'"
            ) from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        _lib.append(lib)
    return _lib[0]


def _new_context() -> tuple[Any, int]:
    """The library and a new nft context (its netlink socket belongs to the network
    namespace of the thread that makes and uses it)."""
    lib = _library()
    ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
    if not ctx:
        raise NftError("libnftables could not make a context")
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
    return lib, ctx


def run(commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """Apply ``commands`` (nftables JSON objects: ``{"add": {...}}``...) as one
    transaction and return the objects the library printed (for ``list`` commands). Raise
    NftError naming ``what`` and libnftables' message when it refuses. Called by
    ``firewall`` for each change, from any thread (one at a time)."""
    with _lock:
        return _run(_context(), commands, what)


def run_here(commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """``run`` on a context of its own, made and freed in the calling thread: in the
    network namespace that thread joined (``links.in_netns``: a root kernel's own table).
    Called from such a thread only."""
    lib, ctx = _new_context()
    try:
        return _run((lib, ctx), commands, what)
    finally:
        lib.nft_ctx_free(ctx)


def _run(
    context: tuple[Any, int], commands: list[dict[str, Any]], what: str
) -> list[dict[str, Any]]:
    lib, ctx = context
    text = json.dumps({"nftables": commands}).encode()
    rc = lib.nft_run_cmd_from_buffer(ctx, text)
    out = lib.nft_ctx_get_output_buffer(ctx) or b""
    err = lib.nft_ctx_get_error_buffer(ctx) or b""
    if rc != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        raise NftError(f"{what}: nftables refused: {message[0] if message else 'error'}")
    if not out.strip():
        return []
    try:
        doc = json.loads(out)
    except ValueError:
        return []
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return [i for i in items if isinstance(i, dict)]
