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

import os
import pwd
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page

from tests.browser import chromium, launcher_cards, open_notebook, run_cell
from tests.hubserver import Hub, HubTimeout, running_hub

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
    extra = textwrap.dedent(
        f"""\
        c.Spawner.args = [
            "--MappingKernelManager.cull_idle_timeout={CULL_IDLE_S}",
            "--MappingKernelManager.cull_interval=5",
        ]
        """
    )
    try:
        with running_hub(USERS, PREFIX, PROXY, POLICY.format(second=USERS[1]), extra) as h:
            yield h
    except HubTimeout as exc:
        pytest.fail(str(exc))


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


def kernel_cgroups(uid: int) -> list[str]:
    """The user's kernel cgroups that exist now (below the delegated ``kernels`` folders)."""
    return [str(d) for k in kernels_dir(uid) for d in k.iterdir() if d.is_dir()]


def run_dirs(uid: int) -> list[str]:
    """The user's container run dirs that exist now (in the private run root)."""
    runs = Path(f"/tmp/sk-{uid}")
    return [str(p) for p in runs.iterdir() if p.name.startswith("sk-")] if runs.is_dir() else []


def kernels_left(uid: int) -> list[str]:
    """The user's kernel cgroups and container run dirs that exist now."""
    return kernel_cgroups(uid) + run_dirs(uid)


def assert_nothing_left(user: str, uid: int) -> None:
    """No kernel cgroup, process or run dir of ``user`` (waits up to 30 s for them to go)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = kernel_cgroups(uid)
        procs = subprocess.run(
            ["pgrep", "-u", str(uid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        if not left and not procs:
            break
        time.sleep(0.5)
    assert not left, f"{user}'s kernel cgroups left: {left}"
    assert not procs, f"{user}'s processes left: {procs}"
    assert not run_dirs(uid), f"{user}'s run dirs left: {run_dirs(uid)}"


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


@pytest.mark.browser
def test_a_student_works_in_jupyterlab_through_the_hub_in_a_browser(hub: Hub) -> None:
    """What a student does: log in on the hub's page, land in JupyterLab, see only the
    sandbox kernels in the launcher, run a Python 2.7 and a Python 3 notebook (the
    policy's limits shown by ``%sandbox``); another student's login cannot reach that
    server. Stopping the servers leaves nothing behind. On a failure the page's screenshot
    goes beside the kept hub log (SANDBOX_KERNEL_HUB_KEEP_LOG), when one is asked for."""
    first, second = USERS
    uid = pwd.getpwnam(first).pw_uid
    with chromium() as browser:
        page = browser.new_page()
        try:
            login(page, hub, first)
            page.wait_for_url(f"**/user/{first}/lab**", timeout=120_000)
            offered = launcher_cards(page)
            assert sorted(offered) == ["Python 2.7 (sandbox)", "Python 3 (sandbox)"], offered
            py2 = open_notebook(page, "Python 2.7 (sandbox)")
            out = run_cell(page, py2, "import os, sys; print os.getuid(), sys.version_info[0]")
            assert out.split() == [str(uid), "2"], out
            py3 = open_notebook(page, "Python 3 (sandbox)")
            out = run_cell(page, py3, "%sandbox")
            assert "1 GiB (server allows up to 1 GiB)" in out, out
            kernels = hub.api("GET", f"/user/{first}/api/kernels")
            assert sorted(k["name"] for k in kernels) == sorted(SANDBOX_SPECS), kernels

            other = browser.new_page()
            login(other, hub, second)
            other.wait_for_url(f"**/user/{second}/**", timeout=120_000)
            answer = other.goto(f"{hub.url}/user/{first}/api/kernels")
            assert answer is not None and answer.status == 403, answer and answer.status
            assert "python3-sandbox" not in other.content()
        except BaseException:
            keep = os.environ.get("SANDBOX_KERNEL_HUB_KEEP_LOG")  # the hub's folder goes
            if keep:
                page.screenshot(path=keep + ".browser.png")
            raise
    for user in USERS:
        hub.stop(user)
    for user in USERS:
        assert_nothing_left(user, pwd.getpwnam(user).pw_uid)


def login(page: Page, hub: Hub, user: str) -> None:
    """Sign in on the hub's login page (the test hub's authenticator takes any password)."""
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", "any password")
    page.click("#login_submit")
