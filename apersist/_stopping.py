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
    waiting: dict[int, AsyncIterator[Any]] = {}
    for source in list(life.sources):
        waiting_on = getattr(source, "ag_await", None)  # typeshed lacks ag_await
        if waiting_on is None:  # not started, suspended at its yield, or finished
            continue
        if getattr(waiting_on, "cr_code", None) in _HOLDS_AN_ITEM:
            continue
        waiting[id(source)] = source
    for task in _tasks_awaiting(waiting):
        if task is current or task.done() or task in life.stop_cancelled:
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


def _tasks_awaiting(sources: dict[int, AsyncIterator[Any]]) -> list[asyncio.Task[Any]]:
    """The tasks whose chains of awaits run through one of ``sources`` (by ``id``): one
    walk of each task's chain, whatever the number of sources."""
    found: list[asyncio.Task[Any]] = []
    if not sources:
        return found
    for task in asyncio.all_tasks():
        if any(sources.get(id(step)) is step for step in awaits_of(task.get_coro())):
            found.append(task)
    return found


# The runs in their blocks with ``stop_on_signals`` (the loop has one handler per signal,
# shared by all of them): (lifecycle, host task). The handlers are installed by the first
# run to enter, and the ones that were there before come back when the last one leaves.
_signal_runs: list[tuple[Lifecycle, asyncio.Task[Any] | None]] = []
# Per signal: (Python's handler, the loop's own handler) before the first run installed.
_previous_handlers: dict[signal.Signals, tuple[Any, asyncio.Handle | None]] = {}
_signal_loop: list[asyncio.AbstractEventLoop] = []  # the loop they are installed on


def _restore_handlers(loop: asyncio.AbstractEventLoop) -> None:
    _signal_loop.clear()
    for sig in list(_previous_handlers):
        previous, earlier = _previous_handlers.pop(sig)
        loop.remove_signal_handler(sig)
        if earlier is not None and not earlier.cancelled():
            # A handler the application gave the loop itself (loop.add_signal_handler):
            # asyncio keeps one per signal, so ours replaced it until now.
            loop.add_signal_handler(sig, earlier._callback, *earlier._args)  # type: ignore[attr-defined]
        elif previous is not None:
            # remove_signal_handler puts Python's default back; put back what was there
            # (asyncio.run's own SIGINT handler, say).
            signal.signal(sig, previous)


def _on_signal(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
    """Each run in its block: the first signal asks it to stop, the next one cancels its
    host (and the run no longer handles signals: a third one acts as it would without)."""
    for entry in list(_signal_runs):
        life, host = entry
        if not life.stopping:
            logger.warning("%s received: stopping the run (sources end after the event in "
                           "hand, then the final commit); a second one cancels it",
                           sig.name)
            request_stop(life)
            continue
        logger.warning("%s received again: cancelling the run", sig.name)
        _signal_runs.remove(entry)
        if host is not None and not host.done():
            host.cancel()
    if not _signal_runs:
        _restore_handlers(loop)


@contextlib.contextmanager
def handling_signals(life: Lifecycle, host: asyncio.Task[Any] | None) -> Iterator[None]:
    """While the run's block runs: the first ``SIGTERM``/``SIGINT`` asks the run to stop,
    the second cancels ``host`` (the task that entered the block); the handlers that were
    there before come back when the last such run leaves its block, or at the second
    signal. Several runs at once (nested, or in several tasks) share the handlers: a
    signal goes to each of them.

    Raises ``RuntimeError`` where the loop cannot handle signals (not the main thread).
    """
    loop = asyncio.get_running_loop()
    if _signal_loop and _signal_loop[0] is not loop:
        if not _signal_loop[0].is_closed():
            raise RuntimeError("stop_on_signals needs an event loop that handles signals "
                               "(the main thread's, on a Unix system): another loop has "
                               "them")
        _signal_runs.clear()  # a loop that ended without its runs leaving their blocks
        _previous_handlers.clear()
        _signal_loop.clear()
    if not _signal_runs and not _previous_handlers:
        _signal_loop.append(loop)
        try:
            loop_handlers: dict[signal.Signals, asyncio.Handle] = dict(
                getattr(loop, "_signal_handlers", {}))
            for sig in STOP_SIGNALS:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, _on_signal, loop, sig)
                _previous_handlers[sig] = (previous, loop_handlers.get(sig))
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            _restore_handlers(loop)
            raise RuntimeError("stop_on_signals needs an event loop that handles signals "
                               f"(the main thread's, on a Unix system): {exc}") from exc
    entry = (life, host)
    _signal_runs.append(entry)
    try:
        yield
    finally:
        if entry in _signal_runs:
            _signal_runs.remove(entry)
        if not _signal_runs and _previous_handlers:
            _restore_handlers(loop)
