"""Container lifecycle: create, start, signal, wait, update, stats, destroy.

Layer: runtime (OS side). Its owners are the provisioner (one per kernel start),
``sandbox-kernel run`` and the image builder.

Python plans (spec -> validators -> plan); the executor ``sk-runtime`` executes and
supervises. No Python process stays per container: the owner (CLI or Jupyter server)
holds two pipe ends, and if it dies the executor kills the container.

Every host resource is named from the container id: the run dir ``<run_root>/<id>/`` and
the cgroup(s) ``.../<id>``. ``leftovers.collect_leftovers()`` removes what a crash left
behind; ``Container.create`` runs it first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..cgroups import cpus_to_quota, get_manager
from ..cgroups.base import CgroupHandle, CgroupLimits, CgroupManager, CgroupStats
from ..cgroups.none import NullManager
from ..errors import CgroupError, PrivilegeError, RuntimeStartError, SandboxError
from ..paths import run_dir

if TYPE_CHECKING:
    from ..network import nat
from ..units import format_size
from . import netns, ops, shim
from .executor import StatusPipe, runtime_binary
from .leftovers import collect_leftovers
from .phases import Phases
from .plan import HostContext, compile_plan
from .protocol import encode_plan
from .rundir import ensure_run_root, proc_starttime, read_json, write_json
from .spec import ContainerSpec, Limits
from .userns import userns_problems
from .validate import validate_spec

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
CPU_PERIOD_US = 100_000


def _has_caps(limits: Limits) -> bool:
    return any(v is not None for v in (limits.memory, limits.cpus, limits.pids, limits.cpu_weight))


def cgroup_manager(spec: ContainerSpec) -> CgroupManager:
    """The cgroup manager for ``spec``'s container: the host's (root), or the caller's
    delegated subtree (rootless). Without one, an unprivileged caller still gets a container
    when it asks for no cap or when ``spec.enforce_limits`` is off (``none.NullManager``);
    else the PrivilegeError names the fix. Called by ``Container.create``."""
    try:
        return get_manager()
    except (PrivilegeError, CgroupError) as exc:
        if os.geteuid() != 0 and (not _has_caps(spec.limits) or not spec.enforce_limits):
            return NullManager(str(exc))
        raise


def require_privileges() -> None:
    """Fail early, with what is needed, when the caller cannot create containers: root
    always can; anyone else needs unprivileged user namespaces. Called by
    ``Container.create`` and first thing by ``sandbox-kernel run``."""
    if os.geteuid() != 0:
        problems = userns_problems()
        if problems:
            raise PrivilegeError("; ".join(problems))


def cgroup_limits(limits: Limits, *, include_cpu: bool = True) -> CgroupLimits:
    """The cgroup form of a container's caps (the one conversion; called at create and on
    every change). ``include_cpu=False`` leaves the CPU quota off (deferred)."""
    quota = None
    if include_cpu and limits.cpus is not None:
        quota = cpus_to_quota(limits.cpus, CPU_PERIOD_US)
    return CgroupLimits(
        memory=limits.memory,
        memory_swap=limits.memory_swap if limits.memory_swap is not None else 0,
        cpu_quota_us=quota,
        cpu_period_us=CPU_PERIOD_US,
        cpu_weight=limits.cpu_weight,
        pids=limits.pids,
    )


@dataclass(frozen=True)
class ExitResult:
    """How the main process ended, and why, in figures. Made once by ``Container.poll``,
    ``wait`` or ``destroy``; kept in the run dir's ``exit.json`` and by the provisioner."""

    status: int  # shell-style: N, or 128+signal
    code: int | None  # exit code when it exited
    signal: int | None  # signal number when killed
    # the memory cap's OOM killer killed a process of the container (in the provisioner's
    # verdict, ``jupyter.exits.verdict``: during this kernel process's life, shortly before
    # this death, and the death was not asked for)
    oom_killed: bool
    memory_limit: int | None
    memory_peak: int | None
    pids_limit_hit: bool  # a fork was refused by the pids cap (same verdict as oom_killed)
    pids_limit: int | None
    setup_error: str | None = None
    # the counters behind the two flags, as read when the container ended (None: unread)
    oom_kills: int | None = None
    pids_limit_hits: int | None = None
    # who asked for this death, when its owner did ("restart requested", "sent by the
    # server"): the reason names it and blames no cap
    asked: str | None = None

    def reason(self) -> str:
        """One plain line: why the container ended (``run`` prints it on an OOM or pids-cap
        death; the provisioner logs and keeps it)."""
        if self.setup_error:
            return f"the sandbox could not start: {self.setup_error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text = f"killed by {name}"
        else:
            text = f"exited with code {self.code}"
        if self.asked:
            return f"{text} ({self.asked})"
        if self.oom_killed:
            limit, peak = format_size(self.memory_limit), format_size(self.memory_peak)
            text = f"out of memory (limit {limit}, peak {peak})"
        if self.pids_limit_hit:
            text += f"; the process limit ({self.pids_limit}) was reached"
        return text

    def to_json(self) -> dict[str, Any]:
        """The figures plus ``reason``, as written to ``exit.json`` and kept by the
        provisioner for the restarted kernel's ``%sandbox``."""
        data = asdict(self)
        data["reason"] = self.reason()
        return data


class Container:
    """One container, owned by the process that created it (the provisioner, ``run``, the
    image builder). Create with ``Container.create(spec)``; other processes see it through
    ``rundir.find_container(id)``."""

    def __init__(
        self,
        spec: ContainerSpec,
        manager: CgroupManager,
        cgroup: CgroupHandle,
        root: Path,
        phases: Phases | None = None,
        network: nat.Attachment | None = None,
    ) -> None:
        self.spec = spec
        #: network ``nat``: its veth, address and rules (``network.nat``); None with ``none``
        self.network = network
        #: where this container's creation and start spent their time (``phases.py``)
        self.phases = phases if phases is not None else Phases()
        self.id = spec.id
        self.manager = manager
        self.cgroup = cgroup
        self.run_dir = root / spec.id
        self.limits = spec.limits
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.setup_us: int | None = None
        self._status: StatusPipe | None = None
        self._control_fd: int = -1
        #: container path -> directory fd, for each ``Tmpfs(shared=True)`` (``shared_dir``)
        self._shared: dict[str, int] = {}
        self._exit_line: list[str] | None = None
        self._result: ExitResult | None = None
        self._setup_error: str | None = None
        self._cpu_deferred = spec.limits.defer_cpu and spec.limits.cpus is not None

    # ---- creation --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        spec: ContainerSpec,
        *,
        manager: CgroupManager | None = None,
        root: Path | None = None,
        meta: dict[str, Any] | None = None,
        subdirs: dict[str, tuple[int, int, int]] | None = None,
        phases: Phases | None = None,
    ) -> Container:
        """Validate the spec, then create the run dir and the cgroups. Nothing runs yet.

        Runs gc first (``collect_leftovers``). Blocking: the provisioner calls it in a thread,
        from ``pre_launch``, once per kernel start; ``run`` and the image builder call it too.

        ``subdirs``: folders to make inside the run dir, name -> (uid, gid, mode); they may be
        bind sources of the spec (e.g. a folder shared with a command that ``run`` starts).
        ``phases``: the start's timeline to mark this creation's steps on (a new one if None).
        """
        phases = phases if phases is not None else Phases()
        root = root or run_dir()
        subdirs = subdirs or {}
        validate_spec(spec, created=frozenset(str(root / spec.id / name) for name in subdirs))
        require_privileges()
        manager = manager or cgroup_manager(spec)
        phases.mark("validate")
        collect_leftovers(root=root, manager=manager)
        phases.mark("gc")
        ensure_run_root(root)
        rdir = root / spec.id
        try:
            rdir.mkdir(mode=0o711)
        except FileExistsError:
            raise SandboxError(
                f"container {spec.id} already exists at {rdir}; pick a new id"
            ) from None
        (rdir / "scratch").mkdir(mode=0o700)
        for name, (uid, gid, mode) in subdirs.items():
            sub = rdir / name
            sub.mkdir(mode=mode)
            os.chown(sub, uid, gid)
            os.chmod(sub, mode)
        if spec.image_digest:  # read by `sandbox-kernel image rm` to refuse removing a used image
            (rdir / "image").write_text(spec.image_digest + "\n")
        info = {
            "id": spec.id,
            "image": spec.image,
            "user": spec.user,
            "group": spec.group,
            "limits": asdict(spec.limits),
            "created": time.time(),
            "owner_pid": os.getpid(),
            "owner_start": proc_starttime(os.getpid()),
            "labels": dict(spec.labels),
            "limits_enforced": manager.enforced,
            "cgroup_parent": manager.parent_dir,  # v2: where root's ps and gc look
            "layers": list(spec.layers),  # gc keeps the host image layers in use
            **(meta or {}),
        }
        network = None
        try:
            if spec.nat is not None:
                from ..network.usermode import attachment

                network = attachment(spec.id, spec.nat, rdir, proc_starttime)
                network.reserve(info["owner_pid"], info["owner_start"])
                info["network"] = network.stats()
                phases.mark("network lease")
            write_json(rdir / "meta.json", info)
            phases.mark("run dir")
            cg = manager.create(
                spec.id, cgroup_limits(spec.limits, include_cpu=not spec.limits.defer_cpu)
            )
        except BaseException:
            if network is not None:
                network.detach()
            shutil.rmtree(rdir, ignore_errors=True)
            raise
        phases.mark("cgroup")
        return cls(spec, manager, cg, root, phases, network)

    # ---- start ---------------------------------------------------------------------
    def start(
        self,
        *,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """Spawn the executor and return once the main process has exec'd.

        Raises RuntimeStartError (with the executor's stage and errno) if setup fails (the
        container is then killed). Blocking: the provisioner's ``launch_kernel`` calls it in a
        thread, once per start; ``run`` calls it with the terminal's streams.
        """
        if self.proc is not None:
            raise SandboxError(f"container {self.id} was already started")
        plan, plan_path = self._write_plan()
        self.phases.mark("plan")

        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        argv = [
            runtime_binary(),
            "--status-fd",
            str(status_w),
            "--control-fd",
            str(control_r),
        ]
        passed = [status_w, control_r]
        share: socket.socket | None = None
        if any(isinstance(op, ops.Share) for op in plan):
            share, share_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            argv += ["--share-fd", str(share_child.fileno())]
            passed.append(share_child.detach())
        argv.append(str(plan_path))
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=tuple(passed),
                close_fds=True,
                start_new_session=True,
            )
        finally:
            for fd in passed:
                os.close(fd)
        self._status = StatusPipe(status_r)
        self._control_fd = control_w
        write_json(
            self.run_dir / "pid", {"pid": self.proc.pid, "start": proc_starttime(self.proc.pid)}
        )
        self.phases.mark("spawn")
        deadline = time.monotonic() + timeout
        try:
            self._await_exec(deadline)
            if share is not None:
                self._receive_shared(share)
            self.phases.mark("executor")
            self.phases.note("executor's own setup", (self.setup_us or 0) / 1000)
        except BaseException:
            self.kill()
            raise
        finally:
            if share is not None:
                share.close()
            with contextlib.suppress(FileNotFoundError):
                plan_path.unlink()

    def _write_plan(self) -> tuple[list[ops.Op], Path]:
        """Compile the spec with this host's context (cgroup, seccomp filter, netlink
        requests; the rootless shim layer) and write it to the run dir's ``plan`` file, for
        the executor. Called by ``start``."""
        from . import seccomp

        seccomp_file = (
            str(seccomp.write_filter(self.run_dir.parent / ".seccomp"))
            if self.spec.seccomp
            else None
        )
        version = self.manager.version
        join = self.cgroup.join_paths
        host = HostContext(
            scratch_dir=str(self.run_dir / "scratch"),
            cgroup_dirs=tuple(join),
            cgroup_version=version,
            cgroup_v1_mounts=self.cgroup.view_mounts(),
            seccomp_file=seccomp_file,
            netlink=(netns.loopback_request(),),
            resolv_conf=self.network.resolv_conf() if self.network is not None else None,
        )
        plan = compile_plan(self.spec, host)
        if self.spec.uid_map and os.geteuid() != 0:
            # rootless: what the plan creates in a root-owned image comes from the shim layer
            host = replace(host, shim=shim.entries(plan, self.spec.layers))
            plan = compile_plan(self.spec, host)
        plan_path = self.run_dir / "plan"
        fd = os.open(plan_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(encode_plan(plan))
        return plan, plan_path

    def _receive_shared(self, share: socket.socket) -> None:
        """Take the directory descriptors init sent for the plan's ``share`` records (all
        queued before its ``exec`` report). Called by ``start``."""
        share.setblocking(False)  # (recv_fds ignores its flags before Python 3.12)
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(share, 4096, 1)
            except BlockingIOError:
                return
            path = msg.decode("utf-8", "surrogateescape")
            for fd in fds:
                if path in self._shared:
                    os.close(fd)
                else:
                    os.set_inheritable(fd, False)
                    self._shared[path] = fd

    def shared_dir(self, path: str) -> int:
        """The directory descriptor of the container's ``Tmpfs(target=path, shared=True)``,
        owned by this container (closed by ``destroy``); the host reaches what the container
        made there as ``/proc/self/fd/N/NAME``. Valid once ``start`` returned. Called by the
        provisioner for the kernel's socket folder."""
        try:
            return self._shared[path]
        except KeyError:
            raise SandboxError(
                f"container {self.id}: no shared folder {path} (not started, or no "
                "Tmpfs(shared=True) there)"
            ) from None

    def _await_exec(self, deadline: float) -> None:
        assert self._status is not None
        # A failure while configuring the network may be a consequence of a setup error the
        # executor reports next (init gone): keep reading, and prefer the executor's message.
        pending: BaseException | None = None
        while True:
            fields = self._status_line(deadline, pending)
            kind = fields[0]
            if kind == "child":
                self.init_pid = int(fields[1])
            elif kind == "netns" and self.network is not None and pending is None:
                try:
                    began = time.perf_counter()
                    self.network.attach(int(fields[1]))
                    os.write(self._control_fd, b"go\n")
                    self.phases.note("network attach", (time.perf_counter() - began) * 1000)
                except (SandboxError, OSError, ValueError) as exc:
                    pending = RuntimeStartError(
                        f"container {self.id}: network: {exc}", stage="network"
                    )
                    self._close_control()  # the executor takes the container down now
            elif kind == "netlink":
                try:
                    netns.check_reply(fields[1] if len(fields) > 1 else "")
                except RuntimeStartError as exc:
                    pending = exc
                    self._close_control()  # the executor takes the container down now
            elif kind == "exec":
                if pending is not None:  # exec'd before the failed reply was read: no start
                    raise pending
                self.setup_us = int(fields[1])
                return
            elif kind == "error":
                stage, err, message = [*fields, "", "0", ""][1:4]
                self._setup_error = f"{stage}: {message}"
                raise RuntimeStartError(
                    f"container {self.id}: {stage}: {message}", stage=stage, errno=int(err or 0)
                )
            elif kind == "exit":
                self._exit_line = fields
                if pending is not None:  # the network setup failed: that is why it ended
                    raise pending
                raise RuntimeStartError(
                    f"container {self.id}: the command ended during setup ({' '.join(fields)})"
                )

    def _status_line(self, deadline: float, pending: BaseException | None) -> list[str]:
        """The executor's next status line during setup; RuntimeStartError past the deadline
        or when it ended without a word (``pending``, the network's failure, when there is
        one: that is why it ended)."""
        assert self._status is not None
        try:
            fields = self._status.read_line(deadline)
        except TimeoutError:
            raise RuntimeStartError(
                f"container {self.id}: setup did not finish in time", stage="timeout"
            ) from None
        if fields is not None:
            return fields
        if pending is not None:
            raise pending
        code = self.proc.wait() if self.proc else -1
        raise RuntimeStartError(
            f"container {self.id}: the executor exited ({code}) before the command started"
        )

    @property
    def limits_enforced(self) -> bool:
        """Do the caps reach the kernel? False for a rootless container without cgroups
        (``spec.enforce_limits`` off). Read by the provisioner for ``%sandbox``."""
        return self.manager.enforced

    # ---- running ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Host pid of the executor (the process Jupyter sees as the kernel); kept in the
        provisioner's info for re-attaching."""
        return self.proc.pid if self.proc else None

    def signal(self, signum: int) -> None:
        """Send a signal: INT/TERM/HUP/QUIT/USR1/USR2 reach the main process; KILL ends it all.
        Called by the provisioner's ``send_signal`` (interrupts) and by ``run``'s forwarders."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL everything in the container (idempotent). Called by the provisioner's
        ``kill``, by ``destroy`` and when a start fails."""
        self.signal(signal.SIGKILL)
        try:
            self.cgroup.kill()
        except SandboxError as exc:
            log.warning("container %s: %s", self.id, exc)

    def poll(self) -> ExitResult | None:
        """The exit result once the executor has exited, else None (never blocks). Called by
        the provisioner's ``poll`` and ``cleanup``."""
        if self.proc is None:
            return None
        if self._result is None and self.proc.poll() is not None:
            self._finish()
        return self._result

    def wait(self, timeout: float | None = None) -> ExitResult:
        """Block until the executor exits (``subprocess.TimeoutExpired`` past ``timeout``) and
        return the exit result. Called by ``sandbox-kernel run``."""
        if self.proc is None:
            raise SandboxError(f"container {self.id} was never started")
        self.proc.wait(timeout)
        if self._result is None:
            self._finish()
        assert self._result is not None
        return self._result

    def _finish(self) -> None:
        assert self.proc is not None and self.proc.returncode is not None
        if self._status is not None:
            try:
                while True:
                    fields = self._status.read_line(time.monotonic() + 1.0)
                    if fields is None:
                        break
                    if fields[0] == "exit":
                        self._exit_line = fields
                    elif fields[0] == "error" and not self._setup_error:
                        self._setup_error = f"{fields[1]}: {fields[3] if len(fields) > 3 else ''}"
            except TimeoutError:
                pass
            self._status.close()
        self._close_control()
        code: int | None = None
        sig: int | None = None
        rc = self.proc.returncode
        if self._exit_line and len(self._exit_line) >= 3:
            if self._exit_line[1] == "code":
                code = int(self._exit_line[2])
            else:
                sig = int(self._exit_line[2])
        elif rc < 0:
            sig = -rc
        elif rc > 128:
            sig = rc - 128
        else:
            code = rc
        status = code if code is not None else 128 + (sig or 0)
        try:
            st: CgroupStats | None = self.cgroup.stats()
        except SandboxError:
            st = None
        self._result = ExitResult(
            status=status,
            code=code,
            signal=sig,
            oom_killed=bool(st and st.oom_kills > 0),
            memory_limit=st.memory_limit if st else self.limits.memory,
            memory_peak=st.memory_peak if st else None,
            pids_limit_hit=bool(st and st.pids_limit_hits > 0),
            pids_limit=st.pids_limit if st else self.limits.pids,
            setup_error=self._setup_error,
            oom_kills=st.oom_kills if st else None,
            pids_limit_hits=st.pids_limit_hits if st else None,
        )
        write_json(self.run_dir / "exit.json", self._result.to_json())

    def _close_control(self) -> None:
        if self._control_fd >= 0:
            os.close(self._control_fd)
            self._control_fd = -1

    # ---- limits and usage ----------------------------------------------------------------
    def update(self, limits: Limits) -> None:
        """Change limits of the running container (no restart); a deferred CPU quota stays
        deferred. Called by the provisioner for a ``%sandbox`` live change (in a thread)."""
        include_cpu = not self._cpu_deferred
        self.cgroup.set_limits(cgroup_limits(limits, include_cpu=include_cpu))
        self.limits = replace(limits, defer_cpu=self._cpu_deferred)
        self._update_meta()

    def apply_deferred_cpu(self) -> None:
        """Apply the CPU quota that was deferred during start (kernel start is CPU-bound).
        Called by the provisioner's ``post_launch`` once the kernel answered its first
        kernel_info (or ``cpu_defer_timeout`` passed)."""
        if self._cpu_deferred:
            self._cpu_deferred = False
            self.cgroup.set_limits(cgroup_limits(self.limits, include_cpu=True))
            self.limits = replace(self.limits, defer_cpu=False)
            self._update_meta()

    def _update_meta(self) -> None:
        self.update_meta({"limits": asdict(self.limits)})

    def update_meta(self, changes: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
        """Change the run dir's ``meta.json`` (what ``ps``, ``gc`` and the kernel count read):
        set ``changes``, remove ``drop``. Called for a live limit change, and by the
        provisioner when a pool member becomes a kernel (its kernel id, no longer idle)."""
        path = self.run_dir / "meta.json"
        info = read_json(path)
        if info is None:
            return
        info.update(changes)
        for name in drop:
            info.pop(name, None)
        write_json(path, info)

    def network_stats(self) -> dict[str, Any]:
        """The network's figures: mode, and with ``nat`` its address, allow-list, bandwidth,
        bytes in and out, refused connections (``network.nat.Attachment.stats``). Called by
        the provisioner for ``%sandbox`` and by ``stats``."""
        if self.network is None:
            return {"mode": self.spec.network.value}
        return self.network.stats()

    def refresh_network(self) -> bool:
        """Resolve a ``nat`` container's allow-listed host names again; their new addresses
        replace the old in its rules (``network.nat.Attachment.refresh``). True when the
        rules changed; False with network ``none``. Blocking (name lookups): the provisioner
        calls it in a thread."""
        return self.network.refresh() if self.network is not None else False

    def set_bandwidth(self, rate_bits: int | None) -> None:
        """Change a ``nat`` container's bandwidth cap while it runs (both directions)."""
        if self.network is None:
            raise SandboxError(f"container {self.id} has network 'none': no bandwidth to set")
        self.network.set_bandwidth(rate_bits)
        self.update_meta({"bandwidth": rate_bits})

    def stats(self) -> CgroupStats:
        """The cgroup's current figures. Called by the provisioner before a live change (the
        memory warning of ``limits.plan_change``)."""
        return self.cgroup.stats()

    # ---- teardown ---------------------------------------------------------------------
    def destroy(self) -> None:
        """Kill what runs, remove cgroups and the run dir. Idempotent. Called by the
        provisioner's ``cleanup`` (and when a start fails), by ``run`` and by ``__exit__``."""
        if self.proc is not None and self.proc.returncode is None:
            self.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("container %s: executor %s did not exit", self.id, self.proc.pid)
        if self.proc is not None and self._result is None and self.proc.returncode is not None:
            self._finish()
        if self._status is not None:
            self._status.close()
        self._close_control()
        for fd in self._shared.values():
            os.close(fd)
        self._shared.clear()
        # each step runs whatever the one before it did (a cgroup busy with a process in
        # D state must not keep the network's lease, link and rules for the server's life)
        failed: list[SandboxError] = []
        steps = [self.cgroup.remove, *((self.network.detach,) if self.network else ())]
        for step in steps:
            try:
                step()
            except SandboxError as exc:
                failed.append(exc)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if failed:
            raise failed[0]

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
