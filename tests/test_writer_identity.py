"""Writers say who they are (issue 15, items 5 and 6).

Epoch records name their writer (host, pid, ``Config(writer_label=...)``, when it started);
``FencedError``, ``WriterActiveError`` and ``apersist inspect`` name the writer that holds
the store; ``Config(takeover_idle_ms=...)`` refuses to take over a writer that committed
lately, measured on the storage's clock; and the messages for a filesystem root that is a
file, a read-only run of an empty root and storage without conditional writes say what is
wrong and what to do. Everything runs against real storage: the filesystem, the test S3
server and Azurite, and the memory store where the behaviour is the same.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from conftest import make_backend
from helpers import stored_objects, values

import apersist
from apersist import _format as fmt
from apersist._config import FilesystemBackend
from apersist._drivers import MemoryDriver, open_driver
from apersist._drivers.probe import verify_create_if_absent
from apersist._inspect import summarize
from apersist.testing import Capabilities, FakeClock

HOST, PID = socket.gethostname(), os.getpid()
QUIET = 60_000
# Backends whose listings carry the storage's modification times (ObjectInfo.modified_ms).
TIMED = ["filesystem", "s3", "azure"]


async def inspected(backend: apersist.Backend) -> dict[str, Any]:
    driver = open_driver(backend)
    try:
        report: dict[str, Any] = (await summarize(driver)).to_json()
        return report
    finally:
        await driver.aclose()


def config(backend: apersist.Backend, **kwargs: Any) -> apersist.Config:
    return apersist.Config(backend, snapshot_interval_ms=QUIET, **kwargs)


# --------------------------------------------------------------------------- the epoch record
def test_an_epoch_record_names_its_writer_and_one_without_a_name_still_reads() -> None:
    key = fmt.epoch_key(fmt.WRITER, 3)
    named = fmt.EpochRecord("0", 3, 1_700_000_000_123, "ab" * 16, "web-1", 77, "replica-a")
    body = orjson.loads(named.encode()[len(b'{"body":'):named.encode().rfind(b',"crc32":')])
    assert (body["format"], body["host"], body["pid"], body["label"]) == (
        [fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR], "web-1", 77, "replica-a")
    assert fmt.EpochRecord.decode(key, named.encode()) == named
    assert named.writer_info() == apersist.WriterInfo(3, 1_700_000_000_123, "web-1", 77,
                                                      "replica-a")
    assert named.writer_info().facts() == (
        "host=web-1 pid=77 label=replica-a started=2023-11-14T22:13:20.123Z")
    # Without a label, the field is left out; a 4.0 record has none of the three.
    bare = fmt.EpochRecord("0", 3, 1_700_000_000_123, "ab" * 16, "web-1", 77)
    assert b'"label"' not in bare.encode()
    old = (b'{"body":{"format":[4,0],"type":"epoch","writer":"0","epoch":1,"time_ms":'
           b'1700000000000,"token":"48d04e19546e4213a9217d0c22bb81ef"},"crc32":2329567729}')
    record = fmt.EpochRecord.decode(fmt.epoch_key("0", 1), old)
    assert (record.host, record.pid, record.label) == (None, None, None)
    assert not record.writer_info().known
    assert record.writer_info().facts("current_") == (
        "current_host=unknown current_pid=unknown current_started=2023-11-14T22:13:20.000Z")


@pytest.mark.parametrize(("field", "value"), [("host", 5), ("pid", "77"), ("pid", True),
                                              ("label", ["x"])])
def test_an_identity_field_of_the_wrong_type_is_corruption(field: str, value: object) -> None:
    body = {"format": [4, 1], "type": "epoch", "writer": "0", "epoch": 1, "time_ms": 1,
            "token": "t", field: value}
    raw = orjson.dumps(body)
    data = b'{"body":%s,"crc32":%d}' % (raw, zlib.crc32(raw))
    with pytest.raises(apersist.CorruptDataError, match=f"field={field}"):
        fmt.EpochRecord.decode(fmt.epoch_key("0", 1), data)


# --------------------------------------------------------------------------- FencedError
async def test_fenced_error_names_the_writer_that_took_over(backend: apersist.Backend) -> None:
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config(backend, writer_label="replica-a")) as older:
            await older.stream("s").record("old")
            await older.commit()
            async with apersist.run(config(backend, writer_label="replica-b")) as newer:
                await older.stream("s").record("late")
                with pytest.raises(apersist.FencedError) as fenced:
                    await older.commit()
                epoch = newer._store.epoch
    holder = fenced.value.holder
    assert holder is not None
    assert (holder.epoch, holder.host, holder.pid, holder.label) == (epoch, HOST, PID,
                                                                     "replica-b")
    message = str(fenced.value)
    assert message.startswith(f"a newer writer owns this store: epoch={epoch - 1} "
                              f"current={epoch} commit=writers/0/commits/")
    assert message.endswith(f" current_host={HOST} current_pid={PID} current_label=replica-b "
                            f"current_started={fmt.format_time_ms(holder.started_ms)}")


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_fenced_by_a_writer_that_did_not_name_itself(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The newer writer's epoch record has no identity (written before format 4.1): the
    message says so instead of naming a host."""
    backend = make_backend(kind, tmp_path, request)
    driver = open_driver(backend)
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config(backend)) as older:
            async with apersist.run(config(backend)) as newer:
                epoch = newer._store.epoch
                assert epoch is not None
                key = fmt.epoch_key(fmt.WRITER, epoch)
                record = fmt.EpochRecord.decode(key, await driver.get(key))
                unnamed = fmt.EpochRecord(record.writer, record.epoch, record.time_ms,
                                          record.token)
                await driver.put(key, unnamed.encode())
            await older.stream("s").record("late")
            with pytest.raises(apersist.FencedError) as fenced:
                await older.commit()
    await driver.aclose()
    holder = fenced.value.holder
    assert holder is not None
    assert (holder.host, holder.pid, holder.label, holder.known) == (None, None, None, False)
    assert str(fenced.value).endswith(
        f"current_host=unknown current_pid=unknown "
        f"current_started={fmt.format_time_ms(record.time_ms)}")


# --------------------------------------------------------------------------- apersist inspect
async def test_inspect_names_the_writer_that_holds_the_store(backend: apersist.Backend) -> None:
    assert (await inspected(backend))["writer"] is None  # no commit yet: nobody holds it
    clock = FakeClock(1_800_000_000_000)
    async with apersist.run(config(backend, writer_label="first"), clock_ms=clock) as run:
        await run.stream("s").record(1)
    clock.advance(5_000)
    async with apersist.run(config(backend), clock_ms=clock) as run:  # no label
        await run.stream("s").record(2)
        epoch = run._store.epoch
    report = await inspected(backend)
    assert report["writer"] == {"epoch": epoch, "host": HOST, "pid": PID, "label": None,
                                "started": "2027-01-15T08:00:05.000Z",
                                "started_ms": 1_800_000_005_000}
    assert report["writer_epoch"] == epoch


def test_inspect_text_prints_one_writer_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from apersist._cli import main

    root = tmp_path / "store"

    async def fill() -> None:
        async with apersist.run(config(apersist.Backend.filesystem(root),
                                       writer_label="replica-a"),
                                clock_ms=lambda: 1_800_000_000_000) as run:
            await run.stream("s").record(1)

    anyio.run(fill)
    assert main(["inspect", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"writer: epoch 1, host={HOST} pid={PID} label=replica-a " \
           f"started=2027-01-15T08:00:00.000Z" in lines


# --------------------------------------------------------------------------- takeover_idle_ms
@pytest.mark.parametrize("kind", TIMED)
async def test_listings_carry_the_storages_modification_time(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    driver = open_driver(make_backend(kind, tmp_path, request))
    try:
        before = time.time_ns() // 1_000_000
        await driver.put("k", b"x")
        [info] = [i async for i in driver.list("k")]
        after = time.time_ns() // 1_000_000
        assert info.modified_ms is not None
        # S3 and Azure give whole seconds, by the server's clock (here, this machine's).
        assert before - 1_000 <= info.modified_ms <= after + 1_000
    finally:
        await driver.aclose()
    assert [i.modified_ms async for i in MemoryDriver({"k": b"x"}).list("")] == [None]


@pytest.mark.parametrize("kind", TIMED)
async def test_an_active_writer_is_not_taken_over_whatever_its_clock_says(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The older writer's clock is an hour behind: by its commit records it has been idle
    for an hour. The storage's clock says it committed a moment ago, and that is what
    counts. The refusal writes nothing, and the older writer goes on committing."""
    backend = make_backend(kind, tmp_path, request)
    skewed = lambda: time.time_ns() // 1_000_000 - 3_600_000  # noqa: E731
    async with apersist.run(config(backend, writer_label="replica-a"), clock_ms=skewed) as older:
        await older.stream("s").record("a-1")
        await older.commit()
        before = await stored_objects(backend)
        with pytest.raises(apersist.WriterActiveError) as refused:
            async with apersist.run(config(backend, writer_label="replica-b",
                                           takeover_idle_ms=60_000)):
                raise AssertionError("the run must not open")
        assert await stored_objects(backend) == before  # nothing written, nothing left
        await older.stream("s").record("a-2")
        await older.commit()  # not fenced
    error = refused.value
    assert error.holder is not None
    assert (error.holder.label, error.holder.host, error.holder.pid) == ("replica-a", HOST, PID)
    assert error.idle_ms is not None
    assert 0 <= error.idle_ms < 30_000
    message = str(error)
    assert message.startswith("the store's writer committed within takeover_idle_ms, so this "
                              "run does not take over (nothing was written)")
    assert f"idle_ms={error.idle_ms} takeover_idle_ms=60000 clock=storage " in message
    assert f"host={HOST} pid={PID} label=replica-a started=" in message
    assert await values(backend, "s") == ["a-1", "a-2"]


@pytest.mark.parametrize("kind", TIMED)
async def test_a_writer_idle_for_takeover_idle_ms_is_taken_over(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, request)
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config(backend, writer_label="replica-a")) as older:
            await older.stream("s").record("a-1")
            await older.commit()
            # S3 and Azure date objects to the second: idle 1 s is certain after 2.2 s.
            await anyio.sleep(2.2)
            async with apersist.run(config(backend, writer_label="replica-b",
                                           takeover_idle_ms=1_000)) as newer:
                await newer.stream("s").record("b-1")
            await older.stream("s").record("a-2 (fenced)")
    assert await values(backend, "s") == ["a-1", "b-1"]
    assert (await inspected(backend))["writer"]["label"] == "replica-b"


async def test_without_storage_times_the_writers_clock_is_compared() -> None:
    """The memory store lists no modification times: the newest commit's time by its
    writer's clock is compared with this run's clock (one process: one clock)."""
    backend = apersist.Backend.memory()
    clock = FakeClock(1_800_000_000_000)
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config(backend, writer_label="a"), clock_ms=clock) as older:
            await older.stream("s").record(1)
            await older.commit()
            clock.advance(999)
            with pytest.raises(apersist.WriterActiveError, match=(
                    r"idle_ms=999 takeover_idle_ms=1000 clock=writer seq=2 epoch=1 "
                    rf"host={HOST} pid={PID} label=a ")):
                async with apersist.run(config(backend, takeover_idle_ms=1_000),
                                        clock_ms=clock):
                    pass
            clock.advance(1)
            async with apersist.run(config(backend, takeover_idle_ms=1_000), clock_ms=clock):
                pass
            await older.stream("s").record(2)
    assert await values(backend, "s") == [1]


async def test_an_empty_store_is_taken_with_takeover_idle_ms(backend: apersist.Backend) -> None:
    async with apersist.run(config(backend, writer_label="first", takeover_idle_ms=60_000)) as run:
        await run.stream("s").record(1)
    assert await values(backend, "s") == [1]


@pytest.mark.parametrize("kind", ["memory", "filesystem"])
async def test_the_default_still_lets_the_newest_writer_win(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, request)
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config(backend)) as older:
            await older.stream("s").record(1)
            await older.commit()
            async with apersist.run(config(backend)):  # takeover_idle_ms=None
                pass
            await older.stream("s").record(2)
    assert await values(backend, "s") == [1]


# --------------------------------------------------------------------------- clear messages
async def test_a_filesystem_root_that_is_a_file_says_not_a_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a store")
    for access in ("full", "replay"):
        backend = apersist.Backend.filesystem(blocker)
        with pytest.raises(apersist.BackendError) as info:
            async with apersist.run(apersist.Config(backend, snapshot_access=access)):
                raise AssertionError("the run must not open")
        assert str(info.value) == (
            f"filesystem store path is not a directory: a file is in the way; give "
            f"Backend.filesystem() a directory, or a path where one may be made: "
            f"path={blocker} root={blocker}")
    assert blocker.read_text() == "not a store"


async def test_a_read_only_run_of_an_empty_root_warns(
        backend: apersist.Backend, caplog: pytest.LogCaptureFixture) -> None:
    replay = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    with caplog.at_level(logging.WARNING, logger="apersist"):
        async with apersist.run(replay) as run:
            assert [e async for e in run.stream("s").replay()] == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().partition(": backend=")[0] for r in warnings] == [
        "no store at this root: a read-only run (SnapshotAccess.REPLAY) replays nothing"]
    where = warnings[0].getMessage().partition("replays nothing: ")[2]
    assert where.startswith(f"backend={backend.kind}")
    if isinstance(backend, FilesystemBackend):
        assert where == f"backend=filesystem path={backend.path}"
    assert "key" not in where  # no credential: facts of where, never of how to get in
    caplog.clear()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record(1)
    with caplog.at_level(logging.WARNING, logger="apersist"):
        async with apersist.run(replay) as run:
            assert [e.value async for e in run.stream("s").replay()] == [1]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


class _IgnoresIfAbsent(MemoryDriver):
    """An object store that ignores the condition: every create wins."""

    capabilities = Capabilities(verify_conditional_writes=True)

    def __init__(self, name: str) -> None:
        super().__init__({})
        self.name = name

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await anyio.lowlevel.checkpoint()  # a request's round trip: the racers interleave
        await super().put(key, data)


@pytest.mark.parametrize(("name", "remedy"), [
    ("s3", "use AWS S3 (conditional writes since August 2024) or an S3-compatible server "
           "release that honours If-None-Match: * on PutObject and CompleteMultipartUpload"),
    ("azure", "use Azure Blob Storage or Azurite, which honour If-None-Match: *"),
    ("custom", "a driver's put(if_absent=True) must let exactly one of several racing "
               "creators win"),
])
async def test_storage_without_conditional_writes_is_told_what_to_use(
        name: str, remedy: str) -> None:
    with pytest.raises(apersist.BackendError) as refused:
        await verify_create_if_absent(_IgnoresIfAbsent(name))
    message = str(refused.value)
    assert message.startswith("storage does not honour create-if-absent: 2 of 2 racing "
                              "if_absent puts of one new key succeeded, expected exactly 1; "
                              "without it apersist can neither make commits atomic nor fence "
                              "an older writer; ")
    assert remedy in message
    assert f": driver={name} key=_check/" in message
