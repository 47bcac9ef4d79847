"""``sandbox-kernel doctor``: is this host ready to run sandbox kernels? One line per check.

Layer: cli. Each ``check_*`` of ``CHECKS`` probes one thing and returns its lines; only
``run_checks`` calls them, and a check that raises becomes one FAIL line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import PrivilegeError, SandboxError

OK, WARN, FAIL = "ok", "warn", "FAIL"
NAMESPACES = ("mnt", "pid", "uts", "ipc", "net", "cgroup")
IMAGES = ("python2.7", "python3")


@dataclass(frozen=True)
class Check:
    """One result line: status (ok, warn, FAIL), what was found, and the fix if any."""

    status: str
    what: str
    fix: str = ""

    def line(self) -> str:
        """The line ``doctor_command`` prints: status, finding, then ``— fix``."""
        tail = f"  — {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.what}{tail}"


def check_identity() -> list[Check]:
    """Who runs: root (root mode, the product's id range), or an ordinary user (rootless:
    user namespaces, a subordinate range and the map helpers)."""
    from .. import paths
    from ..runtime import userns

    if os.geteuid() == 0:
        out = [Check(OK, "running as root (root mode: container ids map to a reserved range)")]
        try:
            sub = userns.reserve_range()
        except SandboxError as exc:
            return [*out, Check(FAIL, f"the id range for containers: {exc}", "see the README")]
        out.append(
            Check(OK, f"container ids map to host ids {sub.start}..{sub.start + sub.count - 1}")
        )
        store = paths.state_dir()
        if store.is_dir() and not userns.idmap_supported(str(store)):
            out.append(
                Check(
                    FAIL,
                    f"the image store {store} is on a filesystem without idmapped mounts: "
                    "root mode idmaps image layers, so kernels fail to start",
                    "put it on ext4, xfs or btrfs (or tmpfs with Linux >= 6.3), e.g. with "
                    "SANDBOX_KERNEL_STATE_DIR",
                )
            )
        if _kernel_version() < (5, 12):
            out.append(
                Check(
                    FAIL,
                    "this kernel has no idmapped mounts (Linux 5.12): root mode cannot mount "
                    "notebook folders and image layers with their owners, kernels fail to start",
                    "upgrade the kernel, or run the Jupyter server as an ordinary user "
                    "(rootless mode needs Linux 5.11)",
                )
            )
        return out
    return _rootless_identity(userns)


def _rootless_identity(userns: Any) -> list[Check]:
    user = _user_name()
    out = [Check(OK, f"running as {user} (uid {os.geteuid()}): rootless mode")]
    out += [Check(FAIL, problem, "") for problem in userns.userns_problems()]
    if userns.map_helpers() is None:
        out.append(
            Check(
                WARN,
                "no newuidmap/newgidmap (setuid): containers map only your own uid",
                "as root: apt-get install uidmap",
            )
        )
    missing = [
        str(path)
        for path in (userns.SUBUID, userns.SUBGID)
        if userns.subordinate_range(path, user, os.geteuid()) is None
    ]
    if missing:
        out.append(
            Check(
                WARN,
                f"no subordinate id range for {user} in {' and '.join(missing)}: containers "
                "map only your own uid (no root inside)",
                "as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                f"{user} (a range no one else uses)",
            )
        )
    if _kernel_version() < (5, 11):
        out.append(
            Check(
                FAIL,
                "this kernel cannot mount overlayfs in a user namespace (needs Linux 5.11)",
                "use a newer kernel, or run the server as root",
            )
        )
    return out


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return int(release[0]), int(release[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_cgroups() -> list[Check]:
    """The cgroup manager can be built; memory, cpu and pids are usable (``controllers``)."""
    from ..cgroups import get_manager

    try:
        manager = get_manager()
    except PrivilegeError as exc:  # rootless without a delegated cgroup
        what, _, fix = str(exc).partition("; ")
        return [Check(FAIL, f"cgroups: {what}", fix)]
    except SandboxError as exc:
        return [
            Check(
                FAIL, f"cgroups: {exc}", "mount cgroup v2 at /sys/fs/cgroup or the v1 controllers"
            )
        ]
    out = [Check(OK, f"cgroup mode {manager.mode.value} (v{manager.version}){_delegated(manager)}")]
    try:
        ctrls = manager.controllers()
    except SandboxError as exc:
        return [*out, Check(FAIL, f"cgroup controllers: {exc}", "see docs/runtime-protocol.md")]
    for name in ("memory", "cpu", "pids"):
        if ctrls.get(name):
            out.append(Check(OK, f"cgroup controller {name} usable"))
        else:
            fix = (
                f"enable it: echo +{name} > <parent cgroup>/cgroup.subtree_control"
                if manager.version == 2
                else f"mount the v1 {name} hierarchy under /sys/fs/cgroup/{name}"
            )
            out.append(
                Check(
                    FAIL, f"cgroup controller {name} not usable (its cap cannot be enforced)", fix
                )
            )
    return out


def _delegated(manager: Any) -> str:
    """ ", delegated to you: <where>" for a rootless caller, "" for root."""
    if os.geteuid() == 0:
        return ""
    if manager.version == 1:
        from ..cgroups.delegation import kernels_cgroup

        return f", delegated to you: {kernels_cgroup(os.geteuid())} in each hierarchy"
    return f", delegated to you: {manager.parent}"


def check_overlay() -> list[Check]:
    """overlayfs is in /proc/filesystems (images are overlay layers)."""
    try:
        with open("/proc/filesystems") as f:
            fs = {line.split()[-1] for line in f if line.strip()}
    except OSError as exc:
        return [Check(FAIL, f"cannot read /proc/filesystems: {exc.strerror}", "mount /proc")]
    if "overlay" in fs:
        return [Check(OK, "overlayfs available")]
    return [Check(FAIL, "overlayfs not available (images are overlay layers)", "modprobe overlay")]


def check_namespaces() -> list[Check]:
    """Every namespace kind the runtime unshares exists, and user.max_*_namespaces allows
    more than a few."""
    out = []
    missing = [ns for ns in NAMESPACES if not os.path.exists(f"/proc/self/ns/{ns}")]
    if missing:
        out.append(
            Check(
                FAIL,
                f"namespaces missing: {', '.join(missing)}",
                "use a kernel built with CONFIG_*_NS",
            )
        )
    else:
        out.append(Check(OK, f"namespaces available: {', '.join(NAMESPACES)}"))
    for ns in ("mnt", "pid", "uts", "ipc", "net", "cgroup"):
        path = f"/proc/sys/user/max_{ns}_namespaces"
        try:
            with open(path) as f:
                value = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if value == 0:
            out.append(
                Check(
                    FAIL,
                    f"user.max_{ns}_namespaces = 0",
                    f"sysctl -w user.max_{ns}_namespaces=10000",
                )
            )
        elif value < 64:
            out.append(
                Check(
                    WARN,
                    f"user.max_{ns}_namespaces = {value} (few kernels at once)",
                    f"sysctl -w user.max_{ns}_namespaces=10000",
                )
            )
    return out


def check_executor() -> list[Check]:
    """The compiled executor is found (``runtime_binary``)."""
    from ..runtime.executor import runtime_binary

    try:
        path = runtime_binary()
    except SandboxError as exc:
        return [Check(FAIL, "executor sk-runtime missing", str(exc).split("; ", 1)[-1])]
    return [Check(OK, f"executor {path}")]


def check_images() -> list[Check]:
    """The store opens and lists; the base images python2.7 and python3 are built (a warning
    otherwise)."""
    from ..images import lookup

    out = []
    try:  # list_all(): the caller's store and the system store; nothing is unpacked here
        images = {im.name: im for _place, im in reversed(lookup.list_all())}
    except Exception as exc:
        return [
            Check(FAIL, f"image store: {exc}", "check SANDBOX_KERNEL_STATE_DIR and its permissions")
        ]
    for name in IMAGES:
        image = images.get(name)
        if image is None:
            out.append(
                Check(
                    WARN,
                    f"image {name} not built",
                    f"sandbox-kernel image build {name} (a few minutes)",
                )
            )
        else:
            out.append(Check(OK, f"image {image.ref} {image.digest[:19]}"))
    return out


def check_kernelspecs() -> list[Check]:
    """The shipped kernelspecs are installed and jupyter_client finds the provisioner."""
    from ..jupyter import kernelspecs

    out = []
    found = {k.name: k for k in kernelspecs.installed()}
    for name in kernelspecs.KERNELSPEC_NAMES:
        if name in found:
            out.append(Check(OK, f"kernelspec {name} in {found[name].resource_dir}"))
        else:
            out.append(
                Check(
                    WARN,
                    f"kernelspec {name} not installed",
                    "sandbox-kernel kernelspec install --sys-prefix",
                )
            )
    if kernelspecs.provisioner_registered():
        out.append(Check(OK, "jupyter_client finds the sandbox-provisioner entry point"))
    else:
        out.append(
            Check(
                FAIL,
                "the sandbox-provisioner entry point is not installed in this Python",
                "pip install sandbox-kernel (in a checkout: pip install -e .)",
            )
        )
    return out


def check_policy() -> list[Check]:
    """The host's policy file: valid, untrusted or missing (then, without server ceilings
    either, a warning: nothing bounds what many kernels take together)."""
    from .. import policy as host_policy

    path = host_policy.policy_path() or f"{host_policy.DEFAULT_PATH} ({host_policy.ENV}=none)"
    try:
        host = host_policy.load()
    except SandboxError as exc:
        return [Check(FAIL, str(exc), "no kernel starts until it is fixed")]
    if host is not None:
        return [
            Check(
                OK,
                f"policy file {path}: valid ({len(host.groups)} group and "
                f"{len(host.users)} user sections); see: sandbox-kernel policy USER",
            )
        ]
    from ..jupyter.settings import SandboxPolicy, server_config

    traits = SandboxPolicy(config=server_config())
    if traits.max_memory or traits.max_cpus or traits.max_pids:
        return [Check(OK, "no policy file; the server config's SandboxPolicy sets ceilings")]
    return [
        Check(
            WARN,
            f"no policy is set ({path}: no file, no SandboxPolicy ceilings): kernels "
            "get their kernelspec's caps, and nothing bounds many kernels together",
            f"write {path} (docs/configuration.md, 'The host's policy file')",
        )
    ]


CHECKS: tuple[Callable[[], list[Check]], ...] = (
    check_identity,
    check_policy,
    check_cgroups,
    check_overlay,
    check_namespaces,
    check_executor,
    check_images,
    check_kernelspecs,
)


def run_checks() -> list[Check]:
    """Every check of ``CHECKS``, in order. Called by ``doctor_command`` (and the tests)."""
    results: list[Check] = []
    for fn in CHECKS:
        try:
            results.extend(fn())
        except Exception as exc:  # one broken probe is a FAIL line, not a traceback
            results.append(
                Check(FAIL, f"{fn.__name__.removeprefix('check_')}: {exc}", "report this")
            )
    return results


def register(sub: Any) -> None:
    """Add the ``doctor`` verb (called by ``cli.build_parser``)."""
    p = sub.add_parser("doctor", help="check that this host can run sandbox kernels")
    p.set_defaults(func=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    """``sandbox-kernel doctor``: print every check and a summary; 1 when any FAILs. Called by
    ``cli.main``."""
    results = run_checks()
    for r in results:
        print(r.line())
    fails = sum(r.status == FAIL for r in results)
    warns = sum(r.status == WARN for r in results)
    print(f"{fails} problem(s), {warns} warning(s)" if fails or warns else "all good")
    return 1 if fails else 0
