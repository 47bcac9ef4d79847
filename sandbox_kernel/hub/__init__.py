"""JupyterHub integration: the hook that applies the host's policy to each user's server.

Layer: hub (on top of the Jupyter layer; never imports JupyterHub itself: the hub passes its
spawner in). In ``jupyterhub_config.py``::

    import sandbox_kernel.hub
    c.Spawner.pre_spawn_hook = sandbox_kernel.hub.pre_spawn_hook

Before each user's server starts, as root (the hub's user), the hook

* delegates the user's cgroup with the aggregate caps of the policy file and the host's
  reserve (``jupyter.delegating.delegate_user``, what ``sandbox-kernel delegate USER`` does):
  the bound of all of the user's kernels together, in cgroups the student does not own;
* puts the user's home under the policy file's ``home_quota`` for that user (a project
  quota, ``sandbox_kernel.quota``: the student's kernels cannot lift it, and their server
  refuses kernels in a folder without it); a filesystem without project quotas fails the
  spawn with the fix;
* passes ``SANDBOX_KERNEL_POLICY`` on to the server when the hub has it set (a policy file
  elsewhere than /etc/sandbox-kernel/policy.toml);
* when the policy says ``sandboxed_only = true`` for that user, starts the server with
  ``SandboxOnlyKernelSpecManager`` and a sandbox kernel as the default.

``c.Spawner.post_stop_hook = sandbox_kernel.hub.post_stop_hook`` collects, as root, what
a stopped server's kernels left (a server killed before it could shut them down): their
processes, cgroups and run dirs.

The server needs nothing else: it finds its delegation by its own uid. The unix account is
the hub user's name (LocalProcessSpawner's rule); ``unix_name`` in ``make_pre_spawn_hook``
maps other names.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
from collections.abc import Callable, Coroutine
from typing import Any

from .. import policy as host_policy
from .. import quota
from ..errors import SpecError
from ..jupyter.delegating import delegate_user
from ..jupyter.kernelspecs import KERNELSPEC_NAMES
from ..runtime.leftovers import collect_other_users, orphans_ending

__all__ = [
    "SPEC_MANAGER",
    "make_post_stop_hook",
    "make_pre_spawn_hook",
    "post_stop_hook",
    "pre_spawn_hook",
]

SPEC_MANAGER = "sandbox_kernel.jupyter.specmanager.SandboxOnlyKernelSpecManager"
DEFAULT_KERNEL = "python3-sandbox"
#: How long the post-stop hook waits for a killed server's containers to end (seconds).
ORPHAN_WAIT_S = 10.0
assert DEFAULT_KERNEL in KERNELSPEC_NAMES


def make_pre_spawn_hook(
    unix_name: Callable[[str], str] = lambda name: name,
) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """A ``pre_spawn_hook`` (see the module docstring); ``unix_name`` maps a hub user's
    name to the unix account the server runs as."""

    async def hook(spawner: Any) -> None:
        name = unix_name(str(spawner.user.name))
        await asyncio.to_thread(_account_uid, name)  # a hub name is an account, never a uid
        done = await asyncio.to_thread(delegate_user, name)
        only = done.policy is not None and done.policy.sandboxed_only
        mine = done.policy
        if mine is not None and mine.home_quota is not None:
            home = await asyncio.to_thread(_account_home, name)
            source = f"home_quota in {mine.where}"
            usage = await asyncio.to_thread(
                functools.partial(quota.apply, home, mine.home_quota, source=source, what="home")
            )
            spawner.log.info("sandbox-kernel: %s", usage.describe())
        env = dict(spawner.environment or {})
        if os.environ.get(host_policy.ENV):
            env[host_policy.ENV] = os.environ[host_policy.ENV]
        spawner.environment = env
        if only:
            args = [a for a in spawner.args if not a.startswith(_OWN_ARGS)]
            spawner.args = [
                *args,
                f"--ServerApp.kernel_spec_manager_class={SPEC_MANAGER}",
                f"--MappingKernelManager.default_kernel_name={DEFAULT_KERNEL}",
            ]
        spawner.log.info(
            "sandbox-kernel: delegated %s's kernels (caps from %s)%s",
            name,
            done.source,
            "; sandbox kernels only" if only else "",
        )

    return hook


_OWN_ARGS = (
    "--ServerApp.kernel_spec_manager_class=",
    "--MappingKernelManager.default_kernel_name=",
)


def _account_uid(name: str) -> int:
    """The uid of the unix account ``name`` (by name only: a hub user called ``1001`` is not
    uid 1001); SpecError when there is none."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise SpecError(f"hub user {name!r} has no unix account of that name") from None


def _account_home(name: str) -> str:
    """The home folder of the unix account ``name`` (resolved: it must be a real folder)."""
    home = pwd.getpwnam(name).pw_dir
    if not home or not os.path.isabs(home):
        raise SpecError(f"hub user {name!r}: the account has no home folder for its home_quota")
    return os.path.realpath(home)


def make_post_stop_hook(
    unix_name: Callable[[str], str] = lambda name: name,
) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """A ``post_stop_hook`` (see the module docstring); ``unix_name`` as for the spawn hook."""

    async def hook(spawner: Any) -> None:
        name = unix_name(str(spawner.user.name))
        try:
            uid = await asyncio.to_thread(_account_uid, name)
            # a server killed outright: its executors are ending their containers right now
            for _ in range(int(ORPHAN_WAIT_S / 0.2)):
                if not await asyncio.to_thread(orphans_ending, uid):
                    break
                await asyncio.sleep(0.2)
            report = await asyncio.to_thread(collect_other_users, uid=uid)
        except Exception as exc:  # JupyterHub would let it escape from the server's stop
            spawner.log.warning("sandbox-kernel: collecting %s's leftovers failed: %s", name, exc)
            return
        if report.run_dirs or report.cgroups or report.errors:
            spawner.log.info(
                "sandbox-kernel: collected what %s's kernels left: %d run dir(s), %d cgroup(s)%s",
                name,
                len(report.run_dirs),
                len(report.cgroups),
                "; errors: " + "; ".join(report.errors) if report.errors else "",
            )

    return hook


#: The hooks for hubs whose user names are the unix accounts.
pre_spawn_hook = make_pre_spawn_hook()
post_stop_hook = make_post_stop_hook()
