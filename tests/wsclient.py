"""Run one cell over a Jupyter server's kernel websocket (shared by the server and hub tests).

The client speaks the JSON websocket protocol jupyter_server offers at
``/api/kernels/ID/channels``; every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import json
import time
import uuid


def execute_over_websocket(
    url: str, code: str, timeout: float = 90, headers: list[str] | None = None
) -> tuple[str, str]:
    """Execute ``code`` in the kernel behind the websocket ``url``; return the reply's status
    (``ok``, ``error``; ``""`` if none came in time) and the stream output, error names
    included."""
    import websocket

    ws = websocket.create_connection(url, timeout=timeout, header=headers or [])
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                        "date": "",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        out: list[str] = []
        status = ""
        idle = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(msg["content"]["ename"] + ": " + msg["content"]["evalue"])
            elif msg["msg_type"] == "execute_reply":
                status = msg["content"]["status"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            if status and idle:  # shell and iopub are not ordered with each other
                break
        return status, "".join(out)
    finally:
        ws.close()
