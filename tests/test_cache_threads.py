"""``@cached`` sync functions called from worker threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import anyio
import anyio.to_thread

import apersist


async def test_sync_cached_function_in_a_worker_thread_is_persisted() -> None:
    calls: list[int] = []

    @apersist.cached(name="square-in-thread")
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(square, 7) == 49
    assert calls == [7]


async def test_a_sync_call_finishing_in_a_thread_after_the_run_ended_raises_in_no_callback() -> None:
    """The thread hands its entry to the loop; once the run has ended it is not persisted,
    and nothing raises in the loop's callback (which asyncio would log as an error)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @apersist.cached(name="slow-in-thread")
    def slow(x: int) -> int:
        calls.append(x)
        started.set()
        release.wait(10)
        return x + 1

    backend = apersist.Backend.memory()
    results: list[int] = []

    async def call_in_thread() -> None:
        results.append(await anyio.to_thread.run_sync(slow, 1))

    try:
        async with anyio.create_task_group() as tg:
            async with apersist.run(apersist.Config(backend)):
                tg.start_soon(call_in_thread)  # in the run's context: its cache
                await anyio.to_thread.run_sync(started.wait, 10)
            release.set()  # the run has ended: the call finishes now
        # The thread handed its entry over before its result, so the callback has run.
        await anyio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert results == [2]
    assert reported == []
    async with apersist.run(apersist.Config(backend)):
        assert await anyio.to_thread.run_sync(slow, 1) == 2  # not persisted: called again
    assert calls == [1, 1]


def test_a_sync_call_finishing_in_a_thread_after_the_loop_closed_returns_its_result() -> None:
    """Handing the entry to a closed loop raises in the thread; the call returns anyway."""
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    @apersist.cached(name="slow-after-the-loop")
    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x + 1

    def call() -> None:
        try:
            outcome.append(slow(1))
        except BaseException as exc:  # what the thread's caller would get
            outcome.append(exc)

    async def main() -> threading.Thread:
        async with apersist.run(apersist.Config(apersist.Backend.memory())):
            thread = threading.Thread(target=contextvars.copy_context().run, args=(call,))
            thread.start()
            await anyio.to_thread.run_sync(started.wait, 10)
        return thread

    thread = asyncio.run(main())  # closes its loop
    release.set()
    thread.join(10)
    assert outcome == [2]
