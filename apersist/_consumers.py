"""Where a source's consumer is: still in its loop over the source, or gone from it.

A commit waits for each live event that a consumer holds until the consumer asks for the
next one (see ``_barrier``). A consumer that left its loop early without closing the
source (a ``break``, a ``return`` or an exception, the iterator still referenced) never
asks, and Python tells nobody: the iterator is only closed once it is collected. Every
commit of the run then waited out the hold timeout.

So a source notes, when a task first takes an event from it, the frame that loops over it
and where that frame stood (its ``f_lasti``): awaiting the source's next event, inside
some loop of that frame's code. A commit that has waited a while looks again
(``consumer_left``): the frame has left that loop, or has returned or raised, and no other
frame of the task holds the source: the consumer is gone, and the event it held is done.
Anything less certain counts as still in the loop, and the commit waits as before. This
costs nothing per event: one ``sys._getframe`` when a task starts consuming, and a look at
a few frames when a commit has waited 50 ms.
"""

from __future__ import annotations

import asyncio
import dis
import functools
import gc
import inspect
import sys
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

__all__ = ["ASEND_TYPE", "ConsumerSpot", "awaits_of", "consumer_left", "spot_consumer"]

_ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_YIELD_VALUE = dis.opmap["YIELD_VALUE"]
# Jumps that close a loop (not the jump of an await's own send loop).
_LOOP_JUMPS = {"JUMP_BACKWARD", "JUMP_ABSOLUTE"}

async def _one() -> Any:
    yield None


def _step_type(make: Callable[[Any], Any]) -> type:
    step = make(_one())
    step.close()
    return type(step)


#: The type of ``anext(gen)``: an async generator's step, which asyncio may run as a
#: task's coroutine by itself (``ensure_future(anext(it))``).
ASEND_TYPE = _step_type(lambda agen: agen.__anext__())
# The types of an async generator's steps: ``anext(gen)`` and ``gen.athrow(...)``.
_STEP_TYPES = (ASEND_TYPE, _step_type(lambda agen: agen.aclose()))

#: The last step of ``awaits_of`` where it could not follow the chain any further.
UNSEEN = object()

#: (the source's own frame, the consumer's frame, where the consumer stood)
ConsumerSpot = tuple[FrameType, FrameType, int]


def spot_consumer(depth: int) -> ConsumerSpot | None:
    """From inside a source that is handing out an event to a task for the first time:
    the source's frame (``depth`` frames up) and the async function that awaits it."""
    try:
        source = sys._getframe(depth + 1)
        consumer = source.f_back
    except ValueError:
        return None
    if consumer is None or not consumer.f_code.co_flags & _ASYNC_CODE:
        return None  # a task that runs the source's step by itself (wait_for on 3.11)
    return source, consumer, consumer.f_lasti


@functools.lru_cache(maxsize=256)
def _loop_around(code: CodeType, offset: int) -> tuple[int, int] | None:
    """The innermost loop of ``code`` whose bytecode spans ``offset``: (start, end), with
    all of its body: every jump back to it (a ``continue``, or the compiler's copy of the
    jump back at the end of an ``if`` or a ``try``), which may target its first or its
    second instruction (a ``while``), and the exception handlers of its body (an
    ``except`` or a ``finally``), which the compiler places after the body's last jump
    back. A handler that pops the loop's iterator (a ``try`` around the loop) is not part
    of it; in a ``while`` loop that cannot be told, and the loop extends to it: the
    check then waits, as it does for anything it cannot tell."""
    instructions = list(dis.get_instructions(code))
    jumps = [(ins.argval, ins.offset) for ins in instructions
             if ins.opname in _LOOP_JUMPS and isinstance(ins.argval, int)]
    best: tuple[int, int] | None = None
    for start, end in jumps:
        if start <= offset <= end and (best is None or end - start < best[1] - best[0]):
            best = (start, end)
    if best is None:
        return None
    entries = dis.Bytecode(code).exception_entries  # type: ignore[attr-defined]  # typeshed lacks it
    # The stack depth inside the loop: that of the handler around the await of the next
    # item (END_ASYNC_FOR's, which keeps the iterator), else none is needed.
    base = max((e.depth for e in entries if e.start <= offset < e.end), default=0)
    start, end = best
    changed = True
    while changed:
        changed = False
        for target, at in jumps:
            if start <= target <= end and at > end:
                end, changed = at, True
        for e in entries:
            if start <= e.start <= end and e.depth >= base and max(e.end, e.target) > end:
                end, changed = max(e.end, e.target), True
    return start, end


def awaits_of(awaitable: Any) -> Iterator[Any]:
    """The coroutines, generators and async generators along a chain of awaits, from
    ``awaitable`` (a task's coroutine) down: a coroutine's ``cr_await``, a generator's
    ``gi_yieldfrom``, and an async generator's step (``anext(gen)``, which shows its
    generator only to the garbage collector's referents) to that generator's ``ag_await``.
    """
    for _ in range(1000):  # a chain is a few dozen deep at most; never loop forever
        if awaitable is None:
            return
        if inspect.iscoroutine(awaitable):
            yield awaitable
            awaitable = awaitable.cr_await
        elif inspect.isgenerator(awaitable):
            yield awaitable
            awaitable = awaitable.gi_yieldfrom
        elif inspect.isasyncgen(awaitable):
            yield awaitable
            awaitable = awaitable.ag_await
        elif asyncio.isfuture(awaitable):  # the bottom: a future (another task's, say)
            return
        else:
            # An async generator's step, a future's iterator (the bottom), or an awaitable
            # object's iterator (``coro.__await__()`` returned by a class's ``__await__``):
            # what it refers to.
            referents = gc.get_referents(awaitable)
            if any(asyncio.isfuture(r) for r in referents):
                return
            awaitable = next((r for r in referents if inspect.iscoroutine(r)
                              or inspect.isgenerator(r) or inspect.isasyncgen(r)
                              # anext(it, default) refers to the step, not the generator
                              or type(r) in _STEP_TYPES), None)
            if awaitable is None:
                yield UNSEEN  # the chain goes on below something it cannot see through
                return


def _frame_of(step: Any) -> FrameType | None:
    frame = getattr(step, "cr_frame", None) or getattr(step, "ag_frame", None)
    return frame if frame is not None else getattr(step, "gi_frame", None)


@functools.lru_cache(maxsize=256)
def _returns_at(code: CodeType) -> frozenset[int]:
    """The offsets of ``code``'s return instructions."""
    return frozenset(ins.offset for ins in dis.get_instructions(code)
                     if ins.opname in ("RETURN_VALUE", "RETURN_CONST"))


def _holds(frame: FrameType, source: FrameType) -> bool:
    return any(getattr(value, "ag_frame", None) is source for value in frame.f_locals.values())


def _looped_over_elsewhere(frames: list[FrameType], spot: FrameType, source: FrameType) -> bool:
    """Whether another frame of the task, inside a loop of its own, holds the source: the
    task's consumer is noted once, and a function that read a first part of the source (a
    header) may have returned or raised, or broken out of its loop, leaving its caller to
    loop over the rest in the same task."""
    return any(f is not spot and _holds(f, source) and _loop_around(f.f_code, f.f_lasti)
               is not None for f in frames)


def consumer_left(spot: ConsumerSpot | None, task: asyncio.Task[Any] | None) -> str | None:
    """How the consumer left its loop over the source (``"by a break or a return"``, ``"by
    an exception"``), or None while it may still be in it, or be working on its event
    elsewhere."""
    if spot is None or task is None or task.done():
        return None
    source, frame, started_at = spot
    loop = _loop_around(frame.f_code, started_at)
    if loop is None:
        return None
    steps = list(awaits_of(task.get_coro()))
    frames = [f for f in map(_frame_of, steps) if f is not None]
    inside = loop[0] <= frame.f_lasti <= loop[1]
    at = next((index for index, f in enumerate(frames) if f is frame), None)
    if at is None and UNSEEN in steps:
        return None  # maybe below where the walk stopped: cannot tell
    if (at is None or not inside) and _looped_over_elsewhere(frames, frame, source):
        return None
    if at is None and frame.f_code.co_flags & inspect.CO_COROUTINE:
        # A coroutine's frame off its task's chain of awaits has returned or raised (an
        # async generator's frame is off it between its steps: judged by where it stands).
        if frame.f_lasti not in _returns_at(frame.f_code):
            return "by an exception"  # out of its loop body: done with the event, as a `break` is
        # Returned, from inside the loop or after it (a `break`, then `return event`):
        # maybe with the event, to a caller who works on it.
        return None
    if inside:
        return None
    if at is None and frame.f_lasti >= 0 and frame.f_code.co_code[frame.f_lasti] == _YIELD_VALUE:
        # An async generator between its steps, suspended at a `yield` after its loop (a
        # `break`, then `yield event`): maybe handing the event to its consumer.
        return None
    for callee in frames[at + 1:] if at is not None else ():
        # The loop was handed on to a function it called, which holds the source.
        if _holds(callee, source):
            return None
    return "by a break or a return"
