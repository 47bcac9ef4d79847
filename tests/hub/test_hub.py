"""The teaching hub, end to end: a real JupyterHub with configurable-http-proxy spawns two
students' servers as their own unix accounts; the product's hook applies the host's policy
file; kernels start, run and are limited through the hub's REST API and the websocket.

Run by tools/rootless-tests.sh as root (the hub's user), after it made the test accounts and
a world-readable install; it sets:

* SANDBOX_KERNEL_HUB_USERS: two unix accounts (the first with a subordinate id range);
* SANDBOX_KERNEL_HUB_PREFIX: the install (jupyterhub, jupyterhub-singleuser, sandbox-kernel);
* SANDBOX_KERNEL_HUB_PROXY: the configurable-http-proxy executable.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
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

import pytest

from tests.wsclient import execute_over_websocket, rest_call

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

USERS = os.environ.get("SANDBOX_KERNEL_HUB_USERS", "").split()
PREFIX = os.environ.get("SANDBOX_KERNEL_HUB_PREFIX", "")
PROXY = os.environ.get("SANDBOX_KERNEL_HUB_PROXY", "")
SANDBOX_SPECS = {"python3-sandbox", "python2.7-sandbox"}
V1_MEMORY = "/sys/fs/cgroup/memory"
#: the servers cull a kernel idle this long (seconds; jupyter_server's own culling)
CULL_IDLE_S = 30

if os.geteuid() != 0 or len(USERS) != 2 or not PREFIX or not PROXY:
    pytest.skip(
        "the hub test runs from tools/rootless-tests.sh (as root, with its test accounts)",
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubRefused(Exception):
    """A REST call answered with an error status (``Hub.api``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


@dataclass
class Hub:
    url: str
    token: str
    policy: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        """One REST call (hub API or a user's server through the proxy) as the test's
        admin service; the JSON answer, or a HubRefused with the server's message."""
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

    def spawn(self, user: str) -> None:
        """Start ``user``'s server and wait (bounded) until the hub says it is ready."""
        self.api("POST", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            model = self.api("GET", f"/hub/api/users/{user}")
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                return
            time.sleep(0.5)
        pytest.fail(f"{user}'s server was not ready in 120 s:\n{self.log.read_text()[-4000:]}")

    def stop(self, user: str) -> None:
        """Stop ``user``'s server and wait (bounded) until the hub says it is gone."""
        self.api("DELETE", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not (self.api("GET", f"/hub/api/users/{user}").get("servers") or {}):
                return
            time.sleep(0.5)
        pytest.fail(f"{user}'s server did not stop:\n{self.log.read_text()[-3000:]}")


POLICY = """\
max_memory = "1G"
max_pids = 256
max_kernels = 2
sandboxed_only = true
allowed_images = ["python3-plot", "python2.7-plot"]
user_memory = "1536M"
user_pids = 600

[users.{second}]
max_kernels = 3
user_memory = "2G"
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    # the students' servers read the policy file: every folder above it must let them pass
    # (pytest's own temp dirs are root's alone)
    base = Path(tempfile.mkdtemp(prefix="sk-hub-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    etc = base / "etc"
    etc.mkdir(mode=0o755)
    policy = etc / "policy.toml"
    policy.write_text(POLICY.format(second=USERS[1]))
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
            c.ConfigurableHTTPProxy.command = [{PROXY!r}]
            c.JupyterHub.db_url = "sqlite:///{base}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{base}/cookie_secret"
            c.JupyterHub.pid_file = "{base}/jupyterhub.pid"
            c.JupyterHub.authenticator_class = "dummy"
            c.Authenticator.allow_all = True
            c.JupyterHub.services = [{{"name": "sk-test", "api_token": {token!r}}}]
            c.JupyterHub.load_roles = [{{"name": "admin", "services": ["sk-test"]}}]
            c.Spawner.cmd = [{PREFIX + "/bin/jupyterhub-singleuser"!r}]
            c.Spawner.start_timeout = 120
            c.Spawner.http_timeout = 90
            c.Spawner.pre_spawn_hook = sandbox_kernel.hub.pre_spawn_hook
            c.Spawner.post_stop_hook = sandbox_kernel.hub.post_stop_hook
            c.Spawner.args = [
                "--MappingKernelManager.cull_idle_timeout={CULL_IDLE_S}",
                "--MappingKernelManager.cull_interval=5",
            ]
            """
        )
    )
    log = base / "hub.log"
    env = {
        "PATH": f"{PREFIX}/bin:/usr/bin:/bin",
        "HOME": str(base),
        "SANDBOX_KERNEL_POLICY": str(policy),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [f"{PREFIX}/bin/jupyterhub", "-f", str(config)],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    h = Hub(f"http://127.0.0.1:{port}", token, policy, proc, log)
    deadline = time.monotonic() + 90
    while True:
        try:
            h.api("GET", "/hub/api/", timeout=5)
            break
        except (HubRefused, urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the hub did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    for user in USERS:
        h.api("POST", f"/hub/api/users/{user}")
    try:
        yield h
    finally:
        for user in USERS:
            # the hub may be gone already; the test's checks say what is left
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


def kernels_dir(uid: int) -> list[Path]:
    """The user's delegated kernels cgroups, one per hierarchy that has one."""
    found = []
    for ctrl in ("memory", "pids", "cpu,cpuacct", "unified"):
        d = Path("/sys/fs/cgroup") / ctrl / "sandbox-kernel" / f"user-{uid}" / "kernels"
        if d.is_dir():
            found.append(d)
    flat = Path("/sys/fs/cgroup/sandbox-kernel") / f"user-{uid}" / "kernels"
    if flat.is_dir():
        found.append(flat)
    return found


def user_cap(uid: int) -> int:
    """The user's aggregate memory cap as root wrote it (v1 or v2)."""
    for path in (
        Path(f"{V1_MEMORY}/sandbox-kernel/user-{uid}/memory.limit_in_bytes"),
        Path(f"/sys/fs/cgroup/sandbox-kernel/user-{uid}/memory.max"),
    ):
        if path.exists():
            return int(path.read_text())
    raise AssertionError(f"no delegation for uid {uid}")


def assert_nothing_left(user: str, uid: int) -> None:
    """No kernel cgroup, process or run dir of ``user`` (waits up to 30 s for them to go)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [d for k in kernels_dir(uid) for d in k.iterdir() if d.is_dir()]
        procs = subprocess.run(
            ["pgrep", "-u", str(uid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        if not left and not procs:
            break
        time.sleep(0.5)
    assert not left, f"{user}'s kernel cgroups left: {left}"
    assert not procs, f"{user}'s processes left: {procs}"
    runs = Path(f"/tmp/sk-{uid}")
    assert not runs.exists() or not [p for p in runs.iterdir() if p.name.startswith("sk-")]


def test_students_get_sandbox_kernels_under_the_hosts_policy(hub: Hub) -> None:
    first, second = USERS
    ids = {u: pwd.getpwnam(u).pw_uid for u in USERS}
    for user in USERS:
        hub.spawn(user)
    # the hook delegated each user's cgroup with the policy file's aggregate caps, where the
    # student cannot lift them
    assert user_cap(ids[first]) == 1536 << 20 and user_cap(ids[second]) == 2 << 30
    probe = subprocess.run(
        [
            "runuser",
            "-u",
            first,
            "--",
            "/bin/sh",
            "-c",
            f"echo -1 > {V1_MEMORY}/sandbox-kernel/user-{ids[first]}/memory.limit_in_bytes"
            f" || echo max > /sys/fs/cgroup/sandbox-kernel/user-{ids[first]}/memory.max",
        ],
        capture_output=True,
        timeout=30,
    )
    assert probe.returncode != 0 and user_cap(ids[first]) == 1536 << 20

    # only the sandbox kernelspecs are offered; the plain one is refused by name
    specs = hub.api("GET", f"/user/{first}/api/kernelspecs")
    assert set(specs["kernelspecs"]) == SANDBOX_SPECS, specs
    assert specs["default"] == "python3-sandbox"
    refused, _ = hub.error("POST", f"/user/{first}/api/kernels", {"name": "python3"})
    assert refused in (400, 404, 500)

    # both kernels start, as the student, with the policy's ceilings
    k3 = hub.api("POST", f"/user/{first}/api/kernels", {"name": "python3-sandbox"})["id"]
    k2 = hub.api("POST", f"/user/{first}/api/kernels", {"name": "python2.7-sandbox"})["id"]
    status, out = hub.cell(first, k3, "import os, sys; print(os.getuid(), sys.version_info[0])")
    assert status == "ok" and out.split() == [str(ids[first]), "3"], out
    status, out = hub.cell(first, k2, "import os, sys; print os.getuid(), sys.version_info[0]")
    assert status == "ok" and out.split() == [str(ids[first]), "2"], out
    status, out = hub.cell(first, k3, "r = %sandbox\nprint(r)")
    assert "1 GiB (server allows up to 1 GiB)" in out, out
    status, out = hub.cell(first, k3, "%sandbox memory=2G")
    assert "memory=2G refused: this server allows at most 1 GiB per kernel" in out, out

    # a third kernel is over the student's count; the refusal names the running ones
    code, message = hub.error("POST", f"/user/{first}/api/kernels", {"name": "python3-sandbox"})
    assert code in (400, 500) and "already runs 2 kernel(s)" in message, message
    assert "max_kernels" in message and "python2.7-sandbox" in message, message

    # the other student's files are nowhere in the kernel
    home2 = Path(pwd.getpwnam(second).pw_dir)
    secret = home2 / "secret.txt"
    secret.write_text("not yours")
    os.chown(secret, ids[second], ids[second])
    secret.chmod(0o600)
    status, out = hub.cell(
        first,
        k3,
        f"import os\nprint(os.path.exists({str(secret)!r}), os.path.exists({str(home2)!r}))",
    )
    assert status == "ok" and out.split() == ["False", "False"], out

    # the second student has their own count (their section of the file)
    got = [
        hub.api("POST", f"/user/{second}/api/kernels", {"name": "python3-sandbox"})["id"]
        for _ in range(3)
    ]
    status, out = hub.cell(second, got[0], "import os; print(os.getuid())")
    assert status == "ok" and out.strip() == str(ids[second]), out

    # shutting the servers down leaves no kernel, cgroup or process of the students: the
    # first stops as LocalProcessSpawner stops it (SIGINT) and cleans up by itself; the
    # second is killed outright first, and the post-stop hook collects what it left
    state = hub.api("GET", f"/hub/api/users/{second}")["servers"][""].get("state") or {}
    assert isinstance(state.get("pid"), int), state
    os.kill(state["pid"], signal.SIGKILL)
    for user in USERS:
        hub.stop(user)
    for user in USERS:
        assert_nothing_left(user, ids[user])
    log = hub.log.read_text()
    assert f"collected what {first}'s kernels left" not in log
    assert f"collected what {second}'s kernels left: 3 run dir(s)" in log, log[-3000:]


def kernels_left(uid: int) -> list[str]:
    """The user's kernel cgroups and container run dirs that exist now."""
    left = [str(d) for k in kernels_dir(uid) for d in k.iterdir() if d.is_dir()]
    runs = Path(f"/tmp/sk-{uid}")
    if runs.is_dir():
        left += [str(p) for p in runs.iterdir() if p.name.startswith("sk-")]
    return left


def test_an_idle_kernel_is_culled_and_leaves_nothing(hub: Hub) -> None:
    """jupyter_server's culling of an idle kernel (the admin's cull_idle_timeout) ends its
    sandbox: no cgroup, process or run dir stays, while the student's server runs on."""
    user = USERS[0]
    uid = pwd.getpwnam(user).pw_uid
    hub.spawn(user)
    try:
        kid = hub.api("POST", f"/user/{user}/api/kernels", {"name": "python2.7-sandbox"})["id"]
        status, out = hub.cell(user, kid, "print 'still here'")
        assert status == "ok" and out.strip() == "still here", out
        assert kernels_left(uid), "the kernel has no sandbox"
        deadline = time.monotonic() + CULL_IDLE_S + 90
        while hub.api("GET", f"/user/{user}/api/kernels"):
            if time.monotonic() > deadline:
                pytest.fail(f"the idle kernel was not culled:\n{hub.log.read_text()[-3000:]}")
            time.sleep(2)
        deadline = time.monotonic() + 30
        while (left := kernels_left(uid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"the culled kernel left {left}"
        assert hub.api("GET", f"/user/{user}/api/status")  # the server itself runs on
        assert "Culling 'idle' kernel 'python2.7-sandbox'" in hub.log.read_text()
    finally:
        hub.stop(user)
    assert_nothing_left(user, uid)
