import pytest

from sandbox_kernel.runtime import ops
from sandbox_kernel.runtime.protocol import decode_field, decode_status, encode_field, encode_plan


@pytest.mark.parametrize(
    "value", ["plain", "", "with space", "tab\tnl\ncr\r", "50%", "ünï", "a=b c", "\x7f\x01"]
)
def test_field_roundtrip(value: str) -> None:
    enc = encode_field(value)
    assert " " not in enc and "\n" not in enc and "\t" not in enc
    assert decode_field(enc) == value


def test_plan_has_magic_and_one_line_per_record() -> None:
    data = encode_plan([ops.Argv("echo"), ops.Argv("hello world"), ops.Env("X", "")])
    lines = data.decode().splitlines()
    assert lines == ["sk-runtime-plan 1", "argv echo", "argv hello%20world", "env X="]


def test_decode_status_and_malformed_escape() -> None:
    assert decode_status("error mount%20/proc 1 Operation%20not%20permitted\n") == [
        "error",
        "mount /proc",
        "1",
        "Operation not permitted",
    ]
    with pytest.raises(ValueError):
        decode_field("bad%2")
