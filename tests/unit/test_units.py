from __future__ import annotations

from collections.abc import Callable

import pytest

from sandbox_kernel.errors import SpecError
from sandbox_kernel.units import format_size, parse_cpus, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("512M", 512 * 2**20),
        ("1G", 2**30),
        ("1.5GiB", int(1.5 * 2**30)),
        ("64k", 65536),
        ("2MB", 2 * 2**20),
        (1024, 1024),
        ("1T", 2**40),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "1X", "1.2.3M", True])
def test_parse_size_rejects_with_field_and_forms(bad: str | bool) -> None:
    with pytest.raises(SpecError) as err:
        parse_size(bad, "memory")
    assert "memory=" in str(err.value) and "512M" in str(err.value)


def test_parse_cpus_and_duration() -> None:
    assert parse_cpus("0.5") == 0.5
    with pytest.raises(SpecError, match="more than 0"):
        parse_cpus(0)
    with pytest.raises(SpecError):
        parse_cpus("nan")
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    assert parse_duration(10) == 10
    with pytest.raises(SpecError):
        parse_duration("soon")


def test_format_size() -> None:
    assert format_size(512 * 2**20) == "512 MiB"
    assert format_size(1536 * 2**20) == "1.5 GiB"
    assert format_size(100) == "100 B"
    assert format_size(None) == "unlimited"


# Arabic-Indic 123, fullwidth 12, superscript 2, 1 + superscript 2, Arabic-Indic 123M and 3.5,
# an underscore, Extended Arabic-Indic 16G, N'Ko 12 (escaped: they look like ASCII digits)
NON_ASCII_NUMBERS = [
    "\u0661\u0662\u0663",
    "\uff11\uff12",
    "\u00b2",
    "1\u00b2",
    "\u0661\u0662\u0663M",
    "\u0663.\u0665",
    "1_000",
    "\u06f1\u06f6G",
    "\u07c1\u07c2",
]


@pytest.mark.parametrize("text", NON_ASCII_NUMBERS)
@pytest.mark.parametrize("name", ["size", "cpus", "duration", "whole", "pids", "user", "grace"])
def test_numbers_are_ascii_digits_only(text: str, name: str) -> None:
    """Every number parser of the product refuses digits ``int``/``float`` would take."""
    from sandbox_kernel.cli.run import _parse_user
    from sandbox_kernel.limits import PIDS
    from sandbox_kernel.units import parse_whole

    parse: Callable[[], object] = {
        "size": lambda: parse_size(text, "memory"),
        "cpus": lambda: parse_cpus(text, "cpus"),
        "duration": lambda: parse_duration(text, "timeout"),
        "whole": lambda: parse_whole(text, "n", "a whole number"),
        "pids": lambda: PIDS.parse(text),
        "user": lambda: _parse_user(f"{text}:{text}"),
        "grace": lambda: parse_duration(text, "--grace", allow_zero=True),
    }[name]
    with pytest.raises(SpecError) as err:
        parse()
    assert repr(text) in str(err.value)


def test_grace_option_refuses_non_ascii(capsys: pytest.CaptureFixture[str]) -> None:
    from sandbox_kernel.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["image", "gc", "--grace", "\u0661\u0662\u0663"])
    assert ex.value.code == 2 and "--grace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("pids", 4194305, "use 16 to 4194304"),
        ("pids", "99999999999999999999", "use 16 to 4194304"),
        ("memory", 2**64, "use 16M to 1048576T"),
        ("memory", "99999999999999999999T", "use 16M to 1048576T"),
        ("memory", 1e30, "use 16M to 1048576T"),
        ("tmp_size", 2**64 - 1, "use 1M to 1048576T"),  # would wrap to 0: an unlimited tmpfs
        ("writable_size", "17179869184T", "use 1M to 1048576T"),
        ("shm_size", "2000000T", "use 1M to 1048576T"),
        ("cpus", "1e6", "use 0.01 to 1024"),
    ],
)
def test_values_beyond_what_the_kernel_takes_name_the_field_and_range(
    name: str, value: object, accepted: str
) -> None:
    """Refused by the one bound, before any cgroup file or mount sees them: at start (parse),
    in a spec (``limit_problems`` / the validator) and live (``plan_change``)."""
    from sandbox_kernel.errors import LimitRefused
    from sandbox_kernel.limits import BOUNDS, LIVE, Ceilings, Limits, plan_change

    with pytest.raises(SpecError) as err:
        BOUNDS[name].parse(value)
    msg = str(err.value)
    assert msg.startswith(f"{name}=") and "too large" in msg and accepted in msg
    assert "/" not in msg, "no path"
    number = BOUNDS[name].parser(value, name)
    assert BOUNDS[name].problem(number) is not None
    if name in LIVE:
        with pytest.raises(LimitRefused) as live:
            plan_change({"op": "set", name: value}, Limits(), Ceilings(), None)
        assert accepted in str(live.value) and "/" not in str(live.value)
