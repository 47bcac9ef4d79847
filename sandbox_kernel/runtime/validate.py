"""Validators for a ContainerSpec: run before anything touches the system.

Layer: runtime (OS side; reads the filesystem only to check that paths exist). Each validator
returns a list of problems, one line each, naming the field, the bad value and the accepted
form. ``validate_spec`` runs them all, in the order of ``VALIDATORS`` (nothing else in the
package calls them), and raises one SpecError listing every problem.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable

from ..errors import SpecError
from ..limits import BOUNDS, limit_problems
from ..paths import ID_RE
from .spec import (
    Bind,
    ContainerSpec,
    IdMap,
    NetworkMode,
    Tmpfs,
    bytes_per_inode_problem,
    env_key_problem,
    is_clean_abs,
)

Validator = Callable[[ContainerSpec], list[str]]

_HOST_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED_TARGETS = ("/", "/proc", "/sys", "/dev")
MAX_ID = 2**32 - 2


def check_id(spec: ContainerSpec) -> list[str]:
    """``id`` is ``sk-`` and 12 hex digits (the run dir and cgroups are named from it)."""
    if not ID_RE.match(spec.id):
        return [f"id={spec.id!r} is not a container id; expected 'sk-' and 12 hex digits"]
    return []


def check_layers(spec: ContainerSpec) -> list[str]:
    """At least one layer; each an existing directory whose path can go into overlay's
    options (no ':' or ',')."""
    if not spec.layers:
        return ["layers=() is empty; an image needs at least one layer directory"]
    out = []
    for layer in spec.layers:
        if not is_clean_abs(layer) or ":" in layer or "," in layer:
            out.append(f"layer {layer!r} must be an absolute normalised path without ':' or ','")
        elif not os.path.isdir(layer):
            out.append(f"layer {layer!r} is not a directory; is the image store intact?")
    return out


def check_command(spec: ContainerSpec) -> list[str]:
    """A non-empty argv with a non-empty program and no NUL bytes."""
    if not spec.command:
        return ["command=() is empty; give the program to run, e.g. ('python3', '-V')"]
    if any("\0" in a for a in spec.command) or not spec.command[0]:
        return [f"command={list(spec.command)!r} has an empty program or a NUL byte"]
    return []


def check_env(spec: ContainerSpec) -> list[str]:
    """Valid variable names (``spec.env_key_problem``), values without NUL bytes."""
    out = []
    for key, value in spec.env:
        problem = env_key_problem(key)
        if problem:
            out.append(problem)
        if "\0" in value:
            out.append(f"env {key} has a NUL byte in its value")
    return out


def check_workdir(spec: ContainerSpec) -> list[str]:
    """``workdir`` is an absolute normalised path."""
    if not is_clean_abs(spec.workdir):
        return [f"workdir={spec.workdir!r} must be an absolute normalised path, e.g. /home/jovyan"]
    return []


def check_identity(spec: ContainerSpec) -> list[str]:
    """``user`` and ``group`` are ids in range; uid 0 only with ``allow_root``."""
    out = []
    for name, value in (("user", spec.user), ("group", spec.group)):
        if not 0 <= value <= MAX_ID:
            out.append(f"{name}={value} is out of range; use 0..{MAX_ID}")
    if spec.user == 0 and not spec.allow_root:
        out.append(
            "user=0 (root inside the container) needs allow_root=True; use an unprivileged uid"
        )
    return out


def check_root_mode(spec: ContainerSpec) -> list[str]:
    """Root inside the container gets no writable host volume through which it would write
    files owned by host uid 0 (setuid-root programs included, which any host user who can
    reach them could run): none without a user namespace (container root is host root, as
    for image builds), and no idmapped one (it shows container root the on-disk uid 0). In
    a user namespace, other volumes are written as container root's unprivileged host uid.
    """
    if spec.user != 0:
        return []
    writable = [
        m.target
        for m in spec.mounts
        if isinstance(m, Bind) and not m.readonly and (m.idmap or not spec.uid_map)
    ]
    if writable:
        return [
            f"user=0 (root inside) cannot have writable host volumes ({', '.join(writable)}): "
            "it would leave files owned by host root, setuid-root ones included, there; "
            "run as an unprivileged uid, or mount the volumes read-only"
        ]
    return []


def check_upper_dir(spec: ContainerSpec) -> list[str]:
    """A kept writable layer's directory: an existing host directory whose path can go into
    overlay options (no ':' or ',')."""
    d = spec.upper_dir
    if not d:
        return []
    if not is_clean_abs(d) or ":" in d or "," in d:
        return [f"upper_dir {d!r} must be an absolute normalised path without ':' or ','"]
    if not os.path.isdir(d):
        return [f"upper_dir {d!r} is not a directory"]
    return []


def check_hostname(spec: ContainerSpec) -> list[str]:
    """``hostname``: at most 64 characters of dot-separated DNS labels (lowercase)."""
    name = spec.hostname
    labels = name.split(".")
    if len(name) > 64 or not all(_HOST_LABEL_RE.match(lbl) for lbl in labels):
        return [
            f"hostname={name!r} is invalid; use lowercase letters, digits and '-' "
            "(not first or last), at most 63 per label"
        ]
    return []


def check_sizes(spec: ContainerSpec) -> list[str]:
    """The tmpfs sizes within their ``limits.BOUNDS``; ``nofile`` in 16..1048576;
    ``bytes_per_inode`` in 1K..1G."""
    out = []
    for name in ("writable_size", "tmp_size", "shm_size"):
        problem = BOUNDS[name].problem(getattr(spec, name))
        if problem:
            out.append(problem)
    if not 16 <= spec.nofile <= 1048576:
        out.append(f"nofile={spec.nofile} is out of range; use 16..1048576")
    problem = bytes_per_inode_problem(spec.bytes_per_inode)
    if problem:
        out.append(problem)
    return out


def check_mounts(spec: ContainerSpec, created: frozenset[str] = frozenset()) -> list[str]:
    """Each mount target clean, not reserved (/, /proc, /sys, /dev) and used once; each bind
    source clean and existing (or in ``created``); each extra tmpfs at least 4K; each file
    path clean."""
    out = []
    seen: set[str] = set()
    for m in spec.mounts:
        target = m.target
        if not is_clean_abs(target):
            out.append(f"mount target {target!r} must be an absolute normalised path")
            continue
        if target in RESERVED_TARGETS or any(
            target.startswith(r + "/") for r in RESERVED_TARGETS if r != "/"
        ):
            out.append(f"mount target {target!r} is reserved (/, /proc, /sys, /dev); pick another")
        if target in seen:
            out.append(f"mount target {target!r} is used twice")
        seen.add(target)
        if isinstance(m, Bind):
            if not is_clean_abs(m.source):
                out.append(f"volume source {m.source!r} must be an absolute normalised host path")
            elif m.source not in created and not os.path.exists(m.source):
                out.append(f"volume source {m.source!r} does not exist on the host")
        elif isinstance(m, Tmpfs) and m.size < 4096:
            out.append(f"tmpfs {target} size={m.size} is too small; use at least 4K")
    for path, mode, _ in spec.files:
        if not is_clean_abs(path) or path == "/":
            out.append(f"file {path!r} must be an absolute normalised path")
        if not 0 <= mode <= 0o777:
            out.append(f"file {path!r} mode {mode:o} must be within 0..777")
    return out


def check_limits(spec: ContainerSpec) -> list[str]:
    """The caps, against the bounds of ``limits`` (the same as for kernels and live changes)."""
    return limit_problems(spec.limits)


def check_network(spec: ContainerSpec) -> list[str]:
    """``network`` is a ``NetworkMode``; ``nat`` comes with its settings (an allow-list,
    a subnet; ``network.config.config_problems``), ``none`` without."""
    if not isinstance(spec.network, NetworkMode):
        modes = ", ".join(m.value for m in NetworkMode)
        return [f"network={spec.network!r} is not a network mode; available: {modes}"]
    if spec.network is NetworkMode.NAT:
        from ..network.config import NatConfig, config_problems

        if not isinstance(spec.nat, NatConfig):
            return ["network 'nat' needs its settings (ContainerSpec.nat)"]
        return config_problems(spec.nat)
    if spec.nat is not None:
        return ["network settings (allow-list, bandwidth) need network 'nat'"]
    return []


def _mapped(maps: tuple[IdMap, ...], ident: int) -> bool:
    return any(m.inside <= ident < m.inside + m.count for m in maps)


def _overlaps(maps: tuple[IdMap, ...]) -> bool:
    spans = sorted((m.inside, m.inside + m.count) for m in maps)
    return any(a[1] > b[0] for a, b in itertools.pairwise(spans))


def check_userns(spec: ContainerSpec) -> list[str]:
    """The user namespace: both maps or none (only root may go without one), no
    overlapping lines, the container's user and group mapped, the map helpers absolute
    paths, idmapped mounts only for root (the kernel allows them to no one else)."""
    out = []
    uid_map, gid_map = spec.uid_map, spec.gid_map
    if bool(uid_map) != bool(gid_map):
        return ["uid_map and gid_map go together: give both or neither"]
    if not uid_map:
        if os.geteuid() != 0:
            out.append("a container made by an unprivileged user needs a user namespace")
        if spec.idmap_layers or any(isinstance(m, Bind) and m.idmap for m in spec.mounts):
            out.append("idmapped mounts need a user namespace (uid_map and gid_map)")
        return out
    for name, maps in (("uid_map", uid_map), ("gid_map", gid_map)):
        if len(maps) > 340 or any(not 0 <= m.inside <= MAX_ID or m.count < 1 for m in maps):
            out.append(f"{name} has an invalid line; give at most 340 lines of ids 0..{MAX_ID}")
        elif _overlaps(maps):
            out.append(f"{name} has overlapping lines")
    if not _mapped(uid_map, spec.user):
        out.append(f"user={spec.user} is not mapped in uid_map; the process could not run")
    if not _mapped(gid_map, spec.group):
        out.append(f"group={spec.group} is not mapped in gid_map; the process could not run")
    if spec.map_helpers and (
        len(spec.map_helpers) != 2 or not all(is_clean_abs(h) for h in spec.map_helpers)
    ):
        out.append("map_helpers must be the absolute paths of newuidmap and newgidmap")
    idmapped = spec.idmap_layers or any(isinstance(m, Bind) and m.idmap for m in spec.mounts)
    if idmapped and os.geteuid() != 0:
        out.append("idmapped mounts (idmap_layers, Bind.idmap) need root")
    return out


def check_proc_paths(spec: ContainerSpec) -> list[str]:
    """Every masked and read-only path is an absolute normalised path."""
    return [
        f"masked/readonly path {p!r} must be an absolute normalised path"
        for p in (*spec.masked_paths, *spec.readonly_paths)
        if not is_clean_abs(p)
    ]


VALIDATORS: tuple[Validator, ...] = (
    check_id,
    check_layers,
    check_command,
    check_env,
    check_workdir,
    check_identity,
    check_root_mode,
    check_upper_dir,
    check_hostname,
    check_sizes,
    check_mounts,
    check_limits,
    check_network,
    check_userns,
    check_proc_paths,
)


def validate_spec(
    spec: ContainerSpec, context: str = "", created: frozenset[str] = frozenset()
) -> None:
    """Run every validator; one SpecError listing every problem. ``created``: host paths the
    runtime itself will create before start (e.g. the container's connection dir), accepted
    as bind sources. Called by ``Container.create`` before anything touches the system."""
    problems: list[str] = []
    for validator in VALIDATORS:
        if validator is check_mounts:
            problems.extend(check_mounts(spec, created))
        else:
            problems.extend(validator(spec))
    if problems:
        raise SpecError(problems, context=context or f"container {spec.id}")
