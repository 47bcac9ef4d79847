"""The product's jupyter_server extension: the guarded contents manager, on by default.

Layer: Jupyter. jupyter_server imports this module when its config enables it:
``{"ServerApp": {"jpserver_extensions": {"sandbox_kernel.jupyter.serverext": true}}}`` in a
``jupyter_server_config.d`` folder. That file comes with the wheel (``etc/jupyter``) and is
written by ``sandbox-kernel kernelspec install`` beside the kernelspecs it installs (the
editable install of ``make demo`` gets no data files from pip), so every documented setup
loads it. It may also be listed on the command line:
``--ServerApp.jpserver_extensions='{"sandbox_kernel.jupyter.serverext": true}'``.

* ``_link_jupyter_server_extension`` runs before the server makes its contents manager: a
  file-based class (jupyter_server's default or a subclass of its file managers) is swapped
  for its guarded variant (``jupyter.contents.guard``); any other class keeps no files on
  this host and is left alone.
* ``_load_jupyter_server_extension`` runs once the server is up: it adds the sandbox REST
  API (``jupyter.api``: ``/api/sandbox/kernels``), logs which manager guards the files, and
  says loudly when an admin's class could not be guarded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The config that enables this extension (one place: the wheel's data file and
#: ``kernelspec install`` both write it).
EXTENSION = "sandbox_kernel.jupyter.serverext"
CONFIG = {"ServerApp": {"jpserver_extensions": {EXTENSION: True}}}
CONFIG_FILE = "sandbox_kernel.json"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """jupyter_server's discovery hook: this module is the extension."""
    return [{"module": EXTENSION}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Swap a file-based contents manager class for its guarded variant (called by
    jupyter_server while it links extensions, before it creates the contents manager)."""
    from .contents import guard

    cls = serverapp.contents_manager_class
    guarded = guard(cls)
    if guarded is not None and guarded is not cls:
        serverapp.contents_manager_class = guarded


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Add the sandbox REST API (``jupyter.api``) and say which manager guards the notebook
    folders (called by jupyter_server at start)."""
    from .api import handlers
    from .contents import guard, is_guarded

    serverapp.web_app.add_handlers(".*$", handlers(serverapp.web_app.settings["base_url"]))
    cm = serverapp.contents_manager
    if is_guarded(type(cm)):
        cps = type(cm.checkpoints)
        note = "" if is_guarded(cps) else f"; its checkpoints class {cps.__name__} is not guarded"
        serverapp.log.info(
            "sandbox-kernel: %s guards the notebook folders (links and special files a "
            "kernel made are never followed)%s",
            type(cm).__name__,
            note,
        )
    elif guard(type(cm)) is None:
        serverapp.log.info(
            "sandbox-kernel: contents manager %s keeps no files on this host; nothing to guard",
            type(cm).__name__,
        )
    else:
        serverapp.log.error(
            "sandbox-kernel: contents manager %s is not guarded: links a sandbox kernel makes "
            "in its folder are followed by this server; remove the setting that replaced the "
            "contents manager after start, or use sandbox_kernel.jupyter.contents.guard(cls)",
            type(cm).__name__,
        )


def write_config(config_dir: Path) -> Path:
    """Write the file enabling this extension into ``config_dir/jupyter_server_config.d``
    (called by ``kernelspecs.install`` for the config folder matching where the
    kernelspecs go); returns its path."""
    folder = config_dir / "jupyter_server_config.d"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    return path
