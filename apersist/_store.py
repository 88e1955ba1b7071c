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
import dataclasses
import functools
import itertools
import logging
import os
import socket
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from . import _format as fmt
from ._concurrency import gather_bounded
from ._drivers import Driver, ObjectExistsError, ObjectNotFoundError
from ._drivers.base import capabilities_of, put_then_create
from ._drivers.probe import SCRATCH_PREFIX
from ._errors import (
    CorruptDataError,
    FencedError,
    PersistenceError,
    SegmentCollectedError,
    WriterActiveError,
)

__all__ = ["LoggedSegment", "PendingRewrite", "SegmentBlob", "Store"]

logger = logging.getLogger("apersist")

# Segments larger than this are checked (CRC over the body) in a worker thread, so that
# the event loop never stalls on a big checksum.
_THREAD_CHECK_BYTES = 256 << 10
# A compressed segment expands about tenfold as it is checked: decompressing 32 KiB and
# walking what it gives costs about what checking 256 KiB of raw records does.
_THREAD_DECOMPRESS_BYTES = 32 << 10


def needs_thread(data: bytes) -> bool:
    """Whether checking segment ``data`` (``SegmentView``) is work enough for a worker
    thread rather than the event loop."""
    if len(data) > _THREAD_CHECK_BYTES:
        return True
    if len(data) > _THREAD_DECOMPRESS_BYTES and fmt.looks_compressed(data):
        return True
    # Judged by what the body decompresses to, not by its stored size: a small segment of
    # repetitive records (7 KiB stored for 7.5 MiB of records) was decompressed on the
    # event loop, stalling it for as long as a big raw segment would have.
    return fmt.declared_raw_size(data) > _THREAD_CHECK_BYTES


# Objects read at once (commit records when loading, segments in a replay window): a
# store's default ``read_concurrency``.
_READ_CONCURRENCY = 16
# Commit records read at once when loading: small objects, so on an object store each wave
# costs about one round trip, and the ~100 records after a checkpoint take two waves, not 7.
_RECORD_READS = 64
# Segments read ahead together by read_segments() hold at most this many bytes.
_WINDOW_BYTES = 8 << 20
# A log starting this close to the end of a bucket of commit keys has its next bucket
# listed at once (``_commit_keys_after``): two checkpoint intervals.
_NEXT_BUCKET_TOO = 256
# Commit keys asked for at once when a driver has point lookups (``_probe_commits_after``).
_PROBE = 256
# A writer keeps the bytes of the small segments it committed lately, up to this much, for
# merging them without reading them back; a segment is small up to _RECENT_SEGMENT_BYTES.
_RECENT_BYTES = 2 << 20
_RECENT_SEGMENT_BYTES = 64 << 10


def this_process() -> tuple[str, int]:
    """The host name and process id an epoch record names (a seam: the golden store's
    script replaces it, so that its bytes do not depend on the machine that wrote them)."""
    return socket.gethostname(), os.getpid()


def segment_windows(refs: Sequence[fmt.SegmentRef], most: int
                    ) -> Iterator[Sequence[fmt.SegmentRef]]:
    """Split ``refs`` in order into read-ahead windows: at most ``most`` segments and
    ``_WINDOW_BYTES`` each (or one segment, if that is bigger), so that reading a window at
    once keeps memory bounded however long the log (a segment may be hundreds of MiB)."""
    start = 0
    while start < len(refs):
        end, size = start + 1, refs[start].size
        while end < len(refs) and end - start < most and size + refs[end].size <= _WINDOW_BYTES:
            size += refs[end].size
            end += 1
        yield refs[start:end]
        start = end


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


@dataclass(frozen=True, slots=True)
class PendingRewrite:
    """A rewrite on its way into a commit: the run ``old`` of a log and its replacement."""

    kind: str
    name: str
    old: tuple[str, ...]
    new: list[SegmentBlob]


@dataclass(slots=True)
class _State:
    """The commit log folded up to ``last_seq``.

    A log's list is appended to in place, but a rewrite or a table snapshot *replaces* it:
    a view taken with ``dict(logs)`` (``Store.mark_opened``) keeps the lists as they were,
    but for appends, which carry a newer ``seq``.
    """

    last_seq: int = 0
    last_epoch: int = 0  # the epoch of the newest commit
    offsets: dict[str, bytes] = field(default_factory=dict)
    logs: dict[tuple[str, str], list[LoggedSegment]] = field(
        default_factory=lambda: defaultdict(list))
    commits: int = 0  # live commits (since the last reset)
    reset_time_ms: int | None = None  # when the newest reset commit was written
    fences: list[int] = field(default_factory=list)  # the first commit of every epoch
    last_segment: int = 0  # the highest segment number of last_epoch a commit named
    checkpoint: int = 0  # the checkpoint this state was read from (0: none)
    checkpoint_epoch: int = 0  # that checkpoint's epoch
    # The writer's clock in the newest commit record (or the checkpoint, if none after it).
    last_time_ms: int = 0

    @classmethod
    def of_checkpoint(cls, ckpt: fmt.Checkpoint) -> _State:
        logs: dict[tuple[str, str], list[LoggedSegment]] = defaultdict(list)
        for log, segs in ckpt.logs.items():
            logs[log] = [LoggedSegment(seq, ref) for seq, ref in segs]
        return cls(ckpt.seq, ckpt.epoch, dict(ckpt.offsets), logs, ckpt.commits,
                   ckpt.reset_time_ms, list(ckpt.fences), ckpt.last_segment, ckpt.seq,
                   ckpt.epoch, ckpt.time_ms)

    def live_keys(self) -> set[str]:
        return {seg.ref.key for segs in self.logs.values() for seg in segs}

    def live_homes(self) -> set[str]:
        """The commit records that hold a live segment's bytes (format 5.0, inline)."""
        return {seg.ref.home for segs in self.logs.values() for seg in segs
                if seg.ref.home is not None}


class Store:
    """One writer's log in a store root, over a driver it does not own."""

    def __init__(self, driver: Driver, *, writer: str = fmt.WRITER,
                 clock_ms: Callable[[], int], upload_concurrency: int = 16,
                 read_concurrency: int = _READ_CONCURRENCY, label: str | None = None) -> None:
        self._driver = driver
        self._writer = writer
        self._label = label  # written into our epoch record with our host and pid
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
        self._opened_logs: dict[tuple[str, str], list[LoggedSegment]] | None = None
        self._opened_seq = 0
        # Small segments this writer committed lately, by key (see _remember).
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        # Epoch records read so far (read_epoch), so that naming a writer costs no request.
        self._epoch_records: dict[int, fmt.EpochRecord] = {}
        # The keys of each bucket of commit keys the last _commit_keys_after listed, so that
        # checking the records of inline segments (_check_homes_exist) does not list it again.
        self._listed_commits: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ reading state
    @property
    def accepts_buffers(self) -> bool:
        """Whether the driver takes a ``bytearray`` segment (``SegmentBlob.data``) as it is.

        A driver declares it (``Capabilities.accepts_buffers``): the filesystem's commit
        writes through a memoryview, S3 and Azure send it as it is (the retry layer passes
        its inner driver's on). Any other driver gets bytes.
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

    def table_names(self) -> list[str]:
        """The tables that have a segment in the live log."""
        return sorted({name for (kind, name), segs in self._state.logs.items()
                       if kind in (fmt.KIND_TABLE, fmt.KIND_TABLE_SNAPSHOT) and segs})

    def log_names(self, kind: str) -> list[str]:
        return sorted(name for (k, name), segs in self._state.logs.items() if k == kind and segs)

    async def load(self) -> None:
        """Read the log: the newest checkpoint, then the commits after it.

        Checks that every live segment is present with its size, and the epoch records
        the commits after the checkpoint stand on. Lists no more than the buckets of keys
        it needs (``fmt.BUCKET``), so the cost follows the live state and the commits since
        the newest checkpoint, never the length of the history.

        Raises ``CorruptDataError`` for a damaged checkpoint or commit record, a gap in the
        numbering followed by later commits, a commit naming a missing or mis-sized
        segment, or a live commit whose epoch record is missing or damaged.
        """
        for attempt in range(3):
            state = await self._checkpoint_state()
            try:
                keys = await self._commit_keys_after(state.last_seq)
            except CorruptDataError:
                if attempt < 2 and await self._newer_checkpoint(state.checkpoint):
                    continue
                raise
            # ``apersist gc`` with no grace may have collected the commits after our
            # checkpoint while we were opening (a newer checkpoint folds them): the commits
            # found then stop short (at a fence commit gc keeps, or at none), with no gap to
            # tell. A checkpoint past the last commit found says so: start again from it.
            # Asked while the records are read, the two being independent requests: one
            # round trip fewer, and the records are thrown away in the rare case it says so.
            newer, read = await self._records_unless_newer(keys, state.last_seq + len(keys))
            if not newer:
                if isinstance(read, CorruptDataError):
                    raise read
                records = read
                try:
                    live_from = await self._fold_checked(state, keys, records)
                except CorruptDataError:
                    # A live segment (or the record carrying one inline) missing may be
                    # gc's doing too: with no grace, it deletes what a merge (or retention)
                    # committed after our records were read moved out of the log, and a
                    # healthy store failed to open as corrupt. If the log moved on past
                    # what we read, start again; damage that is real is met again.
                    if attempt < 2 and await self._moved_past(state.last_seq):
                        continue
                    raise
                break
        else:
            raise CorruptDataError(
                f"the store's checkpoints moved on under every attempt to open it (apersist gc "
                f"with no grace period beside a busy writer?): key="
                f"{fmt.checkpoints_prefix(self._writer)} offset=0")
        # The inline segments of the records just read, newest kept (bounded), so that a
        # replay right after opening reads them without fetching their records again.
        live = state.live_keys()
        self._remember([(k, d) for record in records[live_from:]
                        for k, d in record.inline.items() if k in live])
        self._state = state
        logger.debug("store loaded: writer=%s commits=%d last_seq=%d checkpoint=%d read=%d",
                     self._writer, state.commits, state.last_seq, state.checkpoint, len(keys))

    async def _fold_checked(self, state: _State, keys: list[str],
                            records: list[fmt.CommitRecord]) -> int:
        """Fold ``records`` (read from ``keys``) into ``state`` and check what they name:
        each segment once, the live segments present, the epochs' records. Returns the
        index of the first live record (after the newest reset)."""
        live_from = 0  # index of the first live commit read (after the newest reset)
        for index, (key, record) in enumerate(zip(keys, records, strict=True)):
            self._apply(state, key, record)
            if record.reset:
                live_from = index
        self._check_named_once(state)
        epochs: dict[int, str] = {}
        if state.checkpoint and state.commits > len(keys) - live_from:
            # Live commits inside the checkpoint: its newest commit's epoch stands for them
            # (the writer that wrote the checkpoint checked the others).
            epochs[state.checkpoint_epoch] = fmt.checkpoint_key(self._writer, state.checkpoint)
        for key, record in zip(keys[live_from:], records[live_from:], strict=True):
            epochs.setdefault(record.epoch, key)
        # Independent checks of what was read: their requests go out together.
        await gather_bounded([functools.partial(self._check_segments_exist, state),
                              functools.partial(self._check_epochs, epochs)], 2)
        return live_from

    async def _moved_past(self, seq: int) -> bool:
        """Whether the log moved on past commit ``seq``: a newer checkpoint, or a commit
        after it (or a gap there: gc collecting what a newer checkpoint folds)."""
        if await self._newer_checkpoint(seq):
            return True
        try:
            return bool(await self._commit_keys_after(seq))
        except CorruptDataError:
            return True

    async def _records_unless_newer(self, keys: list[str], seq: int) -> tuple[
            bool, list[fmt.CommitRecord] | CorruptDataError]:
        """Read the commit records ``keys`` while asking whether a checkpoint newer than
        ``seq`` is listed: (newer, the records, or the damage reading them met).

        Damage is handed back, not raised, as long as the answer is pending: records that
        vanish as they are read are what gc leaves when a newer checkpoint folds them, and
        then the caller starts again from that checkpoint instead.
        """
        newer = False
        records: list[fmt.CommitRecord] | CorruptDataError = []

        async def ask() -> None:
            nonlocal newer
            newer = await self._newer_checkpoint(seq)

        async def read() -> None:
            nonlocal records
            try:
                records = await gather_bounded([self._reader(key) for key in keys],
                                               max(self.read_concurrency, _RECORD_READS))
            except CorruptDataError as exc:
                records = exc

        await gather_bounded([ask, read], 2)
        if isinstance(records, CorruptDataError) and not newer:
            # Asked again, now that the reads are over: the answer above may have come
            # before a writer checkpointed and gc (no grace) deleted the records it folds,
            # and a record that vanished after the question was answered then failed a
            # healthy store's opening as corruption. A record gc deleted is folded by a
            # checkpoint listed before it was deleted, so a question asked after the
            # failed read sees that checkpoint.
            newer = await self._newer_checkpoint(seq)
        return newer, records

    async def _checkpoint_state(self) -> _State:
        """The state of the newest checkpoint, or an empty state for a store that has none.

        The newest is found by listing ``checkpoints/``, never by a pointer a writer
        overwrites: a fenced writer could set a pointer back to a checkpoint whose later
        commits gc has collected, and the store would open silently older. Garbage
        collection keeps the listing short (it deletes every checkpoint but the newest).
        """
        for _attempt in range(3):
            numbers = [n async for n in self._numbers(fmt.checkpoints_prefix(self._writer))]
            if not numbers:
                return _State()
            number = max(numbers)
            key = fmt.checkpoint_key(self._writer, number)
            try:
                data = await self._driver.get(key)
            except ObjectNotFoundError:
                continue  # collected since it was listed: a newer one exists
            ckpt = fmt.Checkpoint.decode(key, data)
            if ckpt.writer != self._writer or ckpt.seq != number:
                raise CorruptDataError(f"checkpoint names another position: key={key} offset=0 "
                                       f"writer={ckpt.writer} seq={ckpt.seq}")
            return _State.of_checkpoint(ckpt)
        raise CorruptDataError(f"checkpoints vanish while the store is opened: key="
                               f"{fmt.checkpoints_prefix(self._writer)} offset=0")

    async def _newer_checkpoint(self, than: int) -> bool:
        """Whether a checkpoint newer than ``than`` is listed now."""
        return any([n > than async for n in self._numbers(fmt.checkpoints_prefix(self._writer))])

    async def _commit_keys_after(self, after: int) -> list[str]:
        """The keys of commits ``after + 1``, ``after + 2``, ... up to the newest.

        Lists a bucket of commit keys at a time, from the one that holds ``after + 1``, and
        goes on to the next bucket while the commits may continue there. A missing number
        followed by later commits is a ``CorruptDataError``.
        """
        if capabilities_of(self._driver).point_lookups:
            return await self._probe_commits_after(after)
        prefix = fmt.commits_prefix(self._writer)
        numbered: dict[int, str] = {}
        bucket = (after + 1) // fmt.BUCKET
        top = after
        self._listed_commits.clear()
        # A log that starts near a bucket's end (a checkpoint is made every 128 commits)
        # is likely to go on in the next bucket: both are listed at once, saving a round
        # trip. The next one's keys count only if this one's say the log goes on there,
        # exactly as if it had been listed afterwards.
        ahead = 2 if (after + 1) % fmt.BUCKET >= fmt.BUCKET - _NEXT_BUCKET_TOO else 1
        listings: list[list[str] | Exception] = []
        while True:
            if not listings:
                # Only the first listing is needed now: a failure of the others (listed
                # ahead, on speculation) is kept, not raised, so that it cannot fail an
                # open that never needs their answer (see below).
                listings = await gather_bounded(
                    [functools.partial(self._list_keys if b == bucket else self._list_keys_kept,
                                       fmt.commit_bucket_prefix(self._writer, b))
                     for b in range(bucket, bucket + ahead)], ahead)
                ahead = 1
            listed = listings.pop(0)
            # A bucket listed ahead whose listing failed is needed after all: listed now, as
            # it would have been without listing ahead (its error, if it fails again, raised).
            keys = (await self._list_keys(fmt.commit_bucket_prefix(self._writer, bucket))
                    if isinstance(listed, Exception) else listed)
            self._listed_commits[fmt.commit_bucket_prefix(self._writer, bucket)] = set(keys)
            for key in keys:
                seq = fmt.number_in_key(key, prefix)
                if seq is not None and seq > after:
                    numbered[seq] = key
                    top = max(top, seq)
            # The log may go on in the next bucket if this one holds its last number, or
            # lacks only that one (then a later commit there is a gap, reported below).
            if top < (bucket + 1) * fmt.BUCKET - 2:
                break
            bucket += 1
        seqs = sorted(numbered)
        for expected, seq in enumerate(seqs, start=after + 1):
            if seq != expected:
                raise CorruptDataError(
                    f"commit record missing while later commits exist: "
                    f"key={fmt.commit_key(self._writer, expected)} offset=0 later={seq}")
        return [numbered[seq] for seq in seqs]

    async def _list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in the driver's order."""
        return [info.key async for info in self._driver.list(prefix)]

    async def _list_keys_kept(self, prefix: str) -> list[str] | Exception:
        """``_list_keys``, or the exception it raised (a cancellation is raised)."""
        try:
            return await self._list_keys(prefix)
        except Exception as exc:
            return exc

    async def _probe_commits_after(self, after: int) -> list[str]:
        """``_commit_keys_after`` on a driver with point lookups (``sizes``): the commit keys
        after ``after`` are asked for ``_PROBE`` at a time, with no listing. The window
        after the first missing number is asked too: a commit there is a gap."""
        keys: list[str] = []
        start = after + 1
        while True:
            window = [fmt.commit_key(self._writer, n) for n in range(start, start + _PROBE)]
            found = await self._driver.sizes(window)  # type: ignore[attr-defined]
            present = [key in found for key in window]
            run = present.index(False) if False in present else len(window)
            keys += window[:run]
            if run == len(window):
                start += _PROBE
                continue
            later = [key for key in window[run:] if key in found]
            if not later:
                beyond = [fmt.commit_key(self._writer, n)
                          for n in range(start + _PROBE, start + 2 * _PROBE)]
                later = sorted(await self._driver.sizes(beyond))  # type: ignore[attr-defined]
            if later:
                raise CorruptDataError(
                    f"commit record missing while later commits exist: key={window[run]} "
                    f"offset=0 later={fmt.number_in_key(later[0], fmt.commits_prefix(self._writer))}")
            return keys

    @staticmethod
    def _apply_rewrites(logs: dict[tuple[str, str], list[LoggedSegment]], key: str,
                        record: fmt.CommitRecord) -> None:
        """Replace each rewrite's run of segments, in place in its log, by its new ones.

        One pass over each log a rewrite touches, however many rewrites it has: a store
        written before merging existed may have a log of many thousand small segments.
        Each log gets a new list, so a view taken before (``mark_opened``) keeps the old.
        """
        by_log: dict[tuple[str, str], list[fmt.Rewrite]] = defaultdict(list)
        for rewrite in record.rewrites:
            by_log[(rewrite.kind, rewrite.name)].append(rewrite)
        for log_id, rewrites in by_log.items():
            log = logs.get(log_id, [])
            where = {seg.ref.key: index for index, seg in enumerate(log)}
            runs: list[tuple[int, fmt.Rewrite]] = []
            for rewrite in rewrites:
                start = where.get(rewrite.old[0])
                if start is None or [s.ref.key for s in log[start:start + len(rewrite.old)]] != \
                        list(rewrite.old):
                    raise CorruptDataError(f"commit rewrites segments its log does not hold in "
                                           f"that order: key={key} offset=0 log={log_id[0]}/"
                                           f"{log_id[1]} first={rewrite.old[0]}")
                runs.append((start, rewrite))
            runs.sort(key=lambda run: run[0])
            rebuilt: list[LoggedSegment] = []
            done = 0
            for start, rewrite in runs:
                if start < done:
                    raise CorruptDataError(f"commit rewrites overlapping runs of segments: "
                                           f"key={key} offset=0 log={log_id[0]}/{log_id[1]} "
                                           f"first={rewrite.old[0]}")
                rebuilt += log[done:start]
                rebuilt += [LoggedSegment(record.seq, ref) for ref in rewrite.new]
                done = start + len(rewrite.old)
            rebuilt += log[done:]
            logs[log_id] = rebuilt

    def _apply(self, state: _State, key: str, record: fmt.CommitRecord) -> None:
        """Add the commit ``record`` (read from ``key``) to ``state``, the next in the log."""
        if record.seq != state.last_seq + 1 or record.writer != self._writer:
            raise CorruptDataError(f"commit record names another position: key={key} offset=0 "
                                   f"seq={record.seq} writer={record.writer}")
        if record.epoch < state.last_epoch:
            raise CorruptDataError(f"commit record has an older epoch than its predecessor: "
                                   f"key={key} offset=0 epoch={record.epoch} "
                                   f"previous={state.last_epoch}")
        if record.epoch != state.last_epoch:
            state.fences.append(record.seq)
            state.last_segment = 0
        if record.reset:
            state.logs.clear()
            state.commits = 0
            state.reset_time_ms = record.time_ms
        logs = state.logs
        if record.rewrites:
            self._apply_rewrites(logs, key, record)
        snapshotted: set[str] = set()
        for ref in record.segments:
            if ref.kind == fmt.KIND_TABLE_SNAPSHOT and ref.name not in snapshotted:
                # A table's newest snapshot supersedes its older segments: new lists, so
                # that a view taken before keeps the old ones.
                snapshotted.add(ref.name)
                logs[(fmt.KIND_TABLE_SNAPSHOT, ref.name)] = []
                logs.pop((fmt.KIND_TABLE, ref.name), None)
            logs[(ref.kind, ref.name)].append(LoggedSegment(record.seq, ref))
        for ref in itertools.chain(record.segments,
                                   *(rewrite.new for rewrite in record.rewrites)):
            parsed = fmt.parse_segment_key(ref.key, self._writer)
            if parsed is not None and parsed[0] == record.epoch:
                state.last_segment = max(state.last_segment, parsed[1])
        # What the commit changed, in place: a commit's cost to apply (and so a store's cost
        # to open) never grows with the streams it left alone.
        state.offsets = record.apply_offsets(state.offsets)
        state.last_seq, state.last_epoch = record.seq, record.epoch
        state.last_time_ms = record.time_ms
        state.commits += 1

    def _check_named_once(self, state: _State) -> None:
        """Refuse a live state that names one segment twice (in one log or two).

        A writer names only new segments in a commit (numbered past every segment before),
        so a key named again is damage: a record edited (its checksum recomputed) or
        written by a buggy writer, say a record whose inline ``data`` is a copy of an
        earlier commit's segment under that segment's key. Without this check, the
        segment's records were replayed twice, as data (and inline, both homes answered
        for one key). Once per load, over the live segments: the cost of opening follows
        the live state, as ``_check_segments_exist``'s does.
        """
        seen: set[str] = set()
        for (kind, name), segs in state.logs.items():
            for seg in segs:
                if seg.ref.key in seen:
                    raise CorruptDataError(
                        f"commit names a segment the log holds already: key="
                        f"{fmt.commit_key(self._writer, seg.seq)} offset=0 log={kind}/{name} "
                        f"segment={seg.ref.key}")
                seen.add(seg.ref.key)

    def _reader(self, key: str) -> Callable[[], Awaitable[fmt.CommitRecord]]:
        async def read() -> fmt.CommitRecord:
            try:
                data = await self._driver.get(key)
            except ObjectNotFoundError:
                raise CorruptDataError(f"commit record vanished while opening: key={key} "
                                       "offset=0") from None
            return fmt.CommitRecord.decode(key, data)
        return read

    async def _check_segments_exist(self, state: _State) -> None:
        """Check that every live segment exists with the size its commit names.

        Lists only the buckets of segment keys that hold live segments (at most
        ``fmt.BUCKET`` keys each), so the cost follows the live state, not the history.
        """
        named: dict[str, LoggedSegment] = {
            seg.ref.key: seg for segs in state.logs.values() for seg in segs
            if seg.ref.home is None}
        await self._check_homes_exist(state)
        if not named:
            return
        if capabilities_of(self._driver).point_lookups:
            found = await self._driver.sizes(list(named))  # type: ignore[attr-defined]
            self._check_sizes(named, found)
            return
        prefixes: set[str] = set()
        for key in named:
            parsed = fmt.parse_segment_key(key, self._writer)
            prefixes.add(fmt.segments_prefix(self._writer) if parsed is None else
                         fmt.segment_bucket_prefix(self._writer, parsed[0],
                                                   parsed[1] // fmt.BUCKET))
        if fmt.segments_prefix(self._writer) in prefixes:
            prefixes = {fmt.segments_prefix(self._writer)}
        sizes: dict[str, int] = {}

        def lister(prefix: str) -> Callable[[], Awaitable[None]]:
            async def list_one() -> None:
                async for info in self._driver.list(prefix):
                    sizes[info.key] = info.size
            return list_one

        await gather_bounded([lister(p) for p in sorted(prefixes)], self.read_concurrency)
        self._check_sizes(named, sizes)

    async def _check_homes_exist(self, state: _State) -> None:
        """Check that the commit record holding each live inline segment exists.

        Those after the checkpoint were just read; the others (folded into it) are found by
        listing only the buckets of commit keys that hold them, so the cost follows the
        live state, as for segments.
        """
        homes = {seg.ref.home: seg.ref.key for segs in state.logs.values() for seg in segs
                 if seg.ref.home is not None and seg.seq <= state.checkpoint}
        if not homes:
            return
        found: set[str] = set()
        if capabilities_of(self._driver).point_lookups:
            found.update(await self._driver.sizes(list(homes)))  # type: ignore[attr-defined]
        else:
            prefix = fmt.commits_prefix(self._writer)
            buckets = set()
            for home in homes:
                seq = fmt.number_in_key(home, prefix)
                buckets.add(prefix if seq is None else
                            fmt.commit_bucket_prefix(self._writer, seq // fmt.BUCKET))
            if prefix in buckets:
                buckets = {prefix}
            for bucket in list(buckets):  # listed a moment ago, when finding the commits
                if bucket in self._listed_commits:
                    found.update(self._listed_commits[bucket])
                    buckets.discard(bucket)

            def lister(bucket: str) -> Callable[[], Awaitable[None]]:
                async def list_one() -> None:
                    found.update([info.key async for info in self._driver.list(bucket)])
                return list_one

            await gather_bounded([lister(b) for b in sorted(buckets)], self.read_concurrency)
        for home, key in homes.items():
            if home not in found:
                raise CorruptDataError(f"commit record holding a live inline segment is "
                                       f"missing: key={home} offset=0 segment={key}")

    def _check_sizes(self, named: Mapping[str, LoggedSegment], sizes: Mapping[str, int]) -> None:
        for key, seg in named.items():
            commit = fmt.commit_key(self._writer, seg.seq)
            size = sizes.get(key)
            if size is None:
                raise CorruptDataError(f"commit names a missing segment: key={key} offset=0 "
                                       f"commit={commit}")
            if size != seg.ref.size:
                raise CorruptDataError(f"segment size differs from its commit: key={key} "
                                       f"offset={min(size, seg.ref.size)} size={size} "
                                       f"expected={seg.ref.size} commit={commit}")

    async def _check_epochs(self, first_commit: Mapping[int, str]) -> None:
        """Check the epoch record of every epoch that a live commit names: one GET each.

        ``first_commit`` maps each epoch to the commit (or checkpoint) that needs it. A
        writer creates its epoch record before its first commit, so a live commit's epoch
        always has one. A missing, damaged or misplaced record is lost or damaged data (the
        proof of the writer role those commits stand on), never a store that is merely older.
        """
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
        self._epoch_records[epoch] = record
        return record

    async def holder(self, epoch: int | None = None) -> fmt.WriterInfo | None:
        """Who took the writer role with ``epoch`` (default: the newest commit's epoch, the
        writer that holds the store), as its epoch record says; None for a store with no
        commit, or an epoch record that cannot be read (naming a writer only enriches a
        message or a report: it never fails what asked)."""
        epoch = self._state.last_epoch if epoch is None else epoch
        if epoch <= 0:
            return None
        record = self._epoch_records.get(epoch)
        if record is None:
            try:
                record = await self.read_epoch(epoch)
            except PersistenceError as exc:
                logger.debug("could not read the epoch record naming a writer: epoch=%d %s",
                             epoch, exc)
                return None
        return record.writer_info()

    async def _holder_facts(self, epoch: object, prefix: str = ""
                            ) -> tuple[fmt.WriterInfo | None, str]:
        """``holder(epoch)`` and its facts for a message (empty if unknown)."""
        holder = await self.holder(epoch) if isinstance(epoch, int) else None
        return holder, "" if holder is None else " " + holder.facts(prefix)

    async def read_segment(self, ref: fmt.SegmentRef) -> fmt.SegmentView:
        """Fetch and check one committed segment. Damage raises ``CorruptDataError``.

        A segment that is missing because the store moved on since it was opened (no live
        commit names it any more, so ``apersist gc`` could collect it) raises
        ``SegmentCollectedError`` instead.
        """
        data = self._recent.pop(ref.key, None)
        if data is not None:
            self._recent_bytes -= len(data)
            if needs_thread(data):
                return await anyio.to_thread.run_sync(fmt.SegmentView, ref, data)
            return fmt.SegmentView(ref, data)
        try:
            data = await self.segment_bytes(ref)
        except ObjectNotFoundError:
            newest = await self._seq_past(ref.key)
            if newest is not None:
                raise SegmentCollectedError(
                    f"segment was garbage-collected after this reader opened the store: the "
                    f"store moved on and no live commit names it; reopen the store (apersist "
                    f"gc's grace period was shorter than this reader's life): key={ref.key} "
                    f"offset=0 seq={self._state.last_seq} store_seq={newest}") from None
            if ref.home is not None:
                raise CorruptDataError(f"commit record holding an inline segment is missing: "
                                       f"key={ref.home} offset=0 segment={ref.key}") from None
            raise CorruptDataError(f"commit names a missing segment: key={ref.key} "
                                   "offset=0") from None
        if needs_thread(data):
            return await anyio.to_thread.run_sync(fmt.SegmentView, ref, data)
        return fmt.SegmentView(ref, data)

    async def segment_bytes(self, ref: fmt.SegmentRef) -> bytes:
        """The stored bytes of one segment, unchecked: its object, or for an inline one
        (``ref.home``) its data in the commit record that holds it.

        Raises ``ObjectNotFoundError`` if the object (or the record) is missing, and
        ``CorruptDataError`` if the record is damaged or does not carry the segment. The
        other inline segments of that record are kept a while (``_remember``): one commit
        may carry a stream's and a table's, read one after the other.
        """
        if ref.home is None:
            return await self._driver.get(ref.key)
        data = self._recent.pop(ref.key, None)
        if data is not None:
            self._recent_bytes -= len(data)
            return data
        record = fmt.CommitRecord.decode(ref.home, await self._driver.get(ref.home))
        data = record.inline.get(ref.key)
        if data is None:
            raise CorruptDataError(f"commit record does not carry an inline segment it should: "
                                   f"key={ref.home} offset=0 segment={ref.key}")
        self._remember([(k, d) for k, d in record.inline.items() if k != ref.key])
        return data

    async def _seq_past(self, key: str) -> int | None:
        """The store's newest commit number if the log moved on past segment ``key``: it is
        at least as new as ours and none of its live commits names ``key`` (a reset or a
        compaction superseded it). None if a live commit still names it (lost data), or if
        the log does not read whole (then the missing segment is reported as it is).

        Opens the store anew: only the error path of a missing segment calls this.
        """
        fresh = Store(self._driver, writer=self._writer, clock_ms=self._clock_ms,
                      read_concurrency=self.read_concurrency)
        try:
            state = await fresh._checkpoint_state()
            keys = await fresh._commit_keys_after(state.last_seq)
            records = await gather_bounded([fresh._reader(k) for k in keys], self.read_concurrency)
            for record_key, record in zip(keys, records, strict=True):
                fresh._apply(state, record_key, record)
        except PersistenceError:
            return None
        if state.last_seq < self._state.last_seq or key in state.live_keys():
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
        for window in segment_windows(refs, self.read_concurrency):
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
    async def newest_epoch(self) -> int:
        """The highest epoch number listed under ``epochs/`` (0: none)."""
        return max([n async for n in self._numbers(fmt.epochs_prefix(self._writer))], default=0)

    async def acquire_writer(self, newest_epoch: int | None = None) -> None:
        """Take the writer role: a new epoch record, then a fence commit.

        Afterwards any older writer's next commit fails with ``FencedError``. If another
        writer commits while we take over, the log is reloaded and the fence retried.
        ``newest_epoch``: ``newest_epoch()``'s answer if the caller asked it already (say,
        while the log was loading); listed here otherwise. One that is out of date only
        costs a retry: an epoch number taken meanwhile is refused by create-if-absent.
        """
        if newest_epoch is None:
            newest_epoch = await self.newest_epoch()
        epoch = max(newest_epoch, self._state.last_epoch) + 1
        token = uuid.uuid4().hex
        host, pid = this_process()
        while True:
            self._last_stamp = self._clock_ms()  # a bad reading fails here, writing nothing
            record = fmt.EpochRecord(self._writer, epoch, self._last_stamp, token, host, pid,
                                     self._label)
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
                if not await self._newer_checkpoint(fence.seq - 1):
                    self._apply(self._state, key, fence)
                    break
                # Our fence landed under a number a checkpoint already folds: gc with no
                # grace collected the commit there while we were opening, so our state is
                # old. Readers never read that number; read the store again and fence anew.
                logger.warning("fence commit landed below a checkpoint; reopening: key=%s", key)
                await self.load()
                if self._state.last_epoch > epoch:
                    raise await self._fenced_while_starting(epoch)
                raced = True
                continue
            # Someone committed under the number we wanted: an older writer still committing
            # (catch up with its commits, one read each, and fence the next number: a full
            # reload per lost race would let a busy older writer win every race) or a newer
            # writer (we lost).
            raced = True
            await self._catch_up()
            if self._state.last_epoch > epoch:
                raise await self._fenced_while_starting(epoch)
        if raced:
            # The commits caught up with were read one by one, their segments unchecked: check
            # the whole log once, now that no older writer can add to it.
            await self.load()
        logger.info("writer role taken: writer=%s epoch=%d seq=%d",
                    self._writer, epoch, self._state.last_seq)

    async def _fenced_while_starting(self, epoch: int) -> FencedError:
        current = self._state.last_epoch
        holder, facts = await self._holder_facts(current, "current_")
        return FencedError(f"a newer writer took over while this one was starting: "
                           f"epoch={epoch} current={current}{facts}", holder=holder)

    # ------------------------------------------------------------------ an active writer
    async def refuse_active_writer(self, idle_ms: int) -> None:
        """Raise ``WriterActiveError`` if the store's writer wrote its log less than
        ``idle_ms`` ago (``Config.takeover_idle_ms``); return if it has been idle that
        long, or if the store has no commit. Writes nothing that stays (see
        ``last_write_age_ms``). Call it after ``load()``, before ``acquire_writer()``."""
        age = await self.last_write_age_ms()
        if age is None:
            return
        ms, clock = age
        if ms >= idle_ms:
            logger.info("the store's writer is idle; taking over: idle_ms=%d "
                        "takeover_idle_ms=%d clock=%s", ms, idle_ms, clock)
            return
        epoch = self._state.last_epoch
        holder, facts = await self._holder_facts(epoch)
        raise WriterActiveError(
            f"the store's writer committed within takeover_idle_ms, so this run does not "
            f"take over (nothing was written); start it once that writer has stopped: "
            f"idle_ms={ms} takeover_idle_ms={idle_ms} clock={clock} "
            f"seq={self._state.last_seq} epoch={epoch}{facts}", holder=holder, idle_ms=ms)

    async def last_write_age_ms(self) -> tuple[int, str] | None:
        """How long ago the store's writer last wrote its log, and by which clock; None for
        a store with no commit.

        The log's newest write is its newest commit record, or the newest checkpoint
        (written after it, and standing for it once gc collected that record). Where the
        driver lists modification times (``ObjectInfo.modified_ms``: the filesystem, S3 and
        Azure), both ends are read on the *storage's* clock: the record's time, and "now"
        as the modification time of a scratch object written and deleted for the purpose
        (``_check/<32 hex digits>``, as the create-if-absent check's). Writers' clocks,
        which may disagree between machines, play no part: ``"storage"``. A driver that
        lists no times (the memory driver) falls back on the writer's clock in the record
        against this run's clock: ``"writer"``, exact within one process, off by the skew
        of the two machines' clocks otherwise.
        """
        state = self._state
        # The newest commit now, not the newest loaded: a writer at work may have committed
        # since the log was listed (loading a long log takes seconds), and its older commit
        # would make it look idle.
        newer = await self._commit_keys_after(state.last_seq)
        if state.last_seq == 0 and not newer:
            return None
        keys = [newer[-1] if newer else fmt.commit_key(self._writer, state.last_seq)]
        if state.checkpoint:
            keys.append(fmt.checkpoint_key(self._writer, state.checkpoint))
        written: int | None = None
        for key in keys:
            async for info in self._driver.list(key):
                if info.key == key and info.modified_ms is not None:
                    written = max(written or 0, info.modified_ms)
        if written is not None:
            now = await self._storage_now()
            if now is not None:
                return max(0, now - written), "storage"
        last_time_ms = state.last_time_ms
        if newer:
            last_time_ms = fmt.CommitRecord.decode(newer[-1], await self._driver.get(newer[-1])).time_ms
        return max(0, self._clock_ms() - last_time_ms), "writer"

    async def _storage_now(self) -> int | None:
        """The storage's clock now: the modification time of a scratch object, written,
        listed and deleted; None if the driver lists no modification times."""
        key = f"{SCRATCH_PREFIX}{uuid.uuid4().hex}"
        try:
            await self._driver.put(key, b"apersist: a reading of the storage's clock")
            found = [info.modified_ms async for info in self._driver.list(key)
                     if info.key == key]
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._driver.delete([key])
                except PersistenceError as exc:  # a leftover scratch key is gc's to delete
                    logger.debug("could not delete a clock-reading scratch key: key=%s %s",
                                 key, exc)
        return found[0] if found else None

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
                     reset: bool, rewrites: Sequence[PendingRewrite] = ()) -> int:
        """Upload ``blobs`` concurrently, then write the commit record that names them; or,
        when they hold at most ``fmt.INLINE_BYTES`` in all, write the record carrying them
        inline (format 5.0: one create-if-absent request, and no upload).

        ``offsets`` is every stream's offset after the commit (for a reset, those of the new
        history); the record holds only what differs from the current ``offsets``.
        ``rewrites`` replace runs of segments of a log in place (maintenance); one whose
        run is no longer in its log as it was (a reset came between) is left out, its
        segments not uploaded. Returns the commit's number once it is durable. Raises
        ``FencedError`` if a newer writer owns the store (nothing of this commit is visible
        then); after that every later call raises it too.
        """
        if self._fenced is not None:
            raise self._fenced
        if self._epoch is None:
            raise RuntimeError("commit on a store that does not hold the writer role")
        kept = [] if reset else self._applicable(rewrites)
        # A small commit carries its own new segments in its record (never a rewrite's):
        # one create-if-absent request, one new file, instead of one per segment and the
        # record. Upload before commit holds trivially: the record is the segments' object.
        inline = 0 < sum(len(b.data) for b in blobs) <= fmt.INLINE_BYTES
        record = self._next_record(blobs, self._offset_changes(offsets, reset=reset),
                                   reset=reset,
                                   rewrites=[fmt.Rewrite(r.kind, r.name, tuple(r.old),
                                                         tuple(b.ref for b in r.new))
                                             for r in kept], inline=inline)
        blobs = [*blobs, *(b for r in kept for b in r.new)]
        uploads = [b for r in kept for b in r.new] if inline else blobs
        key = fmt.commit_key(self._writer, record.seq)
        if not await self._publish(key, record, uploads):
            theirs = await self._epoch_of(key)
            holder, facts = await self._holder_facts(theirs, "current_")
            self._fenced = FencedError(
                f"a newer writer owns this store: epoch={self._epoch} current={theirs} "
                f"commit={key}{facts}", holder=holder)
            logger.warning("%s", self._fenced)
            raise self._fenced
        self._apply(self._state, key, record)
        self._remember([(b.ref.key, b.data) for b in blobs])
        return record.seq

    def _remember(self, blobs: Sequence[tuple[str, bytes | bytearray]]) -> None:
        """Keep the bytes of small segments (key, data) just committed or read inline,
        oldest first out of a bounded memory, so that merging them (``_maintenance``) or
        replaying them after opening reads them without a request: on an object store, a
        paced source's merges would otherwise GET every small segment (or, inline, the
        commit record that carries it)."""
        recent = self._recent
        for key, data in blobs:
            if len(data) <= _RECENT_SEGMENT_BYTES:
                old = recent.pop(key, None)
                if old is not None:
                    self._recent_bytes -= len(old)
                recent[key] = bytes(data)
                self._recent_bytes += len(data)
        while self._recent_bytes > _RECENT_BYTES:
            _key, data = recent.popitem(last=False)
            self._recent_bytes -= len(data)

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
                     reset: bool, rewrites: Sequence[fmt.Rewrite] = (),
                     inline: bool = False) -> fmt.CommitRecord:
        """The next commit record; with ``inline`` it carries the bytes of ``blobs``, whose
        refs then name it as their ``home``."""
        assert self._epoch is not None, "commits are written only by the writer"
        seq = self._state.last_seq + 1
        refs = tuple(b.ref for b in blobs)
        data: dict[str, bytes] = {}
        if inline:
            home = fmt.commit_key(self._writer, seq)
            refs = tuple(dataclasses.replace(ref, home=home) for ref in refs)
            data = {b.ref.key: bytes(b.data) for b in blobs}
        return fmt.CommitRecord(
            writer=self._writer, seq=seq, epoch=self._epoch,
            time_ms=self._stamp(), token=uuid.uuid4().hex, reset=reset,
            segments=refs, offsets=offsets, rewrites=tuple(rewrites), inline=data)

    def _applicable(self, rewrites: Sequence[PendingRewrite]) -> list[PendingRewrite]:
        """The rewrites that apply to the log as it is: each one's run is consecutive in
        its log, and no two runs share a segment. The others are left out (a reset came
        between, or they overlap), so that a commit record never holds a rewrite its
        readers would refuse."""
        # Per log: where each key is, and the keys taken by a rewrite already kept.
        logs: dict[tuple[str, str], tuple[list[str], dict[str, int], set[str]]] = {}
        kept = []
        for rewrite in rewrites:
            log_id = (rewrite.kind, rewrite.name)
            if log_id not in logs:
                keys = [seg.ref.key for seg in self._state.logs.get(log_id, ())]
                logs[log_id] = (keys, {k: i for i, k in enumerate(keys)}, set())
            keys, where, taken = logs[log_id]
            old = list(rewrite.old)
            start = where.get(old[0], -1) if old else -1
            if start < 0 or keys[start:start + len(old)] != old or taken.intersection(old):
                logger.debug("rewrite left out: its run is not in the log: log=%s/%s first=%s",
                             rewrite.kind, rewrite.name, old[:1])
                continue
            taken.update(old)
            kept.append(rewrite)
        return kept

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_seq(self) -> int:
        """The newest checkpoint this store read or wrote (0: none)."""
        return self._state.checkpoint

    @property
    def fences(self) -> list[int]:
        """The first commit of every epoch, in order (a copy)."""
        return list(self._state.fences)

    @property
    def last_segment(self) -> int:
        """The highest segment number of the newest commit's epoch that a commit named."""
        return self._state.last_segment

    def live_keys(self) -> set[str]:
        """Every segment key a live commit (or the checkpoint) names."""
        return self._state.live_keys()

    def live_homes(self) -> set[str]:
        """The keys of the commit records that carry a live segment inline."""
        return self._state.live_homes()

    async def write_checkpoint(self) -> int:
        """Fold the log as it is now into a checkpoint.

        The checkpoint is created if absent: one of that number already there (written
        by an earlier attempt, or by another writer) holds the same log, so it stands.
        Returns its commit number (0 for an empty log: nothing is written).
        """
        state = self._state
        if state.last_seq == 0:
            return 0
        ckpt = fmt.Checkpoint(
            self._writer, state.last_seq, state.last_epoch, self._stamp(), uuid.uuid4().hex,
            state.commits, state.reset_time_ms, tuple(state.fences), state.last_segment,
            dict(state.offsets),
            {log: tuple((seg.seq, seg.ref) for seg in segs)
             for log, segs in state.logs.items() if segs})
        # The state was copied without awaiting: the rest may run while commits go on.
        if sum(len(segs) for segs in ckpt.logs.values()) > 2_000:
            data = await anyio.to_thread.run_sync(ckpt.encode)
        else:
            data = ckpt.encode()
        with contextlib.suppress(ObjectExistsError):
            await self._driver.put(fmt.checkpoint_key(self._writer, ckpt.seq), data,
                                   if_absent=True)
        if state.checkpoint < ckpt.seq:
            state.checkpoint, state.checkpoint_epoch = ckpt.seq, ckpt.epoch
        logger.debug("checkpoint written: writer=%s seq=%d logs=%d", self._writer, ckpt.seq,
                     len(ckpt.logs))
        return ckpt.seq

    def mark_opened(self) -> None:
        """Keep a view of the logs as they are now, for ``segments_at``."""
        self._opened_logs = dict(self._state.logs)
        self._opened_seq = self._state.last_seq

    def segments_at(self, kind: str, name: str, seq: int) -> list[LoggedSegment]:
        """The segments of one log as they were at commit ``seq`` (a copy): the newest
        commit, or any commit since ``mark_opened``.

        Appends since then are in the opened view's lists too, with a newer ``seq``, and
        are left out here. Rewrites and snapshots since then made new lists, so the view
        still holds the segments they replaced (which garbage collection keeps for its
        grace period).
        """
        if seq >= self._state.last_seq or self._opened_logs is None:
            logs = self._state.logs
        elif seq >= self._opened_seq:
            logs = self._opened_logs
        else:
            raise ValueError(f"the log is known from commit {self._opened_seq} on: seq={seq}")
        return [s for s in logs.get((kind, name), ()) if s.seq <= seq]

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
