"""Reading a damaged store as far as it is whole: what ``apersist dump`` and ``salvage`` stand on.

A run refuses a damaged store (``CorruptDataError``), as it must: it cannot hand out a
state it knows to be wrong. The operator still needs what *can* be read, so this module
reads a store the other way round, stopping short instead of failing:

- the commit log up to its last whole commit (the newest checkpoint that decodes, then the
  commit records after it, up to the first that is missing or damaged);
- each log (a stream, a table, the cache) up to its first damaged record: the records of
  a damaged segment before the damage are kept, the rest of that log is not.

Every damage met is returned as a ``Damage`` naming the object and byte offset, never
skipped silently. Nothing here writes.
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from . import _format as fmt
from ._compression import decompress_body
from ._concurrency import gather_bounded
from ._drivers import Driver, ObjectNotFoundError
from ._errors import CorruptDataError, PersistenceError
from ._store import Store, _State, needs_thread, segment_windows

__all__ = ["Damage", "Frame", "LogPart", "OpenedStore", "is_store", "lost_commit_log",
           "open_readable", "read_log"]

# Segments fetched at once while a log is read (each is checked as it comes), in windows
# bounded in bytes as a run's (``segment_windows``).
_READ_AHEAD = 8
# A segment's trailer: count, body length, body CRC, trailer CRC, end magic.
_TRAILER_SIZE = fmt._TRAILER.size

_KEY_RE = re.compile(r"\bkey=(\S+)")
_OFFSET_RE = re.compile(r"\boffset=(\d+)")


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged or missing object, as a reader met it: its key, the byte offset of the
    damage and the reader's message."""

    key: str
    offset: int
    message: str

    @classmethod
    def of(cls, exc: PersistenceError, key: str) -> Damage:
        """The damage ``exc`` reports; ``key`` is the object read, for a message that names
        none (every ``CorruptDataError`` of apersist names its key and offset)."""
        message = str(exc)
        named = _KEY_RE.search(message)
        offset = _OFFSET_RE.search(message)
        return cls(named.group(1) if named else key, int(offset.group(1)) if offset else 0,
                   message)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "offset": self.offset, "message": self.message}


@dataclass(slots=True)
class OpenedStore:
    """A store read as far as its commit log is whole.

    ``store`` holds the state of the last whole commit (its segments, offsets and tables).
    ``damage`` names what stopped the log short, or what a run would refuse besides (a
    damaged epoch record); empty when a run would open the store as it is. ``lost_commits``
    counts the commits after the last whole one, up to the newest numbered (a missing
    record in between included).
    """

    store: Store
    damage: list[Damage]
    lost_commits: int = 0
    #: What the commit records after the last whole one added, for those that still
    #: decode: records of new segments by (kind, name) (a merge's rewrites add none).
    beyond: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Of the commits after the last whole one, those whose record is missing or does not
    #: decode: what they added is unknown.
    unreadable_commits: int = 0

    def stream_names(self) -> list[str]:
        """Every stream: those with events in the live state, and those with an offset."""
        return sorted(set(self.store.log_names(fmt.KIND_EVENTS)) | set(self.store.offsets))

    def table_names(self) -> list[str]:
        return self.store.table_names()


async def is_store(driver: Driver) -> bool:
    """Whether anything of an apersist store is under the driver's root: an epoch record, a
    commit record or a checkpoint. Reads at most one listing entry of each."""
    for prefix in (fmt.epochs_prefix(fmt.WRITER), fmt.commits_prefix(fmt.WRITER),
                   fmt.checkpoints_prefix(fmt.WRITER)):
        async for _info in driver.list(prefix):
            return True
    return False


async def lost_commit_log(driver: Driver, last_seq: int) -> Damage | None:
    """The damage of a store whose commit log is gone while its data is not: segments are
    listed, but no commit record and no checkpoint (a writer uploads segments only after
    its epoch's fence commit, which gc keeps for good). None if the store has a commit
    (``last_seq``), or no segment: an epoch record alone is a writer that stopped before
    its fence, a whole empty store. Reads one listing entry of each prefix, mostly."""
    if last_seq > 0:
        return None

    async def any_under(prefix: str) -> bool:
        async for _info in driver.list(prefix):
            return True
        return False

    async def logged() -> bool:
        return (await any_under(fmt.commits_prefix(fmt.WRITER))
                or await any_under(fmt.checkpoints_prefix(fmt.WRITER)))

    # The log is listed again after the segments: a writer that fenced a new store since
    # the first look is seen then (its fence commit lands before any of its segments).
    if await logged() or not await any_under(fmt.segments_prefix(fmt.WRITER)) or await logged():
        return None
    key = fmt.commits_prefix(fmt.WRITER)
    return Damage(key, 0, f"the commit log is missing: segments exist, but no commit record "
                          f"or checkpoint names them, so their data cannot be read in order: "
                          f"key={key} offset=0")


async def open_readable(driver: Driver) -> OpenedStore:
    """Read the store's commit log as far as it is whole; never raises ``CorruptDataError``.

    A store that a run would open is loaded as a run loads it. Otherwise the log is walked
    on from the newest checkpoint that decodes (an older one if the newest is damaged)
    through the commit records after it, up to the first missing or damaged one. Segments
    are not read here: ``read_log`` reads them and reports their damage.
    """
    store = Store(driver, clock_ms=lambda: 0)
    try:
        await store.load()
        gone = await lost_commit_log(driver, store.last_seq)
        return OpenedStore(store, [] if gone is None else [gone])
    except CorruptDataError as exc:
        refused = Damage.of(exc, fmt.writer_prefix(fmt.WRITER))
    state, damage, lost, after = await _walk_log(store, driver)
    if not damage and (missing := await lost_commit_log(driver, state.last_seq)) is not None:
        damage.append(missing)
    # The store's own state is replaced by the walked one: the same fold (Store._apply) of
    # the same records, stopped at the last whole commit instead of refused.
    store._state = state
    # What the run refused that the walk did not meet: a damaged epoch record, say. A
    # segment's damage is left to read_log, which reads it and says how much it lost.
    if fmt.key_kind(refused.key) != "segment" and all(d.key != refused.key for d in damage):
        damage.append(refused)
    beyond: dict[tuple[str, str], int] = {}
    unreadable = lost - len(after)  # the missing ones
    for key in after:
        try:
            record = fmt.CommitRecord.decode(key, await driver.get(key))
        except (CorruptDataError, ObjectNotFoundError):
            unreadable += 1
            continue
        for ref in record.segments:
            beyond[(ref.kind, ref.name)] = beyond.get((ref.kind, ref.name), 0) + ref.records
    return OpenedStore(store, damage, lost, beyond, unreadable)


async def _walk_log(store: Store, driver: Driver) -> tuple[_State, list[Damage], int, list[str]]:
    """The state of the last whole commit, the damage that ends the log there, the number
    of commit records after it, and their keys."""
    writer = fmt.WRITER
    damage: list[Damage] = []
    state = _State()
    prefix = fmt.checkpoints_prefix(writer)
    numbers = sorted([n async for info in driver.list(prefix)
                      if (n := fmt.number_in_key(info.key, prefix)) is not None], reverse=True)
    for number in numbers:
        key = fmt.checkpoint_key(writer, number)
        try:
            ckpt = fmt.Checkpoint.decode(key, await driver.get(key))
            if ckpt.writer != writer or ckpt.seq != number:
                raise CorruptDataError(f"checkpoint names another position: key={key} offset=0 "
                                       f"writer={ckpt.writer} seq={ckpt.seq}")
        except ObjectNotFoundError:
            continue  # collected since it was listed
        except CorruptDataError as exc:
            damage.append(Damage.of(exc, key))
            continue
        state = _State.of_checkpoint(ckpt)
        break
    prefix = fmt.commits_prefix(writer)
    numbered = {n: info.key async for info in driver.list(prefix)
                if (n := fmt.number_in_key(info.key, prefix)) is not None and n > state.last_seq}
    seq = state.last_seq + 1
    while seq in numbered:
        key = numbered[seq]
        try:
            record = fmt.CommitRecord.decode(key, await driver.get(key))
            _apply_whole(store, state, key, record)
        except ObjectNotFoundError:
            damage.append(Damage(key, 0, f"commit record vanished while reading: key={key} offset=0"))
            break
        except CorruptDataError as exc:
            damage.append(Damage.of(exc, key))
            break
        seq += 1
    later = sorted(n for n in numbered if n > seq)  # a gap before these is damage
    if seq not in numbered and later:
        key = fmt.commit_key(writer, seq)
        damage.append(Damage(key, 0, f"commit record missing while later commits exist: "
                                     f"key={key} offset=0 later={later[0]}"))
    after = [numbered[n] for n in sorted(numbered) if n >= seq]
    # Lost: every number after the last whole commit up to the newest listed, a missing
    # one (a gap) included.
    lost = max(numbered) - state.last_seq if after else 0
    return state, damage, lost, after


def _apply_whole(store: Store, state: _State, key: str, record: fmt.CommitRecord) -> None:
    """Fold ``record`` into ``state`` (``Store._apply``: it checks the record's position,
    epoch and rewrites), or leave ``state`` as it was if the record is refused.

    ``Store._apply`` may refuse a record's rewrites after it began to change the state (a
    run then fails whole, so it need not undo): what it changes in place is put back here,
    so that the state stays that of the last whole commit. Its lists of segments are
    replaced, never changed, before the point where it may refuse.
    """
    saved = (dict(state.logs), list(state.fences), state.commits, state.reset_time_ms,
             state.last_segment, state.offsets)
    # As Store.load checks once, over the state it loaded: a record naming a segment the
    # log holds already (or one twice) would have its records salvaged twice, as data.
    # Checked before the fold, per record, so that the walk stops at the one that does.
    named = state.live_keys()
    for ref in itertools.chain(record.segments, *(rw.new for rw in record.rewrites)):
        if ref.key in named:
            raise CorruptDataError(f"commit names a segment the log holds already: key={key} "
                                   f"offset=0 segment={ref.key}")
        named.add(ref.key)
    try:
        store._apply(state, key, record)
    except CorruptDataError:
        state.logs.clear()
        state.logs.update(saved[0])
        (state.fences, state.commits, state.reset_time_ms, state.last_segment,
         state.offsets) = saved[1:]
        raise


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True, slots=True)
class Frame:
    """One good record of a segment: its raw fields, as ``append_record`` takes them, and
    its entries decoded (one, or a batch's ``count``)."""

    value: bytes
    offset: bytes | None
    time_ms: int
    count: int
    entries: list[Any]
    offsets: list[Any] | None  # one per entry; None when no entry has an offset


@dataclass(frozen=True, slots=True)
class LogPart:
    """What one segment of a log gave: its good records, and its damage (None: none).

    ``whole``: every record of the segment read, though the segment is damaged (its
    trailer, say): the log goes on past it. Otherwise the damage ends the log here.
    """

    ref: fmt.SegmentRef
    frames: list[Frame]
    damage: Damage | None
    whole: bool = True

    @property
    def entries(self) -> int:
        return sum(frame.count for frame in self.frames)


async def read_log(store: Store, kind: str, name: str, *,
                   after_seq: int = 0) -> AsyncIterator[LogPart]:
    """Yield each live segment of a log in order, with its good records, up to the first
    damage that loses records: the part holding it is the last one yielded (a damaged
    segment whose records all read, ``LogPart.whole``, does not end the log).

    ``_READ_AHEAD`` segments are fetched at once; each is checked whole as a run checks it
    and, if that fails, walked record by record up to the first record that fails its CRC
    or does not decode. ``after_seq``: only the segments of commits after that one (a
    table's deltas after its snapshot's commit, as a run reads them).
    """
    refs = [seg.ref for seg in store.segments(kind, name) if seg.seq > after_seq]
    if kind == fmt.KIND_TABLE_SNAPSHOT and refs:
        # Only the newest snapshot counts (a snapshot may span several segments of one commit).
        newest = store.segments(kind, name)[-1].seq
        refs = [seg.ref for seg in store.segments(kind, name) if seg.seq == newest]
    # Windows bounded as a run's replay reads them: a writer's segments may be hundreds
    # of MiB each.
    for window in segment_windows(refs, _READ_AHEAD):
        blobs = await gather_bounded([functools.partial(_fetch, store, ref) for ref in window],
                                     _READ_AHEAD)
        for ref, data in zip(window, blobs, strict=True):
            if isinstance(data, Damage):
                yield LogPart(ref, [], data, whole=False)
                return
            # Checking a big segment (CRCs, then every record decoded) is CPU work: in a
            # worker thread, as Store.read_segment checks one, so the event loop never stalls.
            if needs_thread(data):
                part = await anyio.to_thread.run_sync(_read_segment, ref, data)
            else:
                part = _read_segment(ref, data)
            yield part
            if not part.whole:
                return


async def _fetch(store: Store, ref: fmt.SegmentRef) -> bytes | Damage:
    """The bytes of one segment (its object, or its data in the commit record that carries
    it inline), or the damage that keeps it from being read."""
    try:
        return await store.segment_bytes(ref)
    except ObjectNotFoundError:
        if ref.home is not None:
            return Damage(ref.home, 0, f"commit record holding an inline segment is missing: "
                                       f"key={ref.home} offset=0 segment={ref.key}")
        return Damage(ref.key, 0, f"commit names a missing segment: key={ref.key} offset=0")
    except CorruptDataError as exc:  # the record that carries it inline is damaged
        return Damage.of(exc, ref.home or ref.key)


def _read_segment(ref: fmt.SegmentRef, data: bytes) -> LogPart:
    """The good records of one segment, and its damage if it has some."""
    frames: list[Frame] = []
    try:
        view = fmt.SegmentView(ref, data)
        for value, offset, time_ms, count, at in view.frames():
            frames.append(_decode(ref, value, offset, time_ms, count, at))
        return LogPart(ref, frames, None)
    except CorruptDataError as exc:
        damage = Damage.of(exc, ref.key)
    # The whole-segment check failed: keep the records before the damage, each of which
    # passes its own CRC and decodes. ``frames`` may already hold them (a damage found at
    # the end of the body); walking again from the start gives the same records.
    frames = []
    end = 0  # where the last good record ends
    try:
        for value, offset, time_ms, count, at, after in _walk_records(ref, data):
            frames.append(_decode(ref, value, offset, time_ms, count, at))
            end = after
    except CorruptDataError as exc:
        if (damage.key == ref.key and damage.offset == 0) or isinstance(exc, _LostWhole):
            # A closer position than the whole-segment check, or the plainer news that a
            # compressed segment's records are all gone.
            damage = Damage.of(exc, ref.key)
        return LogPart(ref, frames, damage, whole=False)
    # Every record passed its own CRC: the segment lost none if they fill its body (as
    # the commit sized it) and hold the count the commit names. Only its trailer (or
    # another check of the whole) failed.
    whole = (len(data) == ref.size and end == len(data) - _TRAILER_SIZE
             and sum(f.count for f in frames) == ref.records)
    return LogPart(ref, frames, damage, whole=whole)


class _LostWhole(CorruptDataError):
    """A compressed segment's body does not decompress: none of its records can be read."""


def _walk_records(ref: fmt.SegmentRef, data: bytes) -> Iterator[tuple[bytes, bytes | None, int,
                                                                      int, int, int]]:
    """The records of a segment whose whole-segment check failed, each checked on its own,
    up to the first that fails: (value, offset, time_ms, count, position, end).

    Nothing is yielded unless the header holds (magic, checksum, this segment's own key): a
    segment with another object's bytes has none of this log's records.
    """
    head = fmt._HEAD  # the segment header frame, the same in every format version
    if len(data) < head.size + fmt.U32.size:
        return
    magic, major, _minor, meta_len = head.unpack_from(data, 0)
    head_end = head.size + meta_len
    if magic != fmt.SEGMENT_MAGIC or major > fmt.FORMAT_MAJOR or head_end + 4 > len(data):
        return
    if zlib.crc32(data[:head_end]) != fmt.U32.unpack_from(data, head_end)[0]:
        return
    try:
        meta = orjson.loads(data[head.size:head_end])
    except orjson.JSONDecodeError:
        return
    if not isinstance(meta, dict) or (meta.get("key"), meta.get("kind"), meta.get("name")) != (
            ref.key, ref.kind, ref.name):
        return
    pos = head_end + 4
    # The body ends where the trailer starts, if the object has its full size; a truncated
    # object ends its body early, and the record it cuts fails to fit.
    end = len(data) - _TRAILER_SIZE if len(data) == ref.size else len(data)
    codec = meta.get("codec") if major >= fmt.CODEC_SINCE else None
    if codec is None:
        yield from _walk_framed(ref, data, pos, end, major)
        return
    # A compressed body has no record boundaries to resync on: either the whole frame
    # decompresses (zstd's own checksum holding), and its records are walked as a raw
    # body's, or none of its records can be located and the segment is lost whole.
    try:
        raw = decompress_body(ref.key, pos, str(codec), data[pos:end])
    except CorruptDataError as exc:
        raise _LostWhole(f"compressed segment body is damaged, so none of its records can "
                         f"be located: the segment is lost whole: key={ref.key} offset={pos} "
                         f"cause={exc}") from None
    for value, offset, time_ms, count, at, after in _walk_framed(ref, raw, 0, len(raw), major):
        # Positions are in the decompressed records; the last record ends the stored body.
        yield value, offset, time_ms, count, at, (end if after == len(raw) else pos)


def _walk_framed(ref: fmt.SegmentRef, data: bytes, pos: int, end: int, major: int
                 ) -> Iterator[tuple[bytes, bytes | None, int, int, int, int]]:
    """``_walk_records`` over framed records from ``pos`` to ``end`` of ``data``."""
    record_head = fmt.RECORD_HEAD_V1 if major == 1 else fmt.RECORD_HEAD
    while pos + record_head.size + 4 <= end:
        fields = record_head.unpack_from(data, pos)
        if major == 1:
            vlen, olen, time_ms = fields
            count = 1
        else:
            vlen, olen, count, time_ms = fields
        vstart = pos + record_head.size
        oend = vstart + vlen + olen
        if oend + 4 > end:
            raise CorruptDataError(f"segment record length is damaged: key={ref.key} offset={pos}")
        crc = zlib.crc32(data[pos:oend])
        if crc != fmt.U32.unpack_from(data, oend)[0]:
            raise CorruptDataError(f"segment record checksum mismatch: key={ref.key} offset={pos}")
        if count < 1:
            raise CorruptDataError(f"segment record count is damaged: key={ref.key} offset={pos}")
        vend = vstart + vlen
        yield data[vstart:vend], (data[vend:oend] if olen else None), time_ms, count, pos, oend + 4
        pos = oend + 4


def _decode(ref: fmt.SegmentRef, value: bytes, offset: bytes | None, time_ms: int, count: int,
            at: int) -> Frame:
    """Decode one record's entries, checking that they are what its log holds."""
    def bad() -> CorruptDataError:
        return CorruptDataError(f"segment record does not decode as a {ref.kind} record: "
                                f"key={ref.key} offset={at} count={count}")

    try:
        item = orjson.loads(value)
        offs = None if offset is None else orjson.loads(offset)
    except orjson.JSONDecodeError:
        raise bad() from None
    if ref.kind == fmt.KIND_EVENTS:
        if count == 1:
            return Frame(value, offset, time_ms, 1, [item], None if offset is None else [offs])
        if not isinstance(item, list) or len(item) != count or not (
                offs is None or (isinstance(offs, list) and len(offs) == count)):
            raise bad()
        return Frame(value, offset, time_ms, count, item, offs)
    # Tables and the cache: one [key, value] (or a table's [key] delete) per record.
    if count != 1 or not isinstance(item, list) or not 1 <= len(item) <= 2 or not isinstance(
            item[0], str) or (len(item) == 1 and ref.kind != fmt.KIND_TABLE):
        raise bad()
    return Frame(value, offset, time_ms, 1, [item], None)
