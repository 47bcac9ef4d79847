"""Encoding of executor plans and decoding of its status lines (docs/runtime-protocol.md).

Layer: runtime (OS side; pure).
``Container.start`` writes ``encode_plan(compile_plan(...))`` to the plan file the executor
reads; ``executor.StatusPipe`` decodes each status line with ``decode_status``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .ops import Op

PLAN_MAGIC = ("sk-runtime-plan", "1")
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}


def encode_field(value: str | bytes) -> str:
    """One field: bytes outside 0x21..0x7e and ``%`` as ``%XX``; the empty field as ``%-``.
    Called by ``encode_plan`` for each field of each record."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if not raw:
        return "%-"
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def decode_field(field: str) -> str:
    """The inverse of ``encode_field``; ValueError on a malformed escape. Called by
    ``decode_status``."""
    if field == "%-":
        return ""
    out = bytearray()
    raw = field.encode("ascii", "surrogateescape")
    i = 0
    while i < len(raw):
        b = raw[i]
        if b == ord("%"):
            hexpart = raw[i + 1 : i + 3]
            if len(hexpart) != 2:
                raise ValueError(f"malformed escape in {field!r}")
            out.append(int(hexpart, 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "surrogateescape")


def encode_plan(plan: Iterable[Op]) -> bytes:
    """The plan file: the magic line, then one line per operation. Called by
    ``Container.start``."""
    lines = [" ".join(PLAN_MAGIC)]
    for op in plan:
        lines.append(" ".join(encode_field(f) for f in op.record()))
    return ("\n".join(lines) + "\n").encode("ascii")


def decode_status(line: str) -> list[str]:
    """The fields of one status line (``exec 1234``, ``error STAGE ERRNO MESSAGE``...).
    Called by ``executor.StatusPipe.read_line``."""
    return [decode_field(f) for f in line.rstrip("\n").split(" ") if f != ""]
