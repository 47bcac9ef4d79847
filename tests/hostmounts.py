"""The host's mount table as the tests compare it: before and after a test, to show that
nothing the test made stays mounted on the host.

Called by the ``host_untouched`` fixture of the runtime tests and by the escape tests. Other
suites running at the same time mount on the host inside their own directories (image builds
in the build cache, overlay tests in their pytest temp dirs); those come and go on their own
and are left out. Mounts anywhere else, including this session's own temp dir, count.
"""

from __future__ import annotations

import re

#: where other runs of the product mount on the host while they work: a build's base step
#: (its chroot's /proc, /sys and /dev) lies in the build cache's scratch dirs
CONCURRENT_MOUNTS = ("/var/lib/sandbox-kernel/build-tmp/",)
_PYTEST_DIR = re.compile(r"^/tmp/pytest-of-[^/]+/pytest-[0-9]+/")
#: this session's pytest basetemp (set by the session fixture in tests/conftest.py)
OWN_BASETEMP: list[str] = []


def _foreign(mountpoint: str) -> bool:
    if mountpoint.startswith(CONCURRENT_MOUNTS):
        return True
    m = _PYTEST_DIR.match(mountpoint)
    return bool(m) and not any(mountpoint.startswith(own) for own in OWN_BASETEMP)


def host_mounts() -> list[str]:
    """The (root, mount point) of each mount this process sees, other runs' own left out."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split()[3:5] for line in f]
    return sorted(" ".join(r) for r in rows if not _foreign(r[1]))
