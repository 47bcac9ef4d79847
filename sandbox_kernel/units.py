"""Parsing and formatting of sizes, CPU counts and durations.

Layer: leaf (imports only ``errors``). ``limits`` builds its bounds on these parsers; the
messages of ``limits`` and ``ExitResult``, ``ps``, ``stats`` and the provisioner's
``describe`` use the formatters.

Accepted size forms: a plain number of bytes (``1048576``), or a number with a
unit: ``k``/``K``/``KB``/``KiB``, ``M``/``MB``/``MiB``, ``G``/``GB``/``GiB``,
``T``/``TiB`` (all binary: 1K = 1024 bytes, as Docker does). Decimals allowed
(``1.5G``).
"""

from __future__ import annotations

import math
import re

from .errors import SpecError

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$")
_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_NUMBER_RE = re.compile(r"^\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*$")
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

SIZE_FORMS = "bytes, or a number with K, M, G or T (binary units), e.g. 512M, 1.5G"
CPUS_FORMS = "a positive number of CPUs, fractions allowed, e.g. 0.5, 1, 2"
DURATION_FORMS = "seconds, or a number with ms, s, m or h, e.g. 500ms, 10s, 2m"
RATE_FORMS = (
    "bits per second as tc writes them: a number with bit, kbit, mbit, gbit or tbit "
    "(kibit, mibit, gibit: binary), or bytes per second with bps, kbps, mbps, gbps, "
    "e.g. 16mbit, 512kbit, 1gbit"
)
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
#: tc's rate units (tc(8) "RATES"), as bits per second
_RATE_UNITS = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "kibit": 1024,
    "mibit": 1024**2,
    "gibit": 1024**3,
    "tibit": 1024**4,
    "bps": 8,
    "kbps": 8 * 1000,
    "mbps": 8 * 1000**2,
    "gbps": 8 * 1000**3,
    "tbps": 8 * 1000**4,
    "kibps": 8 * 1024,
    "mibps": 8 * 1024**2,
    "gibps": 8 * 1024**3,
    "tibps": 8 * 1024**4,
}


def parse_size(value: str | int | float, field: str = "size") -> int:
    """Return a size in bytes; raise SpecError naming the field and the accepted forms.

    Called through ``limits.BOUNDS`` for every size cap, and by ``jupyter.resolve.read_policy``
    for the admin's ``SandboxPolicy.max_*`` sizes.
    """
    if isinstance(value, bool):
        raise SpecError(f"{field}={value!r} is not a size; use {SIZE_FORMS}")
    if isinstance(value, (int, float)):
        if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise SpecError(f"{field}={value!r} must be a non-negative size; use {SIZE_FORMS}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise SpecError(f"{field}={value!r} is not a size; use {SIZE_FORMS}")
    number, unit = m.groups()
    return int(float(number) * _FACTORS[unit.lower()])


def parse_cpus(value: str | int | float, field: str = "cpus") -> float:
    """Return a CPU count as float (> 0); only ASCII digits (``float`` alone takes others).

    Called through ``limits.CPUS`` (kernelspecs, ``--cpus``, live ``%sandbox cpus=``).
    """
    if isinstance(value, bool) or (isinstance(value, str) and not _NUMBER_RE.match(value)):
        raise SpecError(f"{field}={value!r} is not a CPU count; use {CPUS_FORMS}")
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{field}={value!r} is not a CPU count; use {CPUS_FORMS}") from None
    if not math.isfinite(cpus) or cpus <= 0:
        raise SpecError(f"{field}={value!r} must be more than 0; use {CPUS_FORMS}")
    return cpus


_WHOLE_RE = re.compile(r"^\s*[0-9]+\s*$")


def parse_whole(value: object, field: str, forms: str) -> int:
    """A whole number >= 0 written with ASCII digits (``256``, ``"256"``; never Arabic-Indic,
    fullwidth or superscript digits, nor ``"1_000"``, which ``int`` alone takes); SpecError
    naming the field and ``forms`` otherwise. Called by ``limits.parse_count`` (the pids
    bound, the policy's kernel counts) and by ``run``'s ``--user``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{field}={value!r} is not a whole number; use {forms}")
    if isinstance(value, str) and not _WHOLE_RE.match(value):
        raise SpecError(f"{field}={value!r} is not a whole number; use {forms}")
    number = int(value)
    if number < 0:
        raise SpecError(f"{field}={value!r} is not a whole number; use {forms}")
    return number


def parse_duration(
    value: str | int | float, field: str = "timeout", *, allow_zero: bool = False
) -> float:
    """Return a duration in seconds (> 0, or >= 0 with ``allow_zero``), ASCII digits only;
    SpecError naming the field otherwise.

    Called as the type of the CLI's ``image gc --grace`` and ``stats --interval`` (the
    in-kernel magics keep their own Python 2 copy).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise SpecError(f"{field}={value!r} is not a duration; use {DURATION_FORMS}")
        seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        least = "0 or more" if allow_zero else "more than 0"
        raise SpecError(f"{field}={value!r} must be {least}; use {DURATION_FORMS}")
    return seconds


def parse_rate(value: object, field: str = "bandwidth") -> int:
    """A rate in bits per second from tc's notation (``16mbit``, ``512kbit``, ``2mbps``;
    ASCII digits, a unit required: a bare number is refused, since tc would read it as
    bytes and users mean bits); SpecError naming the field and the accepted forms. The
    parser of the ``bandwidth`` bound (kernelspecs, ``run --bandwidth``, ``%sandbox``)."""
    if not isinstance(value, str):
        raise SpecError(f"{field}={value!r} is not a rate; use {RATE_FORMS}")
    m = _RATE_RE.match(value)
    if not m:
        raise SpecError(f"{field}={value!r} is not a rate; use {RATE_FORMS}")
    number, unit = m.groups()
    if not unit:
        raise SpecError(f"{field}={value!r} has no unit; use {RATE_FORMS}")
    factor = _RATE_UNITS.get(unit.lower())
    if factor is None:
        raise SpecError(f"{field}={value!r}: unknown unit {unit!r}; use {RATE_FORMS}")
    return int(float(number) * factor)


def format_rate(bits: int | float | None) -> str:
    """Human form of a rate in bits per second with decimal units as tc prints them
    (``16mbit``, ``1.5gbit``; None -> ``unlimited``), for ``%sandbox``, ``ps`` and messages;
    ``parse_rate`` reads it back."""
    if bits is None:
        return "unlimited"
    n = float(bits)
    for unit in ("bit", "kbit", "mbit", "gbit", "tbit"):
        if abs(n) < 1000 or unit == "tbit":
            return f"{n:.3f}".rstrip("0").rstrip(".") + unit
        n /= 1000
    raise AssertionError("unreachable")


def format_size(nbytes: int | float | None) -> str:
    """Human form with binary units: 536870912 -> '512 MiB'; None -> 'unlimited'.

    Called for messages and tables: limits' advice, ``ExitResult.reason``, ``ps``, ``stats``.
    """
    if nbytes is None:
        return "unlimited"
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            text = f"{n:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_cpus(cpus: float | None) -> str:
    """Human form of a CPU cap (``1.5``; None -> ``unlimited``), for ``ps``, ``stats``,
    the provisioner's ``describe`` and the CPU bound's messages."""
    if cpus is None:
        return "unlimited"
    return f"{cpus:g}"
