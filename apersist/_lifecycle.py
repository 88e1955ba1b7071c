"""Whether a run is still open, and whether it was asked to stop: the calls that need a
live run check the first; sources check the second (see ``_stopping``)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["Lifecycle"]


class Lifecycle:
    """Set once a run's block has been left; every later call that needs the run raises.

    ``stopping`` is set by ``run.stop()`` (or a signal, with ``stop_on_signals``): every
    ``run.source()`` loop then ends after the event in hand. ``sources`` are the run's
    source iterators, which ``run.stop()`` may have to wake (``_stopping.request_stop``);
    ``stop_cancelled`` the tasks it cancelled to do so, whose cancellation the source
    takes back.
    """

    __slots__ = ("ended", "sources", "stop_cancelled", "stopped", "stopping")

    def __init__(self) -> None:
        self.ended = False
        self.stopping = False
        self.stopped = asyncio.Event()  # set with ``stopping``: ``run.wait_stopping()``
        self.sources: weakref.WeakSet[AsyncIterator[Any]] = weakref.WeakSet()
        self.stop_cancelled: set[asyncio.Task[Any]] = set()

    def check(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` was attempted if the run has ended."""
        if self.ended:
            raise RuntimeError(f"the run has ended: use {what} inside the "
                               "`async with apersist.run(...)` block")
