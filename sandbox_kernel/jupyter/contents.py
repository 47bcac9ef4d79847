"""The Jupyter server's files, guarded against what sandbox kernels leave in their folders.

Layer: Jupyter (imported only inside a jupyter_server process, by ``jupyter.serverext``).

A sandbox kernel writes its notebook folder, and everything it writes is hostile: a link
``out.txt -> /etc/shadow`` or ``victim.ipynb -> /some/host/file``, a folder link
``sub -> /root``, a FIFO named like a notebook. jupyter_server's file contents manager opens
paths by name: a server running as root would serve ``/etc/shadow`` through the contents API
and the ``/files/`` handler, and a save would overwrite the host file through the link. The
guarded managers here keep jupyter_server's behaviour for regular files and folders and do
every file operation through ``sandbox_kernel.beneath`` (an fd walk that never follows a
link):

* reading (contents API, ``/files/``, nbconvert, downloads): links and special files are
  refused with a 403 that names the file and says why; a FIFO never blocks the server;
* writing (save, chunked upload, checkpoints, restore): in place through a descriptor of the
  regular file, or a new file created without following anything; never through a link;
* listing: a link is listed as an entry of its own (so a user can see and delete it), never
  as what it points to; folders are listed through their descriptor;
* delete, rename, new folder, folder copy: on names relative to the pinned parent folder;
  deleting a link removes the link. ``delete_to_trash`` is off by default (the trash is
  moved by path, through folders a kernel can rewrite);
* checkpoints live in the notebook's own folder (``.ipynb_checkpoints``, which must be a real
  folder) or, when that folder is not writable, in a private folder of the server's.

``guard(cls)`` gives the guarded variant of any file-based contents manager class (the
server extension swaps the configured class for it before the server creates it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import typing as t
from collections.abc import Iterator
from datetime import datetime, timezone

import nbformat
from anyio.to_thread import run_sync
from jupyter_core.paths import is_file_hidden, is_hidden, jupyter_runtime_dir
from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.filecheckpoints import (
    AsyncFileCheckpoints,
    FileCheckpoints,
)
from jupyter_server.services.contents.fileio import path_to_intermediate, path_to_invalid
from jupyter_server.services.contents.filemanager import (
    AsyncFileContentsManager,
    FileContentsManager,
)
from jupyter_server.services.contents.largefilemanager import (
    AsyncLargeFileManager,
    LargeFileManager,
)
from tornado.web import HTTPError
from traitlets import default

from .. import beneath
from ..runtime.rundir import remove_tree

#: The private folder for checkpoints of notebooks in folders the server cannot write.
CHECKPOINT_FALLBACK = "sandbox-kernel-checkpoints"


def refusal(err: beneath.Refused) -> HTTPError:
    """The 403 a user sees for a path the guarded server will not use (JupyterLab shows the
    message in its dialog)."""
    if err.what == "a symbolic link":
        why = (
            "the server does not follow links in folders that sandbox kernels can write (a "
            "kernel may have made it to reach a host file); delete the link, or put a copy "
            "of the file itself in the folder"
        )
    elif err.what in ("a FIFO", "a socket", "a device"):
        why = "the server opens only regular files and folders here; delete it"
    elif err.what == "a file with other hard links":
        why = "the server writes only files with a single name here; save under a new name"
    else:
        why = "use a path of plain names inside the server's folder"
    return HTTPError(403, f"{err}: {why}")


class _Guard:
    """What the guarded contents manager and checkpoints share: where a path's root is, the
    translation of refusals, reading and writing through descriptors. Mixed in before
    jupyter_server's classes (it calls their ``_get_os_path``)."""

    # jupyter_server's, through the classes this is mixed into
    root_dir: str
    use_atomic_writing: bool
    allow_hidden: bool
    delete_to_trash: bool
    always_delete_dir: bool
    log: t.Any
    checkpoints: t.Any
    perm_to_403: t.Callable[..., t.ContextManager[None]]
    should_list: t.Callable[[str], bool]
    is_writable: t.Callable[[str], bool]

    def _private_root(self) -> str:
        """The server's own folder for checkpoints it cannot keep beside the notebook."""
        return os.path.join(jupyter_runtime_dir(), CHECKPOINT_FALLBACK)

    def _root_for(self, os_path: str) -> str:
        """The folder ``os_path`` is beneath: the server's root or its private folder."""
        root = os.path.abspath(self.root_dir)
        if os.path.abspath(os_path).startswith(self._private_root() + os.sep):
            return self._private_root()
        return root

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """Refusals become the 403 with the reason."""
        try:
            yield
        except beneath.Refused as e:
            raise refusal(e) from None

    def _get_os_path(self, path: str) -> str:
        """jupyter_server's checks (inside the root, a valid name), then every folder on the
        way must be a real folder, not a link. Called by every operation on an API path."""
        os_path: str = super()._get_os_path(path)  # type: ignore[misc]
        with self._guarded():
            beneath.check_folders(self._root_for(os_path), os_path)
        return os_path

    @contextlib.contextmanager
    def open(self, os_path: str, *args: t.Any, **kwargs: t.Any) -> Iterator[t.IO[t.Any]]:
        """Read a regular file (jupyter_server reads through this); refuses links, FIFOs,
        sockets and devices without blocking. Writing goes through ``atomic_writing``."""
        mode = args[0] if args else kwargs.pop("mode", "r")
        if any(c in mode for c in "wax+"):
            raise ValueError("the guarded open reads only; writes go through atomic_writing")
        root = self._root_for(os_path)
        with self.perm_to_403(os_path), self._guarded():
            try:
                fd = beneath.open_file(root, os_path)
            except (FileNotFoundError, NotADirectoryError):
                # a folder on the way went away (or became a file) after the checks
                raise HTTPError(404, f"file does not exist: {_api(root, os_path)!r}") from None
        with os.fdopen(fd, mode, *args[1:], **kwargs) as f:
            yield f

    @contextlib.contextmanager
    def atomic_writing(
        self, os_path: str, text: bool = True, encoding: str = "utf-8", **kwargs: t.Any
    ) -> Iterator[t.IO[t.Any]]:
        """Write ``os_path`` in place through a descriptor of the regular file (owner and mode
        kept, as jupyter_server's own writer keeps them), a new file when there is none;
        with ``use_atomic_writing`` the old content is kept in ``.~NAME`` until the write
        succeeded and put back when it fails. Called by every save, upload and checkpoint."""
        kwargs.pop("log", None)
        root = self._root_for(os_path)
        with self.perm_to_403(os_path), self._guarded():
            fd = beneath.open_file(root, os_path, os.O_RDWR | os.O_CREAT)
        try:
            if os.fstat(fd).st_nlink > 1:
                raise refusal(beneath.Refused(_api(root, os_path), "a file with other hard links"))
            backup = self._backup(root, os_path, fd) if self.use_atomic_writing else None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        if text:
            kwargs.setdefault("newline", "\n")
            f = os.fdopen(fd, "w", encoding=encoding, **kwargs)
        else:
            f = os.fdopen(fd, "wb", **kwargs)
        with f:
            try:
                yield f
            except BaseException:
                if backup is not None:
                    f.flush()
                    _restore(fd, root, backup)
                raise
            f.flush()
            os.fsync(fd)
        if backup is not None:
            with contextlib.suppress(OSError), beneath.parent(root, backup) as (dfd, name):
                os.unlink(name, dir_fd=dfd)

    def _backup(self, root: str, os_path: str, fd: int) -> str | None:
        """Copy the file open at ``fd`` to ``.~NAME`` beside it (a new file; whatever had that
        name is replaced, not followed); None when there is nothing to keep or no room."""
        if os.fstat(fd).st_size == 0:
            return None
        tmp = path_to_intermediate(os_path)  # type: ignore[no-untyped-call]
        try:
            with beneath.parent(root, tmp) as (dfd, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
                out = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dfd,
                )
            with os.fdopen(out, "wb") as dst, os.fdopen(os.dup(fd), "rb") as src:
                src.seek(0)
                shutil.copyfileobj(src, dst)
        except OSError as e:
            self.log.warning("no backup of %s before writing it: %s", os_path, e)
            return None
        return str(tmp)

    def _copy_guarded(self, src: str, dest: str) -> None:
        """Copy the regular file ``src`` over ``dest`` (checkpoints: create and restore)."""
        with self.perm_to_403(src), self._guarded():
            fd = beneath.open_file(self._root_for(src), src)
        with os.fdopen(fd, "rb") as fin, self.atomic_writing(dest, text=False) as fout:
            shutil.copyfileobj(fin, fout)


def _restore(fd: int, root: str, backup: str) -> None:
    """Put the content kept in ``backup`` back into the file open at ``fd`` (a failed write);
    the backup is read like any file of the folder (never through a link)."""
    try:
        bfd = beneath.open_file(root, backup)
    except OSError:
        return
    with os.fdopen(bfd, "rb") as src:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := src.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]


def _utc(when: float) -> datetime:
    """A file time as jupyter_server shows it (the epoch for a time it cannot represent)."""
    try:
        return datetime.fromtimestamp(when, tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return datetime(1970, 1, 1, tzinfo=timezone.utc)


def _api(root: str, os_path: str) -> str:
    """The path a user sees (relative to the server's root)."""
    return os.path.relpath(os_path, root)


class _GuardFiles(_Guard):
    """The contents manager's side: models, listing, save, delete, rename, copy."""

    @default("delete_to_trash")
    def _delete_to_trash_default(self) -> bool:
        # off unless the admin sets it: the trash is moved by path, through folders a
        # sandbox kernel can rewrite (README: "Files a kernel writes")
        return False

    @default("files_handler_class")
    def _files_handler_class_default(self) -> type:
        return FilesHandler  # /files/ through this manager's get, not tornado's by-path reads

    @default("files_handler_params")
    def _files_handler_params_default(self) -> dict[str, t.Any]:
        # tornado's StaticFileHandler.initialize wants a path; FilesHandler's own get never
        # reads by it (it asks this manager)
        return {"path": self.root_dir}

    def _kind(self, path: str) -> tuple[str, str | None]:
        """(os path, what it is: beneath.kind_of's words or None) of an API path."""
        os_path = self._get_os_path(path)
        with self._guarded():
            return os_path, beneath.kind(self._root_for(os_path), os_path)

    def _entry_model(self, path: str, content: bool) -> dict[str, t.Any] | None:
        """The model of a link or special file (listed as itself, never read), or None for a
        regular file, folder or missing path (jupyter_server's own code answers those)."""
        _, what = self._kind(path)
        if what in (None, "a regular file", "a folder"):
            return None
        if content:
            raise refusal(beneath.Refused(path, what))
        model = self._base_model(path)
        model.update(type="file", writable=False)
        return model

    def _base_model(self, path: str) -> dict[str, t.Any]:
        """jupyter_server's base model (name, times, size, writable), from an ``lstat``
        reached without following a link (a folder swapped meanwhile: 403 or 404, never the
        metadata of a host file). Called for every model the manager builds."""
        os_path = self._get_os_path(path)
        try:
            with self._guarded():
                info = beneath.lstat(self._root_for(os_path), os_path)
        except FileNotFoundError:
            raise HTTPError(404, f"file or directory does not exist: {path!r}") from None
        if not self.allow_hidden and is_hidden(os_path, self.root_dir):
            raise HTTPError(404, f"file or directory does not exist: {path!r}")
        return {
            "name": path.rsplit("/", 1)[-1],
            "path": path,
            "last_modified": _utc(info.st_mtime),
            "created": _utc(info.st_ctime),
            "content": None,
            "format": None,
            "mimetype": None,
            "size": info.st_size,
            "writable": self.is_writable(path),
            "hash": None,
            "hash_algorithm": None,
        }

    def _listing(self, path: str) -> tuple[str, list[str]]:
        """(os path, names to list) of the folder at API path ``path``, read through its
        descriptor; hidden and unlisted names left out as jupyter_server leaves them."""
        os_path, what = self._kind(path)
        if what != "a folder":
            raise HTTPError(404, f"directory does not exist: {path!r}")
        if not self.allow_hidden and is_hidden(os_path, self.root_dir):
            raise HTTPError(404, f"directory does not exist: {path!r}")
        root = self._root_for(os_path)
        with self._guarded():
            names = beneath.list_folder(root, os_path)
        shown = []
        for name in names:
            try:
                st = beneath.lstat(root, os.path.join(os_path, name))
            except (OSError, UnicodeError):
                continue
            if not (
                stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            ):
                continue
            if self.should_list(name) and (
                self.allow_hidden or not is_file_hidden(os.path.join(os_path, name), stat_res=st)
            ):
                shown.append(name)
        return os_path, shown

    def _dir_base(self, path: str) -> dict[str, t.Any]:
        model = self._base_model(path)
        model["type"] = "directory"
        model["size"] = None
        return model

    def _mkdir(self, os_path: str) -> None:
        """A new folder (``_save_directory``), made relative to its pinned parent."""
        if not self.allow_hidden and is_hidden(os_path, self.root_dir):
            raise HTTPError(400, f"Cannot create hidden directory {_api(self.root_dir, os_path)!r}")
        root = self._root_for(os_path)
        with self.perm_to_403(os_path), self._guarded():
            what = beneath.kind(root, os_path)
            if what == "a folder":
                return
            if what is not None:
                raise HTTPError(400, f"Not a directory: {_api(root, os_path)}")
            with beneath.parent(root, os_path) as (dfd, name):
                os.mkdir(name, 0o777, dir_fd=dfd)

    def _delete(self, path: str) -> bool:
        """Delete ``path`` (a link is removed itself); False when jupyter_server's trash
        should do it (``delete_to_trash`` set by the admin)."""
        path = path.strip("/")
        os_path, what = self._kind(path)
        if not self.allow_hidden and is_hidden(os_path, self.root_dir):
            raise HTTPError(400, f"Cannot delete file or directory {path!r}")
        if what is None:
            raise HTTPError(404, f"File or directory does not exist: {path}")
        if self.delete_to_trash and what in ("a regular file", "a folder"):
            return False
        root = self._root_for(os_path)
        with (
            self.perm_to_403(os_path),
            self._guarded(),
            beneath.parent(root, os_path) as (dfd, name),
        ):
            if what == "a folder":
                cp_dir = getattr(self.checkpoints, "checkpoint_dir", None)
                inside = set(beneath.list_folder(root, os_path)) - {cp_dir}
                if inside and not self.always_delete_dir:
                    raise HTTPError(400, f"Directory {path} not empty")
                remove_tree(dfd, name)
            else:
                os.unlink(name, dir_fd=dfd)
        return True

    def _rename(self, old_path: str, new_path: str) -> None:
        """Rename on names relative to both pinned parents (a link is renamed itself)."""
        old_path, new_path = old_path.strip("/"), new_path.strip("/")
        if old_path == new_path:
            return
        old_os, new_os = self._get_os_path(old_path), self._get_os_path(new_path)
        if not self.allow_hidden and (
            is_hidden(old_os, self.root_dir) or is_hidden(new_os, self.root_dir)
        ):
            raise HTTPError(400, f"Cannot rename file or directory {old_path!r}")
        root = self._root_for(old_os)
        with self.perm_to_403(old_os), self._guarded():
            if beneath.kind(root, new_os) is not None:
                raise HTTPError(409, f"File already exists: {new_path}")
            try:
                with (
                    beneath.parent(root, old_os) as (ofd, oname),
                    beneath.parent(root, new_os) as (nfd, nname),
                ):
                    os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)
            except FileNotFoundError:
                raise HTTPError(404, f"File or directory does not exist: {old_path}") from None

    def _copy_folder(self, from_path: str, to_path: str) -> None:
        """Copy a folder (regular files and folders only; links and special files left out)."""
        src, dst = self._get_os_path(from_path.strip("/")), self._get_os_path(to_path.strip("/"))
        root = self._root_for(src)
        with self.perm_to_403(dst), self._guarded():
            if beneath.kind(root, src) != "a folder":
                raise HTTPError(404, f"directory does not exist: {from_path!r}")
            with beneath.parent(root, dst) as (dfd, dname):
                os.mkdir(dname, 0o777, dir_fd=dfd)
            sfd = beneath.open_folder(root, src)
            try:
                tfd = beneath.open_folder(root, dst)
                try:
                    beneath.copy_tree(sfd, tfd)
                finally:
                    os.close(tfd)
            finally:
                os.close(sfd)

    def _append_chunk(self, os_path: str, content: str, format: str | None) -> None:
        """A chunk of a large upload (``_save_large_file``), appended through a descriptor."""
        data = _decode(os_path, content, format)
        with self.perm_to_403(os_path), self._guarded():
            fd = beneath.open_file(
                self._root_for(os_path), os_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
            )
        with os.fdopen(fd, "ab") as f:
            f.write(data)

    def _restore_intermediate(self, os_path: str) -> bool:
        """After an unreadable notebook: move it to ``NAME.invalid`` and put the ``.~NAME``
        left by an interrupted save in its place (jupyter_server's recovery), on names
        relative to the pinned folder; False when there is no such regular file."""
        if not self.use_atomic_writing:
            return False
        root = self._root_for(os_path)
        tmp = path_to_intermediate(os_path)  # type: ignore[no-untyped-call]
        with self._guarded():
            if beneath.kind(root, tmp) != "a regular file":
                return False
            with beneath.parent(root, os_path) as (dfd, name):
                invalid = os.path.basename(path_to_invalid(os_path))  # type: ignore[no-untyped-call]
                os.replace(name, invalid, src_dir_fd=dfd, dst_dir_fd=dfd)
                os.replace(os.path.basename(tmp), name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True


def _decode(os_path: str, content: str, format: str | None) -> bytes:
    """A chunk's bytes, as jupyter_server's large-file manager decodes them."""
    import base64

    if format not in {"text", "base64"}:
        raise HTTPError(400, "Must specify format of file contents as 'text' or 'base64'")
    try:
        return (
            content.encode("utf8")
            if format == "text"
            else base64.b64decode(content.encode("ascii"))
        )
    except Exception as e:
        raise HTTPError(400, f"Encoding error saving {os.path.basename(os_path)}: {e}") from e


class GuardSync(_GuardFiles):
    """The guarded methods of a synchronous file contents manager (FileContentsManager)."""

    @default("checkpoints_class")
    def _checkpoints_class_default(self) -> type:
        return SandboxFileCheckpoints

    def get(
        self,
        path: str,
        content: bool = True,
        type: str | None = None,
        format: str | None = None,
        require_hash: bool = False,
    ) -> dict[str, t.Any]:
        """A model; a link or special file is listed as itself and never read."""
        model = self._entry_model(path.strip("/"), content)
        if model is not None:
            return model
        out: dict[str, t.Any] = super().get(path, content, type, format, require_hash)  # type: ignore[misc]
        return out

    def get_kernel_path(self, path: str, model: t.Any = None) -> t.Any:
        """The folder a kernel for ``path`` starts in; its folders checked like any path."""
        self._get_os_path(path.strip("/"))
        return super().get_kernel_path(path, model)  # type: ignore[misc]

    def _dir_model(self, path: str, content: bool = True) -> dict[str, t.Any]:
        _, names = self._listing(path)
        model = self._dir_base(path)
        if content:
            model["content"] = [self.get(f"{path}/{n}", content=False) for n in names]
            model["format"] = "json"
        return model

    def _read_notebook(
        self,
        os_path: str,
        as_version: int = 4,
        capture_validation_error: t.Any = None,
        raw: bool = False,
    ) -> t.Any:
        """Read and parse a notebook (through the guarded open); an unreadable one is
        recovered from the ``.~NAME`` an interrupted save left, on pinned names."""
        for attempt in (0, 1):
            answer = self._read_file(os_path, "text", raw=raw)  # type: ignore[attr-defined]
            try:
                nb = nbformat.reads(  # type: ignore[no-untyped-call]
                    answer[0],
                    as_version=as_version,
                    capture_validation_error=capture_validation_error,
                )
            except Exception as e:
                if attempt or not self._restore_intermediate(os_path):
                    raise HTTPError(400, f"Unreadable Notebook: {os_path} {e!r}") from None
                continue
            return (nb, answer[2]) if raw else nb
        raise AssertionError("unreachable")

    def _copy(self, src: str, dest: str) -> None:
        self._copy_guarded(src, dest)

    def _save_directory(self, os_path: str, model: t.Any, path: str = "") -> None:
        self._mkdir(os_path)

    def _save_large_file(self, os_path: str, content: str, format: str | None) -> None:
        self._append_chunk(os_path, content, format)

    def delete_file(self, path: str) -> None:
        """Delete a file, folder or link (never what a link points to)."""
        if not self._delete(path):
            super().delete_file(path)  # type: ignore[misc]

    def rename_file(self, old_path: str, new_path: str) -> None:
        """Rename a file, folder or link."""
        self._rename(old_path, new_path)

    def _copy_dir(
        self, from_path: str, to_path_original: str, to_name: str, to_path: str
    ) -> dict[str, t.Any]:
        self._copy_folder(from_path, to_path)
        out: dict[str, t.Any] = self.get(to_path, content=False)
        return out


class GuardAsync(_GuardFiles):
    """The guarded methods of an asynchronous file contents manager (the server's default)."""

    @default("checkpoints_class")
    def _checkpoints_class_default(self) -> type:
        return AsyncSandboxFileCheckpoints

    async def get(
        self,
        path: str,
        content: bool = True,
        type: str | None = None,
        format: str | None = None,
        require_hash: bool = False,
    ) -> dict[str, t.Any]:
        """A model; a link or special file is listed as itself and never read."""
        model = await run_sync(self._entry_model, path.strip("/"), content)
        if model is not None:
            return model
        out: dict[str, t.Any] = await super().get(path, content, type, format, require_hash)  # type: ignore[misc]
        return out

    async def _dir_model(self, path: str, content: bool = True) -> dict[str, t.Any]:
        _, names = await run_sync(self._listing, path)
        model = self._dir_base(path)
        if content:
            model["content"] = [await self.get(f"{path}/{n}", content=False) for n in names]
            model["format"] = "json"
        return model

    async def _read_notebook(
        self,
        os_path: str,
        as_version: int = 4,
        capture_validation_error: t.Any = None,
        raw: bool = False,
    ) -> t.Any:
        """Read and parse a notebook (through the guarded open); an unreadable one is
        recovered from the ``.~NAME`` an interrupted save left, on pinned names."""
        for attempt in (0, 1):
            answer = await self._read_file(os_path, "text", raw)  # type: ignore[attr-defined]
            try:
                nb = await run_sync(
                    lambda text: nbformat.reads(  # type: ignore[no-untyped-call]
                        text,
                        as_version=as_version,
                        capture_validation_error=capture_validation_error,
                    ),
                    answer[0],
                )
            except Exception as e:
                if attempt or not await run_sync(self._restore_intermediate, os_path):
                    raise HTTPError(400, f"Unreadable Notebook: {os_path} {e!r}") from None
                continue
            return (nb, answer[2]) if raw else nb
        raise AssertionError("unreachable")

    async def _copy(self, src: str, dest: str) -> None:
        await run_sync(self._copy_guarded, src, dest)

    async def _save_directory(self, os_path: str, model: t.Any, path: str = "") -> None:
        await run_sync(self._mkdir, os_path)

    async def _save_large_file(self, os_path: str, content: str, format: str | None) -> None:
        await run_sync(self._append_chunk, os_path, content, format)

    async def delete_file(self, path: str) -> None:
        """Delete a file, folder or link (never what a link points to)."""
        if not await run_sync(self._delete, path):
            await super().delete_file(path)  # type: ignore[misc]

    async def rename_file(self, old_path: str, new_path: str) -> None:
        """Rename a file, folder or link."""
        await run_sync(self._rename, old_path, new_path)

    async def _copy_dir(
        self, from_path: str, to_path_original: str, to_name: str, to_path: str
    ) -> dict[str, t.Any]:
        await run_sync(self._copy_folder, from_path, to_path)
        out: dict[str, t.Any] = await self.get(to_path, content=False)
        return out

    async def get_kernel_path(self, path: str, model: t.Any = None) -> t.Any:
        """The folder a kernel for ``path`` starts in; its folders checked like any path."""
        self._get_os_path(path.strip("/"))
        return await super().get_kernel_path(path, model)  # type: ignore[misc]


class _GuardCheckpoints(_Guard):
    """Checkpoints beside the notebook in ``.ipynb_checkpoints`` (a real folder, made
    without following a link), read and written through descriptors."""

    checkpoint_dir: str

    def checkpoint_path(self, checkpoint_id: str, path: str) -> str:
        """Where the checkpoint of API path ``path`` lives (its folder made if missing)."""
        path = path.strip("/")
        parent, name = ("/" + path).rsplit("/", 1)
        parent = parent.strip("/")
        base, ext = os.path.splitext(name)
        filename = f"{base}-{checkpoint_id}{ext}"
        folder = self._get_os_path(parent) if parent else os.path.abspath(self.root_dir)
        root = os.path.abspath(self.root_dir)
        if not os.access(folder, os.W_OK):
            root = self._private_root()
            os.makedirs(root, mode=0o700, exist_ok=True)
            folder = os.path.join(root, parent) if parent else root
        cp_dir = os.path.join(folder, self.checkpoint_dir)
        with self.perm_to_403(cp_dir), self._guarded():
            beneath.make_folders(root, cp_dir)
        return os.path.join(cp_dir, filename)

    def _cp_copy(self, src: str, dest: str) -> None:
        """Copy for ``create_checkpoint`` (into the checkpoint folder: the checkpoint is the
        server's own file, so whatever a kernel put in its place is replaced, never
        followed) and ``restore_checkpoint`` (into the notebook, in place, as a save)."""
        if os.path.basename(os.path.dirname(dest)) != self.checkpoint_dir:
            self._copy_guarded(src, dest)
            return
        with self.perm_to_403(src), self._guarded():
            fd = beneath.open_file(self._root_for(src), src)
        with os.fdopen(fd, "rb") as fin, self.perm_to_403(dest), self._guarded():
            beneath.write_bytes(self._root_for(dest), dest, fin)

    def _cp_kind(self, cp_path: str) -> str | None:
        with self._guarded():
            return beneath.kind(self._root_for(cp_path), cp_path)

    def _cp_model(self, checkpoint_id: str, os_path: str) -> dict[str, t.Any]:
        info = beneath.lstat(self._root_for(os_path), os_path)
        return {
            "id": checkpoint_id,
            "last_modified": datetime.fromtimestamp(info.st_mtime, tz=timezone.utc),
        }

    def _cp_rename(self, checkpoint_id: str, old_path: str, new_path: str) -> None:
        old_cp = self.checkpoint_path(checkpoint_id, old_path)
        new_cp = self.checkpoint_path(checkpoint_id, new_path)
        if self._cp_kind(old_cp) != "a regular file":
            return
        root = self._root_for(old_cp)
        if self._root_for(new_cp) != root:
            self._copy_guarded(old_cp, new_cp)
            self._cp_unlink(old_cp)
            return
        with (
            self.perm_to_403(old_cp),
            self._guarded(),
            beneath.parent(root, old_cp) as (ofd, on),
            beneath.parent(root, new_cp) as (nfd, nn),
        ):
            os.replace(on, nn, src_dir_fd=ofd, dst_dir_fd=nfd)

    def _cp_unlink(self, cp_path: str) -> None:
        with (
            self.perm_to_403(cp_path),
            self._guarded(),
            beneath.parent(self._root_for(cp_path), cp_path) as (dfd, name),
        ):
            os.unlink(name, dir_fd=dfd)

    def _cp_delete(self, checkpoint_id: str, path: str) -> None:
        cp = self.checkpoint_path(checkpoint_id, path.strip("/"))
        if self._cp_kind(cp) != "a regular file":
            self.no_such_checkpoint(path, checkpoint_id)  # type: ignore[attr-defined]
        self._cp_unlink(cp)

    def _cp_list(self, path: str) -> list[dict[str, t.Any]]:
        cp = self.checkpoint_path("checkpoint", path.strip("/"))
        if self._cp_kind(cp) != "a regular file":
            return []
        return [self._cp_model("checkpoint", cp)]


class SandboxFileCheckpoints(_GuardCheckpoints, FileCheckpoints):  # type: ignore[misc]
    """jupyter_server's file checkpoints, guarded (synchronous managers)."""

    def _copy(self, src: str, dest: str) -> None:
        self._cp_copy(src, dest)

    def checkpoint_model(self, checkpoint_id: str, os_path: str) -> dict[str, t.Any]:
        """The checkpoint's id and time (its own, never a link's target's)."""
        return self._cp_model(checkpoint_id, os_path)

    def rename_checkpoint(self, checkpoint_id: str, old_path: str, new_path: str) -> None:
        """Rename a checkpoint along with its notebook."""
        self._cp_rename(checkpoint_id, old_path, new_path)

    def delete_checkpoint(self, checkpoint_id: str, path: str) -> None:
        """Delete a checkpoint (a link in its place is not one)."""
        self._cp_delete(checkpoint_id, path)

    def list_checkpoints(self, path: str) -> list[dict[str, t.Any]]:
        """The one checkpoint of ``path``, if it is a regular file."""
        return self._cp_list(path)


class AsyncSandboxFileCheckpoints(_GuardCheckpoints, AsyncFileCheckpoints):  # type: ignore[misc]
    """jupyter_server's file checkpoints, guarded (asynchronous managers)."""

    async def _copy(self, src: str, dest: str) -> None:
        await run_sync(self._cp_copy, src, dest)

    async def checkpoint_model(self, checkpoint_id: str, os_path: str) -> dict[str, t.Any]:
        """The checkpoint's id and time (its own, never a link's target's)."""
        return await run_sync(self._cp_model, checkpoint_id, os_path)

    async def rename_checkpoint(self, checkpoint_id: str, old_path: str, new_path: str) -> None:
        """Rename a checkpoint along with its notebook."""
        await run_sync(self._cp_rename, checkpoint_id, old_path, new_path)

    async def delete_checkpoint(self, checkpoint_id: str, path: str) -> None:
        """Delete a checkpoint (a link in its place is not one)."""
        await run_sync(self._cp_delete, checkpoint_id, path)

    async def list_checkpoints(self, path: str) -> list[dict[str, t.Any]]:
        """The one checkpoint of ``path``, if it is a regular file."""
        return await run_sync(self._cp_list, path)


class SandboxContentsManager(GuardSync, LargeFileManager):  # type: ignore[misc]
    """jupyter_server's LargeFileManager, guarded (for servers configured synchronous)."""


class AsyncSandboxContentsManager(GuardAsync, AsyncLargeFileManager):  # type: ignore[misc]
    """jupyter_server's default contents manager (AsyncLargeFileManager), guarded."""


def is_guarded(cls: type) -> bool:
    """Whether contents manager (or checkpoints) class ``cls`` is one of the guarded ones."""
    return issubclass(cls, _Guard)


def guard(cls: type) -> type | None:
    """The guarded variant of file contents manager class ``cls`` (itself when it already
    is one; a subclass with the guard mixed in for subclasses of jupyter_server's file
    managers, so their own settings and overrides stay); None for managers that do not keep
    files on this host (nothing to guard). Called by the server extension at link time."""
    if is_guarded(cls):
        return cls
    if cls is AsyncLargeFileManager:
        return AsyncSandboxContentsManager
    if cls is LargeFileManager:
        return SandboxContentsManager
    if issubclass(cls, AsyncFileContentsManager):
        return type(f"Sandbox{cls.__name__}", (GuardAsync, cls), {"__module__": __name__})
    if issubclass(cls, FileContentsManager):
        return type(f"Sandbox{cls.__name__}", (GuardSync, cls), {"__module__": __name__})
    return None


__all__ = [
    "AsyncSandboxContentsManager",
    "AsyncSandboxFileCheckpoints",
    "SandboxContentsManager",
    "SandboxFileCheckpoints",
    "guard",
    "is_guarded",
    "refusal",
]
