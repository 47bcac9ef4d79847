"""The executor's operations as typed records (one class per record of
docs/runtime-protocol.md).

Layer: runtime (OS side; pure data).

``plan.compile_plan`` builds a list of them from a spec; ``protocol.encode_plan`` writes
each as one line (``op.record()``: its keyword and its fields as text); the executor
(``native/sk-runtime.c``) performs them. Field types are Python's (ints, octal modes,
tuples of flags); the text form is made here only, in ``record``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

_T = TypeVar("_T")

if TYPE_CHECKING:
    from dataclasses import dataclass
else:

    def dataclass(*, frozen: bool) -> Callable[[type[_T]], type[_T]]:
        """A frozen record class without ``dataclasses``' code generation (it costs about
        0.6 ms a class, 17 ms for this module, on every start of ``sandbox-kernel run``):
        the fields are the class's annotated names after its bases', defaults are the class
        attributes; ``__init__`` (positional or by name), ``__eq__``, ``__hash__``,
        ``__repr__``; instances are immutable. Type checkers see ``dataclasses.dataclass``
        (same semantics for what this module uses)."""
        assert frozen

        def make(cls: type[_T]) -> type[_T]:
            own = inspect.get_annotations(cls)
            names = [n for n, t in own.items() if not str(t).startswith("ClassVar")]
            inherited: tuple[str, ...] = getattr(cls, "_fields", ())
            all_names = (*inherited, *(n for n in names if n not in inherited))
            defaults = {n: getattr(cls, n) for n in all_names if hasattr(cls, n)}
            cls._fields = all_names
            cls._defaults = defaults
            cls.__init__ = _init
            cls.__setattr__ = _frozen
            cls.__eq__ = _eq
            cls.__hash__ = _hash
            cls.__repr__ = _repr
            cls.__match_args__ = all_names
            return cls

        return make


def _init(self: Any, *args: Any, **kw: Any) -> None:
    names = self._fields
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__} takes at most {len(names)} fields")
    values = dict(zip(names, args, strict=False))
    for name, value in kw.items():
        if name not in names or name in values:
            raise TypeError(f"{type(self).__name__}: unexpected or repeated field {name!r}")
        values[name] = value
    for name in names:
        if name not in values:
            if name not in self._defaults:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")
            values[name] = self._defaults[name]
        object.__setattr__(self, name, values[name])


def _frozen(self: Any, name: str, value: Any) -> None:
    raise AttributeError(f"{type(self).__name__} is immutable")


def _values(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, n) for n in self._fields)


def _eq(self: Any, other: object) -> Any:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash((type(self), _values(self)))


def _repr(self: Any) -> str:
    inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
    return f"{type(self).__name__}({inner})"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "-"
    if value is None:
        return "-"
    return str(value)


@dataclass(frozen=True)
class Op:
    """Base of every operation: ``keyword`` names the record; the dataclass fields, in order,
    are its fields. Subclasses with a ``mode`` field write it in octal."""

    keyword: ClassVar[str] = ""
    #: the record's field names, in order (set by the class decorator)
    _fields: ClassVar[tuple[str, ...]] = ()

    def record(self) -> tuple[str, ...]:
        """The record as the protocol writes it: keyword, then each field as text. Called by
        ``protocol.encode_plan`` for each operation."""
        out = [self.keyword]
        for name in self._fields:
            value = getattr(self, name)
            out.append(f"{value:o}" if name == "mode" else _text(value))
        return tuple(out)


@dataclass(frozen=True)
class _PathOp(Op):
    """An operation on one path inside the container."""

    path: str


@dataclass(frozen=True)
class _PathModeOp(Op):
    """An operation creating ``path`` inside the root with ``mode`` (octal on the wire)."""

    path: str
    mode: int


@dataclass(frozen=True)
class _MapOp(Op):
    """One user-namespace map line: ids ``inside..`` of the container are ``outside..``."""

    inside: int
    outside: int
    count: int


# ---- supervisor records (host side) -------------------------------------------------------


@dataclass(frozen=True)
class ContainerId(Op):
    """The container id, used in the executor's messages."""

    keyword = "id"
    id: str


@dataclass(frozen=True)
class Namespaces(Op):
    """The namespaces to create (``mount``, ``pid``, ``uts``, ``ipc``, ``net``, ``cgroup``,
    ``user``)."""

    keyword = "namespaces"
    names: tuple[str, ...]


@dataclass(frozen=True)
class JoinCgroup(Op):
    """A cgroup directory init joins before unsharing the cgroup namespace."""

    keyword = "cgroup"
    dir: str


@dataclass(frozen=True)
class Seccomp(Op):
    """A file of raw ``struct sock_filter``, loaded as the last step before exec."""

    keyword = "seccomp"
    file: str


@dataclass(frozen=True)
class SyncNet(Op):
    """Init waits for ``go`` on the control fd while the owner configures the network."""

    keyword = "sync"
    what: str = "net"


@dataclass(frozen=True)
class Netlink(Op):
    """One rtnetlink request (hex), sent by init in the container's network namespace; its
    reply comes back on the status fd as ``netlink HEX``."""

    keyword = "netlink"
    request: str


class UidMap(_MapOp):
    """One uid map line of the user namespace (written by the supervisor)."""

    keyword = "uidmap"


class GidMap(_MapOp):
    """One gid map line of the user namespace (written by the supervisor)."""

    keyword = "gidmap"


@dataclass(frozen=True)
class IdmapHelper(Op):
    """The setuid helpers that write an unprivileged caller's maps."""

    keyword = "idmap-helper"
    uid_helper: str
    gid_helper: str


@dataclass(frozen=True)
class NoUserns(Op):
    """No user namespace may be created inside the container."""

    keyword = "nouserns"


class BindMap(_MapOp):
    """One line of the id map of idmapped binds (on-disk id ``inside`` is host ``outside``)."""

    keyword = "bindmap"


class LowerMap(_MapOp):
    """One line of the id map of idmapped image layers."""

    keyword = "lowermap"


# ---- mount phase (init, in order) ---------------------------------------------------------


@dataclass(frozen=True)
class Hostname(Op):
    """sethostname in the new uts namespace."""

    keyword = "hostname"
    name: str


@dataclass(frozen=True)
class Scratch(Op):
    """The writable layer's home: a tmpfs of ``size`` bytes holding at most ``inodes``
    files on host directory ``dir``, or ``dir`` itself when ``size`` is None (a persistent
    upper layer, for image builds; ``inodes`` None too)."""

    keyword = "scratch"
    dir: str
    size: int | None
    inodes: int | None = None


class ShimDir(_PathModeOp):
    """A directory of the shim layer (made before the root; see ``runtime.shim``)."""

    keyword = "shimdir"


class ShimFile(_PathModeOp):
    """An empty file of the shim layer (the plan writes its content later)."""

    keyword = "shimfile"


@dataclass(frozen=True)
class RootFs(Op):
    """The overlay root over ``layers`` (top-most first)."""

    keyword = "rootfs"
    layers: tuple[str, ...]

    def record(self) -> tuple[str, ...]:
        """One field: the layers joined with ':' (overlay's lowerdir form)."""
        return (self.keyword, ":".join(self.layers))


class RealDir(_PathOp):
    """``path`` must be a real directory of the image (no symlink on the way)."""

    keyword = "realdir"


class Mkdir(_PathModeOp):
    """mkdir -p inside the root."""

    keyword = "mkdir"


class Touch(_PathModeOp):
    """Create an empty file inside the root if missing."""

    keyword = "touch"


@dataclass(frozen=True)
class WriteFile(Op):
    """Write ``content`` to ``path`` inside the root (never through a final symlink)."""

    keyword = "file"
    path: str
    mode: int
    content: str


@dataclass(frozen=True)
class Symlink(Op):
    """Create symlink ``path`` -> ``target`` inside the root."""

    keyword = "symlink"
    target: str
    path: str


@dataclass(frozen=True)
class Mount(Op):
    """Mount a filesystem on ``target`` inside the root; ``data``: fs options (None: none)."""

    keyword = "mount"
    fstype: str
    source: str
    target: str
    flags: tuple[str, ...]
    data: str | None


@dataclass(frozen=True)
class BindMount(Op):
    """Bind host path ``source`` onto ``target`` inside the root."""

    keyword = "bind"
    source: str
    target: str
    flags: tuple[str, ...]


class Mask(_PathOp):
    """Hide ``path`` (an empty read-only tmpfs, or /dev/null over a file)."""

    keyword = "mask"


class ReadOnly(_PathOp):
    """Make ``path`` read-only."""

    keyword = "readonly"


@dataclass(frozen=True)
class Remount(Op):
    """Remount the mount at ``path`` with ``flags``."""

    keyword = "remount"
    path: str
    flags: tuple[str, ...]


class Share(_PathOp):
    """Hand the directory at ``path`` (the mount on top of it) to the owner as a descriptor
    (``Container.shared_dir``): the host reaches what the container makes there through it,
    by no host path the container could write to."""

    keyword = "share"


@dataclass(frozen=True)
class Pivot(Op):
    """pivot_root into the root; the last mount-phase record."""

    keyword = "pivot"


# ---- main process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Env(Op):
    """One environment variable of the main process."""

    keyword = "env"
    name: str
    value: str

    def record(self) -> tuple[str, ...]:
        """One field: ``NAME=value``."""
        return (self.keyword, f"{self.name}={self.value}")


class Cwd(_PathOp):
    """The main process's working directory."""

    keyword = "cwd"


@dataclass(frozen=True)
class User(Op):
    """uid and gid of the main process (no supplementary groups)."""

    keyword = "user"
    uid: int
    gid: int


@dataclass(frozen=True)
class Umask(Op):
    """The main process's umask."""

    keyword = "umask"
    mode: int


@dataclass(frozen=True)
class Rlimit(Op):
    """One resource limit (``core``, ``nofile``, ...), soft and hard."""

    keyword = "rlimit"
    name: str
    soft: int
    hard: int


@dataclass(frozen=True)
class NoNewPrivs(Op):
    """PR_SET_NO_NEW_PRIVS (the executor sets it anyway)."""

    keyword = "nonewprivs"
    on: bool = True


@dataclass(frozen=True)
class Argv(Op):
    """One argv element of the main process, in order."""

    keyword = "argv"
    arg: str
