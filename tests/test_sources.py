"""``run.source()``: replay, then read live items from the committed offset."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import pytest
from helpers import replayed

import apersist
import apersist._values
from apersist.testing import FakeClock


class Reader:
    """A source reader that remembers the offsets it was called with."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.calls: list[Any] = []

    def __call__(self, offset: Any) -> AsyncIterator[Any]:
        self.calls.append(offset)
        return self._read()

    async def _read(self) -> AsyncIterator[Any]:
        for item in self.items:
            yield item


def numbered(start: int, stop: int) -> Reader:
    """A seekable source of items ``start..stop-1``, each with its own number as offset."""

    class Seekable(Reader):
        async def _read(self) -> AsyncIterator[Any]:
            offset = self.calls[-1]
            first = start if offset is None else offset + 1
            assert first == start, f"asked to resume at {first}, expected {start}"
            for i in range(first, stop):
                yield {"item": i}, i

    return Seekable([])


def never(offset: Any) -> AsyncIterator[Any]:
    raise AssertionError(f"the reader must not be called: offset={offset!r}")


async def test_source_records_live_items_and_yields_live_events(backend: apersist.Backend) -> None:
    clock = FakeClock(5_000)
    reader = Reader(["plain", ("with-offset", 1), {"dict": 2}, (["v"], {"pos": 3})])
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        events = [e async for e in run.source("orders", reader)]
        assert reader.calls == [None]
        assert [(e.value, e.offset) for e in events] == [
            ("plain", None), ("with-offset", 1), ({"dict": 2}, None), (["v"], {"pos": 3})]
        assert all(e.replayed is False for e in events)
        assert all(e.time_ms == 5_000 for e in events)
    stored = await replayed(backend, "orders")
    assert [(e.value, e.offset, e.replayed) for e in stored] == [
        ("plain", None, True), ("with-offset", 1, True), ({"dict": 2}, None, True),
        (["v"], {"pos": 3}, True)]


async def test_source_replays_first_then_calls_the_reader_with_the_committed_offset(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        async for _ in run.source("s", Reader([("a", 10), ("b", 11), "c"])):
            pass
    reader = Reader([("d", 12)])
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 11
        events = [e async for e in run.source("s", reader)]
        assert reader.calls == [11]
    assert [(e.value, e.offset, e.replayed) for e in events] == [
        ("a", 10, True), ("b", 11, True), ("c", None, True), ("d", 12, False)]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 12


async def test_continue_after_replay_false_ends_after_the_replay(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        async for _ in run.source("s", Reader([1, 2, 3])):
            pass
    cfg = apersist.Config(backend, continue_after_replay=False)
    async with apersist.run(cfg) as run:
        assert run.continue_after_replay is False
        events = [e async for e in run.source("s", never)]
    assert [(e.value, e.replayed) for e in events] == [(1, True), (2, True), (3, True)]


async def test_a_restart_resumes_with_no_duplicate_and_no_gap(backend: apersist.Backend) -> None:
    first = numbered(0, 10)
    async with apersist.run(apersist.Config(backend)) as run:
        live = [e async for e in run.source("feed", first)]
        await run.commit()
        assert run.stream("feed").offset == 9
    assert first.calls == [None]
    assert [e.value["item"] for e in live] == list(range(10))

    second = numbered(10, 20)
    async with apersist.run(apersist.Config(backend)) as run:
        events = [e async for e in run.source("feed", second)]
    assert second.calls == [9]
    assert [(e.value["item"], e.replayed) for e in events] == (
        [(i, True) for i in range(10)] + [(i, False) for i in range(10, 20)])

    cfg = apersist.Config(backend, continue_after_replay=False)
    async with apersist.run(cfg) as run:
        union = [e async for e in run.source("feed", never)]
        assert run.stream("feed").offset == 19
    assert [e.value["item"] for e in union] == list(range(20))
    assert [e.offset for e in union] == list(range(20))


async def test_a_restart_after_cancellation_resumes_from_the_last_commit(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=60_000)
    with anyio.CancelScope() as scope:
        async with apersist.run(cfg) as run:
            async for event in run.source("feed", numbered(0, 10)):
                if event.offset == 4:
                    await run.commit()
                if event.offset == 7:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    resumed = numbered(5, 8)
    async with apersist.run(apersist.Config(backend)) as run:
        events = [e async for e in run.source("feed", resumed)]
    assert resumed.calls == [4]
    assert [e.value["item"] for e in events] == list(range(8))


async def test_an_async_generator_function_works_as_a_reader(backend: apersist.Backend) -> None:
    seen: list[Any] = []

    async def read(offset: Any) -> AsyncIterator[Any]:
        seen.append(offset)
        start = 0 if offset is None else offset + 1
        for i in range(start, start + 3):
            yield i, i

    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.source("s", read)] == [0, 1, 2]
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.source("s", read)] == [0, 1, 2, 3, 4, 5]
    assert seen == [None, 2]


async def test_only_two_tuples_are_value_offset_pairs(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        live = [e async for e in run.source("s", Reader([(1, 2, 3), (4,), [5, 6]]))]
    assert [(e.value, e.offset) for e in live] == [((1, 2, 3), None), ((4,), None), ([5, 6], None)]
    assert [(e.value, e.offset) for e in await replayed(backend, "s")] == [
        ([1, 2, 3], None), ([4], None), ([5, 6], None)]


async def test_a_two_field_named_tuple_is_a_value_offset_pair(backend: apersist.Backend) -> None:
    class Item(NamedTuple):
        value: str
        offset: int

    async with apersist.run(apersist.Config(backend)) as run:
        live = [e async for e in run.source("s", Reader([Item("a", 1), Item("b", 2)]))]
    assert [(e.value, e.offset) for e in live] == [("a", 1), ("b", 2)]
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 2


@pytest.mark.parametrize("result", [[1, 2], None, 5, "text"])
async def test_a_reader_returning_no_async_iterable_raises_type_error(
        backend: apersist.Backend, result: Any) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(TypeError, match="async iterable"):
            async for _ in run.source("s", lambda offset: result):
                pass


async def test_a_reader_that_is_not_callable_raises_type_error(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        bad: Any = [1, 2]
        with pytest.raises(TypeError):
            run.source("s", bad)


async def test_a_bad_live_item_raises_type_error_naming_the_stream(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        got: list[Any] = []

        async def consume() -> None:
            async for event in run.source("sensor-1", Reader([("ok", 1), (object(), 2)])):
                got.append(event.value)

        with pytest.raises(TypeError, match="sensor-1"):
            await consume()
        assert got == ["ok"]
    events = await replayed(backend, "sensor-1")
    assert [(e.value, e.offset) for e in events] == [("ok", 1)]


async def test_source_with_an_invalid_name_raises_value_error(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(ValueError, match="name"):
            run.source("bad name", Reader([]))


@pytest.fixture
def no_stalled_cut(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if a commit had to give up waiting for a held source event.

    The wait is bounded (a warning, then a cut that may split an event from its state), so
    a deadlock shows as this warning rather than as a hang.
    """
    caplog.set_level(logging.WARNING, logger="apersist")
    yield
    stalled = [r.getMessage() for r in caplog.get_records("call")
               if "live source events are still being processed" in r.getMessage()]
    assert not stalled


@pytest.mark.usefixtures("no_stalled_cut")
@pytest.mark.parametrize("interval", [0, 5])
async def test_commit_inside_a_source_loop_does_not_deadlock(
        backend: apersist.Backend, interval: int) -> None:
    """The scheduler's own commit may be waiting for the event this task holds."""
    cfg = apersist.Config(backend, snapshot_interval_ms=interval)
    async with apersist.run(cfg) as run:
        table = await run.table("progress")
        with anyio.fail_after(10):
            async for event in run.source("feed", numbered(0, 20)):
                table["last"] = event.value["item"]
                await anyio.sleep(0.002)  # lets the scheduler start its own commit
                await run.commit()
                assert run.stream("feed").offset == event.offset
    async with apersist.run(apersist.Config(backend, continue_after_replay=False)) as run:
        assert [e.value["item"] async for e in run.source("feed", never)] == list(range(20))
        assert dict(await run.table("progress")) == {"last": 19}


@pytest.mark.usefixtures("no_stalled_cut")
async def test_concurrent_sources_committing_inside_their_loops_all_finish(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run:
        table = await run.table("progress")

        async def consume(name: str) -> None:
            async for event in run.source(name, numbered(0, 15)):
                table[name] = event.value["item"]
                await anyio.sleep(0.001)
                if event.offset % 3 == 0:
                    await run.commit()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for name in ("left", "right", "middle"):
                    tg.start_soon(consume, name)
    cfg = apersist.Config(backend, continue_after_replay=False)
    async with apersist.run(cfg) as run:
        for name in ("left", "right", "middle"):
            assert [e.offset async for e in run.source(name, never)] == list(range(15))
        assert dict(await run.table("progress")) == {"left": 14, "right": 14, "middle": 14}


@pytest.mark.usefixtures("no_stalled_cut")
async def test_one_task_reading_two_sources_in_turn_does_not_deadlock(
        backend: apersist.Backend) -> None:
    """Asking one source for its next event while holding another's lets a cut through."""
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run:
        table = await run.table("progress")
        left = run.source("left", numbered(0, 20))
        right = run.source("right", numbered(0, 20))
        with anyio.fail_after(10):
            for _ in range(20):
                event = await anext(left)
                table["left"] = event.offset
                # Lets the scheduler start a cut, and (20 ms) lets a commit finish even on
                # an object store, where one takes tens of milliseconds.
                await anyio.sleep(0.02)
                event = await anext(right)
                table["right"] = event.offset
                await anyio.sleep(0.02)
        assert run.stats["commits"] > 1
    cfg = apersist.Config(backend, continue_after_replay=False)
    async with apersist.run(cfg) as run:
        for name in ("left", "right"):
            assert [e.offset async for e in run.source(name, never)] == list(range(20))
        assert dict(await run.table("progress")) == {"left": 19, "right": 19}


@pytest.mark.usefixtures("no_stalled_cut")
async def test_a_source_left_mid_way_does_not_block_the_next_one(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run:
        first = run.source("first", numbered(0, 10))
        async for event in first:  # left mid-way; the iterator stays referenced
            if event.offset == 2:
                break
        await run.stream("other").record("x")
        await anyio.sleep(0.01)  # the scheduler may start a cut now
        with anyio.fail_after(10):
            assert [e.offset async for e in run.source("second", numbered(0, 5))] == list(range(5))
            await run.commit()
        assert run.stats["pending_deltas"] == 0
    cfg = apersist.Config(backend, continue_after_replay=False)
    async with apersist.run(cfg) as run:
        assert [e.offset async for e in run.source("first", never)] == [0, 1, 2]
        assert [e.offset async for e in run.source("second", never)] == list(range(5))


async def test_a_live_value_past_the_record_size_raises_value_error_naming_the_stream(
        backend: apersist.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apersist._values, "MAX_JSON_BYTES", 100_000)

    async def read(offset: Any) -> AsyncIterator[Any]:
        yield "small", 1
        yield "x" * 200_000, 2

    seen: list[Any] = []

    async def consume(run: apersist.Run) -> None:
        async for event in run.source("items", read):
            seen.append(event.value)

    async with apersist.run(apersist.Config(backend)) as run:
        with pytest.raises(ValueError, match=r"too large to store for stream 'items'"):
            await consume(run)
    assert seen == ["small"]
    assert [e.value for e in await replayed(backend, "items")] == ["small"]
