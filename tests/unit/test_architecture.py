"""The package's layers, checked from the source: imports point down, there are no cycles,
the OS layers never import Jupyter, and ``magics/`` (run alone inside Python 2.7 kernels)
imports nothing of the package and uses no Python-3-only syntax.

The layers, lowest first (a module may import its own layer and every layer below it):

    leaves   errors, units, paths, limits, beneath, quota
    cgroups  cgroups/          (one driver per cgroup version behind one interface)
    network  network/          (network mode nat: links, firewall, leases; pyroute2, nftables)
    runtime  runtime/          (spec -> validators -> plan -> executor; the container)
    images   images/           (the store, builds on the runtime)
    jupyter  jupyter/          (provisioner, settings, control server, kernelspecs, demo)
    hub      hub/              (the JupyterHub hook)
    grading  grading/          (nbgrader on sandbox kernels)
    batch    batch/            (nbclient and papermill runs that end with the death reason)
    cli      cli/, __main__

``magics/`` stands apart; ``sandbox_kernel/__init__.py`` is the package's face and imports
nothing at load time. Every import form counts: ``import a.b``, ``from a import b``,
``from . import x``, ``from .. import x``, ``from sandbox_kernel import x``, imports inside
functions, and ``importlib.import_module`` with a literal name.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[2] / "sandbox_kernel"
PKG = "sandbox_kernel"

#: layer name -> the top-level names of the package that belong to it, lowest layer first.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("leaves", frozenset({"errors", "units", "paths", "limits", "policy", "beneath", "quota"})),
    ("cgroups", frozenset({"cgroups"})),
    ("network", frozenset({"network"})),
    ("runtime", frozenset({"runtime"})),
    ("images", frozenset({"images"})),
    ("jupyter", frozenset({"jupyter"})),
    ("hub", frozenset({"hub"})),
    ("grading", frozenset({"grading"})),
    ("batch", frozenset({"batch"})),
    ("cli", frozenset({"cli", "__main__"})),
)
APART = frozenset({"magics"})
FACE = "__init__"
OS_LAYERS = frozenset({"leaves", "cgroups", "network", "runtime", "images"})
#: Third-party packages of the Jupyter stack: never imported by the OS layers.
JUPYTER_PACKAGES = frozenset(
    {
        "IPython",
        "ipykernel",
        "jupyter_client",
        "jupyter_core",
        "jupyter_server",
        "jupyterlab",
        "nbconvert",
        "nbgrader",
        "nbclient",
        "papermill",
        "nbformat",
        "tornado",
        "traitlets",
        "zmq",
    }
)
#: What the in-kernel extension may import besides the standard library.
MAGICS_ALLOWED = frozenset(
    {"IPython", "ipykernel", "ipykernel_launcher", "thread", "cgi"}
)  # the kernel's own packages, + py2 stdlib names


@dataclass(frozen=True)
class Edge:
    """One import: ``src`` (a module of the package) imports ``dst`` (any module name)."""

    src: str
    dst: str
    line: int


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports_of(path: Path, root: Path, known: set[str]) -> list[Edge]:
    """Every module ``path`` imports, resolved to absolute names. ``known``: the package's
    modules, used to tell ``from pkg import submodule`` from ``from pkg import name``."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Edge(module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Edge(module, sub if sub in known else base, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append(Edge(module, node.args[0].value, node.lineno))
    return out


def layer_of(module: str) -> str | None:
    """The layer of a package module (``sandbox_kernel.runtime.spec`` -> ``runtime``)."""
    parts = module.split(".")
    if parts[0] != PKG:
        return None
    if len(parts) == 1:
        return FACE
    top = parts[1]
    if top in APART:
        return top
    for name, members in LAYERS:
        if top in members:
            return name
    return "?"


def _rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _third_party_problem(layer: str, top: str, where: str) -> str | None:
    if layer in OS_LAYERS and top in JUPYTER_PACKAGES:
        return f"{where}: the {layer} layer never imports Jupyter"
    return None


def _magics_problem(top: str, where: str) -> str | None:
    if top == PKG:
        return f"{where}: magics/ runs alone in kernels; no package imports"
    if top not in MAGICS_ALLOWED and top not in sys.stdlib_module_names:
        return f"{where}: magics/ may import the standard library only"
    return None


def _package_problem(layer: str, target: str | None, where: str) -> str | None:
    if layer == FACE:
        return f"{where}: the package's __init__ imports nothing"
    if target == FACE:
        return f"{where}: import the module itself, not the package face"
    if target in APART:
        return f"{where}: magics/ is not importable from the package"
    if target == "?" or target is None:
        return None  # reported for the module itself
    if _rank(target) > _rank(layer):
        return f"{where}: {layer} may not import the {target} layer above it"
    return None


def check_layers(root: Path) -> list[str]:
    """Every violation of the layer rules in the package at ``root``, one line each."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in files:
        module = module_name(path, root)
        layer = layer_of(module)
        rel = path.relative_to(root)
        if layer == "?" or layer is None:
            problems.append(f"{rel}: not in any layer; move it into a layer's folder")
            continue
        for edge in imports_of(path, root, known):
            top = edge.dst.split(".")[0]
            where = f"{rel}:{edge.line} imports {edge.dst}"
            if layer == "magics":
                problem = _magics_problem(top, where)
            elif top != PKG:
                problem = _third_party_problem(layer, top, where)
            else:
                graph.setdefault(module, set()).add(edge.dst)
                problem = _package_problem(layer, layer_of(edge.dst), where)
            if problem:
                problems.append(problem)
    problems += ["import cycle: " + " -> ".join(comp) for comp in _cycles(graph)]
    return problems


# ---- the real package ---------------------------------------------------------------------


def test_the_package_keeps_its_layers() -> None:
    assert (PKG_DIR / "runtime" / "container.py").is_file(), "the package was not found"
    assert check_layers(PKG_DIR) == []


def test_every_layer_folder_exists() -> None:
    for _, members in LAYERS:
        for name in members:
            assert (PKG_DIR / name).is_dir() or (PKG_DIR / f"{name}.py").is_file(), name


# Python 3 syntax a Python 2.7 interpreter cannot parse (the magics are loaded by py2 kernels).
_PY3_ONLY = (
    (ast.JoinedStr, "an f-string"),
    (ast.AsyncFunctionDef, "async def"),
    (ast.Await, "await"),
    (ast.NamedExpr, "the walrus operator"),
    (ast.Nonlocal, "nonlocal"),
    (ast.AnnAssign, "a variable annotation"),
    (ast.Starred, "a starred expression"),
    (ast.MatMult, "the @ operator"),
)


def py27_problems(source: str) -> list[str]:
    """Python-3-only constructs in ``source``, one line each (a syntax-level check)."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        for kind, what in _PY3_ONLY:
            if isinstance(node, kind):
                out.append(f"line {getattr(node, 'lineno', '?')}: {what}")
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            a = node.args
            if a.kwonlyargs or a.posonlyargs or any(x.annotation for x in (*a.args, *a.kwonlyargs)):
                out.append(f"line {node.lineno}: keyword-only arguments or annotations")
            if isinstance(node, ast.FunctionDef) and node.returns is not None:
                out.append(f"line {node.lineno}: a return annotation")
        if isinstance(node, ast.Raise) and node.cause is not None:
            out.append(f"line {node.lineno}: raise ... from")
        if isinstance(node, ast.ClassDef) and node.keywords:
            out.append(f"line {node.lineno}: class keywords (metaclass=)")
    future = [
        n
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and n.module == "__future__"
        for a in n.names
        if a.name == "print_function"
    ]
    if not future:
        out.append("no `from __future__ import print_function`")
    return out


def test_magics_run_under_python_27() -> None:
    for path in sorted((PKG_DIR / "magics").glob("*.py")):
        if path.read_text().strip().startswith('"""') and path.stat().st_size < 200:
            continue  # the package marker holds only a docstring
        assert py27_problems(path.read_text()) == [], path.name


# ---- the checker itself -------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PKG
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


GOOD = {
    "__init__.py": '"""face"""\n',
    "errors.py": "class E(Exception): pass\n",
    "units.py": "from .errors import E\n",
    "cgroups/__init__.py": "from ..errors import E\n",
    "runtime/__init__.py": "",
    "runtime/spec.py": "from ..units import E\nfrom .. import cgroups\n",
    "runtime/container.py": "from . import spec\nimport pyroute2\n",
    "jupyter/__init__.py": "",
    "jupyter/provisioner.py": "import traitlets\nfrom ..runtime import container\n",
    "magics/__init__.py": "",
    "magics/m.py": "from __future__ import print_function\nimport json\nimport IPython\n",
}


def test_checker_accepts_a_well_layered_package(tmp_path: Path) -> None:
    assert check_layers(_write(tmp_path, GOOD)) == []


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("runtime/bad.py", "from ..jupyter import provisioner\n", "runtime may not import"),
        ("runtime/bad.py", "from .. import jupyter\n", "runtime may not import"),
        ("runtime/bad.py", "from sandbox_kernel import jupyter\n", "runtime may not import"),
        ("runtime/bad.py", "import sandbox_kernel.jupyter.provisioner\n", "runtime may not"),
        ("runtime/bad.py", "def f():\n    from ..jupyter import x\n", "runtime may not import"),
        (
            "runtime/bad.py",
            "import importlib\nimportlib.import_module('sandbox_kernel.jupyter')\n",
            "runtime may not import",
        ),
        ("cgroups/bad.py", "from ..runtime import spec\n", "cgroups may not import"),
        ("errors.py", "from .runtime import spec\n", "leaves may not import"),
        ("runtime/bad.py", "import traitlets\n", "never imports Jupyter"),
        ("cgroups/bad.py", "from zmq import asyncio\n", "never imports Jupyter"),
        ("magics/bad.py", "from sandbox_kernel import units\n", "no package imports"),
        ("magics/bad.py", "from .. import units\n", "no package imports"),
        ("magics/bad.py", "import numpy\n", "standard library only"),
        ("runtime/bad.py", "from .. import magics\n", "magics/ is not importable"),
        ("odd.py", "x = 1\n", "not in any layer"),
        ("__init__.py", "from .runtime import spec\n", "__init__ imports nothing"),
        ("runtime/bad.py", "from .. import units\nimport sandbox_kernel\n", "package face"),
    ],
)
def test_checker_finds_a_wrong_import(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    problems = check_layers(_write(tmp_path, {**GOOD, rel: text}))
    assert any(expected in p for p in problems), problems


def test_checker_finds_a_cycle(tmp_path: Path) -> None:
    files = {
        **GOOD,
        "runtime/a.py": "from . import b\n",
        "runtime/b.py": "def f():\n    from .a import x\n",
    }
    problems = check_layers(_write(tmp_path, files))
    assert "import cycle: sandbox_kernel.runtime.a -> sandbox_kernel.runtime.b" in problems


def test_py27_check_finds_python3_syntax() -> None:
    src = "from __future__ import print_function\ndef f(a, *, b):\n    return f'{a}'\n"
    found = py27_problems(src)
    assert any("f-string" in p for p in found) and any("keyword-only" in p for p in found)
    assert py27_problems("x = 1\n") == ["no `from __future__ import print_function`"]
