"""What a kernel start needs from the image store and the runtime, as plain steps.

Layer: Jupyter (no traitlets or jupyter_client here: the provisioner calls these functions
from ``pre_launch``, in this order, and owns the contract's state):

1. ``find_image``: the image a kernelspec names, with its kernel command, or an error
   that says how to get it;
2. ``connection_paths``: where the kernel's sockets, connection file and control socket go
   (a small tmpfs of the container's own, which the server reaches by a descriptor), and
   where the output relay's sockets for Jupyter go (a folder of the run dir the kernel never
   sees);
3. ``kernel_command`` and ``kernel_env``: the in-container command and environment;
4. ``kernel_userns``: whose ids the container's are on the host, and whether the notebook
   folder can be idmapped;
5. ``kernel_spec``: the ``ContainerSpec`` of the kernel's container.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, SandboxError, SpecError
from ..images.labels import LABEL_ARGV, LABEL_KERNELSPEC
from ..paths import PACKAGE_DIR
from ..runtime import userns as userns_mod
from ..runtime.spec import Bind, ContainerSpec, Tmpfs, env_key_problem
from ..runtime.userns import SubRange, UserNamespace
from .resolve import KernelSettings

#: The kernel's connection folder inside the container: a small tmpfs of the container's
#: own (``IPC_TMPFS_SIZE``, inode-capped, no symlink followed), holding the connection file
#: the plan writes and the kernel's sockets. The server reaches it through the descriptor
#: ``Container.shared_dir`` hands over, never through a host folder: the kernel has no
#: writable host folder but the notebook's, and no host path shows inside.
CONN_TARGET = "/run/sandbox"
#: Bytes of that tmpfs: sockets hold no data, the connection file a few hundred bytes.
IPC_TMPFS_SIZE = 64 * 1024
#: The client's side of the output relay (relay.py), in the run dir: the server's own, never
#: mounted. Jupyter's connection file (the relay's socket paths) is there too.
RELAY_SUBDIR = "relay"
#: sun_path is 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107
#: The control socket of the %sandbox magics, in the connection folder (see control.py).
CONTROL_SOCKET = "control"
CONTROL_ENV = "SANDBOX_KERNEL_CONTROL"
#: The in-kernel extension, mounted read-only into every ipykernel-based sandbox kernel.
MAGICS_SOURCE = PACKAGE_DIR / "magics"
MAGICS_TARGET = "/opt/sandbox-kernel/magics"
MAGICS_MODULE = "sandbox_magics"
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_IPYKERNEL_MODULES = ("ipykernel_launcher", "ipykernel")
EXAMPLE_ARGV = '["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]'


@dataclass(frozen=True)
class KernelImage:
    """What a kernel start needs of an image of the store (made by ``find_image``)."""

    ref: str  # name:tag
    layers: tuple[str, ...]  # snapshot dirs, top-most first
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]  # the image's kernel command (label), empty if it has none
    digest: str  # manifest digest
    #: Where the product's ipykernel layer (top-most of ``layers``) has its packages, "" when
    #: the image's own ipykernel is used.
    ipykernel_path: str = ""


def find_image(name: str, context: str, ipykernel_layer: str = "") -> KernelImage:
    """The image ``name`` of the store (blocking: called in a thread), with the product's
    ipykernel layer ``ipykernel_layer`` (``images.ipykernel_layer``) on top when given.
    SpecError carrying the store's advice when either is missing or the kernel command label
    is malformed."""
    from ..images import ipykernel_layer as ipk
    from ..images import lookup

    try:
        image = lookup.find(name)
        argv = image.kernel_argv() or ()
        extra = ipk.find(ipykernel_layer).lowerdirs() if ipykernel_layer else ()
    except ImageError as exc:  # the store's message says how to build or fix it
        raise SpecError(str(exc), context=context) from None
    return KernelImage(
        ref=image.ref,
        layers=(*extra, *image.lowerdirs()),
        env=image.config.env,
        argv=argv,
        digest=image.digest,
        ipykernel_path=ipk.TARGET if ipykernel_layer else "",
    )


@dataclass(frozen=True)
class ConnectionPaths:
    """Where one kernel's connection lives, inside (``CONN_TARGET``) and as the server
    reaches it; made by ``connection_paths``, the same for every start of a kernel."""

    conn_dir: str  # inside: the connection folder (a shared tmpfs)
    ip: str  # inside: the ipc transport's socket prefix (``<conn>/k``: k-1, k-2, ...)
    connection_file: str  # inside: the file the plan writes and the kernel reads
    control: str  # inside: the control socket of the %sandbox magics (the server binds it)
    relay_dir: Path  # host: where Jupyter connects, the relay's sockets (relay.py)
    client_ip: str  # host: their prefix (``<relay>/k``, the kernel's port numbers)
    client_connection_file: str  # host: the one Jupyter reads (``jupyter console --existing``)

    @staticmethod
    def host_path(conn_fd: int, name: str) -> str:
        """``name`` in the connection folder as the server process reaches it: through its
        descriptor ``conn_fd`` of that folder (``Container.shared_dir``)."""
        return f"/proc/self/fd/{conn_fd}/{name}"


def connection_paths(root: Path, container_id: str, context: str = "") -> ConnectionPaths:
    """The connection paths of container ``container_id`` under run root ``root``; a
    SandboxError naming the fix when the relay's socket paths would not fit a unix socket
    address."""
    relay_dir = root / container_id / RELAY_SUBDIR
    longest = f"{relay_dir}/k-99999"
    if len(longest.encode()) >= MAX_SOCKET_PATH:
        raise SandboxError(
            f"{context or container_id}: the run directory {root} is too long for unix "
            f"socket paths ({longest!r} must stay under {MAX_SOCKET_PATH} bytes); "
            "set SANDBOX_KERNEL_RUN_DIR to a short path such as /run/sk"
        )
    return ConnectionPaths(
        conn_dir=CONN_TARGET,
        ip=f"{CONN_TARGET}/k",
        connection_file=f"{CONN_TARGET}/kernel.json",
        control=f"{CONN_TARGET}/{CONTROL_SOCKET}",
        relay_dir=relay_dir,
        client_ip=f"{relay_dir}/k",
        client_connection_file=f"{relay_dir}/kernel.json",
    )


def kernel_command(
    spec_argv: Sequence[str],
    image: KernelImage,
    connection_file: str,
    extra: Sequence[str],
    *,
    magics: bool,
    context: str,
) -> tuple[list[str], bool]:
    """The in-container kernel command and whether the %sandbox magics are loaded into it
    (only into ipykernel-based kernels, and only when ``magics`` is on).

    The kernelspec's argv wins over the image's label. ``{connection_file}`` is substituted
    here, not by ``km.format_kernel_cmd``: that one rewrites "python3" into the *host's*
    interpreter path, which means nothing inside the container.
    """
    argv = list(spec_argv) or list(image.argv)
    if not argv:
        raise SpecError(
            f"argv is empty in the kernelspec and the image has no {LABEL_ARGV} label; "
            f"give the in-container command, e.g. {EXAMPLE_ARGV}",
            context=context,
        )
    values = {"connection_file": connection_file}

    def sub(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    argv = [_PLACEHOLDER.sub(sub, str(a)) for a in argv] + [str(a) for a in extra]
    with_magics = magics and any(
        a in _IPYKERNEL_MODULES or a.endswith("/ipykernel_launcher.py") for a in argv
    )
    if with_magics:
        argv.append(f"--ext={MAGICS_MODULE}")
    return argv, with_magics


def kernel_env(
    image: KernelImage,
    spec_env: Mapping[str, object],
    settings: KernelSettings,
    paths: ConnectionPaths,
    *,
    magics: bool,
    context: str,
) -> dict[str, str]:
    """The kernel's environment, lowest priority first: the image's, the kernelspec's, the
    settings' ``env``, then what the product sets. The server's own environment never enters.
    """
    env: dict[str, str] = {"PYTHONDONTWRITEBYTECODE": "1"}
    env.update(image.env)
    env.update({str(k): str(v) for k, v in spec_env.items()})
    env.update(dict(settings.env))
    env["JPY_SANDBOX_KERNEL"] = "1"
    # The kernel's parent inside the container is its init (pid 1): ipykernel then neither
    # polls a parent (the host's pid means nothing here) nor prints its `ipython kernel` note.
    env["JPY_PARENT_PID"] = "1"
    env[CONTROL_ENV] = paths.control
    if magics or image.ipykernel_path:
        front = (MAGICS_TARGET if magics else "", image.ipykernel_path)
        env["PYTHONPATH"] = ":".join(p for p in (*front, env.get("PYTHONPATH")) if p)
    problems = [p for p in (env_key_problem(k, "kernelspec env") for k in env) if p]
    if problems:
        raise SpecError(problems, context=context)
    return env


def kernel_userns(workdir: str, uid: int, gid: int) -> tuple[UserNamespace, bool, str]:
    """The kernel's user namespace, whether its notebook folder is idmapped, and a note for
    the server log when it is not. Rootless: the caller's namespace (its files are its own
    already). Root mode: the product's range with the folder idmapped, or, on a filesystem
    that cannot be idmapped (NFS, CIFS, 9p, tmpfs before Linux 6.3), the range with the
    kernel's own ``uid``/``gid`` kept as the host's where they are the folder's owner and
    group and a regular account's (``userns.root_mode_keeping``), so that the owner still
    owns what the kernel writes there. Blocking (a probe of the folder's
    filesystem, once per filesystem): the provisioner calls it in a thread at each start."""
    ns = userns_mod.for_caller()
    if ns.mode != "root" or userns_mod.idmap_supported(workdir):
        return ns, True, ""
    whole = ns.uid_map[0]
    # kept only as the folder's own owner and group (0: not kept)
    try:
        st = os.stat(workdir)
        owner, group = st.st_uid, st.st_gid
    except OSError:
        owner = group = -1
    kept = userns_mod.root_mode_keeping(
        SubRange(whole.outside, whole.count),
        uid if uid == owner else 0,
        gid if gid == group else 0,
    )
    if kept.host_uid(uid) == uid:
        note = (
            f"the notebook folder {workdir} is on a filesystem without idmapped mounts: the "
            f"kernel runs as host uid {uid} there (the folder's owner), not as an id of the "
            "sandbox's range"
        )
    else:
        note = (
            f"the notebook folder {workdir} is on a filesystem without idmapped mounts and the "
            f"kernel's uid {uid} is not kept: files it writes there belong to host uid "
            f"{kept.host_uid(uid)}"
        )
    return kept, False, note


@dataclass(frozen=True)
class KernelStart:
    """What one kernel start is made of, once the settings are valid and the image found;
    the provisioner builds one per start and hands it to ``kernel_spec``."""

    container_id: str
    kernelspec: str  # its name, kept in the container's labels
    settings: KernelSettings
    image: KernelImage
    workdir: str  # the notebook's folder, mounted at the same path
    paths: ConnectionPaths
    userns: UserNamespace  # whose ids the container's are on the host
    workdir_idmap: bool = True  # root mode: the notebook folder idmapped (kernel_userns)

    def host_ids(self) -> tuple[int, int]:
        """The host uid and gid of the kernel's user: the owner of what the host makes for
        the kernel (its control socket)."""
        uid = self.userns.host_uid(self.settings.uid)
        gid = self.userns.host_gid(self.settings.gid)
        if uid is None or gid is None:
            raise SpecError(
                f"user={self.settings.uid}:{self.settings.gid} is outside the sandbox's id "
                f"range (container ids 0..{sum(m.count for m in self.userns.uid_map) - 1}); "
                "run the kernel as a uid below 65536",
                context=f"kernelspec {self.kernelspec!r}",
            )
        return uid, gid


def kernel_spec(
    start: KernelStart,
    argv: Sequence[str],
    env: Mapping[str, str],
    connection: str,
    *,
    magics: bool,
) -> ContainerSpec:
    """The kernel's container: the notebook folder at the same path (and the working
    directory; read-write unless ``notebook_folder='ro'``), the connection folder (a small
    shared tmpfs, ``CONN_TARGET``) holding the ``connection`` file (JSON), the
    admin-approved extra mounts, and the magics read-only. The provisioner passes it to
    ``Container.create``."""
    settings, image, workdir, paths = start.settings, start.image, start.workdir, start.paths
    container_id = start.container_id
    mounts: list[Bind | Tmpfs] = [
        Bind(
            source=workdir,
            target=workdir,
            readonly=settings.notebook_readonly,
            idmap=start.workdir_idmap,
        ),
        Tmpfs(target=paths.conn_dir, size=IPC_TMPFS_SIZE, mode=0o700, shared=True),
        *settings.mounts,
    ]
    if magics:
        mounts.append(Bind(source=str(MAGICS_SOURCE), target=MAGICS_TARGET, readonly=True))
    # the user namespace: in root mode the notebook folder is idmapped (where its filesystem
    # can be), so that the kernel's files keep the folder owner's uid
    return start.userns.apply(
        ContainerSpec(
            id=container_id,
            layers=image.layers,
            command=tuple(argv),
            env=tuple(env.items()),
            workdir=workdir,
            user=settings.uid,
            group=settings.gid,
            allow_root=settings.uid == 0,
            hostname=container_id,
            writable_size=settings.writable_size,
            tmp_size=settings.tmp_size,
            bytes_per_inode=settings.bytes_per_inode,
            mounts=tuple(mounts),
            # 0644 in a folder only the kernel's user may enter; the kernel may replace it
            files=((start.paths.connection_file, 0o644, connection),),
            limits=settings.limits,
            network=settings.network,
            nat=settings.nat,
            image=image.ref,
            image_digest=image.digest,
            labels=((LABEL_KERNELSPEC, start.kernelspec),),
            enforce_limits=not settings.unenforced_ok,
        )
    )
