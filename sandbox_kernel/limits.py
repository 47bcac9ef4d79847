"""The one limits policy: what a cap is, its bounds, how it is parsed, and the ceilings.

Layer: leaf (imports only ``errors`` and ``units``). Every path that sets a cap uses it:

* the start path: ``jupyter.resolve.resolve_settings`` parses a kernelspec's values with
  ``BOUNDS[name].parse`` and holds them against the admin's ``Ceilings``;
* live changes: ``plan_change`` validates a ``%sandbox memory=2G`` request (the kernel's
  control socket, ``jupyter.control``) with the same bounds and ceilings;
* the runtime: ``runtime.validate.check_limits`` checks a ``ContainerSpec``'s ``Limits``
  with ``limit_problems``, so ``sandbox-kernel run`` obeys the same bounds;
* the CLI and ``kernelspec install`` parse ``--memory``/``--cpus``/``--pids`` with them.

A bound is a property of the product (what a container can be given); a ceiling is the
administrator's choice (``SandboxPolicy.max_*``), never above the bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import CeilingRefused, LimitRefused, SpecError
from .units import (
    CPUS_FORMS,
    RATE_FORMS,
    SIZE_FORMS,
    format_cpus,
    format_rate,
    format_size,
    parse_cpus,
    parse_rate,
    parse_size,
    parse_whole,
)

MIB = 1024 * 1024

PIDS_FORMS = "a whole number of processes, e.g. 256"
#: What the kernel accepts as pids.max (PID_MAX_LIMIT on 64-bit).
PIDS_KERNEL_MAX = 4 * 1024 * 1024


def parse_count(value: object, field: str = "pids") -> int:
    """A whole number written with ASCII digits (``256``, ``"256"``); SpecError otherwise.
    The parser of the ``pids`` bound (kernelspecs, ``--pids``, live ``%sandbox pids=``)."""
    return parse_whole(value, field, PIDS_FORMS)


@dataclass(frozen=True)
class Bound:
    """The accepted range and form of one cap.

    name: the setting's name (``memory``). parser: raw value -> number (raises SpecError).
    minimum/maximum: inclusive range (maximum None: no upper bound). forms: accepted forms,
    for messages. fmt: number -> human form (``1 GiB``). short: number -> input form that the
    parser accepts back (``1024M``), used in "use at least ..." advice.
    """

    name: str
    parser: Callable[[Any, str], float]
    minimum: float
    maximum: float | None
    forms: str
    fmt: Callable[[float], str]
    short: Callable[[float], str]

    def parse(self, raw: object, field: str | None = None) -> Any:
        """The value of ``raw`` (``"2G"``, ``1.5``, ``"256"``) if it is in range; else a
        SpecError naming the field, the value and the accepted form or range. Called at
        kernel start (``resolve``), by ``kernelspec install`` and by ``run``'s options."""
        field = field or self.name
        if isinstance(raw, str) and len(raw) > 64:
            raise SpecError(f"{field}={raw[:32]!r}... is too long; use {self.forms}")
        value = self.parser(raw, field)
        problem = self.problem(value, raw, field)
        if problem:
            raise SpecError(problem)
        return value

    def problem(self, value: float, raw: object = None, field: str | None = None) -> str | None:
        """The one-line reason ``value`` is out of range, or None. Called by ``parse``, by
        ``limit_problems`` and by the spec validator of the tmpfs sizes."""
        field = field or self.name
        shown = repr(raw) if raw is not None else str(value)
        if value < self.minimum:
            return f"{field}={shown} is too small; {self.accepted()}"
        if self.maximum is not None and value > self.maximum:
            return f"{field}={shown} is too large; {self.accepted()}"
        return None

    def accepted(self) -> str:
        """The accepted range as advice (``use 16 to 4194304``), for ``problem``'s messages."""
        low = self.short(self.minimum)
        if self.maximum is None:
            return f"use at least {low}"
        return f"use {low} to {self.short(self.maximum)}"


def _size_short(n: float) -> str:
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", MIB), ("K", 1024)):
        if n >= factor and n % factor == 0:
            return f"{int(n // factor)}{unit}"
    return str(int(n))


#: The largest size any cap takes (1 EiB): the kernel parses memory.max and a tmpfs size=
#: as 64-bit byte counts that wrap silently (a tmpfs size that wraps to 0 has no limit), so
#: a size is refused here long before that, with the range, never at the cgroup or mount.
SIZE_MAX = 1 << 60


def _size_bound(name: str, minimum: int) -> Bound:
    return Bound(name, parse_size, minimum, SIZE_MAX, SIZE_FORMS, format_size, _size_short)


MEMORY = _size_bound("memory", 16 * MIB)
CPUS = Bound("cpus", parse_cpus, 0.01, 1024.0, CPUS_FORMS, format_cpus, format_cpus)
PIDS = Bound("pids", parse_count, 16, PIDS_KERNEL_MAX, PIDS_FORMS, lambda n: str(int(n)), str)
TMP_SIZE = _size_bound("tmp_size", MIB)
WRITABLE_SIZE = _size_bound("writable_size", MIB)
SHM_SIZE = _size_bound("shm_size", MIB)
#: A notebook folder's or a home's disk quota (``quota``).
DISK_QUOTA = _size_bound("disk_quota", MIB)

#: A network-mode ``nat`` container's bandwidth in each direction, bits per second (tbf
#: keeps its rate in 32 bits of bytes per second: 10 gbit is well inside).
BANDWIDTH = Bound(
    "bandwidth", parse_rate, 64_000, 10_000_000_000, RATE_FORMS, format_rate, format_rate
)

#: Every bound by setting name.
BOUNDS: dict[str, Bound] = {
    b.name: b
    for b in (MEMORY, CPUS, PIDS, TMP_SIZE, WRITABLE_SIZE, SHM_SIZE, DISK_QUOTA, BANDWIDTH)
}
#: The caps a running kernel may change (``%sandbox memory=2G cpus=2 pids=512``).
LIVE: tuple[str, ...] = ("memory", "cpus", "pids")
#: The live caps of a network-mode ``nat`` kernel besides ``LIVE`` (``%sandbox
#: bandwidth=8mbit``): they are no cgroup limit, so ``plan_change`` leaves them to its caller
#: (the provisioner, which checks them with ``check_live`` and applies them to the link).
LIVE_NETWORK: tuple[str, ...] = ("bandwidth",)


@dataclass(frozen=True)
class Limits:
    """Resource caps of one container (``ContainerSpec.limits``). ``None`` means no cap.

    Built by ``jupyter.resolve.resolve_settings`` and ``sandbox-kernel run``; replaced by
    ``plan_change`` on a live change; turned into cgroup values by ``container.cgroup_limits``.

    memory: bytes; swap is off (memory+swap = memory) unless ``memory_swap`` is set.
    memory_swap: bytes of swap allowed on top of memory (None: swap off).
    cpus: fractional CPUs, applied as a CFS quota over a 100 ms period.
    cpu_weight: relative share 1..10000 (v2 cpu.weight; v1 cpu.shares is derived).
    pids: maximum number of tasks.
    defer_cpu: create the container without the CPU quota; ``Container.apply_deferred_cpu``
    applies it later (kernel start is CPU-bound; the provisioner applies it once the kernel
    answered its first request).
    """

    memory: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    cpu_weight: int | None = None
    pids: int | None = None
    defer_cpu: bool = False


def limit_problems(limits: Limits) -> list[str]:
    """Every cap of ``limits`` outside its bound, one line each (``runtime.validate`` calls
    this for each container spec)."""
    out = []
    for name in LIVE:
        value = getattr(limits, name)
        if value is not None:
            problem = BOUNDS[name].problem(value)
            if problem:
                out.append(problem)
    if limits.memory_swap is not None and limits.memory_swap < 0:
        out.append(f"memory_swap={limits.memory_swap} must be >= 0 bytes")
    if limits.cpu_weight is not None and not 1 <= limits.cpu_weight <= 10000:
        out.append(f"cpu_weight={limits.cpu_weight} is out of range; use 1..10000 (100 = default)")
    return out


@dataclass(frozen=True)
class Ceilings:
    """The administrator's per-kernel ceilings, parsed: ``SandboxPolicy.max_*`` (read by
    ``jupyter.resolve.read_policy``) and the policy file's (``policy.HostPolicy.for_user``),
    the tighter of both (``tighter``). None: no ceiling (the bound still applies).

    where: (name, source) pairs naming where a ceiling came from, for messages
    (``SandboxPolicy.max_memory`` when a name has none).
    """

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    tmp_size: int | None = None
    writable_size: int | None = None
    #: a network-mode ``nat`` kernel's bandwidth, bits per second in each direction
    bandwidth: int | None = None
    where: tuple[tuple[str, str], ...] = ()

    def of(self, name: str) -> float | None:
        """The ceiling of setting ``name`` (None when there is none or it has no ceiling).
        Called at kernel start (a default above it is lowered to it) and by ``plan_change``."""
        return getattr(self, name, None) if name in CEILING_NAMES else None

    def source(self, name: str) -> str:
        """Where the ceiling of ``name`` was set (``SandboxPolicy.max_memory``, a policy
        file's section), for refusals."""
        return dict(self.where).get(name, f"SandboxPolicy.max_{name}")

    def describe(self, name: str) -> str | None:
        """The ceiling in human form (``4 GiB``), or None (what ``%sandbox`` shows)."""
        top = self.of(name)
        return None if top is None else BOUNDS[name].fmt(top)

    def tighter(self, other: Ceilings) -> Ceilings:
        """Each ceiling the lower of ``self``'s and ``other``'s, with its source. Called by
        ``jupyter.resolve`` to hold the server's ``SandboxPolicy`` and the policy file."""
        values: dict[str, Any] = {}
        where = []
        for name in sorted(CEILING_NAMES):
            mine, theirs = self.of(name), other.of(name)
            pick = self if theirs is None or (mine is not None and mine <= theirs) else other
            values[name] = pick.of(name)
            if values[name] is not None:
                where.append((name, pick.source(name)))
        return Ceilings(**values, where=tuple(where))

    def or_start(self, limits: Limits, bandwidth: int | None = None) -> Ceilings:
        """The live ceilings of a kernel started with ``limits`` (and, network ``nat``,
        ``bandwidth``): where the administrator set none, the start value (a kernelspec's
        caps are the most its notebook can ask for without an administrator's ceiling; a
        ``nat`` kernel started without a cap may be given any). Called for each ``%sandbox``
        request."""
        values: dict[str, Any] = {n: self.of(n) for n in CEILING_NAMES}
        where = list(self.where)
        starts = {name: getattr(limits, name) for name in LIVE} | {"bandwidth": bandwidth}
        for name, start in starts.items():
            if values[name] is None and start is not None:
                values[name] = start
                where.append((name, KERNELSPEC_CEILING))
        return Ceilings(**values, where=tuple(where))

    def start_problem(self, name: str, raw: object, value: float) -> str | None:
        """Why a kernelspec value is above the ceiling, or None. Called by
        ``jupyter.resolve`` for each cap at kernel start."""
        top = self.of(name)
        if top is None or value <= top:
            return None
        text = BOUNDS[name].fmt(top)
        return (
            f"{name}={raw!r} is above the administrator's ceiling "
            f"({self.source(name)} = {text}); ask for at most {text}"
        )


#: The source of a live ceiling that is the kernel's start value (``Ceilings.or_start``).
KERNELSPEC_CEILING = "the kernelspec's value; the administrator set no higher ceiling"
CEILING_NAMES = frozenset(f.name for f in fields(Ceilings)) - {"where"}


def _live_text(name: str, value: float) -> str:
    if name == "memory":
        return format_size(value)
    if name == "cpus":
        return f"{value:g} CPUs"
    if name == "bandwidth":
        return f"{format_rate(value)} in each direction"
    return f"{int(value)} processes"


def check_live(name: str, raw: object, ceilings: Ceilings) -> Any:
    """The value of one live change ``name=raw`` (a name of ``LIVE`` or ``LIVE_NETWORK``)
    once it passed its form, the ceiling and its bound; LimitRefused (CeilingRefused above
    the ceiling) naming the field, the value and what is allowed. Called by
    ``plan_change`` for each cap, and by the provisioner for a ``nat`` kernel's
    ``bandwidth``."""
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool) or len(str(raw)) > 32:
        raise LimitRefused(f"{name}={str(raw)[:32]!r} is not a valid value")
    bound = BOUNDS[name]
    try:
        value = bound.parser(raw, name)
    except SpecError as exc:
        raise LimitRefused(str(exc)) from None
    top = ceilings.of(name)
    if top is not None and value > top:
        why = ceilings.source(name)
        raise CeilingRefused(
            f"{name}={raw} refused: this server allows at most "
            f"{_live_text(name, top)} per kernel"
            + (f" ({why})" if why == KERNELSPEC_CEILING else "")
        )
    problem = bound.problem(value, raw, name)  # the one range check, as at start
    if problem:
        raise LimitRefused(problem)
    return value


def plan_change(
    request: Mapping[str, Any],
    current: Limits,
    ceilings: Ceilings,
    memory_usage: int | None,
    *,
    network: bool = False,
) -> tuple[Limits, list[str]]:
    """Validate a live ``set`` request (``{"op": "set", "memory": "2G"}``) against the bounds
    and the ceilings; return the new limits and warnings. Called by the provisioner for each
    request on a kernel's control socket. Raises LimitRefused naming the field, the value and
    the allowed range. ``network``: the kernel has network ``nat``, so ``LIVE_NETWORK``
    fields are accepted too, and left to the caller (``check_live``); without it they are
    refused with the reason.
    """
    fields_ok = (*LIVE, *LIVE_NETWORK) if network else LIVE
    asked_net = sorted(k for k in LIVE_NETWORK if k in request)
    if asked_net and not network:
        raise LimitRefused(
            f"{', '.join(asked_net)}: this kernel has network 'none' (loopback only), so "
            "there is nothing to cap; a kernelspec with network 'nat' has a bandwidth"
        )
    unknown = sorted(str(k)[:32] for k in set(request) - {"op", *fields_ok})
    if unknown:
        raise LimitRefused(
            f"unknown field(s) {', '.join(unknown)}; you can change: {', '.join(fields_ok)}"
        )
    changes = {k: request[k] for k in LIVE if k in request}
    if not changes and not asked_net:
        raise LimitRefused(
            f"nothing to change; give one of: {', '.join(fields_ok)}, e.g. memory=2G"
        )
    new = current
    warnings: list[str] = []
    for name, raw in changes.items():
        value = check_live(name, raw, ceilings)
        if name == "memory" and memory_usage is not None and value < memory_usage:
            warnings.append(
                f"the kernel uses {format_size(memory_usage)} now, more than the new limit "
                f"{format_size(value)}: it may be stopped for lack of memory"
            )
        if name == "cpus":
            new = replace(new, cpus=float(value))
        elif name == "memory":
            new = replace(new, memory=int(value))
        else:
            new = replace(new, pids=int(value))
    return new, warnings
