"""cgroup layer against a fake cgroup tree in tmp_path (no root needed).

The fake filesystem (FakeIO) behaves like cgroupfs where it matters for the managers: mkdir
creates the control files, v1 refuses memory.limit_in_bytes above memory.memsw.limit_in_bytes,
v2 cgroup.subtree_control refuses controllers not in cgroup.controllers and enforces the
"no internal processes" rule, rmdir refuses a cgroup with members or children, and a SIGKILL
removes the pid from every cgroup.procs.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

import sandbox_kernel.cgroups as cg
from sandbox_kernel.cgroups import (
    CgroupIO,
    CgroupLimits,
    CgroupMode,
    V1Manager,
    V2Manager,
    cpus_to_quota,
    detect,
    get_manager,
    weight_to_shares,
)
from sandbox_kernel.cgroups.detect import parse_mounts, parse_proc_cgroup
from sandbox_kernel.errors import CgroupError, ContainerNotFound, PrivilegeError, SpecError

MiB = 1 << 20
V1_MAX = "9223372036854771712"

# --- texts like this machine's (hybrid: v1 controllers + systemd's cgroup2 at .../unified) ---
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
LEGACY_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
"""
LEGACY_CGROUP = """\
5:pids:/user.slice/jupyter
3:memory:/user.slice/jupyter
2:cpu,cpuacct:/user.slice/jupyter
"""
UNIFIED_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
UNIFIED_CGROUP = "0::/jupyter.service\n"

V1_FILES: dict[str, dict[str, str]] = {
    "memory": {
        "memory.limit_in_bytes": V1_MAX,
        "memory.memsw.limit_in_bytes": V1_MAX,
        "memory.usage_in_bytes": "0",
        "memory.max_usage_in_bytes": "0",
        "memory.memsw.usage_in_bytes": "0",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "cpu": {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000", "cpu.shares": "1024"},
    "cpuacct": {"cpuacct.usage": "0"},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0\n"},
}
V2_FILES: dict[str, dict[str, str]] = {
    "": {
        "cgroup.procs": "",
        "cgroup.subtree_control": "",
        "cgroup.events": "populated 0\nfrozen 0\n",
        "cgroup.freeze": "0",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    },
    "memory": {
        "memory.max": "max",
        "memory.swap.max": "max",
        "memory.current": "0",
        "memory.peak": "0",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.events.local": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0\n"},
}
V2_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")


class FakeIO(CgroupIO):
    """A fake cgroupfs over a real directory tree; records writes and kills."""

    def __init__(self, v1: dict[str, set[str]] | None = None, v2_root: str | None = None):
        self.v1 = v1 or {}  # hierarchy mount dir -> controllers
        self.v2_root = v2_root
        self.writes: list[tuple[str, str]] = []
        self.killed: list[int] = []
        self.stuck: set[int] = set()
        self.fail: dict[str, int] = {}  # path -> errno raised by the next writes
        self.busy_rmdir: dict[str, int] = {}  # path -> how many rmdir calls get EBUSY
        self.with_cgroup_kill = True
        self.clock = 0.0

    # helpers for tests
    def hierarchy(self, path: str) -> str | None:
        for mount in self.v1:
            if path == mount or path.startswith(mount + "/"):
                return mount
        return None

    def populate_v1(self, path: str) -> None:
        mount = self.hierarchy(path)
        assert mount is not None, path
        Path(path, "cgroup.procs").write_text("")
        for ctrl in self.v1[mount]:
            for name, value in V1_FILES[ctrl].items():
                Path(path, name).write_text(value)

    def populate_v2(self, path: str, controllers: list[str]) -> None:
        Path(path, "cgroup.controllers").write_text(" ".join(controllers))
        for name, value in V2_FILES[""].items():
            Path(path, name).write_text(value)
        if self.with_cgroup_kill:
            Path(path, "cgroup.kill").write_text("")
        for ctrl in controllers:
            for name, value in V2_FILES.get(ctrl, {}).items():
                Path(path, name).write_text(value)

    # CgroupIO
    def write(self, path: str, value: str) -> None:
        if path in self.fail:
            raise OSError(self.fail[path], os.strerror(self.fail[path]), path)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        base = os.path.basename(path)
        d = os.path.dirname(path)
        self.writes.append((path, value))  # what the manager wrote, before the "kernel" acts
        if base in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            value = V1_MAX if value.strip() == "-1" else value.strip()
            other = (
                "memory.memsw.limit_in_bytes"
                if base == "memory.limit_in_bytes"
                else "memory.limit_in_bytes"
            )
            other_v = int(Path(d, other).read_text())
            mem, sw = (
                (int(value), other_v) if base == "memory.limit_in_bytes" else (other_v, int(value))
            )
            if mem > sw:
                raise OSError(errno.EINVAL, "Invalid argument", path)
        elif base == "cgroup.subtree_control":
            available = Path(d, "cgroup.controllers").read_text().split()
            enabled = set(Path(path).read_text().split())
            if d != self.v2_root and Path(d, "cgroup.procs").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            for tok in value.split():
                name = tok[1:]
                if name not in available:
                    raise OSError(errno.ENOENT, "No such file or directory", path)
                if tok[0] == "+":
                    enabled.add(name)
                else:
                    enabled.discard(name)
            value = " ".join(c for c in V2_ORDER if c in enabled)
        elif base == "cgroup.kill" and value.strip() == "1":
            for sub, _dirs, files in os.walk(d):
                if "cgroup.procs" in files:
                    procs = Path(sub, "cgroup.procs").read_text().split()
                    kept = [p for p in procs if int(p) in self.stuck]
                    Path(sub, "cgroup.procs").write_text("\n".join(kept))
            return
        Path(path).write_text(value)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        if self.hierarchy(path) is not None:
            self.populate_v1(path)
        else:
            parent_enabled = Path(os.path.dirname(path), "cgroup.subtree_control").read_text()
            self.populate_v2(path, parent_enabled.split())

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if self.busy_rmdir.get(path, 0) > 0:
            self.busy_rmdir[path] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        if (
            any(e.is_dir() for e in os.scandir(path))
            or Path(path, "cgroup.procs").read_text().split()
        ):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        shutil.rmtree(path)

    def kill(self, pid: int, sig: int = 9) -> None:
        self.killed.append(pid)
        if pid in self.stuck:
            return
        for mount in [*self.v1, *([self.v2_root] if self.v2_root else [])]:
            for sub, _dirs, files in os.walk(mount):
                if "cgroup.procs" in files:
                    p = Path(sub, "cgroup.procs")
                    procs = p.read_text().split()
                    if str(pid) in procs:
                        p.write_text("\n".join(x for x in procs if x != str(pid)))

    def sleep(self, seconds: float) -> None:
        self.clock += seconds

    def monotonic(self) -> float:
        return self.clock


def writes_to(io: FakeIO, *names: str) -> list[tuple[str, str]]:
    return [(os.path.basename(p), v) for p, v in io.writes if os.path.basename(p) in names]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def hybrid(tmp_path: Path) -> tuple[V1Manager, FakeIO, Path]:
    root = tmp_path / "root"
    cgfs = root / "sys/fs/cgroup"
    mounts: dict[str, set[str]] = {}
    for ctrl in ("memory", "cpu", "cpuacct", "pids", "cpuset"):
        (cgfs / ctrl).mkdir(parents=True)
        mounts[str(cgfs / ctrl)] = {ctrl} if ctrl != "cpuset" else set()
    (cgfs / "unified").mkdir()
    io = FakeIO(v1={k: v for k, v in mounts.items() if v})
    for d in ("memory", "cpu", "cpuacct", "pids"):
        io.populate_v1(str(cgfs / d))
    (cgfs / "memory/process_api").mkdir()
    io.populate_v1(str(cgfs / "memory/process_api"))
    (cgfs / "memory/process_api/abc").mkdir()
    io.populate_v1(str(cgfs / "memory/process_api/abc"))
    Path(cgfs / "memory/process_api/abc/cgroup.procs").write_text("4242\n")  # the server itself
    mgr = get_manager(
        root=str(root), mounts_text=HYBRID_MOUNTINFO, cgroup_text=HYBRID_CGROUP, io=io, mode=""
    )
    assert isinstance(mgr, V1Manager)
    io.writes.clear()
    return mgr, io, cgfs


def make_v2(
    tmp_path: Path, own: str = "/jupyter.service", procs: str = "", enabled: str = ""
) -> tuple[FakeIO, Path]:
    root = tmp_path / "root"
    cgfs = root / "sys/fs/cgroup"
    cgfs.mkdir(parents=True)
    io = FakeIO(v2_root=str(cgfs))
    io.populate_v2(str(cgfs), ["cpuset", "cpu", "io", "memory", "pids"])
    Path(cgfs, "cgroup.subtree_control").write_text("cpu memory pids")
    d = cgfs
    for part in own.strip("/").split("/"):
        if part:
            d = d / part
            io.mkdir(str(d))
    Path(d, "cgroup.procs").write_text(procs)
    Path(d, "cgroup.subtree_control").write_text(enabled)
    io.writes.clear()
    return io, cgfs


def v2_manager(io: FakeIO, cgfs: Path, own: str = "/jupyter.service", **kw: object) -> V2Manager:
    mgr = get_manager(
        root=str(cgfs.parent.parent.parent),
        mounts_text=UNIFIED_MOUNTS,
        cgroup_text=f"0::{own}\n",
        io=io,
        mode="",
        **kw,  # type: ignore[arg-type]
    )
    assert isinstance(mgr, V2Manager)
    return mgr


# --- parsing and detection -------------------------------------------------------------------


def test_parse_proc_cgroup_hybrid_and_comounted() -> None:
    v1, v2 = parse_proc_cgroup(HYBRID_CGROUP)
    assert v1["memory"] == "/process_api/abc"
    assert v1["cpu"] == "/" and v1["pids"] == "/" and v1["name=systemd"] == "/"
    assert v2 == "/"
    v1, v2 = parse_proc_cgroup(LEGACY_CGROUP)
    assert v1["cpu"] == v1["cpuacct"] == "/user.slice/jupyter"
    assert v2 is None


def test_parse_mounts_both_formats_and_escapes() -> None:
    info = parse_mounts(HYBRID_MOUNTINFO)
    mem = next(m for m in info if m.mountpoint == "/sys/fs/cgroup/memory")
    assert mem.fstype == "cgroup" and "memory" in mem.options and mem.root == "/"
    plain = parse_mounts(r"cgroup2 /mnt/my\040cg cgroup2 rw 0 0")
    assert plain[0].mountpoint == "/mnt/my cg" and plain[0].fstype == "cgroup2"


def test_detect_hybrid_like_this_machine(tmp_path: Path) -> None:
    lay = detect(root=str(tmp_path), mounts_text=HYBRID_MOUNTINFO, cgroup_text=HYBRID_CGROUP)
    assert lay.mode is CgroupMode.HYBRID
    assert lay.v1_dir("memory") == f"{tmp_path}/sys/fs/cgroup/memory/process_api/abc"
    assert lay.v1_dir("cpu") == f"{tmp_path}/sys/fs/cgroup/cpu"
    assert lay.v1_dir("cpuacct") == f"{tmp_path}/sys/fs/cgroup/cpuacct"
    assert lay.v1_dir("pids") == f"{tmp_path}/sys/fs/cgroup/pids"
    assert lay.v2_mountpoint() == f"{tmp_path}/sys/fs/cgroup/unified"


def test_detect_legacy_comounted_cpu_cpuacct() -> None:
    lay = detect(mounts_text=LEGACY_MOUNTS, cgroup_text=LEGACY_CGROUP)
    assert lay.mode is CgroupMode.LEGACY
    assert (
        lay.v1_dir("cpu")
        == lay.v1_dir("cpuacct")
        == "/sys/fs/cgroup/cpu,cpuacct/user.slice/jupyter"
    )
    assert lay.v1_dir("memory") == "/sys/fs/cgroup/memory/user.slice/jupyter"
    assert lay.v2_mount is None


def test_detect_unified() -> None:
    lay = detect(mounts_text=UNIFIED_MOUNTS, cgroup_text=UNIFIED_CGROUP)
    assert lay.mode is CgroupMode.UNIFIED
    assert lay.v2_dir() == "/sys/fs/cgroup/jupyter.service"
    assert lay.v1_mounts == {}


def test_detect_mount_of_a_subtree_strips_its_root() -> None:
    # Inside a container the hierarchy may be mounted from /process_api/abc downwards.
    text = "35 31 0:32 /process_api/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    lay = detect(mounts_text=text, cgroup_text="4:memory:/process_api/abc/inner\n")
    assert lay.v1_dir("memory") == "/sys/fs/cgroup/memory/inner"


def test_detect_without_cgroups_raises() -> None:
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        detect(mounts_text="proc /proc proc rw 0 0\n", cgroup_text="")


# --- get_manager -----------------------------------------------------------------------------


def test_get_manager_table_and_env_override(
    hybrid: tuple[V1Manager, FakeIO, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, io, cgfs = hybrid
    root = str(tmp_path / "root")
    kw = {"root": root, "mounts_text": HYBRID_MOUNTINFO, "cgroup_text": HYBRID_CGROUP, "io": io}
    monkeypatch.delenv(cg.MODE_ENV, raising=False)
    assert isinstance(get_manager(**kw), V1Manager)  # type: ignore[arg-type]
    # forced v2 on a hybrid host uses the cgroup2 mount at .../unified
    io.populate_v2(str(cgfs / "unified"), [])
    monkeypatch.setenv(cg.MODE_ENV, "v2")
    forced = get_manager(**kw)  # type: ignore[arg-type]
    assert isinstance(forced, V2Manager)
    assert forced.parent == str(cgfs / "unified")
    assert forced.controllers() == {"memory": False, "cpu": False, "pids": False}
    monkeypatch.setenv(cg.MODE_ENV, "v3")
    with pytest.raises(CgroupError, match="SANDBOX_KERNEL_CGROUP_MODE"):
        get_manager(**kw)  # type: ignore[arg-type]
    monkeypatch.setenv(cg.MODE_ENV, "v1")
    with pytest.raises(CgroupError, match="no cgroup v1"):
        get_manager(mounts_text=UNIFIED_MOUNTS, cgroup_text=UNIFIED_CGROUP, io=io)


def test_get_manager_is_built_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    calls: list[int] = []
    real_detect = cg.detect

    def fake_detect(**_: object) -> cg.CgroupLayout:
        calls.append(1)
        return real_detect(
            root=str(cgfs.parent.parent.parent),
            mounts_text=UNIFIED_MOUNTS,
            cgroup_text=UNIFIED_CGROUP,
        )

    monkeypatch.setattr(cg, "detect", fake_detect)
    monkeypatch.setattr(cg, "CgroupIO", lambda: io)
    monkeypatch.delenv(cg.MODE_ENV, raising=False)
    monkeypatch.delenv(cg.PARENT_ENV, raising=False)
    cg.reset_manager_cache()
    try:
        first = get_manager()
        assert get_manager() is first
        assert len(calls) == 1
        assert isinstance(first, V2Manager)
    finally:
        cg.reset_manager_cache()


def test_explicit_parent_v2_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io, cgfs = make_v2(tmp_path, own="/jupyter.service", procs="77")
    io.mkdir(str(cgfs / "kernels.slice"))
    mgr = v2_manager(io, cgfs, parent="/kernels.slice")
    assert mgr.parent == str(cgfs / "kernels.slice")
    monkeypatch.setenv(cg.PARENT_ENV, str(cgfs / "kernels.slice"))
    assert v2_manager(io, cgfs).parent == str(cgfs / "kernels.slice")
    with pytest.raises(CgroupError, match="does not exist"):
        v2_manager(io, cgfs, parent="/nope")


# --- v1 --------------------------------------------------------------------------------------


def test_v1_create_nests_under_own_cgroup_with_exact_values(
    hybrid: tuple[V1Manager, FakeIO, Path],
) -> None:
    mgr, io, cgfs = hybrid
    assert mgr.version == 1 and mgr.mode is CgroupMode.HYBRID
    assert mgr.controllers() == {"memory": True, "cpu": True, "pids": True}
    h = mgr.create(
        "sk-1", CgroupLimits(memory=64 * MiB, cpu_quota_us=50_000, cpu_weight=200, pids=32)
    )
    assert h.join_paths == [
        str(cgfs / "memory/process_api/abc/sk-1"),
        str(cgfs / "cpu/sk-1"),
        str(cgfs / "cpuacct/sk-1"),
        str(cgfs / "pids/sk-1"),
    ]
    mem = cgfs / "memory/process_api/abc/sk-1"
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(64 * MiB)
    assert (cgfs / "cpu/sk-1/cpu.cfs_quota_us").read_text() == "50000"
    assert (cgfs / "cpu/sk-1/cpu.cfs_period_us").read_text() == "100000"
    assert (cgfs / "cpu/sk-1/cpu.shares").read_text() == "2048"
    assert (cgfs / "pids/sk-1/pids.max").read_text() == "32"
    # the parents were not touched
    assert all("/sk-1/" in p for p, _ in io.writes)
    # new cgroup: memory is lowered from "unlimited" -> memory first, then memsw
    assert writes_to(io, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes") == [
        ("memory.limit_in_bytes", str(64 * MiB)),
        ("memory.memsw.limit_in_bytes", str(64 * MiB)),
    ]


def test_v1_memsw_order_when_raising_and_lowering(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, cgfs = hybrid
    h = mgr.create("sk-2", CgroupLimits(memory=64 * MiB))
    mem = cgfs / "memory/process_api/abc/sk-2"
    io.writes.clear()
    h.set_limits(CgroupLimits(memory=128 * MiB, memory_swap=32 * MiB))
    assert writes_to(io, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes") == [
        ("memory.memsw.limit_in_bytes", str(160 * MiB)),
        ("memory.limit_in_bytes", str(128 * MiB)),
    ]
    io.writes.clear()
    h.set_limits(CgroupLimits(memory=32 * MiB))
    assert writes_to(io, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes") == [
        ("memory.limit_in_bytes", str(32 * MiB)),
        ("memory.memsw.limit_in_bytes", str(32 * MiB)),
    ]
    # swap unlimited, then everything unlimited
    h.set_limits(CgroupLimits(memory=48 * MiB, memory_swap=None))
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == V1_MAX
    assert (mem / "memory.limit_in_bytes").read_text() == str(48 * MiB)
    h.set_limits(CgroupLimits())
    assert (mem / "memory.limit_in_bytes").read_text() == V1_MAX
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == V1_MAX
    assert (cgfs / "cpu/sk-2/cpu.cfs_quota_us").read_text() == "-1"
    assert (cgfs / "cpu/sk-2/cpu.shares").read_text() == "1024"
    assert (cgfs / "pids/sk-2/pids.max").read_text() == "max"


def test_v1_wrong_order_would_be_refused_by_the_fake(
    hybrid: tuple[V1Manager, FakeIO, Path],
) -> None:
    # guards the test above: the fake enforces memory <= memsw like the kernel
    _, io, cgfs = hybrid
    mem = cgfs / "memory/process_api/abc"
    io.write(str(mem / "memory.limit_in_bytes"), str(64 * MiB))
    with pytest.raises(OSError) as ei:
        io.write(str(mem / "memory.memsw.limit_in_bytes"), str(32 * MiB))
    assert ei.value.errno == errno.EINVAL


def test_v1_period_change_lifts_quota_first(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, _ = hybrid
    h = mgr.create("sk-3", CgroupLimits(cpu_quota_us=50_000))
    io.writes.clear()
    h.set_limits(CgroupLimits(cpu_quota_us=100_000, cpu_period_us=200_000))
    assert writes_to(io, "cpu.cfs_quota_us", "cpu.cfs_period_us") == [
        ("cpu.cfs_quota_us", "-1"),
        ("cpu.cfs_period_us", "200000"),
        ("cpu.cfs_quota_us", "100000"),
    ]


def test_v1_stats_parsing(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, _, cgfs = hybrid
    h = mgr.create("sk-4", CgroupLimits(memory=64 * MiB, cpu_quota_us=50_000, pids=16))
    mem = cgfs / "memory/process_api/abc/sk-4"
    (mem / "memory.usage_in_bytes").write_text("1000\n")
    (mem / "memory.max_usage_in_bytes").write_text("67100000\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (cgfs / "cpuacct/sk-4/cpuacct.usage").write_text("2500000123\n")
    (cgfs / "pids/sk-4/pids.current").write_text("5\n")
    (cgfs / "pids/sk-4/pids.events").write_text("max 7\n")
    s = mgr.open("sk-4").stats()
    assert s.memory_current == 1000 and s.memory_peak == 67_100_000
    assert s.memory_limit == 64 * MiB
    assert s.cpu_usage_us == 2_500_000
    assert s.cpu_quota_us == 50_000 and s.cpu_period_us == 100_000
    assert s.pids_current == 5 and s.pids_limit == 16
    assert s.oom_kills == 3 and s.pids_limit_hits == 7
    h.set_limits(CgroupLimits())
    s = h.stats()
    assert s.memory_limit is None and s.cpu_quota_us is None and s.pids_limit is None


def test_v1_oom_fallback_counts_under_oom_transitions(
    hybrid: tuple[V1Manager, FakeIO, Path],
) -> None:
    mgr, _, cgfs = hybrid
    h = mgr.create("sk-5", CgroupLimits(memory=64 * MiB))
    ctl = cgfs / "memory/process_api/abc/sk-5/memory.oom_control"
    seq = [(0, 0), (1, 1), (1, 1), (0, 1), (1, 2)]
    for under, expected in seq:
        ctl.write_text(f"oom_kill_disable 0\nunder_oom {under}\n")  # old kernel: no oom_kill
        assert h.stats().oom_kills == expected


def test_v1_lowering_below_unreclaimable_usage_explains(
    hybrid: tuple[V1Manager, FakeIO, Path],
) -> None:
    mgr, io, cgfs = hybrid
    h = mgr.create("sk-6", CgroupLimits(memory=256 * MiB))
    mem = cgfs / "memory/process_api/abc/sk-6"
    (mem / "memory.usage_in_bytes").write_text(str(120 * MiB))
    io.fail[str(mem / "memory.limit_in_bytes")] = errno.EBUSY
    with pytest.raises(CgroupError, match=r"uses 125829120 bytes.*could not reclaim") as ei:
        h.set_limits(CgroupLimits(memory=64 * MiB))
    assert ei.value.errno == errno.EBUSY
    assert str(mem / "memory.limit_in_bytes") in str(ei.value)


def test_v1_missing_hierarchy_refuses_requested_limit(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "sys/fs/cgroup/memory").mkdir(parents=True)
    io = FakeIO(v1={str(root / "sys/fs/cgroup/memory"): {"memory"}})
    io.populate_v1(str(root / "sys/fs/cgroup/memory"))
    mgr = get_manager(
        root=str(root),
        mounts_text="cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n",
        cgroup_text="3:memory:/\n",
        io=io,
        mode="",
    )
    assert mgr.controllers() == {"memory": True, "cpu": False, "pids": False}
    with pytest.raises(CgroupError, match="pids hierarchy is not mounted"):
        mgr.create("sk-7", CgroupLimits(pids=10))
    assert mgr.list_leftovers() == []  # the failed create cleaned up after itself
    mgr.create("sk-7", CgroupLimits(memory=MiB * 8)).remove()


def test_v1_kill_loops_until_every_hierarchy_is_empty(
    hybrid: tuple[V1Manager, FakeIO, Path],
) -> None:
    mgr, io, cgfs = hybrid
    h = mgr.create("sk-8", CgroupLimits(pids=16))
    (cgfs / "memory/process_api/abc/sk-8/cgroup.procs").write_text("101\n102\n")
    (cgfs / "cpu/sk-8/cgroup.procs").write_text("101\n102\n")
    (cgfs / "pids/sk-8/cgroup.procs").write_text("101\n102\n103\n")  # 103 only here
    assert h.pids() == [101, 102, 103]
    h.kill()
    assert sorted(set(io.killed)) == [101, 102, 103]
    assert h.pids() == []
    assert "4242" in (cgfs / "memory/process_api/abc/cgroup.procs").read_text()  # not ours


def test_v1_kill_is_bounded(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, cgfs = hybrid
    h = mgr.create("sk-9", CgroupLimits())
    (cgfs / "pids/sk-9/cgroup.procs").write_text("666\n")
    io.stuck.add(666)
    with pytest.raises(CgroupError, match=r"\[666\] still alive"):
        h.kill(timeout=1.0)
    assert 0.9 <= io.clock <= 1.2


def test_v1_remove_is_idempotent_and_leftovers(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, cgfs = hybrid
    a = mgr.create("sk-a", CgroupLimits())
    mgr.create("sk-b", CgroupLimits())
    mgr.create("other-c", CgroupLimits())
    (cgfs / "pids/sk-orphan").mkdir()  # left in one hierarchy only
    io.populate_v1(str(cgfs / "pids/sk-orphan"))
    (cgfs / "memory/process_api/abc/sk-a/nested").mkdir()  # a sub-cgroup made inside
    io.populate_v1(str(cgfs / "memory/process_api/abc/sk-a/nested"))
    (cgfs / "memory/process_api/abc/sk-a/nested/cgroup.procs").write_text("55\n")
    assert mgr.list_leftovers() == ["sk-a", "sk-b", "sk-orphan"]
    assert mgr.list_leftovers("other-") == ["other-c"]
    io.busy_rmdir[str(cgfs / "cpu/sk-a")] = 3  # transient EBUSY is retried
    a.remove()
    assert 55 in io.killed
    assert not any(os.path.exists(p) for p in a.join_paths)
    a.remove()  # already gone: fine
    assert mgr.list_leftovers() == ["sk-b", "sk-orphan"]
    mgr.open("sk-orphan").remove()
    assert mgr.list_leftovers() == ["sk-b"]
    with pytest.raises(ContainerNotFound):
        mgr.open("sk-a")
    with pytest.raises(ContainerNotFound):
        a.stats()


def test_v1_remove_gives_up_on_persistent_ebusy(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, cgfs = hybrid
    h = mgr.create("sk-busy", CgroupLimits())
    io.busy_rmdir[str(cgfs / "pids/sk-busy")] = 10**6
    with pytest.raises(CgroupError, match=r"removing cgroup .*pids/sk-busy"):
        h.remove(timeout=0.5)


def test_v1_create_existing_and_privilege_errors(hybrid: tuple[V1Manager, FakeIO, Path]) -> None:
    mgr, io, _ = hybrid
    mgr.create("sk-dup", CgroupLimits())
    with pytest.raises(CgroupError, match="leftover"):
        mgr.create("sk-dup", CgroupLimits())
    assert mgr.list_leftovers() == ["sk-dup"]  # the existing one was not touched/removed

    def denied(path: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    io.mkdir = denied  # type: ignore[method-assign]
    with pytest.raises(PrivilegeError, match=r"creating cgroup .*sk-x: Permission denied; run"):
        mgr.create("sk-x", CgroupLimits())


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../../etc", "x\0y"])
def test_names_must_be_one_component(hybrid: tuple[V1Manager, FakeIO, Path], bad: str) -> None:
    mgr, _, _ = hybrid
    with pytest.raises(SpecError):
        mgr.create(bad, CgroupLimits())


@pytest.mark.parametrize(
    "limits",
    [
        CgroupLimits(memory=0),
        CgroupLimits(memory_swap=-1),
        CgroupLimits(cpu_quota_us=10),
        CgroupLimits(cpu_period_us=10),
        CgroupLimits(cpu_weight=0),
        CgroupLimits(cpu_weight=10001),
        CgroupLimits(pids=0),
    ],
)
def test_bad_limits_are_refused_before_any_write(
    hybrid: tuple[V1Manager, FakeIO, Path], limits: CgroupLimits
) -> None:
    mgr, io, _ = hybrid
    with pytest.raises(SpecError):
        mgr.create("sk-bad", limits)
    assert io.writes == [] and mgr.list_leftovers() == []


# --- v2 --------------------------------------------------------------------------------------


def test_v2_enables_controllers_and_writes_exact_values(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    mgr = v2_manager(io, cgfs)
    assert mgr.version == 2 and mgr.mode is CgroupMode.UNIFIED
    assert mgr.controllers() == {"memory": True, "cpu": True, "pids": True}
    h = mgr.create(
        "sk-1", CgroupLimits(memory=64 * MiB, cpu_quota_us=50_000, cpu_weight=300, pids=32)
    )
    parent = cgfs / "jupyter.service"
    assert h.join_paths == [str(parent / "sk-1")]
    assert writes_to(io, "cgroup.subtree_control") == [
        ("cgroup.subtree_control", "+memory +cpu +pids")
    ]
    assert (parent / "cgroup.subtree_control").read_text() == "cpu memory pids"
    d = parent / "sk-1"
    assert (d / "memory.max").read_text() == str(64 * MiB)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "cpu.weight").read_text() == "300"
    assert (d / "pids.max").read_text() == "32"
    io.writes.clear()
    h2 = mgr.create("sk-2", CgroupLimits())  # already enabled: no subtree_control write
    assert writes_to(io, "cgroup.subtree_control") == []
    d2 = parent / "sk-2"
    assert (d2 / "memory.max").read_text() == "max"
    assert (d2 / "memory.swap.max").read_text() == "0"  # swap off by default
    assert (d2 / "cpu.max").read_text() == "max 100000"
    assert (d2 / "cpu.weight").read_text() == "100"
    assert (d2 / "pids.max").read_text() == "max"
    h2.set_limits(CgroupLimits(memory=MiB * 100, memory_swap=MiB * 10, cpu_quota_us=150_000))
    assert (d2 / "memory.swap.max").read_text() == str(10 * MiB)
    assert (d2 / "cpu.max").read_text() == "150000 100000"
    h2.set_limits(CgroupLimits(memory_swap=None))
    assert (d2 / "memory.swap.max").read_text() == "max"


def test_v2_enables_only_what_is_missing(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path, enabled="cpu memory")
    mgr = v2_manager(io, cgfs)
    mgr.create("sk-1", CgroupLimits(pids=5))
    assert writes_to(io, "cgroup.subtree_control") == [("cgroup.subtree_control", "+pids")]


def test_v2_no_internal_processes_rule_message(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path, procs="4242\n4243\n")
    mgr = v2_manager(io, cgfs)
    with pytest.raises(CgroupError) as ei:
        mgr.create("sk-1", CgroupLimits(memory=64 * MiB))
    msg = str(ei.value)
    assert ei.value.errno == errno.EBUSY
    assert "no internal processes" in msg
    assert str(cgfs / "jupyter.service") in msg and "has 2 (e.g. pid 4242)" in msg
    assert "Delegate=yes" in msg and "SANDBOX_KERNEL_CGROUP_PARENT" in msg
    assert mgr.list_leftovers() == []  # nothing was created


def test_v2_injected_ebusy_writer(tmp_path: Path) -> None:
    # the same failure injected through the writer, whatever the fake's own rules say
    io, cgfs = make_v2(tmp_path)
    io.fail[str(cgfs / "jupyter.service/cgroup.subtree_control")] = errno.EBUSY
    with pytest.raises(CgroupError, match="no internal processes"):
        v2_manager(io, cgfs).create("sk-1", CgroupLimits())


def test_v2_root_parent_is_exempt_and_other_errors_differ(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path, own="/")
    Path(cgfs, "cgroup.subtree_control").write_text("")
    Path(cgfs, "cgroup.procs").write_text("1\n")
    mgr = v2_manager(io, cgfs, own="/")
    assert mgr.is_root
    h = mgr.create("sk-1", CgroupLimits(memory=MiB * 64))
    assert h.join_paths == [str(cgfs / "sk-1")]
    h.remove()
    Path(cgfs, "cgroup.subtree_control").write_text("")
    io.fail[str(cgfs / "cgroup.subtree_control")] = errno.EBUSY
    with pytest.raises(CgroupError) as ei:
        mgr.create("sk-2", CgroupLimits())
    assert "no internal processes" not in str(ei.value)


def test_v2_controller_not_delegated(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    Path(cgfs, "jupyter.service/cgroup.controllers").write_text("cpu pids")
    mgr = v2_manager(io, cgfs)
    assert mgr.controllers() == {"memory": False, "cpu": True, "pids": True}
    with pytest.raises(CgroupError, match="memory controller"):
        mgr.create("sk-1", CgroupLimits(memory=MiB * 64))
    assert mgr.list_leftovers() == []
    h = mgr.create("sk-2", CgroupLimits(pids=10))
    assert Path(h.join_paths[0], "pids.max").read_text() == "10"
    assert not Path(h.join_paths[0], "memory.max").exists()
    assert h.stats().memory_limit is None


def test_v2_stats_parsing(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    mgr = v2_manager(io, cgfs)
    h = mgr.create("sk-1", CgroupLimits(memory=64 * MiB, cpu_quota_us=50_000, pids=16))
    d = Path(h.join_paths[0])
    (d / "memory.current").write_text("5000\n")
    (d / "memory.peak").write_text("60000000\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    (d / "cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n")
    (d / "pids.current").write_text("3\n")
    (d / "pids.events").write_text("max 4\n")
    s = h.stats()
    assert s.memory_current == 5000 and s.memory_peak == 60_000_000
    assert s.memory_limit == 64 * MiB
    assert s.cpu_usage_us == 123456 and s.cpu_quota_us == 50_000 and s.cpu_period_us == 100_000
    assert s.pids_current == 3 and s.pids_limit == 16
    assert s.oom_kills == 2 and s.pids_limit_hits == 4


def test_v2_stats_fallbacks(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    h = v2_manager(io, cgfs).create("sk-1", CgroupLimits())
    d = Path(h.join_paths[0])
    (d / "memory.peak").unlink()  # kernel < 5.19
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 1\n")  # no oom_kill line
    (d / "memory.events.local").write_text("low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n")
    for current, peak in [(100, 100), (900, 900), (300, 900)]:
        (d / "memory.current").write_text(str(current))
        s = h.stats()
        assert s.memory_current == current and s.memory_peak == peak
    assert s.oom_kills == 1 and s.memory_limit is None and s.cpu_quota_us is None


def test_v2_kill_uses_cgroup_kill(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    h = v2_manager(io, cgfs).create("sk-1", CgroupLimits())
    d = Path(h.join_paths[0])
    (d / "cgroup.procs").write_text("11\n12\n")
    (d / "inner").mkdir()
    io.populate_v2(str(d / "inner"), [])
    (d / "inner/cgroup.procs").write_text("13\n")
    assert h.pids() == [11, 12, 13]
    h.kill()
    assert writes_to(io, "cgroup.kill") == [("cgroup.kill", "1")]
    assert io.killed == [] and h.pids() == []
    assert (cgfs / "jupyter.service/cgroup.procs").read_text() == ""  # parent untouched


def test_v2_kill_without_cgroup_kill_freezes(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    io.with_cgroup_kill = False
    h = v2_manager(io, cgfs).create("sk-1", CgroupLimits())
    d = Path(h.join_paths[0])
    assert not (d / "cgroup.kill").exists()
    (d / "cgroup.procs").write_text("21\n22\n")
    io.writes.clear()
    h.kill()
    assert writes_to(io, "cgroup.freeze") == [("cgroup.freeze", "1"), ("cgroup.freeze", "0")]
    assert io.killed == [21, 22] and h.pids() == []
    assert (d / "cgroup.freeze").read_text() == "0"


def test_v2_kill_bounded_and_remove_idempotent(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    mgr = v2_manager(io, cgfs)
    h = mgr.create("sk-1", CgroupLimits())
    mgr.create("sk-2", CgroupLimits())
    d = Path(h.join_paths[0])
    (d / "cgroup.procs").write_text("31\n")
    io.stuck.add(31)
    with pytest.raises(CgroupError, match=r"\[31\] still alive"):
        h.kill(timeout=0.5)
    io.stuck.clear()
    (d / "sub").mkdir()
    io.populate_v2(str(d / "sub"), [])
    assert mgr.list_leftovers() == ["sk-1", "sk-2"]
    io.busy_rmdir[str(d)] = 2
    h.remove()
    assert not d.exists()
    h.remove()
    assert mgr.list_leftovers() == ["sk-2"]
    with pytest.raises(ContainerNotFound):
        mgr.open("sk-1")
    mgr.open("sk-2").remove()
    assert mgr.list_leftovers() == []


def test_v2_subtree_control_needs_available_controllers(tmp_path: Path) -> None:
    io, cgfs = make_v2(tmp_path)
    io.fail[str(cgfs / "jupyter.service/cgroup.subtree_control")] = errno.ENOENT
    with pytest.raises(CgroupError, match=r"must be listed in the parent's cgroup\.controllers"):
        v2_manager(io, cgfs).create("sk-1", CgroupLimits())


# --- helpers ---------------------------------------------------------------------------------


def test_cpus_to_quota() -> None:
    assert cpus_to_quota(0.5) == 50_000
    assert cpus_to_quota(1.5) == 150_000
    assert cpus_to_quota(2, period=200_000) == 400_000
    assert cpus_to_quota(0.001) == 1000  # kernel minimum
    for bad in (0, -1, float("nan")):
        with pytest.raises(SpecError):
            cpus_to_quota(bad)


def test_weight_to_shares() -> None:
    assert weight_to_shares(100) == 1024
    assert weight_to_shares(1) == 10
    assert weight_to_shares(10000) == 102400
    assert weight_to_shares(50) == 512


def test_no_jupyter_imports() -> None:
    import sys

    src = Path(cg.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "jupyter_client" not in text and "traitlets" not in text, f
    assert "sandbox_kernel.cgroups" in sys.modules
