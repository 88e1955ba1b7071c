"""A run's graceful stop: ``run.stop()`` and ``stop_on_signals``.

Asked to stop, a run lets every ``run.source()`` loop end after the event in hand: a
source checks ``Lifecycle.stopping`` when its consumer asks for the next event, and ends
instead of reading another. A source that is waiting for its reader (a queue with nothing
in it) would not ask in time, so ``request_stop`` wakes it: it cancels the task that
awaits the source, and the source, finding that cancellation among the run's own
(``Lifecycle.stop_cancelled``), takes it back (``Task.uncancel``) and ends as if its reader
had run dry. Nothing else is ever cancelled: not a task in a loop body (the source is then
suspended at its ``yield``, and ends when asked next), not a task whose source holds an
item it has read but not yet handed over (see ``_HOLDS_AN_ITEM``).

With ``stop_on_signals`` the first ``SIGTERM`` or ``SIGINT`` asks the run to stop; a second
one cancels the task that entered the run's block, as a signal would without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from types import CodeType
from typing import Any

from ._barrier import SourceBarrier
from ._consumers import awaits_of
from ._lifecycle import Lifecycle

__all__ = ["STOP_SIGNALS", "handling_signals", "register_source", "request_stop",
           "settle_stop_cancel", "take_back_stop_cancel"]

logger = logging.getLogger("apersist")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOP_MESSAGE = "apersist: run.stop() wakes a source that waits for its reader"
# A source awaiting one of these holds an item that its reader gave and that no consumer
# has seen yet: cancelling it there would drop the item (lost for good, from a reader that
# cannot seek). It is not woken; it hands the item over, then ends when asked for the next.
_HOLDS_AN_ITEM: set[CodeType] = {SourceBarrier.wait_cut.__code__}


def mark_holds_an_item(function: Callable[..., Any]) -> None:
    """Declare a coroutine function during which a source holds an unseen item."""
    _HOLDS_AN_ITEM.add(function.__code__)


def register_source(life: Lifecycle, source: AsyncIterator[Any]) -> None:
    """Make ``source`` (a ``run.source()`` iterator) one that ``request_stop`` can wake."""
    life.sources.add(source)


def request_stop(life: Lifecycle) -> None:
    """Ask every source of the run to end after the event in hand (idempotent).

    Wakes each source that is waiting for its reader by cancelling the task that awaits
    it, unless that task is the caller's own (a reader that asks for the stop ends at the
    next event instead).
    """
    if life.stopping:
        return
    life.stopping = True
    life.stopped.set()
    try:
        current = asyncio.current_task()
    except RuntimeError:  # no running loop: nothing to wake
        return
    for source in list(life.sources):
        waiting_on = getattr(source, "ag_await", None)  # typeshed lacks ag_await
        if waiting_on is None:  # not started, suspended at its yield, or finished
            continue
        if getattr(waiting_on, "cr_code", None) in _HOLDS_AN_ITEM:
            continue
        task = _task_awaiting(source)
        if task is None or task is current or task.done() or task in life.stop_cancelled:
            continue
        life.stop_cancelled.add(task)
        task.cancel(_STOP_MESSAGE)


def take_back_stop_cancel(life: Lifecycle) -> bool:
    """In a source's ``except CancelledError``: whether the cancellation was ``request_stop``'s
    alone. It is then taken back (``Task.uncancel``), and the source ends normally; if
    anyone else cancelled the task too, the source lets the cancellation through."""
    task = asyncio.current_task()
    if task is None or task not in life.stop_cancelled:
        return False
    life.stop_cancelled.discard(task)
    return task.uncancel() == 0


def settle_stop_cancel(life: Lifecycle) -> None:
    """When a source ends (the run stopping): take back a cancellation of ``request_stop``
    that never reached the source. A reader may swallow it: Python 3.11's
    ``asyncio.wait_for`` returns the inner result when the cancellation races its
    completion. Left in place, the task would count as being cancelled for good
    (``Task.cancelling()``, which the source barrier reads as an interrupted consumer)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # closed with no running loop (collected after the loop ended)
        return
    if task is not None and task in life.stop_cancelled:
        life.stop_cancelled.discard(task)
        if task.cancelling() > 0:
            task.uncancel()


def _task_awaiting(source: AsyncIterator[Any]) -> asyncio.Task[Any] | None:
    """The task whose chain of awaits runs through ``source``, if any (once per stop, so
    its cost does not matter)."""
    for task in asyncio.all_tasks():
        if any(step is source for step in awaits_of(task.get_coro())):
            return task
    return None


@contextlib.contextmanager
def handling_signals(life: Lifecycle, host: asyncio.Task[Any] | None) -> Iterator[None]:
    """While the run's block runs: the first ``SIGTERM``/``SIGINT`` asks the run to stop,
    the second cancels ``host`` (the task that entered the block); the handlers that were
    there before come back when the block is left, or at the second signal.

    Raises ``RuntimeError`` where the loop cannot handle signals (not the main thread).
    """
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    # A handler the application gave the loop itself (loop.add_signal_handler) for one of
    # these signals: asyncio keeps one per signal, so ours replaces it until the block ends.
    loop_handlers: dict[signal.Signals, asyncio.Handle] = dict(
        getattr(loop, "_signal_handlers", {}))
    installed: list[signal.Signals] = []

    def restore() -> None:
        while installed:
            sig = installed.pop()
            loop.remove_signal_handler(sig)
            earlier = loop_handlers.get(sig)
            if earlier is not None and not earlier.cancelled():
                loop.add_signal_handler(sig, earlier._callback, *earlier._args)  # type: ignore[attr-defined]
            elif previous[sig] is not None:
                # remove_signal_handler puts Python's default back; put back what was
                # there (asyncio.run's own SIGINT handler, say).
                signal.signal(sig, previous[sig])

    def on_signal(sig: signal.Signals) -> None:
        if not life.stopping:
            logger.warning("%s received: stopping the run (sources end after the event in "
                           "hand, then the final commit); a second one cancels it",
                           sig.name)
            request_stop(life)
            return
        logger.warning("%s received again: cancelling the run", sig.name)
        restore()
        if host is not None and not host.done():
            host.cancel()

    try:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        restore()
        raise RuntimeError("stop_on_signals needs an event loop that handles signals (the "
                           f"main thread's, on a Unix system): {exc}") from exc
    try:
        yield
    finally:
        restore()
