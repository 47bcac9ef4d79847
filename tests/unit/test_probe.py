"""The image probe's report parser (hostile output) and the kernelspec of any Python image."""

from __future__ import annotations

import json

import pytest

from sandbox_kernel.errors import ImageError, SpecError
from sandbox_kernel.images import ipykernel_layer, probe
from sandbox_kernel.jupyter import kernelspecs

GOOD = {
    "exe": "/usr/bin/python3",
    "real": "/usr/bin/python3.11",
    "version": "3.11.2",
    "implementation": "cpython",
    "abi": "cp311",
    "libc": "glibc 2.36",
    "machine": "x86_64",
    "site_dir": "/usr/local/lib/python3.11/dist-packages",
    "ipykernel": "",
}


def line(**changes: object) -> bytes:
    return probe.PREFIX + json.dumps({**GOOD, **changes}).encode() + b"\n"


def test_parses_a_report_among_the_images_chatter() -> None:
    data = b"hello from sitecustomize\n" + line() + b"\xff\xfe junk\n"
    (interp,) = probe.parse_report(data)
    assert interp.executable == "/usr/bin/python3" and interp.major_minor == "3.11"
    assert interp.platform_tag() == "manylinux_2_36_x86_64" and not interp.ipykernel


def test_same_interpreter_twice_is_one() -> None:
    data = line() + line(exe="/usr/bin/python3.11") + line(exe="/bin/python3")
    assert [i.executable for i in probe.parse_report(data)] == ["/usr/bin/python3"]


@pytest.mark.parametrize(
    "bad",
    [
        {"version": "3.11"},
        {"version": "3.11.2; rm -rf /"},
        {"exe": "python3"},
        {"exe": "/usr/bin/py thon"},
        {"exe": "/usr/bin/\u00e9"},
        {"abi": "cp311\n"},
        {"libc": "musl 1.2"},
        {"machine": "x86_64 " * 10},
        {"ipykernel": True},
        {"ipykernel": "x" * 100},
        {"implementation": "pypy"},
        {"site_dir": None},
    ],
)
def test_malformed_fields_drop_the_line(bad: dict[str, object]) -> None:
    assert probe.parse_report(line(**bad)) == []


def test_non_utf8_non_object_and_deep_json_are_ignored() -> None:
    data = (
        probe.PREFIX
        + b'{"exe": "/usr/bin/\xff"}\n'
        + probe.PREFIX
        + b"[1, 2]\n"
        + probe.PREFIX
        + b"[" * 100000
        + b"\n"
        + probe.PREFIX
        + b"{not json\n"
    )
    assert probe.parse_report(data) == []


def test_huge_output_is_bounded() -> None:
    # a report after MAX_OUTPUT bytes of noise is not read; an over-long line is dropped
    assert probe.parse_report(b"x" * probe.MAX_OUTPUT + b"\n" + line()) == []
    padded = probe.PREFIX + json.dumps({**GOOD, "pad": "y" * probe.MAX_LINE}).encode()
    assert probe.parse_report(padded) == []
    many = b"".join(line(exe=f"/usr/bin/python{n}", real=f"/opt/p{n}/python") for n in range(100))
    assert len(probe.parse_report(many)) == probe.MAX_INTERPRETERS


def test_choose_prefers_ipykernel_then_newest_and_honours_python() -> None:
    py27, py311, py312 = probe.parse_report(
        line(
            exe="/usr/bin/python2.7", real="/a", version="2.7.18", abi="cp27mu", ipykernel="4.10.1"
        )
        + line(real="/b")
        + line(exe="/usr/local/bin/python3.12", real="/c", version="3.12.1", abi="cp312")
    )
    assert probe.choose([py27, py311, py312]) == py27
    assert probe.choose([py311, py312]) == py312
    assert probe.choose([py27, py311, py312], "3.11") == py311
    assert probe.choose([py27, py311, py312], "python3.12") == py312
    assert probe.choose([py311], "2.7") is None


def test_ipykernel_layer_support_and_tag() -> None:
    (py311,) = probe.parse_report(line())
    (py37,) = probe.parse_report(line(version="3.7.3", abi="cp37m"))
    (musl,) = probe.parse_report(line(libc=""))
    assert ipykernel_layer.supported(py311) == ""
    why = ipykernel_layer.supported(py37)
    assert "Python 3.7.3 (/usr/bin/python3)" in why and "2.7 and 3.8 or newer" in why
    assert "\n" not in why
    assert "glibc" in ipykernel_layer.supported(musl)
    pins = ipykernel_layer.closure(py311)
    assert any(p.startswith("ipykernel==7.") for p in pins.pip.packages)
    tag = ipykernel_layer.tag_for(py311, pins)
    assert tag.startswith("cp311-manylinux_2_36_x86_64-") and len(tag) < 128
    (py27,) = probe.parse_report(line(version="2.7.18", abi="cp27mu", libc="glibc 2.31"))
    assert "ipykernel==4.10.1" in ipykernel_layer.closure(py27).pip.packages
    with pytest.raises(ImageError, match=r"3\.8 or newer"):
        ipykernel_layer.closure(py37)


@pytest.mark.parametrize(
    ("version", "recipe"),
    [
        ("2.6.9", ""),
        ("2.7.18", "python2.7"),
        ("3.0.1", ""),
        ("3.7.17", ""),
        ("3.8.10", "python3.9"),
        ("3.9.2", "python3.9"),
        ("3.10.12", "python3.9"),
        ("3.11.2", "python3"),
        ("3.13.1", "python3"),
        ("4.0.0", ""),
    ],
)
def test_the_interpreters_version_picks_the_closure(version: str, recipe: str) -> None:
    major, minor, _ = (int(x) for x in version.split("."))
    assert ipykernel_layer.recipe_for(major, minor) == recipe
    abi = f"cp{major}{minor}" + ("mu" if major == 2 else "")
    (interp,) = probe.parse_report(line(version=version, abi=abi, libc="glibc 2.31"))
    if not recipe:
        assert f"Python {version} " in ipykernel_layer.supported(interp)
        return
    pins = ipykernel_layer.closure(interp)
    assert pins.recipe.parent.name == recipe
    assert ipykernel_layer.tag_for(interp, pins).startswith(f"{abi}-manylinux_2_31_x86_64-")


def test_the_py38_to_py310_closure_is_ipykernel_6_for_python_3_8() -> None:
    (py39,) = probe.parse_report(line(version="3.9.2", abi="cp39", libc="glibc 2.31"))
    (py310,) = probe.parse_report(line(version="3.10.12", abi="cp310", libc="glibc 2.35"))
    pins = ipykernel_layer.closure(py39)
    pinned = dict(p.split("==") for p in pins.pip.packages)
    assert pinned["ipykernel"].startswith("6.29.") and pinned["ipython"].startswith("8.12.")
    # the full closure, markers for Python < 3.10 included (pip evaluates them for the host)
    assert pins.pip.no_deps and {"typing_extensions", "importlib_metadata", "zipp"} <= set(pinned)
    # another Python, another layer; other pins, another tag
    assert ipykernel_layer.tag_for(py39, pins) != ipykernel_layer.tag_for(py310, pins)
    (py311,) = probe.parse_report(line())
    assert pins.digest() != ipykernel_layer.closure(py311).digest()


def test_choose_the_interpreter_a_kernelspec_runs() -> None:
    ref = "course:latest"
    (py37,) = probe.parse_report(line(exe="/usr/bin/python3", version="3.7.3", abi="cp37m"))
    (py27,) = probe.parse_report(
        line(exe="/usr/bin/python2.7", real="/usr/bin/python2.7", version="2.7.18", abi="cp27mu")
    )
    (py39,) = probe.parse_report(
        line(exe="/usr/bin/python3.9", real="/usr/bin/python3.9", version="3.9.2", abi="cp39")
    )
    (own,) = probe.parse_report(line(version="3.7.3", abi="cp37m", ipykernel="5.5.6"))
    assert ipykernel_layer.choose(ref, [py39]) == py39
    # the newest cannot have the layer: the newest that can
    assert ipykernel_layer.choose(ref, [py37, py27]) == py27
    # an image's own ipykernel runs whatever its version
    assert ipykernel_layer.choose(ref, [py39, own]) == own
    with pytest.raises(ImageError) as err:
        ipykernel_layer.choose(ref, [py37])
    msg = str(err.value)
    assert msg.startswith("image 'course:latest': Python 3.7.3 (/usr/bin/python3)")
    assert "2.7 and 3.8 or newer" in msg and "\n" not in msg
    # asked for by --python: refused, naming the others
    with pytest.raises(ImageError, match=r"3\.7\.3 .*it has /usr/bin/python3 \(3\.7\.3\), "):
        ipykernel_layer.choose(ref, [py37, py27], "3.7")
    with pytest.raises(ImageError, match=r"no Python interpreter found.*2\.7 and 3\.8 or newer"):
        ipykernel_layer.choose(ref, [])
    with pytest.raises(ImageError, match=r"no Python matching --python 3\.12"):
        ipykernel_layer.choose(ref, [py39], "3.12")


def test_render_image_kernelspec() -> None:
    data = kernelspecs.render_image(
        "course-py2",
        "course:2.7",
        "/usr/bin/python2.7",
        "Python 2.7 (course)",
        ipykernel_layer="sandbox-kernel-ipykernel:cp27mu-x",
        overrides={"memory": "2G", "cpus": "0.5", "pids": None},
    )
    assert data["argv"] == [
        "/usr/bin/python2.7",
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
    ]
    prov = data["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == kernelspecs.PROVISIONER_NAME
    assert prov["config"] == {
        "image": "course:2.7",
        "ipykernel_layer": "sandbox-kernel-ipykernel:cp27mu-x",
        "memory": "2G",
        "cpus": 0.5,
    }
    assert (
        "ipykernel_layer"
        not in kernelspecs.render_image("a", "i", "/p", "d")["metadata"]["kernel_provisioner"][
            "config"
        ]
    )


def test_render_image_refuses_bad_name_and_caps_at_once() -> None:
    with pytest.raises(SpecError) as err:
        kernelspecs.render_image("../x", "i", "/p", "d", overrides={"memory": "lots"})
    assert len(err.value.problems) == 2
