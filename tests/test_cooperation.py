"""Schedule points: a producer that awaits nothing but apersist still lets the loop run.

Each path is driven by a loop that never yields by itself, beside a ticker task; without
the schedule points the ticker would not run until the loop ends. The bounds here are
loose on purpose (a loaded CI machine); the figures against the 5 ms target are the
benchmark suite's (``python -m benchmarks --only stall``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from helpers import stored_objects

import apersist

# The ticker's longest wait that the tests accept, and how long each loop runs at least.
_WORST_GAP_S = 0.1
_LOOP_S = 0.4


class Ticker:
    """A task that wakes every millisecond and notes the longest gap between two wakes."""

    def __init__(self) -> None:
        self.ticks = 0
        self.worst = 0.0
        self._last = 0.0
        self.started = anyio.Event()  # set at the first tick

    async def run(self) -> None:
        self._last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - self._last)
            self._last = now
            self.ticks += 1
            self.started.set()


async def beside_a_ticker(body: Callable[[apersist.Run], Awaitable[None]], *,
                          backend: apersist.Backend | None = None,
                          clock_ms: Callable[[], int] | None = None, **config: Any) -> Ticker:
    """Run ``body`` in a run (on a new memory store by default) beside a ``Ticker``."""
    ticker = Ticker()
    config_ = apersist.Config(backend or apersist.Backend.memory(), **config)
    async with apersist.run(config_, clock_ms=clock_ms) as run, \
            anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await ticker.started.wait()
        ticker.worst = 0.0
        ticker.ticks = 0  # from here on: what the body lets the ticker do
        await body(run)
        tg.cancel_scope.cancel()
    return ticker


def until_loop_time(step: Callable[[int], Awaitable[None]]) -> Callable[[apersist.Run], Any]:
    """A loop calling ``step(i)`` for at least ``_LOOP_S``, awaiting nothing else."""

    async def body(run: apersist.Run) -> None:
        deadline = time.perf_counter() + _LOOP_S
        i = 0
        while True:
            for _ in range(1000):
                await step(i)
                i += 1
            if time.perf_counter() > deadline:
                return

    return body


def assert_cooperative(ticker: Ticker) -> None:
    assert ticker.ticks >= 10, f"the ticker ran {ticker.ticks} times during the loop"
    assert ticker.worst < _WORST_GAP_S, f"the ticker waited {ticker.worst * 1000:.1f} ms"


def row(i: int) -> dict[str, Any]:
    return {"k": i % 1000, "v": i, "s": "abc"}


async def test_record_yields_to_the_loop() -> None:
    def body(run: apersist.Run) -> Any:
        stream = run.stream("s")
        return until_loop_time(lambda i: stream.record(row(i)))(run)

    assert_cooperative(await beside_a_ticker(body))


async def test_record_with_offsets_yields_to_the_loop() -> None:
    def body(run: apersist.Run) -> Any:
        stream = run.stream("s")
        return until_loop_time(lambda i: stream.record(row(i), offset=i))(run)

    assert_cooperative(await beside_a_ticker(body))


async def test_record_with_a_clock_that_stands_still_yields_to_the_loop() -> None:
    def body(run: apersist.Run) -> Any:
        stream = run.stream("s")
        return until_loop_time(lambda i: stream.record(row(i)))(run)

    assert_cooperative(await beside_a_ticker(body, clock_ms=lambda: 1_000))


async def test_record_many_of_a_long_list_yields_to_the_loop() -> None:
    values = [row(i) for i in range(400_000)]  # made before the ticker starts

    async def body(run: apersist.Run) -> None:
        deadline = time.perf_counter() + _LOOP_S
        while time.perf_counter() < deadline:
            await run.stream("s").record_many(values)

    assert_cooperative(await beside_a_ticker(body, max_pending_bytes=1 << 30))


async def test_a_source_loop_with_table_writes_yields_to_the_loop() -> None:
    async def body(run: apersist.Run) -> None:
        table = await run.table("counts")
        deadline = time.perf_counter() + _LOOP_S

        async def read(offset: Any) -> AsyncIterator[Any]:
            i = 0
            while time.perf_counter() < deadline:
                yield row(i), i
                i += 1

        async for event in run.source("input", read):
            key = str(event.value["k"])
            table[key] = table.get(key, 0) + 1

    assert_cooperative(await beside_a_ticker(body))


async def test_a_batch_source_loop_yields_to_the_loop() -> None:
    async def body(run: apersist.Run) -> None:
        deadline = time.perf_counter() + _LOOP_S

        async def read(offset: Any) -> AsyncIterator[Any]:
            i = 0
            while time.perf_counter() < deadline:
                yield [row(j) for j in range(i, i + 100)], i + 99
                i += 100

        async for _batch in run.source_batches("input", read):
            pass

    assert_cooperative(await beside_a_ticker(body))


async def test_replay_yields_to_the_loop() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record_many([row(i) for i in range(300_000)])
    count = 0

    async def body(run: apersist.Run) -> None:
        nonlocal count
        started = time.perf_counter()
        while time.perf_counter() - started < _LOOP_S:
            async for _event in run.stream("s").replay():
                count += 1

    ticker = await beside_a_ticker(body, backend=backend)
    assert count >= 300_000
    assert_cooperative(ticker)


async def test_compressing_and_decompressing_big_segments_does_not_stall_the_loop() -> None:
    """Segments of 32 MiB of raw records: zstd compresses each in a worker thread at the
    commit, and decompresses it in one when replay reads it back; inline, either would
    hold the loop for tens of ms."""
    backend = apersist.Backend.memory()
    big = [{"n": i, "pad": f"{i % 97:04d}" * 40} for i in range(150_000)]  # about 26 MiB

    async def write(run: apersist.Run) -> None:
        await run.stream("s").record_many(big)
        await run.commit()

    config = {"max_segment_bytes": 32 << 20, "max_pending_bytes": 1 << 30}
    assert_cooperative(await beside_a_ticker(write, backend=backend, **config))
    stored = await stored_objects(backend)
    segments = [d for k, d in stored.items() if k.endswith(".seg")]
    assert b'"codec":"zstd"' in max(segments, key=len)
    assert sum(map(len, segments)) < (8 << 20)  # stored compressed
    count = 0

    async def read(run: apersist.Run) -> None:
        nonlocal count
        async for _event in run.stream("s").replay():
            count += 1

    assert_cooperative(await beside_a_ticker(read, backend=backend, **config))
    assert count == len(big)


@pytest.mark.parametrize("interval_ms", [50])
async def test_periodic_commits_land_during_a_loop_that_never_yields(interval_ms: int) -> None:
    async with apersist.run(apersist.Config(apersist.Backend.memory(),
                                            snapshot_interval_ms=interval_ms)) as run:
        stream = run.stream("s")
        before = run.stats["commits"]
        deadline = time.perf_counter() + _LOOP_S
        i = 0
        while time.perf_counter() < deadline:
            for _ in range(1000):
                await stream.record(row(i), offset=i)
                i += 1
        during = run.stats["commits"] - before
    # About _LOOP_S / interval (8); a commit that waited for the loop to end would be 0.
    assert during >= 3, f"{during} commits landed during a {_LOOP_S}s loop"


def test_brisk_thread_switching_shortens_the_interval_and_restores_it() -> None:
    import sys

    from apersist._concurrency import BRISK_SWITCH_S, brisk_thread_switching

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with brisk_thread_switching():
            assert sys.getswitchinterval() == pytest.approx(BRISK_SWITCH_S)
            with brisk_thread_switching():  # nested: the outer one restores
                pass
            assert sys.getswitchinterval() == pytest.approx(BRISK_SWITCH_S)
        assert sys.getswitchinterval() == pytest.approx(0.005)
        # Set by the application meanwhile: left as the application set it.
        with brisk_thread_switching():
            sys.setswitchinterval(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
        # Already shorter: left alone.
        sys.setswitchinterval(0.0001)
        with brisk_thread_switching():
            assert sys.getswitchinterval() == pytest.approx(0.0001)
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


async def test_a_filesystem_run_leaves_the_switch_interval_as_it_found_it(tmp_path: Any) -> None:
    import sys

    before = sys.getswitchinterval()
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(str(tmp_path)))) as run:
        for i in range(50):
            await run.stream("s").record(row(i), offset=i)
            await run.commit()
    assert sys.getswitchinterval() == before
