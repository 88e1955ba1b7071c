"""Long loops on the event loop (rebuilding a table or the cache, a producer's records, a
source's events), cut into short steps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["COOPERATE_NS", "STEP_S", "Pacer", "RealtimePace", "yield_to_loop"]

#: The work a paced loop does between two yields to the event loop. Well under the 5 ms
#: stall a user may see: one more record may run past it before the clock is read.
STEP_S = 0.002
_RESUME_AFTER_S = 1e-6
#: How long the calls of one loop over ``record()``, ``record_many()``, a source or a replay
#: may hold the event loop before one of them yields (docs/concepts.md, "Schedule
#: points"): the loop's other tasks then wait about this long at most.
COOPERATE_NS = 1_000_000


async def yield_to_loop() -> None:
    """Let the event loop run everything that became due, then resume."""
    # A timer, not a checkpoint: a task whose timer or I/O became due during the step
    # is made ready by the loop iteration that notices it and runs in the one after.
    # A checkpoint resumes this loop ahead of it (asyncio runs its ready queue in
    # order), so it would wait for the next step as well: two or three steps of stall.
    # A timer due now is handled after the I/O and the earlier timers of its
    # iteration, so everything that became due during the step goes first.
    # asyncio's own sleep, not anyio's: this runs about a thousand times a second in a
    # busy loop, and anyio's adds a get_running_loop() call (a getpid system call on 3.11).
    await asyncio.sleep(_RESUME_AFTER_S)


class Pacer:
    """Tells a long loop when it has held the event loop for ``step_s`` and should yield.

    Work in a thread does not help here: decoding JSON into Python objects holds the GIL,
    so a thread doing it stalls the loop just as long. The loop instead yields between
    steps of about ``step_s``::

        pacer = Pacer()
        for record in records:
            handle(record)
            if pacer.due():
                await pacer.pause()

    Reading the clock costs about 50 ns, little next to decoding a record, and a step
    then never runs past ``step_s`` by more than one record.
    """

    __slots__ = ("_deadline", "_step")

    def __init__(self, step_s: float | None = None) -> None:
        self._step = STEP_S if step_s is None else step_s
        self._deadline = time.perf_counter() + self._step

    def due(self) -> bool:
        """Whether the step is over (then ``await pause()``)."""
        return time.perf_counter() >= self._deadline

    async def pause(self) -> None:
        """Let the event loop run its other work, then start the next step."""
        await yield_to_loop()
        self._deadline = time.perf_counter() + self._step


class RealtimePace:
    """When each event of a ``REALTIME_REPLAY`` is due, and the wait for it.

    The first event is due at once. Each later one is due the recorded gap after the one
    before, divided by ``speed`` and then cut to ``max_gap_ms`` (``None``: no cap). Gaps
    add up from the first event, on ``clock`` (seconds), so the time the consumer spends
    on an event is taken from the next wait instead of added to it. An event stamped
    before the newest one so far (a clock set back) has no gap of its own: it is due with
    the newest, and the next gap is measured from the newest, so a cap bounds it as well.
    With ``speed=1.0`` and no cap every event is due its recorded time after the first:
    the schedule replay has always kept. ``clock`` and ``sleep`` are injected in tests.
    """

    __slots__ = ("_cap_s", "_clock", "_due_s", "_newest_ms", "_sleep", "_speed", "_started")

    def __init__(self, *, speed: float = 1.0, max_gap_ms: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = anyio.sleep) -> None:
        self._speed = speed
        self._cap_s = None if max_gap_ms is None else max_gap_ms / 1000
        self._clock = clock
        self._sleep = sleep
        self._newest_ms: int | None = None
        self._due_s = 0.0  # when the newest event is due, in seconds after the first
        self._started = 0.0

    def delay(self, time_ms: int) -> float:
        """Seconds until the event recorded at ``time_ms`` is due (0 or less: due now)."""
        newest = self._newest_ms
        if newest is None:
            self._newest_ms, self._started = time_ms, self._clock()
            return 0.0
        if time_ms > newest:
            gap = (time_ms - newest) / 1000 / self._speed
            cap = self._cap_s
            self._due_s += gap if cap is None or gap < cap else cap
            self._newest_ms = time_ms
        return self._due_s - (self._clock() - self._started)

    async def wait(self, time_ms: int) -> None:
        """Wait until the event recorded at ``time_ms`` is due; yield to the loop at least."""
        delay = self.delay(time_ms)
        await (self._sleep(delay) if delay > 0 else yield_to_loop())
