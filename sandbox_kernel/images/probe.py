"""What Python an image has: its interpreters probed inside a sandbox, their report parsed.

Layer: images (the runtime runs the probe; nothing of Jupyter). ``sandbox-kernel kernelspec
add --image`` calls ``probe_image`` to write a kernelspec for an image that was never made
for the product (a pulled ``python:2.7-slim``, a distribution image with only ``python3``).

The image's own interpreters run in a container of the product's runtime (no network, no
capabilities, the seccomp filter, an unprivileged user in a user namespace, memory and
process caps, a time limit); what they print is the image's, so hostile: at most
``MAX_OUTPUT`` bytes are read, and only lines of the form ``PREFIX <json object>`` whose
every field has the expected form count (``parse_report``). Everything else is ignored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from ..errors import ImageError
from ..limits import Limits
from ..paths import new_container_id
from ..runtime import userns
from ..runtime.container import Container
from ..runtime.spec import ContainerSpec
from .store import Image

#: How a report line of the probe starts (anything else the image prints is ignored).
PREFIX = b"SKPROBE1 "
#: Bytes of the probe's output read at most; a report line is at most MAX_LINE bytes.
MAX_OUTPUT = 64 * 1024
MAX_LINE = 4096
#: Interpreters kept at most from one report.
MAX_INTERPRETERS = 16
#: Seconds the whole probe may take (each interpreter imports ipykernel once).
TIMEOUT = 60.0
#: The probe container's caps.
PROBE_LIMITS = Limits(memory=256 * 1024**2, pids=64)

#: Interpreter names looked for on the image's PATH and in the usual folders.
CANDIDATE_NAMES = (
    "python3",
    *(f"python3.{minor}" for minor in range(30, 5, -1)),
    "python2.7",
    "python2",
    "python",
)
CANDIDATE_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/opt/conda/bin", "/opt/python/bin")

#: Run by each candidate interpreter (Python 2.7 and 3.x alike): one report line.
PROBE_CODE = r"""
import os, sys
d = {"exe": sys.executable, "real": os.path.realpath(sys.executable),
     "version": "%d.%d.%d" % tuple(sys.version_info[:3]),
     "implementation": getattr(getattr(sys, "implementation", None), "name", "cpython")}
if sys.version_info[0] >= 3:
    d["abi"] = "cp%d%d%s" % (sys.version_info[0], sys.version_info[1], getattr(sys, "abiflags", ""))
else:
    d["abi"] = "cp27mu" if sys.maxunicode > 65535 else "cp27m"
try:
    d["libc"] = os.confstr("CS_GNU_LIBC_VERSION") or ""
except Exception:
    d["libc"] = ""
if not d["libc"]:
    try:
        import platform
        n, v = platform.libc_ver()
        d["libc"] = "glibc " + ".".join(v.split(".")[:2]) if n == "glibc" and v else ""
    except Exception:
        pass
d["machine"] = os.uname()[4]
try:
    import sysconfig
    d["site_dir"] = sysconfig.get_paths()["purelib"]
except Exception:
    d["site_dir"] = ""
try:
    import ipykernel
    d["ipykernel"] = str(getattr(ipykernel, "__version__", "")) or "unknown"
except Exception:
    d["ipykernel"] = ""
import json
sys.stdout.write("SKPROBE1 " + json.dumps(d) + "\n")
"""

#: The shell part: every candidate that is an executable file, run once each.
_SHELL = r"""
IFS=:; set -- $PATH; IFS=' '
for d in "$@" $SK_DIRS; do
  for n in $SK_NAMES; do
    if [ -x "$d/$n" ] && [ ! -d "$d/$n" ]; then "$d/$n" -c "$SK_CODE" </dev/null 2>/dev/null; fi
  done
done
"""

_VERSION_RE = re.compile(r"^([0-9]{1,2})\.([0-9]{1,3})\.([0-9]{1,4})$")
_ABI_RE = re.compile(r"^cp[0-9]{2,4}[a-z]{0,3}$")
_LIBC_RE = re.compile(r"^glibc ([0-9]{1,2})\.([0-9]{1,3})$")
_MACHINE_RE = re.compile(r"^[a-z0-9_]{1,16}$")
_IPYKERNEL_RE = re.compile(r"^[A-Za-z0-9.+_-]{0,32}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._+/-]{0,254}$")


@dataclass(frozen=True)
class Interpreter:
    """One Python interpreter of an image, as its probe reported it (checked forms)."""

    executable: str  # the path it was found at (what a kernelspec's argv names)
    real: str  # that path with links resolved (interpreters found twice are one)
    version: str  # X.Y.Z
    abi: str  # cp311, cp27mu
    libc: str  # "glibc 2.36", or "" (musl, or unknown)
    machine: str  # x86_64
    site_dir: str  # "" when unknown
    ipykernel: str  # its version, "" when ``import ipykernel`` failed

    @property
    def major_minor(self) -> str:
        """``X.Y``: what the ipykernel layer is made for, and the display name shows."""
        return ".".join(self.version.split(".")[:2])

    @property
    def major(self) -> int:
        """The major version (2 or 3)."""
        return int(self.version.split(".")[0])

    @property
    def minor(self) -> int:
        """The minor version."""
        return int(self.version.split(".")[1])

    def platform_tag(self) -> str:
        """The wheel platform of this interpreter (``manylinux_2_36_x86_64``), "" without
        glibc."""
        m = _LIBC_RE.match(self.libc)
        return f"manylinux_{m.group(1)}_{m.group(2)}_{self.machine}" if m else ""


def _field(obj: dict[str, object], key: str, pattern: re.Pattern[str], *, empty: bool) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise ValueError(key)
    if value and not pattern.fullmatch(value):
        raise ValueError(key)
    return value


def _interpreter(line: bytes) -> Interpreter | None:
    """The interpreter of one report line, None for a line of another form."""
    if len(line) > MAX_LINE or not line.startswith(PREFIX):
        return None
    try:
        obj = json.loads(line[len(PREFIX) :].decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("implementation") != "cpython":
        return None
    try:
        return Interpreter(
            executable=_field(obj, "exe", _PATH_RE, empty=False),
            real=_field(obj, "real", _PATH_RE, empty=False),
            version=_field(obj, "version", _VERSION_RE, empty=False),
            abi=_field(obj, "abi", _ABI_RE, empty=False),
            libc=_field(obj, "libc", _LIBC_RE, empty=True),
            machine=_field(obj, "machine", _MACHINE_RE, empty=False),
            site_dir=_field(obj, "site_dir", _PATH_RE, empty=True),
            ipykernel=_field(obj, "ipykernel", _IPYKERNEL_RE, empty=True),
        )
    except ValueError:
        return None


def parse_report(data: bytes) -> list[Interpreter]:
    """The interpreters of a probe's output ``data`` (hostile): only its first
    ``MAX_OUTPUT`` bytes, only well-formed report lines, one per real interpreter (the first
    path found wins), at most ``MAX_INTERPRETERS``. Called by ``probe_image``."""
    out: list[Interpreter] = []
    seen: set[str] = set()
    for line in data[:MAX_OUTPUT].split(b"\n"):
        interp = _interpreter(line.rstrip(b"\r"))
        if interp is None or interp.real in seen:
            continue
        seen.add(interp.real)
        out.append(interp)
        if len(out) >= MAX_INTERPRETERS:
            break
    return out


def choose(interpreters: list[Interpreter], python: str | None = None) -> Interpreter | None:
    """The interpreter a kernelspec uses: the one at path or version ``python`` when given;
    else the newest with ipykernel; else the newest. Called by ``kernelspec add``."""
    pool = interpreters
    if python:
        pool = [
            i
            for i in interpreters
            if python in (i.executable, i.real, i.major_minor, i.version, str(i.major))
            or os.path.basename(i.executable) == python
        ]
    if not pool:
        return None
    with_kernel = [i for i in pool if i.ipykernel]
    return max(with_kernel or pool, key=lambda i: (i.major, i.minor))


@dataclass(frozen=True)
class ImageFacts:
    """What ``probe_image`` found: the interpreters and the image's own Env, WorkingDir and
    User (from its config)."""

    ref: str
    interpreters: tuple[Interpreter, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str
    user: str


def probe_command() -> tuple[str, ...]:
    """The probe's argv: the shell loop over candidates (the image's ``/bin/sh``)."""
    return ("/bin/sh", "-c", _SHELL)


def probe_image(image: Image) -> ImageFacts:
    """Run the probe over ``image``'s layers in a sandbox and parse its report. ImageError
    naming the image when the sandbox cannot run the probe at all (no ``/bin/sh``: a shell
    is how the candidates are found). Called by ``kernelspec add``."""
    ns = userns.for_caller()
    rootless = ns.mode != "root"
    uid, gid = (os.geteuid(), os.getegid()) if rootless else (65534, 65534)
    env = dict(image.config.env)
    env.update(
        {
            "SK_CODE": PROBE_CODE,
            "SK_NAMES": " ".join(CANDIDATE_NAMES),
            "SK_DIRS": " ".join(CANDIDATE_DIRS),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    spec = ns.apply(
        ContainerSpec(
            id=new_container_id(),
            layers=image.lowerdirs(),
            command=probe_command(),
            env=tuple(env.items()),
            user=uid,
            group=gid,
            hostname="probe",
            writable_size=16 * 1024**2,
            tmp_size=16 * 1024**2,
            limits=PROBE_LIMITS,
            image=image.ref,
            image_digest=image.digest,
        )
    )
    with tempfile.TemporaryFile() as out, Container.create(spec) as container:
        container.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
        try:
            result = container.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            container.kill()
            raise ImageError(
                f"image {image.ref!r}: probing its Python interpreters took over "
                f"{TIMEOUT:.0f} s; check the image starts python quickly"
            ) from None
        out.seek(0)
        data = out.read(MAX_OUTPUT)
    if result.status == 127 and not data:
        raise ImageError(
            f"image {image.ref!r} has no /bin/sh to look for Python with; use an image "
            "with a shell, or write the kernelspec by hand (sandbox-kernel kernelspec install "
            "--image)"
        )
    return ImageFacts(
        ref=image.ref,
        interpreters=tuple(parse_report(data)),
        env=image.config.env,
        working_dir=image.config.working_dir,
        user=image.config.user,
    )
