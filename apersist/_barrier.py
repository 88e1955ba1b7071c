"""The source barrier: live source events held while their consumer processes them.

A live source event is recorded before the consumer sees it, and the consumer then updates
tables. If a commit were cut in between, a crash could leave the event committed without
the state it produced (the restart would not deliver it again). So a source *holds* each
live event (serialized, not yet buffered) until its consumer asks for the next one, and a
cut waits until no other task holds one; while it waits, sources take no new events. A
held event is buffered when its consumer asks for the next one, calls ``commit()``, or
waits on the scheduler (see ``SourceBarrier.settle``).

The scheduler owns one ``SourceBarrier``: it drains and settles it at each cut, and hands
it the way to buffer an event (``Scheduler.add_event``, or an offset alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import anyio

from ._buffer import LogBuffer
from ._consumers import ASEND_TYPE, ConsumerSpot, consumer_left, spot_consumer

__all__ = ["CONSUMER", "Consumer", "Held", "SourceBarrier", "claim_consumer"]

logger = logging.getLogger("apersist")

# How long a commit waits for loop bodies to finish the live events they hold.
HOLD_TIMEOUT_S = 5.0


class Consumer:
    """A task that processes live source events, and how many writes it has made.

    A held event is kept when its consumer wrote state after taking it (``keeps``). A
    writer (a table write, a record) tells by one increment on the object that
    ``CONSUMER`` holds in its task's context, which costs about 40 ns; asking asyncio
    for the current task costs 250 ns on Python 3.11 (``asyncio.get_running_loop`` makes
    a system call there), and a table write is meant to cost little more than a dict's.
    A task started from a loop body inherits its parent's context, so its writes count as
    the parent's: work begun for an event is state derived from it.
    """

    __slots__ = ("task", "writes")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.writes = 0


#: The ``Consumer`` of the current task's context, set by a source when it hands over a
#: live event. Writers do ``consumer = CONSUMER.get(); if consumer is not None:
#: consumer.writes += 1``.
CONSUMER: ContextVar[Consumer | None] = ContextVar("apersist_consumer", default=None)


def claim_consumer() -> None:
    """Make the current task a consumer (``run.source()`` calls this in the task that calls
    it), so that a task it starts to fetch the source's next event inherits its
    ``Consumer`` (see ``SourceBarrier.hold``)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop
        return
    if task is None:
        return
    consumer = CONSUMER.get()
    if consumer is None or consumer.task is not task:
        CONSUMER.set(Consumer(task))


def _wraps_an_await(task: asyncio.Task[Any] | None) -> bool:
    """Whether ``task`` runs nothing but one step of an iterator for another task: an async
    generator's ``anext(it)`` as its coroutine (``asyncio.wait_for(anext(it), t)`` on Python
    3.11, ``ensure_future``, ``gather``), or asyncio's wrapper of another awaitable."""
    if task is None:
        return False
    coro = task.get_coro()
    if type(coro) is ASEND_TYPE:
        return True
    code = getattr(coro, "cr_code", None)
    return (code is not None and code.co_name == "_wrap_awaitable"
            and code.co_filename == asyncio.tasks.__file__)


class Held:
    """A live source event (or batch) that its consumer is processing: serialized, not yet
    buffered.

    A source makes one and reuses it for each of its events (``hold`` resets it), sparing
    an object per event; ``records`` is a batch's framed records, else None.
    """

    __slots__ = ("buf", "buffered", "closed", "consumer", "mark", "offset", "records",
                 "settled", "spot", "stream", "task", "time_ms", "value")

    def __init__(self, buf: LogBuffer | None, stream: str) -> None:
        self.buf = buf  # None: the stream records offsets only (OFFSETS_ONLY)
        self.stream = stream
        self.task: asyncio.Task[Any] | None = None
        self.consumer: Consumer | None = None
        self.mark = 0  # the consumer's writes when the event was handed over
        self.value = b""
        self.offset = b""
        self.time_ms = 0
        self.records: list[tuple[bytes, bytes, int]] | None = None
        self.settled = True  # buffered or dropped; a release then does nothing
        self.closed = False  # its source was closed; the next cut decides (close_held)
        # Buffered ahead of its release, still held: its consumer recorded on the same
        # stream, which must land after it (Scheduler.add_event). Cuts still wait for it.
        self.buffered = False
        # Where the task that consumes the source loops over it (see _consumers), noted
        # when a task first takes an event from it.
        self.spot: ConsumerSpot | None = None

    def written(self) -> bool:
        """Whether its task wrote state since the event was handed over."""
        consumer = self.consumer
        return consumer is not None and consumer.writes != self.mark


class SourceBarrier:
    """The live source events held by their consumers, and a cut's wait for them.

    ``buffer(held)`` buffers a held event's data (or its offset alone) and returns whether
    uncommitted bytes are then over the back-pressure bound; ``can_record()`` says whether
    the run still records. ``final`` is set by ``Scheduler.finish``: (the task leaving the
    block, whether by an exception).
    """

    def __init__(self, buffer: Callable[[Held], bool], can_record: Callable[[], bool]) -> None:
        self._buffer = buffer
        self._can_record = can_record
        self.held: set[Held] = set()
        self._holds_changed = anyio.Event()
        self._cut_barrier: anyio.Event | None = None
        # Tasks waiting on the scheduler (see parked_while_waiting).
        self._parked: set[asyncio.Task[Any] | None] = set()
        self.hold_timeout = HOLD_TIMEOUT_S
        self.final: tuple[asyncio.Task[Any] | None, bool] | None = None

    def changed(self) -> None:
        """Wake a cut waiting for held events, to look again (the run is ending, say)."""
        self._holds_changed.set()

    def hold(self, held: Held, task: asyncio.Task[Any] | None, value: bytes, offset: bytes,
             time_ms: int) -> None:
        """Hold one live event for ``task`` until ``release``: ``held`` is the source's own,
        reset for this event. The task's ``Consumer`` starts counting its writes.

        A task that only wraps the awaiting of the source's next step and hands the event
        back to the task that made it (``asyncio.wait_for(anext(it), t)`` on Python 3.11,
        ``ensure_future``, ``gather``) is not the consumer: it ends as soon as the event is
        handed over, and the loop body runs in its creator, whose ``Consumer`` it inherited
        (``run.source()`` sets one in the task that calls it). Any other task holds for
        itself, even one whose context came from another consumer (an iterator handed to
        a task): it is that task whose cancellation or failure interrupts the body.
        """
        consumer = CONSUMER.get()
        if consumer is not None and consumer.task is not task and _wraps_an_await(task):
            task = consumer.task
        elif consumer is None or consumer.task is not task:
            consumer = Consumer(task)
            CONSUMER.set(consumer)
        held.spot = spot_consumer(1)  # hold() is called by the source itself
        held.task = task
        held.consumer = consumer
        held.mark = consumer.writes
        held.settled = held.closed = held.buffered = False
        held.value = value
        held.offset = offset
        held.time_ms = time_ms
        self.held.add(held)

    def release(self, held: Held, *, finished: bool) -> bool:
        """The consumer is done with ``held``: buffer it (``finished``), or decide now.

        ``finished=False`` decides as a normal cut would (see ``keeps``). Returns whether
        uncommitted bytes are now over the back-pressure bound.
        """
        self.held.discard(held)
        if self._cut_barrier is not None:
            self._holds_changed.set()  # a cut waits for holds: it looks again
        if held.settled:
            return False
        if finished:
            return self.materialize(held)  # raises if the run can no longer record
        if self._can_record() and self.keeps(held, final=False):
            return self.materialize(held)
        held.settled = True  # a closing source never raises for it
        return False

    def close_held(self, held: Held) -> None:
        """The source was closed while its consumer held ``held`` (a ``break``, an exception
        in the loop body, the iterator collected), which a source cannot tell apart.

        Decided at once if the consumer's task was interrupted, else by the next cut (see
        ``keeps``): the final cut of a block left by an exception from this task is the
        one that can tell. No cut waits for it.
        """
        if held.settled:
            self.held.discard(held)
            return
        held.closed = True
        if self.interrupted(held.task):
            self.release(held, finished=False)
        self._holds_changed.set()

    def keeps(self, held: Held, *, final: bool) -> bool:
        """Whether a held event whose consumer never asked for the next one is committed.

        An event and the state derived from it go together. If the consumer's task wrote any
        state since the event was handed over, it has (at least begun to) apply it: keep the
        event, or the restart would deliver it again and apply it twice. If none was, keep it
        only when its consumer finished with it: not when the consumer's task was cancelled
        or failed, the block is being left by an exception from that task, or (at the final
        cut) another task is still in its loop body; the restart then delivers it again.
        """
        if held.written():
            return True
        task = held.task
        if self.interrupted(task):
            return False
        if not final:
            return True
        exiting, by_exception = self.final or (None, False)
        if task is exiting:
            return not by_exception
        return held.closed or (task is not None and task.done())

    @staticmethod
    def interrupted(task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` stopped (or is stopping) part-way: cancelled or failed."""
        if task is None:
            return False
        if task.done():
            # exception() marks a failed task's exception as retrieved; a failed consumer
            # task's error is normally retrieved by its group anyway.
            return task.cancelled() or task.exception() is not None
        return task.cancelling() > 0

    def materialize(self, held: Held) -> bool:
        """Buffer a held event now (it stays held if its consumer still processes it)."""
        held.settled = True
        return self._buffer(held)

    def materialize_holds_of(self, task: asyncio.Task[Any] | None) -> None:
        for held in [h for h in self.held if h.task is task and not h.settled]:
            self.materialize(held)

    def settle(self, final: bool) -> None:
        """At a cut: buffer or drop the held events that the cut must decide on.

        A consumer task that ended drops its held event if it was interrupted, else keeps
        it; a task waiting on the scheduler (parked) keeps it, as it cannot finish the event
        while it waits. At the final cut every held event is decided (see ``finish``).
        """
        for held in list(self.held):
            task = held.task
            if held.settled:
                if final or held.closed or (task is not None and task.done()):
                    self.held.discard(held)
            elif final or held.closed or (task is not None and task.done()):
                self.held.discard(held)
                if self.keeps(held, final=final):
                    self.materialize(held)
                else:
                    held.settled = True
            elif task in self._parked:
                self.materialize(held)  # still held: its task goes on after the wait

    async def wait_cut(self) -> None:
        """Sources call this before taking a new event: a waiting cut goes first."""
        if self._cut_barrier is None:
            return
        # Parked while it waits: asking for a new event means this task is done with the
        # events it still holds (say, of another source it reads in turn), and the cut may
        # be waiting for exactly those holds (a deadlock otherwise).
        with self.parked_while_waiting():
            while self._cut_barrier is not None:
                await self._cut_barrier.wait()

    @contextlib.contextmanager
    def parked_while_waiting(self) -> Iterator[None]:
        """While the current task waits on the scheduler, a cut does not wait for its holds.

        A task waiting for a commit, for capacity or for a cut cannot also finish the
        source events it holds; waiting for them would deadlock.
        """
        task = asyncio.current_task()
        added = task not in self._parked
        self._parked.add(task)
        self._holds_changed.set()
        try:
            yield
        finally:
            if added:
                self._parked.discard(task)

    def blockers(self) -> list[Held]:
        """Held events whose tasks are still processing them (not waiting on us, not ended)."""
        return [h for h in self.held
                if not h.settled and not h.closed and h.task not in self._parked
                and not (h.task is not None and h.task.done())]

    async def drain(self) -> None:
        if not self.blockers():
            return
        self._cut_barrier = anyio.Event()
        # Bounded: a loop body that waits, through other tasks, on something that needs
        # this commit would otherwise deadlock the run.
        with anyio.move_on_after(self.hold_timeout) as scope:
            # Not once the run is ending: the final cut decides on every held event.
            while self.blockers() and self.final is None:
                self._holds_changed = anyio.Event()
                # Also re-checked now and then: a consumer task that ends (fails, is
                # cancelled) while its source is still referenced changes no event.
                with anyio.move_on_after(0.05):
                    await self._holds_changed.wait()
                self._settle_left()
        if scope.cancelled_caught:
            logger.warning(
                "committing while live source events are still being processed: each goes "
                "into a later commit, and the state derived from it so far into this one. "
                "Either a loop body is still working on its event (finish each event's work "
                "before taking the next one), or a loop over run.source() was left while "
                "its iterator is still referenced (close a source you leave early: `async "
                "with contextlib.aclosing(run.source(...)) as events:`): waited_s=%s "
                "holders=%d", self.hold_timeout, len(self.blockers()))

    def _settle_left(self) -> None:
        """Buffer the held events whose consumers have gone from their loops (see
        ``_consumers``): done with them, they will never ask for the next event, and the
        commit would otherwise wait for them until its timeout, every time."""
        for held in self.blockers():
            how = consumer_left(held.spot, held.task)
            if how is None:
                continue
            logger.warning(
                "a loop over run.source() was left %s without closing the source, which "
                "still held the event the loop took last: that event is committed now, with "
                "the state derived from it. Close a source you leave early (`async with "
                "contextlib.aclosing(run.source(...)) as events:`): stream=%s", how,
                held.stream)
            self.materialize(held)

    def lift(self) -> None:
        barrier, self._cut_barrier = self._cut_barrier, None
        if barrier is not None:
            barrier.set()
