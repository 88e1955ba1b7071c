"""``apersist salvage``: copy everything a damaged store can still give into a new store.

What is copied (read through ``_recover``):

- the commit log up to its last whole commit: the state of that commit is the one copied;
- each stream's events up to its first damaged record, byte for byte (values, offsets,
  ``time_ms``, batches as they were);
- each table's newest snapshot up to its first damaged record, then its deltas up to
  theirs, folded into one snapshot;
- the ``@cached`` entries up to the first damaged record;
- every stream's offset of the last whole commit, except for a stream that lost events:
  its offset is set back to the last kept event's (none if no kept event has one), so
  that its source delivers the lost events again instead of resuming past them.

The new store is written by a writer of its own (epoch 1), one commit per log, the
offsets in the last commit. It must be empty. The report says exactly what was lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import _format as fmt
from ._compression import DEFAULT as DEFAULT_COMPRESSION
from ._compression import compress_off_loop
from ._drivers import Driver
from ._dump import table_records, table_rows
from ._progress import progress_bar
from ._recover import Damage, LogPart, open_readable, read_log
from ._store import SegmentBlob, Store

__all__ = ["DestinationNotEmptyError", "LogReport", "SalvageReport", "salvage"]

# A new segment is cut at this size, as a writer cuts them (Config.max_segment_bytes).
_SEGMENT_BYTES = 8 << 20
# A commit of the new store holds at most this many bytes of segments, so memory stays
# bounded however big a stream is (a table's snapshot goes in one commit whatever its size:
# only the segments of its newest snapshot commit count).
_COMMIT_BYTES = 64 << 20


class DestinationNotEmptyError(ValueError):
    """``salvage`` writes only into an empty root."""


@dataclass(slots=True)
class LogReport:
    """One log's salvage: records the last whole commit names, those kept, the damage."""

    written: int = 0
    kept: int = 0
    damage: list[Damage] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.written - self.kept

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "kept": self.kept, "lost": self.lost,
                "damage": [d.to_json() for d in self.damage], **self.extra}


@dataclass(slots=True)
class SalvageReport:
    """What ``salvage`` copied and what it lost."""

    source_seq: int  # the last whole commit of the source, the state copied
    lost_commits: int  # commits after it, not copied (a missing record included)
    log_damage: list[Damage]
    # What those commits added (records of new segments by kind and log name), of those
    # whose record decodes; and how many are missing or do not decode (what they added is
    # unknown).
    beyond: dict[tuple[str, str], int] = field(default_factory=dict)
    unreadable_commits: int = 0
    streams: dict[str, LogReport] = field(default_factory=dict)
    tables: dict[str, LogReport] = field(default_factory=dict)
    cache: LogReport = field(default_factory=LogReport)
    dest_seq: int = 0

    @property
    def damage(self) -> list[Damage]:
        """Every damage met, the log's first."""
        logs = [*self.streams.values(), *self.tables.values(), self.cache]
        return [*self.log_damage, *(d for log in logs for d in log.damage)]

    @property
    def lost(self) -> bool:
        """Whether anything was lost: damage met, or records or commits not copied."""
        return bool(self.damage) or self.lost_commits > 0 or any(
            log.lost for log in [*self.streams.values(), *self.tables.values(), self.cache])

    def to_json(self) -> dict[str, Any]:
        later: dict[str, dict[str, int]] = {"streams": {}, "tables": {}, "cache": {}}
        for (kind, name), records in sorted(self.beyond.items()):
            group = {fmt.KIND_EVENTS: "streams", fmt.KIND_CACHE: "cache"}.get(kind, "tables")
            later[group][name] = later[group].get(name, 0) + records
        return {"source_seq": self.source_seq, "lost_commits": self.lost_commits,
                "lost_in_later_commits": {**later,
                                          "unreadable_commits": self.unreadable_commits},
                "dest_seq": self.dest_seq, "complete": not self.lost,
                "log_damage": [d.to_json() for d in self.log_damage],
                "streams": {n: r.to_json() for n, r in self.streams.items()},
                "tables": {n: r.to_json() for n, r in self.tables.items()},
                "cache": self.cache.to_json()}


class _Writer:
    """Writes the new store: segments cut at ``_SEGMENT_BYTES``, committed in batches."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._blobs: list[SegmentBlob] = []
        self._bytes = 0
        self._body = bytearray()  # the segment being framed
        self._count = 0

    async def add_log(self, kind: str, name: str,
                      records: list[tuple[bytes, bytes, int, int]]) -> None:
        """Frame ``records`` (value, offset or b"", time_ms, count) as a whole log."""
        for record in records:
            await self.append(kind, name, *record)
        await self.end_log(kind, name)

    async def append(self, kind: str, name: str, value: bytes, offset: bytes, time_ms: int,
                     count: int) -> None:
        """Frame one record onto the log being written; a full segment is cut off."""
        fmt.append_record(self._body, value, offset, time_ms, count)
        self._count += count
        if len(self._body) >= _SEGMENT_BYTES:
            await self._add(kind, name)

    async def end_log(self, kind: str, name: str) -> None:
        """Cut the last segment of the log being written."""
        if self._count or kind == fmt.KIND_TABLE_SNAPSHOT:  # an empty table: an empty snapshot
            await self._add(kind, name)

    async def _add(self, kind: str, name: str) -> None:
        body, count, self._body, self._count = self._body, self._count, bytearray(), 0
        key = self._store.new_segment_key()
        # The salvaged store is written as a run writes: compressed with the defaults.
        stored, codec = await compress_off_loop(body, DEFAULT_COMPRESSION)
        data = fmt.encode_segment(fmt.SegmentMeta(key, kind, name),
                                  body if stored is None else stored, count, codec)
        self._blobs.append(SegmentBlob(fmt.SegmentRef(key, kind, name, count, len(data)), data))
        self._bytes += len(data)
        if self._bytes >= _COMMIT_BYTES and kind != fmt.KIND_TABLE_SNAPSHOT:
            await self.commit({})

    async def commit(self, offsets: dict[str, bytes]) -> int:
        """Upload the segments gathered so far and commit them with ``offsets`` (the whole
        map after the commit)."""
        blobs, self._blobs, self._bytes = self._blobs, [], 0
        if not blobs and offsets == dict(self._store.offsets):
            return self._store.last_seq  # nothing to commit
        return await self._store.commit(blobs, offsets, reset=False)


async def salvage(source: Driver, dest: Driver) -> SalvageReport:
    """Copy what ``source`` can still give into the empty root of ``dest``; report the loss.

    Raises ``DestinationNotEmptyError`` if ``dest`` holds any object, and what the drivers
    raise (``BackendError``). Damage of the source is reported, never raised.
    """
    async for info in dest.list(""):
        raise DestinationNotEmptyError(f"the destination of a salvage must be empty: "
                                       f"key={info.key}")
    opened = await open_readable(source)
    store = opened.store
    report = SalvageReport(store.last_seq, opened.lost_commits, list(opened.damage),
                           dict(opened.beyond), opened.unreadable_commits)
    target = Store(dest, clock_ms=lambda: time.time_ns() // 1_000_000, label="apersist-salvage")
    await target.load()
    await target.acquire_writer()
    writer = _Writer(target)
    offsets = dict(store.offsets)
    # The records read: every event and cache entry, and of a table only what its state
    # is read from (its older snapshots and deltas are not).
    total = sum(seg.ref.records for kind in (fmt.KIND_EVENTS, fmt.KIND_CACHE)
                for name in store.log_names(kind) for seg in store.segments(kind, name)) + sum(
        sum(table_records(store, name)) for name in opened.table_names())
    with progress_bar("salvage", total=total, unit="record") as bar:
        for name in opened.stream_names():
            log = report.streams[name] = LogReport(
                sum(seg.ref.records for seg in store.segments(fmt.KIND_EVENTS, name)))
            last_offset = None
            async for part in read_log(store, fmt.KIND_EVENTS, name):
                for frame in part.frames:
                    await writer.append(fmt.KIND_EVENTS, name, frame.value, frame.offset or b"",
                                        frame.time_ms, frame.count)
                    for off in frame.offsets or ():
                        if off is not None:
                            last_offset = off
                _take(log, part, bar.update)
            await writer.end_log(fmt.KIND_EVENTS, name)
            committed = offsets.get(name)
            log.extra["committed_offset"] = None if committed is None else orjson.loads(committed)
            if log.lost:
                # Resuming past lost events would never deliver them again: resume after
                # the last kept one, or from the start.
                if last_offset is None:
                    offsets.pop(name, None)
                else:
                    offsets[name] = orjson.dumps(last_offset)
            log.extra["offset"] = None if name not in offsets else orjson.loads(offsets[name])
        for name in opened.table_names():
            rows, damage, counts = await table_rows(opened, name, bar.update)
            log = report.tables[name] = LogReport(
                counts["snapshot_records"] + counts["delta_records"],
                counts["snapshot_kept"] + counts["deltas_kept"], damage,
                {**counts, "keys": len(rows)})
            await writer.commit({})  # a table's snapshot goes in a commit of its own
            await writer.add_log(fmt.KIND_TABLE_SNAPSHOT, name,
                                 [(record, b"", 0, 1) for record in rows.values()])
            await writer.commit({})
        cache = report.cache
        cache.written = sum(s.ref.records for s in store.segments(fmt.KIND_CACHE, fmt.CACHE_LOG))
        async for part in read_log(store, fmt.KIND_CACHE, fmt.CACHE_LOG):
            for f in part.frames:
                await writer.append(fmt.KIND_CACHE, fmt.CACHE_LOG, f.value, f.offset or b"",
                                    f.time_ms, 1)
            _take(cache, part, bar.update)
        await writer.end_log(fmt.KIND_CACHE, fmt.CACHE_LOG)
        report.dest_seq = await writer.commit(offsets)
    return report


def _take(log: LogReport, part: LogPart, advance: Any) -> None:
    log.kept += part.entries
    advance(part.ref.records)
    if part.damage is not None:
        log.damage.append(part.damage)
