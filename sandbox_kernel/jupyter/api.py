"""The server's REST API of its sandbox kernels: limits, usage, last death; live changes.

Layer: Jupyter. ``serverext._load_jupyter_server_extension`` adds these handlers to the
server's web app (under its base_url); JupyterLab's sandbox panel and ``curl`` use them:

* ``GET /api/sandbox/kernels``: ``{"kernels": [KERNEL, ...]}``, this server's sandbox kernels;
* ``GET /api/sandbox/kernels/{kernel_id}``: one ``KERNEL`` (``SandboxProvisioner.sandbox_status``:
  with its ``network``, a ``nat`` kernel's address, allow-list, bandwidth, bytes in and out and
  refused connections);
* ``PATCH /api/sandbox/kernels/{kernel_id}`` with ``{"memory": "2G", "cpus": 2, "pids": 512}``
  (any of them; ``"bandwidth": "8mbit"`` for a network-mode ``nat`` kernel): the same
  checks and the same path to the cgroup (or the link) as ``%sandbox memory=2G``
  (``SandboxProvisioner.change_limits``); 200 and the ``KERNEL`` with its new limits, 403
  above a ceiling, 400 for a malformed body or value, 409 while the kernel restarts, 500
  when the host could not apply it (the log says why).

A kernel is one of this server's kernel manager whose provisioner is a
``SandboxProvisioner``; any other id is 404. Authentication and authorization are
jupyter_server's own (``@web.authenticated``, ``@authorized`` on the ``kernels`` resource:
GET reads, PATCH writes, and is XSRF-checked as every non-GET request). Errors are JSON
``{"message": ...}`` naming the field and the accepted form; host paths stay in the log.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import CeilingRefused, LimitRefused, SpecError
from ..limits import BOUNDS, LIVE, LIVE_NETWORK
from .provisioner import RESTARTING, SandboxProvisioner

#: The most bytes a PATCH body may have (three small fields).
MAX_BODY = 4096
#: The most characters of an unknown id echoed back in the 404's message.
MAX_ID_SHOWN = 64


def find_provisioner(kernel_manager: Any, kernel_id: str) -> SandboxProvisioner:
    """The ``SandboxProvisioner`` of kernel ``kernel_id`` of ``kernel_manager`` (the server's
    MappingKernelManager); a 404 HTTPError for an unknown id or a kernel of another
    provisioner. Called by the handlers for each request naming a kernel."""
    shown = kernel_id[:MAX_ID_SHOWN]
    try:
        known = kernel_id in kernel_manager
        km = kernel_manager.get_kernel(kernel_id) if known else None
    except (KeyError, TypeError):
        km = None
    if km is None:
        raise web.HTTPError(404, f"no kernel {shown!r} on this server")
    provisioner = getattr(km, "provisioner", None)
    if not isinstance(provisioner, SandboxProvisioner):
        raise web.HTTPError(404, f"kernel {shown!r} is not a sandbox kernel")
    return provisioner


def parse_changes(body: bytes) -> dict[str, Any]:
    """The live changes of a PATCH body: a JSON object with some of memory, cpus, pids and
    (a network-mode ``nat`` kernel) bandwidth, each in a form the product's parsers accept
    (``limits.BOUNDS``: ``"2G"`` or bytes; a number of CPUs; a whole number of processes;
    ``"8mbit"``). A 400 HTTPError names the field and the
    accepted form. The bounds and ceilings are checked after, by ``plan_change`` (through
    ``SandboxProvisioner.change_limits``). Called by the PATCH handler."""
    example = '{"memory": "2G", "cpus": 2, "pids": 512}'
    if len(body) > MAX_BODY:
        raise web.HTTPError(400, f"the body is larger than {MAX_BODY} bytes; send {example}")
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise web.HTTPError(400, f"the body is not JSON; send an object like {example}") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, f"the body must be a JSON object such as {example}")
    fields = (*LIVE, *LIVE_NETWORK)
    unknown = sorted(str(k)[:32] for k in data if k not in fields)
    if unknown:
        raise web.HTTPError(
            400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}"
        )
    if not data:
        raise web.HTTPError(400, f"nothing to change; send some of {', '.join(LIVE)}: {example}")
    for name, raw in data.items():
        bound = BOUNDS[name]
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise web.HTTPError(400, f"{name} must be a string or a number; use {bound.forms}")
        try:
            bound.parser(raw, name)
        except SpecError as exc:  # names the field and the accepted form
            raise web.HTTPError(400, str(exc)) from None
    return data


class _SandboxHandler(APIHandler):
    """The API's common part: the ``kernels`` authorization resource of jupyter_server."""

    auth_resource = "kernels"

    async def model(self, provisioner: SandboxProvisioner) -> dict[str, Any]:
        return await provisioner.sandbox_status()


class SandboxKernelsHandler(_SandboxHandler):
    """``GET /api/sandbox/kernels``."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Every sandbox kernel of this server (a kernel that ends meanwhile is left out)."""
        km = self.kernel_manager
        kernels = []
        for kernel_id in list(km.list_kernel_ids()):
            try:
                provisioner = find_provisioner(km, kernel_id)
            except web.HTTPError:
                continue
            kernels.append(await self.model(provisioner))
        self.finish(json.dumps({"kernels": kernels}))


class SandboxKernelHandler(_SandboxHandler):
    """``GET`` and ``PATCH /api/sandbox/kernels/{kernel_id}``."""

    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        """One sandbox kernel."""
        provisioner = find_provisioner(self.kernel_manager, kernel_id)
        self.finish(json.dumps(await self.model(provisioner)))

    @web.authenticated
    @authorized
    async def patch(self, kernel_id: str) -> None:
        """Change the kernel's limits live; answer its new state, with the warnings."""
        provisioner = find_provisioner(self.kernel_manager, kernel_id)
        changes = parse_changes(self.request.body)
        try:
            reply = await provisioner.change_limits(changes)
        except CeilingRefused as exc:
            raise web.HTTPError(403, str(exc)) from None
        except LimitRefused as exc:
            raise web.HTTPError(400, str(exc)) from None
        if not reply.get("ok"):
            error = str(reply.get("error") or "the change was not applied")
            raise web.HTTPError(409 if error == RESTARTING else 500, error)
        model = await self.model(provisioner)
        model["warnings"] = list(reply.get("warnings") or [])
        self.finish(json.dumps(model))


def handlers(base_url: str) -> list[tuple[str, type[APIHandler]]]:
    """The API's routes under the server's ``base_url``. Called by the server extension's
    ``_load_jupyter_server_extension``."""
    root = url_path_join(base_url, "api", "sandbox", "kernels")
    return [
        (root, SandboxKernelsHandler),
        (url_path_join(root, r"(?P<kernel_id>[^/]+)"), SandboxKernelHandler),
    ]
