"""The C executor (sk-runtime) against docs/runtime-protocol.md, as root on a real kernel.

Every test builds a plan for a "host-like" root: an empty image layer, the host's /usr and
/etc bound read-only, Debian's usr-merge symlinks, a fresh /proc, a small /dev, a capped /tmp,
and runs it as uid 65534.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sandbox_kernel.errors import RuntimeStartError

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "sandbox_kernel" / "runtime" / "native"
SOURCE = NATIVE / "sk-runtime.c"
BINARY = ROOT / "sandbox_kernel" / "runtime" / "_bin" / "sk-runtime"
# Same flags as the build hook in setup.py and the Makefile.
CFLAGS = (NATIVE / "cflags").read_text().split()
NOBODY = 65534
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
TMP_SIZE = 1 << 20


# --------------------------------------------------------------------------- helpers


def enc(value: str | bytes) -> str:
    """Percent-encode one plan field (protocol: %, space, control bytes, DEL; empty is %-)."""
    raw = value.encode() if isinstance(value, str) else value
    if not raw:
        return "%-"
    out = []
    for b in raw:
        if b in (0x25, 0x20) or b < 0x20 or b == 0x7F:
            out.append(f"%{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def dec(field_: str) -> str:
    if field_ == "%-":
        return ""
    out = bytearray()
    i = 0
    while i < len(field_):
        if field_[i] == "%":
            out.append(int(field_[i + 1 : i + 3], 16))
            i += 3
        else:
            out += field_[i].encode()
            i += 1
    return out.decode(errors="replace")


@dataclass
class Plan:
    records: list[str] = field(default_factory=list)

    def add(self, keyword: str, *fields: str | bytes | int) -> Plan:
        self.records.append(
            " ".join([keyword, *(enc(str(f) if isinstance(f, int) else f) for f in fields)])
        )
        return self

    def text(self) -> str:
        return "sk-runtime-plan 1\n" + "".join(r + "\n" for r in self.records)

    def write(self, path: Path) -> Path:
        path.write_text(self.text())
        return path


def host_like_plan(
    tmp: Path,
    argv: Sequence[str],
    *,
    cid: str = "t",
    hostname: str = "sk-test",
    extra: Sequence[tuple[str, ...]] = (),
    env: Sequence[str] = (),
    user: tuple[int, int] | None = (NOBODY, NOBODY),
    cwd: str = "/tmp",
    namespaces: str = "mount,pid,uts,ipc,net",
    pre_proc: Sequence[tuple[str, ...]] = (),
) -> Plan:
    """A plan for a root made of an empty image layer plus the host's /usr and /etc.

    EXTRA records are inserted just before `pivot`; PRE_PROC right after `rootfs`.
    """
    lower = tmp / "lower"
    lower.mkdir(exist_ok=True)
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    p = Plan()
    p.add("id", cid)
    p.add("namespaces", namespaces)
    p.add("hostname", hostname)
    p.add("scratch", str(scratch), 16 << 20, 4096)
    p.add("rootfs", str(lower))
    for rec in pre_proc:
        p.add(*rec)
    p.add("mkdir", "/usr", "0755")
    p.add("mkdir", "/etc", "0755")
    for name in ("bin", "sbin", "lib", "lib64"):  # Debian 12 usr-merge
        p.add("symlink", f"usr/{name}", f"/{name}")
    p.add("bind", "/usr", "/usr", "rec,ro,nosuid,nodev")
    p.add("bind", "/etc", "/etc", "ro,nosuid,nodev")
    p.add("realdir", "/usr")
    p.add("mkdir", "/proc", "0555")
    p.add("realdir", "/proc")
    p.add("mount", "proc", "proc", "/proc", "nosuid,nodev,noexec", "-")
    p.add("mkdir", "/dev", "0755")
    p.add("mount", "tmpfs", "tmpfs", "/dev", "nosuid,noexec", "mode=0755,size=65536")
    for node in DEV_NODES:
        p.add("touch", f"/dev/{node}", "0666")
        p.add("bind", f"/dev/{node}", f"/dev/{node}", "nosuid,noexec")
    p.add("symlink", "/proc/self/fd", "/dev/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        p.add("symlink", f"/proc/self/fd/{i}", f"/dev/{name}")
    p.add("mkdir", "/dev/pts", "0755")
    p.add(
        "mount",
        "devpts",
        "devpts",
        "/dev/pts",
        "nosuid,noexec",
        "newinstance,ptmxmode=0666,mode=0620",
    )
    p.add("symlink", "pts/ptmx", "/dev/ptmx")
    p.add("mkdir", "/dev/shm", "1777")
    p.add("mount", "tmpfs", "shm", "/dev/shm", "nosuid,nodev,noexec", "mode=1777,size=1048576")
    p.add("mkdir", "/tmp", "1777")
    p.add("mount", "tmpfs", "tmpfs", "/tmp", "nosuid,nodev", f"mode=1777,size={TMP_SIZE}")
    p.add("file", "/etc-hosts-unused", "0644", "127.0.0.1 localhost\n")
    for path in (
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/acpi",
        "/proc/scsi",
    ):
        p.add("mask", path)
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"):
        p.add("readonly", path)
    for rec in extra:
        p.add(*rec)
    p.add("remount", "/dev", "ro")
    p.add("pivot")
    p.add("env", "PATH=/usr/local/bin:/usr/bin:/bin")
    p.add("env", "HOME=/tmp")
    for e in env:
        p.add("env", e)
    p.add("cwd", cwd)
    if user is not None:
        p.add("user", *user)
    p.add("umask", "022")
    p.add("rlimit", "core", "0", "0")
    p.add("nonewprivs", "1")
    for a in argv:
        p.add("argv", a)
    return p


@dataclass
class Result:
    rc: int
    status: list[str]
    stdout: str
    stderr: str

    def line(self, kind: str) -> list[str] | None:
        for s in self.status:
            parts = s.split(" ")
            if parts[0] == kind:
                return [dec(x) for x in parts[1:]]
        return None


class Running:
    """A started sk-runtime with its status pipe (and control pipe)."""

    def __init__(
        self,
        plan_path: Path,
        *,
        control: bool = False,
        extra_fds: Sequence[int] = (),
        stdout: int = subprocess.PIPE,
    ) -> None:
        self.status_r, status_w = os.pipe()
        fds = [status_w, *extra_fds]
        args = [str(BINARY), "--status-fd", str(status_w)]
        self.control_w = None
        control_r = None
        if control:
            control_r, self.control_w = os.pipe()
            fds.append(control_r)
            args += ["--control-fd", str(control_r)]
        self.proc = subprocess.Popen(
            [*args, str(plan_path)],
            pass_fds=fds,
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        _STARTED.append(self.proc.pid)
        os.close(status_w)
        if control_r is not None:
            os.close(control_r)
        self._buf = b""
        self.status: list[str] = []

    def read_status(self, timeout: float = 10.0) -> str | None:
        """Next status line, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no status line")
            r, _, _ = select.select([self.status_r], [], [], left)
            if not r:
                continue
            chunk = os.read(self.status_r, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        if text.startswith("child "):
            _STARTED.append(int(text.split(" ")[1]))
        self.status.append(text)
        return text

    def wait_for(self, kind: str, timeout: float = 10.0) -> list[str]:
        while True:
            line = self.read_status(timeout)
            if line is None:
                raise AssertionError(f"no {kind!r} line; got {self.status}")
            if line.split(" ")[0] == kind:
                return line.split(" ")[1:]

    def finish(self, timeout: float = 20.0) -> Result:
        out, err = self.proc.communicate(timeout=timeout)
        while self.read_status(timeout) is not None:
            pass
        os.close(self.status_r)
        if self.control_w is not None:
            os.close(self.control_w)
        return Result(
            self.proc.returncode,
            self.status,
            (out or b"").decode(errors="replace"),
            err.decode(errors="replace"),
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def run_plan(plan: Plan, tmp: Path, timeout: float = 20.0, **kw: object) -> Result:
    r = Running(plan.write(tmp / "plan"), **kw)  # type: ignore[arg-type]
    try:
        return r.finish(timeout)
    finally:
        r.kill()


def run_sh(tmp: Path, script: str, **kw: object) -> Result:
    return run_plan(host_like_plan(tmp, ["sh", "-c", script], **kw), tmp)  # type: ignore[arg-type]


def pids_with_marker(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def wait_gone(pids: Sequence[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()]
        if alive:
            time.sleep(0.02)
    return alive


def wait_marker(marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pids_with_marker(marker)
        if pids:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"no process with marker {marker}")


def mount_lines() -> list[str]:
    # mount ids and the optional fields can change for unrelated reasons; compare
    # mount point, root and source
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split(" ")
        sep = parts.index("-")
        lines.append(" ".join([parts[3], parts[4], *parts[sep + 1 : sep + 3]]))
    return sorted(lines)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runtime() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", str(BINARY), str(SOURCE)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr, proc.stderr
    return BINARY


# Host processes started by this module: supervisors and their inits. Other suites may
# run the same binary concurrently, so leftovers are checked by pid, not by name.
_STARTED: list[int] = []

# Host paths a plan here may mount on (if a mount escaped the container's namespace).
_WATCHED = {
    "/usr",
    "/etc",
    "/proc",
    "/dev",
    "/tmp",
    "/root",
    "/lib",
    "/bin",
    "/sys",
    "/dev/pts",
    "/dev/shm",
    "/proc/sys",
    *(f"/dev/{n}" for n in DEV_NODES),
}


def _our_mounts(lines: Sequence[str], tmp: Path) -> list[str]:
    out = []
    for line in lines:
        mountpoint = line.split(" ")[1]
        if mountpoint in _WATCHED or mountpoint.startswith(str(tmp)) or "sk-userns-" in mountpoint:
            out.append(line)
    return out


@pytest.fixture(autouse=True)
def no_host_leftovers(runtime: Path, tmp_path: Path) -> Iterator[None]:
    """Nothing mounted on the host, no executor process left behind."""
    before = mount_lines()
    _STARTED.clear()
    yield
    assert wait_gone(list(_STARTED), 5.0) == []
    after = mount_lines()
    new = [line for line in after if line not in before]
    assert _our_mounts(new, tmp_path) == [], new


# --------------------------------------------------------------------------- tests


def test_compiles_without_warnings(tmp_path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    proc = subprocess.run(
        [cc, *CFLAGS, "-o", str(tmp_path / "sk"), str(SOURCE)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_code_passes_through(tmp_path: Path, code: int) -> None:
    r = run_sh(tmp_path, f"exit {code}")
    assert r.rc == code, r
    assert r.line("exit") == ["code", str(code)]
    assert r.status[0].startswith("child ")
    assert r.line("exec") is not None


def test_exit_signal_for_self_killed_main(tmp_path: Path) -> None:
    r = run_sh(tmp_path, "kill -SEGV $$")
    assert r.line("exit") == ["signal", str(int(signal.SIGSEGV))], r
    assert r.rc == 128 + signal.SIGSEGV


def test_setup_time_reported(tmp_path: Path) -> None:
    times = []
    for _ in range(10):
        r = run_plan(host_like_plan(tmp_path, ["/bin/true"]), tmp_path)
        assert r.rc == 0, r
        exec_line = r.line("exec")
        assert exec_line is not None
        times.append(int(exec_line[0]))
    print(f"\nsetup time (us) median {statistics.median(times)} min {min(times)}: {times}")
    assert all(t > 0 for t in times)


def test_pid1_is_init_and_only_container_processes(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "echo self $$; for p in /proc/[0-9]*; do echo pid ${p#/proc/}; done;"
        " echo comm $(cat /proc/1/comm); tr '\\0' '|' < /proc/1/cmdline; echo",
    )
    assert r.rc == 0, r
    pids = {int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("pid ")}
    assert 1 in pids
    assert "self 2" in r.stdout  # main is the first child of init
    assert max(pids) < 20, pids  # no host process is visible
    assert "comm sk-runtime" in r.stdout  # PID 1 is the executor's init
    # ... whose argv (the executor's host path, the plan's path in the run dir) is not shown
    assert r.stdout.splitlines()[-1] == "sk-init|", r.stdout


def test_hostname_and_network(tmp_path: Path) -> None:
    r = run_sh(tmp_path, "cat /proc/sys/kernel/hostname; cat /proc/net/dev", hostname="box-1")
    assert r.rc == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "box-1"
    ifaces = [line.split(":")[0].strip() for line in lines[3:] if ":" in line]
    assert ifaces == ["lo"]


def test_capabilities_identity_and_nonewprivs(tmp_path: Path) -> None:
    r = run_sh(tmp_path, "id -u; id -g; id -G; grep -E '^(Cap|NoNewPrivs)' /proc/self/status")
    assert r.rc == 0, r
    lines = r.stdout.splitlines()
    assert lines[0:3] == ["65534", "65534", "65534"]
    status = dict(line.split(":\t") for line in lines[3:])
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert status["NoNewPrivs"] == "1"


def test_kept_capability_for_root_user(tmp_path: Path) -> None:
    plan = host_like_plan(
        tmp_path, ["sh", "-c", "grep -E '^Cap(Eff|Bnd|Amb)' /proc/self/status"], user=(1000, 1000)
    )
    plan.records.insert(-3, "capabilities CAP_NET_BIND_SERVICE")
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    for line in r.stdout.splitlines():
        assert int(line.split("\t")[1], 16) == 1 << 10, line


def test_image_readonly_where_bound_ro_and_root_writable_only_by_root(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "touch /etc/sk-probe 2>&1; touch /usr/sk-probe 2>&1; touch /sk-probe 2>&1;"
        " echo x > /tmp/ok && echo tmp-ok",
    )
    assert r.rc == 0, r
    assert r.stdout.count("Read-only file system") == 2, r.stdout
    assert "Permission denied" in r.stdout
    assert "tmp-ok" in r.stdout
    assert not Path("/etc/sk-probe").exists()


def test_masks_and_readonly_paths(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "cat /proc/keys | wc -c; ls /proc/acpi 2>/dev/null | wc -l;"
        " echo 1 > /proc/sysrq-trigger 2>&1 || echo denied;"
        " grep ' /proc/sys ' /proc/self/mounts",
    )
    assert r.rc == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "0"
    assert lines[1] == "0"
    assert "denied" in r.stdout
    assert " ro," in r.stdout.splitlines()[-1]


def test_tmp_is_size_capped(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        f"dd if=/dev/zero of=/tmp/big bs=65536 count={2 * TMP_SIZE // 65536} 2>&1; echo rc=$?",
    )
    assert "No space left on device" in r.stdout, r
    assert "rc=1" in r.stdout


def test_dev_is_minimal_and_works(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "ls /dev | sort | tr '\\n' ' '; echo; head -c 4 /dev/urandom | wc -c;"
        " echo hi > /dev/null && echo null-ok; touch /dev/sk 2>/dev/null || echo ro-dev",
    )
    assert r.rc == 0, r
    names = r.stdout.splitlines()[0].split()
    assert set(names) == {*DEV_NODES, "fd", "stdin", "stdout", "stderr", "pts", "ptmx", "shm"}
    assert "4" in r.stdout and "null-ok" in r.stdout and "ro-dev" in r.stdout


def test_no_fd_above_2_in_main(tmp_path: Path) -> None:
    # an fd of the owner that is not close-on-exec must not survive either
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    marker = f"{time.monotonic_ns() % 10**9}.25"
    plan = host_like_plan(tmp_path, ["sleep", marker])
    run = Running(plan.write(tmp_path / "plan"), extra_fds=[leak_r], control=True)
    try:
        run.wait_for("exec")
        (pid,) = wait_marker(marker)
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
        os.kill(run.proc.pid, signal.SIGTERM)
        res = run.finish()
        assert res.line("exit") == ["signal", str(int(signal.SIGTERM))]
    finally:
        run.kill()
        os.close(leak_r)
        os.close(leak_w)


def test_sigterm_is_forwarded_to_main(tmp_path: Path) -> None:
    plan = host_like_plan(
        tmp_path,
        ["sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"],
    )
    run = Running(plan.write(tmp_path / "plan"))
    try:
        assert run.proc.stdout is not None
        assert run.proc.stdout.readline() == b"ready\n"
        run.proc.send_signal(signal.SIGTERM)
        res = run.finish()
        assert res.rc == 7, res
        assert "got-term" in res.stdout
        assert res.line("exit") == ["code", "7"]
    finally:
        run.kill()


@pytest.mark.parametrize("sig", ["INT", "HUP", "QUIT", "USR1", "USR2"])
def test_other_signals_are_forwarded_to_main(tmp_path: Path, sig: str) -> None:
    script = f"trap 'echo got-{sig}; exit 9' {sig}; echo ready; while :; do sleep 0.05; done"
    plan = host_like_plan(tmp_path, ["sh", "-c", script])
    run = Running(plan.write(tmp_path / "plan"))
    try:
        assert run.proc.stdout is not None
        assert run.proc.stdout.readline() == b"ready\n"
        run.proc.send_signal(getattr(signal, f"SIG{sig}"))
        res = run.finish()
        assert res.rc == 9 and f"got-{sig}" in res.stdout, res
    finally:
        run.kill()


def test_control_fd_eof_while_waiting_for_go(tmp_path: Path) -> None:
    plan = host_like_plan(tmp_path, ["true"])
    plan.records.insert(0, "sync net")
    run = Running(plan.write(tmp_path / "plan"), control=True)
    try:
        init_pid = int(run.wait_for("netns")[0])
        assert run.control_w is not None
        os.close(run.control_w)
        run.control_w = None
        assert run.proc.wait(5) == 137
        assert wait_gone([init_pid]) == []
        res = run.finish()
        assert res.line("exec") is None
    finally:
        run.kill()


def test_supervisor_sigkill_leaves_nothing(tmp_path: Path) -> None:
    marker = f"{time.monotonic_ns() % 10**9}.5"
    plan = host_like_plan(tmp_path, ["sh", "-c", f"sleep {marker} & sleep {marker}1; wait"])
    run = Running(plan.write(tmp_path / "plan"))
    try:
        init_pid = int(run.wait_for("child")[0])
        pids = wait_marker(marker)
        while len(pids) < 2:
            pids = wait_marker(marker)
        run.proc.kill()
        run.proc.wait(5)
        assert wait_gone([init_pid, *pids]) == []
    finally:
        run.kill()
        run.finish()


def test_control_fd_eof_kills_container(tmp_path: Path) -> None:
    marker = f"{time.monotonic_ns() % 10**9}.75"
    plan = host_like_plan(tmp_path, ["sleep", marker])
    run = Running(plan.write(tmp_path / "plan"), control=True)
    try:
        init_pid = int(run.wait_for("child")[0])
        run.wait_for("exec")
        pids = wait_marker(marker)
        assert run.control_w is not None
        os.close(run.control_w)
        run.control_w = None
        assert run.proc.wait(5) == 137
        assert wait_gone([init_pid, *pids]) == []
        res = run.finish()
        assert res.line("exit") == ["signal", "9"]
    finally:
        run.kill()


def test_orphans_are_reaped(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "(sleep 0.1 &) ; (sleep 0.1 &); sleep 0.6;"
        " cat /proc/[0-9]*/stat 2>/dev/null | awk '{print $1, $3}'",
    )
    assert r.rc == 0, r
    states = [line.split()[1] for line in r.stdout.splitlines()]
    assert states and "Z" not in states, r.stdout


def test_background_processes_die_with_main(tmp_path: Path) -> None:
    marker = f"{time.monotonic_ns() % 10**9}.125"
    r = run_sh(tmp_path, f"sleep {marker} & exit 0")
    assert r.rc == 0
    assert wait_gone(pids_with_marker(marker), 2.0) == []


def test_symlink_in_image_cannot_redirect_a_mount_to_the_host(tmp_path: Path) -> None:
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("inside")
    lower = tmp_path / "lower"
    lower.mkdir()
    os.symlink(str(hostdir), lower / "link")  # absolute host path
    os.symlink("/root", lower / "target")
    before = sorted(os.listdir("/root"))

    # 1) the link resolves inside the root: the bind lands on <root>/<hostdir>
    plan = host_like_plan(
        tmp_path,
        ["sh", "-c", "cat /link/marker; cat " + str(hostdir) + "/marker"],
        extra=[("mkdir", str(hostdir), "0755"), ("bind", str(src), "/link", "-")],
    )
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    assert r.stdout == "insideinside"
    assert os.listdir(hostdir) == []

    # 2) /root does not exist inside the root: the mount fails instead of hitting the host
    for rec in (
        ("bind", str(src), "/target", "-"),
        ("mount", "tmpfs", "tmpfs", "/target", "-", "size=4096"),
    ):
        plan = host_like_plan(tmp_path, ["true"], extra=[rec])
        r = run_plan(plan, tmp_path)
        assert r.rc == 125, r
        assert r.line("error") is not None
        assert sorted(os.listdir("/root")) == before


def test_magic_links_refused_as_mount_target(tmp_path: Path) -> None:
    plan = host_like_plan(
        tmp_path, ["true"], extra=[("mount", "tmpfs", "tmpfs", "/proc/1/root", "-", "size=4096")]
    )
    r = run_plan(plan, tmp_path)
    assert r.rc == 125, r
    err = r.line("error")
    assert err is not None and err[0] == "mount /proc/1/root"


def test_realdir_refuses_symlinked_proc(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "elsewhere").mkdir()
    os.symlink("elsewhere", lower / "proc")
    r = run_plan(host_like_plan(tmp_path, ["true"]), tmp_path)
    assert r.rc == 125, r
    err = r.line("error")
    assert err is not None
    assert err[0] == "realdir /proc"
    assert err[2] == "image path /proc is not a real directory"
    assert "sk-runtime: t: realdir /proc: image path /proc is not a real directory" in r.stderr


def test_file_refuses_symlink_and_writes_content(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("host")
    os.symlink(str(victim), lower / "evil")
    content = "a b\n%c\x01\n"
    plan = host_like_plan(
        tmp_path,
        ["cat", "/etc2/f"],
        pre_proc=[("mkdir", "/etc2", "0755"), ("file", "/etc2/f", "0644", content)],
    )
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    assert r.stdout == content
    plan = host_like_plan(tmp_path, ["true"], pre_proc=[("file", "/evil", "0644", "pwned")])
    r = run_plan(plan, tmp_path)
    assert r.rc == 125, r
    assert victim.read_text() == "host"


def test_cwd_and_umask_and_env(tmp_path: Path) -> None:
    r = run_sh(
        tmp_path,
        "pwd; umask; echo $FOO; env | sort | tr '\\n' ,",
        env=["FOO=a b%c"],
        cwd="/dev/shm",
    )
    assert r.rc == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "/dev/shm"
    assert lines[1] == "0022"
    assert lines[2] == "a b%c"
    # nothing inherited but what the plan says (sh adds PWD)
    assert set(lines[3].strip(",").split(",")) <= {
        "FOO=a b%c",
        "HOME=/tmp",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "PWD=/dev/shm",
    }


def test_command_not_found_and_not_executable(tmp_path: Path) -> None:
    r = run_plan(host_like_plan(tmp_path, ["no-such-command-xyz"]), tmp_path)
    assert r.rc == 127, r
    err = r.line("error")
    assert err is not None and err[0] == "exec no-such-command-xyz" and err[1] == "2"
    r = run_plan(host_like_plan(tmp_path, ["/etc/passwd"]), tmp_path)
    assert r.rc == 126, r
    err = r.line("error")
    assert err is not None and err[1] == "13"
    assert r.line("exit") is None


def test_netlink_requests_are_sent_in_the_containers_namespace(tmp_path: Path) -> None:
    """Init sends each `netlink` request in the container's network namespace and reports
    the kernel's reply: loopback comes up there (not on the host); a request the kernel
    refuses (no such link) comes back as an error reply the owner decodes."""
    from sandbox_kernel.runtime import netns

    probe = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
        "socket.create_connection(s.getsockname(), timeout=5); print('lo up')"
    )
    plan = host_like_plan(tmp_path, ["/usr/bin/python3", "-c", probe])
    plan.records.insert(0, f"netlink {netns.loopback_request()}")
    plan.records.insert(1, f"netlink {netns.link_up_request('sk-nosuch0')}")
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    replies = [s.split(" ")[1] for s in r.status if s.startswith("netlink ")]
    assert len(replies) == 2
    netns.check_reply(replies[0])  # lo: acked
    with pytest.raises(RuntimeStartError) as err:
        netns.check_reply(replies[1])
    assert err.value.stage == "network" and err.value.errno == errno.ENODEV
    assert r.stdout.strip() == "lo up", "loopback works inside"
    assert [s for s in r.status if s.startswith("exec")], r


def test_sync_net_waits_for_go(tmp_path: Path) -> None:
    plan = host_like_plan(tmp_path, ["cat", "/proc/net/dev"])
    plan.records.insert(0, "sync net")
    run = Running(plan.write(tmp_path / "plan"), control=True)
    try:
        child = run.wait_for("child")
        netns = run.wait_for("netns")
        assert netns == child
        # the container waits: no exec line yet
        r, _, _ = select.select([run.status_r], [], [], 0.3)
        assert not r
        assert os.readlink(f"/proc/{netns[0]}/ns/net") != os.readlink("/proc/self/ns/net")
        assert run.control_w is not None
        os.write(run.control_w, b"go\n")
        run.wait_for("exec")
        res = run.finish()
        assert res.rc == 0, res
    finally:
        run.kill()


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("bogus x\n", 2),
        ("id\n", 2),
        ("id a b\n", 2),
        ("id a%4\n", 2),
        ("id a%zz\n", 2),
        ("id a%-b\n", 2),
        ("id a\nid b\n", 3),
        ("id a\n\nid b\n", 3),
        ("id a  b\n", 2),
        ("id a\tb\n", 2),
        ("namespaces mount,uts\n", 2),
        ("namespaces mount,pid,bogus\n", 2),
        ("mkdir /x 0755\n", 2),
        ("env NOEQUALS\n", 2),
        ("rlimit bogus 1 1\n", 2),
        ("capabilities CAP_BOGUS\n", 2),
        ("id " + "a" * (1 << 20 + 1) + "\n", 2),
    ],
)
def test_malformed_plans_are_rejected(tmp_path: Path, body: str, line: int) -> None:
    path = tmp_path / "plan"
    path.write_text("sk-runtime-plan 1\n" + body + "namespaces mount,pid\nargv true\n")
    run = Running(path)
    try:
        res = run.finish()
    finally:
        run.kill()
    assert res.rc == 125, res
    err = res.line("error")
    assert err is not None, res
    assert err[0] == f"plan {line}", err
    assert res.stderr.startswith("sk-runtime: "), res.stderr
    assert res.line("child") is None


def test_plan_header_and_missing_records(tmp_path: Path) -> None:
    for text in (
        "",
        "sk-runtime-plan 2\n",
        "namespaces mount,pid\n",
        "sk-runtime-plan 1\nnamespaces mount,pid\n",
        "sk-runtime-plan 1\nargv true\n",
    ):
        path = tmp_path / "plan"
        path.write_text(text)
        res = Running(path).finish()
        assert res.rc == 125, (text, res)
        assert res.line("error") is not None


def test_env_values_never_in_messages(tmp_path: Path) -> None:
    secret = "s3cr3t-value"
    plan = host_like_plan(tmp_path, ["no-such-command-xyz"], env=[f"TOKEN={secret}"])
    r = run_plan(plan, tmp_path)
    assert r.rc == 127
    assert secret not in r.stderr and secret not in "\n".join(r.status)


def test_supervisor_rss_is_small(tmp_path: Path) -> None:
    plan = host_like_plan(tmp_path, ["sleep", "5"])
    run = Running(plan.write(tmp_path / "plan"))
    try:
        run.wait_for("exec")
        status = Path(f"/proc/{run.proc.pid}/status").read_text()
        rss_kb = int(
            next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
        )
        print(f"\nsupervisor VmRSS {rss_kb} kB")
        assert rss_kb < 2048
        run.proc.send_signal(signal.SIGTERM)
        res = run.finish()
        assert res.rc == 128 + signal.SIGTERM
    finally:
        run.kill()


def test_init_killed_reports_its_signal(tmp_path: Path) -> None:
    marker = f"{time.monotonic_ns() % 10**9}.375"
    run = Running(host_like_plan(tmp_path, ["sleep", marker]).write(tmp_path / "plan"))
    try:
        init_pid = int(run.wait_for("child")[0])
        run.wait_for("exec")
        pids = wait_marker(marker)
        os.kill(init_pid, signal.SIGKILL)
        res = run.finish()
        assert res.line("exit") == ["signal", "9"], res
        assert res.rc == 137
        assert wait_gone(pids) == []
    finally:
        run.kill()


@pytest.fixture
def userns_base() -> Iterator[Path]:
    import tempfile

    # pytest's tmp dirs are 0700: the mapped root (host uid 200000) could not reach them
    base = Path(tempfile.mkdtemp(prefix="sk-userns-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


def userns_plan(base: Path, argv: Sequence[str]) -> Plan:
    plan = host_like_plan(base, argv, namespaces="mount,pid,uts,ipc,net,user")
    plan.records.insert(2, "uidmap 0 200000 65536")
    plan.records.insert(3, "gidmap 0 200000 65536")
    return plan


def test_user_namespace_supervisor_sigkill_leaves_nothing(userns_base: Path) -> None:
    # becoming root of the user namespace clears PDEATHSIG: init must re-arm it
    marker = f"{time.monotonic_ns() % 10**9}.625"
    run = Running(userns_plan(userns_base, ["sleep", marker]).write(userns_base / "plan"))
    try:
        init_pid = int(run.wait_for("child")[0])
        run.wait_for("exec")
        pids = wait_marker(marker)
        run.proc.kill()
        run.proc.wait(5)
        assert wait_gone([init_pid, *pids]) == []
    finally:
        run.kill()
        run.finish()


def test_user_namespace_maps(userns_base: Path) -> None:
    base = userns_base
    if True:
        plan = userns_plan(base, ["sh", "-c", "id -u; cat /proc/self/uid_map; stat -c %u /"])
        r = run_plan(plan, base)
        assert r.rc == 0, r
        lines = r.stdout.split()
        assert lines[0] == "65534"
        assert lines[1:4] == ["0", "200000", "65536"]
        assert lines[4] == "0"  # the root directory belongs to the container's root
        assert os.listdir(base / "scratch") == []


def test_cgroup_is_joined_before_unsharing(tmp_path: Path) -> None:
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy")
    cg = base / f"sk-exec-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "pids.max").write_text("32")
        plan = host_like_plan(tmp_path, ["sh", "-c", "grep pids /proc/self/cgroup"])
        plan.records.insert(1, f"cgroup {enc(str(cg))}")
        r = run_plan(plan, tmp_path)
        assert r.rc == 0, r
        assert r.stdout.strip().endswith(f":/{cg.name}"), r.stdout
        plan = host_like_plan(
            tmp_path,
            ["sh", "-c", "grep pids /proc/self/cgroup"],
            namespaces="mount,pid,uts,ipc,net,cgroup",
        )
        plan.records.insert(1, f"cgroup {enc(str(cg))}")
        r = run_plan(plan, tmp_path)
        assert r.rc == 0, r
        assert r.stdout.strip().endswith(":/"), r.stdout
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _seccomp_filter_denying_mkdir() -> bytes:
    import struct

    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    prog = [
        (ld_abs, 0, 0, 4),  # arch
        (jeq, 0, 4, 0xC000003E),  # not x86_64: allow everything
        (ld_abs, 0, 0, 0),  # syscall number
        (jeq, 1, 0, 83),  # mkdir
        (jeq, 0, 1, 258),  # mkdirat
        (ret, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
        (ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def test_seccomp_filter_is_loaded_last(tmp_path: Path) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("filter written for x86_64")
    filt = tmp_path / "filter.bpf"
    filt.write_bytes(_seccomp_filter_denying_mkdir())
    plan = host_like_plan(
        tmp_path,
        [
            "sh",
            "-c",
            "mkdir /tmp/d 2>&1; touch /tmp/f && echo touched; grep Seccomp: /proc/self/status",
        ],
    )
    plan.records.insert(1, f"seccomp {enc(str(filt))}")
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    assert "Operation not permitted" in r.stdout
    assert "touched" in r.stdout
    assert "Seccomp:\t2" in r.stdout
    filt.write_bytes(b"\0" * 12)
    r = run_plan(plan, tmp_path)
    assert r.rc == 125 and r.line("error") is not None, r
    assert r.line("child") is None


def test_stdio_passes_through_even_when_status_goes_to_stderr(tmp_path: Path) -> None:
    plan = host_like_plan(tmp_path, ["sh", "-c", "read x; echo out-$x; echo err-$x >&2"])
    proc = subprocess.run(
        [str(BINARY), "--status-fd", "2", str(plan.write(tmp_path / "plan"))],
        input=b"42\n",
        capture_output=True,
        timeout=20,
    )
    _STARTED.append(int(proc.stderr.split(b"\n")[0].split(b" ")[1]))
    assert proc.returncode == 0, proc
    assert proc.stdout == b"out-42\n"
    err = proc.stderr.decode().splitlines()
    assert "err-42" in err
    assert err[0].startswith("child ") and err[-1] == "exit code 0"


def test_readonly_root(tmp_path: Path) -> None:
    plan = host_like_plan(
        tmp_path,
        ["sh", "-c", "touch /x 2>&1; touch /tmp/y && echo tmp-ok"],
        user=None,
        extra=[("readonly", "/")],
    )
    r = run_plan(plan, tmp_path)
    assert r.rc == 0, r
    assert "Read-only file system" in r.stdout and "tmp-ok" in r.stdout


def test_idmapped_bind_keeps_the_disk_owner(userns_base: Path) -> None:
    """Root mode with a user namespace: container uid 1000 is host 201000, yet through an
    idmapped bind it sees (and writes) the folder's on-disk owner 1000; container root, which
    the bind map leaves out, cannot create files there."""
    folder = userns_base / "nb"
    folder.mkdir()
    os.chown(folder, 1000, 1000)
    script = (
        "stat -c %u:%g /nb; echo hi > /nb/made-by-kernel && echo wrote; "
        "stat -c %u /nb/made-by-kernel"
    )
    plan = userns_plan(userns_base, ["sh", "-c", script])
    plan.records.insert(4, "bindmap 1000 201000 1")
    i = next(i for i, r in enumerate(plan.records) if r.startswith("pivot"))
    plan.records[i:i] = ["mkdir /nb 0755", f"bind {enc(str(folder))} /nb idmap,nosuid,nodev"]
    plan.records = [r for r in plan.records if not r.startswith("user ")] + ["user 1000 1000"]
    r = run_plan(plan, userns_base)
    assert r.rc == 0, r
    assert r.stdout.split() == ["1000:1000", "wrote", "1000"]
    assert (folder / "made-by-kernel").stat().st_uid == 1000  # the disk owner, not 201000
    # container root has no id in the bind's map: it cannot write there
    keep = [r for r in plan.records if not r.startswith(("user ", "argv "))]
    plan.records = [*keep, "user 0 0", "argv sh", "argv -c"]
    plan.records.append(f"argv {enc('touch /nb/by-root || echo refused')}")
    r = run_plan(plan, userns_base)
    assert "refused" in r.stdout and not (folder / "by-root").exists(), r


def test_idmapped_layers_show_the_image_owners(userns_base: Path) -> None:
    """lowermap: image layers owned by host root appear owned by container root (not by the
    overflow uid) in a user namespace whose root is an unprivileged host uid."""
    lower = userns_base / "lower"
    lower.mkdir(exist_ok=True)
    (lower / "owned-by-root").write_text("x")
    plan = userns_plan(userns_base, ["stat", "-c", "%u", "/owned-by-root"])
    r = run_plan(plan, userns_base)
    assert r.rc == 0 and r.stdout.strip() == "65534", r  # unmapped: the overflow uid
    plan.records.insert(4, "lowermap 0 200000 65536")
    r = run_plan(plan, userns_base)
    assert r.rc == 0 and r.stdout.strip() == "0", r


def test_nouserns_denies_nested_user_namespaces(userns_base: Path) -> None:
    before = Path("/proc/sys/user/max_user_namespaces").read_text()
    plan = userns_plan(userns_base, ["cat", "/proc/sys/user/max_user_namespaces"])
    plan.records.insert(4, "nouserns")
    r = run_plan(plan, userns_base)
    assert r.rc == 0 and r.stdout.strip() == "0", r
    assert Path("/proc/sys/user/max_user_namespaces").read_text() == before  # host untouched


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (["nouserns"], "need the user namespace"),
        (["bindmap 0 1000 1"], "need the user namespace"),
        (["idmap-helper /usr/bin/newuidmap /usr/bin/newgidmap"], "need the user namespace"),
    ],
)
def test_user_namespace_records_need_the_namespace(
    tmp_path: Path, records: list[str], message: str
) -> None:
    plan = host_like_plan(tmp_path, ["true"])
    plan.records[2:2] = records
    r = run_plan(plan, tmp_path)
    assert r.rc == 125 and message in r.stderr, r


def test_opaque_directories_hold_in_a_user_namespace(userns_base: Path) -> None:
    """Overlay in a user namespace reads user.overlay.* xattrs (userxattr): a layer's opaque
    directory still hides what the layers below hold there."""
    low, top = userns_base / "lower", userns_base / "top"
    (low / "d" / "hidden").mkdir(parents=True, exist_ok=True)
    (top / "d").mkdir(parents=True)
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        os.setxattr(top / "d", name, b"y")
    plan = userns_plan(userns_base, ["ls", "-A", "/d"])
    rootfs = next(i for i, r in enumerate(plan.records) if r.startswith("rootfs "))
    plan.records[rootfs] = f"rootfs {enc(f'{top}:{low}')}"
    r = run_plan(plan, userns_base)
    assert r.rc == 0 and r.stdout.strip() == "", r
