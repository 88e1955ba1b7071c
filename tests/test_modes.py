"""Every ``PersistenceMode`` and ``SnapshotAccess`` as API.md describes them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from helpers import counting, replayed, stored_objects, table_state

import apersist
from apersist.testing import FakeClock

Access = apersist.SnapshotAccess
Mode = apersist.PersistenceMode

SEED = [("a", 1), ("b", 2), ("c", 3)]
SEED_TABLE = {"x": 1, "y": [2]}


class Probe:
    """A cached function whose calls are counted, and a reader that records its offset."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.reader_offsets: list[Any] = []

        @apersist.cached(name="square")
        def square(x: int) -> int:
            self.calls.append(x)
            return x * x

        self.square = square

    def reader(self, items: list[Any]) -> Any:
        def read(offset: Any) -> AsyncIterator[Any]:
            self.reader_offsets.append(offset)
            return self._items(items)

        return read

    @staticmethod
    async def _items(items: list[Any]) -> AsyncIterator[Any]:
        for item in items:
            yield item


async def seed(backend: apersist.Backend, probe: Probe) -> int:
    """A FULL run: stream ``s`` with SEED, table ``t`` with SEED_TABLE, square(3|8) cached."""
    async with apersist.run(apersist.Config(backend)) as run:
        async for _ in run.source("s", probe.reader(SEED)):
            pass
        table = await run.table("t")
        table.update(SEED_TABLE)
        assert probe.square(3) == 9
        assert probe.square(8) == 64
        info = await run.commit()
    probe.calls.clear()
    probe.reader_offsets.clear()
    return info.seq


async def cached_in_store(backend: apersist.Backend, probe: Probe, x: int) -> bool:
    """Whether square(x) is answered from the store (checked by a read-only run)."""
    before = len(probe.calls)
    async with apersist.run(apersist.Config(backend, snapshot_access=Access.REPLAY)):
        assert probe.square(x) == x * x
    hit = len(probe.calls) == before
    del probe.calls[before:]
    return hit


async def stored_offset(backend: apersist.Backend, stream: str) -> Any:
    async with apersist.run(apersist.Config(backend, snapshot_access=Access.REPLAY)) as run:
        return run.stream(stream).offset


async def events(backend: apersist.Backend, stream: str) -> list[tuple[Any, Any]]:
    return [(e.value, e.offset) for e in await replayed(backend, stream)]


# --------------------------------------------------------------------------- FULL


async def test_full_replays_what_is_stored_then_records(backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, snapshot_access=Access.FULL, persistence_mode=Mode.PERSISTING)
    async with apersist.run(cfg) as run:
        got = [e async for e in run.source("s", probe.reader([("d", 4)]))]
        assert [(e.value, e.offset, e.replayed) for e in got] == (
            [(v, o, True) for v, o in SEED] + [("d", 4, False)])
        assert probe.reader_offsets == [3]
        assert dict(await run.table("t")) == SEED_TABLE
        assert probe.square(3) == 9
        assert probe.calls == []
    assert await events(backend, "s") == [*SEED, ("d", 4)]


# --------------------------------------------------------------------------- RECORD


async def test_record_starts_a_new_history(backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, snapshot_access=Access.RECORD)
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        assert [e async for e in stream.replay()] == []
        assert stream.offset is None
        got = [e async for e in run.source("s", probe.reader([("new", 100)]))]
        assert [(e.value, e.replayed) for e in got] == [("new", False)]
        assert probe.reader_offsets == [None]
        table = await run.table("t")
        assert dict(table) == {}
        table["fresh"] = True
        assert probe.square(3) == 9
        assert probe.calls == [3]  # the cache starts empty
        assert probe.square(4) == 16
    assert await events(backend, "s") == [("new", 100)]
    assert await stored_offset(backend, "s") == 100
    assert await table_state(backend, "t") == {"fresh": True}
    assert await cached_in_store(backend, probe, 4)
    assert not await cached_in_store(backend, probe, 8)  # the old entry went with its history


async def test_record_with_nothing_recorded_still_supersedes_the_old_history(
        backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    async with apersist.run(apersist.Config(backend, snapshot_access=Access.RECORD)):
        pass
    assert await events(backend, "s") == []
    assert await stored_offset(backend, "s") is None
    assert await table_state(backend, "t") == {}
    assert not await cached_in_store(backend, probe, 3)
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e async for e in run.source("s", probe.reader([]))] == []
        assert probe.reader_offsets == [None]


async def test_record_offsets_start_at_none_until_the_new_history_has_one(
        backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, snapshot_access=Access.RECORD, snapshot_interval_ms=60_000)
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        other = run.stream("other")
        assert stream.offset is None
        await other.record("o")
        await run.commit()
        assert stream.offset is None  # the old history's offset is gone for good
        await stream.record("v", offset=7)
        await run.commit()
        assert stream.offset == 7
    assert await events(backend, "s") == [("v", 7)]


async def test_record_cancelled_before_its_first_commit_leaves_the_old_history(
        backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, snapshot_access=Access.RECORD, snapshot_interval_ms=60_000)
    with anyio.CancelScope() as scope:
        async with apersist.run(cfg) as run:
            await run.stream("s").record("never", offset=99)
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert await events(backend, "s") == SEED
    assert await table_state(backend, "t") == SEED_TABLE


# --------------------------------------------------------------------------- REPLAY


async def test_replay_access_replays_and_writes_nothing_at_all(
        backend: apersist.Backend) -> None:
    probe = Probe()
    last_seq = await seed(backend, probe)
    before = await stored_objects(backend)
    cfg = apersist.Config(backend, snapshot_access=Access.REPLAY, snapshot_interval_ms=0)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        stream = run.stream("s")
        got = [e async for e in run.source("s", probe.reader([("live", 4)]))]
        assert [(e.value, e.offset, e.replayed) for e in got] == (
            [(v, o, True) for v, o in SEED] + [("live", 4, False)])
        assert probe.reader_offsets == [3]
        await stream.record("dropped", offset=9)  # accepted and dropped
        with pytest.raises(TypeError, match="s"):
            await stream.record(object())  # still checked
        table = await run.table("t")
        assert dict(table) == SEED_TABLE
        table["local"] = 1  # lives in memory only
        assert probe.square(3) == 9
        assert probe.calls == []  # the stored cache is read
        assert probe.square(5) == 25
        assert await run.commit() == apersist.CommitInfo(last_seq, 0, 0)
        await run.compact()
        assert stream.offset == 3
        assert [(e.value, e.offset) async for e in stream.replay()] == SEED
    assert driver.calls["put"] == 0
    assert driver.calls["delete"] == 0
    assert await stored_objects(backend) == before  # byte for byte, and no epoch written


async def test_replay_access_on_an_empty_store_writes_nothing(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_access=Access.REPLAY)) as run:
        await run.stream("s").record(1)
        assert await run.commit() == apersist.CommitInfo(0, 0, 0)
    assert await stored_objects(backend) == {}


async def test_replay_access_does_not_fence_the_writer(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as writer:
        await writer.stream("s").record(1)
        await writer.commit()
        async with apersist.run(apersist.Config(backend, snapshot_access=Access.REPLAY)) as reader:
            assert [e.value async for e in reader.stream("s").replay()] == [1]
        await writer.stream("s").record(2)
        await writer.commit()
    assert [v for v, _ in await events(backend, "s")] == [1, 2]


# --------------------------------------------------------------------------- OFFSETS_ONLY


async def test_offsets_only_reads_and_writes_only_offsets(backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, snapshot_access=Access.OFFSETS_ONLY)
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        assert [e async for e in stream.replay()] == []
        assert stream.offset == 3
        got = [e async for e in run.source("s", probe.reader([("d", 4), ("e", 5)]))]
        assert probe.reader_offsets == [3]  # sources resume from their stored offsets
        assert [(e.value, e.offset, e.replayed) for e in got] == [("d", 4, False), ("e", 5, False)]
        await run.commit()
        assert stream.offset == 5
        table = await run.table("t")
        assert dict(table) == {}
        table["ignored"] = 1
        assert probe.square(3) == 9
        assert probe.square(3) == 9
        assert probe.calls == [3, 3]  # the cache is unused
    probe.calls.clear()
    assert await stored_offset(backend, "s") == 5
    assert await events(backend, "s") == SEED  # no data written
    assert await table_state(backend, "t") == SEED_TABLE
    assert await cached_in_store(backend, probe, 3)
    async with apersist.run(apersist.Config(backend)) as run:
        got = [e async for e in run.source("s", probe.reader([("f", 6)]))]
        assert probe.reader_offsets[-1] == 5
        assert [e.value for e in got] == ["a", "b", "c", "f"]


# --------------------------------------------------------------------------- UDF_CACHING


async def test_udf_caching_persists_only_the_cache(backend: apersist.Backend) -> None:
    probe = Probe()
    await seed(backend, probe)
    cfg = apersist.Config(backend, persistence_mode=Mode.UDF_CACHING)
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        assert [e async for e in stream.replay()] == []
        got = [e async for e in run.source("s", probe.reader([("z", 50)]))]
        assert probe.reader_offsets == [None]
        assert [(e.value, e.offset, e.replayed) for e in got] == [("z", 50, False)]
        await run.commit()
        assert stream.offset is None
        table = await run.table("t")
        assert dict(table) == {}
        table["passing"] = "through"
        assert probe.square(3) == 9  # stored by the seed run
        assert probe.square(6) == 36
        assert probe.square(6) == 36
        assert probe.calls == [6]
    assert await events(backend, "s") == SEED
    assert await stored_offset(backend, "s") == 3
    assert await table_state(backend, "t") == SEED_TABLE
    assert await cached_in_store(backend, probe, 6)
    assert await cached_in_store(backend, probe, 3)


# --------------------------------------------------------------------------- replay modes


async def seed_timed(backend: apersist.Backend, gap_ms: int) -> None:
    """Two events recorded ``gap_ms`` apart (by an injected clock)."""
    clock = FakeClock(1_700_000_000_000)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        await run.stream("s").record("first", offset=1)
        clock.advance(gap_ms)
        await run.stream("s").record("second", offset=2)


async def test_speedrun_replay_replays_everything_fast_and_persists(
        backend: apersist.Backend) -> None:
    probe = Probe()
    await seed_timed(backend, 3_000)
    cfg = apersist.Config(backend, persistence_mode=Mode.SPEEDRUN_REPLAY)
    async with apersist.run(cfg) as run:
        started = time.monotonic()
        got = [e async for e in run.stream("s").replay()]
        elapsed = time.monotonic() - started
        assert [(e.value, e.offset, e.replayed) for e in got] == [
            ("first", 1, True), ("second", 2, True)]
        assert got[1].time_ms - got[0].time_ms == 3_000
        assert elapsed < 1.0  # the recorded 3 s gap is not kept (a wide margin)
        live = [e async for e in run.source("s", probe.reader([("third", 3)]))]
        assert [e.value for e in live] == ["first", "second", "third"]
        assert probe.reader_offsets == [2]
        (await run.table("t"))["k"] = 1
        assert probe.square(2) == 4
    assert await events(backend, "s") == [("first", 1), ("second", 2), ("third", 3)]
    assert await table_state(backend, "t") == {"k": 1}
    assert await cached_in_store(backend, probe, 2)


async def test_realtime_replay_keeps_the_recorded_gaps(backend: apersist.Backend) -> None:
    probe = Probe()
    await seed_timed(backend, 300)
    cfg = apersist.Config(backend, persistence_mode=Mode.REALTIME_REPLAY)
    async with apersist.run(cfg) as run:
        started = time.monotonic()
        got = [e async for e in run.stream("s").replay()]
        assert time.monotonic() - started >= 0.25
        assert [e.value for e in got] == ["first", "second"]

        started = time.monotonic()
        live = [e async for e in run.source("s", probe.reader([("third", 3)]))]
        assert time.monotonic() - started >= 0.25  # run.source() is paced too
        assert [(e.value, e.replayed) for e in live] == [
            ("first", True), ("second", True), ("third", False)]
        assert probe.square(2) == 4
    # It acts as PERSISTING otherwise: the live item and the cache entry were recorded.
    assert await events(backend, "s") == [("first", 1), ("second", 2), ("third", 3)]
    assert await cached_in_store(backend, probe, 2)
