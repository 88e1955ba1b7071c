"""The snapshot scheduler: batches -> segments -> concurrent uploads -> one atomic commit.

Recording appends framed bytes to a per-log ``LogBuffer`` (no awaiting, no I/O); a table
keeps the keys it changed and hands them over at the cut (``register_deltas``). The
scheduler, one coroutine per run, cuts every non-empty buffer into immutable segments,
uploads them concurrently through the store and then writes the commit that names them.
With ``snapshot_interval_ms == 0`` it commits as soon as the previous commit has finished
(group commit); otherwise on that period. An idle run makes no backend requests at all.

The scheduler owns accounting, back-pressure, the cut and the commit loop. The buffers are
``_buffer.LogBuffer``s; the live source events that a cut must wait for are the
``_barrier.SourceBarrier``'s, which the scheduler drains and settles at each cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _format as fmt
from ._barrier import CONSUMER, Held, SourceBarrier
from ._buffer import BATCH_ENTRIES, LogBuffer
from ._compression import DEFAULT as DEFAULT_COMPRESSION
from ._compression import Compression, compress_off_loop
from ._concurrency import brisk_thread_switching, cancelled_by_another_task
from ._errors import FencedError, PersistenceError
from ._metrics import NO_METRICS, Metrics
from ._store import PendingRewrite, SegmentBlob, Store

__all__ = ["BATCH_ENTRIES", "CommitInfo", "DeltaSource", "Scheduler", "SnapshotBuilder",
           "SnapshotSource"]

#: Called at a cut: when a table wants compacting, returns a builder of its whole state as
#: it was at that cut, as segment bodies [(framed body, record count)]; else None. The
#: builder is awaited after the cut, in the scheduler's task, so that framing a big table
#: is paced instead of stalling the loop inside the cut.
SnapshotBuilder = Callable[[], Awaitable["list[tuple[bytearray, int]]"]]
SnapshotSource = Callable[[], "SnapshotBuilder | None"]
#: Called at a cut: a table hands over the keys it changed since the previous cut (in O(1),
#: whatever their number) and returns the builder that frames them as delta segment bodies,
#: awaited after the cut as a snapshot's is; None when it changed nothing. Its deltas were
#: accounted when each key first changed since the previous cut (``add_deltas``).
DeltaSource = Callable[[], "SnapshotBuilder | None"]

logger = logging.getLogger("apersist")

# Segments at least this big are assembled (join + body CRC) in a worker thread.
_THREAD_BUILD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """What a commit made durable: its number, how many deltas, how many bytes."""

    seq: int
    deltas: int
    bytes: int


class Scheduler:
    """Owns the run's uncommitted data and every commit of it."""

    def __init__(self, store: Store, *, interval_ms: int, max_pending_bytes: int,
                 max_segment_bytes: int, metrics: Metrics = NO_METRICS,
                 compression: Compression = DEFAULT_COMPRESSION) -> None:
        self._store = store
        self._compression = compression  # how segment bodies are stored (Config.compression)
        self._metrics = metrics  # told of each commit and back-pressure wait, never per event
        self._interval = interval_ms / 1000
        self._max_pending = max_pending_bytes
        self.max_segment_bytes = max_segment_bytes
        # An open batch is accounted for only when framed, so it is kept small against a
        # segment and the back-pressure bound: add_event frames it past a quarter of the
        # smaller, and record()'s fast path (LogBuffer.fast_from_ns) takes only values so
        # small that a full batch of them (BATCH_ENTRIES) stays under that quarter too.
        self.open_budget = min(max_segment_bytes, max_pending_bytes, fmt.MAX_RECORD_JSON) // 4
        self.fast_value_bytes = self.open_budget // BATCH_ENTRIES
        self._buffers: dict[tuple[str, str], LogBuffer] = {}
        self._offset_updates: dict[str, bytes] = {}  # OFFSETS_ONLY: offsets without data
        self.recorded_offsets: dict[str, bytes] = {}  # OFFSETS_ONLY: the newest of this run
        self._snapshot_sources: dict[str, SnapshotSource] = {}
        self._delta_sources: dict[str, DeltaSource] = {}
        # Maintenance's rewrites, waiting for the next commit: (kind, name, old keys, bodies).
        self._rewrites: list[tuple[str, str, tuple[str, ...], list[tuple[bytearray, int]]]] = []
        self._rewrites_inflight = False
        self._reset_pending = False
        self._forced = False
        # Live source events being processed (``_barrier``). A write by a task that holds
        # one marks it through the task's ``Consumer`` (``CONSUMER``).
        self.barrier = SourceBarrier(self._buffer_held, lambda: self._unusable is None)
        # Cuts are numbered: a commit() waits until the first cut taken after its call is
        # durable. _cut_appended is ``appended`` at the newest cut.
        self._cuts = 0
        self._done_cuts = 0
        self._cut_appended = 0
        self._cut_wanted = False
        self._stopped = False  # the scheduler's task has ended: no more commits
        self._pending_event = anyio.Event()
        # True once note_appended has set _pending_event since the last cut: it then skips
        # the set (is_set() through anyio costs two Python calls on every record).
        self._pending_signalled = False
        self._done_event = anyio.Event()
        self._urgent = anyio.Event()
        # A failed commit ends the run's writing; _unusable is what record() raises: that
        # failure, or an error saying the run has ended.
        self._failure: Exception | None = None
        self._unusable: Exception | None = None
        self._closed = False
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

    def add_event(self, buf: LogBuffer, value: bytes, offset: bytes, time_ms: int) -> bool:
        """Add one event (its JSON; ``offset`` JSON or b"" for none) to ``buf``'s open batch.

        Frames the open batch first when ``time_ms`` is another millisecond or the event
        is big (a big event is a record of its own), and after it once it holds
        ``BATCH_ENTRIES`` events or its byte budget. Returns whether uncommitted bytes are
        over the back-pressure bound (then the caller should ``await wait_capacity()``).
        """
        self._before_write(buf)
        size = len(value) + len(offset)
        if time_ms != buf.open_ms or (size >= self.open_budget and buf.open_count):
            self.frame(buf)
            buf.open_ms = time_ms
        buf.append(value, offset)
        open_bytes = buf.open_bytes
        if (buf.open_count >= BATCH_ENTRIES or open_bytes >= self.open_budget
                or self.pending_bytes + self.inflight_bytes + open_bytes > self._max_pending):
            self.frame(buf)
        if not self._pending_signalled:
            self._pending_signalled = True
            self._pending_event.set()
        # Until the next cut, record() may add this millisecond's events by itself (not on
        # a stream a source feeds: see _buffer_early).
        if buf.open_offsets is None and buf.source_hold is None:
            buf.allow_fast(time_ms)
        else:
            buf.revoke_fast()
        return self.over_limit

    def _before_write(self, buf: LogBuffer) -> None:
        """What every write to ``buf`` does first: raise if the run no longer records, mark
        the writing task's held live event as written, and put first what came first (the
        held event its consumer answers on the same stream, live source events)."""
        if self._unusable is not None:
            raise self._unusable
        consumer = CONSUMER.get()
        if consumer is not None:
            consumer.writes += 1
            hold = buf.source_hold
            if (hold is not None and hold.consumer is consumer and not hold.settled
                    and not hold.buffered):
                self._buffer_early(hold)  # the event the consumer works on came first
        if buf.live_values:
            self.frame(buf)  # live source events came first

    def frame(self, buf: LogBuffer) -> bool:
        """Frame ``buf``'s open batch, then its live source events, and account for them;
        return whether over the bound."""
        over = False
        nbytes, count = buf.frame_open()
        if count:
            over = self._account(buf, nbytes, count)
        if buf.live_values:
            nbytes, count = buf.fold_live()
            over = self._account(buf, nbytes, count)
        return over

    def add_live(self, buf: LogBuffer, value: bytes, offset: bytes, time_ms: int) -> bool:
        """Add one small live source event: what is pending in ``buf`` is framed, and the
        event starts its live lists, which the source then fills by itself for the rest of
        the millisecond (see ``LogBuffer.live_values``). Returns whether over the bound."""
        if self._unusable is not None:
            raise self._unusable
        over = self.frame(buf) if buf.open_count or buf.live_values else False
        buf.start_live(value, offset, time_ms)
        # Nothing counted yet (the fold counts the live events); the scheduler must hear
        # of them all the same.
        return self._add_pending(0, 0) or over

    def _frame_all(self) -> None:
        for buf in self._buffers.values():
            if buf.open_count or buf.live_values:
                self.frame(buf)

    def append_framed(self, buf: LogBuffer, value: bytes, offset: bytes = b"", time_ms: int = 0,
                      count: int = 1) -> bool:
        """Frame one record onto ``buf`` and account for it: the one way tables, the cache
        and ``record_many()`` buffer data (``record()`` goes through ``add_event``).

        ``value`` is the record's JSON (an entry, or a batch of ``count``), ``offset`` its
        offset JSON or b"". Raises what recording raises once the run can no longer persist,
        with nothing buffered. Returns whether uncommitted bytes are now over the
        back-pressure bound (then a caller that can wait should ``await wait_capacity()``).
        """
        self._before_write(buf)
        return self._account(buf, buf.append_framed(value, offset, time_ms, count), count)

    def _account(self, buf: LogBuffer, nbytes: int, count: int) -> bool:
        size = buf.size = buf.size + nbytes
        if size >= self.max_segment_bytes:
            buf.seal()
        return self._add_pending(count, nbytes)

    def _add_pending(self, count: int, nbytes: int) -> bool:
        """Count ``count`` deltas of ``nbytes`` as pending, tell the scheduler there is
        something to commit, and return whether uncommitted bytes are over the bound."""
        self.appended += count
        pending = self.pending_bytes = self.pending_bytes + nbytes
        if not self._pending_signalled:
            self._pending_signalled = True
            self._pending_event.set()
        if pending + self.inflight_bytes > self._max_pending:
            # Past the bound: commit now rather than at the next interval. Writers that
            # cannot wait (table and cache writes are synchronous) rely on this to keep
            # memory bounded; record() also waits (wait_capacity).
            self._urgent.set()
            return True
        return False

    def set_offset(self, stream: str, offset: bytes) -> None:
        """Record an offset with no data (``SnapshotAccess.OFFSETS_ONLY``)."""
        if self._unusable is not None:
            raise self._unusable
        self._offset_updates[stream] = self.recorded_offsets[stream] = offset
        consumer = CONSUMER.get()
        if consumer is not None:
            consumer.writes += 1
        self._add_pending(1, 0)

    def request_reset(self) -> None:
        """Make the next commit start a new history (``SnapshotAccess.RECORD``)."""
        self._reset_pending = True
        self._pending_event.set()

    def request_commit(self) -> None:
        """Make the next ``commit()`` write even with no new deltas (e.g. for compaction)."""
        self._forced = True
        self._pending_event.set()

    def add_rewrite(self, kind: str, name: str, old: tuple[str, ...],
                    bodies: list[tuple[bytearray, int]]) -> None:
        """Replace the run of segments ``old`` of a log by segments of ``bodies`` (framed
        records, count) in the next commit that writes: maintenance's merges and retention.

        Does not make a commit by itself (``request_commit`` does): an idle run writes
        nothing. Dropped, its segments never uploaded, if a reset comes first.
        """
        self._rewrites.append((kind, name, old, bodies))

    @property
    def rewrites_busy(self) -> bool:
        """Whether rewrites wait for a commit or ride on the one in flight: the log does not
        show them yet, so maintenance plans nothing new."""
        return bool(self._rewrites) or self._rewrites_inflight

    def commit_done(self) -> anyio.Event:
        """An event set when the next commit (or failure, or the run's end) is done."""
        return self._done_event

    @property
    def stopped(self) -> bool:
        return self._stopped

    def register_snapshot(self, table: str, source: SnapshotSource) -> None:
        """``source()`` returns a table's whole state (body, count) when it wants compacting."""
        self._snapshot_sources[table] = source

    @property
    def over_limit(self) -> bool:
        return self.pending_bytes + self.inflight_bytes > self._max_pending

    async def wait_capacity(self) -> None:
        """Back-pressure: wait until uncommitted bytes fall under the bound.

        What the caller recorded is buffered before it waits: cancelling the wait does not
        take it back. A task that holds a live source event while it waits is not waited
        for by the cut (that would deadlock): its event may then be committed before all of
        its state.
        """
        metrics = self._metrics
        waited = metrics.enabled and self.over_limit
        if waited:
            metrics.backpressure_started()
            started = time.perf_counter()
        try:
            with self.barrier.parked_while_waiting():
                while self.over_limit:
                    self.check_failure()
                    if self._stopped:
                        raise self._ended_error()
                    done = self._done_event
                    self._urgent.set()
                    await done.wait()
        finally:
            if waited:
                metrics.backpressure_ended(time.perf_counter() - started)
        self.check_failure()

    def check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def check_writable(self) -> None:
        """Raise what recording would raise now (the run has ended, or a commit failed).

        Writers that put bytes into a ``LogBuffer`` themselves call this first, so that a
        refused write leaves nothing buffered for a later commit to pick up.
        """
        if self._unusable is not None:
            raise self._unusable

    def close(self) -> None:
        """The run has ended: recording now raises instead of buffering data no one commits.

        Lets go of the tables (their snapshot sources) and the buffers, which anything
        still referring to the scheduler would otherwise keep alive.
        """
        self._closed = True
        if self._unusable is None:
            self._unusable = RuntimeError("the run has ended: record inside the "
                                          "`async with apersist.run(...)` block")
        self._revoke_fast_paths()  # before the buffers are let go: streams keep theirs
        self._drop_deltas()
        self._snapshot_sources.clear()
        self._delta_sources.clear()
        self._buffers.clear()

    def _revoke_fast_paths(self) -> None:
        """Send every next record() through ``add_event``, which raises ``_unusable``."""
        for buf in self._buffers.values():
            buf.revoke_fast()

    @property
    def has_pending(self) -> bool:
        return (self.appended > self.durable or self._reset_pending or self._forced
                or any(buf.open_count or buf.live_values for buf in self._buffers.values()))

    def stats(self) -> dict[str, int | float]:
        """A snapshot of the counters behind ``Run.stats``."""
        # Open batches are not accounted yet (see Scheduler.frame): counted here as well,
        # without framing them, so that reading the counters changes nothing.
        open_count = sum(buf.open_count + len(buf.live_values) for buf in self._buffers.values())
        open_bytes = sum(len(buf.open_json) - 1 + sum(map(len, buf.live_values))
                         for buf in self._buffers.values())
        recorded = self.appended + open_count
        return {
            "deltas_recorded": recorded,
            "deltas_committed": self.durable,
            "pending_deltas": recorded - self.durable,
            "pending_bytes": self.pending_bytes + self.inflight_bytes + open_bytes,
            "bytes_written": self._bytes_written,
            "commits": self._commits,
            "uploads_in_flight": self._uploads,
            "last_commit_latency_ms": self._latency_ms,
            "last_seq": self._last.seq,
        }

    # ------------------------------------------------------------------ table deltas
    # A table keeps the keys it changed since the last cut, each with its last record, and
    # hands them over at the cut (``DeltaSource``): a key written many times between two
    # cuts is one delta, and a write costs no framing. It accounts each key once, when it
    # first changes after a cut (``add_deltas``), which is what lets a write skip the
    # scheduler: from the cut that ends the run, or a failure, every table's changed keys
    # are dropped (``_drop_deltas``), so a table's next write is a first change and goes
    # through ``add_deltas``, which raises.
    def register_deltas(self, table: str, source: DeltaSource) -> None:
        """``source()`` hands over a table's changed keys at each cut (see ``DeltaSource``)."""
        self._delta_sources[table] = source

    def add_deltas(self, count: int, nbytes: int) -> bool:
        """Account ``count`` deltas (about ``nbytes`` framed) that a table will hand over at
        the next cut. Raises what recording raises once the run can no longer persist (the
        caller has then changed nothing). Returns whether uncommitted bytes are now over
        the back-pressure bound; past it, a commit starts at once."""
        if self._unusable is not None:
            raise self._unusable
        return self._add_pending(count, nbytes)

    def _take_deltas(self) -> dict[str, SnapshotBuilder]:
        """At the cut: every table's changed keys, as builders awaited after it."""
        taken: dict[str, SnapshotBuilder] = {}
        for table, source in self._delta_sources.items():
            builder = source()
            if builder is not None:
                taken[table] = builder
        return taken

    def _drop_deltas(self) -> None:
        """The run can no longer persist: let every table's changed keys go, so that its
        next write goes through ``add_deltas`` and raises (nothing stays buffered)."""
        self._take_deltas()

    # ------------------------------------------------------------------ committing side
    # Every commit runs in the scheduler's own task (``run``), never in a caller's: a caller
    # asks for a cut and waits for it, so cancelling the caller (``asyncio.wait_for``, a
    # ``TaskGroup``, ``Task.cancel()``) stops only its wait. A commit abandoned half-way in
    # a caller's task would drop the batches it had cut, leave their bytes counted as
    # pending, and could land its record unapplied (the next commit would then take the
    # same number and fence its own writer); ``anyio.CancelScope(shield=True)`` does not
    # stop asyncio's own ``Task.cancel()``, so only another task can finish the commit.
    async def commit(self) -> CommitInfo:
        """Make everything recorded before this call durable; return the commit that did.

        The calling task's own held source event counts as processed (it asked for a
        commit); other tasks' live events are waited for (see ``_barrier``). Cancelling the
        caller cancels only the wait: the commit goes on, and its data stays either way.
        """
        self.check_failure()
        if self._stopped:
            raise self._ended_error()
        self.barrier.materialize_holds_of(asyncio.current_task())
        self._frame_all()
        target = self.appended
        forced = self._reset_pending or self._forced
        if target <= self.durable and not forced:
            await anyio.lowlevel.checkpoint()  # an await that lets other tasks run, always
            return CommitInfo(self._last.seq, 0, 0)
        # The cut in flight covers our data if it was taken after our last append.
        want = self._cuts if (target <= self._cut_appended and not forced) else self._cuts + 1
        with self.barrier.parked_while_waiting():
            while self._done_cuts < want:
                self.check_failure()
                if self._stopped:
                    raise self._ended_error()
                done = self._done_event
                if self._cuts < want:
                    self._ask_for_cut()
                await done.wait()
        self.check_failure()
        return self._last

    async def finish(self, *, by_exception: bool) -> CommitInfo:
        """The run is ending: one last cut, committed; recording is refused from that cut on.

        Live source events still held are settled first: an event whose consumer finished
        it (the block's own task, leaving normally) is committed; one whose consumer was
        interrupted (leaving by an exception, a cancelled or failed task, another task
        still in its loop body) is left out, so that the restart delivers it again rather
        than skipping state that was never derived from it.
        """
        self.barrier.final = (asyncio.current_task(), by_exception)
        self._ask_for_cut()
        self.barrier.changed()  # a cut waiting for held events stops waiting
        while not self._stopped:
            done = self._done_event
            await done.wait()
        self.check_failure()
        return self._last

    def _buffer_early(self, held: Held) -> None:
        """Buffer a held event now, ahead of what its consumer records on the same stream,
        which must replay after it. It stays held: a cut still waits for its consumer, and
        it is kept (its consumer has written)."""
        held.buffered = True  # first: buffering it goes through add_event again
        self._put_held(held)

    def _buffer_held(self, held: Held) -> bool:
        """Buffer a held source event (``SourceBarrier.materialize``), unless it was
        buffered early (``_buffer_early``). Returns whether over the back-pressure bound."""
        return False if held.buffered else self._put_held(held)

    def _put_held(self, held: Held) -> bool:
        """A held event's data into its buffer, or in ``OFFSETS_ONLY`` its offset alone."""
        buf = held.buf
        if held.records is None:
            if buf is not None:
                return self.add_event(buf, held.value, held.offset, held.time_ms)
        elif buf is not None:
            self.check_writable()
            self.frame(buf)  # events recorded before this batch come first
            over = False
            for value, offset, count in held.records:
                over = self.append_framed(buf, value, offset, held.time_ms, count)
            if held.offset:
                buf.offset = buf.recorded_offset = held.offset
                if not held.records:  # an empty batch that moves the offset: a delta too
                    over = self._add_pending(1, 0)
            return over
        if held.offset:
            self.set_offset(held.stream, held.offset)
        return False

    def _ask_for_cut(self) -> None:
        self._cut_wanted = True
        self._urgent.set()
        self._pending_event.set()

    def _ended_error(self) -> RuntimeError:
        return RuntimeError("the run has ended: its scheduler commits nothing more; record and "
                            "commit inside the `async with apersist.run(...)` block")

    async def _commit_once(self, *, final: bool) -> None:
        """One cut and its commit, in the scheduler's task. A failure ends the run's writing."""
        started = time.perf_counter()
        try:
            if not final:
                await self.barrier.drain()
            self.barrier.settle(final)
            await self._cut_and_commit(started, final=final)
        except PersistenceError as exc:
            self._metrics.commit_failed(time.perf_counter() - started, exc)
            self._fail(exc)
        except Exception as exc:  # a bug or a snapshot source's error: tell every waiter
            logger.exception("commit failed unexpectedly; this run can no longer persist")
            self._metrics.commit_failed(time.perf_counter() - started, exc)
            self._fail(exc)
        finally:
            self.barrier.lift()

    async def _cut_and_commit(self, started: float, *, final: bool) -> None:
        # From here to the shielded section nothing awaits: the cut is one instant.
        self._frame_all()
        if final:
            # Whatever is recorded from now on could not be committed: refuse it instead.
            self._closed = True
            if self._unusable is None:
                self._unusable = RuntimeError("the run has ended: record inside the "
                                              "`async with apersist.run(...)` block")
            self._revoke_fast_paths()
        self._cut_wanted = False
        self._cuts += 1
        cut = self._cuts
        target = self._cut_appended = self.appended
        if target <= self.durable and not (self._reset_pending or self._forced):
            self._done_cuts = cut  # nothing to write: this cut is as durable as the last
            self._signal_done()
            return
        batches: list[tuple[LogBuffer, bytearray, int]] = []
        reset, self._reset_pending = self._reset_pending, False
        self._forced = False
        # A new history starts with no offsets: the stored ones belong to the old one.
        offsets = {} if reset else dict(self._store.offsets)
        for buf in self._buffers.values():
            if buf.offset is not None:
                offsets[buf.name] = buf.offset  # only event logs carry offsets
                buf.offset = None
            buf.revoke_fast()  # the scheduler must hear of the next event (add_event)
            for body, count in buf.take():
                batches.append((buf, body, count))
        offsets.update(self._offset_updates)
        self._offset_updates = {}
        rewrites, self._rewrites = ([] if reset else self._rewrites), []
        self._rewrites_inflight = bool(rewrites)
        table_deltas = self._take_deltas()
        snapshots: list[tuple[str, SnapshotBuilder]] = []
        for table, source in self._snapshot_sources.items():
            builder = source()
            if builder is not None:
                # The snapshot covers every delta of this table so far: drop them.
                batches = [b for b in batches
                           if not (b[0].kind == fmt.KIND_TABLE and b[0].name == table)]
                table_deltas.pop(table, None)
                snapshots.append((table, builder))
        moved = self.pending_bytes
        self.pending_bytes = 0
        self.inflight_bytes += moved
        self._pending_event = anyio.Event()
        self._pending_signalled = False
        self.barrier.lift()
        deltas = target - self.durable
        # Shielded, so that a run torn down by cancellation still finishes the commit in
        # progress (docs/concepts.md): it is finished, or it fails as a whole.
        with anyio.CancelScope(shield=True):
            try:
                for kind, built in ((fmt.KIND_TABLE, table_deltas.items()),
                                    (fmt.KIND_TABLE_SNAPSHOT, snapshots)):
                    for table, builder in built:
                        holder = LogBuffer(kind, table)
                        batches.extend((holder, body, count) for body, count in await builder())
                blobs = [await self._build(buf.kind, buf.name, body, count)
                         for buf, body, count in batches]
                pending = [PendingRewrite(kind, name, old, [
                    await self._build(kind, name, body, count) for body, count in new])
                    for kind, name, old, new in rewrites]
                self._uploads = len(blobs) + sum(len(r.new) for r in pending)
                seq = await self._store.commit(blobs, offsets, reset=reset, rewrites=pending)
            finally:
                self._uploads = 0
                self._rewrites_inflight = False
        written = sum(len(b.data) for b in blobs)
        self.inflight_bytes -= moved
        self.durable = target
        self._done_cuts = cut
        self._last = CommitInfo(seq, deltas, written)
        self._bytes_written += written
        self._commits += 1
        self._latency_ms = (time.perf_counter() - started) * 1000
        if self._metrics.enabled:
            self._metrics.committed(self._latency_ms / 1000, written, [b.ref for b in blobs])
        self._signal_done()
        logger.debug("commit done: seq=%d deltas=%d bytes=%d segments=%d",
                     seq, deltas, written, len(blobs))

    def _signal_done(self) -> None:
        done, self._done_event = self._done_event, anyio.Event()
        done.set()

    async def _build(self, kind: str, name: str, body: bytearray, count: int) -> SegmentBlob:
        key = self._store.new_segment_key()
        meta = fmt.SegmentMeta(key, kind, name)
        stored, codec = await compress_off_loop(body, self._compression)
        if stored is not None:
            # Compressed: ``body`` is no longer needed, and the segment is built around the
            # (much smaller) stored bytes; a big one still in a thread, as below.
            body.clear()
            if len(stored) >= _THREAD_BUILD_BYTES:
                with brisk_thread_switching():
                    data: bytes | bytearray = await anyio.to_thread.run_sync(
                        fmt.encode_segment, meta, stored, count, codec)
            else:
                data = fmt.encode_segment(meta, stored, count, codec)
            return SegmentBlob(fmt.SegmentRef(key, kind, name, count, len(data)), data)
        # Raw, in place: ``body`` (this commit owns it) becomes the segment, the same bytes as
        # encode_segment. A copy (encode_segment's join, or bytes()) holds the GIL for as
        # long as it runs, about 5 ms per 8 MiB here, page faults included: from a worker
        # thread it stalls the loop just as long. zlib.crc32 releases the GIL, so a big
        # body's trailer is computed in a thread; moving the header in front is one memmove
        # inside the buffer (about 0.4 ms per 8 MiB) and the trailer an append.
        if len(body) >= _THREAD_BUILD_BYTES:
            with brisk_thread_switching():
                trailer = await anyio.to_thread.run_sync(fmt.encode_segment_trailer, count, body)
        else:
            trailer = fmt.encode_segment_trailer(count, body)
        body[:0] = fmt.encode_segment_head(meta)
        body += trailer
        # The one copy left is for drivers that need bytes (see Capabilities.accepts_buffers).
        data = body if self._store.accepts_buffers else bytes(body)
        return SegmentBlob(fmt.SegmentRef(key, kind, name, count, len(data)), data)

    def _fail(self, exc: Exception) -> None:
        """A failed commit ends the run's writing: its outcome may be unknown."""
        if self._failure is None:
            self._failure = self._unusable = exc
            self._revoke_fast_paths()
            self._drop_deltas()
            level = logging.WARNING if isinstance(exc, FencedError) else logging.ERROR
            logger.log(level, "commit failed; this run can no longer persist: %s", exc)
        self._signal_done()

    async def run(self) -> None:
        """The scheduler loop: every commit of the run, the final one included.

        Runs in the run's task group until the final commit (``finish``), a failed commit,
        or cancellation; waiters are told in every case.
        """
        try:
            period_started = time.monotonic()
            while self.barrier.final is None:
                if self._interval == 0:
                    await self._pending_event.wait()
                else:
                    # The period runs from the start of the last commit, not its end, so
                    # commits keep their cadence however long each one takes.
                    left = self._interval - (time.monotonic() - period_started)
                    with anyio.move_on_after(max(left, 0.0)):
                        await self._urgent.wait()
                    self._urgent = anyio.Event()
                if self.barrier.final is not None:
                    break
                if self._cut_wanted or self.has_pending:
                    period_started = time.monotonic()
                    await self._commit_once(final=False)
                    if self._failure is not None:
                        return
                elif self._interval == 0:
                    # Woken with nothing to commit (a request already served): wait anew.
                    self._pending_event = anyio.Event()
                    self._pending_signalled = False
                else:
                    period_started = time.monotonic()  # idle: a whole period from now
            await self._commit_once(final=True)
        except anyio.get_cancelled_exc_class():
            if not cancelled_by_another_task():
                raise  # the run is ending
            # Some code cancelled this task directly (say, "cancel every task but mine"):
            # propagating would cancel the run's task group and end the block silently.
            # End the run's writing instead; the next commit() or the block's end says so.
            self._fail(RuntimeError("the run's scheduler task was cancelled by another task: "
                                    "this run can no longer commit"))
        finally:
            self._stopped = True
            self._closed = True
            if self._unusable is None:
                self._unusable = RuntimeError("the run has ended: record inside the "
                                              "`async with apersist.run(...)` block")
            self._revoke_fast_paths()
            self._drop_deltas()
            self._signal_done()
