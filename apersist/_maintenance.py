"""Maintenance of a writing run's store: merging, retention, the cache's versions, checkpoints.

A store's cost to open and replay must follow its live state, never the number of commits
that produced it. The writer keeps it so on its own, in a task of the run:

- **Merging.** Runs of ``FANOUT`` consecutive small segments of one event log (or of the
  cache's log) of the same size *tier* are rewritten into one segment holding the same
  records, byte for byte (same order, ``time_ms`` and offsets), and swapped in by a commit
  (a ``Rewrite``). Tiers grow by ``FANOUT``, as in a size-tiered LSM tree, so an event is
  rewritten about log16(segment size / event size) times, and a log holds at most
  ``FANOUT - 1`` segments per tier.
- **Retention.** A stream's ``Retention`` drops its oldest events: whole segments, and
  the first records of the segment the bound falls in (rewritten with the rest).
- **The cache.** ``compact()`` rewrites the cache's log with one entry per key, and only
  the entries of the versions in use (see ``_compact_cache``).
- **Checkpoints.** Every ``CHECKPOINT_EVERY`` commits the log is folded into a checkpoint,
  so that opening reads one checkpoint and fewer than that many commit records.

Rewrites ride on the next commit that writes anything (``Scheduler.add_rewrite``): an idle
run makes no request for maintenance, and a rewrite made stale by a reset is dropped. One
step runs at a time; a step holds at most one merged segment's records (``max_segment_bytes``)
and yields to the loop between segments. Cancelled with the run, it leaves nothing half
done that a reader could see: a rewrite lands whole with its commit or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import anyio.lowlevel
import orjson

from . import _format as fmt
from ._cache import UdfCache, _split_entry
from ._config import Retention
from ._errors import PersistenceError
from ._pacing import Pacer
from ._scheduler import Scheduler
from ._store import LoggedSegment, Store

__all__ = ["CHECKPOINT_EVERY", "FANOUT", "Maintainer"]

logger = logging.getLogger("apersist")

#: Segments merged into one, and the size ratio between tiers.
FANOUT = 16
#: Segments under this size are tier 0; tier t holds sizes below ``TIER_BASE * FANOUT**t``.
TIER_BASE = 4 << 10
#: Commits between two checkpoints: opening reads fewer commit records than this.
CHECKPOINT_EVERY = 128
#: Commits between two looks for segments to merge.
MERGE_LOOK_EVERY = 8
#: Merges one log gets in one step (one commit): a step's reads, writes and the work of
#: applying its commit stay bounded; a long backlog (a store written before merging
#: existed) is worked off over several steps.
MERGES_PER_STEP = 64
#: The logs whose segments are merged: tables are folded into snapshots instead.
_MERGED_KINDS = (fmt.KIND_EVENTS, fmt.KIND_CACHE)

Bodies = list[tuple[bytearray, int]]


def tier(size: int) -> int:
    """The size tier of a segment of ``size`` bytes."""
    level, limit = 0, TIER_BASE
    while size >= limit:
        level += 1
        limit *= FANOUT
    return level


def plan_merges(log: Sequence[LoggedSegment], max_bytes: int,
                limit: int = 1 << 30) -> list[list[fmt.SegmentRef]]:
    """Groups of ``FANOUT`` consecutive segments of one tier, each group at most
    ``max_bytes`` in all, at most ``limit`` of them from the start of the log: what
    merging rewrites, one segment per group."""
    groups: list[list[fmt.SegmentRef]] = []
    start = 0
    while start < len(log) and len(groups) < limit:
        level = tier(log[start].ref.size)
        end = start + 1
        while end < len(log) and tier(log[end].ref.size) == level:
            end += 1
        for first in range(start, end - FANOUT + 1, FANOUT):
            group = [seg.ref for seg in log[first:first + FANOUT]]
            if sum(ref.size for ref in group) <= max_bytes and len(groups) < limit:
                groups.append(group)
        start = end
    return groups


async def _reframe(body: bytearray, view: fmt.SegmentView, pacer: Pacer, skip: int = 0) -> int:
    """Append ``view``'s records to ``body`` without their first ``skip`` entries; return
    how many entries were appended. A batch cut by ``skip`` keeps its tail as a batch.
    Yields to the loop as ``pacer`` says (a record at a time when records are re-framed)."""
    if skip == 0 and view.major >= 2:
        body += view.body()  # the same framing: the records as they are
        return int(view.count)
    added = 0
    for value, offset, time_ms, count, _at in view.frames():
        if pacer.due():
            await pacer.pause()
        if skip >= count:
            skip -= count
            continue
        if skip:
            values = orjson.loads(value)[skip:]
            offsets = None if offset is None else orjson.loads(offset)[skip:]
            joined, joined_offsets = fmt.join_batch(
                [orjson.dumps(v) for v in values],
                None if offsets is None else [b"" if o is None else orjson.dumps(o)
                                              for o in offsets])
            count -= skip
            skip = 0
            fmt.append_record(body, joined, joined_offsets, time_ms, count)
        else:
            fmt.append_record(body, value, offset or b"", time_ms, count)
        added += count
    return added


class Maintainer:
    """A writing run's maintenance: one step at a time, in the background or on demand."""

    def __init__(self, store: Store, scheduler: Scheduler, *, max_segment_bytes: int,
                 retention_of: Callable[[str], Retention], clock_ms: Callable[[], int],
                 cache: UdfCache | None) -> None:
        self._store = store
        self._scheduler = scheduler
        self._max_bytes = max_segment_bytes
        self._retention_of = retention_of
        self._clock_ms = clock_ms
        self._cache = cache
        self._lock = anyio.Lock()
        self._looked_at = store.last_seq

    async def run(self) -> None:
        """The background loop: after commits, merge what is due, and checkpoint."""
        scheduler, store = self._scheduler, self._store
        while not scheduler.stopped:
            await scheduler.commit_done().wait()
            if scheduler.stopped or scheduler.rewrites_busy:
                continue
            due_checkpoint = store.last_seq - store.checkpoint_seq >= CHECKPOINT_EVERY
            if due_checkpoint or store.last_seq - self._looked_at >= MERGE_LOOK_EVERY:
                try:
                    async with self._lock:
                        await self._step(retention=due_checkpoint, cache=False,
                                         checkpoint=due_checkpoint)
                except Exception as exc:
                    if scheduler.stopped:
                        return  # the run ended under the step: nothing more to commit
                    # Background work must not end the user's run: what it could not do
                    # is only later; damage it met is reported again by whoever reads it.
                    if isinstance(exc, PersistenceError):
                        logger.error("background maintenance stopped: %s", exc)
                    else:
                        logger.exception("background maintenance stopped unexpectedly")
                    return

    async def at_end(self) -> None:
        """The run's commits are over: checkpoint if one is due, so that the next open
        reads fewer than ``CHECKPOINT_EVERY`` commit records. A failure is only logged:
        everything the run recorded is committed already."""
        store = self._store
        if store.last_seq - store.checkpoint_seq < CHECKPOINT_EVERY:
            return
        async with self._lock:
            try:
                await store.write_checkpoint()
            except PersistenceError as exc:
                logger.warning("checkpoint at the end of the run failed: %s", exc)

    async def compact(self) -> None:
        """All of it now (``run.compact()``): a commit of what is recorded (with the table
        snapshots the caller asked for); then retention, merges and the cache in a second
        one; then a checkpoint."""
        async with self._lock:
            # First what is recorded (and the table snapshots asked for), so that the
            # plans see every event.
            self._scheduler.request_commit()
            await self._scheduler.commit()
            planned = await self._step(retention=True, cache=True, checkpoint=False)
            while planned:  # a backlog of merges bigger than one step's share
                self._scheduler.request_commit()
                await self._scheduler.commit()
                planned = await self._step(retention=False, cache=False, checkpoint=False)
            await self._store.write_checkpoint()

    async def _step(self, *, retention: bool, cache: bool, checkpoint: bool) -> int:
        """Plan and attach what is due; with ``checkpoint``, commit it and checkpoint.
        Returns the number of rewrites attached."""
        store, scheduler = self._store, self._scheduler
        self._looked_at = store.last_seq
        planned = 0
        # Segments an earlier rewrite of this step replaces: merges plan around them.
        taken: set[str] = set()
        if retention:
            for name in store.log_names(fmt.KIND_EVENTS):
                planned += await self._retain(name, self._retention_of(name), taken)
        if cache:
            planned += await self._compact_cache(taken)
        for kind in _MERGED_KINDS:
            for name in store.log_names(kind):
                planned += await self._merge(kind, name, taken)
        if planned:
            logger.debug("maintenance: %d rewrite(s) for the next commit", planned)
        if planned and checkpoint:
            scheduler.request_commit()
            await scheduler.commit()
        if checkpoint:
            await store.write_checkpoint()
        return planned

    async def _merge(self, kind: str, name: str, taken: set[str]) -> int:
        """Attach a rewrite per group of segments due for merging; return how many.

        Segments in ``taken`` (a retention's run, at the start of the log) are left out:
        what follows them stays consecutive."""
        log = [seg for seg in self._store.segments(kind, name) if seg.ref.key not in taken]
        if len(log) < FANOUT:
            return 0
        groups = plan_merges(log, self._max_bytes, MERGES_PER_STEP)
        for group in groups:
            body = bytearray()
            count = 0
            pacer = Pacer()
            async for view in self._store.read_segments(group):
                count += await _reframe(body, view, pacer)
                await anyio.lowlevel.checkpoint()
            self._scheduler.add_rewrite(kind, name, tuple(ref.key for ref in group),
                                        [(body, count)])
        return len(groups)

    async def _retain(self, name: str, retention: Retention, taken: set[str]) -> int:
        """Attach the rewrite that drops the events ``retention`` does not keep (0 or 1)."""
        if retention.keeps_everything:
            return 0
        log = [seg.ref for seg in self._store.segments(fmt.KIND_EVENTS, name)]
        total = sum(ref.records for ref in log)
        drop = 0 if retention.max_events is None else max(0, total - retention.max_events)
        if retention.max_age_ms is not None and drop < total:
            drop += await self._count_old(log, drop, self._clock_ms() - retention.max_age_ms)
        if drop == 0:
            return 0
        # Whole segments go; the one the bound falls in is rewritten with its tail.
        whole, before = 0, 0
        while whole < len(log) and before + log[whole].records <= drop:
            before += log[whole].records
            whole += 1
        bodies: Bodies = []
        old = log[:whole]
        if before < drop:
            boundary = log[whole]
            old.append(boundary)
            body = bytearray()
            count = 0
            async for view in self._store.read_segments([boundary]):
                count = await _reframe(body, view, Pacer(), skip=drop - before)
            bodies.append((body, count))
        taken.update(ref.key for ref in old)
        self._scheduler.add_rewrite(fmt.KIND_EVENTS, name, tuple(ref.key for ref in old), bodies)
        return 1

    async def _count_old(self, log: list[fmt.SegmentRef], skip: int, cutoff_ms: int) -> int:
        """How many events after the first ``skip`` are older than ``cutoff_ms``, up to the
        first younger one: read segment by segment, from the one event ``skip`` is in."""
        before, index = 0, 0
        while index < len(log) and before + log[index].records <= skip:
            before += log[index].records
            index += 1
        old = 0
        position = before
        pacer = Pacer()
        async for view in self._store.read_segments(log[index:]):
            for _value, _offset, time_ms, count, _at in view.frames():
                if pacer.due():
                    await pacer.pause()
                if position + count <= skip:
                    position += count
                    continue
                if time_ms >= cutoff_ms:
                    return old
                # A batch shares one time_ms: past the skip, all of it is old.
                old += position + count - max(position, skip)
                position += count
            await anyio.lowlevel.checkpoint()
        return old

    async def _compact_cache(self, taken: set[str]) -> int:
        """Attach the rewrite of the cache's log to one entry per key, of the versions in
        use (0 or 1): of a function called in this run, the version it was called with; of
        any other, its highest version."""
        log = [seg.ref for seg in self._store.segments(fmt.KIND_CACHE, fmt.CACHE_LOG)]
        if not log:
            return 0
        in_use = {} if self._cache is None else dict(self._cache.versions)
        newest: dict[str, int] = {}
        entries: dict[str, tuple[bytes, tuple[str, int] | None]] = {}
        stored = 0
        pacer = Pacer()
        async for view in self._store.read_segments(log):
            for value, _offset, _time_ms in view.records():
                if pacer.due():
                    await pacer.pause()
                key, _result = _split_entry(value)
                function = _function_version(key)
                if function is not None and function[0] not in in_use:
                    newest[function[0]] = max(newest.get(function[0], function[1]), function[1])
                entries.pop(key, None)  # the newest entry, in the order it was written
                entries[key] = (bytes(value), function)
                stored += 1
        newest.update(in_use)
        bodies: Bodies = []
        body, count, kept = bytearray(), 0, 0
        for value, function in entries.values():
            if pacer.due():
                await pacer.pause()
            if function is not None and newest.get(function[0]) != function[1]:
                continue
            if count and len(body) + len(value) > self._max_bytes:
                bodies.append((body, count))
                body, count = bytearray(), 0
            fmt.append_record(body, value, b"", 0)
            count += 1
            kept += 1
        if count:
            bodies.append((body, count))
        if kept == stored and len(log) == 1:
            return 0  # one segment, nothing to drop: a rewrite would change nothing
        taken.update(ref.key for ref in log)
        self._scheduler.add_rewrite(fmt.KIND_CACHE, fmt.CACHE_LOG, tuple(r.key for r in log),
                                    bodies)
        return 1


def _function_version(entry_key: str) -> tuple[str, int] | None:
    """``(name, version)`` of an entry key ``<name>@<version>:<hex>``; None if malformed."""
    head = entry_key.rpartition(":")[0]
    name, at, version = head.rpartition("@")
    return (name, int(version)) if at and version.isdigit() else None
