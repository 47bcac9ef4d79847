"""The host's policy file: the administrator's limits per user and per group, owned by root.

Layer: leaf (imports ``errors``, ``limits`` and ``units`` only). One TOML file,
``/etc/sandbox-kernel/policy.toml`` (``$SANDBOX_KERNEL_POLICY`` names another), read by:

* the Jupyter layer at each kernel start and each live ``%sandbox`` change
  (``jupyter.resolve``): the per-kernel ceilings, the allowed images, network modes and
  allow-list, and the most kernels of the kernel's user (the network keys are kept as text
  here and parsed there, by the network layer's parsers). On a hub this check runs in the
  student's own server, so it is the friendly first refusal, with the ceiling named;
* root's ``sandbox-kernel delegate USER`` (and so the JupyterHub spawner hook,
  ``sandbox_kernel.hub``): the user's aggregate caps and the host's reserve, written into
  cgroups the user does not own. That is the enforcement a student cannot lift;
* ``sandbox-kernel doctor``, which warns when there is none.

The file's keys (every one optional) are those of ``SandboxPolicy``'s traits; ``EXAMPLE``
shows them all.

A user's values: the top level, then every group the user is in (where several groups set
a key, the most generous value wins; images add up), then the user's own section. A file
that is not root's, or that others can write, is refused, and so is every kernel start
while it is: a policy the administrator cannot trust must not be half-applied.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

from .errors import SpecError
from .limits import BOUNDS, Ceilings, parse_count

DEFAULT_PATH = "/etc/sandbox-kernel/policy.toml"
#: A policy file using every key (docs/configuration.md shows it; a unit test parses it).
EXAMPLE = """\
# /etc/sandbox-kernel/policy.toml: owned by root, mode 644
max_memory = "2G"            # per-kernel ceilings, for everyone
max_cpus = 1
max_pids = 512
max_tmp_size = "512M"
max_writable_size = "512M"
allowed_images = ["python3", "python2.7"]
max_kernels = 3              # kernels one user may run at once
sandboxed_only = true        # a hub offers students only the sandbox kernelspecs
user_memory = "4G"           # aggregate caps over all of one user's kernels (delegate)
user_cpus = 1.5
user_pids = 1024
home_quota = "2G"            # disk quota of each user's home (the hub hook sets it, as root)
allowed_networks = ["none"]  # network modes kernels may use ("nat": with network_allow)

[reserve]                    # never given to users' kernels: the hub and servers keep it
memory = "2G"
cpus = 0.5

[groups.instructors]         # members of a unix group: the same keys
max_memory = "8G"
max_kernels = 8
sandboxed_only = false
user_memory = "12G"
allowed_networks = ["none", "nat"]
network_allow = ["198.18.0.0/15", "pypi.org:443"]   # the most a "nat" kernel may reach
max_bandwidth = "16mbit"     # per-kernel bandwidth ceiling, each direction

[users.alice]                # one user (name or uid): the same keys, highest priority
max_kernels = 6
"""
ENV = "SANDBOX_KERNEL_POLICY"
#: A policy file is a few hundred bytes; a bigger one is refused before it is parsed.
MAX_BYTES = 256 * 1024

#: Per-kernel ceiling keys -> the limit bound that parses them.
CEILING_KEYS = {
    "max_memory": "memory",
    "max_cpus": "cpus",
    "max_pids": "pids",
    "max_tmp_size": "tmp_size",
    "max_writable_size": "writable_size",
    "max_bandwidth": "bandwidth",
}
#: Aggregate (per-user) cap keys -> the bound that parses them.
USER_KEYS = {
    "user_memory": "memory",
    "user_cpus": "cpus",
    "user_pids": "pids",
    "home_quota": "disk_quota",
}
OTHER_KEYS = (
    "allowed_images",
    "max_kernels",
    "sandboxed_only",
    "allowed_networks",
    "network_allow",
)
RULE_KEYS = (*CEILING_KEYS, *USER_KEYS, *OTHER_KEYS)
RESERVE_KEYS = ("memory", "cpus")
#: The most kernels one user may be allowed at once (a typo guard).
MAX_KERNELS_BOUND = 10000


#: ``SANDBOX_KERNEL_POLICY=none``: no policy file, on purpose (tests; hosts without one).
NO_FILE = "none"


def policy_path() -> str | None:
    """The policy file's path: ``$SANDBOX_KERNEL_POLICY`` or ``/etc/sandbox-kernel/policy.toml``;
    None for ``SANDBOX_KERNEL_POLICY=none``. Called by ``load`` and by ``doctor`` (which
    names it)."""
    env = os.environ.get(ENV)
    if env == NO_FILE:
        return None
    return env or DEFAULT_PATH


@dataclass(frozen=True)
class Rule:
    """The parsed keys of one section (top level, a group or a user). None: not set there."""

    ceilings: Mapping[str, float] = field(default_factory=dict)  # bound name -> value
    user: Mapping[str, float] = field(default_factory=dict)  # bound name -> aggregate value
    images: tuple[str, ...] | None = None
    max_kernels: int | None = None
    sandboxed_only: bool | None = None
    #: network modes and the ``nat`` allow-list, as text (``jupyter.resolve`` parses them)
    networks: tuple[str, ...] | None = None
    network_allow: tuple[str, ...] | None = None


@dataclass(frozen=True)
class UserPolicy:
    """What the policy file gives one user (``HostPolicy.for_user``); plain data.

    ceilings: per-kernel ceilings with where each came from (for messages).
    images: allowed image names; () means every image.
    max_kernels: most kernels at once (None: no limit of the file's).
    user_memory/user_cpus/user_pids: the aggregate caps ``delegate`` writes.
    """

    ceilings: Ceilings = field(default_factory=Ceilings)
    images: tuple[str, ...] = ()
    max_kernels: int | None = None
    user_memory: int | None = None
    user_cpus: float | None = None
    user_pids: int | None = None
    #: Disk quota of the user's home (bytes; the JupyterHub hook sets it, as root).
    home_quota: int | None = None
    #: Offer only sandboxed kernelspecs in the user's server (the JupyterHub hook applies it).
    sandboxed_only: bool = False
    #: Network modes the user's kernels may use, and the most a ``nat`` kernel may reach
    #: (text, parsed by ``jupyter.resolve``); None: the file sets none.
    networks: tuple[str, ...] | None = None
    network_allow: tuple[str, ...] | None = None
    where: str = ""  # "/etc/sandbox-kernel/policy.toml (groups.students, users.alice)"


@dataclass(frozen=True)
class HostPolicy:
    """The whole policy file, parsed and checked (``load``)."""

    path: str
    top: Rule = field(default_factory=Rule)
    groups: Mapping[str, Rule] = field(default_factory=dict)
    users: Mapping[str, Rule] = field(default_factory=dict)
    reserve_memory: int | None = None
    reserve_cpus: float | None = None

    def for_user(self, uid: int) -> UserPolicy:
        """The policy of user ``uid``: top level, then the user's groups (most generous
        where several set a key), then the user's own section. Called at each kernel start
        (the kernel's user) and by ``delegate`` (the delegated user)."""
        name: str | None
        try:
            entry = pwd.getpwuid(uid)
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:
            name, gid = None, None
        applied: list[str] = []
        groups = _group_names(name, gid) if name is not None else set()
        group_rules = [(g, r) for g, r in self.groups.items() if g in groups]
        merged = _generous([r for _, r in group_rules])
        applied.extend(f"groups.{g}" for g, _ in group_rules)
        sources = {n: "top level" for n in self.top.ceilings}
        for n, v in merged.ceilings.items():  # the group whose value won
            sources[n] = next(f"groups.{g}" for g, r in group_rules if r.ceilings.get(n) == v)
        rule = _override(self.top, merged)
        for key in (name, str(uid)):
            own = self.users.get(key) if key is not None else None
            if own is not None:
                rule = _override(rule, own)
                sources.update({n: f"users.{key}" for n in own.ceilings})
                applied.append(f"users.{key}")
                break
        where = self.path + (f" ({', '.join(applied)})" if applied else "")
        values: dict[str, Any] = {n: _typed(n, v) for n, v in rule.ceilings.items()}
        ceilings = Ceilings(
            **values,
            where=tuple((n, f"{self.path} [{sources[n]}] max_{n}") for n in sorted(rule.ceilings)),
        )
        return UserPolicy(
            ceilings=ceilings,
            images=rule.images or (),
            max_kernels=rule.max_kernels,
            user_memory=_opt_int(rule.user.get("memory")),
            user_cpus=rule.user.get("cpus"),
            user_pids=_opt_int(rule.user.get("pids")),
            home_quota=_opt_int(rule.user.get("disk_quota")),
            sandboxed_only=bool(rule.sandboxed_only),
            networks=rule.networks,
            network_allow=rule.network_allow,
            where=where,
        )


def _typed(name: str, value: float) -> float:
    return value if name == "cpus" else int(value)


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _group_names(name: str, gid: int | None) -> set[str]:
    """The names of every group ``name`` is in (primary and supplementary)."""
    out: set[str] = set()
    try:
        gids = os.getgrouplist(name, gid if gid is not None else -1)
    except OSError:
        gids = [gid] if gid is not None else []
    for g in gids:
        try:
            out.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return out


def _union(lists: list[tuple[str, ...] | None]) -> tuple[str, ...] | None:
    """The items of every list given, in order, each once; None when none is given (a
    group that sets no list does not open everything)."""
    out: list[str] | None = None
    for items in lists:
        if items is not None:
            out = [*(out or []), *(i for i in items if i not in (out or []))]
    return None if out is None else tuple(out)


def _generous(rules: list[Rule]) -> Rule:
    """Several groups' rules as one: the largest value of each key, the union of images,
    of network modes and of allow-lists (a group that sets no list does not open
    everything)."""
    ceilings: dict[str, float] = {}
    user: dict[str, float] = {}
    images: list[str] | None = None
    kernels: int | None = None
    only: bool | None = None
    for r in rules:
        for n, v in r.ceilings.items():
            ceilings[n] = max(ceilings.get(n, v), v)
        for n, v in r.user.items():
            user[n] = max(user.get(n, v), v)
        if r.images is not None:
            images = [*(images or []), *(i for i in r.images if i not in (images or []))]
        if r.max_kernels is not None:
            kernels = max(kernels or 0, r.max_kernels)
        if r.sandboxed_only is not None:
            only = r.sandboxed_only if only is None else (only and r.sandboxed_only)
    return Rule(
        ceilings,
        user,
        tuple(images) if images is not None else None,
        kernels,
        only,
        _union([r.networks for r in rules]),
        _union([r.network_allow for r in rules]),
    )


def _override(base: Rule, top: Rule) -> Rule:
    """``base`` with every key ``top`` sets replaced by ``top``'s value."""
    return Rule(
        {**base.ceilings, **top.ceilings},
        {**base.user, **top.user},
        top.images if top.images is not None else base.images,
        top.max_kernels if top.max_kernels is not None else base.max_kernels,
        top.sandboxed_only if top.sandboxed_only is not None else base.sandboxed_only,
        top.networks if top.networks is not None else base.networks,
        top.network_allow if top.network_allow is not None else base.network_allow,
    )


# ---- reading ---------------------------------------------------------------------------------


def load(path: str | None = None) -> HostPolicy | None:
    """The policy file parsed, or None when there is none. Raises SpecError naming the file
    and every problem (untrusted owner or mode, TOML syntax, unknown keys, bad values). A
    file that ``$SANDBOX_KERNEL_POLICY`` names must exist (a typo must not turn the policy
    off); only the default path may be absent. Called at each kernel start and live change,
    by ``delegate``, the hub hooks and ``doctor``."""
    required = path is not None or bool(os.environ.get(ENV))
    path = path or policy_path()
    if path is None:
        return None
    data = _read_trusted(path, required)
    return None if data is None else parse_text(data, path)


def parse_text(data: bytes | str, path: str) -> HostPolicy:
    """The policy file's content parsed (``load`` calls it; tests and ``EXAMPLE`` too)."""
    try:
        raw = tomllib.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"cannot parse it: {exc}; fix the TOML", context=_ctx(path)) from None
    return parse(raw, path)


def _ctx(path: str) -> str:
    return f"the policy file {path}"


def _read_trusted(path: str, required: bool) -> bytes | None:
    """The file's bytes if it is root's and only root can change it: it, its folder and every
    folder above (links resolved first, then nothing followed); None if it does not exist
    and is not ``required``."""
    real = os.path.realpath(path)
    shown = path if real == path else f"{path} (-> {real})"
    fix = f"as root: chown root:root {real} && chmod 644 {real}"
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        if not required:
            return None
        raise SpecError(
            f"does not exist; create it, or unset {ENV} ({ENV}={NO_FILE}: no policy file)",
            context=_ctx(shown),
        ) from None
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError("is not a regular file; make it one", context=_ctx(shown))
    _check_folders(real, shown)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise SpecError("changed while it was read; try again", context=_ctx(shown))
        if fst.st_uid != 0 or fst.st_mode & 0o022:
            raise SpecError(
                "must belong to root and be writable by root only, or any user could "
                f"change the limits; {fix}",
                context=_ctx(shown),
            )
        if fst.st_size > MAX_BYTES:
            raise SpecError(
                f"is {fst.st_size} bytes; a policy file holds at most {MAX_BYTES}",
                context=_ctx(shown),
            )
        return os.read(fd, MAX_BYTES + 1)
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    finally:
        os.close(fd)


def _unreadable(shown: str, exc: OSError) -> SpecError:
    return SpecError(
        f"cannot be read by uid {os.geteuid()} ({exc.strerror}); every user's server reads "
        "it: make it readable by everyone (chmod 644) in folders everyone may enter (chmod 755)",
        context=_ctx(shown),
    )


def _check_folders(real: str, shown: str) -> None:
    """Every folder above the file is root's and writable by root only (a sticky folder
    such as /tmp may be an ancestor, never the file's own folder: there anyone could plant
    the file while it is absent)."""
    folder = os.path.dirname(real)
    parts = [p for p in folder.split("/") if p]
    for i in range(len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        try:
            dst = os.lstat(d)
        except OSError as exc:
            raise _unreadable(shown, exc) from None
        own = d == folder
        writable = dst.st_mode & 0o022 and (own or not dst.st_mode & stat.S_ISVTX)
        if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != 0 or writable:
            raise SpecError(
                f"is in {folder}, and {d} is not a folder only root can write (others could "
                f"replace the file); keep it where only root writes, e.g. "
                f"{os.path.dirname(DEFAULT_PATH)}",
                context=_ctx(shown),
            )


def parse(raw: Mapping[str, Any], path: str) -> HostPolicy:
    """A decoded policy file as a ``HostPolicy`` (raises SpecError listing every problem,
    each with its section and key). Called by ``load``; tests call it with a dict."""
    problems: list[str] = []
    top_raw = {k: v for k, v in raw.items() if k not in ("groups", "users", "reserve")}
    top = _rule(top_raw, "(top level)", problems)
    sections: dict[str, dict[str, Rule]] = {"groups": {}, "users": {}}
    for kind in sections:
        table = raw.get(kind, {})
        if not isinstance(table, Mapping):
            problems.append(f"[{kind}] must be a table of [{kind}.NAME] sections")
            continue
        for name, body in table.items():
            if not isinstance(body, Mapping):
                problems.append(f"{kind}.{name} must be a table ([{kind}.{name}])")
                continue
            sections[kind][str(name)] = _rule(body, f"[{kind}.{name}]", problems)
    reserve = raw.get("reserve", {})
    memory = cpus = None
    if not isinstance(reserve, Mapping):
        problems.append("[reserve] must be a table with memory and cpus")
    else:
        for key in sorted(set(reserve) - set(RESERVE_KEYS)):
            problems.append(f"[reserve] {key!r} is not a key; use: {', '.join(RESERVE_KEYS)}")
        if "memory" in reserve:
            memory = _value(BOUNDS["memory"].parse, reserve["memory"], "[reserve] memory", problems)
        if "cpus" in reserve:
            cpus = _value(BOUNDS["cpus"].parse, reserve["cpus"], "[reserve] cpus", problems)
    if problems:
        raise SpecError(problems, context=_ctx(path))
    return HostPolicy(
        path,
        top,
        sections["groups"],
        sections["users"],
        None if memory is None else int(memory),
        cpus,
    )


def _value(parser: Callable[[Any, str], Any], raw: Any, where: str, problems: list[str]) -> Any:
    if isinstance(raw, bool):
        problems.append(f"{where} = {raw!r} is not a value of its kind")
        return None
    try:
        return parser(raw, where)
    except SpecError as exc:
        problems.extend(exc.problems)
        return None


def _images(raw: Any, at: str, problems: list[str]) -> tuple[str, ...] | None:
    if not isinstance(raw, list) or not all(isinstance(i, str) and i for i in raw):
        problems.append(f'{at} must be a list of image names, e.g. ["python3"]')
        return None
    if not raw:  # [] would read as "every image"
        problems.append(f"{at} = [] allows no image; name at least one, or leave the key out")
        return None
    return tuple(raw)


def _kernels(raw: Any, at: str, problems: list[str]) -> int | None:
    v = _value(parse_count, raw, at, problems)
    if v is not None and not 1 <= v <= MAX_KERNELS_BOUND:
        problems.append(f"{at} = {raw!r} is out of range; use 1..{MAX_KERNELS_BOUND}")
        return None
    return None if v is None else int(v)


def _texts(raw: Any, at: str, problems: list[str]) -> tuple[str, ...] | None:
    """A list of short strings (network modes, allow-list entries), checked for their
    form by ``jupyter.resolve``."""
    if not isinstance(raw, list) or not all(isinstance(i, str) and 0 < len(i) <= 260 for i in raw):
        problems.append(f'{at} must be a list of strings, e.g. ["198.18.0.0/15", "pypi.org:443"]')
        return None
    return tuple(raw)


def _flag(raw: Any, at: str, problems: list[str]) -> bool | None:
    if not isinstance(raw, bool):
        problems.append(f"{at} = {raw!r} must be true or false")
        return None
    return raw


def _rule(body: Mapping[str, Any], where: str, problems: list[str]) -> Rule:
    """One section's keys parsed; each problem (unknown key, bad value) appended."""
    ceilings: dict[str, float] = {}
    user: dict[str, float] = {}
    other: dict[str, Any] = {}
    parsers = {
        "allowed_images": _images,
        "max_kernels": _kernels,
        "sandboxed_only": _flag,
        "allowed_networks": _texts,
        "network_allow": _texts,
    }
    for key, raw in body.items():
        at = f"{where} {key}"
        for keys, into in ((CEILING_KEYS, ceilings), (USER_KEYS, user)):
            if key in keys:
                v = _value(BOUNDS[keys[key]].parse, raw, at, problems)
                if v is not None:
                    into[keys[key]] = v
                break
        else:
            if key in parsers:
                other[key] = parsers[key](raw, at, problems)
            else:
                problems.append(f"{at}: not a policy key; use: {', '.join(RULE_KEYS)}")
    return Rule(
        ceilings,
        user,
        other.get("allowed_images"),
        other.get("max_kernels"),
        other.get("sandboxed_only"),
        other.get("allowed_networks"),
        other.get("network_allow"),
    )
