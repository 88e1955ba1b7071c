"""``FakeClock``: a manual millisecond clock to inject as ``clock_ms``."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A manual millisecond clock to inject as ``clock_ms``: time moves only by
    :meth:`advance` (forward) or :meth:`set` (either way).

    ``apersist.run(config, clock_ms=FakeClock())`` stamps every event, commit and epoch
    with this clock's time, so tests of timestamps are deterministic.
    """

    __slots__ = ("_now_ms",)

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        if isinstance(start_ms, bool) or not isinstance(start_ms, int) or start_ms < 0:
            raise ValueError(f"start_ms must be a non-negative int: start_ms={start_ms!r}")
        self._now_ms = start_ms

    def __call__(self) -> int:
        """The current time in milliseconds since the epoch."""
        return self._now_ms

    def __repr__(self) -> str:
        return f"FakeClock(now_ms={self._now_ms})"

    @property
    def now_ms(self) -> int:
        """The current time in milliseconds since the epoch."""
        return self._now_ms

    def advance(self, ms: int) -> int:
        """Move the clock forward by ``ms`` milliseconds and return the new time.

        Raises ``ValueError`` for a negative step: to move the clock back (a wall clock
        stepped back by NTP, which apersist tolerates), use :meth:`set`.
        """
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ValueError(f"a clock only moves forward by whole milliseconds: ms={ms!r}")
        self._now_ms += ms
        return self._now_ms

    def set(self, now_ms: int) -> int:
        """Set the time to ``now_ms``, forward or back, and return it.

        apersist takes a clock that steps back without complaint: events keep the time they
        were recorded at, and nothing is reordered. This tests that. Raises ``ValueError``
        for a value that is not a non-negative ``int``.
        """
        if isinstance(now_ms, bool) or not isinstance(now_ms, int) or now_ms < 0:
            raise ValueError(f"a clock reads a non-negative int: now_ms={now_ms!r}")
        self._now_ms = now_ms
        return now_ms
