"""Fencing: a newer run takes over a store; the older writer can no longer commit."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from helpers import counting, replayed, table_state, wait_until

import apersist

QUIET = 60_000


def assert_plain_fenced(exc: BaseException) -> None:
    assert type(exc) is apersist.FencedError
    assert not isinstance(exc, BaseExceptionGroup)
    assert isinstance(exc, apersist.PersistenceError)


async def values_and_offsets(backend: apersist.Backend, stream: str) -> list[tuple[Any, Any]]:
    return [(e.value, e.offset) for e in await replayed(backend, stream)]


async def test_a_second_run_takes_over_and_fences_the_first(backend: apersist.Backend) -> None:
    older_cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with pytest.raises(apersist.FencedError) as leaving:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(older_cfg) as older:
            stream = older.stream("s")
            table = await older.table("t")
            await stream.record("old-1", offset=1)
            table["old"] = 1
            await older.commit()
            await stream.record("old-2", offset=2)
            await older.commit()
            await stream.record("old-3 (pending at takeover)", offset=3)

            async with apersist.run(apersist.Config(backend)) as newer:
                events = [e.value async for e in newer.stream("s").replay()]
                assert events == ["old-1", "old-2"]
                assert newer.stream("s").offset == 2

                await stream.record("old-4 (after takeover)", offset=4)
                table["old"] = 2
                with pytest.raises(apersist.FencedError) as first:
                    await older.commit()
                assert_plain_fenced(first.value)
                with pytest.raises(apersist.FencedError) as second:
                    await older.commit()
                assert_plain_fenced(second.value)
                assert stream.offset == 2  # the fenced commit never became durable

                await newer.stream("s").record("new-1", offset=10)
                (await newer.table("t"))["new"] = 1
                await newer.commit()
                await newer.stream("s").record("new-2", offset=11)
    assert_plain_fenced(leaving.value)
    assert await values_and_offsets(backend, "s") == [
        ("old-1", 1), ("old-2", 2), ("new-1", 10), ("new-2", 11)]
    assert await table_state(backend, "t") == {"old": 1, "new": 1}
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 11


async def test_the_fenced_run_raises_fenced_error_when_leaving_normally(
        backend: apersist.Backend) -> None:
    older_cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with pytest.raises(apersist.FencedError) as leaving:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(older_cfg) as older:
            await older.stream("s").record("before")
            await older.commit()
            async with apersist.run(apersist.Config(backend)):
                pass
            await older.stream("s").record("after")  # its final commit is fenced
    assert_plain_fenced(leaving.value)
    assert [v for v, _ in await values_and_offsets(backend, "s")] == ["before"]


async def test_after_fenced_error_leaving_raises_it_even_with_nothing_pending(
        backend: apersist.Backend) -> None:
    with pytest.raises(apersist.FencedError) as leaving:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as older:
            async with apersist.run(apersist.Config(backend)):
                pass
            await older.stream("s").record("x")
            with pytest.raises(apersist.FencedError):
                await older.commit()
            # Swallowed here; leaving the block raises it again.
    assert_plain_fenced(leaving.value)


async def test_leaving_a_fenced_run_by_an_exception_raises_fenced_error(
        backend: apersist.Backend) -> None:
    """Leaving always says the run was fenced; the user's exception is its context."""
    error = RuntimeError("the user's own")
    with pytest.raises(apersist.FencedError) as info:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as older:
            async with apersist.run(apersist.Config(backend)):
                pass
            await older.stream("s").record("x")
            raise error
    assert_plain_fenced(info.value)
    assert info.value.__context__ is error
    assert await replayed(backend, "s") == []


async def test_a_users_exception_is_kept_when_nothing_was_left_to_commit(
        backend: apersist.Backend) -> None:
    error = RuntimeError("the user's own")
    with pytest.raises(RuntimeError) as info:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET)) as older:
            await older.stream("s").record("x")
            await older.commit()
            async with apersist.run(apersist.Config(backend)):
                pass
            raise error
    assert info.value is error
    assert [e.value for e in await replayed(backend, "s")] == ["x"]


async def test_group_commit_mode_is_fenced_too(backend: apersist.Backend) -> None:
    with pytest.raises(apersist.FencedError) as leaving:  # noqa: PT012 (raised by leaving the block)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0)) as older:
            stream = older.stream("s")
            await stream.record("old", offset=1)
            await wait_until(lambda: stream.offset == 1, what="the group commit")
            async with apersist.run(apersist.Config(backend)) as newer:
                try:
                    await stream.record("fenced", offset=2)
                except apersist.FencedError as exc:  # the scheduler may have been fenced first
                    assert_plain_fenced(exc)
                with pytest.raises(apersist.FencedError) as commit:
                    await older.commit()
                assert_plain_fenced(commit.value)
                await newer.stream("s").record("new", offset=3)
    assert_plain_fenced(leaving.value)
    assert await values_and_offsets(backend, "s") == [("old", 1), ("new", 3)]


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_commit_in_flight_during_the_takeover_is_fenced_and_invisible(
        backend: apersist.Backend) -> None:
    outcome: list[BaseException] = []
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (raised by leaving the block)
        async with counting(cfg) as older_driver, \
                apersist.run(cfg, driver=older_driver) as older:
            await older.stream("s").record("committed")
            await older.commit()
            gate = older_driver.hold_segment_puts()
            await older.stream("s").record("in flight")

            async def commit_older() -> None:
                try:
                    await older.commit()
                except apersist.FencedError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(commit_older)
                await wait_until(lambda: older_driver.held == 1, what="the upload to start")
                async with apersist.run(apersist.Config(backend)) as newer:
                    older_driver.gate = None
                    gate.set()
                    await wait_until(lambda: bool(outcome), what="the older commit to end")
                    await newer.stream("s").record("newer")
    (exc,) = outcome
    assert_plain_fenced(exc)
    assert [v for v, _ in await values_and_offsets(backend, "s")] == ["committed", "newer"]


async def test_many_takeovers_keep_one_consistent_history(backend: apersist.Backend) -> None:
    """Each run is fenced by the next; the history is every run's commits before its takeover."""
    expected: list[str] = []

    async def generation(depth: int) -> None:
        cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
        try:
            async with apersist.run(cfg) as run:
                await run.stream("s").record(f"gen{depth}-a")
                await run.commit()
                expected.append(f"gen{depth}-a")
                if depth < 3:
                    await generation(depth + 1)
                await run.stream("s").record(f"gen{depth}-b")
                if depth == 3:
                    expected.append(f"gen{depth}-b")
        except apersist.FencedError as exc:
            assert depth < 3
            assert_plain_fenced(exc)

    await generation(0)
    assert [v for v, _ in await values_and_offsets(backend, "s")] == expected
    assert expected == ["gen0-a", "gen1-a", "gen2-a", "gen3-a", "gen3-b"]



@pytest.mark.parametrize("attempt", range(3))
async def test_runs_entering_at_once_leave_one_consistent_history(
        backend: apersist.Backend, attempt: int) -> None:
    """Two runs race to take the writer role; the history stays the one the API describes."""
    committed: list[str] = []
    fenced: list[str] = []
    finished = anyio.Event()  # set once both have committed or been fenced
    outcomes = 0

    def note_outcome() -> None:
        nonlocal outcomes
        outcomes += 1
        if outcomes == 2:
            finished.set()

    async def writer(tag: str) -> None:
        cfg = apersist.Config(backend, snapshot_interval_ms=QUIET)
        reached_commit = False
        try:
            async with apersist.run(cfg) as run:
                await anyio.sleep(attempt * 0.001)
                await run.stream("s").record(tag)
                reached_commit = True
                try:
                    await run.commit()
                    committed.append(tag)
                finally:
                    note_outcome()
                await finished.wait()
        except apersist.FencedError as exc:
            assert_plain_fenced(exc)
            fenced.append(tag)
            if not reached_commit:
                note_outcome()  # fenced while entering: the other one must not wait for it

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, "a")
            tg.start_soon(writer, "b")
    assert committed, "the newest writer always commits"
    assert not set(committed) & set(fenced)
    history = [v for v, _ in await values_and_offsets(backend, "s")]
    assert sorted(history) == sorted(committed)


async def test_a_takeover_completes_while_the_older_writer_commits_nonstop(
        backend: apersist.Backend) -> None:
    # The newer writer's fence races every commit of the older one. Re-reading the whole
    # log after each lost race (the old way) lost every race to a busy older writer, and
    # the takeover never finished; catching up one commit at a time wins within a few.
    config = apersist.Config(backend, snapshot_interval_ms=QUIET)
    taken: list[int] = []
    acknowledged: list[int] = list(range(30))
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(config) as older:
            stream = older.stream("s")
            for i in range(30):  # a history, so that re-reading it takes a while
                await stream.record(i, offset=i)
                await older.commit()
            fenced = anyio.Event()

            async def commit_nonstop() -> None:
                i = 30
                try:
                    while True:
                        await stream.record(i, offset=i)
                        await older.commit()
                        acknowledged.append(i)
                        i += 1
                except apersist.FencedError:
                    fenced.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(commit_nonstop)
                await anyio.sleep(0.05)  # the older writer is mid-stream
                with anyio.fail_after(60):
                    async with apersist.run(config) as newer:
                        taken.extend([e.value async for e in newer.stream("s").replay()])
                        await fenced.wait()  # its next commit meets our fence
    assert taken == acknowledged  # every acknowledged commit, and nothing fenced
