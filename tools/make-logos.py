"""Draw the sandbox kernelspecs' 64x64 PNG logos (stdlib only; run once, output committed).

  python tools/make-logos.py    writes kernelspecs/<name>/logo-64x64.png

The picture is the one of the hand-written logo-svg.svg beside each: a rounded square in the
kernel's colour, a padlock (the sandbox) and the Python version ("3" or "2.7") below it,
here in a bold 5x7 pixel font. Shapes are tested at 4x4 samples per pixel (anti-aliased).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
SAMPLES = 4

GLYPHS = {
    "2": ["01110", "11011", "00011", "00110", "01100", "11000", "11111"],
    "3": ["11110", "00011", "00011", "01110", "00011", "00011", "11110"],
    "7": ["11111", "00011", "00110", "00110", "01100", "01100", "01100"],
    ".": ["00", "00", "00", "00", "00", "11", "11"],
}

#: kernelspec -> (version text, background, padlock and text colour)
LOGOS = {
    "python3-sandbox": ("3", (0x30, 0x69, 0x98), (0xFF, 0xD4, 0x3B)),
    "python2.7-sandbox": ("2.7", (0x7A, 0x5C, 0x2E), (0xF2, 0xE6, 0xC8)),
}

Shape = Callable[[float, float], bool]


def rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float) -> Shape:
    def inside(x: float, y: float) -> bool:
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            return False
        cx = min(max(x, x0 + r), x1 - r)
        cy = min(max(y, y0 + r), y1 - r)
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r

    return inside


def padlock() -> tuple[Shape, Shape]:
    """The padlock (body and shackle) and its keyhole, as in logo-svg.svg."""
    body = rounded_rect(21, 17, 43, 32, 2)

    def shackle(x: float, y: float) -> bool:
        if y <= 15:
            d = math.hypot(x - 32, y - 15)
            return 5 <= d <= 8
        return 15 < y <= 18 and (24 <= x <= 27 or 37 <= x <= 40)

    def keyhole(x: float, y: float) -> bool:
        return math.hypot(x - 32, y - 23) <= 2.5 or (31 <= x <= 33 and 23 <= y <= 28)

    return (lambda x, y: body(x, y) or shackle(x, y)), keyhole


def text(label: str, top: float, cell: float) -> Shape:
    widths = [len(GLYPHS[c][0]) for c in label]
    total = (sum(widths) + len(label) - 1) * cell
    left = round((SIZE - total) / 2)  # whole pixels: even strokes

    def inside(x: float, y: float) -> bool:
        row = math.floor((y - top) / cell)
        if not 0 <= row < 7:
            return False
        col0 = left
        for char, width in zip(label, widths, strict=True):
            col = math.floor((x - col0) / cell)
            if 0 <= col < width:
                return GLYPHS[char][row][col] == "1"
            col0 += (width + 1) * cell
        return False

    return inside


def draw(label: str, bg: tuple[int, int, int], fg: tuple[int, int, int]) -> bytes:
    square = rounded_rect(0, 0, SIZE, SIZE, 10)
    lock, keyhole = padlock()
    cell = 4 if len(label) == 1 else 3
    digits = text(label, 34 if len(label) == 1 else 37, cell)
    rows = []
    for py in range(SIZE):
        row = bytearray([0])  # filter type: none
        for px in range(SIZE):
            acc = [0.0, 0.0, 0.0, 0.0]
            for sy in range(SAMPLES):
                for sx in range(SAMPLES):
                    x = px + (sx + 0.5) / SAMPLES
                    y = py + (sy + 0.5) / SAMPLES
                    if not square(x, y):
                        continue
                    fore = (lock(x, y) and not keyhole(x, y)) or digits(x, y)
                    colour = fg if fore else bg
                    for i in range(3):
                        acc[i] += colour[i]
                    acc[3] += 255
            n = SAMPLES * SAMPLES
            alpha = acc[3] / n
            rgb = [round(acc[i] / (acc[3] / 255)) if acc[3] else 0 for i in range(3)]
            row += bytes([*rgb, round(alpha)])
        rows.append(bytes(row))
    return png(b"".join(rows))


def png(raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    for name, (label, bg, fg) in LOGOS.items():
        out = REPO / "kernelspecs" / name / "logo-64x64.png"
        out.write_bytes(draw(label, bg, fg))
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
