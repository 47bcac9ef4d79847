"""Encoding of executor plans and decoding of its status lines (docs/runtime-protocol.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PLAN_MAGIC = ("sk-runtime-plan", "1")
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}


def encode_field(value: str | bytes) -> str:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if not raw:
        return "%-"
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def decode_field(field: str) -> str:
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


def encode_plan(records: Iterable[Sequence[str]]) -> bytes:
    lines = [" ".join(PLAN_MAGIC)]
    for rec in records:
        lines.append(" ".join(encode_field(f) for f in rec))
    return ("\n".join(lines) + "\n").encode("ascii")


def decode_status(line: str) -> list[str]:
    return [decode_field(f) for f in line.rstrip("\n").split(" ") if f != ""]
