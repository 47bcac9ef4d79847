"""The OS layer never imports the Jupyter layer (jupyter_client, traitlets, ipykernel, zmq)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "sandbox_kernel"
JUPYTER_LAYER = {"provisioner", "config", "kernelspecs", "cli", "demo", "magics", "__main__"}
FORBIDDEN = (
    "jupyter_client",
    "traitlets",
    "ipykernel",
    "zmq",
    "jupyter_server",
    "nbclient",
    "IPython",
)


def _os_layer_files():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0].removesuffix(".py") in JUPYTER_LAYER:
            continue
        yield path


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module
            elif node.level and node.module and node.module.split(".")[0] in JUPYTER_LAYER:
                yield "sandbox_kernel." + node.module


def test_os_layer_does_not_import_jupyter():
    files = list(_os_layer_files())
    assert len(files) >= 8, "the OS layer modules were not found"
    bad = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN or any(
                name.startswith(f"sandbox_kernel.{j}") for j in JUPYTER_LAYER
            ):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "OS layer imports the Jupyter layer:\n" + "\n".join(bad)
