"""The Jupyter kernel provisioner: every kernel in its own container.

Layer: Jupyter. ``SandboxProvisioner`` implements jupyter_client's provisioner contract
(``KernelProvisionerBase``); jupyter_client's ``KernelManager`` creates one per kernel and
calls it for the kernel's whole life, across restarts (``cleanup(restart=True)`` then
``pre_launch``/``launch_kernel`` again).

* pre_launch: validate the settings (kernelspec config + Jupyter config + the
  administrator's ``SandboxPolicy``; an invalid value raises here so that the message
  reaches the user), find the image, and create the container (run dir, cgroups) with the
  connection file in its plan (ipc transport). The steps themselves are in ``launch``.
* launch_kernel: start the container (in a thread; the executor reports when the kernel
  exec'd), take its connection folder (a small tmpfs of the container's own,
  ``launch.CONN_TARGET``) as a descriptor, and serve the kernel's control socket there:
  the server reaches the kernel's sockets through ``/proc/self/fd/N/k-*``, and the kernel
  has no writable host folder but the notebook's.
* post_launch: apply the deferred CPU cap once the kernel answered its first kernel_info.
* poll/wait: report the exit status; a death by OOM, by the pids cap or by a signal is
  logged in one plain line and kept (``last_exit``, and ``exits`` for the next kernel). The
  reason describes this death (``exits.verdict``): a cap hit the kernel survived, or a stop
  the server asked for, is not blamed on a cap. A death nobody asked for is told at once in
  the cell that was running (``Relay.tell``), before the restart.
* the server's REST API (``jupyter.api``): ``sandbox_status`` and ``change_limits``, through
  the same checks as the kernel's ``%sandbox`` requests (``_ceilings``, ``_change_limits``).
* cleanup: stop the relay, destroy the container (processes, cgroups, run dir).

The container id (and so the connection folder) stays the same across restarts, and so
does the descriptor number of the socket folder (each new container's is put in its
place), so clients connected to the ipc sockets reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo, port_names
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from ..errors import LimitRefused, SandboxError, SpecError
from ..limits import BOUNDS, LIVE, LIVE_NETWORK, Ceilings, Limits, check_live, plan_change
from ..paths import is_container_id, new_container_id, run_dir
from ..quota import Usage
from ..quota import apply as apply_quota
from ..quota import read as read_quota
from ..quota import verify as verify_quota
from ..runtime.container import Container, ExitResult
from ..runtime.leftovers import collect_leftovers
from ..runtime.phases import Phases
from ..runtime.rundir import (
    META_POOL,
    ContainerInfo,
    find_container,
    process_alive,
    running_containers,
)
from ..runtime.spec import ContainerSpec
from ..units import format_cpus, format_rate, format_size
from . import exits, launch
from . import folder as folder_mod
from . import pool as pool_mod
from . import relay as relay_mod
from .control import ControlThread
from .errors import for_user
from .resolve import KernelSettings, read_policy, resolve_settings
from .settings import SETTING_NAMES, SandboxPolicy, SandboxSettings, setting_forms

#: Answers to a live request that cannot be served now (the kernel's and the REST API's).
RESTARTING = "the kernel is restarting; try again in a moment"
POLICY_UNREADABLE = (
    "the administrator's sandbox policy cannot be read, so limits cannot change now; ask "
    "the administrator (sandbox-kernel doctor names the problem)"
)

#: Every provisioner of this process; its ``container`` is the one not yet destroyed.
_PROVISIONERS: weakref.WeakSet[SandboxProvisioner] = weakref.WeakSet()


@atexit.register
def _destroy_at_exit() -> None:
    """Destroy the containers of kernels the server never shut down: jupyter_server exits
    on SIGINT without a tty ("Interrupted...", how JupyterHub's LocalProcessSpawner stops a
    server) without shutting its kernels down. Registered at import; runs at interpreter
    exit (a SIGKILLed server leaves them to gc: the next kernel start, ``sandbox-kernel gc``
    or the hub's ``post_stop_hook``)."""
    for provisioner in list(_PROVISIONERS):
        container = provisioner.container
        if container is not None:
            with contextlib.suppress(Exception):
                container.destroy()
    pool_mod.POOL.close()


class SandboxProvisioner(SandboxSettings, KernelProvisionerBase):  # type: ignore[metaclass]
    """Run the kernel in a sandbox-kernel container (see docs/configuration.md).

    jupyter_client's provisioner factory makes one per kernel (entry point
    ``sandbox-provisioner``), passing the kernelspec's ``kernel_provisioner.config``.
    """

    def __init__(self, **kwargs: Any) -> None:
        # Values from kernel.json's metadata.kernel_provisioner.config arrive as keyword
        # arguments. They are checked in pre_launch (where errors reach the user), so keep
        # them raw here instead of letting traitlets raise in the constructor.
        base_keys = {"kernel_id", "kernel_spec", "parent", "config", "log"}
        self._spec_config: dict[str, Any] = {
            k: kwargs.pop(k) for k in list(kwargs) if k not in base_keys
        }
        super().__init__(**kwargs)
        self.container: Container | None = None
        self.container_id: str | None = None
        self.settings: KernelSettings | None = None
        self.last_exit: dict[str, Any] | None = None
        self.cwd: str | None = None
        self._waited = False
        self._exit_recorded = False
        # what the server asked of this kernel process: a stop ("restart requested"...),
        # the signals sent; and the cap counters its death is judged against
        self._stop: str | None = None
        self._sent: set[int] = set()
        self._caps: exits.CapBaseline | None = None
        self._cpu_task: asyncio.Task[None] | None = None
        # a nat kernel whose allow-list names hosts: their addresses resolved again now and
        # then (``_refresh_names``)
        self._names_task: asyncio.Task[None] | None = None
        # the kernel process's pidfd watched on the event loop (``_watch_exit``)
        self._exit_watch: exits.EndWatch | None = None
        self._exit_task: asyncio.Future[None] | None = None
        self._reattached_pid: int | None = None
        self._control: ControlThread | None = None
        self._relay: relay_mod.Relay | None = None
        # held while the container's limits change (a %sandbox request, from the control
        # thread; the deferred CPU cap) and while the container is destroyed
        self._limits_lock = threading.Lock()
        self._poll_lock = asyncio.Lock()  # one reading of the container's end at a time
        # a restart's cleanup ran and its pre_launch has not ended (the REST API's "starting")
        self._between_starts = False
        self._paths: launch.ConnectionPaths | None = None
        self._owner: tuple[int, int] = (-1, -1)  # the kernel's host uid and gid
        #: the server's descriptor of the kernel's connection folder (the same number across
        #: restarts)
        self._conn_fd: int | None = None
        self._abnormal_exit: dict[str, Any] | None = None  # the last death not asked for
        self._previous_exit: dict[str, Any] | None = None  # ... as seen by the running kernel
        self._image_digest = ""
        self._reattached_start: str | None = None
        self._userns_noticed = False
        # the ids the notebook folder's owner is compared with (folder.check), and the last
        # unwritable-folder problem logged
        self._folder_ids: tuple[int, int] | None = None
        self._folder_noticed: str | None = None
        # Live changes (%sandbox memory=2G), kept across restarts of this kernel, and the caps
        # the kernelspec gave (the live ceiling where the administrator set none).
        self._live: dict[str, float] = {}
        self._start_limits: Limits | None = None
        self._start_bandwidth: int | None = None  # network 'nat': the kernelspec's cap
        #: where the last start spent its time, pre_launch to the first kernel_info reply
        #: (logged at debug level; read by the benchmarks)
        self.start_phases: Phases | None = None
        # a pool member claimed by pre_launch, handed its session by launch_kernel; the
        # cold spec (with the member's id) and the connection file it is handed
        self._member: pool_mod.Member | None = None
        self._cold_spec: ContainerSpec | None = None
        self._connection = ""
        #: the last start took a warm pool member (False: a cold start)
        self.pooled = False
        # a first start's spec, settings, folder and connection file: the pool's template
        self._pool_args: tuple[ContainerSpec, KernelSettings, str, str] | None = None
        _PROVISIONERS.add(self)

    # ---- naming ----------------------------------------------------------------------------
    @property
    def kernelspec_name(self) -> str:
        """The kernelspec's name (``?`` if unknown), for messages, logs and run-dir metadata."""
        spec: Any = self.kernel_spec
        name = str(getattr(spec, "name", None) or "")
        name = name or str(getattr(self.parent, "kernel_name", None) or "")
        resource_dir = str(getattr(spec, "resource_dir", None) or "")
        if not name and resource_dir:
            name = os.path.basename(resource_dir.rstrip("/"))
        return name or "?"

    @property
    def display_name(self) -> str:
        """The kernelspec's display name (else its name), for logs and run-dir metadata."""
        spec = self.kernel_spec
        return str(getattr(spec, "display_name", "") or self.kernelspec_name)

    @property
    def _context(self) -> str:
        return f"kernelspec {self.kernelspec_name!r}"

    # ---- settings ----------------------------------------------------------------------------
    def _explicit_settings(self) -> frozenset[str]:
        names = set(self._spec_config)
        for section in ("SandboxProvisioner", "SandboxSettings"):
            if section in self.config:
                names.update(self.config[section].keys())
        return frozenset(names & set(SETTING_NAMES))

    def resolve(self, workdir: str | None) -> KernelSettings:
        """Apply the kernelspec config to the traits and validate everything (raises SpecError).
        Called by ``pre_launch`` at each start, before anything is created."""
        problems: list[str] = []
        for key, value in self._spec_config.items():
            if key not in SETTING_NAMES:
                problems.append(
                    f"{key!r} is not a sandbox setting; "
                    f"the settings are: {', '.join(SETTING_NAMES)}"
                )
                continue
            try:
                setattr(self, key, value)
            except Exception:  # traitlets' TraitError (or a subclass)
                problems.append(f"{key}={value!r} has the wrong type; {setting_forms(key)}")
        policy = read_policy(SandboxPolicy(parent=self))
        values = {name: getattr(self, name) for name in SETTING_NAMES}
        settings: KernelSettings | None = None
        try:
            settings = resolve_settings(
                values,
                policy,
                explicit=self._explicit_settings(),
                workdir=workdir,
                context=self._context,
            )
        except SpecError as exc:
            problems.extend(exc.problems)
        if problems or settings is None:
            raise SpecError(problems, context=self._context)
        return settings

    # ---- contract: state --------------------------------------------------------------------
    @property
    def has_process(self) -> bool:
        """Is there a kernel process not yet waited for (this start's, or a re-attached one)?
        Read by the KernelManager's ``has_kernel``, before every signal, kill and poll."""
        if self.container is not None:
            return self.container.proc is not None and not self._waited
        return self._reattached_pid is not None and not self._waited

    async def poll(self) -> int | None:
        """None while the kernel runs, else its exit status; a first exit is recorded
        (``_record_exit``). Called by the KernelManager's ``is_alive`` (the restarter polls it
        every few seconds) and by its wait loop."""
        if self.container is not None:
            container = self.container
            proc = container.proc
            if proc is None:
                return 0
            if proc.poll() is None:
                await self._seen_alive(container)
                return None
            async with self._poll_lock:  # the restarter, a wait loop and the REST API poll
                result = await asyncio.to_thread(container.poll)
            if result is None:
                return proc.returncode
            self._record_exit(result)
            return result.status
        if self._reattached_pid is not None:
            return None if process_alive(self._reattached_pid, self._reattached_start) else 0
        return 0

    async def wait(self) -> int | None:
        """Poll until the kernel ended and return its status. Called by the KernelManager
        once shutdown or kill saw the process gone."""
        if self.container is None and self._reattached_pid is None:
            return 0
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.1)
        self._waited = True
        return status

    # ---- contract: signals ----------------------------------------------------------------
    async def send_signal(self, signum: int) -> None:
        """Signal the kernel (``Container.signal``; SIGKILL kills the whole container).
        Called by the KernelManager's ``signal_kernel`` and ``interrupt_kernel`` (SIGINT)."""
        self._sent.add(signum)
        if signum == signal.SIGKILL:
            self._stop = self._stop or "sent by the server"
        if self.container is not None:
            if signum == signal.SIGKILL:
                await asyncio.to_thread(self.container.kill)
            else:
                self.container.signal(signum)
        elif self._reattached_pid is not None and process_alive(
            self._reattached_pid, self._reattached_start
        ):
            os.kill(self._reattached_pid, signum)

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL everything in the container (a requested stop). Called by the
        KernelManager on ``shutdown_kernel(now=True)`` (so on ``restart_kernel(now=True)``,
        the restarter's way) and when a shutdown request timed out."""
        self._stop = _stopped_by_server(self._stop)
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """SIGTERM the kernel (a requested stop). Called by the KernelManager when a
        shutdown request was not answered within half the shutdown wait time."""
        self._stop = _stopped_by_server(self._stop)
        await self.send_signal(signal.SIGTERM)

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Note that the coming exit was asked for (not logged or kept as a death). Called by
        the KernelManager after it sent ``shutdown_request``."""
        self._stop = "restart requested" if restart else "shutdown requested"

    # ---- contract: launch ---------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Resolve the settings, find the image, create the container, write the connection
        file and serve the control socket (see the module docstring); returns the launch
        arguments. Called by the KernelManager before each start and restart; any failure
        reaches the user as a ``jupyter.errors`` HTTP error."""
        self._between_starts = True
        try:
            return await self._pre_launch(**kwargs)
        except SandboxError as exc:
            raise for_user(exc, self._context) from exc
        finally:
            self._between_starts = False

    async def _pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km is None:
            raise SandboxError(
                f"{self._context}: the sandbox provisioner needs a kernel manager as parent"
            )
        phases = self.start_phases = Phases()
        workdir = self._notebook_dir(kwargs.get("cwd"))
        settings = self._with_live(self.resolve(workdir))
        phases.mark("settings")
        await asyncio.to_thread(self._check_kernel_count, settings)
        await asyncio.to_thread(self._folder_quota, settings, workdir)
        phases.mark("kernel count, quota")
        image = await asyncio.to_thread(
            launch.find_image, settings.image, self._context, settings.ipykernel_layer
        )
        phases.mark("image")
        # Same container id across restarts (the run dir and the kernel's hostname); a first
        # start that claims a pool member takes the member's
        first = self.container_id is None
        container_id = self.container_id = self.container_id or new_container_id()
        paths = self._use_paths(km, container_id)
        argv, magics = launch.kernel_command(
            getattr(self.kernel_spec, "argv", None) or [],
            image,
            paths.connection_file,
            kwargs.pop("extra_arguments", []) or [],
            magics=self.magics,
            context=self._context,
        )
        env = launch.kernel_env(
            image,
            getattr(self.kernel_spec, "env", None) or {},
            settings,
            paths,
            magics=magics,
            context=self._context,
        )
        phases.mark("command, env")
        userns, idmapped, note = await asyncio.to_thread(
            launch.kernel_userns, workdir, settings.uid, settings.gid
        )
        phases.mark("user namespace")
        start = launch.KernelStart(
            container_id,
            self.kernelspec_name,
            settings,
            image,
            workdir,
            paths,
            userns,
            workdir_idmap=idmapped,
        )
        for line in (userns.notice, note):
            if line and not self._userns_noticed:
                self.log.warning("%s: %s", self._context, line)
        self._userns_noticed = self._userns_noticed or bool(userns.notice or note)
        owner = start.host_ids()
        # idmapped (root mode): the folder shows its on-disk ids as the same container ids
        idmap = idmapped and userns.mode == "root"
        self._folder_ids = (settings.uid, settings.gid) if idmap else owner
        await asyncio.to_thread(self._notice_folder, settings, workdir)
        connection = self._connection_json(km, kwargs, paths.ip)
        spec = launch.kernel_spec(start, argv, env, connection, magics=magics)
        phases.mark("folder, spec")
        member = await self._from_pool(spec, settings, first=first)
        if member is not None:
            container = await self._claimed(km, member, spec, workdir, connection, phases)
        else:
            container = await asyncio.to_thread(
                self._create_container, spec, workdir, paths, phases
            )
        # the pool is kept filled once this kernel's container runs (launch_kernel)
        self._pool_args = (spec, settings, workdir, connection) if first else None
        self.pooled = member is not None
        self._started(container, settings, workdir, image.digest)
        self._owner = owner
        # What launch_kernel needs; the server's environment is deliberately dropped.
        kwargs.pop("env", None)
        kwargs["cwd"] = workdir
        kwargs["cmd"] = argv
        return kwargs

    def _with_live(self, settings: KernelSettings) -> KernelSettings:
        """``settings`` with the live changes of an earlier run of this kernel applied (a
        restart keeps ``%sandbox memory=2G`` and, network ``nat``, ``bandwidth=8mbit``),
        each checked again against today's ceilings: one the administrator's policy no
        longer allows (or a bandwidth once the kernelspec has network 'none') is dropped,
        with a log line."""
        self._start_limits = settings.limits
        nat = settings.nat
        self._start_bandwidth = nat.bandwidth if nat is not None else None
        if not self._live:
            return settings
        ceilings = settings.policy.ceilings.or_start(settings.limits, self._start_bandwidth)
        kept = dict(self._live)
        for name, value in self._live.items():
            try:
                if name in LIVE_NETWORK:
                    if nat is None:
                        raise LimitRefused("the kernelspec has network 'none' now")
                    check_live(name, f"{int(value)}bit", ceilings)
                else:
                    plan_change({name: value}, settings.limits, ceilings, None)
            except LimitRefused as exc:
                self.log.warning(
                    "kernel %s: the live change %s=%s is not kept across the restart: %s",
                    self.kernel_id,
                    name,
                    value,
                    exc,
                )
                del kept[name]
        self._live = kept
        caps = {k: v for k, v in kept.items() if k in LIVE}
        if caps:
            limits, _ = plan_change(caps, settings.limits, ceilings, None)
            settings = replace(settings, limits=limits)
        if nat is not None and "bandwidth" in kept:
            settings = replace(settings, nat=replace(nat, bandwidth=int(kept["bandwidth"])))
        return settings

    def _check_kernel_count(self, settings: KernelSettings) -> None:
        """Refuse a start beyond the most kernels the kernel's user may run at once
        (``SandboxPolicy.max_kernels`` or the policy file's), naming the limit and the
        running kernels. Called by ``pre_launch`` (blocking: in a thread). A friendly check
        (two starts at the same instant may both pass); what bounds a user's kernels together
        is the aggregate cgroup cap root writes (``sandbox-kernel delegate``)."""
        policy = settings.policy
        if policy.max_kernels is None:
            return
        # a rootless server's run root holds only its user's containers (whatever uid
        # they run as inside); a root server's, every user's: count that kernel uid's
        running = _containers_of_user(settings, False)
        if len(running) < policy.max_kernels:
            return
        shown = []
        for info in running[:5]:
            name, folder = info.meta.get("kernelspec"), info.meta.get("notebook_dir")
            name = name if isinstance(name, str) else "?"
            folder = folder if isinstance(folder, str) else ""
            shown.append(f"{name[:64]} in {folder[:200]}" if folder else name[:64])
        more = f" and {len(running) - 5} more" if len(running) > 5 else ""
        raise SpecError(
            f"uid {settings.host_uid} already runs {len(running)} kernel(s), the most allowed "
            f"at once ({policy.max_kernels_source} = {policy.max_kernels}): "
            f"{'; '.join(shown)}{more}; shut one down (Kernel > Shut Down Kernel, or the "
            "Running panel) and start again",
            context=self._context,
        )

    def _folder_quota(self, settings: KernelSettings, workdir: str) -> Usage | None:
        """Hold the notebook folder to the tighter of ``SandboxPolicy.notebook_quota`` and
        the policy file's ``home_quota`` for the kernel's user: a root server with
        ``notebook_quota`` sets it (``quota.apply``, which never changes the quota of a folder
        above the notebook's), otherwise it is checked (root set it: ``quota set``, the hub
        hook). A folder the kernel cannot write needs none. Called by ``pre_launch``
        (blocking: in a thread); a QuotaError stops the start."""
        policy = settings.policy
        asked = [
            (limit, source)
            for limit, source in (
                (policy.notebook_quota, "SandboxPolicy.notebook_quota"),
                (policy.file_home_quota, f"home_quota in {policy.file_where}"),
            )
            if limit is not None
        ]
        if settings.notebook_readonly or not asked:
            return None
        limit, source = min(asked)
        try:
            if os.geteuid() == 0 and policy.notebook_quota is not None:
                files = policy.notebook_quota_files
                return apply_quota(workdir, limit, files, source=source)
            return verify_quota(workdir, limit, source)
        except SandboxError as exc:
            raise SpecError(str(exc), context=self._context) from None

    def _folder_access(
        self, settings: KernelSettings, workdir: str | None
    ) -> folder_mod.FolderAccess:
        """Can the kernel's user write its notebook folder (``folder.check``)? Blocking (a
        stat): called by ``pre_launch`` and for each ``_info``."""
        if not workdir or self._folder_ids is None:
            return folder_mod.FolderAccess(None)
        return folder_mod.check(
            workdir, self._folder_ids, settings.uid, readonly=settings.notebook_readonly
        )

    def _notice_folder(self, settings: KernelSettings, workdir: str) -> None:
        """Warn in the server log when the kernel about to start cannot write its notebook
        folder (once per problem, not at each restart). Called by ``pre_launch``."""
        problem = self._folder_access(settings, workdir).problem
        if problem and problem != self._folder_noticed:
            self.log.warning(
                "%s: the kernel cannot write its notebook folder: %s", self._context, problem
            )
        self._folder_noticed = problem

    def _notebook_dir(self, cwd: object) -> str:
        """The notebook's folder (the server passes it as ``cwd``), resolved; it must exist."""
        workdir = os.path.realpath(str(cwd)) if cwd else os.path.realpath(os.getcwd())
        if not os.path.isdir(workdir):
            raise SpecError(
                f"the notebook directory {workdir!r} does not exist; "
                "start the kernel from an existing directory",
                context=self._context,
            )
        return workdir

    def _started(
        self, container: Container, settings: KernelSettings, workdir: str, digest: str
    ) -> None:
        """A new container serves this kernel: reset the per-start state."""
        self.container = container
        self.settings = settings
        self.cwd = workdir
        self._waited = False
        self._exit_recorded = False
        self._stop = None
        self._sent = set()
        self._caps = None
        self._previous_exit = self._abnormal_exit
        self._abnormal_exit = None
        self._image_digest = digest

    def _connection_json(self, km: Any, kwargs: dict[str, Any], inside_ip: str) -> str:
        """The kernel's connection file (its socket paths inside, ``inside_ip``), as the plan
        writes it: the KernelManager's ports (ipc: 1..5, kept across restarts; the relay's
        are the same numbers) and key."""
        for port, name in enumerate(port_names, start=1):
            if not getattr(km, name):
                setattr(km, name, port)
        info = dict(km.get_connection_info())
        info["ip"] = inside_ip
        info["key"] = km.session.key.decode()
        info["kernel_name"] = km.kernel_name
        info["jupyter_session"] = (kwargs.get("env") or {}).get("JPY_SESSION_NAME", "")
        self.connection_info = km.get_connection_info()
        return json.dumps(info, indent=1)

    def _use_paths(self, km: Any, container_id: str) -> launch.ConnectionPaths:
        """The connection paths of container ``container_id``, set on the KernelManager:
        Jupyter connects to the output relay's sockets in its run dir (``launch_kernel``
        starts the relay). Called by ``pre_launch``, again when it claimed a pool member."""
        paths = launch.connection_paths(run_dir(), container_id, self._context)
        self._paths = paths
        km.transport = "ipc"
        km.ip = paths.client_ip
        km.connection_file = paths.client_connection_file
        km._connection_file_written = False  # the old one left with the old container
        return paths

    def _kernel_meta(self, spec: ContainerSpec, workdir: str) -> dict[str, Any]:
        """The kernel's fields of its container's meta.json (``ps``, the kernel count)."""
        return {
            "kernel_id": self.kernel_id,
            "kernelspec": self.kernelspec_name,
            "display_name": self.display_name,
            "image_digest": spec.image_digest,
            "notebook_dir": workdir,
        }

    def _create_container(
        self,
        spec: ContainerSpec,
        workdir: str,
        paths: launch.ConnectionPaths,
        phases: Phases,
    ) -> Container:
        """Create the container (blocking: run in a thread), with the server's own folder
        for the relay's sockets in its run dir."""
        try:
            return Container.create(
                spec,
                meta=self._kernel_meta(spec, workdir),
                subdirs={paths.relay_dir.name: (os.geteuid(), os.getegid(), 0o700)},
                phases=phases,
            )
        except SpecError as exc:
            raise SpecError(exc.problems, context=self._context) from None

    # ---- the warm pool ----------------------------------------------------------------
    def _pool_key(
        self, spec: ContainerSpec, settings: KernelSettings, *, warn: bool = False
    ) -> ContainerSpec | None:
        """The pool key of ``spec``, or None when this kernel cannot be pooled (no
        ``pool_size``; a command other than ``PYTHON -m ipykernel_launcher``; the magics,
        where the member's program is, off)."""
        if settings.pool_size <= 0:
            return None
        command = pool_mod.member_command(spec.command, launch.MAGICS_TARGET)
        magics = any(getattr(m, "target", "") == launch.MAGICS_TARGET for m in spec.mounts)
        if command is None or not magics:
            if not warn:
                return None
            self.log.warning(
                "%s: pool_size=%d is ignored: only a kernel started as PYTHON -m "
                "ipykernel_launcher -f {connection_file}, with the %%sandbox magics on, "
                "can be pooled",
                self._context,
                settings.pool_size,
            )
            return None
        return pool_mod.pool_key(spec)

    async def _from_pool(
        self, spec: ContainerSpec, settings: KernelSettings, *, first: bool
    ) -> pool_mod.Member | None:
        """Claim a ready pool member for ``spec`` (a first start of a pooled kernelspec: a
        restart keeps its container id, so it starts cold), or make room for a cold start
        within the user's kernel count by letting an idle member go (and waiting until it
        is gone). Called by ``pre_launch``; ``_keep_pool`` follows once the kernel's
        container exists."""
        pool = pool_mod.POOL
        key = self._pool_key(spec, settings, warn=True) if first else None
        if first and settings.pool_size <= 0:
            pool.forget(self.kernelspec_name)
        member = None
        if key is not None:
            folder = await asyncio.to_thread(pool_mod.folder_id, spec.workdir)
            member = pool.claim(key, folder)
        # a cold start (pooled kernelspec or not) within the user's kernel count
        if member is None and settings.policy.max_kernels is not None and pool.idle():
            used = await asyncio.to_thread(_containers_of_user, settings, True)
            if len(used) >= settings.policy.max_kernels:
                # rootless: the run root is this user's, whatever uid its kernels have
                await pool.evict(settings.uid if os.geteuid() == 0 else None)
        return member

    def _keep_pool(
        self, spec: ContainerSpec, settings: KernelSettings, workdir: str, connection: str
    ) -> None:
        """Keep the pool of this kernelspec filled for ``spec``'s folder: after a first
        start (cold or claimed) whose container runs already, so that the pool's count of
        the user's kernels sees it. Called by ``launch_kernel`` (with what ``pre_launch``
        kept in ``_pool_args``)."""
        key = self._pool_key(spec, settings)
        command = pool_mod.member_command(spec.command, launch.MAGICS_TARGET)
        if key is None or command is None:
            return
        meta = {k: v for k, v in self._kernel_meta(spec, workdir).items() if k != "kernel_id"}
        conn_file = launch.connection_paths(run_dir(), spec.id).connection_file
        pool_mod.POOL.want(
            key,
            pool_mod.Want(
                settings.pool_size,
                self.kernelspec_name,
                functools.partial(_member_spec, spec, command, conn_file, connection, meta),
                room=functools.partial(_room_for_member, settings),
            ),
        )

    async def _claimed(
        self,
        km: Any,
        member: pool_mod.Member,
        spec: ContainerSpec,
        workdir: str,
        connection: str,
        phases: Phases,
    ) -> Container:
        """Make the claimed ``member`` this kernel's container: its id and connection paths,
        its meta.json a kernel's, this start's timeline; ``launch_kernel`` hands it the
        session (``connection``), or starts ``spec`` cold under its id if it refuses."""
        container = member.container
        self.container_id = container.id
        self._use_paths(km, container.id)
        container.phases = phases
        # held from here on: a failure (or a cleanup) before the hand-over destroys it
        self.container, self._member, self._connection = container, member, connection
        self._cold_spec = replace(spec, id=container.id, hostname=container.id)
        try:
            meta = self._kernel_meta(spec, workdir)
            await asyncio.to_thread(container.update_meta, meta, (META_POOL,))
        except BaseException:
            self.container, self._member = None, None
            member.sock.close()
            await asyncio.to_thread(container.destroy)
            raise
        phases.mark("pool claim")
        return container

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the container created by ``pre_launch`` (in a thread; returns once the kernel
        exec'd) and return the connection info. Called by the KernelManager right after
        ``pre_launch``; a failed start closes the control socket and destroys the container."""
        container = self.container
        if container is None:
            raise SandboxError(f"{self._context}: launch_kernel called without pre_launch")
        container.phases.mark("kernel manager")
        stdout = kwargs.get("stdout")
        stderr = kwargs.get("stderr")
        member, self._member = self._member, None
        try:
            if member is not None:
                container = await self._take_member(member, stdout, stderr)
            else:
                # a new cgroup's counters (zero, unless the runtime reused one): this
                # life's baseline
                counts = await asyncio.to_thread(_cap_counts, container)
                self._caps = exits.CapBaseline(counts or exits.CapCounts(), time.monotonic())
                await asyncio.to_thread(
                    container.start, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
                )
        except BaseException as exc:
            container = self.container or container
            await self._close_control()
            await self._close_relay()
            await asyncio.to_thread(container.destroy)
            self.container = None
            if isinstance(exc, SandboxError):
                raise for_user(exc, self._context) from exc
            raise
        self.log.info(
            "kernel %s (%s) started in sandbox %s (%s, as uid %s, %s)",
            self.kernel_id,
            self.display_name,
            container.id,
            container.spec.image,
            container.spec.user,
            "from the warm pool"
            if self.pooled
            else f"setup {(container.setup_us or 0) / 1000:.0f} ms",
        )
        try:
            await self._connect(container)
        except BaseException:
            await self._close_control()
            await self._close_relay()
            await asyncio.to_thread(container.destroy)
            self.container = None
            if self._conn_fd is not None:  # the next start dups the folder anew
                os.close(self._conn_fd)
                self._conn_fd = None
            raise
        self._watch_exit(container)
        container.phases.mark("relay, control socket")
        args, self._pool_args = self._pool_args, None
        if args is not None:
            self._keep_pool(*args)
        return self.connection_info

    async def _take_member(self, member: pool_mod.Member, stdout: Any, stderr: Any) -> Container:
        """Hand the claimed pool member its session (the connection file with the session's
        key), and take its cgroup's counters now as this life's baseline (what its warm-up
        hit is not this kernel's). A member that refuses or does not answer is destroyed and
        the kernel started cold, under the same id. Called by ``launch_kernel``."""
        container = member.container
        try:
            await asyncio.to_thread(pool_mod.hand_over, member, self._connection)
        except SandboxError as exc:
            self.log.warning("kernel %s: %s; starting it cold", self.kernel_id, exc)
            pool_mod.POOL.claimed(member, ok=False)
            self.pooled = False
            await asyncio.to_thread(container.destroy)
            assert self._cold_spec is not None and self._paths is not None
            container = await asyncio.to_thread(
                self._create_container,
                self._cold_spec,
                self.cwd or "",
                self._paths,
                container.phases,
            )
            self.container = container
            self._caps = exits.CapBaseline(exits.CapCounts(), time.monotonic())
            await asyncio.to_thread(
                container.start, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
            return container
        pool_mod.POOL.claimed(member, ok=True)
        container.phases.mark("hand over")
        counts = await asyncio.to_thread(_cap_counts, container)
        self._caps = exits.CapBaseline(counts or exits.CapCounts(), time.monotonic())
        return container

    def _watch_exit(self, container: Container) -> None:
        """Notice the kernel's end the moment its process ends, not at the restarter's next
        poll (seconds later): ``poll`` then records it and the death notice reaches the
        running cell before the server announces the restart, after which JupyterLab no
        longer shows that cell's output. A pidfd read on the event loop (no thread per
        kernel); where there is none, the restarter's poll still notices. Called by
        ``launch_kernel``; undone by ``_unwatch_exit``."""
        self._unwatch_exit()
        proc = container.proc
        if proc is None:
            return

        def ended() -> None:
            self._unwatch_exit()
            if self.container is container:
                self._exit_task = asyncio.ensure_future(self._poll_ended())

        self._exit_watch = exits.watch_end(proc.pid, ended)

    async def _poll_ended(self) -> None:
        """``poll`` once the kernel process ended (``_watch_exit``); a failure only logged:
        the restarter's own poll comes next anyway."""
        try:
            await self.poll()
        except Exception as exc:
            self.log.debug("kernel %s: reading its end failed: %s", self.kernel_id, exc)

    def _unwatch_exit(self) -> None:
        """Stop watching the kernel process's pidfd (idempotent; tolerant of a closed loop)."""
        watch, self._exit_watch = self._exit_watch, None
        exits.unwatch_end(watch)

    async def _connect(self, container: Container) -> None:
        """Reach the kernel's sockets through this process's descriptor of the container's
        connection folder (put in the place of the previous container's, so that the
        endpoints stay the same across restarts), start the output relay between them and
        Jupyter's sockets in the run dir's relay folder (Jupyter never connects to the
        kernel: relay.py bounds what it can make the server hold), and serve the control
        socket in the connection folder, owned by the kernel's uid. The KernelManager writes
        Jupyter's connection file (the relay's paths) from what this returns. Called by
        ``launch_kernel`` once the kernel exec'd."""
        km, paths, settings = self.parent, self._paths, self.settings
        assert km is not None and paths is not None and settings is not None
        fd = container.shared_dir(paths.conn_dir)
        if self._conn_fd is None:
            self._conn_fd = os.dup(fd)
        else:
            os.dup2(fd, self._conn_fd, inheritable=False)
        km.ip = paths.client_ip
        km._connection_file_written = False  # KernelManager writes its copy from what we return
        client = dict(km.get_connection_info())
        relay = relay_mod.Relay(
            {**client, "ip": paths.host_path(self._conn_fd, "k")},
            client,
            settings.output,
            self.log,
            name=str(self.kernel_id),
        )
        self._relay = relay  # closed by the caller if start fails
        await asyncio.to_thread(relay.start)
        self.connection_info = km.get_connection_info()
        uid, gid = self._owner
        self._control = ControlThread(
            paths.host_path(self._conn_fd, launch.CONTROL_SOCKET),
            self._control_request,
            uid=uid,
            gid=gid,
            name=container.id,
        )
        await asyncio.to_thread(self._control.start)

    async def post_launch(self, **kwargs: Any) -> None:
        """Wait (bounded by cpu_defer_timeout, and only while the kernel lives) for the kernel's
        first kernel_info reply, then apply the CPU cap: start-up runs uncapped, and the
        first cell the user runs is already capped. Clients wait for that reply anyway.
        Called by the KernelManager after ``launch_kernel``, at each start."""
        container = self.container
        if container is None:
            return
        container.phases.mark("kernel manager")
        nat = container.spec.nat
        if nat is not None and any(e.is_name for e in nat.allow):
            self._names_task = asyncio.ensure_future(self._refresh_names(container))
        if container.limits.defer_cpu:
            self._cpu_task = asyncio.ensure_future(self._apply_cpu_when_ready(container))
            with contextlib.suppress(asyncio.CancelledError):
                await self._cpu_task
        self.log.debug("kernel %s start: %s", self.kernel_id, container.phases.text())

    async def _refresh_names(self, container: Container) -> None:
        """Every ``nat.REFRESH_S`` seconds while the kernel runs: resolve the host names of
        its allow-list again, their new addresses swapped into its rules
        (``Container.refresh_network``); a name that stopped resolving keeps the old rules
        and is logged. Started by ``post_launch``, cancelled by ``cleanup``."""
        from ..network.nat import REFRESH_S

        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                if await asyncio.to_thread(container.refresh_network):
                    self.log.info(
                        "kernel %s: allow-listed names moved; rules updated", self.kernel_id
                    )
            except SandboxError as exc:
                self.log.warning("kernel %s: allow-list refresh: %s", self.kernel_id, exc)

    async def _apply_cpu_when_ready(self, container: Container) -> None:
        timeout = self.settings.cpu_defer_timeout if self.settings else 60.0
        try:
            await asyncio.wait_for(
                _wait_kernel_info(
                    dict(self.connection_info),
                    alive=lambda: container.proc is not None and container.proc.poll() is None,
                ),
                timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.debug(
                "kernel %s: no kernel_info reply (%s); applying the CPU cap anyway",
                self.kernel_id,
                exc,
            )
        container.phases.mark("first kernel_info reply")
        if (
            container is self.container
            and container.proc is not None
            and container.proc.poll() is None
        ):

            def apply() -> None:
                with self._limits_lock:  # checked again: a restart may have come meanwhile
                    if container is self.container:
                        container.apply_deferred_cpu()

            try:
                await asyncio.to_thread(apply)
            except SandboxError as exc:
                self.log.warning("kernel %s: could not apply the CPU cap: %s", self.kernel_id, exc)
            container.phases.mark("cpu cap")

    # ---- contract: end ---------------------------------------------------------------------
    async def _seen_alive(self, container: Container) -> None:
        """The kernel runs: move the cap baseline on (``exits.CapBaseline.alive``), so that a
        cap hit it survived is not blamed for a later death. Called by ``poll`` (the
        restarter's, every few seconds), at most once a second."""
        caps, now = self._caps, time.monotonic()
        if caps is None or not caps.due(now):
            return
        counts = await asyncio.to_thread(_cap_counts, container)
        if counts is not None:
            caps.alive(counts, now)

    def _record_exit(self, result: ExitResult) -> None:
        """Keep how the container ended (once per start); log and persist a death that was
        not asked for, or that a cap caused, for the restarted kernel to report."""
        if self._exit_recorded:
            return
        self._exit_recorded = True
        since = self._caps.counts if self._caps is not None else exits.CapCounts()
        result = exits.verdict(result, since, stop=self._stop, sent=frozenset(self._sent))
        stop_requested = self._stop is not None
        data = result.to_json()
        data["kernel_id"] = self.kernel_id
        data["kernelspec"] = self.kernelspec_name
        data["container_id"] = self.container_id
        self.last_exit = data
        abnormal = (
            result.oom_killed
            or result.pids_limit_hit
            or result.setup_error
            or (result.signal is not None and not stop_requested)
        )
        if abnormal:
            self.log.warning(
                "kernel %s (%s) stopped: %s", self.kernel_id, self.display_name, result.reason()
            )
        if not stop_requested and self._relay is not None:
            self._relay.tell(self._death_notice(result), kind="death")
        if abnormal or not stop_requested:
            self._abnormal_exit = data
            try:
                exits.record(str(self.kernel_id), data)
            except OSError as exc:
                self.log.warning("kernel %s: cannot keep the exit reason: %s", self.kernel_id, exc)

    def _death_notice(self, result: ExitResult) -> str:
        """The line the running cell gets when its kernel stopped without being asked to
        (``result``: this death's verdict), with what to do about a cap. Called by
        ``_record_exit`` before the kernel is restarted; reads nothing from the host."""
        died = result.signal is not None or result.oom_killed or result.pids_limit_hit
        verb = "died" if died else "stopped"
        reason = (_shown_exit(result.to_json()) or {}).get("reason") or result.reason()
        text = f"the kernel {verb}: {reason}; its variables are lost"
        settings = self.settings
        if settings is None:
            return text
        live = settings.policy.ceilings.or_start(self._start_limits or settings.limits)
        for hit, name, now in (
            (result.oom_killed, "memory", result.memory_limit),
            (result.pids_limit_hit, "pids", result.pids_limit),
        ):
            if not hit:
                continue
            top, bound = live.of(name), BOUNDS[name]
            if top is not None and now is not None and now >= top:
                text += f"; the {name} limit is already the most this kernel may have"
            elif top is not None:
                text += (
                    f"; after the restart, %sandbox {name}={bound.short(top)} raises the "
                    "limit (the most allowed)"
                )
            break
        return text

    async def _close_relay(self) -> None:
        if self._relay is not None:
            await asyncio.to_thread(self._relay.close)
            self._relay = None

    async def _close_control(self) -> None:
        if self._control is not None:
            await asyncio.to_thread(self._control.close)
            self._control = None

    def _locked(self, step: Callable[[], None]) -> None:
        """Run ``step`` (a change of the container's limits, or its destruction) under the
        limits lock (blocking: in a thread)."""
        with self._limits_lock:
            step()

    async def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Requests of the in-kernel %sandbox magics (control.py bounds and rate-limits them;
        ``limits.plan_change`` validates a change against the bounds and the ceilings).
        Runs in the control thread's event loop, not the provisioner's."""
        container, settings = self.container, self.settings
        if container is None or settings is None:
            return {"ok": False, "error": RESTARTING}
        try:
            admin, ceilings = await self._ceilings(settings)
        except SpecError:
            return {"ok": False, "error": POLICY_UNREADABLE}
        if request.get("op") == "get":
            info = self._info(container, settings, admin, ceilings)
            info["notebook_quota"] = await asyncio.to_thread(self._quota_info, settings)
            info["network"] = await asyncio.to_thread(self._network_info, container)
            return {"ok": True, "info": info}
        return await asyncio.to_thread(self._change_limits, container, request, ceilings)

    async def _ceilings(self, settings: KernelSettings) -> tuple[Ceilings, Ceilings]:
        """(the administrator's ceilings for the kernel's user, the live ceilings: those, else
        the kernelspec's start caps), read from today's policy. The one reading of the
        ceilings for a live change or report, whether from the kernel's ``%sandbox``
        (``_control_request``) or the server's REST API (``sandbox_status``,
        ``change_limits``). Raises SpecError (logged here: its text names host paths) when
        the administrator's policy cannot be read."""
        try:
            policy = await asyncio.to_thread(read_policy, SandboxPolicy(parent=self))
        except SpecError as exc:
            self.log.warning("kernel %s: %s", self.kernel_id, exc)
            raise
        try:
            policy = policy.for_user(settings.host_uid)
        except SpecError as exc:
            self.log.warning("kernel %s: %s", self.kernel_id, exc)
            raise
        live = policy.ceilings.or_start(
            self._start_limits or settings.limits, self._start_bandwidth
        )
        return policy.ceilings, live

    # ---- the server's REST API (jupyter.api) ---------------------------------------------
    def state(self) -> str:
        """``running``, ``starting`` (between a start's steps, or restarting) or ``dead`` (the
        kernel process ended and no start is under way), as the REST API reports it; never
        blocks. The death itself is read by ``poll``."""
        container = self.container
        if container is None:
            return "starting" if self._between_starts else "dead"
        if container.proc is None:
            return "starting"
        return "running" if container.proc.poll() is None else "dead"

    async def sandbox_status(self) -> dict[str, Any]:
        """What the REST API shows of this kernel (``jupyter.api``): state, image, limits,
        live ceilings, cgroup usage (None once dead or unreadable), last exit, whether the
        kernel may write its notebook folder; never a host path. Polls first, so a death
        is known (and told in the running cell) the moment anyone asks. Called by the API's
        GET handlers on the server's event loop."""
        if self.has_process:
            await self.poll()
        container, settings = self.container, self.settings
        state = self.state()
        image = container.spec.image if container is not None else None
        limits: dict[str, Any] = {"memory": None, "cpus": None, "pids": None}
        ceilings: dict[str, Any] = dict(limits)
        ceilings["bandwidth"] = None
        usage: dict[str, Any] | None = None
        writable: bool | None = None
        enforced = False
        network: dict[str, Any] | None = None
        if container is not None and settings is not None:
            lim = container.limits
            limits = {"memory": lim.memory, "cpus": lim.cpus, "pids": lim.pids}
            enforced = container.limits_enforced
            with contextlib.suppress(SpecError):  # logged by _ceilings
                live = (await self._ceilings(settings))[1]
                ceilings = {name: live.of(name) for name in (*LIVE, *LIVE_NETWORK)}
            network = await asyncio.to_thread(self._network_info, container)
            if state == "running":
                usage = await asyncio.to_thread(_usage, container)
            writable = await asyncio.to_thread(self._folder_writable, settings)
        return {
            "kernel_id": self.kernel_id,
            "kernelspec": self.kernelspec_name,
            "display_name": self.display_name,
            "image": image or (settings.image if settings is not None else None),
            "image_digest": self._image_digest or None,
            "state": state,
            "limits": limits,
            "ceilings": ceilings,
            "usage": usage,
            # mode; with 'nat': address, allow-list, bandwidth (bits/s), bytes in and out,
            # connections refused by the allow-list
            "network": network,
            "limits_enforced": enforced,
            "last_exit": _shown_exit(self.last_exit),
            "notebook_folder_writable": writable,
        }

    async def change_limits(self, changes: dict[str, Any]) -> dict[str, Any]:
        """A live change asked through the server's REST API (``changes``: some of memory,
        cpus, pids and, network ``nat``, bandwidth): the same checks and the same path to
        the cgroup (or the link) as ``%sandbox memory=2G`` (``_control_request``). Returns
        its answer (``ok``, ``limits``, ``warnings`` or ``error``); raises LimitRefused
        (CeilingRefused above a ceiling). Called by the API's PATCH handler."""
        return await self._control_request({**changes, "op": "set"})

    def _folder_writable(self, settings: KernelSettings) -> bool | None:
        """May the kernel write its notebook folder (``folder.check``; a read-only mount is
        never writable)? None when unknown. Called by ``sandbox_status`` (blocking: in a
        thread)."""
        return self._folder_access(settings, self.cwd).writable

    def _change_limits(
        self, container: Container, request: dict[str, Any], ceilings: Any
    ) -> dict[str, Any]:
        """Check a live change (``limits.plan_change``, and ``check_live`` for a ``nat``
        kernel's bandwidth; raises LimitRefused) and apply it to ``container``, under the
        limits lock, only while it still serves this kernel: the one place a change from the
        kernel reaches the cgroup or the link. Called (blocking, in a thread) by
        ``_control_request``."""
        with self._limits_lock:
            if container is not self.container:
                return {"ok": False, "error": RESTARTING}
            usage: int | None
            try:
                usage = container.stats().memory_current
            except SandboxError:
                usage = None
            is_nat = container.network is not None
            new, warnings = plan_change(request, container.limits, ceilings, usage, network=is_nat)
            rate = None
            if is_nat and "bandwidth" in request:
                rate = int(check_live("bandwidth", request["bandwidth"], ceilings))
            try:
                if any(name in request for name in LIVE):
                    container.update(new)
                if rate is not None:
                    container.set_bandwidth(rate)
            except SandboxError as exc:  # its text names host paths: the log has it, not the kernel
                self.log.warning("kernel %s: limits %s not applied: %s", self.kernel_id, new, exc)
                return {
                    "ok": False,
                    "error": "the host could not apply the new limits; the old ones stay (the "
                    "server's log has the details)",
                }
            lim = container.limits
            for name in LIVE:
                if name in request:
                    self._live[name] = getattr(lim, name)
            if rate is not None:
                self._live["bandwidth"] = rate
        shown = f"{new}" + (f", bandwidth {format_rate(rate)}" if rate is not None else "")
        self.log.info("kernel %s: limits changed from the kernel: %s", self.kernel_id, shown)
        limits: dict[str, Any] = {"memory": lim.memory, "cpus": lim.cpus, "pids": lim.pids}
        if container.network is not None:
            limits["bandwidth"] = container.network.bandwidth
        return {"ok": True, "limits": limits, "warnings": warnings}

    def _network_info(self, container: Container) -> dict[str, Any]:
        """The kernel's network for ``%sandbox`` and the REST API: mode, and with ``nat``
        its address, allow-list, bandwidth (bits per second, None: no cap), bytes in and
        out and the connections the allow-list refused (``Container.network_stats``: a
        sysfs read and a firewall counter). Called in a thread (blocking)."""
        try:
            return container.network_stats()
        except SandboxError as exc:
            self.log.warning("kernel %s: network figures unreadable: %s", self.kernel_id, exc)
            return {"mode": container.spec.network.value}

    def _quota_info(self, settings: KernelSettings) -> dict[str, Any] | None:
        """The notebook folder's quota for ``%sandbox`` (limit and use, bytes and files), or
        None when it has none; never a host path. Called by the ``get`` request (in a thread)."""
        if not self.cwd or settings.notebook_readonly:
            return None
        try:
            usage = read_quota(self.cwd)
        except SandboxError as exc:
            self.log.warning("kernel %s: %s", self.kernel_id, exc)
            return None
        if not usage.project or not usage.bytes_limit:
            return None
        return {
            "bytes_limit": usage.bytes_limit,
            "bytes_used": usage.bytes_used,
            "files_limit": usage.files_limit,
            "files_used": usage.files_used,
        }

    def _info(
        self, container: Container, settings: KernelSettings, ceilings: Any, live: Any
    ) -> dict[str, Any]:
        """What ``%sandbox`` shows: names, image, limits, the admin's ceilings (shown),
        the live ceilings (``live``: the admin's, else the kernelspec's; for the advice after
        a death), last death, whether the kernel can write its notebook folder (a stat)."""
        lim = container.limits
        access = self._folder_access(settings, self.cwd)
        return {
            "kernel_id": self.kernel_id,
            "kernelspec": self.kernelspec_name,
            "container_id": container.id,
            "image": container.spec.image,
            "image_digest": self._image_digest,
            "limits": {
                "memory": lim.memory,
                "cpus": lim.cpus,
                "cpu_deferred": lim.defer_cpu,
                "pids": lim.pids,
                "network": settings.network.value,
            },
            "ceilings": {name: ceilings.describe(name) for name in ("memory", "cpus", "bandwidth")}
            | {"pids": ceilings.pids},
            # numbers, for the advice after a death (never above what may be asked for)
            "ceiling_values": {name: live.of(name) for name in (*LIVE, *LIVE_NETWORK)},
            "previous_exit": self._previous_exit,
            # False: rootless without a delegated cgroup, allowed by the admin
            "limits_enforced": container.limits_enforced,
            # None: unknown; False with no problem: mounted read-only (notebook_folder='ro')
            "notebook_folder_writable": access.writable,
            "notebook_folder_problem": access.problem,
        }

    async def cleanup(self, restart: bool = False) -> None:
        """Stop the control socket and the CPU task, destroy the container (or gc a
        re-attached one's leftovers); on a final shutdown also forget the kept exit reason and
        the container id. Called by the KernelManager after every shutdown, restarts included."""
        self._between_starts = restart
        self._unwatch_exit()
        member, self._member = self._member, None
        if member is not None:  # claimed, never handed over: its container goes below
            member.sock.close()
        # a reading of the end the watcher started finishes first: it must not record (and
        # keep) the exit after this cleanup forgot it
        task, self._exit_task = self._exit_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close_control()
        await self._close_relay()
        for name in ("_cpu_task", "_names_task"):
            running = getattr(self, name)
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running
                setattr(self, name, None)
        container = self.container
        if container is not None:
            await asyncio.to_thread(self._locked, container.destroy)
            result = container.poll()
            if result is not None:
                self._record_exit(result)
            self.container = None
        elif self._reattached_pid is not None:
            if process_alive(self._reattached_pid, self._reattached_start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._reattached_pid, signal.SIGKILL)
            await asyncio.to_thread(collect_leftovers)
            self._reattached_pid = None
        if not restart:
            if self.kernel_id:
                exits.forget(str(self.kernel_id))
            self.container_id = None
            self._live = {}
            if self._conn_fd is not None:
                os.close(self._conn_fd)
                self._conn_fd = None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """The KernelManager's own wait time, unchanged (called at each shutdown)."""
        return recommended

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        """At least 20 s before the restarter counts a start as stable (called by it)."""
        # Creating the container adds well under a second; a py2 kernel on a loaded host
        # may need more than the default to answer.
        return max(recommended, 20.0)

    def resolve_path(self, path_str: str) -> str | None:
        """Only paths inside the notebook directory (the only host path the kernel sees).
        Called through the KernelManager by jupyter_server's path-resolution API."""
        if not self.cwd:
            return None
        path = Path(self.cwd, path_str) if not os.path.isabs(path_str) else Path(path_str)
        real = os.path.realpath(path)
        if (real == self.cwd or real.startswith(self.cwd.rstrip("/") + "/")) and os.path.exists(
            real
        ):
            return real
        return None

    # ---- persistence -------------------------------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        """The base info plus container id, executor pid, notebook folder and last exit, for
        applications that persist kernels (jupyter_client itself never calls it)."""
        info = await super().get_provisioner_info()
        pid = self.container.pid if self.container is not None else self._reattached_pid
        info.update(
            {
                "container_id": self.container_id,
                "supervisor_pid": pid,
                "cwd": self.cwd,
                "last_exit": self.last_exit,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Take back what ``get_provisioner_info`` saved; re-attach to the container when its
        executor still runs (``find_container``). Called by applications that persist kernels."""
        await super().load_provisioner_info(provisioner_info)
        cid = provisioner_info.get("container_id")
        self.container_id = cid if isinstance(cid, str) and is_container_id(cid) else None
        self.cwd = provisioner_info.get("cwd")
        self.last_exit = provisioner_info.get("last_exit")
        self._reattached_pid = None
        if self.container_id is not None:
            try:
                info: ContainerInfo = find_container(self.container_id)
            except SandboxError:
                return
            if info.running():
                self._reattached_pid = info.supervisor_pid
                self._reattached_start = info.pidinfo.get("start")

    # ---- description -------------------------------------------------------------------------
    def describe(self) -> str:
        """One line of the resolved settings (image, caps, uid), for logs and debugging;
        nothing in the package calls it."""
        s = self.settings
        if s is None:
            return "not started"
        lim = s.limits
        return (
            f"image {s.image}, memory {format_size(lim.memory)}, cpus {format_cpus(lim.cpus)}, "
            f"pids {lim.pids}, uid {s.uid}"
        )


def _stopped_by_server(stop: str | None) -> str:
    """What the death reason says once the KernelManager stopped the kernel by SIGTERM or
    SIGKILL, after ``stop`` (a shutdown request it sent, when it did). Its ``restart``
    argument is not passed on every path, so the reason does not use it."""
    forced = "stopped by the server"
    if stop is None or stop == "sent by the server" or stop.endswith(forced):
        return forced
    return f"{stop}, then {forced}"


#: What the REST API and the cell say of a sandbox that could not start (the executor's
#: error names host paths: the server's log has it).
SETUP_FAILED = "the sandbox could not start (the server's log says why)"


def _shown_exit(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """``data`` (an exit as ``_record_exit`` keeps it) as the REST API and the death notice
    show it: a setup error's text, which names host paths, replaced by ``SETUP_FAILED``."""
    if data is None or not data.get("setup_error"):
        return data
    return {**data, "setup_error": SETUP_FAILED, "reason": SETUP_FAILED}


def _usage(container: Container) -> dict[str, Any] | None:
    """The container's cgroup usage for the REST API (blocking: run in a thread), None when
    unreadable (the kernel just ended, or no cgroup: caps not enforced)."""
    try:
        st = container.stats()
    except SandboxError:
        return None
    return {
        "memory_current": st.memory_current,
        "memory_peak": st.memory_peak,
        "cpu_usage_us": st.cpu_usage_us,
        "pids_current": st.pids_current,
        "oom_kills": st.oom_kills,
        "pids_limit_hits": st.pids_limit_hits,
    }


def _cap_counts(container: Container) -> exits.CapCounts | None:
    """The container's cap-hit counters now (blocking: run in a thread), None if unreadable."""
    try:
        return exits.CapCounts.of(container.stats())
    except SandboxError:
        return None


def _containers_of_user(settings: KernelSettings, members: bool) -> list[ContainerInfo]:
    """The running kernels (and, with ``members``, idle pool members) of a kernel's user:
    a rootless server's run root holds only its user's containers (whatever uid they run as
    inside); a root server's, every user's: those of that kernel uid. Blocking (reads the
    run dirs): the kernel count, the pool's room."""
    mine = os.geteuid() != 0
    return [
        info
        for info in running_containers(run_dir())
        if ("kernel_id" in info.meta or (members and info.meta.get(META_POOL)))
        and (mine or info.meta.get("user") == settings.uid)
    ]


def _room_for_member(settings: KernelSettings) -> bool:
    """May the pool make one more member for this user: kernels and idle members stay
    within the user's kernel count. Called by the pool (in a thread) before each."""
    top = settings.policy.max_kernels
    return top is None or len(_containers_of_user(settings, True)) < top


def _member_spec(
    spec: ContainerSpec,
    command: tuple[str, ...],
    conn_file: str,
    connection: str,
    meta: dict[str, object],
    member_id: str,
) -> tuple[ContainerSpec, dict[str, object], dict[str, tuple[int, int, int]]]:
    """A pool member of the kernel spec ``spec``: its own id and hostname, the member's
    program as ``command``, and a connection file with a placeholder key of its own (made
    from the session's ``connection``, whose key it replaces); the kernel's meta.json
    fields ``meta``; the relay's folder in its run dir. Called by the pool per member."""
    # as the cold start has it: 0644 in a folder only the kernel's user may enter
    files = ((conn_file, 0o644, pool_mod.placeholder_connection(connection)),)
    made = replace(spec, id=member_id, hostname=member_id, command=command, files=files)
    return made, meta, {launch.RELAY_SUBDIR: (os.geteuid(), os.getegid(), 0o700)}


async def _wait_kernel_info(connection_info: dict[str, Any], alive: Callable[[], bool]) -> None:
    """Connect a private client over the kernel's sockets and wait for a kernel_info reply
    (or for the kernel to die: ``alive`` turns False)."""
    import zmq.asyncio
    from jupyter_client.asynchronous.client import AsyncKernelClient

    context = zmq.asyncio.Context()
    # The kernel's ipc sockets appear a few hundred ms after the container starts; retry the
    # connection every 5 ms (zmq's default of 100 ms made readiness visible ~50 ms late).
    context.setsockopt(zmq.RECONNECT_IVL, 5)
    client = AsyncKernelClient(context=context)
    try:
        client.load_connection_info(connection_info)  # type: ignore[arg-type]
        client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        while alive():
            client.kernel_info()  # a request sent before the kernel listens may be dropped: resend
            try:
                reply = await client.get_shell_msg(timeout=0.5)
            except Exception:
                continue
            if reply.get("msg_type") == "kernel_info_reply":
                return
    finally:
        client.stop_channels()
        context.destroy(linger=0)
