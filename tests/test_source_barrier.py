"""A commit never separates a live source event from the state its consumer derived from it."""

from __future__ import annotations

import anyio
import anyio.lowlevel
from helpers import crash_state, numbers_up_to

import apersist


async def test_every_commit_holds_events_with_their_table_updates() -> None:
    backend = apersist.Backend.memory()
    snapshots: list[dict[str, bytes]] = []
    done = anyio.Event()

    async def watch() -> None:
        # Copy the whole store as often as the loop lets us: each copy is what a crash at
        # that instant would leave behind.
        while not done.is_set():
            snapshots.append(dict(backend.objects))
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        async with apersist.run(apersist.Config(backend)) as run:
            sums = await run.table("sums")
            async for event in run.source("numbers", lambda off: numbers_up_to(off, 400)):
                # Give the group-commit scheduler every chance to cut mid-event.
                await anyio.lowlevel.checkpoint()
                sums["count"] = sums.get("count", 0) + 1
                await anyio.lowlevel.checkpoint()
                sums["total"] = sums.get("total", 0) + event.value
        done.set()

    distinct = {tuple(sorted(s.items())) for s in snapshots}
    assert len(distinct) > 5, "the watcher saw too few commits to test anything"
    for snapshot in distinct:
        events, table, offset = await crash_state(dict(snapshot))
        assert events == list(range(len(events)))
        assert table.get("count", 0) == len(events), (table, len(events))
        assert table.get("total", 0) == sum(events)
        assert offset == (events[-1] if events else None)


async def test_commit_inside_the_loop_body_does_not_wait_for_itself() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=60_000)) as run:
        seen = 0
        with anyio.fail_after(10):
            async for _event in run.source("numbers", lambda off: numbers_up_to(off, 5)):
                seen += 1
                info = await run.commit()
                assert info.deltas >= 1
    assert seen == 5


async def test_back_pressure_inside_the_loop_body_does_not_deadlock() -> None:
    backend = apersist.Backend.memory()
    config = apersist.Config(backend, max_pending_bytes=2048)
    async with apersist.run(config) as run:
        side = run.stream("side")
        with anyio.fail_after(20):
            async for event in run.source("numbers", lambda off: numbers_up_to(off, 300)):
                await side.record({"payload": "x" * 100, "n": event.value})
    async with apersist.run(apersist.Config(backend)) as run:
        assert [e.value["n"] async for e in run.stream("side").replay()] == list(range(300))


async def test_two_concurrent_sources_both_finish_and_commit() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        sums = await run.table("sums")

        async def consume(name: str) -> None:
            async for event in run.source(name, lambda off: numbers_up_to(off, 200)):
                await anyio.lowlevel.checkpoint()
                sums[name] = event.value

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, "a")
                tg.start_soon(consume, "b")
    async with apersist.run(apersist.Config(backend)) as run:
        assert dict(await run.table("sums")) == {"a": 199, "b": 199}
        assert run.stream("a").offset == 199

