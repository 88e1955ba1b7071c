"""``run.stop()`` and ``stop_on_signals``: sources end after the event in hand, the final
commit lands, the block leaves normally, and a restart goes on right after it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import apersist


def _config(backend: apersist.Backend, **options: Any) -> apersist.Config:
    return apersist.Config(backend, **options)


async def _replayed(backend: apersist.Backend, stream: str = "q") -> list[Any]:
    config = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        return [event.value async for event in run.stream(stream).replay()]


def _queue_reader(queue: asyncio.Queue[Any]) -> Any:
    """A reader that cannot seek: what it hands over is gone from the queue."""
    async def read(offset: Any) -> AsyncIterator[Any]:
        while True:
            yield await queue.get()
    return read


async def _numbers(offset: int | None) -> AsyncIterator[tuple[int, int]]:
    i = 0 if offset is None else offset + 1
    while True:
        yield i, i
        i += 1


async def test_stop_wakes_a_source_waiting_for_its_reader(backend: apersist.Backend) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for i in range(5):
        queue.put_nowait({"i": i})
    seen: list[int] = []
    drained = asyncio.Event()
    async with apersist.run(_config(backend)) as run:
        counts = await run.table("counts")

        async def stop_when_drained() -> None:
            await drained.wait()
            await asyncio.sleep(0.05)  # the source now waits on an empty queue
            run.stop()

        stopper = asyncio.create_task(stop_when_drained())
        async for event in run.source("q", _queue_reader(queue)):
            seen.append(event.value["i"])
            counts["n"] = counts.get("n", 0) + 1
            if len(seen) == 5:
                drained.set()
        await stopper
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        assert run.stopping
    queue.put_nowait({"i": 5})  # put after the stop: never taken from the queue
    assert seen == [0, 1, 2, 3, 4]
    assert [v["i"] for v in await _replayed(backend)] == [0, 1, 2, 3, 4]
    assert queue.qsize() == 1


async def test_stop_from_a_loop_body_ends_after_that_event(backend: apersist.Backend) -> None:
    async with apersist.run(_config(backend)) as run:
        totals = await run.table("totals")
        async for event in run.source("q", _numbers):
            await asyncio.sleep(0)  # a body that awaits: not cancelled by the stop
            totals["sum"] = totals.get("sum", 0) + event.value
            if event.value == 41:
                run.stop()
                await asyncio.sleep(0.01)  # the rest of the body still runs
                totals["after"] = True
    async with apersist.run(_config(backend)) as run:
        totals = await run.table("totals")
        assert dict(totals) == {"sum": sum(range(42)), "after": True}
        offsets: list[Any] = []

        async def reader(offset: Any) -> AsyncIterator[tuple[int, int]]:
            offsets.append(offset)
            async for item in _numbers(offset):
                yield item

        replayed = []
        async for event in run.source("q", reader):
            if event.replayed:
                replayed.append(event.value)
                continue
            assert event.value == 42  # resumes right after the last event processed
            break
        assert replayed == list(range(42))
        assert offsets == [41]


async def test_stop_while_a_body_works_waits_for_the_body(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    finished: list[int] = []
    async with apersist.run(_config(backend)) as run:
        async for event in run.source("q", _numbers):
            if event.value == 3:
                asyncio.get_running_loop().call_later(0.01, run.stop)
                await asyncio.sleep(0.1)  # the stop comes while this body sleeps
            finished.append(event.value)
    assert finished == [0, 1, 2, 3]
    assert await _replayed(backend) == [0, 1, 2, 3]


async def test_stop_during_replay_ends_it_and_never_calls_the_reader(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    async with apersist.run(_config(backend)) as run:
        await run.stream("q").record_many(list(range(5000)), offsets=list(range(5000)))
    called: list[Any] = []

    async def reader(offset: Any) -> AsyncIterator[int]:
        called.append(offset)
        yield 0

    async with apersist.run(_config(backend)) as run:
        got = []
        async for event in run.source("q", reader):
            got.append(event.value)
            if len(got) == 10:
                run.stop()
        assert 10 <= len(got) < 5000
        assert got == list(range(len(got)))
        assert called == []


async def test_stop_ends_batch_sources_after_the_batch_in_hand(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    queue.put_nowait(([1, 2, 3], 3))
    queue.put_nowait(([4, 5], 5))

    async def reader(offset: Any) -> AsyncIterator[Any]:
        while True:
            yield await queue.get()

    async with apersist.run(_config(backend)) as run:
        batches = []
        asyncio.get_running_loop().call_later(0.1, run.stop)  # while the reader waits
        async for batch in run.source_batches("q", reader):
            batches.append(batch.values)
        assert batches == [[1, 2, 3], [4, 5]]
    assert await _replayed(backend) == [1, 2, 3, 4, 5]


async def test_a_real_cancellation_is_never_swallowed(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    entered = asyncio.Event()

    async def consume(run: apersist.Run) -> None:
        entered.set()
        async for _ in run.source("q", _queue_reader(queue)):
            pass

    async with apersist.run(_config(backend)) as run:
        task = asyncio.create_task(consume(run))
        await entered.wait()
        await asyncio.sleep(0.02)  # the source waits on the empty queue
        task.cancel()  # someone else's cancellation, in the same step as the stop
        run.stop()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_reader_that_asks_for_the_stop_hands_over_its_item(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    runs: list[apersist.Run] = []

    async def reader(offset: Any) -> AsyncIterator[int]:
        yield 1
        runs[0].stop()  # from inside the reader: nothing is cancelled
        yield 2
        yield 3

    async with apersist.run(_config(backend)) as run:
        runs.append(run)
        got = [event.value async for event in run.source("q", reader)]
        await asyncio.sleep(0.01)  # a pending cancellation would land here
    assert got == [1, 2]
    assert await _replayed(backend) == [1, 2]


async def test_wait_stopping_and_stop_are_idempotent(tmp_path: Path) -> None:
    async with apersist.run(_config(apersist.Backend.filesystem(tmp_path))) as run:
        assert not run.stopping
        waiter = asyncio.create_task(run.wait_stopping())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        run.stop()
        run.stop()
        await asyncio.wait_for(waiter, 1)
        assert run.stopping
    run.stop()  # after the block: nothing to do, no error


async def test_stop_on_signals_first_stops_second_cancels(tmp_path: Path) -> None:
    backend = apersist.Backend.filesystem(tmp_path)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    seen: list[int] = []
    async with apersist.run(_config(backend), stop_on_signals=True) as run:
        async for event in run.source("q", _numbers):
            seen.append(event.value)
            if event.value == 9:
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.05)  # the handler runs on the loop meanwhile
    assert seen == list(range(10))
    assert await _replayed(backend) == list(range(10))
    assert {sig: signal.getsignal(sig) for sig in before} == before

    host_cancelled = False
    try:
        async with apersist.run(_config(backend), stop_on_signals=True) as run:
            os.kill(os.getpid(), signal.SIGINT)
            await run.wait_stopping()
            os.kill(os.getpid(), signal.SIGINT)  # the second one cancels this task
            await asyncio.sleep(5)
    except asyncio.CancelledError:
        host_cancelled = True
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
    assert host_cancelled
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_stop_on_signals_needs_the_main_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def in_thread() -> None:
        async def body() -> None:
            async with apersist.run(_config(apersist.Backend.filesystem(tmp_path)),
                                    stop_on_signals=True):
                pass
        try:
            asyncio.run(body())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "stop_on_signals" in str(errors[0])


def test_stop_on_signals_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="stop_on_signals"):
        apersist.run(_config(apersist.Backend.filesystem(tmp_path)), stop_on_signals=1)  # type: ignore[arg-type]


async def test_a_loop_signal_handler_of_the_application_comes_back(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    mine: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, mine.append, "mine")
    try:
        async with apersist.run(_config(apersist.Backend.filesystem(tmp_path)),
                                stop_on_signals=True) as run:
            os.kill(os.getpid(), signal.SIGTERM)
            await run.wait_stopping()  # ours, while the block runs
        assert mine == []
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if mine:
                break
            await asyncio.sleep(0.01)
        assert mine == ["mine"]  # the application's, once the block is left
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_wait_stopping_lets_go_once_the_run_has_ended(tmp_path: Path) -> None:
    """A task outside the block that waits for a stop must not wait for good once the run
    has ended without one."""
    async with apersist.run(_config(apersist.Backend.filesystem(tmp_path))) as run:
        waiter = asyncio.create_task(run.wait_stopping())
        await asyncio.sleep(0.01)
        assert not waiter.done()
    await asyncio.wait_for(waiter, 1)
    assert not run.stopping  # let go, not stopped
