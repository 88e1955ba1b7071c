"""Long loops on the event loop (rebuilding a table or the cache, a producer's records, a
source's events), cut into short steps."""

from __future__ import annotations

import asyncio
import time

import anyio

__all__ = ["COOPERATE_NS", "STEP_S", "Pacer", "yield_to_loop"]

#: The work a paced loop does between two yields to the event loop. Well under the 5 ms
#: stall a user may see: one more record may run past it before the clock is read.
STEP_S = 0.002
_RESUME_AFTER_S = 1e-6
#: How long the calls of one loop over ``record()``, ``record_many()``, a source or a replay
#: may hold the event loop before one of them yields (docs/concepts.md, "Schedule
#: points"): the loop's other tasks then wait about this long at most.
COOPERATE_NS = 1_000_000


async def yield_to_loop() -> None:
    """Let the event loop run everything that became due, then resume (see ``pause``)."""
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
        # A timer, not a checkpoint: a task whose timer or I/O became due during the step
        # is made ready by the loop iteration that notices it and runs in the one after.
        # A checkpoint resumes this loop ahead of it (asyncio runs its ready queue in
        # order), so it would wait for the next step as well: two or three steps of stall.
        # A timer due now is handled after the I/O and the earlier timers of its
        # iteration, so everything that became due during the step goes first.
        await anyio.sleep(_RESUME_AFTER_S)
        self._deadline = time.perf_counter() + self._step
