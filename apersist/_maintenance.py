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
from ._cache import UdfCache, cache_entries
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
#: Rewrites one step attaches in all (and so one commit carries), whatever the number of
#: logs: a step's reads, writes, memory and the work of its commit stay bounded. A step
#: also stops once its new segments hold ``max_segment_bytes``. A longer backlog (many
#: streams, or a store written before merging existed) is worked off over several steps.
REWRITES_PER_STEP = 64
#: Commits between a failed background step and the next try (doubling up to the last).
RETRY_AFTER = (8, 4096)
#: The logs whose segments are merged: event logs, a table's deltas since its snapshot
#: (a table updated one key per commit would otherwise keep a segment per commit until
#: it folds), and the cache.
_MERGED_KINDS = (fmt.KIND_EVENTS, fmt.KIND_TABLE, fmt.KIND_CACHE)


class _Budget:
    """What one step may still attach: rewrites, and bytes of new segments."""

    __slots__ = ("bytes", "rewrites")

    def __init__(self, max_bytes: int) -> None:
        self.rewrites = REWRITES_PER_STEP
        self.bytes = max_bytes

    @property
    def spent(self) -> bool:
        return self.rewrites <= 0 or self.bytes <= 0

    def take(self, bodies: Bodies) -> None:
        self.rewrites -= 1
        self.bytes -= sum(len(body) for body, _count in bodies)

Bodies = list[tuple[bytearray, int]]


def tier(size: int) -> int:
    """The size tier of a segment of ``size`` bytes."""
    level, limit = 0, TIER_BASE
    while size >= limit:
        level += 1
        limit *= FANOUT
    return level


def plan_merges(log: Sequence[LoggedSegment], max_bytes: int,
                limit: int = 1 << 30, skip: frozenset[str] | set[str] = frozenset(),
                ) -> list[list[fmt.SegmentRef]]:
    """Groups of ``FANOUT`` consecutive segments of one tier, each group at most
    ``max_bytes`` in all, at most ``limit`` of them from the start of the log: what
    merging rewrites, one segment per group. A group holding a key of ``skip`` is left
    out (see ``Maintainer._merge``)."""
    groups: list[list[fmt.SegmentRef]] = []
    start = 0
    while start < len(log) and len(groups) < limit:
        level = tier(log[start].ref.size)
        end = start + 1
        while end < len(log) and tier(log[end].ref.size) == level:
            end += 1
        for first in range(start, end - FANOUT + 1, FANOUT):
            group = [seg.ref for seg in log[first:first + FANOUT]]
            if (sum(ref.size for ref in group) <= max_bytes and len(groups) < limit
                    and not any(ref.key in skip for ref in group)):
                groups.append(group)
        start = end
    return groups


async def _reframe(body: bytearray, view: fmt.SegmentView, pacer: Pacer, skip: int = 0,
                   cutoff_ms: int | None = None) -> int:
    """Append ``view``'s records to ``body`` without their first ``skip`` entries, nor
    (with ``cutoff_ms``) the records older than it; return how many entries were
    appended. A batch cut by ``skip`` keeps its tail as a batch. Yields to the loop as
    ``pacer`` says (a record at a time when records are re-framed)."""
    if skip == 0 and cutoff_ms is None and view.major >= 2:
        body += view.body()  # the same framing: the records as they are
        return int(view.count)
    added = 0
    for value, offset, time_ms, count, _at in view.frames():
        if pacer.due():
            await pacer.pause()
        if skip >= count:
            skip -= count
            continue
        if cutoff_ms is not None and time_ms < cutoff_ms:
            skip = 0
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
        self._backlog = False  # the last step stopped at its budget: more is due
        # Segments a compact() found to hold no event older than the age bound (_drop_old).
        self._young: set[str] = set()
        # Segments of a group that merging would not shrink: sizes are planned on stored
        # (compressed) bytes, but a merged body is bounded by ``max_segment_bytes`` of raw
        # records, so a group of well-compressed segments may not merge into fewer.
        self._unmergeable: set[str] = set()

    async def run(self) -> None:
        """The background loop: after commits, merge what is due, and checkpoint."""
        scheduler, store = self._scheduler, self._store
        retry_after, paused_until = RETRY_AFTER[0], 0
        while not scheduler.stopped:
            await scheduler.commit_done().wait()
            if scheduler.stopped or scheduler.rewrites_busy or store.last_seq < paused_until:
                continue
            due_checkpoint = store.last_seq - store.checkpoint_seq >= CHECKPOINT_EVERY
            if (due_checkpoint or self._backlog
                    or store.last_seq - self._looked_at >= MERGE_LOOK_EVERY):
                try:
                    async with self._lock:
                        await self._step(retention=due_checkpoint, cache=False,
                                         checkpoint=due_checkpoint)
                    retry_after = RETRY_AFTER[0]
                except Exception as exc:
                    if scheduler.stopped:
                        return  # the run ended under the step: nothing more to commit
                    # Background work must not end the user's run, nor stop for good over
                    # one failed request: it tries again some commits later. Damage it met
                    # is reported again by whoever reads it.
                    paused_until = store.last_seq + retry_after
                    if isinstance(exc, PersistenceError):
                        logger.error("background maintenance failed; it tries again after "
                                     "%d commits: %s", retry_after, exc)
                    else:
                        logger.exception("background maintenance failed unexpectedly; it tries "
                                         "again after %d commits", retry_after)
                    retry_after = min(2 * retry_after, RETRY_AFTER[1])

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
            self._young.clear()
            # First what is recorded (and the table snapshots asked for), so that the
            # plans see every event.
            self._scheduler.request_commit()
            await self._scheduler.commit()
            planned = await self._step(retention=True, cache=True, checkpoint=False, exact=True)
            while planned:  # more than one step's share: one more commit, one more step
                self._scheduler.request_commit()
                await self._scheduler.commit()
                planned = await self._step(retention=True, cache=False, checkpoint=False,
                                           exact=True)
            self._young.clear()
            await self._store.write_checkpoint()

    async def _step(self, *, retention: bool, cache: bool, checkpoint: bool,
                    exact: bool = False) -> int:
        """Plan and attach what is due, within one step's ``_Budget``; with ``checkpoint``,
        commit it and checkpoint. ``exact``: retention by age drops every event older than
        the bound, not only those before the first younger one (which costs reading every
        segment of the stream). Returns the number of rewrites attached."""
        store, scheduler = self._store, self._scheduler
        self._looked_at = store.last_seq
        budget = _Budget(self._max_bytes)
        planned = 0
        # Segments an earlier rewrite of this step replaces: later ones plan around them.
        taken: set[str] = set()
        if retention:
            for name in store.log_names(fmt.KIND_EVENTS):
                if budget.spent:
                    break
                planned += await self._retain(name, self._retention_of(name), taken, budget,
                                              exact=exact)
        if cache and not budget.spent:
            planned += await self._compact_cache(taken, budget)
        for kind in _MERGED_KINDS:
            for name in store.log_names(kind):
                if budget.spent:
                    break
                planned += await self._merge(kind, name, taken, budget)
        self._backlog = budget.spent
        if planned:
            logger.debug("maintenance: %d rewrite(s) for the next commit", planned)
        if planned and checkpoint:
            scheduler.request_commit()
            await scheduler.commit()
        if checkpoint:
            await store.write_checkpoint()
        return planned

    async def _merge(self, kind: str, name: str, taken: set[str], budget: _Budget) -> int:
        """Attach a rewrite per group of segments due for merging, within ``budget``;
        return how many.

        Segments in ``taken`` (rewritten by retention in this step) are left out: runs of
        the others stay consecutive, and no two rewrites of a commit share a segment."""
        log = [seg for seg in self._store.segments(kind, name) if seg.ref.key not in taken]
        if len(log) < FANOUT:
            return 0
        planned = 0
        for group in plan_merges(log, self._max_bytes, budget.rewrites, self._unmergeable):
            if budget.spent:
                break
            bodies = await self._merged_bodies(group)
            if len(bodies) > len(group) // 2:
                # Not worth a rewrite (it would be planned again and again): the segments
                # hold nearly a merged segment's raw records each already.
                self._unmergeable.update(ref.key for ref in group)
                logger.debug("merge left out: %d segments would merge into %d: kind=%s name=%s",
                             len(group), len(bodies), kind, name)
                continue
            budget.take(bodies)
            taken.update(ref.key for ref in group)
            self._scheduler.add_rewrite(kind, name, tuple(ref.key for ref in group), bodies)
            planned += 1
        return planned

    async def _merged_bodies(self, group: list[fmt.SegmentRef]) -> Bodies:
        """The records of ``group``, re-framed into bodies of at most ``max_segment_bytes``
        of raw records each (or one segment's, if bigger): the stored sizes the merge was
        planned on may be many times smaller than the records they hold, and a reader must
        never be handed a body beyond what a writer cuts (``_compression.MAX_BODY_BYTES``)."""
        bodies: Bodies = []
        body, count = bytearray(), 0
        pacer = Pacer()
        async for view in self._store.read_segments(group):
            if body and len(body) + view.raw_bytes > self._max_bytes:
                bodies.append((body, count))
                body, count = bytearray(), 0
            count += await _reframe(body, view, pacer)
            del view  # its records are in ``body`` now
            await anyio.lowlevel.checkpoint()
        bodies.append((body, count))
        return bodies

    async def _retain(self, name: str, retention: Retention, taken: set[str], budget: _Budget,
                      *, exact: bool) -> int:
        """Attach the rewrites that drop the events ``retention`` does not keep: the first
        ones (whole segments, and the head of the segment the bound falls in), and with
        ``exact`` every later event older than ``max_age_ms`` too (a clock set back put it
        after a younger one). Returns how many."""
        if retention.keeps_everything:
            return 0
        cutoff = (None if retention.max_age_ms is None
                  else self._clock_ms() - retention.max_age_ms)
        planned = await self._retain_prefix(name, retention, taken, budget, cutoff,
                                            filter_boundary=exact)
        if exact and cutoff is not None:
            planned += await self._drop_old(name, cutoff, taken, budget)
        return planned

    async def _retain_prefix(self, name: str, retention: Retention, taken: set[str],
                             budget: _Budget, cutoff_ms: int | None, *,
                             filter_boundary: bool) -> int:
        """The rewrite of the first events ``retention`` does not keep (0 or 1): those not
        among the last ``max_events``, then those older than ``cutoff_ms`` up to the first
        younger one. With ``filter_boundary`` the segment the bound falls in also loses its
        later records older than ``cutoff_ms``."""
        log = [seg.ref for seg in self._store.segments(fmt.KIND_EVENTS, name)]
        total = sum(ref.records for ref in log)
        drop = 0 if retention.max_events is None else max(0, total - retention.max_events)
        if cutoff_ms is not None and drop < total:
            drop += await self._count_old(log, drop, cutoff_ms)
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
                count = await _reframe(body, view, Pacer(), skip=drop - before,
                                       cutoff_ms=cutoff_ms if filter_boundary else None)
            bodies.append((body, count))
        taken.update(ref.key for ref in old)
        budget.take(bodies)
        self._scheduler.add_rewrite(fmt.KIND_EVENTS, name, tuple(ref.key for ref in old), bodies)
        return 1

    async def _drop_old(self, name: str, cutoff_ms: int, taken: set[str],
                        budget: _Budget) -> int:
        """Rewrite each segment that still holds an event older than ``cutoff_ms`` without
        those events (a batch shares one ``time_ms``: it goes whole or stays whole).

        Reads the stream's segments that are not ``taken``, a window ahead, once each: a
        segment found to hold no old event is remembered (``_young``) for the rest of the
        ``compact()``, whose next steps then skip it."""
        log = [seg.ref for seg in self._store.segments(fmt.KIND_EVENTS, name)
               if seg.ref.key not in taken and seg.ref.key not in self._young]
        planned = 0
        pacer = Pacer()
        async for view in self._store.read_segments(log):
            if budget.spent:
                break
            body, kept, dropped = bytearray(), 0, 0
            for value, offset, time_ms, records, _at in view.frames():
                if pacer.due():
                    await pacer.pause()
                if time_ms >= cutoff_ms:
                    fmt.append_record(body, value, offset or b"", time_ms, records)
                    kept += records
                else:
                    dropped += records
            if not dropped:
                self._young.add(view.key)
                continue
            bodies: Bodies = [(body, kept)] if kept else []
            taken.add(view.key)
            budget.take(bodies)
            self._scheduler.add_rewrite(fmt.KIND_EVENTS, name, (view.key,), bodies)
            planned += 1
        return planned

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

    async def _compact_cache(self, taken: set[str], budget: _Budget) -> int:
        """Attach the rewrite of the cache's log to one entry per key, of the versions in
        use (0 or 1): of a function called in this run, the version it was called with; of
        any other, its highest version."""
        log = [seg.ref for seg in self._store.segments(fmt.KIND_CACHE, fmt.CACHE_LOG)]
        if not log:
            return 0
        in_use: dict[str, set[int]] = {}
        for name, version in ([] if self._cache is None else list(self._cache.versions)):
            in_use.setdefault(name, set()).add(version)
        newest: dict[str, int] = {}
        entries: dict[str, tuple[bytes, tuple[str, int] | None]] = {}
        stored = 0
        pacer = Pacer()
        async for view in self._store.read_segments(log):
            for key, _result, value in cache_entries(view):
                if pacer.due():
                    await pacer.pause()
                function = _function_version(key)
                if function is not None and function[0] not in in_use:
                    newest[function[0]] = max(newest.get(function[0], function[1]), function[1])
                entries.pop(key, None)  # the newest entry, in the order it was written
                entries[key] = (bytes(value), function)
                stored += 1
        bodies: Bodies = []
        body, count, kept = bytearray(), 0, 0
        for value, function in entries.values():
            if pacer.due():
                await pacer.pause()
            if function is not None and (function[1] not in in_use[function[0]]
                                         if function[0] in in_use
                                         else newest.get(function[0]) != function[1]):
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
        budget.take(bodies)  # the whole cache at once: it may go past the budget
        self._scheduler.add_rewrite(fmt.KIND_CACHE, fmt.CACHE_LOG, tuple(r.key for r in log),
                                    bodies)
        return 1


def _function_version(entry_key: str) -> tuple[str, int] | None:
    """``(name, version)`` of an entry key ``<name>@<version>:<hex>``; None if malformed."""
    head = entry_key.rpartition(":")[0]
    name, at, version = head.rpartition("@")
    return (name, int(version)) if at and version.isdigit() else None
