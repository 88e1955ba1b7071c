"""The durable log over a driver: epochs, commits and segment reads.

The state of a store is its highest contiguous commit. A commit names the segments it adds
and the stream offsets it changes, and is written with create-if-absent under the next number, so
of two writers racing for one number exactly one wins. Taking the writer role writes a new
epoch record and then a *fence* commit under the next number: from then on an older
writer's next commit meets a number that is taken, reads it, sees a newer epoch, and stops
with ``FencedError`` without landing anything.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from . import _format as fmt
from ._concurrency import gather_bounded
from ._drivers import Driver, ObjectExistsError, ObjectNotFoundError
from ._drivers.base import capabilities_of, put_then_create
from ._errors import CorruptDataError, FencedError, PersistenceError, SegmentCollectedError

__all__ = ["LoggedSegment", "SegmentBlob", "Store"]

logger = logging.getLogger("apersist")

# Segments larger than this are checked (CRC over the body) in a worker thread, so that
# the event loop never stalls on a big checksum.
_THREAD_CHECK_BYTES = 256 << 10
# Objects read at once (commit records when loading, segments in a replay window): a
# store's default ``read_concurrency``.
_READ_CONCURRENCY = 16
# Segments read ahead together by read_segments() hold at most this many bytes.
_WINDOW_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class LoggedSegment:
    """A segment as the store knows it: its reference and the commit that named it."""

    seq: int
    ref: fmt.SegmentRef


@dataclass(frozen=True, slots=True)
class SegmentBlob:
    """A segment ready to upload: its reference and its bytes.

    ``data`` is a bytearray (the commit's own buffer, built in place) only for a driver that
    ``accepts_buffers``; nothing changes it once built.
    """

    ref: fmt.SegmentRef
    data: bytes | bytearray


@dataclass(slots=True)
class _State:
    last_seq: int = 0
    last_epoch: int = 0  # the epoch of the newest commit
    offsets: dict[str, bytes] = field(default_factory=dict)
    logs: dict[tuple[str, str], list[LoggedSegment]] = field(
        default_factory=lambda: defaultdict(list))
    commits: int = 0  # live commits (since the last reset)
    reset_time_ms: int | None = None  # when the newest reset commit was written


class Store:
    """One writer's log in a store root, over a driver it does not own."""

    def __init__(self, driver: Driver, *, writer: str = fmt.WRITER,
                 clock_ms: Callable[[], int], upload_concurrency: int = 16,
                 read_concurrency: int = _READ_CONCURRENCY) -> None:
        self._driver = driver
        self._writer = writer
        self._clock_ms = clock_ms
        self._upload_concurrency = upload_concurrency
        # Objects read at once, and the most segments in one replay window. Read on every
        # use, so it may be changed between reads (the benchmarks set 1 to measure replay
        # one GET at a time).
        self.read_concurrency = read_concurrency
        self._state = _State()
        self._epoch: int | None = None  # ours, once we hold the writer role
        self._segment_number = 0
        self._fenced: FencedError | None = None
        self._last_stamp = 0  # the newest good clock reading of a commit record

    # ------------------------------------------------------------------ reading state
    @property
    def accepts_buffers(self) -> bool:
        """Whether the driver takes a ``bytearray`` segment (``SegmentBlob.data``) as it is.

        A driver declares it (``Capabilities.accepts_buffers``: the filesystem's commit writes
        through a memoryview); others, wrappers included, get bytes (the Azure SDK would
        stream a bytearray as an iterable of ints).
        """
        return capabilities_of(self._driver).accepts_buffers

    @property
    def last_seq(self) -> int:
        return self._state.last_seq

    @property
    def epoch(self) -> int | None:
        """Our writer epoch, or None for a read-only store."""
        return self._epoch

    @property
    def offsets(self) -> Mapping[str, bytes]:
        """Every stream's offset (JSON bytes) in the latest commit.

        A live view, changed in place by every commit: copy it to keep a state.
        """
        return self._state.offsets

    @property
    def last_epoch_of_log(self) -> int:
        """The epoch of the newest commit: every writer with an older epoch is fenced."""
        return self._state.last_epoch

    @property
    def reset_time_ms(self) -> int | None:
        """When the newest reset commit (a new history) was written, if there is one."""
        return self._state.reset_time_ms

    @property
    def live_commits(self) -> int:
        return self._state.commits

    def segments(self, kind: str, name: str) -> list[LoggedSegment]:
        """The committed segments of one log, in commit order (a copy)."""
        return list(self._state.logs.get((kind, name), ()))

    def log_names(self, kind: str) -> list[str]:
        return sorted(name for (k, name), segs in self._state.logs.items() if k == kind and segs)

    async def load(self) -> None:
        """Read the commit log and check that every named segment is present and sized right.

        Raises ``CorruptDataError`` for a damaged commit record, a gap in the numbering
        followed by later commits, a commit naming a missing or mis-sized segment, or a live
        commit whose epoch record is missing or damaged.
        """
        prefix = fmt.commits_prefix(self._writer)
        numbered: dict[int, str] = {}
        async for info in self._driver.list(prefix):
            seq = fmt.number_in_key(info.key, prefix)
            if seq is not None:
                numbered[seq] = info.key
        seqs = sorted(numbered)
        for expected, seq in enumerate(seqs, start=1):
            if seq != expected:
                raise CorruptDataError(
                    f"commit record missing while later commits exist: "
                    f"key={fmt.commit_key(self._writer, expected)} offset=0 later={seq}")
        keys = [numbered[s] for s in seqs]
        records = await gather_bounded([self._reader(key) for key in keys], self.read_concurrency)
        state = _State()
        live_from = 0  # index of the first live commit (the newest reset, else the first)
        for index, (key, record) in enumerate(zip(keys, records, strict=True)):
            self._apply(state, key, record)
            if record.reset:
                live_from = index
        await self._check_segments_exist(state, records)
        await self._check_epochs(keys[live_from:], records[live_from:])
        self._state = state
        logger.debug("store loaded: writer=%s commits=%d last_seq=%d",
                     self._writer, state.commits, state.last_seq)

    def _apply(self, state: _State, key: str, record: fmt.CommitRecord) -> None:
        """Add the commit ``record`` (read from ``key``) to ``state``, the next in the log."""
        if record.seq != state.last_seq + 1 or record.writer != self._writer:
            raise CorruptDataError(f"commit record names another position: key={key} offset=0 "
                                   f"seq={record.seq} writer={record.writer}")
        if record.epoch < state.last_epoch:
            raise CorruptDataError(f"commit record has an older epoch than its predecessor: "
                                   f"key={key} offset=0 epoch={record.epoch} "
                                   f"previous={state.last_epoch}")
        if record.reset:
            state.logs.clear()
            state.commits = 0
            state.reset_time_ms = record.time_ms
        for ref in record.segments:
            state.logs[(ref.kind, ref.name)].append(LoggedSegment(record.seq, ref))
        # What the commit changed, in place: a commit's cost to apply (and so a store's cost
        # to open) never grows with the streams it left alone.
        state.offsets = record.apply_offsets(state.offsets)
        state.last_seq, state.last_epoch = record.seq, record.epoch
        state.commits += 1

    def _reader(self, key: str) -> Callable[[], Awaitable[fmt.CommitRecord]]:
        async def read() -> fmt.CommitRecord:
            try:
                data = await self._driver.get(key)
            except ObjectNotFoundError:
                raise CorruptDataError(f"commit record vanished while opening: key={key} "
                                       "offset=0") from None
            return fmt.CommitRecord.decode(key, data)
        return read

    async def _check_segments_exist(self, state: _State,
                                    records: Sequence[fmt.CommitRecord]) -> None:
        named = {seg.ref.key: (seg, rec_key)
                 for segs in state.logs.values() for seg in segs
                 for rec_key in [fmt.commit_key(self._writer, seg.seq)]}
        if not named:
            return
        sizes = {info.key: info.size
                 async for info in self._driver.list(fmt.segments_prefix(self._writer))}
        for key, (seg, commit) in named.items():
            size = sizes.get(key)
            if size is None:
                raise CorruptDataError(f"commit names a missing segment: key={key} offset=0 "
                                       f"commit={commit}")
            if size != seg.ref.size:
                raise CorruptDataError(f"segment size differs from its commit: key={key} "
                                       f"offset={min(size, seg.ref.size)} size={size} "
                                       f"expected={seg.ref.size} commit={commit}")

    async def _check_epochs(self, keys: Sequence[str], records: Sequence[fmt.CommitRecord]) -> None:
        """Check the epoch record of every epoch that a live commit names: one GET each.

        A writer creates its epoch record before its first commit, so a live commit's epoch
        always has one. A missing, damaged or misplaced record is lost or damaged data (the
        proof of the writer role those commits stand on), never a store that is merely older.
        """
        first_commit: dict[int, str] = {}
        for key, record in zip(keys, records, strict=True):
            first_commit.setdefault(record.epoch, key)
        await gather_bounded(
            [functools.partial(self.read_epoch, epoch, commit=commit)
             for epoch, commit in first_commit.items()], self.read_concurrency)

    async def read_epoch(self, epoch: int, *, commit: str | None = None) -> fmt.EpochRecord:
        """Fetch and check one epoch record: it decodes and names this writer and ``epoch``.

        Raises ``CorruptDataError`` (naming the record's key and an offset) if it is missing,
        damaged, or another record's bytes; ``commit`` names the commit that needs it.
        """
        key = fmt.epoch_key(self._writer, epoch)
        needed_by = "" if commit is None else f" commit={commit}"
        try:
            data = await self._driver.get(key)
        except ObjectNotFoundError:
            raise CorruptDataError(f"epoch record missing: key={key} offset=0{needed_by}") from None
        record = fmt.EpochRecord.decode(key, data)
        # Another epoch's (valid) bytes copied here would otherwise pass every checksum.
        if record.writer != self._writer or record.epoch != epoch:
            raise CorruptDataError(f"epoch record names another position: key={key} offset=0 "
                                   f"writer={record.writer} epoch={record.epoch}{needed_by}")
        return record

    async def read_segment(self, ref: fmt.SegmentRef) -> fmt.SegmentView:
        """Fetch and check one committed segment. Damage raises ``CorruptDataError``.

        A segment that is missing because the store moved on since it was opened (no live
        commit names it any more, so ``apersist gc`` could collect it) raises
        ``SegmentCollectedError`` instead.
        """
        try:
            data = await self._driver.get(ref.key)
        except ObjectNotFoundError:
            newest = await self._seq_past(ref.key)
            if newest is not None:
                raise SegmentCollectedError(
                    f"segment was garbage-collected after this reader opened the store: the "
                    f"store moved on and no live commit names it; reopen the store (apersist "
                    f"gc's grace period was shorter than this reader's life): key={ref.key} "
                    f"offset=0 seq={self._state.last_seq} store_seq={newest}") from None
            raise CorruptDataError(f"commit names a missing segment: key={ref.key} "
                                   "offset=0") from None
        if len(data) > _THREAD_CHECK_BYTES:
            return await anyio.to_thread.run_sync(fmt.SegmentView, ref, data)
        return fmt.SegmentView(ref, data)

    async def _seq_past(self, key: str) -> int | None:
        """The store's newest commit number if the log moved on past segment ``key``: it is
        at least as new as ours and none of its live commits names ``key`` (a reset or a
        compaction superseded it). None if a live commit still names it (lost data), or if
        the log does not read whole (then the missing segment is reported as it is).

        Reads the whole commit log: only the error path of a missing segment calls this.
        """
        prefix = fmt.commits_prefix(self._writer)
        state = _State()
        try:
            keys = [info.key async for info in self._driver.list(prefix)
                    if fmt.number_in_key(info.key, prefix) is not None]
            records = await gather_bounded([self._reader(k) for k in keys], self.read_concurrency)
            for record_key, record in zip(keys, records, strict=True):
                self._apply(state, record_key, record)
        except PersistenceError:
            return None
        if state.last_seq < self._state.last_seq or any(
                seg.ref.key == key for segs in state.logs.values() for seg in segs):
            return None
        return state.last_seq

    async def read_windows(self, refs: Sequence[fmt.SegmentRef]
                           ) -> AsyncIterator[list[fmt.SegmentView]]:
        """Yield the checked segments ``refs`` in order, a window of them at a time.

        Small segments cost a round trip (or a thread hop) each, so a window's segments
        are read concurrently; a window holds at most ``read_concurrency`` segments and
        ``_WINDOW_BYTES`` (or one segment, if that is bigger), so memory stays bounded
        however long the history.
        """
        index = 0
        while index < len(refs):
            window = [refs[index]]
            size = refs[index].size
            while (index + len(window) < len(refs) and len(window) < self.read_concurrency
                   and size + refs[index + len(window)].size <= _WINDOW_BYTES):
                size += refs[index + len(window)].size
                window.append(refs[index + len(window)])
            index += len(window)
            yield await gather_bounded(
                [functools.partial(self.read_segment, ref) for ref in window], self.read_concurrency)

    async def read_segments(self, refs: Sequence[fmt.SegmentRef]) -> AsyncIterator[fmt.SegmentView]:
        """Yield the checked segments ``refs`` in order (see ``read_windows``)."""
        async for views in self.read_windows(refs):
            for view in views:
                yield view

    async def feed_windows(self, refs: Sequence[fmt.SegmentRef],
                           send: MemoryObjectSendStream[list[fmt.SegmentView] | Exception]) -> None:
        """Read ``refs`` window by window into ``send``, then close it: replay's read-ahead.

        Runs as a task of the run while the consumer works through earlier windows, so
        the next window's requests overlap with consuming the current one. ``send`` holds
        one window, so at most three are in memory: consumed, waiting, being read. A read
        error is handed to the consumer as an item; a consumer that went away ends this.
        """
        async with send:
            try:
                async for views in self.read_windows(refs):
                    await send.send(views)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            except Exception as exc:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(exc)

    # ------------------------------------------------------------------ writing
    async def acquire_writer(self) -> None:
        """Take the writer role: a new epoch record, then a fence commit.

        Afterwards any older writer's next commit fails with ``FencedError``. If another
        writer commits while we take over, the log is reloaded and the fence retried.
        """
        prefix = fmt.epochs_prefix(self._writer)
        epoch = max([n async for n in self._numbers(prefix)], default=0) + 1
        epoch = max(epoch, self._state.last_epoch + 1)
        token = uuid.uuid4().hex
        while True:
            self._last_stamp = self._clock_ms()  # a bad reading fails here, writing nothing
            record = fmt.EpochRecord(self._writer, epoch, self._last_stamp, token)
            try:
                await self._put_created(fmt.epoch_key(self._writer, epoch), record.encode())
                break
            except ObjectExistsError:
                epoch += 1  # another writer took this number a moment ago
        self._epoch = epoch
        self._segment_number = 0
        raced = False
        while True:
            # No offsets: a fence changes none, whatever the number of streams.
            fence = self._next_record([], {}, reset=False)
            key = fmt.commit_key(self._writer, fence.seq)
            if await self._publish(key, fence):
                self._apply(self._state, key, fence)
                break
            # Someone committed under the number we wanted: an older writer still committing
            # (catch up with its commits, one read each, and fence the next number: a full
            # reload per lost race would let a busy older writer win every race) or a newer
            # writer (we lost).
            raced = True
            await self._catch_up()
            if self._state.last_epoch > epoch:
                raise FencedError(f"a newer writer took over while this one was starting: "
                                  f"epoch={epoch} current={self._state.last_epoch}")
        if raced:
            # The commits caught up with were read one by one, their segments unchecked: check
            # the whole log once, now that no older writer can add to it.
            await self.load()
        logger.info("writer role taken: writer=%s epoch=%d seq=%d",
                    self._writer, epoch, self._state.last_seq)

    async def _numbers(self, prefix: str) -> AsyncIterator[int]:
        async for info in self._driver.list(prefix):
            number = fmt.number_in_key(info.key, prefix)
            if number is not None:
                yield number

    async def _put_created(self, key: str, data: bytes,
                           blobs: Sequence[SegmentBlob] = ()) -> None:
        """Create-if-absent of an epoch or commit record: ``ObjectExistsError`` if ``key``
        is taken.

        With ``blobs``, they are put first and the create never becomes durable before
        them (``put_then_create``): upload before commit, a commit never names a segment
        that a crash could lose.

        An "exists" is taken as the driver's answer that somebody else holds the key. An
        ambiguous create (an attempt's reply lost, a later attempt meets "exists") is
        settled below this layer, by whatever retried it: the retry layer reads the
        object back (``retry.py``), and a driver that retries on its own must do the same.
        Nothing here retries a create, so "exists" after a single attempt is never ours.
        """
        if blobs:
            await put_then_create(self._driver, [(b.ref.key, b.data) for b in blobs],
                                  key, data, concurrency=self._upload_concurrency)
        else:
            await self._driver.put(key, data, if_absent=True)

    def new_segment_key(self) -> str:
        assert self._epoch is not None, "segments are written only by the writer"
        self._segment_number += 1
        return fmt.segment_key(self._writer, self._epoch, self._segment_number)

    async def commit(self, blobs: Sequence[SegmentBlob], offsets: Mapping[str, bytes], *,
                     reset: bool) -> int:
        """Upload ``blobs`` concurrently, then write the commit record that names them.

        ``offsets`` is every stream's offset after the commit (for a reset, those of the new
        history); the record holds only what differs from the current ``offsets``.
        Returns the commit's number once it is durable. Raises ``FencedError`` if a newer
        writer owns the store (nothing of this commit is visible then); after that every
        later call raises it too.
        """
        if self._fenced is not None:
            raise self._fenced
        if self._epoch is None:
            raise RuntimeError("commit on a store that does not hold the writer role")
        record = self._next_record(blobs, self._offset_changes(offsets, reset=reset),
                                   reset=reset)
        key = fmt.commit_key(self._writer, record.seq)
        if not await self._publish(key, record, blobs):
            theirs = await self._epoch_of(key)
            self._fenced = FencedError(
                f"a newer writer owns this store: epoch={self._epoch} current={theirs} "
                f"commit={key}")
            logger.warning("%s", self._fenced)
            raise self._fenced
        self._apply(self._state, key, record)
        return record.seq

    def _offset_changes(self, offsets: Mapping[str, bytes], *,
                        reset: bool) -> dict[str, bytes]:
        """What a commit records so that ``offsets`` is the whole map after it: all of it
        for a reset (a new history starts from an empty map), else what differs from the
        current map."""
        return dict(offsets) if reset else fmt.offset_changes(self._state.offsets, offsets)

    def _stamp(self) -> int:
        """The clock's reading for a commit record, or the last good one if it misbehaves.

        A commit's time stamp is for people reading the store (nothing orders or dates by
        it): a bad reading of an injected clock (``TypeError``/``ValueError`` from the run's
        clock check) must not fail the commit of data recorded with good readings.
        """
        try:
            self._last_stamp = self._clock_ms()
        except (TypeError, ValueError) as exc:
            logger.warning("bad clock reading while stamping a commit record; the last good "
                           "one is used: %s", exc)
        return self._last_stamp

    def _next_record(self, blobs: Sequence[SegmentBlob], offsets: dict[str, bytes], *,
                     reset: bool) -> fmt.CommitRecord:
        assert self._epoch is not None, "commits are written only by the writer"
        return fmt.CommitRecord(
            writer=self._writer, seq=self._state.last_seq + 1, epoch=self._epoch,
            time_ms=self._stamp(), token=uuid.uuid4().hex, reset=reset,
            segments=tuple(b.ref for b in blobs), offsets=offsets)

    async def _publish(self, key: str, record: fmt.CommitRecord,
                       blobs: Sequence[SegmentBlob] = ()) -> bool:
        """Upload ``blobs``, then write the commit record that names them under its number:
        false if that number is taken."""
        try:
            await self._put_created(key, record.encode(), blobs)
        except ObjectExistsError:
            return False
        return True

    async def _catch_up(self) -> None:
        """Apply the commits written after our state was read, until the next number is free."""
        while True:
            key = fmt.commit_key(self._writer, self._state.last_seq + 1)
            try:
                data = await self._driver.get(key)
            except ObjectNotFoundError:
                return
            self._apply(self._state, key, fmt.CommitRecord.decode(key, data))

    async def _epoch_of(self, key: str) -> int | str:
        try:
            return fmt.CommitRecord.decode(key, await self._driver.get(key)).epoch
        except Exception as exc:  # the fence stands either way; this only enriches the message
            return f"unreadable ({type(exc).__name__})"
