"""Stream.record_many: a batch recorded as that many record() calls would, all or nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from helpers import replayed, stored_objects, values

import apersist
from apersist import _format as fmt
from apersist._scheduler import BATCH_ENTRIES
from apersist.testing import FakeClock

QUIET = 60_000


async def test_a_batch_round_trips_in_order_with_one_time(backend: apersist.Backend) -> None:
    batch: list[Any] = [0, "text", None, [1, [2]], {"a": {"b": None}}, 1.5, True, "", {}]
    clock = FakeClock(5_000)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        await run.stream("s").record_many(batch)
        await run.stream("s").record_many(iter(["from", "an", "iterator"]))
        await run.stream("s").record_many(("a", "tuple"))
    got = await replayed(backend, "s")
    assert [e.value for e in got] == [*batch, "from", "an", "iterator", "a", "tuple"]
    assert all(e.offset is None and e.time_ms == 5_000 and e.replayed for e in got)


async def test_offsets_are_per_event_and_the_last_one_is_the_streams(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        await stream.record_many(["a", "b", "c", "d"], offsets=[{"pos": 1}, None, 3, None])
        assert stream.offset is None  # not durable yet
        await run.commit()
        assert stream.offset == 3  # the last offset that is not None
        await stream.record_many(["e"], offsets=(x for x in [None]))
        await run.commit()
        assert stream.offset == 3  # None leaves it unchanged, as in record()
    got = await replayed(backend, "s")
    assert [(e.value, e.offset) for e in got] == [
        ("a", {"pos": 1}), ("b", None), ("c", 3), ("d", None), ("e", None)]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 3


@pytest.mark.parametrize("bad", [object(), {1: "int key"}, 2**64, math.nan, [math.inf]])
async def test_a_bad_value_records_nothing_of_its_batch(backend: apersist.Backend,
                                                        bad: Any) -> None:
    # QUIET: with an interval of 0 the scheduler may commit "before" at any await, and
    # the count of pending deltas below would then race it.
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("s")
        await stream.record("before")
        with pytest.raises(TypeError, match=r"stream 's' \(batch index 2\)"):
            await stream.record_many(["x", {"n": None}, bad, "y"], offsets=[1, 2, 3, 4])
        assert run.stats["pending_deltas"] == 1
        await stream.record_many(["after"])
    assert await values(backend, "s") == ["before", "after"]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset is None  # the failed batch's offsets were dropped too


async def test_a_bad_offset_records_nothing_of_its_batch(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(TypeError, match=r"the offset of stream 's' \(batch index 1\)"):
            await run.stream("s").record_many(["x", "y"], offsets=[1, object()])
        assert run.stats["pending_deltas"] == 0
    assert await values(backend, "s") == []


async def test_offsets_of_another_length_raise_and_record_nothing(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        with pytest.raises(ValueError, match=r"one offset per value.*values=2 offsets=3"):
            await stream.record_many(["x", "y"], offsets=[1, 2, 3])
        with pytest.raises(ValueError, match="values=2 offsets=1"):
            await stream.record_many(["x", "y"], offsets=[1])
        assert run.stats["pending_deltas"] == 0
    assert await values(backend, "s") == []


async def test_an_empty_batch_records_nothing(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        await run.stream("s").record_many([])
        await run.stream("s").record_many([], offsets=[])
        assert run.stats["pending_deltas"] == 0
        info = await run.commit()
        assert (info.deltas, info.bytes) == (0, 0)
    assert await values(backend, "s") == []


async def test_batches_and_single_records_interleave_in_order(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("s")
        await stream.record(0, offset=0)
        await stream.record_many([1, 2, 3], offsets=[1, 2, 3])
        info = await run.commit()
        assert info.deltas == 4
        await stream.record(4)
        await stream.record_many([5, 6])
        await stream.record(7, offset=7)
        assert run.stats["pending_deltas"] == 4
    got = await replayed(backend, "s")
    assert [e.value for e in got] == list(range(8))
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 7


async def test_an_uncommitted_batch_is_lost_by_a_crash_and_a_committed_one_is_not(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with anyio.CancelScope() as scope:
        async with apersist.run(cfg) as run:
            stream = run.stream("s")
            await stream.record_many(["kept-1", "kept-2"], offsets=[1, 2])
            await run.commit()
            await stream.record_many(["lost-1", "lost-2"], offsets=[3, 4])
            scope.cancel()  # leaving by cancellation commits nothing more: a crash
            await anyio.sleep_forever()
    async with apersist.run(cfg) as run:
        assert run.stream("s").offset == 2
        assert [e.value async for e in run.stream("s").replay()] == ["kept-1", "kept-2"]
        await run.stream("s").record_many(["again"], offsets=[5])
    assert await values(backend, "s") == ["kept-1", "kept-2", "again"]


async def test_a_big_batch_is_cut_into_segments_of_the_usual_size(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=1024)
    batch = [{"n": i, "pad": "p" * 40} for i in range(200)]
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        await stream.record("first")
        await stream.record_many(batch)
        info = await run.commit()
        assert info.deltas == 201
    async with apersist.run(cfg) as run:
        store = run._store  # the segment sizes are not public
        refs = [s.ref for s in store.segments("events", "s")]
    assert len(refs) > 8
    # Past the segment size by at most a quarter of it (one batch record) and a single
    # event's record; plus the header and trailer.
    record = len('{"n":100,"pad":""}') + 40 + 24
    assert all(ref.size <= 1024 + 1024 // 4 + record + 200 for ref in refs)
    assert sum(ref.records for ref in refs) == 201
    assert await values(backend, "s") == ["first", *batch]


async def test_back_pressure_applies_to_batches(backend: apersist.Backend) -> None:
    bound = 4096
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_pending_bytes=bound)
    batch = [{"payload": "p" * 100}] * 10  # about 1.3 KB framed
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        for i in range(100):
            await stream.record_many(batch, offsets=range(i * 10, i * 10 + 10))
            # A batch may take the pending bytes past the bound once; then it waits.
            assert run.stats["pending_bytes"] <= bound + 1_500
        # Only back-pressure can have committed under the long interval.
        assert run.stats["commits"] >= 20
    got = await replayed(backend, "s")
    assert [e.offset for e in got] == list(range(1_000))


@pytest.mark.parametrize("access", list(apersist.SnapshotAccess))
@pytest.mark.parametrize("mode", list(apersist.PersistenceMode))
async def test_batches_follow_every_mode_as_record_does(
        backend: apersist.Backend, access: apersist.SnapshotAccess,
        mode: apersist.PersistenceMode) -> None:
    """Whatever record() keeps under a mode, record_many() keeps too, and nothing more."""
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("one").record("seed", offset=0)
        await run.stream("many").record("seed", offset=0)
    cfg = apersist.Config(backend, snapshot_access=access, persistence_mode=mode)
    async with apersist.run(cfg) as run:
        for i in (1, 2):
            await run.stream("one").record(f"v{i}", offset=i)
        await run.stream("many").record_many(["v1", "v2"], offsets=[1, 2])
        with pytest.raises(TypeError, match="batch index 1"):
            await run.stream("many").record_many(["ok", object()])
    async with apersist.run(apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        one = [(e.value, e.offset) async for e in run.stream("one").replay()]
        many = [(e.value, e.offset) async for e in run.stream("many").replay()]
        assert many == one
        assert run.stream("many").offset == run.stream("one").offset


async def test_record_many_after_the_run_raises(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
    with pytest.raises(RuntimeError, match="the run has ended"):
        await stream.record_many(["late"])


async def test_long_batches_with_sparse_offsets_replay_exactly(backend: apersist.Backend) -> None:
    """Replay walks a segment a chunk (a batch record) at a time; offsets may start
    mid-chunk and mid-batch."""
    count = 3_000
    offsets = [i if i in (1_500, 2_047, 2_048, 2_999) else None for i in range(count)]
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record_many(range(count), offsets=offsets)
        await run.stream("s").record_many([{"v": i} for i in range(count)])
    got = await replayed(backend, "s")
    assert [e.value for e in got] == [*range(count), *({"v": i} for i in range(count))]
    assert [e.offset for e in got] == [*offsets, *[None] * count]


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_batch_writes_the_bytes_that_single_records_write(
        backend_factory: Callable[[str], apersist.Backend]) -> None:
    """Same format: a segment framed by record_many() is byte for byte record()'s."""
    batch: list[Any] = [{"id": 1}, "hi", None, [1.5, {"x": None}]]
    offsets = [1, None, {"pos": 3}, None]
    singles, batched = backend_factory("singles"), backend_factory("batched")
    for backend, many in ((singles, False), (batched, True)):
        async with apersist.run(apersist.Config(backend), clock_ms=FakeClock(42)) as run:
            stream = run.stream("s")
            if many:
                await stream.record_many(batch, offsets=offsets)
            else:
                for value, offset in zip(batch, offsets, strict=True):
                    await stream.record(value, offset=offset)
    one, other = await stored_objects(singles), await stored_objects(batched)
    segments = sorted(key for key in one if key.endswith(".seg"))
    assert segments
    assert segments == sorted(key for key in other if key.endswith(".seg"))
    assert [one[key] for key in segments] == [other[key] for key in segments]


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
@pytest.mark.parametrize("many", [False, True], ids=["record", "record_many"])
async def test_a_batch_record_holds_at_most_batch_entries_events(
        backend_factory: Callable[[str], apersist.Backend], many: bool) -> None:
    """Replay decodes a batch's values together, so both writers cap a batch record at
    BATCH_ENTRIES events, even for events of one millisecond (one time_ms)."""
    count = 2 * BATCH_ENTRIES + 10
    backend = backend_factory("capped")
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET),
                            clock_ms=FakeClock(42)) as run:
        stream = run.stream("s")
        if many:
            await stream.record_many(range(count))
        else:
            for i in range(count):
                await stream.record(i)
        await run.commit()
        refs = [s.ref for s in run._store.segments(fmt.KIND_EVENTS, "s")]
    objects = await stored_objects(backend)
    counts = [frame[3] for ref in refs for frame in fmt.SegmentView(ref, objects[ref.key]).frames()]
    assert counts == [BATCH_ENTRIES, BATCH_ENTRIES, 10]
    got = await replayed(backend, "s")
    assert [e.value for e in got] == list(range(count))
    assert {e.time_ms for e in got} == {42}
