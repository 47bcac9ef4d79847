"""A sandbox kernel flooding output cannot make Jupyter's side hold unbounded memory
(the output relay, sandbox_kernel/jupyter/relay.py): a real kernel prints one 64 MiB line,
then 1 MiB lines as fast as it can, to a client that reads no output meanwhile. The test
process (it holds the provisioner, so the relay, and the client) grows by a bounded amount,
the cells show the notices, and the kernel answers afterwards. Needs root and the python3
image."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from sandbox_kernel.jupyter import provisioner as prov

pytestmark = [pytest.mark.privileged, pytest.mark.images, pytest.mark.slow]

MiB = 1024**2
#: Generous: the defaults let about 8 MiB/s through, plus a 24 MiB burst and short queues.
MAX_GROWTH = 300 * MiB
BIG_PRINT = "print('x' * (64 * 1024 * 1024))"
#: flushed at each line: ipykernel's buffer would otherwise grow past the kernel's own cap
FLOOD = (
    "import sys, time\n"
    "line = 'y' * (1024 * 1024)\n"
    "end = time.time() + 4\n"
    "while time.time() < end:\n"
    "    print(line)\n"
    "    sys.stdout.flush()\n"
)


def rss() -> int:
    """This process's resident memory (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def shell_reply(kc: Any, msg_id: str) -> dict[str, Any]:
    while True:
        reply: dict[str, Any] = await kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


async def outputs(kc: Any, msg_ids: list[str]) -> dict[str, str]:
    """The stream text of each cell, read until each one's idle status."""
    texts = dict.fromkeys(msg_ids, "")
    idle: set[str] = set()
    while idle != set(msg_ids):
        msg = await kc.get_iopub_msg(timeout=120)
        parent = msg["parent_header"].get("msg_id")
        if parent not in texts:
            continue
        if msg["msg_type"] == "stream":
            texts[parent] += msg["content"]["text"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle.add(parent)
    return texts


async def test_flooding_output_keeps_the_client_bounded_and_tells_the_cell(
    kernels: Path,
    notebook_dir: Path,
    assert_no_leftovers: Callable[[Iterable[str]], None],
) -> None:
    km = AsyncKernelManager(kernel_name="python3-sandbox")
    await km.start_kernel(cwd=str(notebook_dir))
    p = km.provisioner
    assert isinstance(p, prov.SandboxProvisioner) and p.container_id
    container_id = p.container_id
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        before = rss()
        big = kc.execute(BIG_PRINT)
        flood = kc.execute(FLOOD)
        # only the (small) shell replies are read until the kernel is done printing
        for msg_id in (big, flood):
            assert (await shell_reply(kc, msg_id))["content"]["status"] == "ok"
        growth = rss() - before
        assert growth < MAX_GROWTH, f"the client grew by {growth / MiB:.0f} MiB"
        texts = await outputs(kc, [big, flood])
        assert "output dropped" in texts[big] and "16 MiB limit" in texts[big]
        assert "x" * 4096 not in texts[big]
        assert "output throttled" in texts[flood]
        after = kc.execute("print('still', 6 * 7)")
        assert (await outputs(kc, [after]))[after].endswith("still 42\n")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert_no_leftovers([container_id])
