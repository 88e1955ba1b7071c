"""The snapshot scheduler: batches -> segments -> concurrent uploads -> one atomic commit.

Recording appends framed bytes to a per-log ``LogBuffer`` (no awaiting, no I/O). The
scheduler, one coroutine per run, cuts every non-empty buffer into immutable segments,
uploads them concurrently through the store and then writes the commit that names them.
With ``snapshot_interval_ms == 0`` it commits as soon as the previous commit has finished
(group commit); otherwise on that period. An idle run makes no backend requests at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from . import _format as fmt
from ._errors import PersistenceError
from ._store import SegmentBlob, Store

__all__ = ["CommitInfo", "LogBuffer", "Scheduler", "SnapshotSource"]

#: Returns a table's whole state as (framed body, record count) when it wants compacting.
SnapshotSource = Callable[[], "tuple[bytearray, int] | None"]

logger = logging.getLogger("apersist")

# Segments at least this big are assembled (join + body CRC) in a worker thread.
_THREAD_BUILD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """What a commit made durable: its number, how many deltas, how many bytes."""

    seq: int
    deltas: int
    bytes: int


class LogBuffer:
    """The uncommitted records of one log (a stream, a table, the cache).

    ``body`` holds framed records, ready to become a segment body as it is. When it passes
    the segment size it is sealed, so one segment stays bounded.
    """

    __slots__ = ("body", "count", "kind", "name", "offset", "sealed")

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.body = bytearray()
        self.count = 0
        self.offset: bytes | None = None  # the newest offset recorded (JSON), if any
        self.sealed: list[tuple[bytearray, int]] = []

    def seal(self) -> None:
        if self.count:
            self.sealed.append((self.body, self.count))
            self.body, self.count = bytearray(), 0

    def take(self) -> list[tuple[bytearray, int]]:
        """Remove and return every batch (body, record count), oldest first."""
        self.seal()
        batches, self.sealed = self.sealed, []
        return batches


class Scheduler:
    """Owns the run's uncommitted data and every commit of it."""

    def __init__(self, store: Store, *, interval_ms: int, max_pending_bytes: int,
                 max_segment_bytes: int, clock_ms: Callable[[], int]) -> None:
        self._store = store
        self._interval = interval_ms / 1000
        self._max_pending = max_pending_bytes
        self.max_segment_bytes = max_segment_bytes
        self._clock_ms = clock_ms
        self._buffers: dict[tuple[str, str], LogBuffer] = {}
        self._offset_updates: dict[str, bytes] = {}  # OFFSETS_ONLY: offsets without data
        self._snapshot_sources: dict[str, SnapshotSource] = {}
        self._reset_pending = False
        self._forced = False
        self._lock = anyio.Lock()
        self._pending_event = anyio.Event()
        self._done_event = anyio.Event()
        self._urgent = anyio.Event()
        self._failure: PersistenceError | None = None
        self._last = CommitInfo(store.last_seq, 0, 0)
        # Counters: deltas appended ever, deltas durable; bytes pending and in flight.
        self.appended = 0
        self.durable = 0
        self.pending_bytes = 0
        self.inflight_bytes = 0
        self._uploads = 0
        self._bytes_written = 0
        self._commits = 0
        self._latency_ms = 0.0

    # ------------------------------------------------------------------ recording side
    def buffer(self, kind: str, name: str) -> LogBuffer:
        key = (kind, name)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = LogBuffer(kind, name)
        return buf

    def note_appended(self, buf: LogBuffer, nbytes: int) -> None:
        """Account for one record framed onto ``buf.body`` (``nbytes`` long)."""
        if self._failure is not None:
            raise self._failure
        self.appended += 1
        self.pending_bytes += nbytes
        if len(buf.body) >= self.max_segment_bytes:
            buf.seal()
        if not self._pending_event.is_set():
            self._pending_event.set()

    def set_offset(self, stream: str, offset: bytes) -> None:
        """Record an offset with no data (``SnapshotAccess.OFFSETS_ONLY``)."""
        if self._failure is not None:
            raise self._failure
        self._offset_updates[stream] = offset
        self.appended += 1
        if not self._pending_event.is_set():
            self._pending_event.set()

    def request_reset(self) -> None:
        """Make the next commit start a new history (``SnapshotAccess.RECORD``)."""
        self._reset_pending = True
        self._pending_event.set()

    def request_commit(self) -> None:
        """Make the next ``commit()`` write even with no new deltas (e.g. for compaction)."""
        self._forced = True
        self._pending_event.set()

    def register_snapshot(self, table: str, source: SnapshotSource) -> None:
        """``source()`` returns a table's whole state (body, count) when it wants compacting."""
        self._snapshot_sources[table] = source

    @property
    def over_limit(self) -> bool:
        return self.pending_bytes + self.inflight_bytes > self._max_pending

    async def wait_capacity(self) -> None:
        """Back-pressure: wait until uncommitted bytes fall under the bound."""
        while self.over_limit:
            self.check_failure()
            done = self._done_event
            self._urgent.set()
            await done.wait()
        self.check_failure()

    def check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def has_pending(self) -> bool:
        return self.appended > self.durable or self._reset_pending or self._forced

    def stats(self) -> dict[str, int | float]:
        """A snapshot of the counters behind ``Run.stats``."""
        return {
            "deltas_recorded": self.appended,
            "deltas_committed": self.durable,
            "pending_deltas": self.appended - self.durable,
            "pending_bytes": self.pending_bytes + self.inflight_bytes,
            "bytes_written": self._bytes_written,
            "commits": self._commits,
            "uploads_in_flight": self._uploads,
            "last_commit_latency_ms": self._latency_ms,
            "last_seq": self._last.seq,
        }

    # ------------------------------------------------------------------ committing side
    async def commit(self) -> CommitInfo:
        """Make everything appended before this call durable; return the commit that did."""
        self.check_failure()
        target = self.appended
        if target <= self.durable and not (self._reset_pending or self._forced):
            return CommitInfo(self._last.seq, 0, 0)
        async with self._lock:
            self.check_failure()
            if target <= self.durable and not (self._reset_pending or self._forced):
                return self._last  # a concurrent commit already covered us
            return await self._commit_locked()

    async def _commit_locked(self) -> CommitInfo:
        started = time.perf_counter()
        target = self.appended
        batches: list[tuple[LogBuffer, bytearray, int]] = []
        reset, self._reset_pending = self._reset_pending, False
        self._forced = False
        # A new history starts with no offsets: the stored ones belong to the old one.
        offsets = {} if reset else dict(self._store.offsets)
        for buf in self._buffers.values():
            if buf.offset is not None:
                offsets[buf.name] = buf.offset  # only event logs carry offsets
                buf.offset = None
            for body, count in buf.take():
                batches.append((buf, body, count))
        offsets.update(self._offset_updates)
        self._offset_updates = {}
        for table, source in self._snapshot_sources.items():
            snapshot = source()
            if snapshot is not None:
                # The snapshot covers every delta of this table so far: drop them.
                batches = [b for b in batches
                           if not (b[0].kind == fmt.KIND_TABLE and b[0].name == table)]
                batches.append((LogBuffer(fmt.KIND_TABLE_SNAPSHOT, table), *snapshot))
        moved = self.pending_bytes
        self.pending_bytes = 0
        self.inflight_bytes += moved
        self._pending_event = anyio.Event()
        deltas = target - self.durable
        # Shielded: the batches have left the buffers, so abandoning this commit half-way
        # would drop recorded data while the run goes on. A commit is finished, or it fails.
        with anyio.CancelScope(shield=True):
            try:
                blobs = [await self._build(buf.kind, buf.name, body, count)
                         for buf, body, count in batches]
                self._uploads = len(blobs)
                seq = await self._store.commit(blobs, offsets, reset=reset)
            except PersistenceError as exc:
                self._fail(exc)
                raise
            finally:
                self._uploads = 0
        written = sum(len(b.data) for b in blobs)
        self.inflight_bytes -= moved
        self.durable = target
        self._last = CommitInfo(seq, deltas, written)
        self._bytes_written += written
        self._commits += 1
        self._latency_ms = (time.perf_counter() - started) * 1000
        done, self._done_event = self._done_event, anyio.Event()
        done.set()
        logger.debug("commit done: seq=%d deltas=%d bytes=%d segments=%d",
                     seq, deltas, written, len(blobs))
        return self._last

    async def _build(self, kind: str, name: str, body: bytearray, count: int) -> SegmentBlob:
        key = self._store.new_segment_key()
        meta = fmt.SegmentMeta(key, kind, name)
        if len(body) >= _THREAD_BUILD_BYTES:
            data = await anyio.to_thread.run_sync(fmt.encode_segment, meta, body, count)
        else:
            data = fmt.encode_segment(meta, body, count)
        return SegmentBlob(fmt.SegmentRef(key, kind, name, count, len(data)), data)

    def _fail(self, exc: PersistenceError) -> None:
        """A failed commit ends the run's writing: its outcome may be unknown."""
        if self._failure is None:
            self._failure = exc
            logger.error("commit failed; this run can no longer persist: %s", exc)
        done, self._done_event = self._done_event, anyio.Event()
        done.set()

    async def run(self) -> None:
        """The scheduler loop; runs in the run's task group until cancelled."""
        try:
            while True:
                if self._interval == 0:
                    await self._pending_event.wait()
                else:
                    with anyio.move_on_after(self._interval):
                        await self._urgent.wait()
                    self._urgent = anyio.Event()
                if self.has_pending:
                    await self.commit()
        except PersistenceError:
            return  # recorded by _fail; record() and commit() raise it to the user
