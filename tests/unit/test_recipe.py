"""Recipe parsing, validation, cache keys, recipe lookup and pip command lines (no root)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sandbox_kernel.errors import BuildError
from sandbox_kernel.images import build, pip_target
from sandbox_kernel.images import recipe as recipe_mod
from sandbox_kernel.images.labels import LABEL_ARGV, LABEL_INTERRUPT_MODE
from sandbox_kernel.images.recipe import PipSpec, hash_tree, load_recipe, step_cache_key

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("python2.7", "python3.9", "python3", "python2.7-plot", "python3-plot")

TEACHER = """
from = "python3"
[pip]
packages = ["numpy==2.4.6", "pandas==2.3.2"]
"""


def write(tmp_path: Path, text: str, name: str = "img") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.toml").write_text(text)
    return d / "recipe.toml"


def parse(tmp_path: Path, text: str, name: str = "img"):  # type: ignore[no-untyped-def]
    return load_recipe(write(tmp_path, text, name))


def test_teacher_recipe_is_three_lines(tmp_path: Path) -> None:
    r = parse(tmp_path, TEACHER, "py3-pandas")
    assert r.name == "py3-pandas"
    assert r.tag == "latest"
    assert r.from_image == "python3"
    assert r.base is None and r.python is None
    assert r.pip is not None and r.pip.packages == ("numpy==2.4.6", "pandas==2.3.2")
    assert r.pip.no_deps is False


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name: str) -> None:
    r = load_recipe(REPO / "images" / name)
    assert r.name == name
    assert r.pip is not None and r.pip.packages
    if r.base is not None:
        assert r.python is not None and r.kernel is not None
        labels = r.kernel.labels()
        argv = json.loads(labels[LABEL_ARGV])
        assert "{connection_file}" in argv and argv[0] == r.python.executable
        assert labels[LABEL_INTERRUPT_MODE] == "signal"
    else:
        assert r.from_image in SHIPPED


def test_py2_recipe_builds_tornado_from_source_without_resolution() -> None:
    r = load_recipe(REPO / "images" / "python2.7")
    assert r.base is not None and r.base.suite == "bullseye"
    assert r.pip is not None and r.pip.no_deps and r.pip.ignore_requires_python
    assert set(r.pip.from_source) == {"tornado", "scandir", "simplegeneric"}
    assert r.python is not None and r.python.abi == "cp27mu"


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path: Path) -> None:
    text = 'from = "python3"\nfrom_image = "x"\n[pip]\npackages = ["a==1"]\nnodeps = true\n'
    with pytest.raises(BuildError) as ei:
        parse(tmp_path, text)
    msg = str(ei.value)
    assert "recipe.toml" in msg
    assert "unknown key 'from_image'" in msg and "valid keys are: name, tag" in msg
    assert "pip.nodeps" in msg and "no_deps" in msg and "valid keys in [pip]" in msg


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = """
[base]
suite = "Bookworm!"
variant = "tiny"
include = ["python3", "Bad Name"]
[python]
executable = "python3"
version = "three"
site_dir = "/usr/local/lib/python3.11/dist-packages"
[pip]
packages = ["numpy", "pandas>=2", "six==1.16.0", "Six==1.16.0"]
from_source = ["tornado"]
[kernel]
argv = ["/usr/bin/python3", "-m", "ipykernel_launcher"]
interrupt_mode = "sometimes"
[[files]]
src = "../etc/passwd"
dst = "relative/path"
mode = "rwx"
[env]
"1BAD" = "x"
"""
    with pytest.raises(BuildError) as ei:
        parse(tmp_path, text)
    msg = str(ei.value)
    for expected in (
        "base.suite: 'Bookworm!'",
        "base.variant: 'tiny'",
        "minbase",
        "'Bad Name' is not a Debian package name",
        "python.executable: 'python3' must be an absolute path",
        "python.version: 'three'",
        "'numpy' must be pinned as NAME==VERSION",
        "'pandas>=2' must be pinned",
        "Six is listed twice",
        "tornado' is not in pip.packages",
        "pip.no_deps: must be true when pip.from_source",
        "{connection_file}",
        "kernel.interrupt_mode: 'sometimes'",
        "files[0].src: '../etc/passwd'",
        "files[0].dst: 'relative/path'",
        "files[0].mode: 'rwx'",
        "env key '1BAD' is invalid",
    ):
        assert expected in msg, expected
    assert msg.count("\n  - ") == 16


def test_base_or_from_required_but_not_both(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"either a \[base\] section"):
        parse(tmp_path, 'name = "x"\n')
    with pytest.raises(BuildError, match="cannot both be given"):
        parse(tmp_path, 'from = "python3"\n[base]\nsuite = "bookworm"\n')


def test_base_with_pip_needs_python(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"needs a \[python\] section"):
        parse(tmp_path, '[base]\nsuite = "bookworm"\n[pip]\npackages = ["six==1.16.0"]\n')


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as ei:
        parse(tmp_path, "from = python3\n")
    assert "recipe.toml" in str(ei.value) and "not valid TOML" in str(ei.value)


def test_reserved_labels_refused(tmp_path: Path) -> None:
    text = 'from = "python3"\n[labels]\n"org.sandbox-kernel.kernel.argv" = "[]"\n'
    with pytest.raises(BuildError, match=r"use those sections"):
        parse(tmp_path, text)


def test_variant_kernel_inherits_unset_fields(tmp_path: Path) -> None:
    r = parse(tmp_path, 'from = "python3"\n[kernel]\ndisplay_name = "Py3 + pandas"\n')
    assert r.kernel is not None
    assert r.kernel.labels() == {"org.sandbox-kernel.kernel.display_name": "Py3 + pandas"}


def test_files_parse_and_mode(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    (d / "startup.py").write_text("print('hi')\n")
    text = '[[files]]\nsrc = "startup.py"\ndst = "/etc/ipython/startup.py"\nmode = "0600"\n'
    r = parse(tmp_path, 'from = "python3"\n' + text)
    assert r.files[0].dst == "/etc/ipython/startup.py" and r.files[0].mode == 0o600
    with pytest.raises(BuildError, match="does not exist"):
        parse(tmp_path, 'from = "python3"\n' + text.replace('startup.py"\ndst', 'nope.py"\ndst'))


def test_python_abi_defaults(tmp_path: Path) -> None:
    base = '[base]\nsuite = "bullseye"\n[python]\nexecutable = "/usr/bin/python2.7"\n'
    r = parse(tmp_path, base + 'version = "2.7"\nsite_dir = "/usr/local/lib/python2.7/x"\n')
    assert r.python is not None and r.python.abi == "cp27mu" and r.python.major == 2


# --- cache keys -------------------------------------------------------------------------------


def test_cache_key_depends_on_parents_definition_and_content() -> None:
    step = {"step": "pip", "packages": ["six==1.16.0"]}
    k = step_cache_key(("sha256:a",), step)
    assert k == step_cache_key(("sha256:a",), dict(reversed(list(step.items()))))
    assert k != step_cache_key(("sha256:b",), step)
    assert k != step_cache_key(("sha256:a", "sha256:c"), step)
    assert k != step_cache_key(("sha256:a",), {"step": "pip", "packages": ["six==1.17.0"]})
    assert k != step_cache_key(("sha256:a",), step, "sha256:content")


def test_hash_tree_sees_content_and_mode_not_mtime(tmp_path: Path) -> None:
    d = tmp_path / "t"
    (d / "sub").mkdir(parents=True)
    f = d / "sub" / "a.txt"
    f.write_text("one")
    h1 = hash_tree(d)
    os.utime(f, (1, 1))
    assert hash_tree(d) == h1
    f.write_text("two")
    h2 = hash_tree(d)
    assert h2 != h1
    f.chmod(0o755)
    assert hash_tree(d) != h2
    (d / "link").symlink_to("sub/a.txt")
    assert hash_tree(d) not in (h1, h2)


def test_plan_steps_and_files_content_in_key(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    (d / "x.py").write_text("x = 1\n")
    text = (
        'from = "python3"\n[pip]\npackages = ["six==1.16.0"]\n'
        '[[files]]\nsrc = "x.py"\ndst = "/opt/x.py"\n'
    )
    r = parse(tmp_path, text)
    py = build._python_from_labels(
        {
            "org.sandbox-kernel.python.executable": "/usr/bin/python3.11",
            "org.sandbox-kernel.python.version": "3.11",
            "org.sandbox-kernel.python.abi": "cp311",
            "org.sandbox-kernel.python.site_dir": "/usr/local/lib/python3.11/dist-packages",
        }
    )
    steps = build.plan_steps(r, py)
    assert [s.kind for s in steps] == ["pip", "files", "compile"]
    assert steps[2].definition["dirs"] == ["/usr/local/lib/python3.11/dist-packages"]
    c1 = steps[1].content_hash
    (d / "x.py").write_text("x = 2\n")
    assert build.plan_steps(r, py)[1].content_hash != c1
    r2 = parse(tmp_path, 'from = "python3"\n[env]\nA = "1"\n', "envonly")
    assert build.plan_steps(r2, py) == []  # config only: no layer, nothing to compile


# --- recipe lookup ----------------------------------------------------------------------------


def test_find_recipe_search_order_and_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd_dir = tmp_path / "cwd"
    env_dir = tmp_path / "env"
    write(cwd_dir / "images", 'from = "python3"\n', "mine")
    write(env_dir, 'from = "python3"\n', "mine")
    write(env_dir, 'from = "python3"\n', "other")
    monkeypatch.chdir(cwd_dir)
    monkeypatch.setenv(recipe_mod.IMAGES_DIR_ENV, str(env_dir))
    assert recipe_mod.find_recipe("mine") == cwd_dir / "images" / "mine" / "recipe.toml"
    assert recipe_mod.find_recipe("other") == env_dir / "other" / "recipe.toml"
    assert recipe_mod.find_recipe("python3").parent.name == "python3"  # shipped next to the package
    with pytest.raises(BuildError) as ei:
        recipe_mod.find_recipe("nosuch")
    msg = str(ei.value)
    assert "'nosuch'" in msg and "mine" in msg and "other" in msg and "python2.7" in msg
    assert recipe_mod.IMAGES_DIR_ENV in msg
    assert build.resolve_target(str(env_dir / "other")) == (env_dir / "other/recipe.toml")
    with pytest.raises(BuildError, match="no such recipe file"):
        build.resolve_target(str(tmp_path / "missing" / "dir"))


def test_host_mirror_from_deb822_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "# comment\nTypes: deb\nURIs: http://main.example/debian\nSuites: bookworm\n"
    )
    monkeypatch.delenv(build.MIRROR_ENV, raising=False)
    assert build.host_debian_mirror(apt) == "http://main.example/debian"
    (apt / "sources.list").write_text(
        "# deb http://old.example/debian bullseye main\n"
        "deb [arch=amd64] http://list.example/debian bookworm main\n"
    )
    assert build.host_debian_mirror(apt) == "http://list.example/debian"
    monkeypatch.setenv(build.MIRROR_ENV, "http://env.example/debian")
    assert build.host_debian_mirror(apt) == "http://env.example/debian"
    monkeypatch.delenv(build.MIRROR_ENV)
    assert build.host_debian_mirror(tmp_path / "none") == ""


# --- pip for the image's interpreter ----------------------------------------------------------


def test_expand_platforms() -> None:
    plats = pip_target.expand_platforms(["manylinux_2_31_x86_64"])
    assert plats[0] == "manylinux_2_31_x86_64"
    for p in (
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
        "manylinux_2_5_x86_64",
    ):
        assert p in plats
    assert "manylinux_2_32_x86_64" not in plats
    assert len(plats) == len(set(plats))
    assert pip_target.expand_platforms(["manylinux2010_x86_64"])[-1] == "manylinux1_x86_64"
    assert pip_target.expand_platforms(["macosx_11_0_arm64"]) == ["macosx_11_0_arm64"]


def test_pip_command_for_py27() -> None:
    r = load_recipe(REPO / "images" / "python2.7")
    assert r.pip is not None and r.python is not None
    cmd = pip_target.pip_command(r.pip, r.python, Path("/L/site"), None, python="/host/py")
    assert cmd[:4] == ["/host/py", "-m", "pip", "install"]
    joined = " ".join(cmd)
    for part in (
        "--target /L/site",
        "--python-version 2.7",
        "--implementation cp",
        "--abi cp27mu",
        "--platform manylinux1_x86_64",
        "--only-binary=:all:",
        "--no-binary=tornado,scandir,simplegeneric",
        "--no-deps",
        "--ignore-requires-python",
        "--no-compile",
        "ipykernel==4.10.1",
    ):
        assert part in joined, part


def _dist(site: Path, name: str, version: str, files: list[str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = [f"{f},," for f in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("# " + version)


def test_parent_dists_top_layer_wins(tmp_path: Path) -> None:
    site = "usr/lib/py/site"
    low1, low2 = tmp_path / "l1", tmp_path / "l2"
    _dist(low1 / site, "Six", "1.0", ["six.py"])
    _dist(low2 / site, "packaging", "2", ["packaging/__init__.py"])
    dists = pip_target.parent_dists([str(low2), str(low1)], "/" + site)
    assert {d.name: d.version for d in dists.values()} == {"six": "1.0", "packaging": "2"}
    assert dists["six"].files[0] == "six.py"


def test_foreign_extension_detection() -> None:
    r = load_recipe(REPO / "images" / "python2.7")
    assert r.python is not None
    py2 = r.python
    assert pip_target._is_foreign_extension("speedups.cpython-311-x86_64-linux-gnu.so", py2)
    assert pip_target._is_foreign_extension("_x.abi3.so", py2)
    assert not pip_target._is_foreign_extension("_zmq.so", py2)
    r3 = load_recipe(REPO / "images" / "python3")
    assert r3.python is not None
    assert not pip_target._is_foreign_extension("a.cpython-311-x86_64-linux-gnu.so", r3.python)
    assert pip_target._is_foreign_extension("a.cpython-312-x86_64-linux-gnu.so", r3.python)


def test_whiteout_is_overlay_char_device(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a whiteout needs root")
    p = tmp_path / "a" / "gone.py"
    pip_target._whiteout(p)
    st = os.lstat(p)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


FAKE_PIP = r"""#!{python}
# Stands in for `python -m pip install --target T ...`: writes what a real install would.
import os, sys
args = sys.argv[1:]
target = args[args.index("--target") + 1]
open(os.path.join(os.path.dirname(sys.argv[0]), "args.txt"), "w").write(" ".join(args))
def put(rel, text):
    p = os.path.join(target, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "w").write(text)
def dist(name, version, files):
    info = "%s-%s.dist-info" % (name, version)
    put(info + "/METADATA", "Name: %s\nVersion: %s\n" % (name, version))
    put(info + "/RECORD", "".join(f + ",,\n" for f in files + [info + "/METADATA"]))
    for f in files:
        put(f, "# %s %s\n" % (name, version))
dist("six", "1.16.0", ["six.py"])
dist("tornado", "5.1.1",
     ["tornado/__init__.py", "tornado/speedups.cpython-311-x86_64-linux-gnu.so"])
dist("Pkg", "2.0", ["pkg/__init__.py", "pkg/__pycache__/__init__.cpython-311.pyc", "bin/pkg-tool"])
put("bin/pkg-tool", "#!/host/venv/bin/python3.11\nimport pkg\n")
"""


def test_pip_install_cleans_host_artefacts_and_reuses_parent(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("overlay whiteouts (mknod) need root")
    import sys

    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PIP.replace("{python}", sys.executable))
    fake.chmod(0o755)
    r = load_recipe(REPO / "images" / "python2.7")
    assert r.python is not None and r.pip is not None
    site = r.python.site_dir.lstrip("/")
    parent = tmp_path / "parent"
    _dist(parent / site, "six", "1.16.0", ["six.py"])  # same version: dropped from the layer
    _dist(parent / site, "pkg", "1.0", ["pkg/__init__.py", "pkg/old.py"])  # replaced
    layer = tmp_path / "work" / "layer"
    layer.mkdir(parents=True)
    spec = PipSpec(("six==1.16.0", "tornado==5.1.1", "Pkg==2.0"), ("tornado",), True)
    res = pip_target.install(spec, r.python, layer, [str(parent)], r.path, python=str(fake))
    sp = layer / site
    args = (tmp_path / "args.txt").read_text()
    assert args.startswith("-m pip install --target ")
    assert "-c " in args  # the parent's versions are constraints (pkg is pinned: not in them)
    assert {d.name for d in res.installed} == {"tornado", "pkg"}
    assert res.dropped_same_as_parent == ["six==1.16.0"]
    assert not (sp / "six.py").exists() and not list(sp.glob("six-*"))
    assert res.replaced_in_parent == ["pkg 1.0 -> 2.0"]
    for gone in ("pkg/old.py", "pkg-1.0.dist-info"):
        st = os.lstat(sp / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, gone
    assert (sp / "pkg/__init__.py").read_text() == "# Pkg 2.0\n"
    assert (sp / "tornado/__init__.py").is_file()
    assert not (sp / "tornado/speedups.cpython-311-x86_64-linux-gnu.so").exists()
    assert not (sp / "pkg/__pycache__").exists() and not (sp / "bin").exists()
    tool = layer / "usr/local/bin/pkg-tool"
    assert tool.read_text() == "#!/usr/bin/python2.7\nimport pkg\n"
    assert os.access(tool, os.X_OK)
