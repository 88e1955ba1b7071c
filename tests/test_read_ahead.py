"""Replay reads segments ahead in a task of the run: order, early exits and errors."""

from __future__ import annotations

import anyio
import pytest

import apersist
from apersist import _format as fmt
from apersist._drivers import open_driver
from apersist._store import Store
from apersist.testing import FakeClock

SMALL = {"max_segment_bytes": 1024, "snapshot_interval_ms": 60_000}


async def _fill(backend: apersist.Backend, n: int) -> None:
    async with apersist.run(apersist.Config(backend, **SMALL)) as run:
        stream = run.stream("s")
        for i in range(n):
            await stream.record({"i": i, "pad": "x" * 40}, offset=i)
            if i % 50 == 49:
                await run.commit()


async def test_read_ahead_keeps_order_across_many_windows(backend: apersist.Backend) -> None:
    await _fill(backend, 3000)  # ~150 segments: about ten read-ahead windows
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        first = [e.value["i"] async for e in stream.replay()]
        second = [e.value["i"] async for e in stream.replay()]
    assert first == second == list(range(3000))


async def test_breaking_out_early_leaves_no_work_behind(backend: apersist.Backend) -> None:
    await _fill(backend, 2000)
    with anyio.fail_after(30):
        async with apersist.run(apersist.Config(backend)) as run:
            seen = []
            async for event in run.stream("s").replay():
                seen.append(event.value["i"])
                if len(seen) == 10:
                    break
            # Two replays at once, each with its own read-ahead.
            async with anyio.create_task_group() as tg:
                counts: list[int] = []

                async def count() -> None:
                    counts.append(len([e async for e in run.stream("s").replay()]))

                tg.start_soon(count)
                tg.start_soon(count)
    assert seen == list(range(10))
    assert counts == [2000, 2000]


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_damaged_later_segment_raises_after_the_good_ones() -> None:
    backend = apersist.Backend.memory()
    await _fill(backend, 2000)
    segments = sorted(k for k in backend.objects if k.endswith(".seg"))
    victim = segments[len(segments) * 3 // 4]
    data = bytearray(backend.objects[victim])
    data[len(data) // 2] ^= 0x55
    backend.objects[victim] = bytes(data)
    seen = 0
    with anyio.fail_after(30), pytest.raises(apersist.CorruptDataError, match=victim):  # noqa: PT012 (raised mid-replay)
        async with apersist.run(apersist.Config(backend)) as run:
            async for _event in run.stream("s").replay():
                seen += 1
    assert 0 < seen < 2000


async def test_read_concurrency_bounds_a_window(backend: apersist.Backend) -> None:
    """``Store(read_concurrency=n)`` reads windows of at most ``n`` segments, and may be
    changed between reads (the benchmarks compare replay at 16 and at 1 this way)."""
    await _fill(backend, 600)  # ~30 segments
    driver = open_driver(backend)
    try:
        store = Store(driver, clock_ms=FakeClock(), read_concurrency=4)
        await store.load()
        refs = [s.ref for s in store.segments(fmt.KIND_EVENTS, "s")]
        assert len(refs) > 16
        sizes = [len(views) async for views in store.read_windows(refs)]
        assert max(sizes) == 4
        assert sum(sizes) == len(refs)
        store.read_concurrency = 1
        assert [len(views) async for views in store.read_windows(refs)] == [1] * len(refs)
        assert Store(driver, clock_ms=FakeClock()).read_concurrency == 16
    finally:
        await driver.aclose()
