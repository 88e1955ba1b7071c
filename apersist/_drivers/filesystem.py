"""The local filesystem driver.

Each verb is one thread hop: open + write + fsync + publish + directory fsync happen in a
single worker-thread call, because each awaited hop costs ~80 µs while the whole atomic
publish of a small object costs ~0.5 ms (both measured on the development VM). Objects are
written to a temporary name in the target directory, fsynced, then published with
``os.replace`` (overwrite) or ``os.link`` (create-if-absent: the link fails if the name
exists, which makes exactly one racing creator win), and the directory is fsynced so the
name survives a crash.

A commit (``put_then_create``: the segments, then the commit record) is one hop too. Its
fsyncs are still made one after another: on this VM's disk concurrent fsyncs do not
overlap, and the extra hops cost more than they saved (``docs/backends.md``).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from .._concurrency import brisk_thread_switching
from .._errors import BackendError
from .base import (
    Capabilities,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    check_key,
    check_range,
    closed_error,
)

__all__ = ["FilesystemDriver"]

_T = TypeVar("_T")
_TMP_PREFIX = ".tmp-"
# More threads never helped on 2 cores: directory contention makes small-file creation slower.
_THREADS = 4


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    """Remove a temporary file. A failure to do so must not hide the error being handled
    (or turn a durable create into a reported failure): a leftover temporary file is never
    listed or read, only wasted space."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def _raise_unless_absent(exc: OSError) -> None:
    """``os.walk`` error handler: a directory that is absent holds no objects; anything
    else (permission denied, an I/O error) fails the listing.

    ``os.walk`` ignores every error by default, which made a root the process may not read
    list as empty: a read-only run then replayed nothing, silently.
    """
    if not isinstance(exc, FileNotFoundError | NotADirectoryError):
        raise exc


def _check_temporary(path: str) -> str:
    """Refuse a path that is not a temporary file's: ``<a key's folder>/.tmp-<name>``."""
    folder, _, name = path.rpartition("/")
    valid = name.startswith(_TMP_PREFIX) and len(name) > len(_TMP_PREFIX)
    if valid and folder:
        try:
            check_key(folder)
        except ValueError:
            valid = False
    if not valid:
        raise ValueError(f"not a temporary file's path: path={path!r}")
    return path


class FilesystemDriver:
    """Objects as files under ``root``; keys map to relative paths."""

    name = "filesystem"
    # put_then_create() writes a bytearray through a memoryview, as it is: segments for it
    # are built in place, with no copy that holds the GIL (Store.accepts_buffers).
    capabilities = Capabilities(put_then_create=True, accepts_buffers=True, point_lookups=True,
                                temporary_files=True)

    def __init__(self, root: Path) -> None:
        self._root = root
        self._limiter = anyio.CapacityLimiter(_THREADS)
        self._known_dirs: set[Path] = set()
        self._root_is_dir = False  # seen to be a directory (see _check_root_then)
        self._closed = False

    async def _call(self, what: str, key: str | Callable[[], str], fn: Callable[[], _T], *,
                    label: str = "key") -> _T:
        """Run ``fn`` in a worker thread; the one place where an ``OSError`` becomes a
        ``BackendError`` (disk full, permission denied, read-only filesystem, ...).

        ``key`` may be a function that names the key of the step that failed. Every verb
        comes through here once its arguments are checked, so the closed check is here too.
        """
        if self._closed:
            raise closed_error(self.name, f"root={self._root}")
        if not self._root_is_dir:
            fn = functools.partial(self._check_root_then, fn)
        try:
            with brisk_thread_switching():
                return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        except (ObjectExistsError, ObjectNotFoundError, ValueError):
            raise
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            reason = (exc.strerror or type(exc).__name__).lower()
            # The path the kernel refused (a directory, a temporary file) locates a
            # permission problem better than the key alone.
            path = f" path={exc.filename}" if exc.filename is not None else ""
            if callable(key):
                key = key()
            raise BackendError(f"filesystem {what} failed: {reason}: {label}={key} errno={code}"
                               f"{path} root={self._root}") from exc

    def _check_root_then(self, fn: Callable[[], _T]) -> _T:
        """Refuse a root that is not a directory, then run ``fn`` (in the same thread hop).

        Without it a root that is a regular file failed a write with "file exists ...
        errno=EEXIST" (its mkdir), and read as an empty store (its listing). Checked until
        the root is seen to be a directory; an absent root is fine (the first put makes it).
        """
        try:
            is_dir = stat.S_ISDIR(os.stat(self._root).st_mode)
        except FileNotFoundError:
            return fn()
        except NotADirectoryError:
            is_dir = False  # a file stands where one of the root's parents should be
        if not is_dir:
            blocker = self._root
            while blocker.parent != blocker and not blocker.parent.is_dir():
                blocker = blocker.parent
            cause = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker))
            raise BackendError(f"filesystem store path is not a directory: a file is in the way; "
                               f"give Backend.filesystem() a directory, or a path where one may "
                               f"be made: path={blocker} root={self._root}") from cause
        self._root_is_dir = True
        return fn()

    # ---------------------------------------------------------------- directories
    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` and fsync the parent of each new level, so names persist."""
        if directory in self._known_dirs:
            return
        missing = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for level in reversed(missing):
            try:
                level.mkdir()
            except FileExistsError:
                if not level.is_dir():
                    # A file where a folder of keys must be: say so, not "file exists".
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory: a file is in "
                                             "the way", str(level)) from None
            _fsync_dir(level.parent)
        self._known_dirs.add(directory)

    # ---------------------------------------------------------------- verbs
    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._root / check_key(key)
        await self._call("put", key, lambda: self._put_sync(path, key, data, if_absent))

    def _put_sync(self, path: Path, key: str, data: bytes, if_absent: bool) -> None:
        tmp, fd = self._write_tmp(path, data)
        try:
            os.fsync(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        self._publish(tmp, path, key, if_absent)

    async def put_then_create(self, puts: Sequence[tuple[str, bytes | bytearray]], key: str,
                              data: bytes) -> None:
        """``base.put_then_create`` in one worker-thread call (see ``_commit_sync``)."""
        paths = [(self._root / check_key(k), d) for k, d in puts]
        path = self._root / check_key(key)
        step = [key]  # the key being written: an error names the object that failed
        await self._call("put", lambda: step[0],
                         lambda: self._commit_sync(paths, path, key, data, step))

    def _commit_sync(self, puts: builtins.list[tuple[Path, bytes | bytearray]], path: Path, key: str,
                     data: bytes, step: builtins.list[str]) -> None:
        """Write every object of ``puts`` and ``data``, fsync them all, then create ``path``.

        The objects are renamed into place *before* their fsync: that is safe because
        nothing names them until the record is linked, and the link comes only after every
        file and directory below is fsynced (a crash before then may leave an object torn
        under its name: an orphan no commit names). It is also what makes it cheap: on ext4
        the first fsync commits the journal holding the renames, and the directory fsyncs
        that follow find little left to do.
        """
        written: builtins.list[tuple[int, str]] = []  # open files and their keys
        dirs: dict[Path, str] = {}  # segment directories, each with a key in it
        tmp: Path | None = None
        try:
            for target, blob in puts:
                step[0] = dirs[target.parent] = target.relative_to(self._root).as_posix()
                part, fd = self._write_tmp(target, blob)
                written.append((fd, step[0]))
                try:
                    os.replace(part, target)
                except BaseException:
                    _unlink_quietly(part)
                    raise
            step[0] = key
            tmp, fd = self._write_tmp(path, data)
            written.append((fd, key))
            for fd, step[0] in written:
                os.fsync(fd)
            for parent, step[0] in dirs.items():
                _fsync_dir(parent)
            step[0] = key
        except BaseException:
            if tmp is not None:
                _unlink_quietly(tmp)  # a failed commit leaves no temporary record behind
            raise
        finally:
            for fd, _ in written:
                os.close(fd)
        # Every object named by the record is durable, name and bytes: now the record.
        self._publish(tmp, path, key, True)

    def _write_tmp(self, path: Path, data: bytes | bytearray) -> tuple[Path, int]:
        """Write ``data`` to a new temporary file beside ``path``; return it and its open fd
        (not yet fsynced). On failure nothing is left behind."""
        parent = path.parent
        self._ensure_dir(parent)
        tmp = parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)  # a failed write (disk full, say) leaves no temporary file
            raise
        return tmp, fd

    @staticmethod
    def _publish(tmp: Path, path: Path, key: str, if_absent: bool) -> None:
        """Move the fsynced ``tmp`` into place as ``path`` and fsync the directory."""
        published = False
        try:
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExistsError(f"object already exists: key={key}") from None
            else:
                os.replace(tmp, path)
            published = True
        finally:
            if if_absent or not published:
                _unlink_quietly(tmp)  # a failed put leaves none; a link leaves a second name
        # The directory entry is what makes the new name durable.
        _fsync_dir(path.parent)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        path = self._root / check_key(key)
        check_range(start, end)
        return await self._call("get", key, lambda: self._get_sync(path, key, start, end))

    @staticmethod
    def _get_sync(path: Path, key: str, start: int | None, end: int | None) -> bytes:
        try:
            with path.open("rb") as f:  # ok-blocking: runs in a worker thread
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(end - (start or 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(f"object not found: key={key}") from None

    async def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """The size of each of ``keys`` that exists (one ``stat`` each, in one thread call)."""
        paths = [(key, self._root / check_key(key)) for key in keys]
        return await self._call("sizes", ",".join(keys[:3]), lambda: self._sizes_sync(paths))

    @staticmethod
    def _sizes_sync(paths: builtins.list[tuple[str, Path]]) -> dict[str, int]:
        found = {}
        for key, path in paths:
            try:
                found[key] = os.stat(path).st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
        return found

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        infos = await self._call("list", prefix, lambda: self._list_sync(prefix), label="prefix")
        for info in infos:
            yield info

    def _list_sync(self, prefix: str) -> builtins.list[ObjectInfo]:
        base = prefix.rpartition("/")[0]
        if ".." in base.split("/"):
            return []  # no valid key has a ".." part; walking there would list files outside the root
        top = self._root / base if base else self._root
        found: builtins.list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(top, onerror=_raise_unless_absent):
            rel = os.path.relpath(dirpath, self._root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                key = rel + name
                if name.startswith(_TMP_PREFIX) or not key.startswith(prefix):
                    continue
                try:
                    meta = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # deleted while listing
                found.append(ObjectInfo(key, meta.st_size, meta.st_mtime_ns // 1_000_000))
        found.sort(key=lambda info: info.key)
        return found

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self._root / check_key(k) for k in keys]
        await self._call("delete", ",".join(keys[:3]), lambda: self._delete_sync(paths))

    @staticmethod
    def _delete_sync(paths: builtins.list[Path]) -> None:
        parents = set()
        for path in paths:
            try:
                path.unlink()
                parents.add(path.parent)
            except (FileNotFoundError, NotADirectoryError):
                pass  # absent, also when a parent "directory" is an object: nothing to delete
        for parent in parents:
            _fsync_dir(parent)

    # ---------------------------------------------------------------- temporary files
    async def list_temporary(self) -> builtins.list[ObjectInfo]:
        """The temporary files under the root (``Capabilities.temporary_files``): those of
        puts in progress, and those a crash left behind. Each is named by its path under
        the root, like a key (``list`` never yields them)."""
        return await self._call("list", "", self._list_temporary_sync, label="prefix")

    def _list_temporary_sync(self) -> builtins.list[ObjectInfo]:
        found: builtins.list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(self._root, onerror=_raise_unless_absent):
            rel = os.path.relpath(dirpath, self._root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue  # its put finished meanwhile
                    found.append(ObjectInfo(rel + name, size))
        found.sort(key=lambda info: info.key)
        return found

    async def delete_temporary(self, paths: Sequence[str]) -> None:
        """Delete temporary files named as ``list_temporary`` names them; absent ones are
        ignored. Refuses (``ValueError``) a path that is not a temporary file's: this
        verb deletes nothing else."""
        checked = [self._root / _check_temporary(path) for path in paths]
        await self._call("delete", ",".join(paths[:3]), lambda: self._delete_sync(checked))

    async def aclose(self) -> None:
        self._closed = True
