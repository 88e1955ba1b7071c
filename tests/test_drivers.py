"""The driver conformance suite on every built-in driver, plus filesystem specifics."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import apersist
from apersist._drivers import (
    FilesystemDriver,
    MemoryDriver,
    ObjectExistsError,
    ObjectInfo,
    open_driver,
)
from apersist._drivers.base import NO_CAPABILITIES, Driver, capabilities_of
from apersist.testing import DRIVER_CHECKS, Capabilities, DriverConformance, check_driver


class TestMemoryDriver(DriverConformance):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[Driver]:
        driver = MemoryDriver({})
        yield driver
        await driver.aclose()


class TestFilesystemDriver(DriverConformance):
    @pytest.fixture
    async def driver(self, tmp_path: Path) -> AsyncIterator[Driver]:
        # The root does not exist yet: the driver creates it on the first put.
        driver = FilesystemDriver(tmp_path / "store")
        yield driver
        await driver.aclose()


def test_every_check_is_a_test() -> None:
    names = {name for name in dir(DriverConformance) if name.startswith("test_")}
    assert names == {f"test_{name}" for name in DRIVER_CHECKS}
    assert len(DRIVER_CHECKS) >= 15


def test_drivers_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(MemoryDriver({}), Driver)
    assert isinstance(FilesystemDriver(tmp_path), Driver)
    assert isinstance(open_driver(apersist.Backend.memory()), MemoryDriver)
    assert isinstance(open_driver(apersist.Backend.filesystem(tmp_path)), FilesystemDriver)


def test_each_driver_declares_its_capabilities(tmp_path: Path) -> None:
    """Declared beside the protocol, never probed for: the filesystem commits in one call;
    it, S3 and Azure take buffers; it and memory answer point lookups (``sizes``); S3 and
    Azure ask a writing run to check create-if-absent."""
    from apersist._drivers.azure import AzureDriver
    from apersist._drivers.s3 import S3Driver

    assert capabilities_of(MemoryDriver({})) == Capabilities(point_lookups=True)
    assert capabilities_of(FilesystemDriver(tmp_path)) == Capabilities(
        put_then_create=True, accepts_buffers=True, point_lookups=True, temporary_files=True)
    for cls in (S3Driver, AzureDriver):
        assert cls.capabilities == Capabilities(accepts_buffers=True, verify_conditional_writes=True)
    assert capabilities_of(object()) is NO_CAPABILITIES


def test_a_wrong_capabilities_declaration_is_refused_at_the_call() -> None:
    class Odd(MemoryDriver):
        capabilities = ("put_then_create",)  # type: ignore[assignment]

    with pytest.raises(TypeError, match="Capabilities"):
        apersist.run(apersist.Config(apersist.Backend.memory()), driver=Odd({}))


async def test_open_driver_shares_memory_objects() -> None:
    backend = apersist.Backend.memory()
    await open_driver(backend).put("k", b"v")
    assert await open_driver(backend).get("k") == b"v"
    assert [info.key async for info in open_driver(apersist.Backend.memory()).list("")] == []


# --------------------------------------------------------------------------- check_driver


async def test_check_driver_passes_a_conforming_driver() -> None:
    async def make() -> Driver:
        return MemoryDriver({})

    await check_driver(make, checks=["put_get_round_trip", "delete_keys"])


class _LyingDriver(MemoryDriver):
    """Violates the protocol twice: ranges are ignored and if_absent overwrites."""

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        return await super().get(key)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await super().put(key, data)


async def test_check_driver_reports_each_failing_check() -> None:
    closed = []

    async def make() -> Driver:
        driver = _LyingDriver({})
        closed.append(driver)
        return driver

    with pytest.raises(ExceptionGroup) as info:
        await check_driver(make, checks=["ranged_get", "put_if_absent", "list_prefix"])
    assert len(info.value.exceptions) == 2
    notes = [" ".join(getattr(exc, "__notes__", [])) for exc in info.value.exceptions]
    assert "check=ranged_get" in notes[0]
    assert "check=put_if_absent" in notes[1]
    assert all(isinstance(exc, AssertionError) for exc in info.value.exceptions)
    assert len(closed) == 3


async def test_check_driver_refuses_unknown_checks() -> None:
    async def make() -> Driver:
        return MemoryDriver({})

    with pytest.raises(ValueError, match="no_such_check"):
        await check_driver(make, checks=["no_such_check"])


# --------------------------------------------------------------------------- filesystem


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


async def test_filesystem_keys_are_files_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("a/b/c.seg", b"payload")
    await driver.put("top", b"t")
    assert (root / "a" / "b" / "c.seg").read_bytes() == b"payload"
    assert (root / "top").read_bytes() == b"t"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "a/b/c.seg", "top"]
    await driver.delete(["a/b/c.seg"])
    assert not (root / "a" / "b" / "c.seg").exists()


async def test_filesystem_leaves_no_temporary_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("k/one", b"1")
    await driver.put("k/one", b"overwritten")
    await driver.put("k/two", b"2", if_absent=True)
    with pytest.raises(ObjectExistsError):
        await driver.put("k/two", b"refused", if_absent=True)
    await driver.put("k/empty", b"", if_absent=True)
    assert _tmp_files(root) == []
    assert sorted(p.name for p in (root / "k").iterdir()) == ["empty", "one", "two"]
    assert (root / "k" / "two").read_bytes() == b"2"


async def test_filesystem_never_lists_leftover_temporary_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("dir/real", b"data")
    # What a crash between "write the temporary file" and "publish it" leaves behind.
    (root / "dir" / ".tmp-0123abcd").write_bytes(b"torn")
    (root / ".tmp-top").write_bytes(b"torn")
    for prefix in ("", "dir", "dir/", "dir/.tmp", ".tmp"):
        listed = [info.key async for info in driver.list(prefix)]
        assert all(".tmp-" not in key for key in listed), (prefix, listed)
    assert [(i.key, i.size) async for i in driver.list("")] == [("dir/real", 4)]
    # Keys that name a temporary file are refused, so it cannot be read or clobbered either.
    with pytest.raises(ValueError, match="invalid object key"):
        await driver.get("dir/.tmp-0123abcd")


async def test_filesystem_put_failure_is_a_backend_error_naming_the_key(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("blocker", b"i am a file")
    # A regular file where a directory must be: mkdir fails even for root (chmod would not).
    for key, if_absent in (("blocker/child", False), ("blocker/deeper/child", True)):
        with pytest.raises(apersist.BackendError, match=f"key={key}") as info:
            await driver.put(key, b"x", if_absent=if_absent)
        assert not isinstance(info.value, ObjectExistsError)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno in (errno.EEXIST, errno.ENOTDIR)
    assert (root / "blocker").read_bytes() == b"i am a file"
    assert _tmp_files(root) == []


@pytest.mark.parametrize("under", [False, True])
async def test_filesystem_root_that_is_a_file_is_refused_as_not_a_directory(
        tmp_path: Path, under: bool) -> None:
    """A regular file at the root's path (or at one of its parents'): every verb says "not
    a directory", naming the file; a listing used to read as an empty store, and a write
    failed with "file exists ... errno=EEXIST"."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file")
    root = blocker / "store" if under else blocker
    driver = FilesystemDriver(root)

    async def listing() -> list[ObjectInfo]:
        return [info async for info in driver.list("")]

    for verb in (lambda: driver.put("k", b"x"), lambda: driver.put("k", b"x", if_absent=True),
                 lambda: driver.get("k"), listing, lambda: driver.sizes(["k"]),
                 lambda: driver.delete(["k"])):
        with pytest.raises(apersist.BackendError) as info:
            await verb()
        message = str(info.value)
        assert message.startswith("filesystem store path is not a directory: a file is in the way")
        assert f"path={blocker} root={root}" in message
        assert "EEXIST" not in message
        assert isinstance(info.value.__cause__, NotADirectoryError)
    assert blocker.read_bytes() == b"a file"


async def test_filesystem_get_failure_is_a_backend_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("dir/key", b"x")
    # A name too long for the filesystem: an OSError that is not "not found".
    key = "dir/" + "n" * (os.pathconf(root, "PC_NAME_MAX") + 1)
    with pytest.raises(apersist.BackendError, match="key=dir/n") as info:
        await driver.get(key)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENAMETOOLONG


async def test_filesystem_store_survives_a_new_driver(tmp_path: Path) -> None:
    root = tmp_path / "store"
    await FilesystemDriver(root).put("p/q", b"durable")
    again = FilesystemDriver(root)
    assert await again.get("p/q") == b"durable"
    assert [(i.key, i.size) async for i in again.list("p/")] == [("p/q", 7)]


async def test_filesystem_never_lists_files_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    driver = FilesystemDriver(root)
    await driver.put("inside/key", b"x")
    (tmp_path / "outside.txt").write_bytes(b"not part of the store")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "file").write_bytes(b"nor this")
    for prefix in ("../", "..", "../outside", "../sibling/", "../store/", "inside/../../"):
        assert [info.key async for info in driver.list(prefix)] == [], prefix
