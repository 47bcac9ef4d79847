from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import SpecError
from sandbox_kernel.runtime.spec import Bind, ContainerSpec, IdMap, Limits, Tmpfs
from sandbox_kernel.runtime.validate import validate_spec


@pytest.fixture
def spec(tmp_path: Path) -> ContainerSpec:
    return ContainerSpec(id="sk-0123456789ab", layers=(str(tmp_path),), command=("true",))


def problems(spec: ContainerSpec) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_spec(spec)
    return err.value.problems


def test_valid_spec_passes(spec: ContainerSpec) -> None:
    validate_spec(spec)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"id": "abc"}, "id='abc'"),
        ({"layers": ()}, "layers=() is empty"),
        ({"layers": ("relative",)}, "must be an absolute"),
        ({"layers": ("/nonexistent-layer-dir",)}, "is not a directory"),
        ({"command": ()}, "command=() is empty"),
        ({"env": (("1BAD", "x"),)}, "env key '1BAD'"),
        ({"workdir": "rel/dir"}, "workdir='rel/dir'"),
        ({"workdir": "/a/../b"}, "workdir='/a/../b'"),
        ({"user": 0}, "needs allow_root"),
        ({"user": 2**32}, "out of range"),
        (
            {"user": 0, "allow_root": True, "mounts": (Bind("/etc", "/x", readonly=False),)},
            "cannot have writable host volumes",
        ),
        ({"hostname": "bad_name"}, "hostname='bad_name'"),
        ({"hostname": "trailing-"}, "hostname='trailing-'"),
        ({"tmp_size": 10}, "tmp_size=10"),
        ({"mounts": (Bind("/etc", "/proc/x"),)}, "reserved"),
        ({"mounts": (Bind("/etc", "relative"),)}, "absolute normalised"),
        ({"mounts": (Bind("/no/such/src", "/data"),)}, "does not exist"),
        ({"mounts": (Tmpfs("/data", 1),)}, "too small"),
        ({"mounts": (Tmpfs("/d", 4096), Tmpfs("/d", 4096))}, "used twice"),
        ({"limits": Limits(memory=1024)}, "memory=1024"),
        ({"limits": Limits(cpus=0.0)}, "cpus=0.0"),
        ({"limits": Limits(cpu_weight=0)}, "cpu_weight=0"),
        ({"limits": Limits(pids=1)}, "pids=1"),
        ({"uid_map": (IdMap(0, 100000, 65536),)}, "go together"),
        (
            {"uid_map": (IdMap(0, 100000, 10),), "gid_map": (IdMap(0, 100000, 65536),)},
            "user=65534 is not mapped",
        ),
        (
            {
                "uid_map": (IdMap(0, 100000, 65536), IdMap(1000, 1000, 1)),
                "gid_map": (IdMap(0, 100000, 65536),),
            },
            "overlapping",
        ),
        ({"masked_paths": ("proc/kcore",)}, "masked/readonly path"),
    ],
)
def test_each_field_is_checked(spec: ContainerSpec, changes: dict[str, Any], needle: str) -> None:
    from dataclasses import replace

    found = problems(replace(spec, **changes))
    assert any(needle in p for p in found), found


def test_all_problems_reported_at_once(spec: ContainerSpec) -> None:
    from dataclasses import replace

    found = problems(replace(spec, hostname="x_y", workdir="rel", limits=Limits(pids=0)))
    assert len(found) == 3


def test_root_without_host_mounts_is_allowed(spec: ContainerSpec) -> None:
    from dataclasses import replace

    validate_spec(
        replace(spec, user=0, group=0, allow_root=True, mounts=(Tmpfs("/data", 1 << 20),))
    )
