"""``REALTIME_REPLAY`` with ``Config(realtime_speed=..., realtime_max_gap_ms=...)``: the
recorded gaps scaled and capped, on an injected clock (``RealtimePace``) and on short real gaps."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import apersist
from apersist._pacing import RealtimePace
from apersist.testing import FakeClock

Mode = apersist.PersistenceMode
HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000


class ManualTime:
    """A monotonic clock in seconds that moves only when told, and a sleep that records
    its delays and moves the clock by them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


def pace(manual: ManualTime, **options: Any) -> RealtimePace:
    return RealtimePace(clock=manual.clock, sleep=manual.sleep, **options)


def delays(p: RealtimePace, times_ms: list[int]) -> list[float]:
    return [round(p.delay(START_MS + t), 9) for t in times_ms]


# ----------------------------------------------------------------- the schedule, on a manual clock


def test_the_default_is_the_recorded_schedule() -> None:
    manual = ManualTime()
    assert delays(pace(manual), [0, 1_000, 3_000, 3_000, 10 * HOUR_MS]) == [
        0.0, 1.0, 3.0, 3.0, 36_000.0]


def test_speed_divides_every_gap() -> None:
    manual = ManualTime()
    assert delays(pace(manual, speed=4.0), [0, 1_000, 3_000, 3 * HOUR_MS]) == [
        0.0, 0.25, 0.75, 2_700.0]
    manual = ManualTime()
    assert delays(pace(manual, speed=0.5), [0, 1_000, 1_500]) == [0.0, 2.0, 3.0]


def test_the_cap_bounds_every_replayed_gap() -> None:
    manual = ManualTime()
    # A 3-hour gap replays as 0.25 s; gaps under the cap are kept.
    assert delays(pace(manual, max_gap_ms=250), [0, 3 * HOUR_MS, 3 * HOUR_MS + 100,
                                                 6 * HOUR_MS]) == [0.0, 0.25, 0.35, 0.6]


def test_the_cap_applies_after_the_speed() -> None:
    manual = ManualTime()
    # 2000 ms / 4 = 500 ms, cut to 300; 200 ms / 4 = 50 ms, under the cap.
    assert delays(pace(manual, speed=4.0, max_gap_ms=300), [0, 2_000, 2_200]) == [
        0.0, 0.3, 0.35]


def test_a_zero_cap_never_waits() -> None:
    manual = ManualTime()
    assert delays(pace(manual, max_gap_ms=0), [0, HOUR_MS, 2 * HOUR_MS]) == [0.0, 0.0, 0.0]


def test_time_spent_on_an_event_comes_off_the_next_wait() -> None:
    manual = ManualTime()
    p = pace(manual, speed=2.0)
    assert p.delay(START_MS) == 0.0
    manual.now += 0.3  # the consumer worked for 0.3 s on the first event
    assert p.delay(START_MS + 1_000) == pytest.approx(0.2)
    manual.now += 2.0  # and for longer than the next gap: the event after is due at once
    assert p.delay(START_MS + 2_000) == pytest.approx(-1.3)


def test_an_event_recorded_before_the_newest_is_due_with_it() -> None:
    # A clock set back between two events: the earlier-stamped event has no gap, and the
    # next gap is measured from the newest time seen, so the cap bounds it as any other.
    manual = ManualTime()
    assert delays(pace(manual, max_gap_ms=1_000), [0, 10 * HOUR_MS, 9 * HOUR_MS,
                                                   10 * HOUR_MS + 500]) == [0.0, 1.0, 1.0, 1.5]
    # Without a cap that is the recorded schedule: due at the newest time so far.
    manual = ManualTime()
    assert delays(pace(manual), [0, 5_000, 1_000, 6_000]) == [0.0, 5.0, 5.0, 6.0]


async def test_wait_sleeps_only_for_positive_delays() -> None:
    manual = ManualTime()
    p = pace(manual, speed=10.0, max_gap_ms=500)
    for t in (0, 1_000, 1_000, HOUR_MS, HOUR_MS + 10):
        await p.wait(START_MS + t)
    assert [round(d, 9) for d in manual.sleeps] == [0.1, 0.5, 0.001]


# ----------------------------------------------------------------- Config


def test_config_defaults_keep_the_recorded_gaps() -> None:
    config = apersist.Config(apersist.Backend.memory())
    assert config.realtime_speed == 1.0
    assert config.realtime_max_gap_ms is None


def test_config_takes_a_speed_and_a_cap() -> None:
    config = apersist.Config(apersist.Backend.memory(), persistence_mode="realtime_replay",
                             realtime_speed=60, realtime_max_gap_ms=5_000)
    assert config.realtime_speed == 60.0
    assert isinstance(config.realtime_speed, float)
    assert config.realtime_max_gap_ms == 5_000
    assert apersist.Config(apersist.Backend.memory(), realtime_speed=0.25,
                           realtime_max_gap_ms=0).realtime_max_gap_ms == 0


@pytest.mark.parametrize("speed", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_config_refuses_a_speed_that_is_not_positive_and_finite(speed: float) -> None:
    with pytest.raises(ValueError, match="realtime_speed must be a finite number > 0"):
        apersist.Config(apersist.Backend.memory(), realtime_speed=speed)


@pytest.mark.parametrize("speed", [True, "2", None, [1]])
def test_config_refuses_a_speed_that_is_not_a_number(speed: Any) -> None:
    with pytest.raises(TypeError, match="realtime_speed must be a number"):
        apersist.Config(apersist.Backend.memory(), realtime_speed=speed)


def test_config_refuses_a_bad_cap() -> None:
    with pytest.raises(ValueError, match="realtime_max_gap_ms must be >= 0"):
        apersist.Config(apersist.Backend.memory(), realtime_max_gap_ms=-1)
    for bad in (1.5, True, "100"):
        with pytest.raises(TypeError, match="realtime_max_gap_ms must be an int"):
            apersist.Config(apersist.Backend.memory(), realtime_max_gap_ms=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------- replay and source(), on real gaps


async def seed(backend: apersist.Backend, gaps_ms: list[int]) -> None:
    """Events 0, 1, ... recorded ``gaps_ms`` apart (by an injected clock), with offsets."""
    clock = FakeClock(START_MS)
    async with apersist.run(apersist.Config(backend), clock_ms=clock) as run:
        stream = run.stream("s")
        await stream.record(0, offset=0)
        for i, gap in enumerate(gaps_ms, 1):
            clock.advance(gap)
            await stream.record(i, offset=i)


async def arrivals(events: AsyncIterator[apersist.Event]) -> list[tuple[Any, float]]:
    """Each event's value and when it arrived, in seconds after the first one."""
    got: list[tuple[Any, float]] = []
    first = 0.0
    async for event in events:
        now = time.monotonic()
        if not got:
            first = now
        got.append((event.value, now - first))
    return got


# The wait for an event can end a hair before its due time, and the first arrival is read
# a little after the schedule starts: lower bounds allow that much.
SLACK_S = 0.05


def check(got: list[tuple[Any, float]], due_s: list[float], *, within_s: float) -> None:
    assert [value for value, _ in got] == list(range(len(due_s)))
    for (_, at), due in zip(got, due_s, strict=True):
        assert at >= due - SLACK_S, (got, due_s)
    assert got[-1][1] < due_s[-1] + within_s, (got, due_s)


async def test_replay_divides_the_recorded_gaps_by_the_speed(backend: apersist.Backend) -> None:
    await seed(backend, [1_000, 1_000])
    config = apersist.Config(backend, persistence_mode=Mode.REALTIME_REPLAY, realtime_speed=5)
    async with apersist.run(config) as run:
        got = await arrivals(run.stream("s").replay())
    # 2 s recorded replay in 0.4 s: well under the 2 s a speed of 1 takes.
    check(got, [0.0, 0.2, 0.4], within_s=1.0)


async def test_replay_caps_a_long_downtime_gap() -> None:
    backend = apersist.Backend.memory()
    await seed(backend, [3 * HOUR_MS, 3 * HOUR_MS])
    config = apersist.Config(backend, persistence_mode=Mode.REALTIME_REPLAY,
                             realtime_max_gap_ms=150)
    async with apersist.run(config) as run:
        got = await arrivals(run.stream("s").replay())
    check(got, [0.0, 0.15, 0.3], within_s=1.0)


async def test_source_replays_scaled_and_capped_then_goes_live() -> None:
    backend = apersist.Backend.memory()
    await seed(backend, [2_000, 200])
    config = apersist.Config(backend, persistence_mode=Mode.REALTIME_REPLAY,
                             realtime_speed=4, realtime_max_gap_ms=300)

    async def read(offset: Any) -> AsyncIterator[Any]:
        assert offset == 2
        yield 3, 3

    async with apersist.run(config) as run:
        started = time.monotonic()
        got = await arrivals(run.source("s", read))
        elapsed = time.monotonic() - started
    # 2000 ms / 4 = 500 ms, capped to 300; 200 ms / 4 = 50 ms; the live event waits for nothing.
    check(got[:3], [0.0, 0.3, 0.35], within_s=1.0)
    assert got[3][0] == 3
    assert elapsed < 1.5


async def test_other_modes_ignore_the_pacing_options() -> None:
    backend = apersist.Backend.memory()
    await seed(backend, [HOUR_MS])
    for mode in (Mode.PERSISTING, Mode.SPEEDRUN_REPLAY):
        config = apersist.Config(backend, persistence_mode=mode, realtime_speed=1e-6,
                                 realtime_max_gap_ms=10 * HOUR_MS)
        async with apersist.run(config) as run:
            started = time.monotonic()
            assert [e.value async for e in run.stream("s").replay()] == [0, 1]
            assert time.monotonic() - started < 5.0  # an hour at speed 1e-6 never ends


async def test_replayed_events_keep_their_recorded_times() -> None:
    backend = apersist.Backend.memory()
    await seed(backend, [3 * HOUR_MS])
    config = apersist.Config(backend, persistence_mode=Mode.REALTIME_REPLAY,
                             realtime_max_gap_ms=0)
    async with apersist.run(config) as run:
        times = [e.time_ms async for e in run.stream("s").replay()]
    assert times == [START_MS, START_MS + 3 * HOUR_MS]
