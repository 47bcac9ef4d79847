"""The runtime end to end, as root: isolation facts, caps, signals, lifecycle, leftovers.

Every container uses the built-in ``host`` pseudo-image (the host's /usr and /etc,
read-only) so that nothing needs building.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.cgroups import get_manager
from sandbox_kernel.cgroups.base import CgroupHandle
from sandbox_kernel.errors import RuntimeStartError
from sandbox_kernel.paths import new_container_id, run_dir
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container, ExitResult
from sandbox_kernel.runtime.leftovers import collect_leftovers
from sandbox_kernel.runtime.spec import Bind, ContainerSpec, Limits
from tests.hostmounts import host_mounts
from tests.privileged.conftest import crash

pytestmark = pytest.mark.privileged
MIB = 1024 * 1024
PY = "/usr/bin/python3"


def make_spec(command: Sequence[str], **kw: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=tuple(command),
        mounts=hostimage.binds(),
        hostname="box",
        # as root: nobody; rootless: the caller, whose id is mapped whatever the map
        user=os.geteuid() or 65534,
        group=os.getegid() or 65534,
    )
    if "mounts" in kw:
        kw["mounts"] = (*hostimage.binds(), *kw["mounts"])
    base.update(kw)
    # the product's default: a user namespace (root mode as root, rootless otherwise)
    return userns.for_caller().apply(ContainerSpec(**base))


def run(command: Sequence[str], timeout: float = 60, **kw: Any) -> tuple[ExitResult, str]:
    spec = make_spec(command, **kw)
    out_path = Path(f"/tmp/{spec.id}.out")
    try:
        with open(out_path, "w+") as out, Container.create(spec) as c:
            c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            result = c.wait(timeout)
            out.seek(0)
            text = out.read()
    finally:
        out_path.unlink(missing_ok=True)
    return result, text


def py(code: str, **kw: Any) -> tuple[ExitResult, str]:
    return run([PY, "-c", textwrap.dedent(code)], **kw)


def _our_cgroups() -> set[str]:
    return set(get_manager().list_leftovers("sk-"))


def _run_dirs() -> set[str]:
    root = run_dir()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.fixture(autouse=True)
def host_untouched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each test leaves the host as it found it: no mount, and no cgroup or run dir of any
    container the test created (recorded by id, so concurrent test runs do not interfere)."""
    created: list[str] = []
    real_create = Container.create  # bound to Container, which has no subclasses

    def recording_create(cls: type[Container], spec: ContainerSpec, /, **kw: Any) -> Container:
        created.append(spec.id)
        return real_create(spec, **kw)

    monkeypatch.setattr(Container, "create", classmethod(recording_create))
    mounts = host_mounts()
    yield created
    assert host_mounts() == mounts
    assert not set(created) & _our_cgroups(), "cgroups left behind"
    assert not set(created) & _run_dirs(), "run dirs left behind"


ISOLATION = """
import json, os, socket, errno
caps = {}
for line in open('/proc/self/status'):
    k, _, v = line.partition(':')
    if k in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb', 'CapInh', 'NoNewPrivs', 'Seccomp'):
        caps[k] = v.strip()
def try_write(path):
    try:
        with open(path, 'w') as f:
            f.write('x')
        return 'ok'
    except OSError as e:
        return errno.errorcode[e.errno]
def fill_tmp():
    n = 0
    try:
        with open('/tmp/fill', 'wb') as f:
            while True:
                f.write(b'\\0' * 1048576)
                f.flush()
                n += 1
    except OSError as e:
        return [n, errno.errorcode[e.errno]]
ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]
print(json.dumps(dict(
    pid=os.getpid(), ppid=os.getppid(), uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(),
    pids=sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    init=open('/proc/1/comm').read().strip(),
    hostname=socket.gethostname(), ifaces=ifaces,
    lo_flags=int(open('/sys/class/net/lo/flags').read(), 16),
    caps=caps, write_usr=try_write('/usr/sk-test'), write_root=try_write('/sk-test'),
    tmp=fill_tmp(), cwd=os.getcwd(), umask=os.umask(0),
    fds=sorted(int(x) for x in os.listdir('/proc/self/fd')),
    sid=os.getsid(0) == os.getpid(),
    proc_sys=try_write('/proc/sys/kernel/hostname'),
    keys=open('/proc/keys').read(),
    cgroup=open('/proc/self/cgroup').read().strip().splitlines(),
)))
"""


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_isolation_facts_from_inside() -> None:
    result, out = py(ISOLATION, tmp_size=4 * MIB)
    assert result.status == 0, out
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["pid"] == 2 and facts["ppid"] == 1, "main process is PID 2 under our init (PID 1)"
    assert facts["init"] == "sk-runtime"
    assert facts["pids"] == [1, 2], "only the container's processes are visible"
    assert facts["hostname"] == "box"
    assert facts["ifaces"] == ["lo"] and facts["lo_flags"] & 1, "only loopback, and it is up"
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(facts["caps"][key], 16) == 0, key
    assert facts["caps"]["NoNewPrivs"] == "1"
    assert facts["caps"]["Seccomp"] == "2", "seccomp filter mode"
    uid, gid = os.geteuid() or 65534, os.getegid() or 65534
    assert (facts["uid"], facts["gid"]) == (uid, gid)
    # no supplementary group; a single-id map cannot drop them (setgroups is denied), and
    # then the caller's own show as mapped or as the overflow gid
    assert facts["groups"] == [] or (not userns.for_caller().has_root and facts["groups"]), facts
    assert facts["write_usr"] == "EROFS", "the image is read-only"
    if userns.for_caller().has_root:
        assert facts["write_root"] == "EACCES", "the unprivileged user cannot write /"
    else:  # a single-id map has one user, who owns the writable layer's root (a tmpfs)
        assert facts["write_root"] in ("ok", "EACCES")
    mib_written, err = facts["tmp"]
    assert err == "ENOSPC" and mib_written <= 4, "/tmp is capped at its size"
    assert facts["cwd"] == "/" and facts["umask"] == 0o022 and facts["sid"]
    assert facts["fds"] == [0, 1, 2, 3] or facts["fds"] == [0, 1, 2], "no fd of the host leaks in"
    assert facts["proc_sys"] == "EROFS", "/proc/sys is read-only"
    assert facts["keys"] == "", "/proc/keys is masked"
    assert all(line.endswith(":/") for line in facts["cgroup"]), (
        "cgroup namespace roots at the container"
    )


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_memory_cap_kills_and_reason_is_reported() -> None:
    result, out = py(
        "x = bytearray(400 * 1024 * 1024)\nprint('survived')", limits=Limits(memory=64 * MIB)
    )
    assert "survived" not in out
    assert result.oom_killed, result
    assert result.signal == signal.SIGKILL and result.status == 137
    assert result.memory_limit == 64 * MIB
    assert result.memory_peak is not None and result.memory_peak >= 48 * MIB
    assert result.reason().startswith("out of memory (limit 64 MiB, peak ")


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_pids_cap_bounds_fork_bomb_and_container_stays_usable() -> None:
    code = """
    import os, time, errno
    kids = []
    err = None
    for _ in range(200):
        try:
            pid = os.fork()
        except OSError as e:
            err = errno.errorcode[e.errno]
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    print('forked', len(kids), err)
    for k in kids:
        os.kill(k, 9)
        os.waitpid(k, 0)
    print('usable', os.fork() and 'yes')
    """
    result, out = py(code, limits=Limits(pids=20))
    assert result.status == 0, out
    forked = out.split()
    assert forked[0] == "forked" and int(forked[1]) < 20 and forked[2] == "EAGAIN"
    assert "usable yes" in out
    assert result.pids_limit_hit and result.pids_limit == 20


def test_cpu_cap_measured_by_cgroup_accounting() -> None:
    spec = make_spec(
        [PY, "-c", "import time\nt=time.time()+1.5\nwhile time.time()<t: pass"],
        limits=Limits(cpus=0.5),
    )
    with Container.create(spec) as c:
        c.start(stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        c.wait(30)
        wall = time.monotonic() - t0
        used = c.stats().cpu_usage_us / 1e6
    ratio = used / wall
    # The cap is the upper bound; on a loaded 2-core machine the loop may get less than its quota.
    assert 0.05 < ratio < 0.62, f"used {used:.2f} s CPU in {wall:.2f} s wall (cap 0.5)"


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_cpu_cap_can_be_deferred_then_applied() -> None:
    spec = make_spec(["/bin/sleep", "30"], limits=Limits(cpus=0.25, defer_cpu=True))
    with Container.create(spec) as c:
        c.start()
        assert c.stats().cpu_quota_us is None
        c.apply_deferred_cpu()
        assert c.stats().cpu_quota_us == 25_000


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_live_update_of_limits() -> None:
    spec = make_spec(["/bin/sleep", "30"], limits=Limits(memory=128 * MIB, pids=50))
    with Container.create(spec) as c:
        c.start()
        c.update(Limits(memory=256 * MIB, pids=100, cpus=1.5))
        st = c.stats()
        assert (st.memory_limit, st.pids_limit, st.cpu_quota_us) == (256 * MIB, 100, 150_000)


@pytest.mark.parametrize(
    ("command", "status", "code", "sig"),
    [
        (["/bin/sh", "-c", "exit 7"], 7, 7, None),
        (["/bin/true"], 0, 0, None),
        (["/bin/sh", "-c", "kill -TERM $$"], 143, None, 15),
    ],
)
def test_exit_codes_and_signals(
    command: list[str], status: int, code: int | None, sig: int | None
) -> None:
    result, _ = run(command)
    assert (result.status, result.code, result.signal) == (status, code, sig)


def test_missing_command_fails_with_stage() -> None:
    spec = make_spec(["/no/such/program"])
    with Container.create(spec) as c, pytest.raises(RuntimeStartError) as err:
        c.start(stderr=subprocess.DEVNULL)
    assert "exec" in err.value.stage


def test_signals_are_forwarded_to_the_main_process(tmp_path: Path) -> None:
    code = """
    import signal, sys, time
    def handler(signum, frame):
        print('got', signum, flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    print('ready', flush=True)
    time.sleep(30)
    """
    out = tmp_path / "out"
    spec = make_spec([PY, "-u", "-c", textwrap.dedent(code)])
    with open(out, "w+") as f, Container.create(spec) as c:
        c.start(stdout=f)
        deadline = time.time() + 20
        while "ready" not in out.read_text() and time.time() < deadline:
            time.sleep(0.02)
        c.signal(signal.SIGINT)
        result = c.wait(20)
    assert result.code == 3 and "got 2" in out.read_text()


def test_orphans_are_reaped() -> None:
    code = """
    import os, time
    kids = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:
                time.sleep(0.1)
                os._exit(0)   # grandchild outlives its parent: an orphan, reparented to PID 1
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)    # main reaps its own children; init must reap the orphans
    time.sleep(0.5)
    zombies = [p for p in os.listdir('/proc') if p.isdigit() and
               open('/proc/%s/stat' % p).read().rsplit(')', 1)[1].split()[0] == 'Z']
    print('zombies', len(zombies))
    """
    result, out = py(code)
    assert result.status == 0 and "zombies 0" in out, out


def _wait_empty(cg: CgroupHandle, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not cg.pids():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.cgroupv2  # also runs in the cgroup v2 guest (make test-cgroup-v2)
def test_sigkill_of_the_supervisor_leaves_nothing_running() -> None:
    spec = make_spec(["/bin/sh", "-c", "sleep 1000 & sleep 1000 & sleep 1000"])
    with Container.create(spec) as c:
        c.start()
        time.sleep(0.2)
        assert len(c.cgroup.pids()) >= 3
        assert c.pid is not None and c.proc is not None
        os.kill(c.pid, signal.SIGKILL)
        c.proc.wait(5)
        assert _wait_empty(c.cgroup), f"processes survived: {c.cgroup.pids()}"


def test_owner_gone_means_container_gone() -> None:
    spec = make_spec(["/bin/sleep", "1000"])
    with Container.create(spec) as c:
        c.start()
        c._close_control()  # what happens when the owning process dies
        c.wait(5)
        assert _wait_empty(c.cgroup)


def _evil_layer(tmp_path: Path, link_target: str) -> tuple[Path, Path]:
    layer = tmp_path / "layer"
    layer.mkdir()
    for d in ("proc", "dev", "sys", "tmp", "usr", "etc"):
        (layer / d).mkdir()
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", layer / name)
    os.symlink(link_target, layer / "evil")  # absolute symlink naming a host path
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "marker").write_text("volume")
    os.chmod(tmp_path, 0o755)
    return layer, vol


def test_symlink_to_a_host_path_is_refused_not_followed(tmp_path: Path) -> None:
    """CVE-2021-30465 class: a symlink in the image must never redirect a mount to the host."""
    sentinel = tmp_path / "host-sentinel"
    sentinel.mkdir()
    layer, vol = _evil_layer(tmp_path, str(sentinel))
    spec = make_spec(["/bin/true"], layers=(str(layer),), mounts=(Bind(str(vol), "/evil/mnt"),))
    with Container.create(spec) as c, pytest.raises(RuntimeStartError) as err:
        c.start(stderr=subprocess.DEVNULL)
    assert "/evil" in str(err.value)
    assert list(sentinel.iterdir()) == [], "the mount target escaped to the host"


def test_symlink_target_is_resolved_inside_the_root(tmp_path: Path) -> None:
    name = f"sk-test-{os.getpid()}-{time.monotonic_ns()}"
    layer, vol = _evil_layer(tmp_path, "/tmp")  # /tmp inside the root is the container's tmpfs
    result, out = run(
        ["/bin/sh", "-c", f"cat /evil/{name}/marker; cat /tmp/{name}/marker"],
        layers=(str(layer),),
        mounts=(Bind(str(vol), f"/evil/{name}"),),
    )
    assert result.status == 0 and out == "volume" * 2, out
    assert not os.path.exists(f"/tmp/{name}"), "the mount target escaped to the host's /tmp"


def test_image_with_symlinked_proc_is_refused(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "etc").mkdir()
    os.symlink("/etc", layer / "proc")
    spec = make_spec(["/bin/true"], layers=(str(layer),))
    with Container.create(spec) as c, pytest.raises(RuntimeStartError) as err:
        c.start(stderr=subprocess.DEVNULL)
    assert "/proc" in str(err.value)


def test_workdir_and_environment() -> None:
    result, out = run(
        ["/bin/sh", "-c", "pwd; echo $FOO; env | wc -l"],
        workdir="/usr/share",
        env=(("FOO", "bar"),),
    )
    lines = out.split()
    assert result.status == 0 and lines[:2] == ["/usr/share", "bar"]
    assert int(lines[2]) < 12, "only the planned environment reaches the container"


def _fds() -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, already closed
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def test_200_create_destroy_cycles_leave_nothing() -> None:
    before = _fds()
    for _ in range(200):
        spec = make_spec(["/bin/true"])
        with Container.create(spec) as c:
            c.start(stdout=subprocess.DEVNULL)
            assert c.wait(10).status == 0
    after = _fds()
    # no descriptor leaked: none gained (an unrelated one closed meanwhile by the garbage
    # collector is fine), and nothing new points at a pipe, a run dir or a container
    new = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert len(after) <= len(before) and not new, f"leaked descriptors: {new}"
    # host_untouched checks mounts, cgroups and run dirs


def test_gc_removes_crash_leftovers() -> None:
    spec = make_spec(["/bin/sleep", "1000"])
    c = Container.create(spec)
    c.start()
    assert c._status is not None
    crash(c)  # a crashed owner and supervisor
    assert spec.id in collect_leftovers(dry_run=True).run_dirs
    report = collect_leftovers()
    assert spec.id in report.run_dirs and spec.id in report.cgroups
    assert not c.run_dir.exists() and spec.id not in _our_cgroups()
    c._status.close()
    c._close_control()


def test_containers_created_at_once_by_separate_processes_all_run() -> None:
    """Each ``Container.create`` runs gc over the run root, where the others' run dirs are
    being made at that instant: none may take another's (its subfolders then vanish)."""
    code = textwrap.dedent(
        """
        import subprocess, sys
        from tests.privileged.test_runtime import make_spec
        from sandbox_kernel.runtime.container import Container
        conn = (int(sys.argv[1]), int(sys.argv[2]), 0o700)
        for _ in range(4):
            spec = make_spec(["/bin/true"])
            with Container.create(spec, subdirs={"conn": conn}) as c:
                (c.run_dir / "conn" / "kernel.json").write_text("{}")
                c.start(stdout=subprocess.DEVNULL)
                assert c.wait(30).status == 0
        """
    )
    owner = [str(os.geteuid()), str(os.getegid())]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *owner],
            stderr=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        for _ in range(6)
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            errors.append(err[-2000:])
    assert errors == []


def test_cli_run_reports_oom_and_exits_137() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox_kernel",
            "run",
            "--memory",
            "64M",
            "host",
            "--",
            PY,
            "-c",
            "x = bytearray(400 * 1024 * 1024)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 137, proc.stderr
    assert "out of memory (limit 64 MiB, peak" in proc.stderr


def test_cli_run_passes_streams_volume_and_status(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("data from host\n")
    os.chmod(tmp_path, 0o755)  # readable by the container's unprivileged user
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox_kernel",
            "run",
            "-v",
            f"{tmp_path}:/work:ro",
            "-w",
            "/work",
            "host",
            "--",
            "/bin/sh",
            "-c",
            "cat in.txt; read line; echo got $line; exit 5",
        ],
        input="stdin line\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "data from host\ngot stdin line\n"


def test_spec_replace_keeps_validation(tmp_path: Path) -> None:
    spec = replace(make_spec(["/bin/true"]), hostname="Bad_Host")
    with pytest.raises(Exception, match="hostname"):
        Container.create(spec)


def test_status_pipe_works_above_fd_1024() -> None:
    """A server holding many kernels has descriptors above 1024 (select() would fail there)."""
    code = textwrap.dedent(
        """
        import os, resource, subprocess
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        from sandbox_kernel.runtime import hostimage
        from sandbox_kernel.runtime.container import Container
        from sandbox_kernel.paths import new_container_id
        from sandbox_kernel.runtime.spec import ContainerSpec
        from sandbox_kernel.runtime import userns
        spec = userns.for_caller().apply(ContainerSpec(
            id=new_container_id(), layers=(str(hostimage.layer_dir()),),
            command=("/bin/true",), mounts=hostimage.binds(),
            user=os.geteuid() or 65534, group=os.getegid() or 65534))
        with Container.create(spec) as c:
            c.start(stdout=subprocess.DEVNULL)
            print(c._status.fd > 1024, c.wait(10).status)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "0"], out.stderr
