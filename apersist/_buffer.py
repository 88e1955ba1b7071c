"""A log's uncommitted records: the open batch of ``record()`` and the framed body.

``LogBuffer`` holds bytes only; when to frame and every byte's accounting (back-pressure,
sealing at the segment size) are the scheduler's (``Scheduler.add_event``, ``frame`` and
``append_framed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _format as fmt

if TYPE_CHECKING:
    from ._barrier import Held

__all__ = ["BATCH_ENTRIES", "LogBuffer"]

# The most events one batch record holds (record()'s open batch, record_many's batches).
# Replay decodes a batch with one loads, so its values are alive together: 256 of them
# stay under the collector's young-generation threshold (700 new container objects).
# Batches of about a thousand made replay set off a young collection per batch, a sixth
# of its time in the benchmark suite; at 256 the per-record cost (head, CRC, one dumps)
# is still well under 1% of the batch.
BATCH_ENTRIES = 256

_CLOSE = ord("]")
_COMMA = ord(",")


class LogBuffer:
    """The uncommitted records of one log (a stream, a table, the cache).

    ``body`` holds framed records, ready to become a segment body as it is. Events recorded
    one at a time first gather in an *open batch*, framed as one batch record when the
    clock's millisecond changes, when it holds ``BATCH_ENTRIES`` events, when it passes a
    byte budget and at each cut: events of one millisecond share a ``time_ms`` anyway, so
    the bytes are those of ``record_many``, and one record per batch makes recording and
    replay several times cheaper than one per event. The scheduler accounts for an open
    batch's events when it is framed (``Scheduler.frame``), not one by one. When the body
    passes the segment size it is sealed, so one segment stays bounded.

    The open batch is kept as the text of its record, ``[v1,v2,...,`` (and, once an event
    has an offset, ``[o1,null,...,`` beside it), not as a list of each event's JSON: a
    list keeps every ``orjson.dumps`` result (a 4 KiB block each) alive until the batch is
    framed, and freeing them together can make glibc hand the memory back to the system
    and fault it in again for the next batch, which cost more than everything else
    ``record()`` does (see docs/performance.md). A copied result is freed at once and its
    block reused.
    """

    __slots__ = ("body", "count", "fast_from_ns", "fast_until_ns", "kind", "live_ms",
                 "live_offsets", "live_values", "name", "offset", "open_bytes", "open_count",
                 "open_json", "open_ms", "open_offsets", "recorded_offset", "sealed", "size",
                 "source_hold")

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.body = bytearray()
        self.count = 0  # entries framed in body
        self.size = 0  # bytes framed in body, for sealing
        self.offset: bytes | None = None  # the newest offset recorded (JSON) since the cut
        self.recorded_offset: bytes | None = None  # the newest offset this run recorded
        self.sealed: list[tuple[bytearray, int]] = []
        self.open_json = bytearray(b"[")  # "[" and each open event's JSON followed by ","
        self.open_count = 0
        self.open_offsets: bytearray | None = None  # likewise, "null" for none; or None
        self.open_ms: int | None = None
        # JSON bytes added to the open batch by append; record()'s inlined copy leaves them
        # out (its values are small enough that a full batch of them stays in budget).
        self.open_bytes = 0
        # The millisecond, in clock nanoseconds [from, until), whose events
        # ``Stream.record`` may add to ``open_json`` directly, with no call into the
        # scheduler (comparing nanoseconds spares it a division per event). Granted by
        # ``Scheduler.add_event`` while the open batch has no offsets and the scheduler
        # knows of pending data; taken back (an empty range) at each cut and when the run
        # stops persisting, so that the next event goes through ``add_event`` again.
        self.fast_from_ns = self.fast_until_ns = 0
        # Live source events of one millisecond (``time_ms`` = live_ms), after every event
        # of the open batch: their JSON and their offsets' (b"" for none). A live source
        # appends to these two lists itself (Stream._source), two list appends per event;
        # the scheduler folds them into one batch record (``fold_live``) before anything
        # else is added to this log, and at every cut. Cleared in place, never replaced:
        # the source keeps the lists.
        self.live_values: list[bytes] = []
        self.live_offsets: list[bytes] = []
        self.live_ms = 0
        # The Held of the source live on this stream, if one is: what its consumer records
        # on the stream while it holds an event goes after that event.
        self.source_hold: Held | None = None

    def start_live(self, value: bytes, offset: bytes, time_ms: int) -> None:
        """Start the live lists with one event (the open batch is framed: it comes first)."""
        self.live_values.append(value)
        self.live_offsets.append(offset)
        self.live_ms = time_ms
        self.revoke_fast()  # record() must not add events after these to the open batch

    def fold_live(self) -> tuple[int, int]:
        """Frame the live events as one record; returns (bytes added, events)."""
        values, offsets = self.live_values, self.live_offsets
        count = len(values)
        if not count:
            return 0, 0
        newest = next((off for off in reversed(offsets) if off), b"")
        if count == 1:
            value, offset = values[0], offsets[0]
        else:
            value = b"[%b]" % b",".join(values)
            offset = b"[%b]" % b",".join([off or b"null" for off in offsets]) if newest else b""
        if newest:
            self.offset = self.recorded_offset = newest
        nbytes = self.append_framed(value, offset, self.live_ms, count)
        values.clear()
        offsets.clear()
        return nbytes, count

    @property
    def newest_offset(self) -> bytes | None:
        """The newest offset this run recorded for the log (JSON), live events included."""
        return next((off for off in reversed(self.live_offsets) if off), self.recorded_offset)

    def allow_fast(self, time_ms: int) -> None:
        """Let ``Stream.record`` append the rest of millisecond ``time_ms`` by itself."""
        self.fast_from_ns = time_ms * 1_000_000
        self.fast_until_ns = self.fast_from_ns + 1_000_000

    def revoke_fast(self) -> None:
        """Send the next event through ``Scheduler.add_event``."""
        self.fast_until_ns = self.fast_from_ns

    def append(self, value: bytes, offset: bytes) -> None:
        """Add one event (its JSON; ``offset`` JSON or b"" for none) to the open batch.

        Only the text: when to frame, and the accounting, are ``Scheduler.add_event``'s.
        ``Stream.record`` inlines this for an event without an offset.
        """
        if offset and self.open_offsets is None:
            self.open_offsets = bytearray(b"[" + b"null," * self.open_count)
        self.open_json += value
        self.open_json.append(_COMMA)
        if self.open_offsets is not None:
            self.open_offsets += offset or b"null"
            self.open_offsets.append(_COMMA)
        if offset:
            self.offset = self.recorded_offset = offset
        self.open_count += 1
        self.open_bytes += len(value) + len(offset)

    def frame_open(self) -> tuple[int, int]:
        """Frame the open batch's events as one record, as ``fmt.join_batch`` would.

        Returns (bytes added to ``body``, events framed) for the scheduler to account.
        """
        count = self.open_count
        if not count:
            return 0, 0
        value, offsets = self.open_json, self.open_offsets
        if count == 1:  # a batch of one is framed as a single entry
            value = value[1:-1]
            offset = b"" if offsets is None or offsets == b"[null," else offsets[1:-1]
        else:
            value[-1] = _CLOSE  # the last "," becomes "]"
            offset = b""
            if offsets is not None:
                offsets[-1] = _CLOSE
                offset = offsets
        nbytes = self.append_framed(value, offset, self.open_ms or 0, count)
        self.open_json, self.open_count, self.open_offsets = bytearray(b"["), 0, None
        self.open_bytes = 0
        return nbytes, count

    def append_framed(self, value: bytes | bytearray, offset: bytes | bytearray, time_ms: int,
                      count: int) -> int:
        """Frame one record onto ``body`` and return its size in bytes: the one place that
        does. Accounting is the caller's (``Scheduler.append_framed``, ``Scheduler.frame``).
        """
        nbytes = fmt.append_record(self.body, value, offset, time_ms, count)
        self.count += count
        return nbytes

    def seal(self) -> None:
        """End the body as a batch of its own (the open batch, if any, stays open)."""
        if self.count:
            self.sealed.append((self.body, self.count))
            self.body, self.count = bytearray(), 0
        self.size = len(self.body)

    def take(self) -> list[tuple[bytearray, int]]:
        """Remove and return every batch (body, record count), oldest first."""
        self.seal()
        batches, self.sealed = self.sealed, []
        return batches
