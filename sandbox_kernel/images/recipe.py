"""Image recipes: a small TOML format a teacher can write in five minutes.

A recipe is a file ``recipe.toml`` in a directory of its own (files it adds are found relative
to that directory). Either it bootstraps a Debian root file system::

    [base]
    suite = "bookworm"
    include = ["python3"]

or it builds on another image of the store, by name::

    from = "python3"

and then optionally adds pinned pip packages (``[pip]``), files (``[[files]]``), environment
(``[env]``), labels (``[labels]``) and says how to start the kernel (``[kernel]``).
``[python]`` describes the image's interpreter; images built from another image inherit it.
See ``images/README.md`` for a commented example.

Every recipe is validated fully before anything is built: unknown keys are errors that name the
key and list the valid ones; every error names the recipe file, the field, the value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import BuildError
from ..paths import shipped_dirs
from ..runtime.spec import env_key_problem, is_clean_abs
from .labels import (
    LABEL_ARGV,
    LABEL_DISPLAY_NAME,
    LABEL_INTERRUPT_MODE,
    LABEL_LANGUAGE,
    LABEL_PY_ABI,
    LABEL_PY_EXECUTABLE,
    LABEL_PY_PLATFORMS,
    LABEL_PY_SITE_DIR,
    LABEL_PY_VERSION,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

RECIPE_FILE = "recipe.toml"

VARIANTS = (
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
)
INTERRUPT_MODES = ("signal", "message")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_TOP_KEYS = (
    "name",
    "tag",
    "description",
    "from",
    "base",
    "python",
    "pip",
    "files",
    "env",
    "labels",
    "kernel",
)
_BASE_KEYS = ("suite", "variant", "include", "exclude", "keep", "components", "mirror")
_PYTHON_KEYS = ("executable", "version", "abi", "platforms", "site_dir", "compile")
_PIP_KEYS = (
    "packages",
    "from_source",
    "no_deps",
    "ignore_requires_python",
    "index_url",
    "extra_index_urls",
)
_FILE_KEYS = ("src", "dst", "mode")
_KERNEL_KEYS = ("argv", "language", "display_name", "interrupt_mode")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_DEB_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,-]+\])?==([A-Za-z0-9.+!_-]+)$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^([23])\.([0-9]{1,2})$")
_ABI_RE = re.compile(r"^cp[0-9]{2,3}[dmu]*$")
_URL_RE = re.compile(r"^(https?|file)://\S+$")
_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$")


def canonical_project(name: str) -> str:
    """PEP 503 normalised project name. Used when pins are checked here and by
    ``pip_target`` to match installed distributions to the pins."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class BaseSpec:
    """The ``[base]`` section: the Debian suite the builder bootstraps with mmdebstrap (its
    variant, the packages to include, dpkg path globs to exclude or keep, components and
    mirror). The builder's base step is made from it."""

    suite: str
    variant: str = "essential"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    components: tuple[str, ...] = ("main",)
    mirror: str = ""


@dataclass(frozen=True)
class PythonSpec:
    """The image's interpreter (``[python]``, or the parent image's python labels): where it
    is, its version, ABI and wheel platforms, and its site directory. The builder's pip and
    compile steps and ``pip_target`` use it to install wheels for that interpreter."""

    executable: str
    version: str
    abi: str
    platforms: tuple[str, ...]
    site_dir: str
    #: directories to byte-compile inside the image; None = the default (site_dir, plus the
    #: standard library when the recipe bootstraps its own base).
    compile: tuple[str, ...] | None = None
    compile_enabled: bool = True

    @property
    def major(self) -> int:
        """The major version (2 or 3); the compile step and ``pip_target`` branch on it."""
        return int(self.version.split(".")[0])

    def labels(self) -> dict[str, str]:
        """The python labels written into the image config by the builder, so that images
        built ``from`` this one inherit the interpreter description."""
        return {
            LABEL_PY_EXECUTABLE: self.executable,
            LABEL_PY_VERSION: self.version,
            LABEL_PY_ABI: self.abi,
            LABEL_PY_PLATFORMS: ",".join(self.platforms),
            LABEL_PY_SITE_DIR: self.site_dir,
        }


@dataclass(frozen=True)
class PipSpec:
    """The ``[pip]`` section: pinned packages, those to build from source, and the indexes.
    The builder's pip step hands it to ``pip_target.install``."""

    packages: tuple[str, ...]
    from_source: tuple[str, ...] = ()
    no_deps: bool = False
    ignore_requires_python: bool = False
    index_url: str = ""
    extra_index_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileSpec:
    """One ``[[files]]`` entry: ``src`` (relative to the recipe directory) copied to ``dst``
    inside the image, with ``mode`` if given. The builder's files step copies it."""

    src: str
    dst: str
    mode: int | None = None


@dataclass(frozen=True)
class KernelSpec:
    """The ``[kernel]`` section: how the provisioner starts the kernel in this image. The
    builder stores it as labels (``labels``)."""

    argv: tuple[str, ...]
    language: str = "python"
    display_name: str = ""
    interrupt_mode: str = "signal"

    def labels(self) -> dict[str, str]:
        """The kernel labels the builder writes into the image config; fields left empty are
        inherited from the parent image."""
        out = {
            LABEL_ARGV: json.dumps(list(self.argv)) if self.argv else "",
            LABEL_LANGUAGE: self.language,
            LABEL_DISPLAY_NAME: self.display_name,
            LABEL_INTERRUPT_MODE: self.interrupt_mode,
        }
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe, as ``load_recipe`` returns it; ``build.build_image`` plans and
    builds the image from it. ``raw`` is the parsed TOML as read (not compared)."""

    path: Path  # the recipe file
    name: str
    tag: str = "latest"
    description: str = ""
    from_image: str = ""
    base: BaseSpec | None = None
    python: PythonSpec | None = None
    pip: PipSpec | None = None
    files: tuple[FileSpec, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    kernel: KernelSpec | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def directory(self) -> Path:
        """The recipe directory: ``[[files]]`` sources are found (and hashed) relative to it."""
        return self.path.parent


_MUST_BE_STRING = "must be a string (in double quotes)"


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class _Checker:
    """Collects every problem of a recipe, so one run reports them all. One per recipe, made by
    ``_validate``; each section validator adds to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def add(self, where: str, msg: str) -> None:
        """Record the problem ``msg`` of the field ``where`` (e.g. ``base.suite``)."""
        self.problems.append(f"{where}: {msg}")

    def add_problem(self, problem: str) -> None:
        """Record a problem already worded with its field (from a rule shared with the
        runtime, such as ``env_key_problem``)."""
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        """BuildError naming the recipe file and every problem, if there are any."""
        if len(self.problems) == 1:
            raise BuildError(f"recipe {self.path}: {self.problems[0]}")
        if self.problems:
            raise BuildError(
                f"recipe {self.path}: {len(self.problems)} problems:\n  - "
                + "\n  - ".join(self.problems)
            )

    def keys(self, table: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
        """Record each key of ``table`` that is not in ``valid``, listing the valid ones."""
        for key in table:
            if key not in valid:
                section = f" in [{where.rstrip('.')}]" if where else ""
                self.add(
                    f"{where}{key}",
                    f"unknown key {key!r}; valid keys{section} are: {', '.join(valid)}",
                )

    def _get(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        ok: Callable[[object], bool],
        must: str,
        required: str,
    ) -> Any:
        """``table[key]`` when ``ok`` accepts it; None (after recording the problem ``must``,
        or ``required`` when the key is missing and that is not empty) otherwise."""
        if key not in table:
            if required:
                self.add(f"{where}{key}", required)
            return None
        value = table[key]
        if not ok(value):
            self.add(f"{where}{key}", f"{value!r} {must}")
            return None
        return value

    def string(
        self,
        table: Mapping[str, Any],
        key: str,
        where: str,
        *,
        required: bool = False,
        default: str = "",
    ) -> str:
        """The string ``table[key]``, or ``default`` when it is missing or not a string."""
        value = self._get(
            table, key, where, _is_str, _MUST_BE_STRING, "is required" if required else ""
        )
        return default if value is None else str(value)

    def boolean(self, table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        """The boolean ``table[key]``, or ``default`` when it is missing or not a boolean."""
        value = self._get(
            table, key, where, lambda v: isinstance(v, bool), "must be true or false", ""
        )
        return default if value is None else bool(value)

    def strings(
        self, table: Mapping[str, Any], key: str, where: str, *, required: bool = False
    ) -> tuple[str, ...]:
        """The list of strings ``table[key]`` as a tuple; () when missing or not one."""
        value = self._get(
            table,
            key,
            where,
            _is_str_list,
            'must be a list of strings, e.g. ["a", "b"]',
            "is required (a list of strings)" if required else "",
        )
        return () if value is None else tuple(value)

    def table(self, raw: Mapping[str, Any], key: str) -> dict[str, Any] | None:
        """The ``[key]`` section of the recipe, or None when absent or not a table."""
        if key not in raw:
            return None
        value = raw[key]
        if not isinstance(value, dict):
            self.add(key, f"{value!r} must be a table: write it as a [{key}] section")
            return None
        return value


def _abs_path(ck: _Checker, value: str, where: str) -> str:
    """``value`` as a normalised absolute path inside the image (the runtime's
    ``is_clean_abs`` once normalised); records a problem when it is not one."""
    p = str(PurePosixPath(value))
    if not is_clean_abs(p):
        ck.add(
            where,
            f"{value!r} must be an absolute path inside the image without '..', "
            f'e.g. "/usr/local/bin/tool"',
        )
    return p


def parse_recipe_text(text: str, path: Path) -> Recipe:
    """Parse and fully validate recipe text; ``path`` is the recipe file (used in messages and
    to resolve ``[[files]]`` sources). Called by ``load_recipe``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(
            f"recipe {path}: not valid TOML: {exc}; fix the syntax "
            "(strings need double quotes, lists use [ ... ])"
        ) from exc
    return _validate(raw, path)


def load_recipe(path: Path) -> Recipe:
    """Load a recipe from a recipe file or a recipe directory (holding ``recipe.toml``).

    Called by ``build.build_image`` (``sandbox-kernel image build``) before anything is built,
    and by the builder for a parent image it has to build first; every problem is raised at
    once as one BuildError.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RECIPE_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise BuildError(
            f"recipe {p}: no such file; a recipe directory must hold {RECIPE_FILE}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(
            f"recipe {p}: cannot read it: {exc}; make it a readable UTF-8 file"
        ) from exc
    return parse_recipe_text(text, p.resolve())


def _validate(raw: dict[str, Any], path: Path) -> Recipe:
    """Check every section of a parsed recipe, then raise all problems at once or build the
    Recipe. Problems are reported in the order of the sections below."""
    ck = _Checker(path)
    ck.keys(raw, _TOP_KEYS, "")
    name = _name(ck, raw, path)
    tag = ck.string(raw, "tag", "", default="latest")
    if not _TAG_RE.match(tag):
        ck.add("tag", f"{tag!r} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-'")
    description = ck.string(raw, "description", "")
    from_image = ck.string(raw, "from", "")
    base = _base(ck, ck.table(raw, "base"))
    _from(ck, from_image, base)
    python = _python(ck, ck.table(raw, "python"))
    pip = _pip(ck, ck.table(raw, "pip"))
    files = _files(ck, raw, path.parent)
    env = _env(ck, ck.table(raw, "env"))
    labels = _labels(ck, ck.table(raw, "labels"))
    kernel = _kernel(ck, ck.table(raw, "kernel"), name, inherit=bool(from_image))
    if base is not None and python is None and (pip is not None or kernel is not None):
        ck.add(
            "python",
            "a recipe with [base] that installs pip packages or starts a kernel "
            "needs a [python] section (executable, version, site_dir)",
        )
    ck.raise_if_any()
    return Recipe(
        path=path,
        name=name,
        tag=tag,
        description=description,
        from_image=from_image,
        base=base,
        python=python,
        pip=pip,
        files=files,
        env=env,
        labels=labels,
        kernel=kernel,
        raw=raw,
    )


def _name(ck: _Checker, raw: Mapping[str, Any], path: Path) -> str:
    """``name``: the image name, by default the recipe directory's name."""
    name = ck.string(raw, "name", "", default=path.parent.name.lower())
    if not _NAME_RE.match(name):
        ck.add(
            "name",
            f"{name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting "
            'with a letter or digit (e.g. "python3-pandas")',
        )
    return name


def _base(ck: _Checker, braw: dict[str, Any] | None) -> BaseSpec | None:
    """``[base]``: the Debian suite to bootstrap and what mmdebstrap installs or drops."""
    if braw is None:
        return None
    ck.keys(braw, _BASE_KEYS, "base.")
    suite = ck.string(braw, "suite", "base.", required=True)
    if suite and not _SUITE_RE.match(suite):
        ck.add("base.suite", f'{suite!r} is not a Debian suite name; use e.g. "bookworm"')
    variant = ck.string(braw, "variant", "base.", default="essential")
    if variant not in VARIANTS:
        ck.add(
            "base.variant",
            f"{variant!r} is not an mmdebstrap variant; use one of: {', '.join(VARIANTS)}",
        )
    include = ck.strings(braw, "include", "base.")
    for pkg in include:
        if not _DEB_RE.match(pkg):
            ck.add("base.include", f'{pkg!r} is not a Debian package name (e.g. "python3")')
    exclude = ck.strings(braw, "exclude", "base.")
    keep = ck.strings(braw, "keep", "base.")
    _dpkg_globs(ck, "exclude", exclude)
    _dpkg_globs(ck, "keep", keep)
    components = ck.strings(braw, "components", "base.") or ("main",)
    for comp in components:
        if not _SUITE_RE.match(comp):
            ck.add("base.components", f'{comp!r} is not an archive component (e.g. "main")')
    mirror = ck.string(braw, "mirror", "base.")
    if mirror and not _URL_RE.match(mirror):
        ck.add(
            "base.mirror",
            f"{mirror!r} must be an http(s):// or file:// URL, or left "
            "out to use the host's apt mirror",
        )
    return BaseSpec(suite, variant, include, exclude, keep, components, mirror)


def _dpkg_globs(ck: _Checker, key: str, globs: tuple[str, ...]) -> None:
    """``base.exclude`` / ``base.keep``: absolute dpkg path globs."""
    for g in globs:
        if not g.startswith("/") or any(c.isspace() for c in g):
            ck.add(
                f"base.{key}",
                f'{g!r} must be an absolute dpkg path glob without spaces, e.g. "/usr/share/doc/*"',
            )


def _from(ck: _Checker, from_image: str, base: BaseSpec | None) -> None:
    """``from``: exactly one of it and ``[base]``, and a well-formed image reference."""
    if base is None and not from_image:
        ck.add(
            "from",
            "the recipe needs either a [base] section (a Debian suite to bootstrap) or "
            'from = "<image name>" (an image in the store to build on)',
        )
    if base is not None and from_image:
        ck.add("from", f"{from_image!r} and a [base] section cannot both be given; keep one")
    if from_image and not _REF_RE.match(from_image):
        ck.add(
            "from",
            f"{from_image!r} is not an image reference; use a name such as "
            '"python3" or "python3:latest"',
        )


def _python(ck: _Checker, praw: dict[str, Any] | None) -> PythonSpec | None:
    """``[python]``: the image's interpreter and the wheel tags pip installs for."""
    if praw is None:
        return None
    ck.keys(praw, _PYTHON_KEYS, "python.")
    executable = _abs_path(
        ck, ck.string(praw, "executable", "python.", required=True) or "/", "python.executable"
    )
    version = ck.string(praw, "version", "python.", required=True)
    if version and not _VERSION_RE.match(version):
        ck.add("python.version", f'{version!r} must be MAJOR.MINOR, e.g. "3.11" or "2.7"')
    abi = ck.string(praw, "abi", "python.", default="")
    if not abi and _VERSION_RE.match(version):
        abi = "cp" + version.replace(".", "") + ("mu" if version.startswith("2") else "")
    if abi and not _ABI_RE.match(abi):
        ck.add("python.abi", f'{abi!r} must be a CPython ABI tag such as "cp311" or "cp27mu"')
    platforms = ck.strings(praw, "platforms", "python.") or ("manylinux2014_x86_64",)
    if "platforms" in praw:
        for plat in platforms:
            if not re.match(r"^[a-z0-9_]+$", plat):
                ck.add(
                    "python.platforms",
                    f'{plat!r} is not a wheel platform tag (e.g. "manylinux2014_x86_64")',
                )
    site_dir = ck.string(praw, "site_dir", "python.", required=True)
    if site_dir:
        site_dir = _abs_path(ck, site_dir, "python.site_dir")
    compile_paths, compile_enabled = _compile(ck, praw)
    return PythonSpec(executable, version, abi, platforms, site_dir, compile_paths, compile_enabled)


def _compile(ck: _Checker, praw: Mapping[str, Any]) -> tuple[tuple[str, ...] | None, bool]:
    """``python.compile``: true/false, or the directories to byte-compile (None: default)."""
    if "compile" not in praw:
        return None, True
    cval = praw["compile"]
    if isinstance(cval, bool):
        return None, cval
    if _is_str_list(cval):
        return tuple(_abs_path(ck, v, "python.compile") for v in cval), True
    ck.add(
        "python.compile",
        f"{cval!r} must be true, false, or a list of absolute directories to byte-compile",
    )
    return None, True


def _pip(ck: _Checker, pipraw: dict[str, Any] | None) -> PipSpec | None:
    """``[pip]``: pinned packages, the ones built from source, and the indexes."""
    if pipraw is None:
        return None
    ck.keys(pipraw, _PIP_KEYS, "pip.")
    packages = ck.strings(pipraw, "packages", "pip.", required=True)
    pinned = _pins(ck, packages)
    from_source = ck.strings(pipraw, "from_source", "pip.")
    for proj in from_source:
        if not _PROJECT_RE.match(proj):
            ck.add("pip.from_source", f"{proj!r} is not a project name")
        elif canonical_project(proj) not in pinned and packages:
            ck.add(
                "pip.from_source",
                f"{proj!r} is not in pip.packages; list it there too (pinned) or remove it here",
            )
    no_deps = ck.boolean(pipraw, "no_deps", "pip.", False)
    if from_source and not no_deps:
        ck.add(
            "pip.no_deps",
            "must be true when pip.from_source is used: pip only builds "
            "source packages for another interpreter without dependency "
            "resolution, so list the full pinned closure in pip.packages "
            "and set no_deps = true",
        )
    ignore_rp = ck.boolean(pipraw, "ignore_requires_python", "pip.", False)
    index_url = ck.string(pipraw, "index_url", "pip.")
    extra = ck.strings(pipraw, "extra_index_urls", "pip.")
    for url in (index_url, *extra):
        if url and not _URL_RE.match(url):
            ck.add("pip.index_url", f"{url!r} must be an http(s):// or file:// URL")
    return PipSpec(packages, from_source, no_deps, ignore_rp, index_url, extra)


def _pins(ck: _Checker, packages: tuple[str, ...]) -> set[str]:
    """``pip.packages``: each NAME==VERSION, each project once; the canonical names."""
    seen: set[str] = set()
    for req in packages:
        m = _PIN_RE.match(req)
        if not m:
            ck.add(
                "pip.packages",
                f"{req!r} must be pinned as NAME==VERSION (e.g. "
                '"numpy==1.26.4"); find versions with `pip index '
                "versions NAME`",
            )
            continue
        cname = canonical_project(m.group(1))
        if cname in seen:
            ck.add("pip.packages", f"{req!r}: {m.group(1)} is listed twice; keep one pin")
        seen.add(cname)
    return seen


def _files(ck: _Checker, raw: Mapping[str, Any], recipe_dir: Path) -> tuple[FileSpec, ...]:
    """``[[files]]``: files of the recipe directory to copy into the image."""
    if "files" not in raw:
        return ()
    fraw = raw["files"]
    if not isinstance(fraw, list) or not all(isinstance(f, dict) for f in fraw):
        ck.add("files", f"{fraw!r} must be a list of [[files]] tables with src, dst, mode")
        return ()
    return tuple(_file(ck, entry, f"files[{i}].", recipe_dir) for i, entry in enumerate(fraw))


def _file(ck: _Checker, entry: dict[str, Any], where: str, recipe_dir: Path) -> FileSpec:
    """One ``[[files]]`` table: ``src`` inside the recipe directory, ``dst`` absolute, an
    octal ``mode``."""
    ck.keys(entry, _FILE_KEYS, where)
    src = ck.string(entry, "src", where, required=True)
    dst = ck.string(entry, "dst", where, required=True)
    if src:
        sp = PurePosixPath(src)
        if sp.is_absolute() or ".." in sp.parts:
            ck.add(
                f"{where}src",
                f"{src!r} must be a path relative to the recipe "
                f"directory {recipe_dir}, without '..'",
            )
        elif not (recipe_dir / src).exists():
            ck.add(
                f"{where}src",
                f"{src!r} does not exist in {recipe_dir}; create it or fix the path",
            )
    if dst:
        dst = _abs_path(ck, dst, f"{where}dst")
    mode: int | None = None
    if "mode" in entry:
        mval = entry["mode"]
        if isinstance(mval, str) and re.match(r"^0?[0-7]{3,4}$", mval):
            mode = int(mval, 8)
        else:
            ck.add(f"{where}mode", f'{mval!r} must be an octal string such as "0644" or "0755"')
    return FileSpec(src, dst, mode)


def _env(ck: _Checker, eraw: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """``[env]``: the image's environment (names by the runtime's rule)."""
    env: list[tuple[str, str]] = []
    for k, v in (eraw or {}).items():
        problem = env_key_problem(k, "env")
        if problem:
            ck.add_problem(problem)
        if not isinstance(v, str):
            ck.add(f"env.{k}", f"{v!r} {_MUST_BE_STRING}")
        else:
            env.append((k, v))
    return tuple(env)


def _labels(ck: _Checker, lraw: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """``[labels]``: free-form image labels, none under ``org.sandbox-kernel.``."""
    labels: list[tuple[str, str]] = []
    for k, v in (lraw or {}).items():
        if not isinstance(v, str):
            ck.add(f"labels.{k}", f"{v!r} {_MUST_BE_STRING}")
        elif k.startswith("org.sandbox-kernel."):
            ck.add(
                f"labels.{k}",
                "labels under org.sandbox-kernel. are set from [kernel] and "
                "[python]; use those sections",
            )
        else:
            labels.append((k, v))
    return tuple(labels)


def _kernel(
    ck: _Checker, kraw: dict[str, Any] | None, name: str, *, inherit: bool
) -> KernelSpec | None:
    """``[kernel]``: how to start the kernel; with ``inherit`` (a ``from`` recipe) fields left
    out come from the parent image."""
    if kraw is None:
        return None
    ck.keys(kraw, _KERNEL_KEYS, "kernel.")
    argv = ck.strings(kraw, "argv", "kernel.", required=not inherit)
    if argv and "{connection_file}" not in argv:
        ck.add(
            "kernel.argv",
            f'{list(argv)!r} must contain "{{connection_file}}" as one '
            'element, e.g. ["/usr/bin/python3", "-m", '
            '"ipykernel_launcher", "-f", "{connection_file}"]',
        )
    if argv and not argv[0].startswith("/"):
        ck.add("kernel.argv", f"{argv[0]!r}: the first element must be an absolute path")
    language = ck.string(kraw, "language", "kernel.", default="" if inherit else "python")
    display_name = ck.string(kraw, "display_name", "kernel.", default="" if inherit else name)
    imode = ck.string(kraw, "interrupt_mode", "kernel.", default="" if inherit else "signal")
    if imode not in INTERRUPT_MODES and not (inherit and not imode):
        ck.add("kernel.interrupt_mode", f"{imode!r} must be one of: {', '.join(INTERRUPT_MODES)}")
    return KernelSpec(argv, language, display_name, imode)


# ---------------------------------------------------------------------------------------------
# Cache keys


def hash_tree(root: Path) -> str:
    """Content hash of a file or directory tree: relative paths, types, modes, link targets and
    file contents (not times or owners). The builder hashes each ``[[files]]`` source with it,
    so that the files step's cache key changes when a source file does."""
    h = hashlib.sha256()
    root = Path(root)
    items = (
        [root]
        if not root.is_dir() or root.is_symlink()
        else sorted([root, *root.rglob("*")], key=lambda p: p.relative_to(root).as_posix())
    )
    for p in items:
        rel = p.relative_to(root).as_posix() if p != root else "."
        st = p.lstat()
        h.update(f"{rel}\0{st.st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(b"L" + str(p.readlink()).encode() + b"\0")
        elif p.is_file():
            h.update(b"F")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return "sha256:" + h.hexdigest()


def step_cache_key(
    parent_chain: tuple[str, ...], step: Mapping[str, Any], content_hash: str = ""
) -> str:
    """Cache key of one build step: the parent layers (digests, base first), the step's
    normalised definition and the content hash of the files it adds. The builder computes it
    for each step and looks it up with ``ImageStore.layer_cache_get`` before running it."""
    doc = {"v": 1, "parents": list(parent_chain), "step": step, "content": content_hash}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding recipes by name (the builder, and the advice of an image "not found")

IMAGES_DIR_ENV = "SANDBOX_KERNEL_IMAGES_DIR"


def recipe_dirs() -> list[Path]:
    """Directories searched for recipes by name, in order: ``./images``, each directory of
    ``$SANDBOX_KERNEL_IMAGES_DIR`` (``:``-separated), the recipes shipped with the package."""
    dirs = [Path.cwd() / "images"]
    env = os.environ.get(IMAGES_DIR_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += list(shipped_dirs("recipes"))
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def available_recipes() -> dict[str, Path]:
    """Recipe name -> recipe file, first directory in :func:`recipe_dirs` order wins."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if (sub / RECIPE_FILE).is_file() and sub.name not in found:
                found[sub.name] = sub / RECIPE_FILE
    return found


def find_recipe(name: str) -> Path:
    """The recipe file for a bare recipe name; BuildError listing the available names."""
    for d in recipe_dirs():
        candidate = d / name / RECIPE_FILE
        if candidate.is_file():
            return candidate
    avail = available_recipes()
    names = ", ".join(sorted(avail)) or "(none)"
    raise BuildError(
        f"no recipe named {name!r}; searched {', '.join(str(d) for d in recipe_dirs())}; "
        f"available recipes: {names}; give a recipe directory path, or set {IMAGES_DIR_ENV} "
        "to a directory holding <name>/recipe.toml"
    )
