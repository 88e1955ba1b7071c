"""The apersist exception tree.

Every error that apersist raises on purpose derives from :class:`PersistenceError`, except
the ``TypeError`` and ``ValueError`` raised for bad arguments at the call that was given
them. Messages say what happened first, then the facts as ``key=value``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._format import WriterInfo

__all__ = [
    "BackendError",
    "CorruptDataError",
    "FencedError",
    "IncompatibleFormatError",
    "PersistenceError",
    "SegmentCollectedError",
    "WriterActiveError",
]


class PersistenceError(Exception):
    """Base class of every apersist failure."""


class CorruptDataError(PersistenceError):
    """A stored object failed a checksum, length, magic or reference check.

    The message names the object and the byte offset. Corrupt data is never replayed and
    never silently skipped.
    """


class SegmentCollectedError(CorruptDataError):
    """A segment this run needs was garbage-collected after the run opened the store.

    The store moved on (a newer history, or a compaction) so that no live commit names the
    segment any more, and ``apersist gc`` deleted it while this run still read the state it
    had opened: the grace period was shorter than this run's life. Reopen the store to read
    its current state. A ``CorruptDataError``, so code that catches that still catches it,
    but nothing stored is damaged.
    """


class IncompatibleFormatError(PersistenceError):
    """The store was written by a newer, incompatible format version."""


class FencedError(PersistenceError):
    """Another writer took over this store; this run may no longer commit.

    ``holder`` is the writer that took over, as its epoch record names it (host, pid,
    label, when it started), or None when that record could not be read.
    """

    def __init__(self, message: str, *, holder: WriterInfo | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class WriterActiveError(PersistenceError):
    """The store's writer committed too recently to be taken over, and the run was told
    not to take an active store (``Config(takeover_idle_ms=...)``). Nothing was written.

    ``holder`` is that writer, as its epoch record names it; ``idle_ms`` is how long ago
    it last committed (by the storage's clock where the backend gives one).
    """

    # Defaults, so that copy.copy() and the like, which call the class with the message
    # alone, still work.
    def __init__(self, message: str, *, holder: WriterInfo | None = None,
                 idle_ms: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.idle_ms = idle_ms


class BackendError(PersistenceError):
    """The storage backend failed (after retries, where they apply).

    The original error is chained as ``__cause__``.
    """
