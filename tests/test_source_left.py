"""A source whose consumer left its loop (``break``, ``return``, an exception) with the
iterator still referenced never holds other tasks' commits, and the warning says so; a
consumer still at work on its event is waited for as before."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import numbers_forever, stored_i_and_table

import apersist

LEFT = "was left by"
HELD_LONG = 1.0  # a commit held by a left consumer waited the hold timeout (5 s)


async def _commit_latencies(run: apersist.Run, count: int = 3) -> list[float]:
    """Commits from another task, as a service's other work makes them."""
    async def commits() -> list[float]:
        took = []
        for i in range(count):
            await run.stream("other").record(i)
            started = time.perf_counter()
            await run.commit()
            took.append(time.perf_counter() - started)
        return took
    return await asyncio.create_task(commits())


async def test_a_break_with_the_iterator_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "apersist")
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        t = await run.table("t")
        events = run.source("s", numbers_forever)
        async for event in events:
            t[str(event.value["i"])] = 1
            if event.value["i"] == 3:
                break
        assert max(await _commit_latencies(run)) < HELD_LONG
        warnings = [r.getMessage() for r in caplog.records if LEFT in r.getMessage()]
        assert len(warnings) == 1
        assert "by a break or a return" in warnings[0]
        assert "stream=s" in warnings[0]
        del events
    assert await stored_i_and_table(tmp_path) == ([0, 1, 2, 3], {"0": 1, "1": 1, "2": 1, "3": 1})


async def test_an_exception_caught_by_a_caller_that_keeps_the_iterator(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "apersist")

    async def consume(events: AsyncIterator[Any], t: apersist.Table) -> None:
        async for event in events:
            t[str(event.value["i"])] = 1
            if event.value["i"] == 2:
                raise ValueError("bad event")

    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        t = await run.table("t")
        events = run.source("s", numbers_forever)
        with pytest.raises(ValueError, match="bad event"):
            await consume(events, t)
        assert max(await _commit_latencies(run)) < HELD_LONG
        warnings = [r.getMessage() for r in caplog.records if LEFT in r.getMessage()]
        assert len(warnings) == 1
        assert "by an exception" in warnings[0]
        del events
    assert await stored_i_and_table(tmp_path) == ([0, 1, 2], {"0": 1, "1": 1, "2": 1})


async def test_a_slow_body_is_still_waited_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "apersist")
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        t = await run.table("t")
        latencies: list[float] = []
        async for event in run.source("s", numbers_forever):
            if event.value["i"] == 1:
                committer = asyncio.create_task(_commit_latencies(run, 1))
                await asyncio.sleep(0.4)  # the commit must wait for this body
                t["late"] = 1
            if event.value["i"] == 2:
                latencies = await committer
                break
        assert 0.3 <= latencies[0] < HELD_LONG
        assert not [r for r in caplog.records if LEFT in r.getMessage()]


async def test_a_loop_handed_on_to_a_function_is_still_waited_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "apersist")
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        t = await run.table("t")
        events = run.source("s", numbers_forever)
        async for event in events:
            if event.value["i"] == 1:
                break

        async def more(rest: AsyncIterator[Any]) -> float:
            async for event in rest:  # the same task, another frame: no new consumer spot
                if event.value["i"] == 3:
                    committer = asyncio.create_task(_commit_latencies(run, 1))
                    await asyncio.sleep(0.4)  # the commit must wait for this body
                    t["late"] = 1
                if event.value["i"] == 4:  # the body of 3 is done: the commit went on
                    return (await committer)[0]
            raise AssertionError("unreachable")

        took = await more(events)
        assert 0.3 <= took < HELD_LONG, took
        assert not [r for r in caplog.records if LEFT in r.getMessage()]
        del events


async def test_a_wrapping_async_generator_is_still_waited_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "apersist")
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(tmp_path))) as run:
        t = await run.table("t")

        async def enriched() -> AsyncIterator[int]:
            async for event in run.source("s", numbers_forever):
                yield event.value["i"] * 10

        async for value in enriched():
            if value == 20:
                committer = asyncio.create_task(_commit_latencies(run, 1))
                await asyncio.sleep(0.4)  # the commit must wait for this body
                t["late"] = 1
            if value == 30:
                assert 0.3 <= (await committer)[0] < HELD_LONG
                break
        assert not [r for r in caplog.records if LEFT in r.getMessage()]
