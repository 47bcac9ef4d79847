"""The sandbox REST API (sandbox_kernel.jupyter.api) and the death notice, without root.

* the handlers' parts: the body parser (the product's parsers, the field named in each
  refusal) and the kernel lookup (unknown or non-sandbox ids are 404);
* the provisioner's side with the faked container of test_provisioner_unit: what GET shows,
  a PATCH within and above the ceiling, a death seen the moment the API asks, its notice
  to the running cell (none for a restart asked for);
* the relay's notice: parented to the running cell, delivered even when the relay closes
  right after;
* a real jupyter_server (no sandbox kernel: a plain ipykernel) with the extension: the
  routes, the server's authentication, 404 for an id that is not a sandbox kernel.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session
from tornado import web
from traitlets.config import Config

from sandbox_kernel.errors import CeilingRefused, LimitRefused
from sandbox_kernel.jupyter import api, relay
from sandbox_kernel.jupyter import provisioner as prov
from sandbox_kernel.jupyter.relay import OutputGuard, OutputLimits
from tests.unit import test_provisioner_unit as faked
from tests.unit.test_relay import KEY, _iopub_client, _Log, kernel_message, read_notice
from tests.wsclient import rest_call

REPO = Path(__file__).resolve().parents[2]
FakeContainer, add_spec = faked.FakeContainer, faked.add_spec
#: the faked container layer and a JUPYTER_PATH of kernelspecs (test_provisioner_unit's)
fake_runtime, kernel_dir = faked.fake_runtime, faked.kernel_dir
GiB = 1024**3


# ---- the body parser ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"memory=2G", "the body is not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "nothing to change; send some of memory, cpus, pids"),
        (b'{"memory": "2G", "swap": 1}', "unknown field(s) swap; the fields are memory, cpus"),
        (b'{"memory": "lots"}', "memory='lots' is not a size; use bytes, or a number with K"),
        (b'{"cpus": "many"}', "cpus='many' is not a CPU count; use a positive number"),
        (b'{"pids": 1.5}', "pids=1.5"),
        (b'{"pids": true}', "pids must be a string or a number; use a whole number"),
        (b'{"memory": [1]}', "memory must be a string or a number"),
        (b'{"bandwidth": "16"}', "bandwidth='16' has no unit; use bits per second as tc"),
        (b'{"bandwidth": 16000000}', "bandwidth=16000000 is not a rate"),
        (b" " * (api.MAX_BODY + 1), "larger than 4096 bytes"),
    ],
)
def test_a_bad_body_is_a_400_naming_the_field_and_the_form(body: bytes, expected: str) -> None:
    with pytest.raises(web.HTTPError) as err:
        api.parse_changes(body)
    assert err.value.status_code == 400
    assert expected in str(err.value.log_message)


def test_values_in_the_products_forms_pass_unchanged() -> None:
    body = b'{"memory": "1.5G", "cpus": 0.5, "pids": "256"}'
    assert api.parse_changes(body) == {"memory": "1.5G", "cpus": 0.5, "pids": "256"}
    assert api.parse_changes(b'{"memory": 1073741824}') == {"memory": GiB}
    assert api.parse_changes(b'{"bandwidth": "8mbit"}') == {"bandwidth": "8mbit"}


# ---- the kernel lookup ------------------------------------------------------------------------
class _Manager:
    """The MappingKernelManager's lookup (``in``, ``get_kernel``), over a dict."""

    def __init__(self, kernels: dict[str, Any]) -> None:
        self.kernels = kernels

    def __contains__(self, kernel_id: str) -> bool:
        return kernel_id in self.kernels

    def get_kernel(self, kernel_id: str) -> Any:
        return self.kernels[kernel_id]

    def list_kernel_ids(self) -> list[str]:
        return list(self.kernels)


class _Km:
    def __init__(self, provisioner: Any) -> None:
        self.provisioner = provisioner


def test_unknown_and_non_sandbox_ids_are_404() -> None:
    sandbox = prov.SandboxProvisioner.__new__(prov.SandboxProvisioner)  # no traits needed
    km = _Manager({"a": _Km(sandbox), "b": _Km(object()), "c": _Km(None)})
    assert api.find_provisioner(km, "a") is sandbox
    for kernel_id, expected in (
        ("b", "kernel 'b' is not a sandbox kernel"),
        ("c", "kernel 'c' is not a sandbox kernel"),
        ("z" * 500, "no kernel 'zzzz"),
    ):
        with pytest.raises(web.HTTPError) as err:
            api.find_provisioner(km, kernel_id)
        assert err.value.status_code == 404
        message = str(err.value.log_message)
        assert expected in message and len(message) < 120


def test_the_routes_are_under_the_base_url() -> None:
    routes = dict(api.handlers("/user/ann/"))
    assert routes["/user/ann/api/sandbox/kernels"] is api.SandboxKernelsHandler
    assert routes["/user/ann/api/sandbox/kernels/(?P<kernel_id>[^/]+)"] is api.SandboxKernelHandler


# ---- the provisioner's side -------------------------------------------------------------------
class _Told:
    """Stands in for ``Relay.tell`` of the kernel's current relay."""

    def __init__(self, p: prov.SandboxProvisioner, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        assert p._relay is not None
        monkeypatch.setattr(p._relay, "tell", self.tell)

    def tell(self, text: str, kind: str = "death") -> None:
        self.texts.append(text)


async def test_status_limits_usage_and_live_changes_within_the_ceiling(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path
) -> None:
    add_spec(kernel_dir, "t-api", {"image": "python3", "memory": "1G", "pids": 100})
    cfg = Config()
    cfg.SandboxPolicy.max_memory = "2G"
    km = AsyncKernelManager(kernel_name="t-api", config=cfg)
    nb = tmp_path / "nb"
    nb.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(nb, 1000, 1000)  # the kernel runs as the folder's owner
    await km.start_kernel(cwd=str(nb))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    try:
        status = await p.sandbox_status()
        assert status["kernel_id"] == km.kernel_id and status["kernelspec"] == "t-api"
        assert status["display_name"] == "Test t-api" and status["image"] == "python3:latest"
        assert status["image_digest"] == "sha256:abc" and status["state"] == "running"
        assert status["limits"] == {"memory": GiB, "cpus": 1.0, "pids": 100}
        # the live ceilings: the admin's memory, else the kernelspec's start values
        assert status["ceilings"] == {
            "memory": 2 * GiB,
            "cpus": 1.0,
            "pids": 100,
            "bandwidth": None,
        }
        assert status["usage"] == {
            "memory_current": 100 * 1024**2,
            "memory_peak": 100 * 1024**2,
            "cpu_usage_us": 0,
            "pids_current": 3,
            "oom_kills": 0,
            "pids_limit_hits": 0,
        }
        assert status["limits_enforced"] is True and status["last_exit"] is None
        assert status["notebook_folder_writable"] is True
        nb.chmod(0o555)
        assert (await p.sandbox_status())["notebook_folder_writable"] is False
        json.dumps(status)  # what the handler sends
        c = FakeContainer.created[-1]
        reply = await p.change_limits({"memory": "1.5G", "pids": 80})
        assert reply["ok"] and c.limits.memory == int(1.5 * GiB) and c.limits.pids == 80
        with pytest.raises(CeilingRefused, match=r"memory=4G refused: .*at most 2 GiB"):
            await p.change_limits({"memory": "4G"})
        with pytest.raises(CeilingRefused, match="at most 100 processes"):
            await p.change_limits({"pids": 200})
        with pytest.raises(LimitRefused, match="too small") as err:
            await p.change_limits({"memory": "1M"})
        assert not isinstance(err.value, CeilingRefused)
        assert c.limits.memory == int(1.5 * GiB)  # nothing refused reached the container
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_death_is_known_when_asked_and_told_in_the_cell(
    fake_runtime: Path,
    kernel_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_spec(kernel_dir, "t-die", {"image": "python3", "memory": "512M"})
    cfg = Config()
    cfg.SandboxPolicy.max_memory = "2G"
    km = AsyncKernelManager(kernel_name="t-die", config=cfg)
    await km.start_kernel(cwd=str(tmp_path))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    try:
        told = _Told(p, monkeypatch)
        c = FakeContainer.created[-1]
        c.oom_kills = 1
        assert c.proc is not None
        c.proc.send_signal(signal.SIGKILL)  # as the OOM killer would
        c.proc.wait()
        # nobody polled yet: the API's question finds the death
        status = await p.sandbox_status()
        assert status["state"] == "dead" and status["usage"] is None
        last = status["last_exit"]
        assert last["oom_killed"] is True and last["reason"].startswith("out of memory")
        assert told.texts == [
            "the kernel died: out of memory (limit 512 MiB, peak 512 MiB); its variables are "
            "lost; after the restart, %sandbox memory=2G raises the limit (the most allowed)"
        ]
        assert not await km.is_alive()
        assert len(told.texts) == 1  # once per death
        await km.restart_kernel(now=True)
        assert (await p.sandbox_status())["state"] == "running"
        assert (await p.sandbox_status())["last_exit"]["oom_killed"] is True
        # a restart asked for: no notice
        told = _Told(p, monkeypatch)
        await km.restart_kernel(now=True)
        assert told.texts == []
        # a death by a signal nobody sent
        told = _Told(p, monkeypatch)
        c = FakeContainer.created[-1]
        assert c.proc is not None
        c.proc.send_signal(signal.SIGSEGV)
        c.proc.wait()
        assert not await km.is_alive()
        assert told.texts == ["the kernel died: killed by SIGSEGV; its variables are lost"]
    finally:
        await km.shutdown_kernel(now=True)


async def test_the_notice_at_the_ceiling_says_it_is_the_most(
    fake_runtime: Path, kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_spec(kernel_dir, "t-top", {"image": "python3", "pids": 50})
    km = AsyncKernelManager(kernel_name="t-top")
    await km.start_kernel(cwd=str(tmp_path))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner)
    try:
        told = _Told(p, monkeypatch)
        c = FakeContainer.created[-1]
        c.pids_hits = 1
        assert c.proc is not None
        c.proc.kill()
        c.proc.wait()
        assert not await km.is_alive()
        assert told.texts == [
            "the kernel died: killed by SIGKILL; the process limit (50) was reached; its "
            "variables are lost; the pids limit is already the most this kernel may have"
        ]
    finally:
        await km.shutdown_kernel(now=True)


def test_a_setup_error_is_shown_without_its_host_paths() -> None:
    data = {"reason": "the sandbox could not start: mount /var/lib/x: EPERM", "code": 1}
    data["setup_error"] = "mount /var/lib/x: EPERM"
    shown = prov._shown_exit(data)
    assert shown is not None and "/var" not in json.dumps(shown)
    assert shown["reason"] == prov.SETUP_FAILED and shown["code"] == 1
    plain = {"reason": "killed by SIGSEGV", "setup_error": None}
    assert prov._shown_exit(plain) == plain and prov._shown_exit(None) is None


# ---- the relay's notice ------------------------------------------------------------------------
def test_the_kernel_notice_goes_to_the_running_cell() -> None:
    session = Session(key=KEY)
    guard = OutputGuard(OutputLimits(), Session(key=KEY))
    cell = session.msg("execute_request", content={"code": "x"})
    info = session.msg("kernel_info_request", content={})
    for msg in (cell, info):  # as the client sends them on shell
        guard.from_client("shell", session.serialize(msg, ident=[b"client"]))
    # the kernel answered the kernel_info, and died before its "busy" for the cell left
    for state in ("busy", "idle"):
        frames = kernel_message(session, "status", {"execution_state": state}, info["header"])
        assert guard.admit("iopub", frames)[0]
    notice = read_notice(guard.kernel_notice("the kernel died: x"))
    assert notice["parent_header"]["msg_id"] == cell["header"]["msg_id"]
    assert notice["content"] == {"name": "stderr", "text": "[sandbox-kernel] the kernel died: x\n"}


@pytest.fixture
def bare_relay(tmp_path: Path) -> Iterator[tuple[relay.Relay, Any, dict[str, Any]]]:
    """A relay to nothing (no kernel sockets bound) and a zmq context for its clients."""
    import zmq

    (tmp_path / "k").mkdir()
    (tmp_path / "c").mkdir()
    ports = {f"{ch}_port": n for n, ch in enumerate(relay.CHANNELS, 1)}
    base = {"transport": "ipc", "key": KEY.decode(), "signature_scheme": "hmac-sha256", **ports}
    cinfo = {**base, "ip": str(tmp_path / "c" / "s")}
    r = relay.Relay({**base, "ip": str(tmp_path / "k" / "s")}, cinfo, OutputLimits(), _Log())
    ctx = zmq.Context()
    try:
        yield r, ctx, cinfo
    finally:
        r.close()
        ctx.destroy(linger=0)


def test_a_told_notice_arrives_even_when_the_relay_closes_right_after(
    bare_relay: tuple[relay.Relay, Any, dict[str, Any]],
) -> None:
    r, ctx, cinfo = bare_relay
    r.guard.last_execute = {"msg_id": "cell-1", "msg_type": "execute_request"}
    r.start()
    sub = _iopub_client(ctx, cinfo)
    # a PUB drops what it sends before the subscription arrived: tell until one comes
    for _ in range(100):
        r.tell("hello", kind="test")
        if sub.poll(100):
            break
    else:
        pytest.fail("no notice reached the subscriber")
    first = read_notice(sub.recv_multipart())
    assert first["parent_header"]["msg_id"] == "cell-1"
    while sub.poll(200):
        sub.recv_multipart()
    r.tell("the kernel died: test")
    r.close()  # what the restart does right after
    assert sub.poll(5000)
    last = read_notice(sub.recv_multipart())
    assert last["content"]["text"] == "[sandbox-kernel] the kernel died: test\n"
    r.tell("after the close")  # dropped, no error
    assert not sub.poll(200)


# ---- a real server ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A jupyter_server with the extension and only the host's plain python3 kernel:
    (url, token)."""
    base = tmp_path_factory.mktemp("api-server")
    token, port = secrets.token_hex(16), _free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyter_server",
        f"--ServerApp.token={token}",
        f"--port={port}",
        "--ip=127.0.0.1",
        "--no-browser",
        "--allow-root",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={base}",
        "--ServerApp.jpserver_extensions={'sandbox_kernel.jupyter.serverext': True}",
    ]
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if rest_call(url + "/api/status", token)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"jupyter server did not start:\n{log.read_text()[-3000:]}")
        if proc.poll() is not None:
            pytest.fail(f"jupyter server exited:\n{log.read_text()[-3000:]}")
        yield url, token
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _anonymous(url: str, method: str = "GET", body: bytes | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_the_server_serves_the_api_with_its_own_auth(plain_server: tuple[str, str]) -> None:
    url, token = plain_server
    assert rest_call(url + "/api/sandbox/kernels", token) == (200, {"kernels": []})
    assert _anonymous(url + "/api/sandbox/kernels") == 403
    assert _anonymous(url + "/api/sandbox/kernels/x", "PATCH", b'{"memory": "1G"}') == 403
    code, reply = rest_call(url + "/api/sandbox/kernels/no-such-id", token)
    assert code == 404 and "no kernel 'no-such-id'" in reply["message"]
    code, reply = rest_call(url + "/api/sandbox/kernels/no-such-id", token, "PATCH", {"m": 1})
    assert code == 404, reply
    # a kernel of this server that is not a sandbox kernel: not the API's
    code, model = rest_call(url + "/api/kernels", token, "POST", {"name": "python3"})
    assert code == 201, model
    kid = model["id"]
    try:
        code, reply = rest_call(url + f"/api/sandbox/kernels/{kid}", token)
        assert code == 404 and "is not a sandbox kernel" in reply["message"]
        code, reply = rest_call(url + f"/api/sandbox/kernels/{kid}", token, "PATCH", {"cpus": 1})
        assert code == 404 and "traceback" not in json.dumps(reply).lower()
        assert rest_call(url + "/api/sandbox/kernels", token) == (200, {"kernels": []})
    finally:
        assert rest_call(url + f"/api/kernels/{kid}", token, "DELETE")[0] == 204
