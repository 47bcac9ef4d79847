"""The sandbox REST API on a real jupyter_server (a subprocess, loopback only) with real
python3-sandbox kernels: the server's authentication and XSRF check, limits and usage read
from the cgroup, a live change that reaches the cgroup and one above the ceiling refused,
no way for a kernel to act on another through the API or its own control socket, a kernel
of another live server unknown (404) here, and a death by the memory cap told in the
running cell and shown by GET."""

from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox_kernel.cgroups import get_manager
from sandbox_kernel.paths import run_dir
from tests.privileged.test_server import Server, launch_server, run_cell, stop_jupyter

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

MiB, GiB = 1024**2, 1024**3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("api-server")
    srv = launch_server(base)  # SandboxPolicy.max_memory=1G
    try:
        yield srv
    finally:
        stop_jupyter(srv.proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def kernel(server: Server) -> Iterator[str]:
    """A python3-sandbox kernel of ``server`` that answered a first cell; its id."""
    code, model = server.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
    assert code == 201, model
    kid = str(model["id"])
    try:
        status, out = run_cell(server, kid, "print('up')")
        assert (status, out.strip()) == ("ok", "up")
        yield kid
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


def container_of(kernel_id: str) -> str:
    """The container id of ``kernel_id`` (from the run dirs' metadata)."""
    found = [
        p.name
        for p in run_dir().iterdir()
        if (p / "meta.json").is_file()
        and json.loads((p / "meta.json").read_text()).get("kernel_id") == kernel_id
    ]
    assert len(found) == 1, found
    return found[0]


def cgroup_memory_limit(kernel_id: str) -> int | None:
    return get_manager().open(container_of(kernel_id)).stats().memory_limit


def test_auth_is_the_servers(server: Server, kernel: str) -> None:
    url = server.url + f"/api/sandbox/kernels/{kernel}"
    for method, body in (("GET", None), ("PATCH", b'{"memory": "512M"}')):
        req = urllib.request.Request(url, data=body, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 403, (method, err.value.code)
    wrong = Server(server.url, "not-the-token", server.root, server.proc, server.log)
    assert wrong.request("GET", "/api/sandbox/kernels")[0] == 403
    assert cgroup_memory_limit(kernel) == GiB  # nothing changed


def test_a_cookie_session_needs_the_xsrf_token_to_patch(server: Server, kernel: str) -> None:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(server.url + "/login", timeout=30).read()  # the _xsrf cookie
    xsrf = next(str(c.value) for c in jar if c.name == "_xsrf")
    form = urllib.parse.urlencode({"password": server.token, "_xsrf": xsrf}).encode()
    opener.open(server.url + "/login", data=form, timeout=30).read()
    url = server.url + f"/api/sandbox/kernels/{kernel}"
    with opener.open(url, timeout=30) as resp:  # GET with the session cookie alone
        assert json.loads(resp.read())["kernel_id"] == kernel
    body = b'{"memory": "768M"}'
    headers = {"Content-Type": "application/json"}
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(urllib.request.Request(url, body, headers, method="PATCH"), timeout=30)
    assert err.value.code == 403
    assert cgroup_memory_limit(kernel) == GiB
    req = urllib.request.Request(url, body, {**headers, "X-XSRFToken": xsrf}, method="PATCH")
    with opener.open(req, timeout=30) as resp:
        assert json.loads(resp.read())["limits"]["memory"] == 768 * MiB
    assert cgroup_memory_limit(kernel) == 768 * MiB


def test_get_shows_limits_and_usage_and_patch_reaches_the_cgroup(
    server: Server, kernel: str
) -> None:
    code, listing = server.request("GET", "/api/sandbox/kernels")
    assert code == 200 and kernel in [k["kernel_id"] for k in listing["kernels"]]
    code, model = server.request("GET", f"/api/sandbox/kernels/{kernel}")
    assert code == 200, model
    assert model["kernelspec"] == "python3-sandbox" and model["state"] == "running"
    assert model["image"].startswith("python3") and model["image_digest"].startswith("sha256:")
    assert model["limits"] == {"memory": GiB, "cpus": 1.0, "pids": 256}
    assert model["ceilings"]["memory"] == GiB  # SandboxPolicy.max_memory=1G
    assert model["limits_enforced"] is True and model["last_exit"] is None
    assert model["notebook_folder_writable"] is True
    usage = model["usage"]
    assert 1 * MiB < usage["memory_current"] <= GiB and usage["memory_peak"] >= 1 * MiB
    assert usage["pids_current"] >= 1 and usage["cpu_usage_us"] > 0
    assert usage["oom_kills"] == 0 and usage["pids_limit_hits"] == 0
    assert str(server.root) not in json.dumps(model) and "/sys/fs" not in json.dumps(model)
    # within the ceiling: reaches the cgroup
    code, model = server.request(
        "PATCH", f"/api/sandbox/kernels/{kernel}", {"memory": "512M", "pids": 128}
    )
    assert code == 200, model
    assert model["limits"]["memory"] == 512 * MiB and model["limits"]["pids"] == 128
    assert cgroup_memory_limit(kernel) == 512 * MiB
    status, out = run_cell(  # what the kernel's %sandbox is told
        server,
        kernel,
        "import sandbox_magics as m; print(m.ask_host({'op': 'get'})['info']['limits']['memory'])",
    )
    assert (status, out.strip()) == ("ok", str(512 * MiB)), out
    # above it, or malformed: refused, nothing changes
    code, reply = server.request("PATCH", f"/api/sandbox/kernels/{kernel}", {"memory": "2G"})
    assert code == 403 and "memory=2G refused" in reply["message"], reply
    assert "at most 1 GiB" in reply["message"]
    code, reply = server.request("PATCH", f"/api/sandbox/kernels/{kernel}", {"memory": "lots"})
    assert code == 400 and "memory='lots' is not a size" in reply["message"], reply
    code, reply = server.request("PATCH", f"/api/sandbox/kernels/{kernel}", {"swap": "1G"})
    assert code == 400 and "unknown field(s) swap" in reply["message"], reply
    assert cgroup_memory_limit(kernel) == 512 * MiB
    for bad in ("no-such-kernel", str(uuid.uuid4())):
        code, reply = server.request("GET", f"/api/sandbox/kernels/{bad}")
        assert code == 404 and "no kernel" in reply["message"], reply
        code, reply = server.request("PATCH", f"/api/sandbox/kernels/{bad}", {"memory": "1G"})
        assert code == 404, reply


def test_a_kernel_cannot_act_on_another(server: Server, kernel: str) -> None:
    code, model = server.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
    assert code == 201, model
    other = str(model["id"])
    try:
        port = urllib.parse.urlsplit(server.url).port
        # from inside kernel A: the server's API is out of reach (no network but its own
        # loopback), and its control socket takes no kernel id (it only acts on A)
        status, out = run_cell(
            server,
            kernel,
            "import json, os, socket, urllib.request\n"
            "try:\n"
            f"    url = 'http://127.0.0.1:{port}/api/sandbox/kernels'\n"
            "    urllib.request.urlopen(url, timeout=5)\n"
            "    print('api reached')\n"
            "except Exception as exc:\n"
            "    print('api unreachable', type(exc).__name__)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(os.environ['SANDBOX_KERNEL_CONTROL'])\n"
            "s.sendall(json.dumps({'op': 'set', 'memory': '300M', 'kernel_id': "
            f"{other!r}}}).encode() + b'\\n')\n"
            "print(s.recv(65536).decode().strip())\n",
        )
        assert status == "ok", out
        lines = out.splitlines()
        assert lines[0].startswith("api unreachable"), out
        reply = json.loads(lines[1])
        assert reply["ok"] is False and "unknown field(s) kernel_id" in reply["error"], reply
        for kid in (kernel, other):
            assert cgroup_memory_limit(kid) == GiB
            code, model = server.request("GET", f"/api/sandbox/kernels/{kid}")
            assert code == 200 and model["limits"]["memory"] == GiB
    finally:
        server.request("DELETE", f"/api/kernels/{other}")


class Cell:
    """One cell sent over a kernel's websocket; ``notices`` reads its stream output until
    the death notice (bounded)."""

    def __init__(self, srv: Server, kernel_id: str, code: str, timeout: float = 120) -> None:
        import websocket

        url = srv.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        self.ws = websocket.create_connection(f"{url}?token={srv.token}", timeout=timeout)
        self.timeout = timeout
        self.msg_id = uuid.uuid4().hex
        header = {"msg_id": self.msg_id, "msg_type": "execute_request", "username": "t"}
        header |= {"session": uuid.uuid4().hex, "version": "5.3", "date": ""}
        content = {"code": code, "silent": False, "store_history": False}
        content |= {"user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
        msg: dict[str, Any] = {"header": header, "parent_header": {}, "metadata": {}}
        self.ws.send(json.dumps(msg | {"channel": "shell", "buffers": [], "content": content}))

    def output_until_death(self) -> list[str]:
        texts: list[str] = []
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                got = json.loads(self.ws.recv())
                if got.get("parent_header", {}).get("msg_id") != self.msg_id:
                    continue
                if got["msg_type"] == "stream":
                    texts.append(got["content"]["text"])
                    if "the kernel died" in got["content"]["text"]:
                        break
        finally:
            self.ws.close()
        return texts


NOTICE = (
    r"\[sandbox-kernel\] the kernel died: out of memory \(limit 256 MiB, peak [\d.]+ MiB\); "
    r"its variables are lost; after the restart, %sandbox memory=1G raises the limit"
)


def test_a_death_by_the_memory_cap_is_told_in_the_cell_at_once(server: Server, kernel: str) -> None:
    """The restarter notices the death (nobody asks the API): the notice is in the cell
    before the restart, and GET keeps the reason once the kernel is back."""
    code, model = server.request("PATCH", f"/api/sandbox/kernels/{kernel}", {"memory": "256M"})
    assert code == 200, model
    texts = Cell(server, kernel, "x = bytearray(600 << 20)").output_until_death()
    notice = [t for t in texts if t.startswith("[sandbox-kernel] the kernel died")]
    assert len(notice) == 1 and re.match(NOTICE, notice[0]), texts
    for _ in range(600):  # bounded: the restarted kernel comes back
        code, model = server.request("GET", f"/api/sandbox/kernels/{kernel}")
        if model["state"] == "running":
            break
        time.sleep(0.1)
    assert model["state"] == "running", model
    last = model["last_exit"]
    assert last["oom_killed"] is True and last["reason"].startswith("out of memory"), last
    assert last["memory_limit"] == 256 * MiB
    assert model["limits"]["memory"] == 256 * MiB  # the live change outlives the restart
    status, out = run_cell(server, kernel, "print('back')")
    assert status == "ok" and "back" in out, out


@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[Server]:
    """A server whose kernels are not restarted (no restarter polls them)."""
    base = tmp_path_factory.mktemp("api-lone")
    srv = launch_server(base, ("--KernelManager.autorestart=False",))
    try:
        yield srv
    finally:
        stop_jupyter(srv.proc)
        shutil.rmtree(base, ignore_errors=True)


def test_get_finds_a_death_at_once_and_the_cell_is_told(lone_server: Server) -> None:
    srv = lone_server
    code, model = srv.request("POST", "/api/kernels", {"name": "python3-sandbox", "path": ""})
    assert code == 201, model
    kid = str(model["id"])
    try:
        assert run_cell(srv, kid, "print(1)")[0] == "ok"
        code, model = srv.request("PATCH", f"/api/sandbox/kernels/{kid}", {"memory": "256M"})
        assert code == 200, model
        cell = Cell(srv, kid, "x = bytearray(600 << 20)")
        for _ in range(600):  # bounded; each GET looks at the kernel's process
            code, model = srv.request("GET", f"/api/sandbox/kernels/{kid}")
            if model["state"] != "running":
                break
            time.sleep(0.1)
        assert code == 200 and model["state"] == "dead", model
        assert model["usage"] is None
        assert model["last_exit"]["oom_killed"] is True, model
        assert model["last_exit"]["reason"].startswith("out of memory (limit 256 MiB")
        texts = cell.output_until_death()
        assert any(re.match(NOTICE, t) for t in texts), texts
        # the listing says the same
        code, listing = srv.request("GET", "/api/sandbox/kernels")
        (mine,) = [k for k in listing["kernels"] if k["kernel_id"] == kid]
        assert mine["state"] == "dead"
    finally:
        srv.request("DELETE", f"/api/kernels/{kid}")


def test_a_kernel_of_another_live_server_is_unknown_here(
    server: Server, kernel: str, lone_server: Server
) -> None:
    """Both servers run as the same user on one machine, their kernels' containers side by
    side under the same run root: each server's API answers for its own kernels only."""
    code, model = lone_server.request(
        "POST", "/api/kernels", {"name": "python3-sandbox", "path": ""}
    )
    assert code == 201, model
    lone_kid = str(model["id"])
    try:
        assert run_cell(lone_server, lone_kid, "print(1)")[0] == "ok"
        for here, theirs in ((lone_server, kernel), (server, lone_kid)):
            code, reply = here.request("GET", f"/api/sandbox/kernels/{theirs}")
            assert code == 404, reply
            code, reply = here.request(
                "PATCH", f"/api/sandbox/kernels/{theirs}", {"memory": "512M"}
            )
            assert code == 404, reply
            code, listing = here.request("GET", "/api/sandbox/kernels")
            assert code == 200 and theirs not in [k["kernel_id"] for k in listing["kernels"]]
            assert cgroup_memory_limit(theirs) == GiB, "the other server's kernel was changed"
        # each answers for its own
        for srv, kid in ((server, kernel), (lone_server, lone_kid)):
            code, model = srv.request("GET", f"/api/sandbox/kernels/{kid}")
            assert code == 200 and model["kernel_id"] == kid and model["state"] == "running"
    finally:
        lone_server.request("DELETE", f"/api/kernels/{lone_kid}")
