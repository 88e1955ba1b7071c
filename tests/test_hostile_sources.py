"""A hostile user's programs against run.source() and run.source_batches(): the guarantees
that a live event is committed with the state derived from it, and left out when its
consumer was interrupted, whichever task fetches the event for the loop body."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import crash_state, numbers_up_to

import apersist


async def _batches(offset: int | None, stop: int) -> AsyncIterator[tuple[list[int], int]]:
    start = 0 if offset is None else offset + 1
    for i in range(start, stop):
        yield [i], i


def _source(run: apersist.Run, batches: bool, stop: int) -> Any:
    if batches:
        return run.source_batches("numbers", lambda off: _batches(off, stop))
    return run.source("numbers", lambda off: numbers_up_to(off, stop))


@pytest.mark.parametrize("batches", [False, True], ids=["source", "source_batches"])
async def test_an_event_fetched_by_wait_for_is_committed_with_its_state(batches: bool) -> None:
    # ``await asyncio.wait_for(anext(it), t)``, the everyday "next event or time out": on
    # Python 3.11 the anext runs in a task of its own, which ends as soon as it hands the
    # event over. A commit asked for while the body works on the event must still wait
    # for the body, or a crash leaves the event committed without the state derived
    # from it, and the restart never delivers it again.
    backend = apersist.Backend.memory()
    crashes: list[dict[str, bytes]] = []
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as run:
        sums = await run.table("sums")
        it = _source(run, batches, 3)
        commits = []
        while True:
            try:
                await asyncio.wait_for(anext(it), 5)
            except StopAsyncIteration:
                break
            commits.append(asyncio.create_task(run.commit()))  # another task's commit
            await asyncio.sleep(0.01)  # the body's work: the commit must wait for it
            crashes.append(dict(backend.objects))  # a crash here
            sums["count"] = sums.get("count", 0) + 1
        await asyncio.gather(*commits)
    for objects in crashes:
        events, table, _offset = await crash_state(objects)
        assert table.get("count", 0) == len(events), (events, table)


@pytest.mark.parametrize("batches", [False, True], ids=["source", "source_batches"])
async def test_a_task_the_iterator_was_handed_to_leaves_its_event_out_when_cancelled(
        batches: bool) -> None:
    # The first event is taken by the block's task, the rest by a task it hands the
    # iterator to. That task is cancelled in its loop body before it changed any state:
    # the event it holds must be left out (the restart reads it again), not committed
    # as if it had been applied.
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as run:
        sums = await run.table("sums")
        it = _source(run, batches, 10)
        await anext(it)
        sums["count"] = 1
        started = asyncio.Event()

        async def consume() -> None:
            async for _event in it:
                started.set()
                await asyncio.sleep(3600)  # cancelled here, before any write
                sums["count"] += 1

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await run.commit()
    events, table, offset = await crash_state(backend.objects)
    assert (events, table, offset) == ([0], {"count": 1}, 0)
    # The restart reads the event again and applies it once.
    async with apersist.run(apersist.Config(backend)) as run:
        sums = await run.table("sums")
        async for event in _source(run, batches, 10):
            if not event.replayed:
                sums["count"] += 1
    events, table, offset = await crash_state(backend.objects)
    assert (events, table, offset) == (list(range(10)), {"count": 10}, 9)


async def test_a_record_on_the_sources_own_stream_comes_after_the_event() -> None:
    # API.md: the source "records each item before yielding it". What the loop body
    # records on the same stream in response must replay after the event.
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("numbers")
        async for event in run.source("numbers", lambda off: numbers_up_to(off, 2)):
            await stream.record(f"after {event.value}")
    events, _table, _offset = await crash_state(backend.objects)
    assert events == [0, "after 0", 1, "after 1"]


async def test_records_on_the_sources_own_stream_keep_their_order_across_commits() -> None:
    # The event is buffered early, when its body records on the same stream; it stays
    # held: a commit taken by another task waits for the body, and a restart resumes after
    # it, neither losing nor repeating the body's records.
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as run:
        stream = run.stream("numbers")
        async for event in run.source("numbers", lambda off: numbers_up_to(off, 50)):
            await stream.record(f"after {event.value}")
            await stream.record_many([f"more {event.value}"])
    events, _table, offset = await crash_state(backend.objects)
    expected = [x for i in range(50) for x in (i, f"after {i}", f"more {i}")]
    assert (events, offset) == (expected, 49)
