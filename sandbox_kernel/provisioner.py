"""The Jupyter kernel provisioner: every kernel in its own container.

``SandboxProvisioner`` implements jupyter_client's provisioner contract
(``KernelProvisionerBase``). One instance serves a kernel for its whole life, across
restarts (``cleanup(restart=True)`` then ``pre_launch``/``launch_kernel`` again).

* pre_launch: validate the settings (kernelspec config + Jupyter config + the
  administrator's ``SandboxPolicy``; an invalid value raises here so that the message
  reaches the user), resolve the image, create the container (run dir, cgroups), write the
  connection file into ``<run dir>/conn`` (ipc transport; the directory is bind-mounted at
  the same path inside the container), and format the in-container kernel command.
* launch_kernel: start the container (in a thread; the executor reports when the kernel
  exec'd).
* post_launch: apply the deferred CPU cap once the kernel answered its first kernel_info.
* poll/wait: report the exit status; a death by OOM, by the pids cap or by a signal is
  logged in one plain line and kept (``last_exit`` and ``<run root>/kernels/<id>/last-exit.json``).
* cleanup: destroy the container (processes, cgroups, run dir).

The container id (and so the connection directory) stays the same across restarts, so
clients connected to the ipc sockets reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from tornado.web import HTTPError

from .config import (
    SETTING_NAMES,
    KernelSettings,
    SandboxPolicy,
    SandboxSettings,
    _forms,
    read_policy,
    resolve_settings,
)
from .container import Container, ExitResult
from .control import ControlServer, LimitCeilings, plan_limit_change
from .errors import SandboxError, SpecError
from .paths import is_container_id, new_container_id, run_dir
from .rundir import ContainerInfo, process_alive
from .spec import Bind, ContainerSpec, Limits
from .units import format_cpus, format_size

LABEL_ARGV = "org.sandbox-kernel.kernel.argv"
LABEL_DISPLAY_NAME = "org.sandbox-kernel.kernel.display_name"
CONN_SUBDIR = "conn"
#: The control socket of the %sandbox magics, in the connection directory (see control.py).
CONTROL_SOCKET = "control"
CONTROL_ENV = "SANDBOX_KERNEL_CONTROL"
#: The in-kernel extension, mounted read-only into every ipykernel-based sandbox kernel.
MAGICS_SOURCE = Path(__file__).resolve().parent / "magics"
MAGICS_TARGET = "/opt/sandbox-kernel/magics"
MAGICS_MODULE = "sandbox_magics"
#: Unix socket paths must fit sockaddr_un.sun_path (108 bytes with the NUL).
MAX_SOCKET_PATH = 107
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")


def kernels_dir(root: Path | None = None) -> Path:
    """``<run root>/kernels``: per-kernel state that outlives a container (last exit reason)."""
    return (root or run_dir()) / "kernels"


def last_exit_path(kernel_id: str, root: Path | None = None) -> Path:
    return kernels_dir(root) / kernel_id / "last-exit.json"


def read_last_exit(kernel_id: str, root: Path | None = None) -> dict[str, Any] | None:
    """The last recorded death reason of a kernel (for the %sandbox magics), or None."""
    try:
        data = json.loads(last_exit_path(kernel_id, root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _HTTPMixin(HTTPError):
    """Lets jupyter_server put our message in the REST error (it hides other exceptions as
    "Unhandled error"), while the exception stays a SandboxError for Python callers."""

    _message = ""

    def _as_http(self, status: int, message: str) -> None:
        self.status_code = status
        self._log_message = message  # tornado's log_message (what the REST error carries)
        self.reason = None
        self._message = message
        self.args = ()  # tornado %-formats log_message with args when logging

    def __str__(self) -> str:
        return self._message


class KernelSpecSettingsError(SpecError, _HTTPMixin):
    """A kernelspec's sandbox settings are invalid (REST status 400)."""

    def __init__(self, problems: list[str] | str, context: str = "") -> None:
        SpecError.__init__(self, problems, context)
        self._as_http(400, Exception.__str__(self))


class KernelSandboxError(SandboxError, _HTTPMixin):
    """The sandbox of a kernel could not be created or started (REST status 500)."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self._as_http(500, message)


def _for_user(exc: SandboxError, context: str) -> SandboxError:
    if isinstance(exc, (KernelSpecSettingsError, KernelSandboxError)):
        return exc
    if isinstance(exc, SpecError):
        return KernelSpecSettingsError(exc.problems, exc.context or context)
    text = str(exc)
    return KernelSandboxError(text if text.startswith(context) else f"{context}: {text}")


class SandboxProvisioner(SandboxSettings, KernelProvisionerBase):  # type: ignore[metaclass]
    """Run the kernel in a sandbox-kernel container (see docs/configuration.md)."""

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
        self._stop_requested = False
        self._cpu_task: asyncio.Task[None] | None = None
        self._reattached_pid: int | None = None
        self._control: ControlServer | None = None
        self._abnormal_exit: dict[str, Any] | None = None  # the last death not asked for
        self._previous_exit: dict[str, Any] | None = None  # ... as seen by the running kernel
        self._image_digest = ""
        self._reattached_start: str | None = None

    # ---- naming ----------------------------------------------------------------------------
    @property
    def kernelspec_name(self) -> str:
        spec: Any = self.kernel_spec
        name = str(getattr(spec, "name", None) or "")
        name = name or str(getattr(self.parent, "kernel_name", None) or "")
        resource_dir = str(getattr(spec, "resource_dir", None) or "")
        if not name and resource_dir:
            name = os.path.basename(resource_dir.rstrip("/"))
        return name or "?"

    @property
    def display_name(self) -> str:
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
        """Apply the kernelspec config to the traits and validate everything (raises SpecError)."""
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
                problems.append(f"{key}={value!r} has the wrong type; {_forms(key)}")
        policy = SandboxPolicy(parent=self)
        ceilings = read_policy(policy)
        values = {name: getattr(self, name) for name in SETTING_NAMES}
        settings: KernelSettings | None = None
        try:
            settings = resolve_settings(
                values,
                ceilings,
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
        if self.container is not None:
            return self.container.proc is not None and not self._waited
        return self._reattached_pid is not None and not self._waited

    async def poll(self) -> int | None:
        if self.container is not None:
            proc = self.container.proc
            if proc is None:
                return 0
            if proc.poll() is None:
                return None
            result = await asyncio.to_thread(self.container.poll)
            if result is None:
                return proc.returncode
            self._record_exit(result)
            return result.status
        if self._reattached_pid is not None:
            return None if process_alive(self._reattached_pid, self._reattached_start) else 0
        return 0

    async def wait(self) -> int | None:
        if self.container is None and self._reattached_pid is None:
            return 0
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.1)
        self._waited = True
        return status

    # ---- contract: signals ----------------------------------------------------------------
    async def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self._stop_requested = True
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
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        self._stop_requested = True
        await self.send_signal(signal.SIGTERM)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._stop_requested = True

    # ---- contract: launch ---------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            return await self._pre_launch(**kwargs)
        except SandboxError as exc:
            raise _for_user(exc, self._context) from exc

    async def _pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km is None:
            raise SandboxError(
                f"{self._context}: the sandbox provisioner needs a kernel manager as parent"
            )
        cwd = kwargs.get("cwd")
        workdir = os.path.realpath(str(cwd)) if cwd else os.path.realpath(os.getcwd())
        if not os.path.isdir(workdir):
            raise SpecError(
                f"the notebook directory {workdir!r} does not exist; "
                "start the kernel from an existing directory",
                context=self._context,
            )
        settings = self.resolve(workdir)
        image = await asyncio.to_thread(_resolve_image, settings.image, self._context)

        # Same container id (so the same connection directory) across restarts.
        if self.container_id is None:
            self.container_id = new_container_id()
        cid = self.container_id
        root = run_dir()
        conn_dir = root / cid / CONN_SUBDIR
        longest = f"{conn_dir}/k-99999"
        if len(longest.encode()) >= MAX_SOCKET_PATH:
            raise SandboxError(
                f"{self._context}: the run directory {root} is too long for unix socket paths "
                f"({longest!r} must stay under {MAX_SOCKET_PATH} bytes); "
                "set SANDBOX_KERNEL_RUN_DIR to a short path such as /run/sk"
            )
        km.transport = "ipc"
        km.ip = f"{conn_dir}/k"
        km.connection_file = f"{conn_dir}/kernel.json"
        km._connection_file_written = False  # the old one left with the old container
        argv = self._kernel_argv(image, km.connection_file, kwargs.pop("extra_arguments", []) or [])
        with_magics = self.magics and any(
            a in ("ipykernel_launcher", "ipykernel") or a.endswith("/ipykernel_launcher.py")
            for a in argv
        )
        if with_magics:
            argv.append(f"--ext={MAGICS_MODULE}")

        env: dict[str, str] = {"PYTHONDONTWRITEBYTECODE": "1"}
        env.update(image.env)
        spec_env = getattr(self.kernel_spec, "env", None) or {}
        env.update({str(k): str(v) for k, v in spec_env.items()})
        env.update(dict(settings.env))
        env["JPY_SANDBOX_KERNEL"] = "1"
        # The kernel's parent inside the container is its init (pid 1): ipykernel then neither
        # polls a parent (the host's pid means nothing here) nor prints its `ipython kernel` note.
        env["JPY_PARENT_PID"] = "1"
        control_path = str(conn_dir / CONTROL_SOCKET)
        env[CONTROL_ENV] = control_path
        if with_magics:
            env["PYTHONPATH"] = ":".join(p for p in (MAGICS_TARGET, env.get("PYTHONPATH")) if p)
        bad_env = [k for k in env if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        if bad_env:
            raise SpecError(
                [
                    f"env key {k!r} (kernelspec env) is invalid; use letters, digits and '_'"
                    for k in bad_env
                ],
                context=self._context,
            )

        mounts: list[Bind] = [
            Bind(source=workdir, target=workdir, readonly=False),
            Bind(source=str(conn_dir), target=str(conn_dir), readonly=False),
            *settings.mounts,
        ]
        if with_magics:
            mounts.append(Bind(source=str(MAGICS_SOURCE), target=MAGICS_TARGET, readonly=True))
        spec = ContainerSpec(
            id=cid,
            layers=tuple(image.layers),
            command=tuple(argv),
            env=tuple(env.items()),
            workdir=workdir,
            user=settings.uid,
            group=settings.gid,
            allow_root=settings.uid == 0,
            hostname=cid,
            writable_size=settings.writable_size,
            tmp_size=settings.tmp_size,
            mounts=tuple(mounts),
            limits=Limits(
                memory=settings.memory, cpus=settings.cpus, pids=settings.pids, defer_cpu=True
            ),
            network=settings.network,
            image=image.ref,
            image_digest=image.digest,
            labels=(("org.sandbox-kernel.kernelspec", self.kernelspec_name),),
        )
        meta = {
            "kernel_id": self.kernel_id,
            "kernelspec": self.kernelspec_name,
            "display_name": self.display_name,
            "image_digest": image.digest,
            "notebook_dir": workdir,
        }
        # The conn dir must exist before the spec is validated (bind source), but it lives in
        # the run dir that Container.create makes: validate with a placeholder first.
        container = await asyncio.to_thread(self._create_container, spec, meta, conn_dir, settings)
        self.container = container
        self.settings = settings
        self.cwd = workdir
        self._waited = False
        self._exit_recorded = False
        self._stop_requested = False
        self._previous_exit = self._abnormal_exit
        self._abnormal_exit = None
        self._image_digest = image.digest
        try:
            jupyter_session = (kwargs.get("env") or {}).get("JPY_SESSION_NAME", "")
            km.write_connection_file(jupyter_session=jupyter_session)
            os.chown(km.connection_file, settings.uid, settings.gid)
            os.chmod(km.connection_file, 0o600)
            self.connection_info = km.get_connection_info()
            self._control = ControlServer(
                control_path, self._control_request, uid=settings.uid, gid=settings.gid
            )
            await self._control.start()
        except BaseException:
            await self._close_control()
            await asyncio.to_thread(container.destroy)
            self.container = None
            raise

        # What launch_kernel needs; the server's environment is deliberately dropped.
        kwargs.pop("env", None)
        kwargs["cwd"] = workdir
        kwargs["cmd"] = argv
        return kwargs

    def _create_container(
        self, spec: ContainerSpec, meta: dict[str, Any], conn_dir: Path, settings: KernelSettings
    ) -> Container:
        try:
            return Container.create(
                spec,
                meta=meta,
                subdirs={conn_dir.name: (settings.uid, settings.gid, 0o700)},
            )
        except SpecError as exc:
            raise SpecError(exc.problems, context=self._context) from None

    def _kernel_argv(self, image: _Image, connection_file: str, extra: list[str]) -> list[str]:
        spec_argv = list(getattr(self.kernel_spec, "argv", None) or [])
        argv = spec_argv or list(image.argv)
        if not argv:
            raise SpecError(
                "argv is empty in the kernelspec and the image has no "
                f"{LABEL_ARGV} label; give the in-container command, e.g. "
                '["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]',
                context=self._context,
            )
        ns = {"connection_file": connection_file}

        def sub(match: re.Match[str]) -> str:
            return ns.get(match.group(1), match.group(0))

        # Not km.format_kernel_cmd: it rewrites "python3" into the *host's* interpreter path.
        return [_PLACEHOLDER.sub(sub, str(a)) for a in argv] + [str(a) for a in extra]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        container = self.container
        if container is None:
            raise SandboxError(f"{self._context}: launch_kernel called without pre_launch")
        stdout = kwargs.get("stdout")
        stderr = kwargs.get("stderr")
        try:
            await asyncio.to_thread(
                container.start, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
        except BaseException as exc:
            await asyncio.to_thread(container.destroy)
            self.container = None
            if isinstance(exc, SandboxError):
                raise _for_user(exc, self._context) from exc
            raise
        self.log.info(
            "kernel %s (%s) started in sandbox %s (%s, as uid %s, setup %.0f ms)",
            self.kernel_id,
            self.display_name,
            container.id,
            container.spec.image,
            container.spec.user,
            (container.setup_us or 0) / 1000,
        )
        return self.connection_info

    async def post_launch(self, **kwargs: Any) -> None:
        """Wait (bounded by cpu_defer_timeout, and only while the kernel lives) for the kernel's
        first kernel_info reply, then apply the CPU cap: start-up runs uncapped, and the
        first cell the user runs is already capped. Clients wait for that reply anyway."""
        container = self.container
        if container is not None and container.limits.defer_cpu:
            self._cpu_task = asyncio.ensure_future(self._apply_cpu_when_ready(container))
            with contextlib.suppress(asyncio.CancelledError):
                await self._cpu_task

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
        if (
            container is self.container
            and container.proc is not None
            and container.proc.poll() is None
        ):
            try:
                await asyncio.to_thread(container.apply_deferred_cpu)
            except SandboxError as exc:
                self.log.warning("kernel %s: could not apply the CPU cap: %s", self.kernel_id, exc)

    # ---- contract: end ---------------------------------------------------------------------
    def _record_exit(self, result: ExitResult) -> None:
        if self._exit_recorded:
            return
        self._exit_recorded = True
        data = result.to_json()
        data["kernel_id"] = self.kernel_id
        data["kernelspec"] = self.kernelspec_name
        data["container_id"] = self.container_id
        self.last_exit = data
        abnormal = (
            result.oom_killed
            or result.pids_limit_hit
            or result.setup_error
            or (result.signal is not None and not self._stop_requested)
        )
        if abnormal:
            self.log.warning(
                "kernel %s (%s) stopped: %s", self.kernel_id, self.display_name, result.reason()
            )
        if abnormal or not self._stop_requested:
            self._abnormal_exit = data
            path = last_exit_path(str(self.kernel_id))
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(path)
            except OSError as exc:
                self.log.warning(
                    "kernel %s: cannot keep the exit reason in %s: %s", self.kernel_id, path, exc
                )

    async def _close_control(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None

    async def _control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Requests of the in-kernel %sandbox magics (control.py validates and rate-limits)."""
        container, settings = self.container, self.settings
        if container is None or settings is None:
            return {"ok": False, "error": "the kernel is restarting; try again in a moment"}
        ceilings = read_policy(SandboxPolicy(parent=self))
        if request.get("op") == "get":
            lim = container.limits
            return {
                "ok": True,
                "info": {
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
                    "ceilings": {
                        "memory": format_size(ceilings.memory) if ceilings.memory else None,
                        "cpus": format_cpus(ceilings.cpus) if ceilings.cpus else None,
                        "pids": ceilings.pids,
                    },
                    "previous_exit": self._previous_exit,
                },
            }
        usage: int | None
        try:
            usage = (await asyncio.to_thread(container.stats)).memory_current
        except SandboxError:
            usage = None
        new, warnings = plan_limit_change(
            request,
            container.limits,
            LimitCeilings(memory=ceilings.memory, cpus=ceilings.cpus, pids=ceilings.pids),
            usage,
        )
        await asyncio.to_thread(container.update, new)
        self.log.info("kernel %s: limits changed from the kernel: %s", self.kernel_id, new)
        lim = container.limits
        return {
            "ok": True,
            "limits": {"memory": lim.memory, "cpus": lim.cpus, "pids": lim.pids},
            "warnings": warnings,
        }

    async def cleanup(self, restart: bool = False) -> None:
        await self._close_control()
        if self._cpu_task is not None:
            self._cpu_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._cpu_task
            self._cpu_task = None
        container = self.container
        if container is not None:
            await asyncio.to_thread(container.destroy)
            result = container.poll()
            if result is not None:
                self._record_exit(result)
            self.container = None
        elif self._reattached_pid is not None:
            if process_alive(self._reattached_pid, self._reattached_start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._reattached_pid, signal.SIGKILL)
            from . import gc

            await asyncio.to_thread(gc.collect)
            self._reattached_pid = None
        if not restart:
            if self.kernel_id:
                shutil.rmtree(kernels_dir() / str(self.kernel_id), ignore_errors=True)
            self.container_id = None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        # Creating the container adds well under a second; a py2 kernel on a loaded host
        # may need more than the default to answer.
        return max(recommended, 20.0)

    def resolve_path(self, path_str: str) -> str | None:
        """Only paths inside the notebook directory (the only host path the kernel sees)."""
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
        await super().load_provisioner_info(provisioner_info)
        cid = provisioner_info.get("container_id")
        self.container_id = cid if isinstance(cid, str) and is_container_id(cid) else None
        self.cwd = provisioner_info.get("cwd")
        self.last_exit = provisioner_info.get("last_exit")
        self._reattached_pid = None
        if self.container_id is not None:
            try:
                info: ContainerInfo = Container.open(self.container_id)
            except SandboxError:
                return
            if info.running():
                self._reattached_pid = info.supervisor_pid
                self._reattached_start = info.pidinfo.get("start")

    # ---- description -------------------------------------------------------------------------
    def describe(self) -> str:
        s = self.settings
        if s is None:
            return "not started"
        return (
            f"image {s.image}, memory {format_size(s.memory)}, cpus {format_cpus(s.cpus)}, "
            f"pids {s.pids}, uid {s.uid}"
        )


class _Image:
    """What the provisioner needs of an image of the store."""

    def __init__(
        self, ref: str, layers: list[str], env: dict[str, str], labels: dict[str, str], digest: str
    ):
        self.ref = ref
        self.layers = layers
        self.env = env
        self.labels = labels
        self.digest = digest

    @property
    def argv(self) -> list[str]:
        raw = self.labels.get(LABEL_ARGV)
        if not raw:
            return []
        try:
            value = json.loads(raw)
        except ValueError:
            return []
        return [str(a) for a in value] if isinstance(value, list) else []


def _pairs(obj: Any) -> dict[str, str]:
    if isinstance(obj, dict):
        return {str(k): str(v) for k, v in obj.items()}
    out: dict[str, str] = {}
    for item in obj or ():
        if isinstance(item, str):
            k, _, v = item.partition("=")
            out[k] = v
        else:
            k, v = item
            out[str(k)] = str(v)
    return out


def _resolve_image(name: str, context: str) -> _Image:
    from .errors import ImageError
    from .images.store import ImageStore

    try:
        image = ImageStore().resolve(name)
    except ImageError as exc:
        raise SpecError(
            f"image={name!r} is not in the image store ({exc}); build it with: "
            f"sandbox-kernel image build {name.split(':', 1)[0]}",
            context=context,
        ) from None
    ref = f"{image.name}:{image.tag}" if getattr(image, "tag", "") else str(image.name)
    return _Image(
        ref=ref,
        layers=[str(p) for p in image.lowerdirs()],
        env=_pairs(image.config.env),
        labels=_pairs(image.config.labels),
        digest=str(getattr(image, "digest", "")),
    )


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
