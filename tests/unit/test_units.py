from __future__ import annotations

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
