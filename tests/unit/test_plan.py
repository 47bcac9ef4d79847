import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.runtime import ops
from sandbox_kernel.runtime.plan import HostContext, compile_plan, tmpfs_inodes
from sandbox_kernel.runtime.spec import MIN_TMPFS_INODES, Bind, ContainerSpec, Limits, Tmpfs


def _spec(tmp_path: Path, **kw: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        id="sk-0123456789ab",
        layers=(str(tmp_path / "l2"), str(tmp_path / "l1")),
        command=("python3", "-c", "print(1)"),
        user=1000,
        group=1000,
    )
    base.update(kw)
    return ContainerSpec(**base)


def _host(version: int = 2, **kw: Any) -> HostContext:
    base: dict[str, Any] = dict(
        scratch_dir="/run/sk/sk-0123456789ab/scratch",
        cgroup_dirs=("/sys/fs/cgroup/sk-0123456789ab",),
        cgroup_version=version,
        seccomp_file="/run/sk/filter.bpf",
    )
    base.update(kw)
    return HostContext(**base)


def records(spec: ContainerSpec, host: HostContext) -> list[tuple[str, ...]]:
    """The plan as the protocol writes it: one tuple of text fields per operation."""
    return [op.record() for op in compile_plan(spec, host)]


def kinds(recs: list[tuple[str, ...]]) -> list[str]:
    return [r[0] for r in recs]


def test_order_of_mount_phase(tmp_path: Path) -> None:
    recs = records(_spec(tmp_path), _host())
    k = kinds(recs)
    assert k.index("scratch") < k.index("rootfs") < k.index("pivot")
    assert k[-1] == "argv" and k.count("pivot") == 1
    # every mount-phase record comes before pivot, process records after
    pivot = k.index("pivot")
    assert all(x not in k[pivot:] for x in ("mount", "bind", "mask", "readonly", "mkdir"))
    assert all(x not in k[:pivot] for x in ("env", "user", "cwd", "argv"))
    rootfs = recs[k.index("rootfs")]
    assert rootfs[1] == f"{tmp_path}/l2:{tmp_path}/l1"  # top-most first
    # /proc, /dev, /sys must be real directories in the image
    assert [r[1] for r in recs if r[0] == "realdir"] == ["/proc", "/dev", "/sys", "/tmp"]
    # masks come after /proc and /sys are mounted
    assert k.index("mask") > max(
        i for i, r in enumerate(recs) if r[0] == "mount" and r[3] in ("/proc", "/sys")
    )


def test_identity_limits_and_security_records(tmp_path: Path) -> None:
    recs = records(_spec(tmp_path), _host())
    assert ("user", "1000", "1000") in recs
    assert ("rlimit", "core", "0", "0") in recs
    assert ("nonewprivs", "1") in recs
    assert ("seccomp", "/run/sk/filter.bpf") in recs
    assert ("sync", "net") not in recs  # nothing configures the network from the host
    assert ("mask", "/proc/kcore") in recs and ("readonly", "/proc/sys") in recs
    assert ("remount", "/dev", "ro,nosuid,noexec") in recs
    assert ("mount", "cgroup2", "cgroup2", "/sys/fs/cgroup", "ro,nosuid,nodev,noexec", "-") in recs
    assert [r[1] for r in recs if r[0] == "argv"] == ["python3", "-c", "print(1)"]


def test_v1_cgroup_view_is_read_only(tmp_path: Path) -> None:
    recs = records(
        _spec(tmp_path), _host(1, cgroup_v1_mounts=(("memory", "memory"), ("pids", "pids")))
    )
    assert (
        "mount",
        "cgroup",
        "cgroup",
        "/sys/fs/cgroup/memory",
        "ro,nosuid,nodev,noexec",
        "memory",
    ) in recs
    assert ("remount", "/sys/fs/cgroup", "ro,nosuid,nodev,noexec") in recs


def test_user_mounts(tmp_path: Path) -> None:
    src = tmp_path / "notebooks"
    src.mkdir()
    f = tmp_path / "data.csv"
    f.write_text("x")
    spec = _spec(
        tmp_path,
        mounts=(
            Bind(str(src), "/home/nb", readonly=False),
            Bind(str(f), "/data.csv"),
            Tmpfs("/scratch", 1 << 20),
        ),
    )
    recs = records(spec, _host())
    assert ("mkdir", "/home/nb", "755") in recs
    assert ("bind", str(src), "/home/nb", "rec,nosuid,nodev") in recs
    assert ("touch", "/data.csv", "644") in recs
    assert ("bind", str(f), "/data.csv", "rec,nosuid,nodev,ro") in recs
    assert (
        "mount",
        "tmpfs",
        "tmpfs",
        "/scratch",
        "nosuid,nodev",
        "mode=1777,size=1048576,nr_inodes=1024",
    ) in recs


def test_env_overrides_defaults_and_sizes(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        env=(("PATH", "/opt/bin"), ("X", "1")),
        tmp_size=5 << 20,
        limits=Limits(memory=1 << 30),
    )
    recs = records(spec, _host())
    envs = [r[1] for r in recs if r[0] == "env"]
    assert "PATH=/opt/bin" in envs and "X=1" in envs and "HOME=/home/sandbox" in envs
    assert not any(e.startswith("PATH=/usr") for e in envs)
    assert (
        "mount",
        "tmpfs",
        "tmpfs",
        "/tmp",
        "nosuid,nodev",
        f"mode=1777,size={5 << 20},nr_inodes=1024",
    ) in recs


def _executor_keywords() -> dict[str, int]:
    """keyword -> number of fields, from the executor's own keyword table."""
    import re

    src = Path(ops.__file__).parent / "native" / "sk-runtime.c"
    table = re.findall(r'\[K_[A-Z]+\]\s*=\s*\{\s*"([a-z-]+)",\s*(\d+),', src.read_text())
    assert len(table) > 20, "the executor's keyword table was not found"
    return {name: int(n) for name, n in table}


def _all_ops() -> list[type[ops.Op]]:
    return [
        cls
        for cls in vars(ops).values()
        if isinstance(cls, type) and issubclass(cls, ops.Op) and cls.keyword
    ]


def test_every_operation_is_a_record_the_executor_knows(tmp_path: Path) -> None:
    """One vocabulary: each typed operation's keyword and field count match the executor's
    table, and every record a plan holds is one of them."""
    known = _executor_keywords()
    samples = {
        op.keyword: op
        for op in compile_plan(_spec(tmp_path, mounts=(Tmpfs("/x", 4096),)), _host(1))
    }
    for cls in _all_ops():
        assert cls.keyword in known, cls.__name__
    for keyword, op in samples.items():
        assert len(op.record()) - 1 == known[keyword], (keyword, op.record())
    assert ops.UidMap(0, 1000, 1).record() == ("uidmap", "0", "1000", "1")
    assert ops.Scratch("/s", None).record() == ("scratch", "/s", "-", "-")
    assert ops.Umask(0o022).record() == ("umask", "22")


def test_loopback_request_goes_into_the_plan_and_replies_are_checked(tmp_path: Path) -> None:
    """Network none: the pyroute2-built request is a supervisor record; a reply that is
    not a clean ack fails the start (stage network)."""
    import struct

    from sandbox_kernel.errors import RuntimeStartError
    from sandbox_kernel.runtime import netns

    req = netns.loopback_request()
    raw = bytes.fromhex(req)
    assert struct.unpack_from("=IHH", raw)[1] == netns.RTM_NEWLINK and b"lo\0" in raw
    recs = records(_spec(tmp_path), _host(netlink=(req,)))
    assert ("netlink", req) in recs
    assert kinds(recs).index("netlink") < kinds(recs).index("scratch")

    def reply(kind: int, error: int) -> str:
        return struct.pack("=IHHIIi", 20, kind, 0, 1, 0, error).hex()

    netns.check_reply(reply(netns.NLMSG_ERROR, 0))
    for bad in (reply(netns.NLMSG_ERROR, -1), reply(16, 0), "zz", "", reply(2, 0)[:30]):
        with pytest.raises(RuntimeStartError) as err:
            netns.check_reply(bad)
        assert err.value.stage == "network"


def test_the_kept_loopback_request_is_pyroute2s_encoding() -> None:
    """``LOOPBACK_UP`` (kept so that a start never imports pyroute2) is what pyroute2 builds
    for ``lo``; another link's request is built by pyroute2 then."""
    from sandbox_kernel.runtime import netns

    netns._cache.pop("lo")
    try:
        assert netns.link_up_request("lo") == netns.LOOPBACK_UP
    finally:
        netns._cache["lo"] = netns.LOOPBACK_UP
    other = bytes.fromhex(netns.link_up_request("sk-test0"))
    assert b"sk-test0\0" in other and other[:4] != bytes.fromhex(netns.LOOPBACK_UP)[:4]


@pytest.mark.parametrize("error", [0, -1, -19, -95])
def test_acks_are_read_as_pyroute2_decodes_them(error: int) -> None:
    """``check_reply`` reads the kernel's ack (with NETLINK_CAP_ACK: the header of the
    request after the errno) as pyroute2's decoder does."""
    from pyroute2.netlink import nlmsgerr

    from sandbox_kernel.errors import RuntimeStartError
    from sandbox_kernel.runtime import netns

    ack = nlmsgerr()
    ack["header"]["type"] = netns.NLMSG_ERROR
    ack["header"]["sequence_number"] = 1
    ack["header"]["pid"] = 4242
    ack["error"] = error
    ack.encode()
    data = bytes(ack.data) + bytes.fromhex(netns.LOOPBACK_UP)[:16]
    data = len(data).to_bytes(4, "little") + data[4:]
    decoded = nlmsgerr(data)
    decoded.decode()
    assert decoded["error"] == error
    if error == 0:
        netns.check_reply(data.hex())
        return
    with pytest.raises(RuntimeStartError) as err:
        netns.check_reply(data.hex())
    assert err.value.errno == -error and err.value.stage == "network"
    assert os.strerror(-error) in str(err.value)


@pytest.mark.parametrize("upper", [False, True])
def test_every_writable_tmpfs_has_an_inode_cap(tmp_path: Path, upper: bool) -> None:
    """A flood of tiny files must end in ENOSPC: every tmpfs the plan mounts writable (the
    writable layer, /tmp, home, /dev/shm, extra tmpfs volumes) carries nr_inodes derived
    from its size by the one rule (``tmpfs_inodes``), never unlimited (0)."""
    spec = _spec(
        tmp_path,
        tmp_size=64 << 20,
        writable_size=128 << 20,
        mounts=(Tmpfs("/scratch", 32 << 20),),
        upper_dir=str(tmp_path / "up") if upper else "",
    )
    recs = records(spec, _host())
    readonly = {r[1] for r in recs if r[0] == "remount" and "ro" in r[2].split(",")}
    mounts = [r for r in recs if r[0] == "mount" and r[1] == "tmpfs"]
    writable = [r for r in mounts if r[3] not in readonly and "ro" not in r[4].split(",")]
    assert {r[3] for r in writable} >= {"/tmp", "/dev/shm", "/scratch"}
    for rec in writable:
        opts = dict(o.split("=", 1) for o in rec[5].split(","))
        size = int(opts["size"])
        assert int(opts["nr_inodes"]) == tmpfs_inodes(spec, size) > 0, rec
    scratch = next(r for r in recs if r[0] == "scratch")
    if upper:
        assert scratch[2:] == ("-", "-")
    else:
        assert scratch[2:] == (str(128 << 20), str((128 << 20) // spec.bytes_per_inode))
    assert tmpfs_inodes(spec, 4096) == MIN_TMPFS_INODES
    assert tmpfs_inodes(replace(spec, bytes_per_inode=4096), 64 << 20) == 16384


def test_a_shared_tmpfs_is_owned_by_the_user_capped_and_handed_over(tmp_path: Path) -> None:
    """``Tmpfs(shared=True)`` (a kernel's connection folder): owned by the container's user,
    inode-capped, noexec and nosymfollow (the host resolves paths in it), followed by the
    ``share`` record; the spec's files are written after the volumes."""
    spec = _spec(
        tmp_path,
        mounts=(Tmpfs("/run/sandbox", 65536, 0o700, shared=True),),
        files=(("/run/sandbox/kernel.json", 0o644, '{"ip": "x"}'),),
    )
    recs = records(spec, _host())
    i = recs.index(
        (
            "mount",
            "tmpfs",
            "tmpfs",
            "/run/sandbox",
            "nosuid,nodev,noexec,nosymfollow",
            "mode=700,size=65536,nr_inodes=1024,uid=1000,gid=1000",
        )
    )
    assert recs[i + 1] == ("share", "/run/sandbox")
    assert recs.index(("file", "/run/sandbox/kernel.json", "644", '{"ip": "x"}')) > i
    assert not any(r[0] == "share" for r in records(_spec(tmp_path), _host()))
