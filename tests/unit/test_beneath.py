"""sandbox_kernel.beneath: paths below a folder a kernel writes, never following what it made.

Each operation is tried against every kind of planted entry (a link to a file outside, a link
to a folder outside, a dangling link, a link at an intermediate folder, a FIFO, a socket) and
the file outside must be neither read nor changed. Nothing here needs root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel import beneath


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the kernel's folder, a secret file outside it) with every planted kind inside."""
    root = tmp_path / "nb"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("host secret\n")
    (root / "plain.txt").write_text("plain\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("inner\n")
    (root / "out.txt").symlink_to(secret)
    (root / "rel.txt").symlink_to("../outside/secret")
    (root / "dangling.txt").symlink_to(outside / "missing")
    (root / "hostdir").symlink_to(outside)
    (root / "sub" / "up").symlink_to("..")
    os.mkfifo(root / "fifo.ipynb")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.ipynb"))
    yield root, secret
    sock.close()


LINKS = ["out.txt", "rel.txt", "dangling.txt", "hostdir"]
SPECIAL = ["fifo.ipynb", "sock.ipynb"]
THROUGH = ["hostdir/secret", "sub/up/out.txt", "sub/up/hostdir/secret"]


def test_names_refuses_what_is_not_a_plain_path(tmp_path: Path) -> None:
    assert beneath.names(str(tmp_path), "a/b") == ["a", "b"]
    assert beneath.names(str(tmp_path), str(tmp_path / "a")) == ["a"]
    assert beneath.names(str(tmp_path), "a/./b//") == ["a", "b"]  # what "." means is safe
    for bad in ["../x", "a/../../x", "a/..", "/etc/passwd", "a\0b"]:
        with pytest.raises(beneath.Refused):
            beneath.names(str(tmp_path), bad)


@pytest.mark.parametrize("name", LINKS + SPECIAL + THROUGH)
def test_reading_refuses_links_and_special_files(tree: tuple[Path, Path], name: str) -> None:
    root, _ = tree
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            beneath.read_bytes(str(root), name)
        except BaseException as e:  # collected for the main thread
            errors.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), f"reading {name} blocked"  # a FIFO must never block the reader
    assert errors and isinstance(errors[0], (beneath.Refused, FileNotFoundError)), errors


def test_refusal_says_what_the_entry_is(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with pytest.raises(beneath.Refused) as e:
        beneath.read_bytes(str(root), "out.txt")
    assert e.value.what == "a symbolic link" and "out.txt" in str(e.value)
    with pytest.raises(beneath.Refused) as e:
        beneath.read_bytes(str(root), "fifo.ipynb")
    assert e.value.what == "a FIFO"
    with pytest.raises(beneath.Refused) as e:
        beneath.read_bytes(str(root), "hostdir/secret")
    assert e.value.what == "a symbolic link" and e.value.rel == "hostdir"


@pytest.mark.parametrize("name", LINKS + THROUGH)
def test_opening_for_write_never_changes_the_target(tree: tuple[Path, Path], name: str) -> None:
    root, secret = tree
    with pytest.raises((beneath.Refused, FileNotFoundError)):
        fd = beneath.open_file(str(root), name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.close(fd)
    assert secret.read_text() == "host secret\n"
    assert not (secret.parent / "missing").exists()


@pytest.mark.parametrize("name", LINKS + SPECIAL)
def test_write_bytes_replaces_the_entry_itself(tree: tuple[Path, Path], name: str) -> None:
    root, secret = tree
    beneath.write_bytes(str(root), name, b"new\n")
    assert stat.S_ISREG(os.lstat(root / name).st_mode)
    assert (root / name).read_bytes() == b"new\n"
    assert secret.read_text() == "host secret\n"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


@pytest.mark.parametrize("name", THROUGH)
def test_write_bytes_refuses_a_linked_folder(tree: tuple[Path, Path], name: str) -> None:
    root, secret = tree
    with pytest.raises(beneath.Refused):
        beneath.write_bytes(str(root), name, b"new\n")
    assert secret.read_text() == "host secret\n"


def test_regular_files_and_folders_work(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert beneath.read_bytes(str(root), "sub/inner.txt") == b"inner\n"
    assert beneath.read_bytes(str(root), str(root / "plain.txt")) == b"plain\n"
    assert beneath.kind(str(root), "sub") == "a folder"
    assert beneath.kind(str(root), "out.txt") == "a symbolic link"
    assert beneath.kind(str(root), "sock.ipynb") == "a socket"
    assert beneath.kind(str(root), "nothing") is None
    assert sorted(beneath.list_folder(str(root), "sub")) == ["inner.txt", "up"]
    with pytest.raises(beneath.Refused):
        beneath.list_folder(str(root), "hostdir")
    with pytest.raises(OSError) as e:
        beneath.read_bytes(str(root), "plain.txt", limit=3)
    assert e.value.errno == errno.EFBIG


def test_a_folder_swapped_for_a_link_after_it_was_pinned_changes_nothing(
    tree: tuple[Path, Path],
) -> None:
    """The TOCTOU race: the folder is pinned by descriptor, so swapping it for a link to the
    outside between the walk and the open still writes into the real (moved) folder."""
    root, secret = tree
    with beneath.parent(str(root), "sub/new.txt") as (dfd, name):
        os.rename(root / "sub", root / "sub.moved")
        (root / "sub").symlink_to(secret.parent)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        os.close(fd)
    assert (root / "sub.moved" / "new.txt").exists()
    assert not (secret.parent / "new.txt").exists()


def test_copy_tree_copies_files_and_folders_only(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, secret = tree
    dest = tmp_path / "copy"
    dest.mkdir()
    src_fd = beneath.open_folder(str(root), str(root))
    dst_fd = os.open(dest, os.O_PATH | os.O_DIRECTORY)
    try:
        beneath.copy_tree(src_fd, dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert sorted(os.listdir(dest)) == ["plain.txt", "sub"]
    assert sorted(os.listdir(dest / "sub")) == ["inner.txt"]
    assert (dest / "sub" / "inner.txt").read_text() == "inner\n"
    assert secret.read_text() == "host secret\n"


def test_copy_tree_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    deep = src
    for i in range(5):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(beneath, "COPY_MAX_DEPTH", 2)
    with contextlib.ExitStack() as stack:
        s = os.open(src, os.O_PATH | os.O_DIRECTORY)
        stack.callback(os.close, s)
        d = os.open(dest, os.O_PATH | os.O_DIRECTORY)
        stack.callback(os.close, d)
        with pytest.raises(OSError) as e:
            beneath.copy_tree(s, d)
    assert e.value.errno == errno.ELOOP


def test_make_folders_never_follows(tree: tuple[Path, Path]) -> None:
    root, secret = tree
    beneath.make_folders(str(root), "sub/a/b")
    assert (root / "sub" / "a" / "b").is_dir()
    beneath.make_folders(str(root), "sub/a/b")  # already there: fine
    for bad in ["hostdir/x", "sub/up/x", "out.txt/x", "fifo.ipynb/x"]:
        with pytest.raises(beneath.Refused):
            beneath.make_folders(str(root), bad)
    assert sorted(os.listdir(secret.parent)) == ["secret"]
