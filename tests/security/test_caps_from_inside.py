"""Notebook code cannot lift its own caps through its control socket under the default
policy (no ``SandboxPolicy``, no admin ceiling): the kernelspec's values are the most it may
ask for. A real kernel of each image speaks the socket's protocol itself (no magic in
between to check the values first) and asks for memory=1000T, cpus=1e6 and pids=4194304,
each as text and as a number, then all at once; each is refused, and the kernel's cgroup
keeps the values it started with.
"""

from __future__ import annotations

import json

import pytest

from tests.privileged.conftest import (  # noqa: F401  (the fixtures)
    assert_no_leftovers,
    images,
    kernels,
    notebook_dir,
)
from tests.privileged.test_magics import KERNELS, Kernels, execute, sandboxes  # noqa: F401

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

#: Python 2.7 and 3: one request per line of REQUESTS, the replies printed as JSON.
ASK = r"""
import json, os, socket
def ask(request):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.environ['SANDBOX_KERNEL_CONTROL'])
    s.sendall(json.dumps(request).encode('utf-8') + b'\n')
    data = b''
    while not data.endswith(b'\n'):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data.decode('utf-8'))
print(json.dumps([ask(r) for r in REQUESTS]))
"""

REQUESTS = [
    {"op": "set", "memory": "1000T"},
    {"op": "set", "memory": 1000 * 1024**4},
    {"op": "set", "cpus": "1e6"},
    {"op": "set", "cpus": 1e6},
    {"op": "set", "cpus": "1000000"},
    {"op": "set", "pids": "4194304"},
    {"op": "set", "pids": 4194304},
    {"op": "set", "memory": "1000T", "cpus": "1e6", "pids": "4194304"},
]


@pytest.mark.parametrize("name", KERNELS)
async def test_a_notebook_cannot_lift_its_caps_under_the_default_policy(
    sandboxes: Kernels,  # noqa: F811
    name: str,
) -> None:
    km = await sandboxes.start(name)
    before = sandboxes.cgroup(km)
    assert before.memory_limit and before.pids_limit  # the kernelspec's caps are set
    res = await execute(km, ASK.replace("REQUESTS", repr(REQUESTS)))
    assert res.ok, res
    replies = json.loads(res.stdout)
    assert len(replies) == len(REQUESTS)
    for request, reply in zip(REQUESTS, replies, strict=True):
        assert reply["ok"] is False, (request, reply)
        assert "refused" in reply["error"] or "at most" in reply["error"], (request, reply)
    after = sandboxes.cgroup(km)

    def caps(st: object) -> tuple[object, ...]:
        return tuple(getattr(st, k) for k in ("memory_limit", "pids_limit", "cpu_quota_us"))

    assert caps(after) == caps(before)
    assert before.cpu_quota_us is not None  # the kernelspec's CPU cap was applied
