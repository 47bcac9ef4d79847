"""``sandbox-kernel image``: ls / inspect / rm / gc / import / export / pull / push / build.

Layer: cli, on ``images``. Each ``cmd_*`` is one action's handler, called by ``cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..images import lookup
from ..images.store import Image, ImageStore, image_in_use
from ..units import parse_duration


def register(sub: Any) -> None:
    """Add the ``image`` verb and its actions (called by ``cli.build_parser``)."""
    p = sub.add_parser("image", help="manage kernel images (ls, inspect, rm, gc, import, ...)")
    isub = p.add_subparsers(dest="image_verb", metavar="IMAGE_VERB")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    q = isub.add_parser("ls", help="list images")
    q.set_defaults(func=cmd_ls)

    q = isub.add_parser("inspect", help="show an image as JSON")
    q.add_argument("ref", metavar="NAME[:TAG]|sha256:PREFIX")
    q.set_defaults(func=cmd_inspect)

    q = isub.add_parser("rm", help="remove an image (refused while a container uses it)")
    q.add_argument("refs", nargs="+", metavar="NAME[:TAG]|sha256:PREFIX")
    q.add_argument("--no-gc", action="store_true", help="keep the now unused blobs and snapshots")
    q.set_defaults(func=cmd_rm)

    q = isub.add_parser("gc", help="delete blobs and snapshots no image uses")
    q.add_argument(
        "--grace",
        type=lambda v: parse_duration(v, "--grace", allow_zero=True),
        default=300.0,
        metavar="SECONDS",
        help="keep unreferenced data younger than this (builds in progress); default 300",
    )
    q.set_defaults(func=cmd_gc)

    q = isub.add_parser(
        "import", help="import an OCI layout (dir or tar), a docker-save archive or a rootfs tar"
    )
    q.add_argument("path", type=Path)
    q.add_argument("--name", metavar="NAME[:TAG]", help="name for the imported image")
    q.set_defaults(func=cmd_import)

    q = isub.add_parser("export", help="export an image as an OCI layout (dir, or PATH.tar)")
    q.add_argument("ref", metavar="NAME[:TAG]")
    q.add_argument("path", type=Path)
    q.set_defaults(func=cmd_export)

    q = isub.add_parser("pull", help="pull an image from a registry (OCI distribution API)")
    q.add_argument("ref", metavar="REF", help="[REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST]")
    q.add_argument("--name", metavar="NAME[:TAG]", help="also store the image under this name")
    q.add_argument(
        "--platform", metavar="OS/ARCH", help="pick this platform of a manifest list or index"
    )
    _registry_options(q)
    q.set_defaults(func=cmd_pull)

    q = isub.add_parser("push", help="push an image of the store to a registry")
    q.add_argument("image", metavar="NAME[:TAG]")
    q.add_argument("ref", metavar="REF", help="[REGISTRY[:PORT]/]REPOSITORY:TAG")
    _registry_options(q)
    q.set_defaults(func=cmd_push)

    q = isub.add_parser("build", help="build an image from a recipe")
    q.add_argument("target", metavar="RECIPE_OR_NAME")
    q.add_argument("--tag", help="tag of the built image (default: latest)")
    q.add_argument("--no-cache", action="store_true", help="rebuild every step")
    q.add_argument("--quiet", "-q", action="store_true", help="print only the image digest")
    q.set_defaults(func=cmd_build)


def _registry_options(q: argparse.ArgumentParser) -> None:
    """The options ``image pull`` and ``image push`` share: TLS and credentials."""
    q.add_argument("--ca", type=Path, metavar="FILE", help="trust this CA (PEM) for the registry")
    q.add_argument(
        "--insecure",
        action="store_true",
        help="plain http (or https without verification with --ca) to a non-loopback registry",
    )
    q.add_argument("--username", "-u", metavar="USER", help="registry user (with --password-stdin)")
    q.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )


def _credentials(args: argparse.Namespace) -> Any:
    """The credentials of ``--username`` + ``--password-stdin``, or None (the auth files)."""
    from ..images.registry import Credentials, password_from_stdin

    if args.password_stdin and not args.username:
        raise ImageError("--password-stdin needs --username USER")
    if args.username is None:
        return None
    if not args.password_stdin:
        raise ImageError(
            f"--username {args.username} needs --password-stdin (a password is never taken "
            'on the command line): echo "$PASSWORD" | sandbox-kernel image ... '
            "--password-stdin"
        )
    return Credentials(args.username, password_from_stdin(sys.stdin), "--password-stdin")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_ls(args: argparse.Namespace) -> int:
    """``image ls``: one line per image (name, tag, short digest, size, created, and, for an
    ordinary user, which store holds it: theirs or the system's)."""
    rows = [("NAME", "TAG", "DIGEST", "SIZE", "CREATED", "STORE")]
    for place, im in lookup.list_all():
        short = im.digest.removeprefix("sha256:")[:12]
        store = "system" if place.store.readonly else "own"
        rows.append((im.name, im.tag, short, _human(im.size), im.created, store))
    if all(r[5] in ("own", "STORE") for r in rows) and os.geteuid() == 0:
        rows = [(*r[:5], "") for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def image_json(im: Image) -> dict[str, Any]:
    """An image as ``image inspect`` prints it: names, config, layers and lowerdirs. Called
    by ``cmd_inspect``."""
    c = im.config
    return {
        "name": im.name,
        "tag": im.tag,
        "digest": im.digest,
        "created": im.created,
        "size": im.size,
        "config": {
            "env": [f"{k}={v}" for k, v in c.env],
            "entrypoint": list(c.entrypoint),
            "cmd": list(c.cmd),
            "working_dir": c.working_dir,
            "user": c.user,
            "labels": dict(c.labels),
        },
        "layers": [
            {
                "digest": layer.digest,
                "diff_id": layer.diff_id,
                "size": layer.size,
                "media_type": layer.media_type,
                "snapshot": str(layer.snapshot),
            }
            for layer in im.layers
        ],
        "lowerdirs": list(im.lowerdirs()),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    """``image inspect REF``: the image as JSON, with its kernel command (or why it has
    none); nothing is unpacked."""
    im = lookup.find(args.ref, unpack=False)
    doc = image_json(im)
    try:
        argv = im.kernel_argv()
        doc["kernel_argv"] = list(argv) if argv is not None else None
    except ImageError as exc:
        doc["kernel_argv_error"] = str(exc)
    print(json.dumps(doc, indent=2))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """``image rm REF...``: untag each (refused while a container uses it), then gc unless
    ``--no-gc``."""
    store = ImageStore()
    for ref in args.refs:
        store.remove(ref, in_use=image_in_use)
        print(f"removed {ref}")
    if not args.no_gc:
        # Data younger than the grace period survives (it may belong to a build in progress);
        # `sandbox-kernel image gc --grace 0` frees it too.
        blobs, snaps = store.gc()
        print(f"freed {blobs} blob(s), {snaps} snapshot(s)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``image gc``: delete unreferenced blobs and snapshots older than ``--grace``, and the
    ``host`` image's layer versions and build leftovers no container uses."""
    from ..runtime.leftovers import collect_host_layers

    blobs, snaps = ImageStore().gc(grace_seconds=args.grace)
    layers = collect_host_layers()
    print(f"removed {blobs} blob(s), {snaps} snapshot(s), {len(layers)} host image layer(s)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """``image import PATH``: import an OCI layout, docker-save archive or rootfs tar."""
    from ..images.importer import import_path

    for im in import_path(ImageStore(), args.path, args.name):
        print(f"imported {im.ref} {im.digest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``image export REF PATH``: write the image as an OCI layout (dir, or PATH.tar)."""
    from ..images.exporter import export_images

    for im in export_images(ImageStore(), [args.ref], args.path):
        print(f"exported {im.ref} {im.digest} to {args.path}")
    return 0


def _progress() -> Any:
    """A pull's progress: one updating line (bytes, rate, ETA) on a terminal, a line per
    fetched layer otherwise. Made by ``cmd_pull``."""
    import threading
    import time

    from ..images.registry import Progress

    tty = sys.stderr.isatty()

    class Shown(Progress):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.total = self.done = 0
            self.t0 = time.monotonic()
            self.last = 0.0

        def start(self, total: int, layers: int, present: int) -> None:
            self.total, self.t0 = total, time.monotonic()
            msg = f"fetching {layers} layer(s), {_human(total)}"
            print(msg + (f"; {present} already present" if present else ""), file=sys.stderr)

        def advance(self, n: int) -> None:
            with self.lock:
                self.done += n
                now = time.monotonic()
                if not tty or now - self.last < 0.2:
                    return
                self.last = now
                rate = self.done / max(now - self.t0, 1e-3)
                eta = (self.total - self.done) / rate if rate else 0.0
                print(
                    f"\r{_human(self.done)} / {_human(self.total)}  {_human(rate)}/s  "
                    f"ETA {eta:.0f} s   ",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )

        def layer_done(self, digest: str, size: int) -> None:
            if not tty:
                print(f"layer {digest[:19]} {_human(size)} verified", file=sys.stderr)

        def finish(self) -> None:
            if tty and self.total:
                print(file=sys.stderr)

    return Shown()


def cmd_pull(args: argparse.Namespace) -> int:
    """``image pull REF``: fetch the image from its registry into the store, under its full
    reference (and ``--name``)."""
    from ..images.registry import pull

    creds = _credentials(args)
    im = pull(
        ImageStore(),
        args.ref,
        name=args.name,
        platform=args.platform,
        creds=creds,
        ca=args.ca,
        insecure=args.insecure,
        progress=_progress(),
    )
    print(f"pulled {im.ref} {im.digest}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``image push NAME REF``: send the image to a registry (blobs it lacks, then the
    manifest)."""
    from ..images.registry import push

    creds = _credentials(args)
    im = lookup.find(args.image, unpack=False)
    place = next(p for p in lookup.places() if p.store.exists() and _holds(p.store, im))
    digest = push(
        im,
        place.store,
        args.ref,
        creds=creds,
        ca=args.ca,
        insecure=args.insecure,
        say=lambda m: print(m, file=sys.stderr),
    )
    print(f"pushed {im.ref} to {args.ref} {digest}")
    return 0


def _holds(store: ImageStore, im: Image) -> bool:
    return store.has_blob(im.digest)


def cmd_build(args: argparse.Namespace) -> int:
    """``image build RECIPE_OR_NAME``: build from a recipe, printing progress (or only the
    digest with ``--quiet``)."""
    try:
        from ..images.build import build_image
    except ImportError as exc:
        print(
            f"sandbox-kernel: error: image builds are not available in this installation ({exc})",
            file=sys.stderr,
        )
        return 125

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    im = build_image(
        args.target,
        ImageStore(),
        tag=args.tag,
        use_cache=not args.no_cache,
        progress=progress,
    )
    print(im.digest if args.quiet else f"built {im.ref} {im.digest}")
    return 0
