"""``run.source_batches()``: a source a batch at a time, with the guarantees of ``source()``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import replayed, table_state

import apersist


def batches_of(size: int, stop: int, calls: list[Any] | None = None) -> Callable[[Any], Any]:
    """A seekable reader of items 0..stop-1 in batches of ``size``, each batch's offset the
    number of its last item."""

    async def read(offset: Any) -> AsyncIterator[Any]:
        if calls is not None:
            calls.append(offset)
        first = 0 if offset is None else offset + 1
        for start in range(first, stop, size):
            end = min(stop, start + size)
            yield [{"item": i} for i in range(start, end)], end - 1

    return read


async def test_live_batches_are_recorded_and_replay_as_events(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        got = [b async for b in run.source_batches("items", batches_of(300, 1000))]
    assert [len(b.values) for b in got] == [300, 300, 300, 100]
    assert [b.offset for b in got] == [299, 599, 899, 999]
    assert not any(b.replayed for b in got)
    events = await replayed(backend, "items")
    assert [e.value["item"] for e in events] == list(range(1000))
    # The offset is stored with the last value of each batch only.
    assert [e.offset for e in events if e.offset is not None] == [299, 599, 899, 999]


async def test_a_restart_replays_in_chunks_then_resumes_from_the_offset(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        async for _batch in run.source_batches("items", batches_of(300, 600)):
            pass
    calls: list[Any] = []
    async with apersist.run(apersist.Config(backend)) as run:
        got = [b async for b in run.source_batches("items", batches_of(300, 900, calls))]
    assert calls == [599]
    replayed_values = [v["item"] for b in got if b.replayed for v in b.values]
    assert replayed_values == list(range(600))
    assert all(len(b.values) <= 256 for b in got if b.replayed)
    assert [b.offset for b in got if b.replayed][-1] == 599
    assert [v["item"] for b in got if not b.replayed for v in b.values] == list(range(600, 900))


async def test_a_batch_is_committed_with_the_state_derived_from_it(
        backend: apersist.Backend) -> None:
    with anyio.CancelScope() as scope:
        async with apersist.run(apersist.Config(backend)) as run:
            table = await run.table("sums")
            async for batch in run.source_batches("items", batches_of(100, 1000)):
                if batch.offset == 499:
                    scope.cancel()  # interrupted before any state was derived from it
                    await anyio.lowlevel.checkpoint()
                table["sum"] = table.get("sum", 0) + sum(v["item"] for v in batch.values)
                table["last"] = batch.offset
                if batch.offset == 399:
                    await run.commit()
    state = await table_state(backend, "sums")
    assert state == {"sum": sum(range(400)), "last": 399}
    calls: list[Any] = []
    async with apersist.run(apersist.Config(backend)) as run:
        live = [b async for b in run.source_batches("items", batches_of(100, 1000, calls))
                if not b.replayed]
    assert calls == [399]
    assert live[0].values[0] == {"item": 400}


async def test_a_bad_value_raises_naming_the_stream_and_index_and_records_nothing(
        backend: apersist.Backend) -> None:
    async def read(offset: Any) -> AsyncIterator[Any]:
        yield [1, 2], 1
        yield [3, object(), 5], 4

    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(TypeError, match=r"stream 'items'.*batch index 1"):
            async for _batch in run.source_batches("items", read):
                pass
    assert [e.value for e in await replayed(backend, "items")] == [1, 2]


@pytest.mark.parametrize("item", ["abc", 5, {"a": 1}])
async def test_an_item_that_is_not_a_batch_raises_type_error(
        backend: apersist.Backend, item: Any) -> None:
    async def read(offset: Any) -> AsyncIterator[Any]:
        yield item

    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(TypeError, match="yields batches"):
            async for _batch in run.source_batches("items", read):
                pass


async def test_an_empty_batch_with_an_offset_moves_the_offset(backend: apersist.Backend) -> None:
    async def read(offset: Any) -> AsyncIterator[Any]:
        yield [], 41

    async with apersist.run(apersist.Config(backend)) as run:
        got = [b async for b in run.source_batches("items", read)]
    assert [(b.values, b.offset) for b in got] == [([], 41)]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("items").offset == 41


async def test_per_event_and_batch_sources_take_turns_without_replaying_twice(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        async for _batch in run.source_batches("items", batches_of(10, 30)):
            pass
    async with apersist.run(apersist.Config(backend, continue_after_replay=False)) as run:
        first = []
        async for event in run.source("items", batches_of(10, 30)):
            first.append(event.value["item"])
            if len(first) == 12:
                break
        rest = [v["item"] async for b in run.source_batches("items", batches_of(10, 30))
                for v in b.values]
    assert first + rest == list(range(30))


async def test_continue_after_replay_false_ends_after_the_replay(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        async for _batch in run.source_batches("items", batches_of(10, 20)):
            pass

    def never(offset: Any) -> AsyncIterator[Any]:
        raise AssertionError("the reader must not be called")

    async with apersist.run(apersist.Config(backend, continue_after_replay=False)) as run:
        got = [b async for b in run.source_batches("items", never)]
    assert [v["item"] for b in got for v in b.values] == list(range(20))
    assert all(b.replayed for b in got)


async def test_offsets_only_stores_the_offsets_and_no_events(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.OFFSETS_ONLY)
    async with apersist.run(cfg) as run:
        async for _batch in run.source_batches("items", batches_of(10, 25)):
            pass
    async with apersist.run(cfg) as run:
        assert run.stream("items").offset == 24
    assert await replayed(backend, "items") == []


async def test_commit_inside_the_loop_body_does_not_wait_for_itself(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as run:
        with anyio.fail_after(10):
            async for batch in run.source_batches("items", batches_of(5, 20)):
                info = await run.commit()
                assert info.deltas >= len(batch.values)
    assert len(await replayed(backend, "items")) == 20
