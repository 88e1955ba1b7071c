"""record()'s fast path: events of one millisecond added to the open batch with no call
into the scheduler, only while the scheduler allows it (``LogBuffer.fast_from_ns``).

The scheduler takes that leave back at every cut and when the run stops persisting; these
tests pin each reason with a clock that never moves, so that every event after the first
would take the fast path if it were allowed to.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from helpers import replayed, stored_objects, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apersist
from apersist import _format as fmt
from apersist._drivers import Driver, open_driver
from apersist._scheduler import BATCH_ENTRIES
from apersist.testing import FakeClock

QUIET = 60_000


async def test_an_event_after_a_group_commit_in_the_same_millisecond_is_committed(
        backend: apersist.Backend) -> None:
    """After a cut the scheduler waits for news of pending data: the first event after it
    must bring that news even within the millisecond it already saw events of."""
    async with apersist.run(apersist.Config(backend, snapshot_interval_ms=0),
                            clock_ms=FakeClock()) as run:
        stream = run.stream("s")
        await stream.record("a")
        await wait_until(lambda: run.stats["deltas_committed"] == 1, what="first commit")
        await stream.record("b")  # same millisecond, nothing else will happen
        await wait_until(lambda: run.stats["deltas_committed"] == 2, what="second commit")
        assert [e.value for e in await replayed(backend, "s")] == ["a", "b"]


@pytest.mark.parametrize("bad", [math.nan, [math.inf], {"x": -math.inf, "y": None},
                                 object(), {1: "int key"}, 2**64])
async def test_bad_values_raise_on_the_fast_path_too(backend: apersist.Backend,
                                                      bad: Any) -> None:
    """The checks record() makes on the scheduler's path hold on the fast path as well."""
    async with apersist.run(apersist.Config(backend), clock_ms=FakeClock()) as run:
        stream = run.stream("s")
        await stream.record("first")  # the fast path is open from here on
        await stream.record({"fine": None})
        with pytest.raises(TypeError, match="stream 's'"):
            await stream.record(bad)
        await stream.record("after")
        assert run.stats["pending_deltas"] == 3
    assert [e.value for e in await replayed(backend, "s")] == ["first", {"fine": None}, "after"]


async def test_record_after_the_run_ended_raises_in_the_same_millisecond(
        backend: apersist.Backend) -> None:
    async with apersist.run(apersist.Config(backend), clock_ms=FakeClock()) as run:
        stream = run.stream("s")
        await stream.record("inside")
    with pytest.raises(RuntimeError, match="the run has ended"):
        await stream.record("late")
    assert [e.value for e in await replayed(backend, "s")] == ["inside"]


async def test_record_after_a_fenced_commit_raises_in_the_same_millisecond(
        backend: apersist.Backend) -> None:
    with pytest.raises(apersist.FencedError):  # noqa: PT012 (leaving the fenced run raises it)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET),
                                clock_ms=FakeClock()) as older:
            stream = older.stream("s")
            await stream.record("before")
            await older.commit()
            await stream.record("fast")  # allowed the fast path before the takeover
            async with apersist.run(apersist.Config(backend)):
                pass
            with pytest.raises(apersist.FencedError):
                await older.commit()
            with pytest.raises(apersist.FencedError):
                await stream.record("after the failure")
    assert [e.value for e in await replayed(backend, "s")] == ["before"]


async def test_record_after_a_run_left_by_cancellation_raises_in_the_same_millisecond(
        backend: apersist.Backend) -> None:
    """Leaving by cancellation makes no final commit (no cut): closing the run alone must
    take the fast path back."""
    with anyio.CancelScope() as scope:
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET),
                                clock_ms=FakeClock()) as run:
            stream = run.stream("s")
            await stream.record("a")
            await stream.record("b")  # allowed the fast path
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    with pytest.raises(RuntimeError, match="the run has ended"):
        await stream.record("late")


class _FailingCommitRecords:
    """A driver whose commit-record puts wait for ``gate``, then fail for good."""

    def __init__(self, inner: Driver) -> None:
        self._inner = inner
        self.gate = anyio.Event()
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if self.armed and "/commits/" in key:
            await self.gate.wait()
            raise apersist.BackendError("injected: the commit record cannot be written")
        await self._inner.put(key, data, if_absent=if_absent)


async def test_record_after_a_commit_failed_raises_in_the_same_millisecond() -> None:
    """Events recorded while the failing commit was in flight were allowed the fast path
    after its cut; the failure must take it back."""
    backend = apersist.Backend.memory()
    driver = _FailingCommitRecords(open_driver(backend))
    with pytest.raises(apersist.BackendError):  # noqa: PT012 (the final commit fails too)
        async with apersist.run(apersist.Config(backend, snapshot_interval_ms=QUIET),
                                clock_ms=FakeClock(), driver=driver) as run:
            stream = run.stream("s")
            await stream.record("committing")
            driver.armed = True
            async with anyio.create_task_group() as tg:

                async def failing_commit() -> None:
                    with pytest.raises(apersist.BackendError, match="injected"):
                        await run.commit()

                tg.start_soon(failing_commit)
                await wait_until(lambda: run.stats["uploads_in_flight"] > 0 or
                                 run.stats["pending_deltas"] == 0, what="the cut")
                await stream.record("during")  # allowed the fast path again
                await stream.record("during, fast")
                driver.gate.set()
            with pytest.raises(apersist.BackendError, match="injected"):
                await stream.record("after the failure")


async def test_back_pressure_bounds_pending_bytes_on_the_fast_path(
        backend: apersist.Backend) -> None:
    """Open batches are accounted for when framed; they stay within a quarter of the
    bound, so pending bytes pass it by at most that (and one event)."""
    bound = 16_384
    value = "p" * 10  # small enough for the fast path: at most bound // 4 // 256 bytes
    assert len(orjson.dumps(value)) <= bound // 4 // BATCH_ENTRIES
    total = 6_000
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_pending_bytes=bound)
    peak = 0
    async with apersist.run(cfg, clock_ms=FakeClock()) as run:
        stream = run.stream("s")
        for _ in range(total):
            await stream.record(value)
            peak = max(peak, run.stats["pending_bytes"])
        assert peak <= bound + bound // 4 + fmt.RECORD_OVERHEAD
        assert peak > bound // 2
        # Only back-pressure can have committed under the long interval.
        assert run.stats["commits"] >= total * 12 // bound
    got = await replayed(backend, "s")
    assert len(got) == total
    assert all(e.value == value for e in got)


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
@pytest.mark.parametrize("with_offsets", [False, True], ids=["fast", "offsets"])
@pytest.mark.parametrize("size", [1, 200])
async def test_segments_stay_near_the_segment_size(backend: apersist.Backend, size: int,
                                                   with_offsets: bool) -> None:
    """Open batches are accounted for when framed, and kept within a quarter of a
    segment: tiny values on the fast path, bigger ones (and events with offsets) on the
    scheduler's, which frames past that quarter."""
    limit = 4096
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=limit)
    total = 20_000 // size
    value = "x" * (size - 1) if size > 1 else 7
    async with apersist.run(cfg, clock_ms=FakeClock()) as run:
        for i in range(total):
            await run.stream("s").record(value, offset=i if with_offsets else None)
        await run.commit()
        refs = [s.ref for s in run._store.segments(fmt.KIND_EVENTS, "s")]
    objects = await stored_objects(backend)
    assert len(refs) > 3
    for ref in refs:
        body = sum(fmt.RECORD_OVERHEAD + len(frame[0]) + len(frame[1] or b"")
                   for frame in fmt.SegmentView(ref, objects[ref.key]).frames())
        assert body <= limit + limit // 4 + size + 2 * fmt.RECORD_OVERHEAD, ref
    got = await replayed(backend, "s")
    assert [e.value for e in got] == [value] * total


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_a_big_value_is_a_record_of_its_own(backend: apersist.Backend) -> None:
    """A value past the open batch's budget (a quarter of a segment) is framed alone, so a
    batch record stays within a quarter of a segment, and within a record's u32 lengths
    however large the segments are."""
    limit = 4096
    big = "y" * (limit // 4)
    cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=limit)
    async with apersist.run(cfg, clock_ms=FakeClock()) as run:
        stream = run.stream("s")
        for value in [1, 2, 3, big, 4, 5]:
            await stream.record(value)
        await run.commit()
        refs = [s.ref for s in run._store.segments(fmt.KIND_EVENTS, "s")]
    objects = await stored_objects(backend)
    counts = [frame[3] for ref in refs for frame in fmt.SegmentView(ref, objects[ref.key]).frames()]
    assert counts == [3, 1, 2]
    assert [e.value for e in await replayed(backend, "s")] == [1, 2, 3, big, 4, 5]


# One step of a recording: (clock step in ms, value, offset or None, commit after it?).
_VALUES = st.one_of(st.integers(-5, 5), st.none(), st.text(max_size=4),
                    st.builds(lambda n: "x" * n, st.integers(0, 300)),  # fast path or not
                    st.lists(st.none(), max_size=3))
_STEPS = st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, -1]), _VALUES,
                            st.one_of(st.none(), st.integers(0, 9)), st.booleans()),
                  max_size=120)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_STEPS, batch_cap=st.sampled_from([2, 3, BATCH_ENTRIES]),
       limit=st.sampled_from([1024, 65_536]))
def test_any_mix_of_events_replays_as_recorded(steps: list[tuple[int, Any, Any, bool]],
                                               batch_cap: int, limit: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast and slow paths, offsets, big values, clock steps back and forth, commits in
    between, small segments: replay gives back every event with its offset and time."""
    monkeypatch.setattr(apersist._scheduler, "BATCH_ENTRIES", batch_cap)
    monkeypatch.setattr(apersist._stream, "BATCH_ENTRIES", batch_cap)
    backend = apersist.Backend.memory()
    clock = FakeClock(1_000)
    expected: list[tuple[Any, Any, int]] = []

    async def main() -> list[apersist.Event]:
        # Small bounds: every event but the tiniest takes the scheduler's path; larger
        # ones (a fast-path limit of 64 bytes) mix both paths within a millisecond.
        cfg = apersist.Config(backend, snapshot_interval_ms=QUIET, max_segment_bytes=limit,
                              max_pending_bytes=2 * limit)
        async with apersist.run(cfg, clock_ms=clock) as run:
            stream = run.stream("s")
            for step, value, offset, commit in steps:
                clock.set(clock.now_ms + step)  # steps back, too
                await stream.record(value, offset=offset)
                expected.append((value, offset, clock.now_ms))
                if commit:
                    await run.commit()
        return await replayed(backend, "s")

    got = anyio.run(main)
    assert [(e.value, e.offset, e.time_ms) for e in got] == expected
