"""Talk to a Jupyter server (or a hub) as the server and hub tests do: one REST call with a
token, and one cell over a kernel's websocket.

The websocket client speaks the JSON protocol jupyter_server offers at
``/api/kernels/ID/channels``; every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any


def rest_call(
    url: str, token: str, method: str = "GET", body: Any = None, timeout: float = 120
) -> tuple[int, Any]:
    """One REST call authenticated with ``token``: the HTTP status and the decoded JSON
    answer (the text when it is no JSON; None when empty), an error status included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    if not raw:
        return status, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


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
