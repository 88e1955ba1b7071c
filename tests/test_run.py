"""A run's lifecycle: how leaving commits (or not), commit(), config, stats, idleness."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import counting, replayed, values, wait_until

import apersist
from apersist.testing import FakeClock

QUIET = 60_000  # a snapshot interval long enough that the scheduler never commits on its own


async def test_leaving_normally_commits_everything(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stream = run.stream("orders")
        for i in range(5):
            await stream.record({"n": i}, offset=i)
        table = await run.table("counts")
        table["a"] = 1
        assert run.stats["commits"] == 0
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.stream("orders").replay()] == [{"n": i} for i in range(5)]
        assert run.stream("orders").offset == 4
        assert dict(await run.table("counts")) == {"a": 1}


async def test_leaving_by_exception_commits_and_reraises_it_unchanged(
        backend: apersist.Backend) -> None:
    cause = KeyError("why")
    error = ValueError("boom")
    with pytest.raises(ValueError, match="boom") as info:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
            await run.stream("s").record(1, offset="a")
            await run.stream("s").record(2, offset="b")
            raise error from cause
    assert info.value is error
    assert error.__cause__ is cause
    assert error.__suppress_context__ is True
    assert error.__context__ is None
    assert error.args == ("boom",)
    assert await values(backend, "s") == [1, 2]


async def test_leaving_by_exception_keeps_implicit_context(backend: apersist.Backend) -> None:
    with pytest.raises(RuntimeError) as info:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend)) as run:
            await run.stream("s").record(1)
            try:
                raise KeyError("first")
            except KeyError:
                raise RuntimeError("second") from None
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True
    assert isinstance(info.value.__context__, KeyError)
    assert await values(backend, "s") == [1]


async def test_leaving_by_the_users_own_exception_group_keeps_the_group(
        backend: apersist.Backend) -> None:
    group = ExceptionGroup("mine", [ValueError("inner")])
    with pytest.raises(ExceptionGroup) as info:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend)) as run:
            await run.stream("s").record("x")
            raise group
    assert info.value is group
    assert await values(backend, "s") == ["x"]


async def test_leaving_by_move_on_after_loses_uncommitted_data(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with anyio.move_on_after(60) as scope:
        async with apersist.run(cfg) as run:
            await run.stream("s").record("kept", offset=1)
            await run.commit()
            await run.stream("s").record("lost", offset=2)
            (await run.table("t"))["lost"] = True
            scope.deadline = anyio.current_time()  # the deadline passes now, not mid-open
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        assert [e.value async for e in stream.replay()] == ["kept"]
        assert stream.offset == 1
        assert dict(await run.table("t")) == {}


async def test_leaving_by_cancel_scope_before_any_commit_loses_everything(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with anyio.CancelScope() as scope:
        async with apersist.run(cfg) as run:
            await run.stream("s").record("lost", offset=7)
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    events = await replayed(backend, "s")
    assert events == []
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset is None
        await run.stream("s").record("after")
    assert await values(backend, "s") == ["after"]


async def test_leaving_by_task_cancel_loses_uncommitted_data(backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    recorded = asyncio.Event()

    async def worker() -> None:
        async with apersist.run(cfg) as run:
            await run.stream("s").record("a", offset=1)
            await run.commit()
            await run.stream("s").record("b", offset=2)
            recorded.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(worker())
    await recorded.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value async for e in run.stream("s").replay()] == ["a"]
        assert run.stream("s").offset == 1


async def test_run_exposes_config_and_continue_after_replay(backend: apersist.Backend) -> None:
    for flag in (True, False):
        cfg = apersist.Config(backend, continue_after_replay=flag)
        async with apersist.run(cfg) as run:
            assert isinstance(run, apersist.Run)
            assert run.config is cfg
            assert run.continue_after_replay is flag


async def test_run_refuses_a_non_config(backend: apersist.Backend) -> None:
    bad: Any = backend
    with pytest.raises(TypeError):
        async with apersist.run(bad):
            pass


STAT_KEYS = ("deltas_recorded", "bytes_written", "commits", "pending_deltas",
             "uploads_in_flight", "last_commit_latency_ms")


async def test_stats_count_what_happened(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stats = run.stats
        for key in STAT_KEYS:
            assert key in stats, key
        assert stats["deltas_recorded"] == 0
        assert stats["pending_deltas"] == 0
        assert stats["commits"] == 0
        assert stats["bytes_written"] == 0
        assert stats["uploads_in_flight"] == 0

        stream = run.stream("s")
        for i in range(10):
            await stream.record(i)
        table = await run.table("t")
        table["k"] = "v"
        stats = run.stats
        assert stats["deltas_recorded"] == 11
        assert stats["pending_deltas"] == 11
        assert stats["commits"] == 0

        info = await run.commit()
        assert isinstance(info, apersist.CommitInfo)
        assert info.deltas == 11
        assert info.bytes > 0
        stats = run.stats
        assert stats["deltas_recorded"] == 11
        assert stats["pending_deltas"] == 0
        assert stats["commits"] == 1
        assert stats["bytes_written"] == info.bytes
        assert stats["uploads_in_flight"] == 0
        assert stats["last_commit_latency_ms"] > 0

        await stream.record(10)
        second = await run.commit()
        assert second.seq == info.seq + 1
        assert second.deltas == 1
        assert run.stats["commits"] == 2
        assert run.stats["bytes_written"] == info.bytes + second.bytes


async def test_stats_is_a_read_only_snapshot(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        stats = run.stats
        await run.stream("s").record(1)
        assert stats["deltas_recorded"] == 0
        assert run.stats["deltas_recorded"] == 1
        with pytest.raises(TypeError):
            stats["commits"] = 5  # type: ignore[index]


async def test_commit_with_nothing_pending_returns_the_last_seq(backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        idle = await run.commit()
        assert (idle.deltas, idle.bytes) == (0, 0)
        await run.stream("s").record("x")
        info = await run.commit()
        assert info.seq > idle.seq
        assert (info.deltas, info.bytes) != (0, 0)
        again = await run.commit()
        assert again == apersist.CommitInfo(info.seq, 0, 0)
        assert run.stats["commits"] == 1
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as run:
        first = await run.commit()
        # The new run's own takeover is the latest commit; it names no new deltas.
        assert first.seq > info.seq
        assert (first.deltas, first.bytes) == (0, 0)


async def test_commit_info_is_frozen() -> None:
    info = apersist.CommitInfo(3, 2, 1)
    assert (info.seq, info.deltas, info.bytes) == (3, 2, 1)
    with pytest.raises(AttributeError):
        info.seq = 4  # type: ignore[misc]


@pytest.mark.parametrize("interval", [0, 10])
async def test_an_idle_run_makes_no_backend_requests(
        backend: apersist.Backend, interval: int) -> None:
    cfg = apersist.Config(backend, snapshot_interval_ms=interval)
    async with counting(cfg) as driver:
        async with apersist.run(cfg, driver=driver) as run:
            stream = run.stream("s")
            table = await run.table("t")
            await stream.record(1, offset=1)
            table["a"] = 1
            await run.commit()
            await wait_until(lambda: run.stats["pending_deltas"] == 0, what="quiet")
            driver.reset()
            # Idle for many scheduler periods: nothing to commit, so nothing is asked of storage.
            with anyio.move_on_after(0.2):
                await anyio.sleep_forever()
            assert driver.requests == 0, driver.keys
            info = await run.commit()
            assert (info.deltas, info.bytes) == (0, 0)
            assert stream.offset == 1
            assert driver.requests == 0, driver.keys
        assert driver.requests == 0, driver.keys
        assert driver.calls["aclose"] == 0  # the driver was given: the run leaves it open
    assert driver.calls["aclose"] == 1


async def test_a_fresh_store_run_with_nothing_recorded_writes_no_segments(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        run.stream("s")
        await run.table("t")
    assert not [key for verb, key in driver.keys if verb == "put" and key.endswith(".seg")]


async def test_injected_clock_is_used_for_event_times(backend: apersist.Backend) -> None:
    clock = FakeClock(1_000)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        await run.stream("s").record("a")
        clock.set(2_500)
        await run.stream("s").record("b")
    assert [e.time_ms for e in await replayed(backend, "s")] == [1_000, 2_500]


async def test_runs_on_different_stores_are_independent(
        backend: apersist.Backend, backend_factory: Callable[[str], apersist.Backend]) -> None:
    other = backend_factory("other")
    quiet = {"snapshot_interval_ms": QUIET}
    async with apersist.run(apersist.Config(backend, **quiet)) as one, \
            apersist.run(apersist.Config(other, **quiet)) as two:
        await one.stream("s").record("one", offset=1)
        await two.stream("s").record("two", offset=2)
        await one.commit()
        await two.commit()  # neither fences the other
    assert await values(backend, "s") == ["one"]
    assert await values(other, "s") == ["two"]
