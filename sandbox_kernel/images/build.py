"""Build an image from a recipe into the image store, one layer per step.

Steps, in order (each present only when the recipe asks for it):

1. ``base``    - ``mmdebstrap`` a Debian suite into a fresh directory (device nodes removed,
   ``/proc /sys /dev /tmp`` kept as empty directories, host ``hostname``/``resolv.conf`` emptied);
   or ``from``: the layers of another image of the store (built from its recipe if missing).
2. ``pip``     - the host's pip installs pinned packages for the image's interpreter into an empty
   layer directory (see :mod:`.pip_target`).
3. ``files``   - files and directories from the recipe directory.
4. ``compile`` - the image's own interpreter byte-compiles, run over the merged layers with an
   overlay whose upper directory becomes the layer (see :func:`run_in_image`).
5. ``config``  - environment, labels and the kernel start command; image config only, no layer.

Each layer step has a cache key (parent layer digests, the step's normalised definition, the
content hash of the files it adds); with ``use_cache`` a step whose key is in the store's layer
cache is reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import BuildError, ImageNotFound, SandboxError
from ..paths import new_container_id, state_dir
from ..runtime import hostimage, userns
from ..runtime.container import Container
from ..runtime.spec import Bind, ContainerSpec
from . import lookup, oci, pip_target
from .labels import (
    LABEL_ARGV,
    LABEL_DISPLAY_NAME,
    LABEL_PY_ABI,
    LABEL_PY_EXECUTABLE,
    LABEL_PY_PLATFORMS,
    LABEL_PY_SITE_DIR,
    LABEL_PY_VERSION,
)
from .recipe import (
    DEFAULT_PATH,
    RECIPE_FILE,
    BaseSpec,
    PythonSpec,
    Recipe,
    find_recipe,
    hash_tree,
    load_recipe,
    step_cache_key,
)
from .store import Image, ImageConfig, ImageStore, Layer, private_dir

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

MIRROR_ENV = "SANDBOX_KERNEL_DEBIAN_MIRROR"
BASE_ENV = (("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8"), ("PYTHONDONTWRITEBYTECODE", "1"))
#: The run dir label of a build step's container: the layer it writes.
LABEL_BUILD = "org.sandbox-kernel.build"


# ---------------------------------------------------------------------------------------------
# Finding recipes


def resolve_target(target: str) -> Path:
    """The recipe file ``target`` names: a recipe directory, a recipe file, or a bare recipe
    name looked up with ``find_recipe``. Called by ``build_image`` and the CLI."""
    p = Path(target)
    if p.is_dir() and (p / RECIPE_FILE).is_file():
        return (p / RECIPE_FILE).resolve()
    if p.is_file():
        return p.resolve()
    if "/" in target or target.endswith(".toml"):
        raise BuildError(
            f"recipe {target}: no such recipe file or directory (a recipe directory "
            f"holds {RECIPE_FILE}); check the path"
        )
    return find_recipe(target)


# ---------------------------------------------------------------------------------------------
# Host facts


def _list_uris(text: str) -> list[str]:
    """The URIs of the ``deb`` lines of a one-line-style sources file (``*.list``)."""
    uris = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == "deb":
            rest = [p for p in parts[1:] if not p.startswith("[")]
            if rest:
                uris.append(rest[0])
    return uris


def _sources_uris(text: str) -> list[str]:
    """The URIs of the enabled ``deb`` stanzas of a deb822-style file (``*.sources``)."""
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        enabled = fields.get("enabled", "yes").lower() != "no"
        if "deb" in fields.get("types", "").split() and enabled:
            uris += fields.get("uris", "").split()
    return uris


def host_debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror of the host's apt configuration (first non-security ``deb`` source);
    ``$SANDBOX_KERNEL_DEBIAN_MIRROR`` overrides. Empty when none is found. Called by the base
    step when the recipe names no mirror."""
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        return env
    files = [apt_dir / "sources.list"]
    d = apt_dir / "sources.list.d"
    if d.is_dir():
        files += sorted(d.iterdir())
    uris: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if f.name.endswith(".list"):
            uris += _list_uris(text)
        elif f.name.endswith(".sources"):
            uris += _sources_uris(text)
    for uri in uris:
        if "security" not in uri and re.search(r"/debian/?$", uri):
            return uri
    return ""


def _ensure_mmdebstrap(recipe: Recipe) -> str:
    exe = shutil.which("mmdebstrap")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "mmdebstrap"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        exe = shutil.which("mmdebstrap")
        if exe:
            return exe
    raise BuildError(
        f"recipe {recipe.path}: step base: mmdebstrap is not installed; install it "
        "as root with `apt-get install mmdebstrap`"
    )


#: Run in the new root before it is packed: what the runtime provides stays empty.
_BASE_HOOKS = (
    'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
    ': > "$1/etc/resolv.conf"',
    ': > "$1/etc/hostname"',
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb',
)


def _mmdebstrap_command(exe: str, b: BaseSpec, out: Path, mirror: str) -> list[str]:
    """The mmdebstrap command line of a recipe's ``[base]``: a gzip tarball ``out`` with the
    image's real owners, made as root (``--mode=root``) or, by an ordinary user, in a user
    namespace over its subordinate range (``--mode=unshare``, newuidmap)."""
    cmd = [
        exe,
        f"--variant={b.variant}",
        "--mode=" + ("root" if os.geteuid() == 0 else "unshare"),
        "--format=tar",
        "--quiet",
        f"--components={','.join(b.components)}",
        *(f"--customize-hook={hook}" for hook in _BASE_HOOKS),
    ]
    if b.include:
        cmd.append("--include=" + ",".join(b.include))
    cmd += [f"--dpkgopt=path-exclude={glob}" for glob in b.exclude]
    cmd += [f"--dpkgopt=path-include={glob}" for glob in b.keep]
    return [*cmd, b.suite, str(out), mirror]


# ---------------------------------------------------------------------------------------------
# Running the image's own programs: in a container of the product's own runtime


def run_in_image(
    lowerdirs: Sequence[str],
    upper: Path,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    binds: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with the image's own programs over ``lowerdirs`` (snapshot dirs, top-most
    first) in a sandbox of the product's runtime (no capabilities, no network, the seccomp
    filter); everything it writes lands in ``upper`` (created; it must not exist yet, or be
    empty). As root it runs as the container's root, which is host root (recipes are the
    administrator's); rootless, in a user namespace as the caller, who owns the layers of
    its own store. ``binds``: read-only (host path, path inside) pairs. Returns the finished
    process (stdout and stderr merged into ``stdout``). Called by the compile step (and by
    tests that run an image's programs)."""
    with contextlib.suppress(FileNotFoundError, OSError):
        upper.rmdir()  # an empty placeholder; a non-empty one makes the rename below fail
    upper.parent.mkdir(parents=True, exist_ok=True)
    session = Path(tempfile.mkdtemp(prefix=".run-", dir=upper.parent))
    # made here, so that they are the caller's (rootless, the container's root is another
    # uid: the layer it wrote could not be moved away afterwards)
    (session / "upper").mkdir(mode=0o755)
    (session / "work").mkdir(mode=0o700)
    try:
        rootless = os.geteuid() != 0
        spec = ContainerSpec(
            id=new_container_id(),
            layers=tuple(lowerdirs),
            command=tuple(argv),
            env=tuple(env.items()),
            user=os.geteuid() if rootless else 0,
            group=os.getegid() if rootless else 0,
            allow_root=not rootless,
            hostname="build",
            mounts=tuple(Bind(host, inside) for host, inside in binds),
            upper_dir=str(session),
            labels=((LABEL_BUILD, str(upper)),),
        )
        if rootless:
            spec = userns.for_caller().apply(spec)
        with tempfile.TemporaryFile("w+") as out, Container.create(spec) as container:
            container.start(stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            try:
                result = container.wait(timeout)
            except subprocess.TimeoutExpired:
                container.kill()
                raise
            out.seek(0)
            text = out.read()
        os.rename(session / "upper", upper)
    finally:
        _remove_session(session)
    _clean_overlay_upper(upper)
    return subprocess.CompletedProcess(list(argv), result.status, text, None)


def _remove_session(session: Path) -> None:
    """Remove a build step's session dir. Rootless, what the namespace's root made there
    (overlayfs's ``work/work``, the shim layer) belongs to a subordinate id the caller cannot
    remove: that part goes in a short sandbox of the product's runtime, as container root
    over the session dir, then the rest as the caller."""
    # overlayfs leaves its work/work dir with mode 000: the caller's own ones opened first
    me = os.geteuid()
    for dirpath, dirnames, _ in os.walk(session):
        for name in dirnames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISDIR(st.st_mode) and st.st_uid == me:
                    os.chmod(os.path.join(dirpath, name), 0o700)
    shutil.rmtree(session, ignore_errors=True)
    if not session.exists() or os.geteuid() == 0:
        return
    ns = userns.for_caller()
    if not ns.has_root:
        log.warning("cannot remove %s: files of another id, and no subordinate range", session)
        return
    # container root has no capabilities: it gets in through open modes on the caller's
    # directories, and makes its own ones writable before removing them
    names = sorted(os.listdir(session))
    for d in (session, *(session / n for n in names)):
        with contextlib.suppress(OSError):
            if d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.geteuid():
                d.chmod(0o777)
    script = 'chmod -R u+rwx -- "$@" 2>/dev/null; exec rm -rf --one-file-system -- "$@"'
    spec = ContainerSpec(
        id=new_container_id(),
        layers=(str(hostimage.layer_dir()),),
        command=("/bin/sh", "-c", script, "sh", *(f"/session/{n}" for n in names)),
        mounts=(*hostimage.binds(), Bind(str(session), "/session", readonly=False)),
        user=0,
        group=0,
        allow_root=True,
        hostname="cleanup",
    )
    with Container.create(ns.apply(spec)) as container:
        container.start(
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        container.wait(60)
    shutil.rmtree(session, ignore_errors=True)
    if session.exists():
        log.warning("could not remove %s", session)


def _clean_overlay_upper(upper: Path) -> None:
    """Drop overlayfs bookkeeping xattrs (all but ``opaque``) so the dir is plain layer content."""
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            try:
                attrs = os.listxattr(name, follow_symlinks=False)
            except OSError:
                continue
            for a in attrs:
                if a.startswith(("trusted.overlay.", "user.overlay.")) and not a.endswith(
                    ".overlay.opaque"
                ):
                    with contextlib.suppress(OSError):
                        os.removexattr(name, a, follow_symlinks=False)


# ---------------------------------------------------------------------------------------------
# The build


@dataclass(frozen=True)
class _Step:
    kind: str
    what: str
    definition: dict[str, Any]
    content_hash: str = ""


def _tree_size(root: Path) -> tuple[int, int]:
    total = count = 0
    for dirpath, _d, filenames in os.walk(root):
        for fn in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, fn))
                total += st.st_size
                count += 1
    return total, count


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _python_from_labels(labels: Mapping[str, str]) -> PythonSpec | None:
    if LABEL_PY_EXECUTABLE not in labels or LABEL_PY_VERSION not in labels:
        return None
    return PythonSpec(
        executable=labels[LABEL_PY_EXECUTABLE],
        version=labels[LABEL_PY_VERSION],
        abi=labels.get(LABEL_PY_ABI, ""),
        platforms=tuple(p for p in labels.get(LABEL_PY_PLATFORMS, "").split(",") if p),
        site_dir=labels.get(LABEL_PY_SITE_DIR, ""),
    )


def _base_definition(recipe: Recipe) -> dict[str, Any]:
    assert recipe.base is not None
    b = recipe.base
    return {
        "step": "base",
        "suite": b.suite,
        "variant": b.variant,
        "include": sorted(b.include),
        "exclude": list(b.exclude),
        "keep": list(b.keep),
        "components": list(b.components),
    }


def _compile_dirs(recipe: Recipe, py: PythonSpec) -> tuple[str, ...]:
    if py.compile is not None:
        return py.compile
    dirs = [py.site_dir]
    if recipe.base is not None:
        dirs.insert(0, f"/usr/lib/python{py.version}")
    return tuple(dirs)


def plan_steps(recipe: Recipe, py: PythonSpec | None) -> list[_Step]:
    """The layer steps of ``recipe`` with their normalised definitions (for cache keys)."""
    steps: list[_Step] = []
    if recipe.base is not None:
        b = recipe.base
        what = f"{b.suite} {b.variant} +{len(b.include)} packages"
        steps.append(_Step("base", what, _base_definition(recipe)))
    if recipe.pip is not None:
        assert py is not None
        p = recipe.pip
        steps.append(
            _Step(
                "pip",
                f"{len(p.packages)} packages",
                {
                    "step": "pip",
                    "packages": sorted(p.packages),
                    "from_source": sorted(p.from_source),
                    "no_deps": p.no_deps,
                    "ignore_requires_python": p.ignore_requires_python,
                    "index_url": p.index_url,
                    "extra_index_urls": list(p.extra_index_urls),
                    "python": [py.version, py.abi, list(py.platforms), py.site_dir, py.executable],
                },
            )
        )
    if recipe.files:
        hashes = [hash_tree(recipe.directory / f.src) for f in recipe.files]
        content = step_cache_key((), {"files": hashes})
        steps.append(
            _Step(
                "files",
                f"{len(recipe.files)} entries",
                {"step": "files", "files": [[f.src, f.dst, f.mode] for f in recipe.files]},
                content,
            )
        )
    if py is not None and py.compile_enabled and steps:
        dirs = _compile_dirs(recipe, py)
        steps.append(
            _Step(
                "compile",
                f"python{py.version} {', '.join(dirs)}",
                {
                    "step": "compile",
                    "python": py.executable,
                    "version": py.version,
                    "dirs": list(dirs),
                },
            )
        )
    return steps


class _Builder:
    def __init__(
        self, store: ImageStore, use_cache: bool, progress: Progress | None, stack: tuple[str, ...]
    ) -> None:
        self.store = store
        self.use_cache = use_cache
        self.progress = progress
        self.stack = stack
        root = getattr(store, "root", None)
        self.tmp_root = (Path(root) if root is not None else state_dir()) / "build-tmp"

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    # -- parent -------------------------------------------------------------------------------
    def parent_image(self, recipe: Recipe) -> Image:
        """The image the recipe builds ``from``: in the build's store; rootless, copied
        from the system store; else built from its recipe first."""
        ref = recipe.from_image
        try:
            return self.store.resolve(ref)
        except ImageNotFound:
            pass
        if os.geteuid() != 0:
            copied = lookup.copy_to_own(ref, self.store)
            if copied is not None:
                self.say(f"from {ref}: copied from the system store into yours")
                return copied
        name = ref.split(":", 1)[0]
        if name in self.stack:
            raise BuildError(
                f"recipe {recipe.path}: from = {ref!r} makes a cycle "
                f"({' -> '.join([*self.stack, name])}); break it"
            ) from None
        try:
            path = find_recipe(name)
        except BuildError as exc:
            raise BuildError(
                f"recipe {recipe.path}: from = {ref!r}: no such image in the store "
                f"and no recipe to build it ({exc}); build or import {ref!r} "
                "first"
            ) from None
        self.say(f"from {ref}: not in the store, building it from {path}")
        return _Builder(self.store, self.use_cache, self.progress, (*self.stack, name)).build(
            load_recipe(path), None
        )

    # -- steps --------------------------------------------------------------------------------
    def run_base(self, recipe: Recipe, out: Path) -> None:
        """The base step: mmdebstrap the recipe's Debian suite into the tarball ``out``."""
        assert recipe.base is not None
        b = recipe.base
        mirror = b.mirror or host_debian_mirror()
        if not mirror:
            raise BuildError(
                f"recipe {recipe.path}: step base: no Debian mirror found in the "
                f"host's apt sources; set base.mirror in the recipe or "
                f"{MIRROR_ENV}=http://deb.debian.org/debian"
            )
        cmd = _mmdebstrap_command(_ensure_mmdebstrap(recipe), b, out, mirror)
        # its chroot (and, as root, its /proc, /sys and /dev mounts) inside the step's own
        # scratch dir, not in the host's /tmp
        env = {**os.environ, "TMPDIR": str(out.parent)}
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=env
        )
        if proc.returncode != 0:
            tail = "\n    ".join(proc.stdout.strip().splitlines()[-15:])
            raise BuildError(
                f"recipe {recipe.path}: step base: mmdebstrap {b.suite} from {mirror} failed "
                f"(exit {proc.returncode}):\n    {tail}\n  fix: check base.suite ({b.suite!r}) "
                f"is served by the mirror and base.include ({', '.join(b.include)}) names "
                f"packages of that suite; set base.mirror or {MIRROR_ENV} for another mirror"
            )

    def run_pip(self, recipe: Recipe, py: PythonSpec, lowers: Sequence[str], out: Path) -> str:
        assert recipe.pip is not None
        out.mkdir()
        res = pip_target.install(recipe.pip, py, out, lowers, recipe.path)
        notes = []
        if res.dropped_same_as_parent:
            notes.append(f"{len(res.dropped_same_as_parent)} already in parent")
        if res.replaced_in_parent:
            notes.append("replaced " + ", ".join(res.replaced_in_parent))
        if res.removed_host_files:
            notes.append(f"removed {len(res.removed_host_files)} byte-code or foreign .so files")
        return f"{len(res.installed)} installed" + ("; " + "; ".join(notes) if notes else "")

    def run_files(self, recipe: Recipe, out: Path) -> None:
        out.mkdir()
        for i, f in enumerate(recipe.files):
            src = recipe.directory / f.src
            dst = out / f.dst.lstrip("/")
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
                    for dirpath, _d, filenames in os.walk(dst):
                        os.chmod(dirpath, 0o755)
                        for fn in filenames:
                            fp = os.path.join(dirpath, fn)
                            if f.mode is not None and not os.path.islink(fp):
                                os.chmod(fp, f.mode)
                else:
                    shutil.copy2(src, dst, follow_symlinks=True)
                    os.chmod(
                        dst,
                        f.mode
                        if f.mode is not None
                        else (0o755 if os.access(src, os.X_OK) else 0o644),
                    )
            except OSError as exc:
                raise BuildError(
                    f"recipe {recipe.path}: step files[{i}]: copying {f.src} to "
                    f"{f.dst} failed: {exc}; check the source is readable"
                ) from exc
            for p in [dst, *dst.parents]:
                if p == out:
                    break
                if p != dst:
                    os.chmod(p, 0o755)

    def run_compile(self, recipe: Recipe, py: PythonSpec, lowers: Sequence[str], out: Path) -> str:
        dirs = [
            d
            for d in _compile_dirs(recipe, py)
            if any((Path(low) / d.lstrip("/")).is_dir() for low in lowers)
        ]
        out.mkdir()
        if not dirs:
            return "nothing to compile"
        argv = [py.executable, "-m", "compileall", "-q"]
        if py.major >= 3:
            argv += ["-j0"]
        argv += dirs
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
        try:
            proc = run_in_image(lowers, out, argv, env, timeout=1800)
        except (OSError, subprocess.SubprocessError, SandboxError) as exc:
            raise BuildError(
                f"recipe {recipe.path}: step compile: could not run "
                f"{py.executable} in the image: {exc}"
            ) from exc
        # py3 reports "*** Error compiling", py2 only the exception; one SyntaxError per file
        errors = max(proc.stdout.count("*** Error compiling"), proc.stdout.count("SyntaxError"))
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and errors == 0):
            tail = "\n    ".join(proc.stdout.strip().splitlines()[-15:])
            raise BuildError(
                f"recipe {recipe.path}: step compile: `{' '.join(argv)}` in the "
                f"image failed (exit {proc.returncode}):\n    {tail}\n  fix: check "
                f"python.executable ({py.executable!r}) exists in the image and "
                f"python.compile lists directories of the image"
            )
        files = sum(1 for _ in out.rglob("*.pyc"))
        note = f"{files} .pyc"
        if errors:
            note += f", {errors} files with syntax errors skipped"
        return note

    # -- whole build --------------------------------------------------------------------------
    def build(self, recipe: Recipe, tag: str | None) -> Image:
        """Build ``recipe`` (its parent first when missing) and write the image as ``tag``
        (default: the recipe's). Called by ``build_image`` and for a missing parent."""
        parent = self.parent_image(recipe) if recipe.from_image else None
        parent_cfg = parent.config if parent is not None else ImageConfig()
        py = _image_python(recipe, dict(parent_cfg.labels))
        steps = plan_steps(recipe, py)
        total = len(steps) + 1
        layers: list[Layer] = list(parent.layers) if parent is not None else []
        history = [f"from {parent.name}:{parent.tag}" for _ in layers] if parent else []
        private_dir(self.tmp_root)
        for n, step in enumerate(steps, 1):
            layer, line = self.layer_step(recipe, py, step, layers, f"[{n}/{total}]")
            layers.append(layer)
            history.append(line)
        if not layers:
            raise BuildError(
                f"recipe {recipe.path}: the image has no layers; add a [base] "
                'section or from = "<image>"'
            )
        return self.write_config(recipe, tag, py, parent, layers, history, total)

    def layer_step(
        self,
        recipe: Recipe,
        py: PythonSpec | None,
        step: _Step,
        layers: list[Layer],
        counter: str,
    ) -> tuple[Layer, str]:
        """One layer step over ``layers``: the cached layer for its key, or the step run into
        a scratch dir and stored. Returns the layer and its history line; says the progress
        line (``counter``: ``[n/total]``)."""
        t0 = time.monotonic()
        chain = tuple(layer.digest for layer in layers)
        key = step_cache_key(chain, step.definition, step.content_hash)
        cached = self.store.layer_cache_get(key) if self.use_cache else None
        if cached is not None:
            ensure = getattr(self.store, "ensure_snapshot", None)
            if ensure is not None:
                ensure(cached)
            self.say(
                f"{counter} {step.kind}: {step.what}, {_mb(cached.size)} packed, "
                f"{time.monotonic() - t0:.1f} s, cached"
            )
            return cached, f"{step.kind}: {step.what}"
        scratch = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-{step.kind}-", dir=self.tmp_root))
        # the base step makes a tarball (with the image's own owners), the others a directory
        out = scratch / ("layer.tar.gz" if step.kind == "base" else "layer")
        try:
            lowers = [layer.snapshot.as_posix() for layer in reversed(layers)]
            note = self.run_step(recipe, py, step, lowers, out)
            if step.kind == "base":
                layer = self.store.add_layer_blob(out, oci.MT_OCI_LAYER_GZIP)
                size, count = _tree_size(layer.snapshot)
            else:
                size, count = _tree_size(out)
                # every file these steps make is the image's root's, whoever made it
                layer = self.store.add_layer_from_dir(out, owner=(0, 0))
            self.store.layer_cache_put(key, layer)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        line = f"{step.kind}: {step.what}" + (f" ({note})" if note else "")
        self.say(
            f"{counter} {line}, {count} files, {_mb(size)} ({_mb(layer.size)} packed), "
            f"{time.monotonic() - t0:.1f} s"
        )
        return layer, line

    def run_step(
        self, recipe: Recipe, py: PythonSpec | None, step: _Step, lowers: list[str], out: Path
    ) -> str:
        """Run one step's work into ``out``; return a note for the progress line."""
        if step.kind == "base":
            self.run_base(recipe, out)
            return ""
        if step.kind == "files":
            self.run_files(recipe, out)
            return ""
        assert py is not None
        if step.kind == "pip":
            return self.run_pip(recipe, py, lowers, out)
        return self.run_compile(recipe, py, lowers, out)

    def write_config(
        self,
        recipe: Recipe,
        tag: str | None,
        py: PythonSpec | None,
        parent: Image | None,
        layers: list[Layer],
        history: list[str],
        total: int,
    ) -> Image:
        """The config step: environment, labels and command over the parent's; writes the
        image to the store."""
        t0 = time.monotonic()
        parent_cfg = parent.config if parent is not None else ImageConfig()
        env = dict(parent_cfg.env) if parent is not None else dict(BASE_ENV)
        env.update(recipe.env)
        labels = _image_labels(recipe, dict(parent_cfg.labels))
        kernel = (
            f", kernel {' '.join(json.loads(labels[LABEL_ARGV]))}" if LABEL_ARGV in labels else ""
        )
        history.append(f"config: {len(env)} env, {len(labels)} labels{kernel}")
        config = ImageConfig(
            env=tuple(sorted(env.items())),
            entrypoint=parent_cfg.entrypoint,
            cmd=parent_cfg.cmd or ((py.executable,) if py is not None else ()),
            working_dir=parent_cfg.working_dir or "/",
            user=parent_cfg.user,
            labels=tuple(sorted(labels.items())),
        )
        image = self.store.write_image(
            recipe.name, tag or recipe.tag, layers, config, history=history
        )
        kern = f", kernel {labels.get(LABEL_DISPLAY_NAME, '')!r}" if LABEL_ARGV in labels else ""
        self.say(
            f"[{total}/{total}] config: {len(env)} env, {len(labels)} labels{kern}, "
            f"{time.monotonic() - t0:.1f} s -> {image.name}:{image.tag} "
            f"{image.digest[:19]} {_mb(image.size)}"
        )
        return image


def _image_python(recipe: Recipe, parent_labels: Mapping[str, str]) -> PythonSpec | None:
    """The image's interpreter: the recipe's ``[python]``, else the parent's labels (whose
    compile list is the parent's own, so it is dropped)."""
    py = recipe.python or _python_from_labels(parent_labels)
    if recipe.python is None and py is not None and recipe.from_image:
        py = replace(py, compile=None, compile_enabled=True)
    if recipe.pip is not None and py is None:
        raise BuildError(
            f"recipe {recipe.path}: pip: the image {recipe.from_image!r} does not "
            "say which Python it has; add a [python] section (executable, "
            "version, site_dir)"
        )
    if recipe.pip is not None and py is not None and (not py.site_dir or not py.abi):
        raise BuildError(
            f"recipe {recipe.path}: python: site_dir and abi are needed to "
            "install pip packages; add them to the [python] section"
        )
    return py


def _image_labels(recipe: Recipe, parent_labels: dict[str, str]) -> dict[str, str]:
    """The image's labels: the parent's, then the recipe's python, kernel and own labels."""
    labels = dict(parent_labels)
    if recipe.python is not None:
        labels.update(recipe.python.labels())
    if recipe.kernel is not None:
        labels.update(recipe.kernel.labels())
    labels.update(recipe.labels)
    if recipe.description:
        labels["org.opencontainers.image.description"] = recipe.description
    labels["org.opencontainers.image.title"] = recipe.name
    return labels


def build_image(
    target: str,
    store: ImageStore,
    *,
    tag: str | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> Image:
    """Build the recipe ``target`` (a recipe directory, a recipe file or a bare recipe name, see
    :func:`find_recipe`) into ``store`` and return the image. ``progress`` gets one line per
    step: number, what, size and seconds ("cached" when the layer was reused)."""
    path = resolve_target(target)
    recipe = load_recipe(path)
    return _Builder(store, use_cache, progress, (recipe.name,)).build(recipe, tag)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - thin dev entry
    """``python -m sandbox_kernel.images.build RECIPE [--no-cache]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    use_cache = "--no-cache" not in args
    targets = [a for a in args if not a.startswith("--")]
    store = ImageStore()
    for t in targets:
        img = build_image(t, store, use_cache=use_cache, progress=print)
        print(
            json.dumps({"name": img.name, "tag": img.tag, "digest": img.digest, "size": img.size})
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
