"""The system image store as built on this host: nothing in it gains privileges when a host
user runs it, and its private parts are its owner's.

Every host user can read and execute the snapshots (rootless kernels use them as lower
layers), so no file in them may carry a setuid or setgid bit or a file capability
(``security.capability``), and the store's work folders (``tmp/``, ``cache/``,
``build-tmp/``) must be closed to others. Scans the snapshots of the shipped images (the
python3 one at least) without following a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox_kernel.images import lookup
from sandbox_kernel.images.extract import CAPABILITY_XATTR
from sandbox_kernel.images.store import PRIVATE_PARTS
from sandbox_kernel.jupyter.demo import IMAGES
from sandbox_kernel.paths import system_state_dir
from tests.privileged.conftest import images  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.privileged, pytest.mark.images]


def scan(snapshot: Path) -> tuple[int, list[str]]:
    """(regular files seen, what is wrong) in ``snapshot``, never following a link."""
    seen, wrong = 0, []
    for dirpath, dirnames, filenames in os.walk(snapshot, followlinks=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_ISREG(st.st_mode):
                seen += 1
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    wrong.append(f"{p}: mode {oct(stat.S_IMODE(st.st_mode))}")
            if CAPABILITY_XATTR in os.listxattr(p, follow_symlinks=False):
                wrong.append(f"{p}: {CAPABILITY_XATTR}")
    return seen, wrong


@pytest.mark.root_only  # an ordinary user cannot enter an image's 0700 folders (/root)
def test_no_snapshot_file_gains_privileges(images: None) -> None:  # noqa: F811
    checked = []
    for name in IMAGES:
        image = lookup.find(name)
        for snapshot in image.lowerdirs():
            seen, wrong = scan(Path(snapshot))
            assert wrong == [], f"{name}: {wrong[:20]}"
            checked.append((name, seen))
    assert "python3" in {n for n, _ in checked}
    # the base system's layer holds thousands of files (su, passwd, ... among them)
    assert max(seen for _, seen in checked) > 1000, checked


def test_the_stores_private_parts_are_closed_to_others(images: None) -> None:  # noqa: F811
    root = system_state_dir()
    for part in PRIVATE_PARTS:
        p = root / part
        if not p.exists():
            assert part == "build-tmp", f"{p} missing"  # made by the first build
            continue
        st = p.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0, p
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{p}: {oct(stat.S_IMODE(st.st_mode))}"
