"""Sandbox settings, the administrator's ceilings, and the generated configuration doc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.errors import SpecError
from sandbox_kernel.jupyter.docs import configuration_markdown
from sandbox_kernel.jupyter.relay import OutputLimits
from sandbox_kernel.jupyter.resolve import (
    NOBODY,
    Policy,
    parse_user,
    read_policy,
    resolve_settings,
)
from sandbox_kernel.jupyter.settings import SETTING_NAMES, SandboxPolicy, SandboxSettings
from sandbox_kernel.limits import Ceilings
from sandbox_kernel.runtime.spec import Bind, NetworkMode

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")

NO_CEILINGS = Policy()


def defaults(**over: Any) -> dict[str, Any]:
    s = SandboxSettings()
    values = {name: getattr(s, name) for name in SETTING_NAMES}
    values["image"] = "python3"
    values.update(over)
    return values


def resolve(
    values: dict[str, Any],
    ceilings: Policy = NO_CEILINGS,
    explicit: tuple[str, ...] = (),
    workdir: str | None = "/tmp",
    server_uid: int = 0,
) -> Any:
    return resolve_settings(
        values,
        ceilings,
        explicit=frozenset(explicit),
        workdir=workdir,
        context="kernelspec 'k'",
        server_uid=server_uid,
    )


@needs_root
def test_defaults_resolve_to_documented_values(tmp_path: Path) -> None:
    os.chown(tmp_path, 1000, 1000)
    s = resolve(defaults(), workdir=str(tmp_path))
    assert s.limits.memory == 1024**3
    assert s.limits.cpus == 1.0
    assert s.limits.pids == 256
    assert s.tmp_size == s.writable_size == 256 * 1024**2
    assert s.network is NetworkMode.NONE
    assert (s.uid, s.gid) == (1000, 1000)
    assert s.mounts == () and s.env == ()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("memory", "lots", "memory='lots' is not a size; use bytes, or a number with K, M, G or T"),
        ("memory", "1M", "memory='1M' is too small"),
        ("cpus", "fast", "cpus='fast' is not a CPU count"),
        ("cpus", 0, "cpus=0 must be more than 0"),
        ("pids", "many", "pids='many' is not a whole number"),
        ("pids", 3, "pids=3 is too small"),
        ("pids", 2.5, "pids=2.5 is not a whole number"),
        ("tmp_size", "-1", "tmp_size='-1' is not a size"),
        ("writable_size", "10", "writable_size='10' is too small"),
        ("extra_mounts", ["/srv"], "extra_mounts entry '/srv' is malformed; use SRC:DST, "),
        ("extra_mounts", ["/srv:/srv:rx"], "entry '/srv:/srv:rx' is malformed"),
        ("extra_mounts", ["srv:/srv"], "'srv' is not an absolute normalised path"),
        ("extra_mounts", "/srv:/srv", "is not a list"),
        ("env", {"1BAD": "x"}, "env key '1BAD' is invalid"),
        ("env", ["A=1"], "is not a mapping"),
        ("network", "host", "network='host' is not available; use 'none' (loopback only) or 'nat'"),
        ("notebook_folder", "rx", "notebook_folder='rx' is not a mode; use 'rw' (read-write)"),
        ("user", "nosuchuser-xyz", "user='nosuchuser-xyz' is no user of this host"),
        ("user", "0", "user='0' is root, which the administrator does not allow"),
        ("image", "", "image='' is missing or empty"),
        ("cpu_defer_timeout", -1, "cpu_defer_timeout=-1 must be a positive number"),
        ("bytes_per_inode", 100, "bytes_per_inode=100 is out of range; use a number of bytes"),
        ("bytes_per_inode", True, "bytes_per_inode=True is out of range"),
    ],
)
def test_each_field_error_names_field_value_and_form(field: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        resolve(defaults(**{field: value}), explicit=(field,))
    text = str(info.value)
    assert text.startswith("kernelspec 'k': ")
    assert expected in text


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        resolve(defaults(memory="x", pids="y", network="z"))
    assert len(info.value.problems) == 3


def test_ceilings_refuse_explicit_values_above_them() -> None:
    ceil = Policy(Ceilings(512 * 1024**2, 2.0, 100, 64 * 1024**2, 64 * 1024**2))
    for field, value, top in (
        ("memory", "1G", "512 MiB"),
        ("cpus", 4, "2"),
        ("pids", 200, "100"),
        ("tmp_size", "1G", "64 MiB"),
        ("writable_size", "1G", "64 MiB"),
    ):
        with pytest.raises(SpecError) as info:
            resolve(defaults(**{field: value}), ceil, explicit=(field,))
        msg = str(info.value)
        assert f"{field}={value!r} is above the administrator's ceiling" in msg
        assert f"SandboxPolicy.max_{field} = {top}" in msg


def test_defaults_above_a_ceiling_are_lowered_to_it() -> None:
    ceil = Policy(Ceilings(512 * 1024**2, 0.5, 100))
    s = resolve(defaults(), ceil)
    assert (s.limits.memory, s.limits.cpus, s.limits.pids) == (512 * 1024**2, 0.5, 100)


def test_values_at_or_below_ceiling_pass() -> None:
    ceil = Policy(Ceilings(2 * 1024**3, 2.0, 512))
    s = resolve(defaults(memory="2G", cpus=2, pids=512), ceil, explicit=("memory", "cpus", "pids"))
    assert (s.limits.memory, s.limits.cpus, s.limits.pids) == (2 * 1024**3, 2.0, 512)


def test_allowed_images() -> None:
    ceil = Policy(images=("python3",))
    assert resolve(defaults(image="python3:latest"), ceil).image == "python3:latest"
    with pytest.raises(SpecError, match=r"image='python2.7' is not allowed by the administrator"):
        resolve(defaults(image="python2.7"), ceil)


def test_extra_mounts_need_an_allowed_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    entry = f"{data}:/data"
    with pytest.raises(SpecError, match="not under an allowed directory"):
        resolve(defaults(extra_mounts=[entry]))
    ceil = Policy(mount_sources=(str(tmp_path),))
    s = resolve(defaults(extra_mounts=[entry, f"{data}:/data2:rw"]), ceil)
    assert s.mounts == (Bind(str(data), "/data", True), Bind(str(data), "/data2", False))
    with pytest.raises(SpecError, match="does not exist on the host"):
        resolve(defaults(extra_mounts=[f"{tmp_path}/nope:/x"]), ceil)
    # a sibling with the same prefix is not "under" the allowed directory
    with pytest.raises(SpecError, match="not under an allowed directory"):
        resolve(defaults(extra_mounts=[f"{tmp_path}x:/x"]), ceil)


def test_volume_forms() -> None:
    assert Bind.parse("/a:/b") == Bind("/a", "/b", True)
    assert Bind.parse("/a:/b:rw") == Bind("/a", "/b", False)
    with pytest.raises(SpecError, match=r"'/a/../b'"):
        Bind.parse("/a/../b:/b")


@needs_root
def test_user_auto_takes_the_notebook_dir_owner(tmp_path: Path) -> None:
    os.chown(tmp_path, 1234, 2345)
    assert parse_user("auto", workdir=str(tmp_path), server_uid=0) == (1234, 2345)


@needs_root
def test_user_auto_root_owned_dir_runs_as_nobody_unless_allowed(tmp_path: Path) -> None:
    os.chown(tmp_path, 0, 0)
    s = resolve(defaults(), workdir=str(tmp_path))
    assert (s.uid, s.gid) == (NOBODY, NOBODY)
    ceil = Policy(allow_root=True)
    s = resolve(defaults(), ceil, workdir=str(tmp_path))
    assert (s.uid, s.gid) == (0, 0)


def test_user_auto_non_root_server_keeps_its_uid() -> None:
    assert parse_user("auto", workdir="/", server_uid=1500)[0] == 1500


def test_user_explicit_forms() -> None:
    assert parse_user("1000:100", workdir=None, server_uid=0) == (1000, 100)
    assert parse_user(1001, workdir=None, server_uid=0)[0] == 1001
    assert parse_user("root", workdir=None, server_uid=0) == (0, 0)
    with pytest.raises(SpecError, match="out of range"):
        parse_user("99999999999", workdir=None, server_uid=0)


def test_policy_parsing_and_bad_policy() -> None:
    pol = SandboxPolicy(max_memory="4G", max_cpus=2.0, max_pids=512, allowed_images=["python3"])
    policy = read_policy(pol)
    ceil = policy.ceilings
    assert ceil.memory == 4 * 1024**3 and ceil.cpus == 2.0 and ceil.pids == 512
    assert policy.images == ("python3",)
    with pytest.raises(SpecError, match=r"SandboxPolicy.max_memory='huge' is not a size"):
        read_policy(SandboxPolicy(max_memory="huge"))
    with pytest.raises(
        SpecError, match="allowed_mount_sources entry 'rel' must be an absolute path"
    ):
        read_policy(SandboxPolicy(allowed_mount_sources=["rel"]))


def test_policy_comes_from_traitlets_config() -> None:
    from traitlets.config import Config

    cfg = Config()
    cfg.SandboxPolicy.max_memory = "3G"
    cfg.SandboxPolicy.allow_root = True
    pol = SandboxPolicy(config=cfg)
    assert read_policy(pol).ceilings.memory == 3 * 1024**3
    assert read_policy(pol).allow_root


def test_configuration_doc_lists_every_trait_with_help() -> None:
    doc = configuration_markdown()
    for name in SETTING_NAMES:
        assert f"`c.SandboxProvisioner.{name}`" in doc
    for name in (
        "max_memory",
        "max_cpus",
        "max_pids",
        "allowed_images",
        "allow_root",
        "allowed_mount_sources",
    ):
        assert f"`c.SandboxPolicy.{name}`" in doc
    assert "Default: 1G" in doc


def test_configuration_doc_is_up_to_date() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert path.read_text() == configuration_markdown(), (
        "docs/configuration.md is stale; run: "
        "python -m sandbox_kernel.jupyter.docs > docs/configuration.md"
    )


def test_output_limits_resolve_from_their_forms() -> None:
    s = resolve(
        defaults(
            max_message_size="4M",
            iopub_msg_rate_limit=0,
            iopub_data_rate_limit="512K",
            rate_limit_window=1.5,
        ),
        server_uid=1000,
    )
    assert s.output == OutputLimits(
        max_message_size=4 * 1024**2, msg_rate=0.0, data_rate=512 * 1024, window=1.5
    )
    assert resolve(defaults(), server_uid=1000).output == OutputLimits()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_message_size", "huge", "max_message_size='huge' is not a size"),
        ("max_message_size", "1K", "max_message_size='1K' is below 64 KiB"),
        ("iopub_data_rate_limit", "fast", "iopub_data_rate_limit='fast' is not a size"),
        ("iopub_msg_rate_limit", -1, "iopub_msg_rate_limit=-1 is not valid; use a number"),
        ("rate_limit_window", 0, "rate_limit_window=0 is not valid; use a number of seconds"),
    ],
)
def test_bad_output_limits_are_named(field: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        resolve(defaults(**{field: value}), server_uid=1000)
    assert expected in str(info.value)


def test_pool_size_within_the_policy() -> None:
    assert resolve(defaults(), workdir=None).pool_size == 0
    assert resolve(defaults(pool_size=3), explicit=("pool_size",), workdir=None).pool_size == 3
    top = Policy(max_pool_size=2)
    # a config default above the ceiling is lowered to it; a kernelspec's value is an error
    assert resolve(defaults(pool_size=5), top, workdir=None).pool_size == 2
    with pytest.raises(SpecError, match=r"pool_size=5 is above the server's SandboxPolicy"):
        resolve(defaults(pool_size=5), top, explicit=("pool_size",), workdir=None)
    for bad in (-1, True, "2"):
        with pytest.raises(SpecError, match="pool_size="):
            resolve(defaults(pool_size=bad), workdir=None)


def test_max_pool_size_is_bounded() -> None:
    with pytest.raises(SpecError, match=r"max_pool_size=65 must be a number of sandboxes in 0..64"):
        read_policy(SandboxPolicy(max_pool_size=65))
    assert read_policy(SandboxPolicy(max_pool_size=0)).max_pool_size == 0
