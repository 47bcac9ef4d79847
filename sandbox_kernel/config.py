"""Jupyter-side settings of sandbox kernels, and the administrator's ceilings.

Two configurables:

* ``SandboxProvisioner`` (provisioner.py) carries the per-kernel settings declared here in
  ``SandboxSettings``. They come, lowest priority first, from the trait defaults, from the
  Jupyter config files (``c.SandboxProvisioner.memory = "2G"``), and from the kernelspec's
  ``metadata.kernel_provisioner.config`` (the provisioner factory passes them as keyword
  arguments).
* ``SandboxPolicy`` holds the administrator's ceilings, set only in the server's config
  (``c.SandboxPolicy.max_memory = "4G"`` in ``jupyter_server_config.py``). No kernelspec can
  go above them: a value above a ceiling fails the kernel start with a message naming the
  kernelspec, the field, the value and the ceiling.

``resolve_settings`` validates everything at once and returns a ``KernelSettings`` (plain
data); every problem is one line naming the field, the value and the accepted form.

``python -m sandbox_kernel.config`` prints docs/configuration.md from the traits.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traitlets import Bool, Dict, Float, Int, List, TraitError, Unicode, Union
from traitlets.config import Configurable, LoggingConfigurable

from .errors import SpecError
from .spec import Bind, NetworkMode
from .units import CPUS_FORMS, SIZE_FORMS, format_cpus, format_size, parse_cpus, parse_size

NOBODY = 65534
MAX_ID = 2**32 - 2
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_RE = re.compile(r"^(\d+)(?::(\d+))?$")

MOUNT_FORMS = "'SRC:DST' or 'SRC:DST:ro' or 'SRC:DST:rw' with absolute paths, e.g. '/data:/data:ro'"
USER_FORMS = (
    "'auto' (the owner of the notebook's directory), a uid, 'uid:gid' or a user name, "
    "e.g. 1000 or '1000:100'"
)
PIDS_FORMS = "a whole number of processes, at least 16, e.g. 256"
IMAGE_FORMS = "an image name of the store (see: sandbox-kernel image ls), e.g. 'python3'"


class SandboxSettings(LoggingConfigurable):
    """Per-kernel sandbox settings (config=True traits shared by the provisioner)."""

    image = Unicode(
        "",
        config=True,
        help="""Image the kernel runs in: a name of the image store, optionally with a tag
        ('python3', 'python2.7:latest'). List them with `sandbox-kernel image ls`.
        Default: '' (the kernelspec must name one).""",
    )
    memory = Union(
        [Unicode(), Int()],
        default_value="1G",
        config=True,
        help="""Memory cap of the whole sandbox (kernel and its children), swap off.
        Unit: bytes, or a number with K, M, G or T (binary units), e.g. 512M, 1.5G.
        Default: 1G. The kernel is killed by the OOM killer above it.""",
    )
    cpus = Union(
        [Float(), Int(), Unicode()],
        default_value=1.0,
        config=True,
        help="""CPU cap, in CPUs (fractions allowed: 0.5 = half a CPU over each 100 ms).
        Applied once the kernel answered its first kernel_info (start is not slowed down).
        Default: 1.""",
    )
    pids = Union(
        [Int(), Unicode()],
        default_value=256,
        config=True,
        help="""Maximum number of processes and threads in the sandbox (a fork beyond it
        fails with EAGAIN; the kernel stays usable). Unit: tasks. Default: 256.""",
    )
    tmp_size = Union(
        [Unicode(), Int()],
        default_value="256M",
        config=True,
        help="""Size of the sandbox's /tmp and of its home directory (tmpfs, counted in the
        memory cap). Unit: bytes or K/M/G/T. Default: 256M.""",
    )
    writable_size = Union(
        [Unicode(), Int()],
        default_value="256M",
        config=True,
        help="""Size of the writable layer on top of the image (pip install --user, files
        written outside /tmp and the notebook folder; tmpfs, counted in the memory cap).
        Unit: bytes or K/M/G/T. Default: 256M.""",
    )
    extra_mounts = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Host paths made visible in the sandbox besides the notebook's directory,
        each 'SRC:DST[:ro|rw]' (absolute paths; read-only unless ':rw'). Every SRC must be
        under one of SandboxPolicy.allowed_mount_sources. Default: [] (none).""",
    )
    env = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra environment variables of the kernel ({"NAME": "value"}), on top of the
        image's and the kernelspec's env. The server's own environment never enters the
        sandbox. Default: {}.""",
    )
    network = Unicode(
        "none",
        config=True,
        help="""Network of the sandbox. 'none': a private network namespace with only
        loopback (the only mode today; Jupyter talks to the kernel over unix sockets).
        Default: 'none'.""",
    )
    user = Union(
        [Unicode(), Int()],
        default_value="auto",
        config=True,
        help="""Who the kernel runs as. 'auto': when the server runs as root, the owner of
        the notebook's directory (65534 'nobody' if that owner is root, unless
        SandboxPolicy.allow_root); otherwise the server's own uid. Or a uid, 'uid:gid' or a
        user name of the host. Never root unless SandboxPolicy.allow_root. Default: 'auto'.""",
    )
    magics = Bool(
        True,
        config=True,
        help="""Load the %sandbox magics into ipykernel-based kernels (limits and usage,
        live limit changes within SandboxPolicy, why the previous kernel died). The
        extension is mounted read-only; images are not modified. Default: True.""",
    )
    cpu_defer_timeout = Float(
        60.0,
        config=True,
        help="""Seconds to wait for the kernel's first kernel_info reply before the CPU cap
        is applied anyway. Unit: seconds. Default: 60.""",
    )


#: The settings a kernelspec may set in metadata.kernel_provisioner.config.
SETTING_NAMES: tuple[str, ...] = (
    "image",
    "memory",
    "cpus",
    "pids",
    "tmp_size",
    "writable_size",
    "extra_mounts",
    "env",
    "network",
    "user",
    "magics",
    "cpu_defer_timeout",
)


class SandboxPolicy(Configurable):
    """Administrator's ceilings for every sandbox kernel of this server.

    Set in jupyter_server_config.py, e.g. ``c.SandboxPolicy.max_memory = "4G"``.
    A kernelspec (or the provisioner's config) asking for more fails to start, naming the
    kernelspec, the field, the value and the ceiling.
    """

    max_memory = Unicode(
        "",
        config=True,
        help="""Largest memory cap a kernel may ask for. Unit: bytes or K/M/G/T, e.g. 4G.
        Default: '' (no ceiling).""",
    )
    max_cpus = Float(
        0.0,
        config=True,
        help="""Largest CPU cap a kernel may ask for, in CPUs. Default: 0 (no ceiling).""",
    )
    max_pids = Int(
        0,
        config=True,
        help="""Largest process cap a kernel may ask for. Default: 0 (no ceiling).""",
    )
    max_tmp_size = Unicode(
        "",
        config=True,
        help="""Largest /tmp (and home) size. Unit: bytes or K/M/G/T. Default: '' (no ceiling).""",
    )
    max_writable_size = Unicode(
        "",
        config=True,
        help="""Largest writable layer. Unit: bytes or K/M/G/T. Default: '' (no ceiling).""",
    )
    allowed_images = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Image names kernels may use (without tag: 'python3' allows every tag of it).
        Default: [] (every image of the store).""",
    )
    allowed_mount_sources = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Host directories under which a kernelspec's extra_mounts may take their
        source, e.g. ['/srv/datasets']. Default: [] (no extra mounts; the notebook's
        directory is always mounted).""",
    )
    allow_root = Bool(
        False,
        config=True,
        help="""Allow kernels to run as root (uid 0) inside the sandbox, when asked with
        user=0 or when 'auto' finds a root-owned notebook directory. Default: False
        (such kernels run as 65534).""",
    )


@dataclass(frozen=True)
class KernelSettings:
    """Validated settings of one kernel start (plain data)."""

    image: str
    memory: int
    cpus: float
    pids: int
    tmp_size: int
    writable_size: int
    mounts: tuple[Bind, ...]
    env: tuple[tuple[str, str], ...]
    network: NetworkMode
    uid: int
    gid: int
    cpu_defer_timeout: float


@dataclass(frozen=True)
class Ceilings:
    """Parsed SandboxPolicy."""

    memory: int | None
    cpus: float | None
    pids: int | None
    tmp_size: int | None
    writable_size: int | None
    images: tuple[str, ...]
    mount_sources: tuple[str, ...]
    allow_root: bool


def read_policy(policy: SandboxPolicy) -> Ceilings:
    """Parse the policy; a malformed ceiling is the administrator's error (named as such)."""
    problems: list[str] = []

    def size(name: str, value: str) -> int | None:
        if not value:
            return None
        try:
            return parse_size(value, f"SandboxPolicy.{name}")
        except SpecError as exc:
            problems.append(str(exc))
            return None

    sources = []
    for src in policy.allowed_mount_sources:
        if not src.startswith("/"):
            problems.append(
                f"SandboxPolicy.allowed_mount_sources entry {src!r} must be an absolute path"
            )
        else:
            sources.append(posixpath.normpath(src))
    ceilings = Ceilings(
        memory=size("max_memory", policy.max_memory),
        cpus=policy.max_cpus if policy.max_cpus > 0 else None,
        pids=policy.max_pids if policy.max_pids > 0 else None,
        tmp_size=size("max_tmp_size", policy.max_tmp_size),
        writable_size=size("max_writable_size", policy.max_writable_size),
        images=tuple(policy.allowed_images),
        mount_sources=tuple(sources),
        allow_root=bool(policy.allow_root),
    )
    if problems:
        raise SpecError(problems, context="the server's SandboxPolicy (jupyter_server_config.py)")
    return ceilings


def parse_mount(value: object) -> Bind:
    """'SRC:DST[:ro|rw]' -> Bind; raise SpecError naming the accepted form."""
    if not isinstance(value, str):
        raise SpecError(f"extra_mounts entry {value!r} is not a string; use {MOUNT_FORMS}")
    parts = value.split(":")
    mode = "ro"
    if len(parts) == 3:
        mode = parts[2]
    elif len(parts) != 2:
        raise SpecError(f"extra_mounts entry {value!r} is malformed; use {MOUNT_FORMS}")
    src, dst = parts[0], parts[1]
    if mode not in ("ro", "rw"):
        raise SpecError(f"extra_mounts entry {value!r} has mode {mode!r}; use {MOUNT_FORMS}")
    for path in (src, dst):
        if not path.startswith("/") or posixpath.normpath(path) != path or ".." in path.split("/"):
            raise SpecError(
                f"extra_mounts entry {value!r}: {path!r} is not an absolute normalised path; "
                f"use {MOUNT_FORMS}"
            )
    return Bind(source=src, target=dst, readonly=mode == "ro")


def parse_user(value: object, *, workdir: str | None, server_uid: int) -> tuple[int, int]:
    """Resolve the ``user`` setting to (uid, gid). Root is checked by the caller."""
    if isinstance(value, bool):
        raise SpecError(f"user={value!r} is not a user; use {USER_FORMS}")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise SpecError(f"user={value!r} is not a user; use {USER_FORMS}")
    if value == "auto":
        if server_uid != 0:
            return server_uid, os.getegid()
        if workdir is None:
            return NOBODY, NOBODY
        try:
            st = os.stat(workdir)
        except OSError as exc:
            raise SpecError(
                f"user='auto': the notebook directory {workdir!r} cannot be read "
                f"({exc.strerror}); give an existing directory"
            ) from None
        if st.st_uid == 0:
            return 0, 0  # decided by the caller (65534 unless allow_root)
        return st.st_uid, st.st_gid
    m = _USER_RE.match(value)
    if m:
        uid = int(m.group(1))
        if m.group(2) is not None:
            gid = int(m.group(2))
        else:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        if uid > MAX_ID or gid > MAX_ID:
            raise SpecError(f"user={value!r} is out of range; ids go from 0 to {MAX_ID}")
        return uid, gid
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        raise SpecError(f"user={value!r} is no user of this host; use {USER_FORMS}") from None
    return entry.pw_uid, entry.pw_gid


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def resolve_settings(
    values: Mapping[str, Any],
    ceilings: Ceilings,
    *,
    explicit: frozenset[str],
    workdir: str | None,
    context: str,
    server_uid: int | None = None,
) -> KernelSettings:
    """Validate raw setting values against their forms and the administrator's ceilings.

    ``values`` maps every name of SETTING_NAMES to its raw value; ``explicit`` names those set
    by a kernelspec or a config file (a default above a ceiling is lowered to the ceiling, an
    explicit value above it is an error). Raises one SpecError listing every problem, with
    ``context`` (e.g. "kernelspec 'python3-sandbox'") in front.
    """
    problems: list[str] = []
    uid_server = os.geteuid() if server_uid is None else server_uid

    def guard(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            problems.extend(exc.problems)
            return None

    def ceiling(name: str, value: Any, top: Any, fmt: Any) -> Any:
        if value is None or top is None or value <= top:
            return value
        if name in explicit:
            problems.append(
                f"{name}={values[name]!r} is above the administrator's ceiling "
                f"(SandboxPolicy.max_{name} = {fmt(top)}); ask for at most {fmt(top)}"
            )
            return None
        return top

    image = values["image"]
    if not isinstance(image, str) or not image.strip():
        problems.append(f"image={image!r} is missing or empty; use {IMAGE_FORMS}")
        image = ""
    elif (
        ceilings.images
        and image.split(":", 1)[0] not in ceilings.images
        and (image not in ceilings.images)
    ):
        allowed = ", ".join(ceilings.images)
        problems.append(
            f"image={image!r} is not allowed by the administrator "
            f"(SandboxPolicy.allowed_images: {allowed}); use one of those"
        )

    memory = guard(parse_size, values["memory"], "memory")
    if memory is not None and memory < 16 * 1024**2:
        problems.append(f"memory={values['memory']!r} is too small for a kernel; use at least 64M")
        memory = None
    memory = ceiling("memory", memory, ceilings.memory, format_size)

    cpus = guard(parse_cpus, values["cpus"], "cpus")
    if cpus is not None and not 0.01 <= cpus <= 1024:
        problems.append(f"cpus={values['cpus']!r} is out of range; use {CPUS_FORMS}, 0.01..1024")
        cpus = None
    cpus = ceiling("cpus", cpus, ceilings.cpus, format_cpus)

    raw_pids = values["pids"]
    pids: int | None
    try:
        if isinstance(raw_pids, (bool, float)):
            raise ValueError
        pids = int(raw_pids)
    except (TypeError, ValueError):
        problems.append(f"pids={raw_pids!r} is not a whole number; use {PIDS_FORMS}")
        pids = None
    if pids is not None and pids < 16:
        problems.append(f"pids={raw_pids!r} is too small for a kernel; use {PIDS_FORMS}")
        pids = None
    pids = ceiling("pids", pids, ceilings.pids, str)

    tmp_size = guard(parse_size, values["tmp_size"], "tmp_size")
    if tmp_size is not None and tmp_size < 1024**2:
        problems.append(f"tmp_size={values['tmp_size']!r} is too small; use at least 1M")
        tmp_size = None
    tmp_size = ceiling("tmp_size", tmp_size, ceilings.tmp_size, format_size)

    writable = guard(parse_size, values["writable_size"], "writable_size")
    if writable is not None and writable < 1024**2:
        problems.append(f"writable_size={values['writable_size']!r} is too small; use at least 1M")
        writable = None
    writable = ceiling("writable_size", writable, ceilings.writable_size, format_size)

    mounts: list[Bind] = []
    raw_mounts = values["extra_mounts"]
    if not isinstance(raw_mounts, (list, tuple)):
        problems.append(f"extra_mounts={raw_mounts!r} is not a list; use a list of {MOUNT_FORMS}")
        raw_mounts = []
    for entry in raw_mounts:
        bind = guard(parse_mount, entry)
        if bind is None:
            continue
        if not _under(bind.source, ceilings.mount_sources):
            where = ", ".join(ceilings.mount_sources) or "none are allowed"
            problems.append(
                f"extra_mounts entry {entry!r}: source {bind.source} is not under an allowed "
                f"directory (SandboxPolicy.allowed_mount_sources: {where})"
            )
        elif not os.path.exists(bind.source):
            problems.append(
                f"extra_mounts entry {entry!r}: {bind.source} does not exist on the host"
            )
        elif workdir is not None and bind.target == workdir:
            problems.append(
                f"extra_mounts entry {entry!r}: {bind.target} is the notebook's directory; "
                "pick another target"
            )
        else:
            mounts.append(bind)

    env: list[tuple[str, str]] = []
    raw_env = values["env"]
    if not isinstance(raw_env, Mapping):
        problems.append(f'env={raw_env!r} is not a mapping; use {{"NAME": "value"}}')
        raw_env = {}
    for key, val in raw_env.items():
        if not isinstance(key, str) or not _ENV_KEY_RE.match(key):
            problems.append(
                f"env key {key!r} is invalid; use letters, digits and '_' (not first a digit)"
            )
        elif not isinstance(val, str) or "\0" in val:
            problems.append(f"env {key}={val!r} must be a string without NUL bytes")
        else:
            env.append((key, val))

    network = NetworkMode.NONE
    raw_net = values["network"]
    try:
        network = NetworkMode(raw_net)
    except ValueError:
        modes = ", ".join(repr(m.value) for m in NetworkMode)
        problems.append(f"network={raw_net!r} is not available; use {modes}")

    uid = gid = NOBODY
    ids = guard(parse_user, values["user"], workdir=workdir, server_uid=uid_server)
    if ids is not None:
        uid, gid = ids
        if uid == 0 and not ceilings.allow_root:
            if values["user"] == "auto":
                uid = gid = NOBODY
            else:
                problems.append(
                    f"user={values['user']!r} is root, which the administrator does not allow "
                    "(SandboxPolicy.allow_root = False); use an unprivileged uid, e.g. 1000"
                )

    timeout = values["cpu_defer_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        problems.append(
            f"cpu_defer_timeout={timeout!r} must be a positive number of seconds, e.g. 60"
        )
        timeout = 60.0

    if problems:
        raise SpecError(problems, context=context)
    assert memory is not None and cpus is not None and pids is not None
    assert tmp_size is not None and writable is not None
    return KernelSettings(
        image=image.strip(),
        memory=memory,
        cpus=cpus,
        pids=pids,
        tmp_size=tmp_size,
        writable_size=writable,
        mounts=tuple(mounts),
        env=tuple(env),
        network=network,
        uid=uid,
        gid=gid,
        cpu_defer_timeout=float(timeout),
    )


def check_trait_value(owner: SandboxSettings, name: str, value: Any) -> str | None:
    """Assign ``value`` to trait ``name``; return a problem line instead of a TraitError."""
    try:
        setattr(owner, name, value)
    except TraitError:
        return f"{name}={value!r} has the wrong type; {_forms(name)}"
    return None


def _forms(name: str) -> str:
    return {
        "image": f"use {IMAGE_FORMS}",
        "memory": f"use {SIZE_FORMS}",
        "tmp_size": f"use {SIZE_FORMS}",
        "writable_size": f"use {SIZE_FORMS}",
        "cpus": f"use {CPUS_FORMS}",
        "pids": f"use {PIDS_FORMS}",
        "extra_mounts": f"use a list of {MOUNT_FORMS}",
        "env": 'use {"NAME": "value"} with string values',
        "network": "use 'none'",
        "user": f"use {USER_FORMS}",
        "cpu_defer_timeout": "use a number of seconds, e.g. 60",
        "magics": "use true or false",
    }.get(name, "see docs/configuration.md")


def _trait_rows(cls: type[Configurable]) -> list[str]:
    rows = []
    for name, trait in sorted(cls.class_traits(config=True).items()):
        default = trait.default_value_repr()
        helptext = " ".join((trait.help or "").split())
        rows.append(
            f"### `c.{cls.__name__}.{name}`\n\nType: `{type(trait).__name__}`, "
            f"default: `{default}`\n\n{helptext}\n"
        )
    return rows


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the traits (``python -m sandbox_kernel.config``)."""
    from .provisioner import SandboxProvisioner

    out = [
        "# Configuring sandbox kernels",
        "",
        "<!-- generated by `python -m sandbox_kernel.config > docs/configuration.md`; "
        "do not edit -->",
        "",
        "Per-kernel settings are traits of `SandboxProvisioner`. They come, lowest priority "
        "first, from the defaults below, from Jupyter config files "
        '(`c.SandboxProvisioner.memory = "2G"` in `jupyter_server_config.py`) and from '
        "the kernelspec's `metadata.kernel_provisioner.config` in `kernel.json`:",
        "",
        "```json",
        '"metadata": {"kernel_provisioner": {"provisioner_name": "sandbox-provisioner",',
        '  "config": {"image": "python3", "memory": "1G", "cpus": 1, "pids": 256}}}',
        "```",
        "",
        "The administrator's ceilings are traits of `SandboxPolicy`, set in the server's "
        "config only. A kernelspec asking for more than a ceiling does not start; the error "
        "names the kernelspec, the field, the value and the ceiling, and reaches the "
        "notebook user. A default above a ceiling is lowered to the ceiling.",
        "",
        "## Per-kernel settings (`SandboxProvisioner`)",
        "",
    ]
    out += _trait_rows(SandboxProvisioner)
    out += ["## Administrator's ceilings (`SandboxPolicy`)", ""]
    out += _trait_rows(SandboxPolicy)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover - documentation generator
    sys.stdout.write(configuration_markdown())
