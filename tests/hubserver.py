"""A real JupyterHub for the hub tests and the hub benchmark: configurable-http-proxy, the
product's spawn hooks, LocalProcessSpawner spawning the given unix accounts, a policy
file, an admin service token; everything on 127.0.0.1.

Started as root (the hub's user) by ``running_hub``; tools/rootless-tests.sh makes the
accounts, the world-readable install (``prefix``) and the proxy first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.wsclient import execute_over_websocket, rest_call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubRefused(Exception):
    """A REST call answered with an error status (``Hub.api``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class HubTimeout(Exception):
    """The hub, or a user's server, did not reach the state waited for in time."""


@dataclass
class Hub:
    url: str
    token: str
    policy: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        """One REST call (hub API or a user's server through the proxy) as the admin
        service; the JSON answer, or a HubRefused with the server's message."""
        status, answer = rest_call(self.url + path, self.token, method, body, timeout)
        if status >= 400:
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise HubRefused(status, str(message))
        return answer

    def error(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        """The status and message of a call that must fail."""
        try:
            self.api(method, path, body)
        except HubRefused as exc:
            return exc.status, exc.message
        raise AssertionError(f"{method} {path} succeeded")

    def cell(self, user: str, kernel_id: str, code: str) -> tuple[str, str]:
        ws = self.url.replace("http://", "ws://")
        url = f"{ws}/user/{user}/api/kernels/{kernel_id}/channels"
        return execute_over_websocket(url, code, 120, [f"Authorization: token {self.token}"])

    def spawn(self, user: str, poll: float = 0.5) -> None:
        """Start ``user``'s server and wait (bounded) until the hub says it is ready."""
        self.api("POST", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            model = self.api("GET", f"/hub/api/users/{user}")
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                return
            time.sleep(poll)
        raise HubTimeout(f"{user}'s server was not ready in 120 s:\n{self.tail(4000)}")

    def stop(self, user: str) -> None:
        """Stop ``user``'s server and wait (bounded) until the hub says it is gone."""
        self.api("DELETE", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not (self.api("GET", f"/hub/api/users/{user}").get("servers") or {}):
                return
            time.sleep(0.5)
        raise HubTimeout(f"{user}'s server did not stop:\n{self.tail(3000)}")

    def tail(self, chars: int) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def running_hub(
    users: list[str], prefix: str, proxy: str, policy_text: str, extra_config: str = ""
) -> Iterator[Hub]:
    """A started hub with ``users`` added; stopped, and its folder removed, on exit."""
    # the students' servers read the policy file: every folder above it must let them pass
    base = Path(tempfile.mkdtemp(prefix="sk-hub-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    etc = base / "etc"
    etc.mkdir(mode=0o755)
    policy = etc / "policy.toml"
    policy.write_text(policy_text)
    policy.chmod(0o644)
    token = secrets.token_hex(16)
    port, api_port, hub_port = free_port(), free_port(), free_port()
    config = base / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            f"""\
            import sandbox_kernel.hub
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {hub_port}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
            c.ConfigurableHTTPProxy.command = [{proxy!r}]
            c.JupyterHub.db_url = "sqlite:///{base}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{base}/cookie_secret"
            c.JupyterHub.pid_file = "{base}/jupyterhub.pid"
            c.JupyterHub.authenticator_class = "dummy"
            c.Authenticator.allow_all = True
            c.JupyterHub.services = [{{"name": "sk-test", "api_token": {token!r}}}]
            c.JupyterHub.load_roles = [{{"name": "admin", "services": ["sk-test"]}}]
            c.Spawner.cmd = [{prefix + "/bin/jupyterhub-singleuser"!r}]
            c.Spawner.start_timeout = 120
            c.Spawner.http_timeout = 90
            c.Spawner.pre_spawn_hook = sandbox_kernel.hub.pre_spawn_hook
            c.Spawner.post_stop_hook = sandbox_kernel.hub.post_stop_hook
            """
        )
        + extra_config
    )
    log = base / "hub.log"
    env = {
        "PATH": f"{prefix}/bin:/usr/bin:/bin",
        "HOME": str(base),
        "SANDBOX_KERNEL_POLICY": str(policy),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [f"{prefix}/bin/jupyterhub", "-f", str(config)],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    h = Hub(f"http://127.0.0.1:{port}", token, policy, proc, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                h.api("GET", "/hub/api/", timeout=5)
                break
            except (HubRefused, urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise HubTimeout(f"the hub did not start:\n{h.tail(4000)}") from None
                time.sleep(0.5)
        for user in users:
            h.api("POST", f"/hub/api/users/{user}")
        yield h
    finally:
        for user in users:
            # the hub may be gone already; the caller's checks say what is left
            with contextlib.suppress(Exception):
                h.stop(user)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        keep = os.environ.get("SANDBOX_KERNEL_HUB_KEEP_LOG")  # a path, for debugging a run
        if keep:
            shutil.copyfile(log, keep)
        shutil.rmtree(base, ignore_errors=True)
