"""Whether a run is still open: the calls that need a live run check it first."""

from __future__ import annotations

__all__ = ["Lifecycle"]


class Lifecycle:
    """Set once a run's block has been left; every later call that needs the run raises."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = False

    def check(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` was attempted if the run has ended."""
        if self.ended:
            raise RuntimeError(f"the run has ended: use {what} inside the "
                               "`async with apersist.run(...)` block")
