"""``sandbox-kernel run``: run one command in a container, like ``docker run --rm``.

Layer: cli, on the runtime (``Container``) and the image store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..limits import BANDWIDTH, CPUS, MEMORY, PIDS, TMP_SIZE, WRITABLE_SIZE

if TYPE_CHECKING:
    from ..network.config import NatConfig
from ..network import DEFAULT_SUBNET
from ..paths import new_container_id
from ..runtime.container import Container, require_privileges
from ..runtime.spec import Bind, ContainerSpec, Limits, NetworkMode
from ..runtime.userns import for_caller
from ..units import parse_whole

log = logging.getLogger(__name__)

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def register(sub: Any) -> None:
    """Add the ``run`` verb and its options (called by ``cli.build_parser``)."""
    p = sub.add_parser(
        "run",
        help="run a command in a new container",
        description="Run CMD in a new container from IMAGE (an image of the store, or 'host' "
        "for the "
        "host's /usr and /etc read-only). Streams pass through; the exit status propagates; "
        "when the memory cap kills the command, one line says so and the status is 137.",
    )
    p.add_argument("--memory", "-m", help="memory cap, e.g. 512M, 1G (swap off)")
    p.add_argument("--cpus", help="CPU cap in CPUs, e.g. 0.5, 2")
    p.add_argument("--pids", help="maximum number of processes and threads, e.g. 256")
    p.add_argument(
        "--tmp-size", default="256M", help="size of /tmp (tmpfs, counts as memory); default 256M"
    )
    p.add_argument(
        "--writable-size",
        default="256M",
        help="size of the writable layer over the image; default 256M",
    )
    p.add_argument(
        "--volume",
        "-v",
        action="append",
        default=[],
        metavar="SRC:DST[:ro|rw]",
        help="bind-mount a host path (read-only unless :rw)",
    )
    p.add_argument(
        "--workdir",
        "-w",
        help="working directory inside the container (default: the image's, or /)",
    )
    p.add_argument(
        "--user",
        "-u",
        help="UID[:GID] to run as inside (default: 65534:65534 as root, your own ids "
        "otherwise; 0 needs --allow-root)",
    )
    p.add_argument(
        "--allow-root", action="store_true", help="allow running as root inside the container"
    )
    p.add_argument(
        "--env",
        "-e",
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable",
    )
    p.add_argument("--hostname", default="sandbox", help="hostname inside (default: sandbox)")
    p.add_argument(
        "--network",
        choices=("none", "nat"),
        default="none",
        help="none (default): only loopback; nat: a link out of the host through its "
        "routes, masqueraded, to what --allow lists only (without root: a user-mode stack, "
        "slirp4netns; docs/network-rootless.md)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR|HOST[:PORT]",
        help="with --network nat: a network or host name (and port) the command may "
        "connect to; repeat for more (0.0.0.0/0: anywhere but the host and other "
        "containers)",
    )
    p.add_argument(
        "--bandwidth",
        metavar="RATE",
        help="with --network nat: cap each direction, in bits per second as tc writes "
        "them (16mbit, 512kbit, 1gbit)",
    )
    p.add_argument(
        "--subnet",
        metavar="CIDR",
        help=f"with --network nat: the network container addresses come from "
        f"(default {DEFAULT_SUBNET})",
    )
    p.add_argument(
        "--dns",
        action="append",
        metavar="ADDRESS",
        help="with --network nat: a resolver for the container (default: the host's "
        "non-loopback resolvers); repeat for more",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run_command)


def _parse_user(text: str) -> tuple[int, int]:
    forms = "a numeric UID or UID:GID, e.g. 1000:1000"
    uid_s, _, gid_s = text.partition(":")
    uid = parse_whole(uid_s, "--user", forms)
    return uid, parse_whole(gid_s, "--user", forms) if gid_s else uid


def build_spec(args: argparse.Namespace) -> ContainerSpec:
    """The ContainerSpec of ``run``'s arguments: the image (or the ``host`` pseudo-image), its
    env, workdir and default command, the options parsed with the caps' bounds (SpecError
    naming the option). Called by ``run_command``."""
    from ..runtime import hostimage

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    env: dict[str, str] = {}
    userns = for_caller()
    if userns.notice:
        print(userns.notice, file=sys.stderr)
    root_mode = userns.mode == "root"
    # volumes keep their files' owners (idmapped in root mode)
    mounts: list[Bind] = [replace(Bind.parse(v, "--volume"), idmap=True) for v in args.volume]
    workdir = "/"
    # rootless: the caller's own ids, the ones mapped to themselves
    user, group = (65534, 65534) if root_mode else (os.geteuid(), os.getegid())
    image_name = args.image
    if args.image == hostimage.NAME:
        layers: tuple[str, ...] = (str(hostimage.layer_dir()),)
        mounts = [*hostimage.binds(), *mounts]
    else:
        from ..images import lookup

        image = lookup.find(args.image)
        layers = image.lowerdirs()
        env.update(dict(image.config.env))
        workdir = image.config.working_dir or "/"
        image_name = f"{image.name}:{image.tag}"
        if not command:
            command = [*image.config.entrypoint, *image.config.cmd]
    if not command:
        raise SpecError(
            f"no command given and image {args.image!r} has none; "
            "use: sandbox-kernel run IMAGE -- CMD"
        )
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--env {item!r} is invalid; use K=V")
        env[key] = value
    if args.user:
        user, group = _parse_user(args.user)
    if args.workdir:
        workdir = args.workdir
    limits = Limits(
        memory=MEMORY.parse(args.memory, "--memory") if args.memory else None,
        cpus=CPUS.parse(args.cpus, "--cpus") if args.cpus else None,
        pids=PIDS.parse(args.pids, "--pids") if args.pids else None,
    )
    nat = _nat_config(args)
    # the user namespace
    return userns.apply(
        ContainerSpec(
            id=new_container_id(),
            layers=layers,
            command=tuple(command),
            env=tuple(env.items()),
            workdir=workdir,
            user=user,
            group=group,
            allow_root=args.allow_root,
            hostname=args.hostname,
            writable_size=WRITABLE_SIZE.parse(args.writable_size, "--writable-size"),
            tmp_size=TMP_SIZE.parse(args.tmp_size, "--tmp-size"),
            mounts=tuple(mounts),
            limits=limits,
            network=NetworkMode.NAT if nat is not None else NetworkMode.NONE,
            nat=nat,
            image=image_name,
        )
    )


def _nat_config(args: argparse.Namespace) -> NatConfig | None:
    """The ``--network nat`` settings of ``run``'s options (SpecError naming the option);
    None for ``none``, which takes none of them."""
    if args.network != "nat":
        given = [
            o
            for o, v in (
                ("--allow", args.allow),
                ("--bandwidth", args.bandwidth),
                ("--subnet", args.subnet),
                ("--dns", args.dns),
            )
            if v
        ]
        if given:
            raise SpecError(f"{', '.join(given)}: only with --network nat")
        return None
    from ..network.config import NatConfig, parse_allow_list, parse_subnet

    return NatConfig(
        allow=parse_allow_list(args.allow, "--allow"),
        bandwidth=BANDWIDTH.parse(args.bandwidth, "--bandwidth") if args.bandwidth else None,
        subnet=parse_subnet(args.subnet, "--subnet") if args.subnet else DEFAULT_SUBNET,
        dns=tuple(args.dns) if args.dns else None,
    )


def run_command(args: argparse.Namespace) -> int:
    """``sandbox-kernel run IMAGE -- CMD``: create, start with this terminal's streams,
    forward signals, wait, destroy; returns the command's status (137 after an OOM kill).
    Called by ``cli.main``."""
    require_privileges()
    spec = build_spec(args)
    container = Container.create(spec)
    try:
        previous = {
            s: signal.signal(s, lambda signum, _f: container.signal(signum)) for s in FORWARDED
        }
        try:
            container.start(stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
            log.debug("container %s start: %s", container.id, container.phases.text())
            result = container.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if result.oom_killed or result.pids_limit_hit:
            print(f"sandbox-kernel: {result.reason()}", file=sys.stderr)
        if result.oom_killed:
            return 137
        return result.status
    finally:
        container.destroy()
