"""The real server path: jupyter_server as a subprocess (loopback only) starts sandbox kernels
over REST and runs cells over the websocket; bad kernelspec settings come back in the REST
error; deleting the kernel leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.jupyter import kernelspecs
from sandbox_kernel.paths import run_dir
from sandbox_kernel.runtime.rundir import META_POOL
from tests.privileged.conftest import leftovers
from tests.wsclient import execute_over_websocket, rest_call

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self, url: str, token: str, root: Path, proc: subprocess.Popen[bytes], log: Path
    ) -> None:
        self.url, self.token, self.root, self.proc, self.log = url, token, root, proc, log

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return rest_call(self.url + path, self.token, method, body)


def spawn_jupyter(
    base: Path,
    prefix: Path,
    root: Path,
    app: str,
    args: Iterable[str],
    *,
    env_extra: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[str, str, subprocess.Popen[bytes], Path]:
    """Start ``python -m app`` (jupyter_server or jupyterlab) on a free loopback port with a
    fresh token, its Jupyter folders in ``base``, the kernelspecs and config of ``prefix``
    (as a ``kernelspec install --prefix`` leaves them) and ``root`` (made, the kernels'
    owner's) as its root folder; ``args``: more options. Waits (bounded) for /api/status.
    Returns (url, token, process, log). Used by ``launch_server`` and the lab tests."""
    root.mkdir()
    if os.geteuid() == 0:
        os.chown(root, 1000, 1000)  # kernels run as the folder's owner; rootless: the server's
    eps = kernelspecs.entry_point_dir(base / "eps")
    token = secrets.token_hex(16)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base),
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        # where kernelspec install enabled the server extension (as for a --prefix install)
        "JUPYTER_CONFIG_PATH": str(prefix / "etc" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(eps)]),
        **(env_extra or {}),
    }
    for key in ("SANDBOX_KERNEL_STATE_DIR", "SANDBOX_KERNEL_RUN_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    log = base / f"{app}.log"
    cmd = [
        sys.executable,
        "-m",
        app,
        f"--ServerApp.token={token}",
        f"--port={port}",
        "--ip=127.0.0.1",
        "--no-browser",
        "--allow-root",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.port_retries=0",
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(base))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if rest_call(url + "/api/status", token, "GET", None)[0] == 200:
                return url, token, proc, log
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{app} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_jupyter(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Stop a server ``spawn_jupyter`` started as JupyterHub's spawner does (SIGINT: it
    exits without shutting its kernels down), killing it past ``timeout`` seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch_server(base: Path, extra: tuple[str, ...] = ()) -> Server:
    """A jupyter_server with the sandbox kernelspecs (and a broken and a big one) in its
    own folder ``base``, ready (bounded wait); ``extra``: more command-line options."""
    prefix = base / "prefix"
    kernelspecs.install(None, prefix=str(prefix))
    kernels = prefix / "share" / "jupyter" / "kernels"
    bad = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    bad["display_name"] = "Broken (sandbox)"
    bad["metadata"]["kernel_provisioner"]["config"]["memory"] = "lots"
    (kernels / "broken-sandbox").mkdir()
    (kernels / "broken-sandbox" / "kernel.json").write_text(json.dumps(bad))
    big = json.loads((kernels / "python3-sandbox" / "kernel.json").read_text())
    big["metadata"]["kernel_provisioner"]["config"]["memory"] = "2G"
    (kernels / "big-sandbox").mkdir()
    (kernels / "big-sandbox" / "kernel.json").write_text(json.dumps(big))
    root = base / "root"
    url, token, proc, log = spawn_jupyter(
        base,
        prefix,
        root,
        "jupyter_server",
        ("--SandboxPolicy.max_memory=1G", *extra),  # the admin's ceiling, as in its config
        env_extra={"SECRET_OF_THE_SERVER": "must-not-leak"},
    )
    srv = Server(url, token, root, proc, log)
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    srv = launch_server(base)
    proc = srv.proc
    try:
        yield srv
    finally:
        stop_jupyter(proc)
        shutil.rmtree(base, ignore_errors=True)


def run_cell(srv: Server, kernel_id: str, code: str, timeout: float = 90) -> tuple[str, str]:
    url = srv.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    return execute_over_websocket(f"{url}?token={srv.token}", code, timeout)


def test_kernel_over_rest_and_websocket(
    server: Server, assert_no_leftovers: Callable[[Iterable[str]], None]
) -> None:
    code, model = server.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
    assert code == 201, model
    kid = model["id"]
    try:
        status, out = run_cell(
            server,
            kid,
            "import os, socket, sys\n"
            "print(sys.version_info[0], os.getuid(), os.getcwd(), socket.gethostname())\n"
            "print('SECRET_OF_THE_SERVER' in os.environ, os.environ.get('JPY_PARENT_PID'))\n"
            "open('via-server.txt', 'w').write('x')\n",
        )
        assert status == "ok", out
        lines = out.splitlines()
        container_id = lines[0].split()[-1]  # the hostname is the container id
        assert lines[0] == f"3 1000 {server.root} {container_id}"
        assert (run_dir() / container_id / "meta.json").is_file()
        meta = json.loads((run_dir() / container_id / "meta.json").read_text())
        assert meta["kernel_id"] == kid and meta["kernelspec"] == "python3-sandbox"
        assert lines[1] == "False 1"
        assert (server.root / "via-server.txt").stat().st_uid == 1000
        # interrupt over REST
        code, _ = server.request("POST", f"/api/kernels/{kid}/interrupt")
        assert code == 204
        # restart over REST, then the same websocket URL works again
        code, _ = server.request("POST", f"/api/kernels/{kid}/restart")
        assert code == 200
        status, out = run_cell(server, kid, "print(6 * 7)")
        assert (status, out.strip()) == ("ok", "42")
    finally:
        code, _ = server.request("DELETE", f"/api/kernels/{kid}")
        assert code == 204
    assert_no_leftovers([container_id])
    assert not (run_dir() / "kernels" / kid).exists()


def test_bad_kernelspec_error_reaches_the_rest_client(server: Server) -> None:
    code, reply = server.request("POST", "/api/kernels", {"name": "broken-sandbox", "path": ""})
    assert code == 400, reply
    assert "kernelspec 'broken-sandbox'" in reply["message"]
    assert "memory='lots' is not a size" in reply["message"]
    assert "512M" in reply["message"]  # the accepted form


def test_admin_ceiling_in_server_config_is_enforced(server: Server) -> None:
    code, reply = server.request("POST", "/api/kernels", {"name": "big-sandbox", "path": ""})
    assert code == 400, reply
    assert "kernelspec 'big-sandbox'" in reply["message"]
    assert "memory='2G' is above the administrator's ceiling" in reply["message"]
    assert "SandboxPolicy.max_memory = 1 GiB" in reply["message"]


def test_an_interrupted_server_leaves_no_container(
    tmp_path_factory: pytest.TempPathFactory, images: None
) -> None:
    """jupyter_server without a tty exits on SIGINT ("Interrupted...") without shutting its
    kernels down (JupyterHub's LocalProcessSpawner stops servers so): the provisioner
    destroys their containers at exit, so neither a process, a run dir nor a cgroup is left."""
    from sandbox_kernel.cgroups import get_manager
    from sandbox_kernel.errors import ContainerNotFound

    base = tmp_path_factory.mktemp("interrupted")
    srv = launch_server(base)
    try:
        status, body = srv.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
        assert status == 201, body
        reply, out = run_cell(srv, body["id"], "import os; print(os.getpid())")
        assert reply == "ok", out
        cids = [
            p.name
            for p in run_dir().iterdir()
            if (p / "meta.json").is_file()
            and json.loads((p / "meta.json").read_text()).get("kernel_id") == body["id"]
        ]
        assert len(cids) == 1, cids
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(30)
        assert "Interrupted" in srv.log.read_text()
        assert not (run_dir() / cids[0]).exists(), "the run dir is left"
        with pytest.raises(ContainerNotFound):
            get_manager().open(cids[0])
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _pool_members(server_pid: int) -> list[str]:
    """The idle pool members the server ``server_pid`` made (run dirs marked so)."""
    found = []
    for p in run_dir().iterdir():
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((p / "meta.json").read_text())
            if meta.get(META_POOL) is True and meta.get("owner_pid") == server_pid:
                found.append(p.name)
    return found


def _wait_members(server_pid: int, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if members := _pool_members(server_pid):
            return members
        time.sleep(0.2)
    raise AssertionError(f"the server made no pool member in {timeout} s")


PROBE = (
    "import os, json, socket\n"
    "print(socket.gethostname(), os.getuid(), os.getcwd(),"
    " json.load(open('/run/sandbox/kernel.json'))['key'])\n"
)


def test_pooled_kernels_through_the_server_and_none_left_at_its_exit(
    tmp_path_factory: pytest.TempPathFactory,
    images: None,
    assert_no_leftovers: Callable[[Iterable[str]], None],
) -> None:
    """With a pool (the server's c.SandboxProvisioner.pool_size), the second kernel over
    REST is a claimed member: the same folder and uid over the websocket, its own key; a
    restart works; the server's exit leaves neither kernels nor members."""
    base = tmp_path_factory.mktemp("pooled")
    srv = launch_server(base, ("--SandboxProvisioner.pool_size=1",))
    ids: list[str] = []
    try:
        outs = []
        members: list[str] = []
        for _ in range(2):
            code, body = srv.request(
                "POST", "/api/kernels", {"name": "python3-sandbox", "path": ""}
            )
            assert code == 201, body
            status, out = run_cell(srv, body["id"], PROBE)
            assert status == "ok", out
            outs.append((body["id"], out.split(), members))
            members = _wait_members(srv.proc.pid)  # ready before the next request
        (_, first, _), (second_id, second, before) = outs
        ids += [first[0], second[0]]
        assert second[0] in before  # the second kernel is the member the first left ready
        assert second[1:3] == first[1:3] == ["1000", str(srv.root)]
        assert second[3] != first[3]  # each session its own key
        code, _ = srv.request("POST", f"/api/kernels/{second_id}/restart")
        assert code == 200
        status, out = run_cell(srv, second_id, "print(6 * 7)")
        assert (status, out.strip()) == ("ok", "42")
        ids += _wait_members(srv.proc.pid)
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    assert_no_leftovers(ids)


def test_a_killed_servers_pool_members_are_gcs(
    tmp_path_factory: pytest.TempPathFactory,
    images: None,
    assert_no_leftovers: Callable[[Iterable[str]], None],
) -> None:
    """kill -9 of a server with a pool leaves its members as it leaves its kernels: their
    owner is gone, and gc removes every one of them."""
    from sandbox_kernel.runtime.leftovers import collect_leftovers

    base = tmp_path_factory.mktemp("killed")
    srv = launch_server(base, ("--SandboxProvisioner.pool_size=2",))
    try:
        code, body = srv.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
        assert code == 201, body
        status, out = run_cell(srv, body["id"], "import socket; print(socket.gethostname())")
        assert status == "ok", out
        ids = [out.strip(), *_wait_members(srv.proc.pid)]
        srv.proc.kill()
        srv.proc.wait()
        # each executor takes its container down once its owner's end of the control pipe
        # closed; gc then removes what is left (bounded)
        for _ in range(100):
            collect_leftovers()
            if not any(leftovers(c) for c in ids):
                break
            time.sleep(0.2)
        assert_no_leftovers(ids)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        shutil.rmtree(base, ignore_errors=True)
