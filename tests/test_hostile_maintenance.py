"""Hostile review of issue 12 (long-lived stores): maintenance, retention, compaction.

Every test here reproduces a problem the review found, and failed on the code as it was
reviewed: a cached version in use dropped, age retention that kept an old event after a
younger one, a maintenance step whose memory grew with the number of streams, maintenance
that stopped for good after one failed request, a loop stall from one commit carrying
thousands of rewrites, and a table's one-delta segments that were never merged.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import apersist
from apersist import _format as fmt
from apersist._drivers.memory import MemoryDriver
from apersist._maintenance import CHECKPOINT_EVERY, FANOUT, REWRITES_PER_STEP
from apersist.testing import FaultyDriver


async def _replayed(backend: apersist.Backend, name: str) -> list[tuple[Any, Any, int]]:
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        return [(e.value, e.offset, e.time_ms) async for e in run.stream(name).replay()]


async def test_compact_keeps_the_cache_entries_of_two_versions_called_in_the_run() -> None:
    """Two versions of one cached function are both in use in a run (say a gradual
    rollout, or the old one kept for a fallback). ``compact()`` keeps only one version per
    name (``UdfCache.versions`` is a dict name -> version), so the entries of the other
    version, called in this very run, are dropped: the next run calls it again."""
    calls: list[tuple[str, int]] = []

    @apersist.cached(name="hostile.f", version=1)
    def f_v1(x: int) -> int:
        calls.append(("v1", x))
        return x

    @apersist.cached(name="hostile.f", version=2)
    def f_v2(x: int) -> int:
        calls.append(("v2", x))
        return -x

    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        for i in range(3):
            f_v1(i)
            f_v2(i)
        await run.compact()
    calls.clear()
    async with apersist.run(apersist.Config(backend)) as run:
        for i in range(3):
            f_v1(i)
            f_v2(i)
    # Without the compact() both versions are served from the cache (checked by review).
    assert calls == [], f"cached results of a version in use were dropped: recomputed {calls}"


async def test_retention_by_age_drops_every_event_older_than_the_bound() -> None:
    """API.md: a stream keeps "those whose time_ms is within max_age_ms of the run's
    clock"; right after compact() replay yields exactly the retained events. With a clock
    that went backwards (NTP step, injected clock), an old event recorded after a younger
    one is kept: ``_count_old`` stops at the first young event."""
    backend = apersist.Backend.memory()
    now = [500]
    async with apersist.run(apersist.Config(backend), clock_ms=lambda: now[0]) as run:
        stream = run.stream("s", retention=apersist.Retention(max_age_ms=100))
        await stream.record("young")
        await run.commit()
        now[0] = 0  # the clock steps back
        await stream.record("old")
        await run.commit()
        now[0] = 550  # cutoff 450: "young" (500) stays, "old" (0) must go
        await run.compact()
    events = await _replayed(backend, "s")
    assert [v for v, _o, _t in events] == ["young"], events


async def test_compact_memory_is_bounded_by_a_segment_not_by_the_number_of_logs(
        tmp_path: Path) -> None:
    """_maintenance's docstring: "a step holds at most one merged segment's records
    (max_segment_bytes)". But a step plans the merges of *every* log before the commit
    that carries them, and each rewrite keeps its merged body until then
    (``Scheduler._rewrites``): memory grows with (streams x small data), not with
    ``max_segment_bytes``, and ignores ``max_pending_bytes`` too. MERGES_PER_STEP bounds
    one log only. Here: 200 streams x 16 one-event segments of 3 KB (9.4 MiB in all),
    max_segment_bytes=64 KiB, max_pending_bytes=1 MiB."""
    cfg = apersist.Config(apersist.Backend.filesystem(tmp_path), max_segment_bytes=64 << 10,
                          max_pending_bytes=1 << 20)
    streams = 200
    async with apersist.run(cfg) as run:
        handles = [run.stream(f"s{j}") for j in range(streams)]
        for i in range(FANOUT):
            for stream in handles:
                await stream.record({"i": i, "pad": "x" * 3000}, offset=i)
            await run.commit()
        tracemalloc.start()
        try:
            await run.compact()
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(run._store.segments(fmt.KIND_EVENTS, "s0")) < FANOUT  # it did merge
    assert peak < 4 << 20, f"compact() held {peak / 2**20:.1f} MiB at once"


async def test_background_maintenance_survives_one_failed_checkpoint() -> None:
    """One failed request in background maintenance (here: a checkpoint PUT) ends
    maintenance for the rest of the run (``Maintainer.run`` returns on any error). A
    service that runs for months then never checkpoints nor merges again until it is
    restarted: its open and replay costs grow with history, which issue 12 forbids."""
    objects: dict[str, bytes] = {}
    faulty = FaultyDriver(MemoryDriver(objects))
    faulty.fail_next("put", "permanent", key="*checkpoints*")
    cfg = apersist.Config(apersist.Backend.memory())
    async with apersist.run(cfg, driver=faulty) as run:
        stream = run.stream("s")
        for i in range(4 * CHECKPOINT_EVERY):
            await stream.record(i, offset=i)
            await run.commit()
            await asyncio.sleep(0)  # let maintenance run
        assert faulty.faults, "the planned fault did not happen"
        behind = run._store.last_seq - run._store.checkpoint_seq
        segments = len(run._store.segments(fmt.KIND_EVENTS, "s"))
    assert behind < 2 * CHECKPOINT_EVERY, f"no checkpoint for {behind} commits"
    assert segments < 4 * FANOUT, f"no merge since the failure: {segments} segments"


async def test_background_merging_of_many_streams_goes_in_bounded_steps() -> None:
    """Maintenance must never stall the pipeline. After 2000 streams got 16 small segments
    each, the background step merged every log at once and carried all 2000 rewrites
    (32,000 old segments, 2000 new ones) in one commit, which ran without yielding (a
    1 ms ticker saw 114 to 135 ms). A step is now bounded across logs
    (``REWRITES_PER_STEP``): it attaches no more, and the backlog goes over the next
    commits. (The lag itself is a timing, measured outside the tests.)"""
    backend = apersist.Backend.memory()
    streams = 5 * REWRITES_PER_STEP
    async with apersist.run(apersist.Config(backend)) as run:
        handles = [run.stream(f"s{j}") for j in range(streams)]
        for i in range(FANOUT):
            for stream in handles:
                await stream.record(i, offset=i)
            await run.commit()
        waiting: list[int] = []
        for _ in range(20):
            # The user commits nothing while maintenance plans: a step stops at its budget.
            for _ in range(500):
                await asyncio.sleep(0.002)
                if len(run._scheduler._rewrites) >= REWRITES_PER_STEP:
                    break
            await asyncio.sleep(0.02)
            waiting.append(len(run._scheduler._rewrites))
            await handles[0].record("one more")
            await run.commit()
            if all(len(run._store.segments(fmt.KIND_EVENTS, f"s{j}")) < FANOUT
                   for j in range(streams)):
                break
        assert all(len(run._store.segments(fmt.KIND_EVENTS, f"s{j}")) < FANOUT
                   for j in range(streams))  # every stream merged
    assert max(waiting) == REWRITES_PER_STEP, waiting
    objects = backend.objects  # type: ignore[attr-defined]
    per_commit = [len(fmt.CommitRecord.decode(k, v).rewrites)
                  for k, v in objects.items() if fmt.key_kind(k) == "commit"]
    assert sum(per_commit) >= streams
    assert max(per_commit) <= REWRITES_PER_STEP, max(per_commit)


async def test_a_table_updated_one_delta_per_commit_does_not_pile_up_small_segments() -> None:
    """Issue 12: opening must cost what the live state costs, not what the history cost.
    Tables are left out of merging (``_MERGED_KINDS``: "tables are folded into snapshots
    instead"), but a table is folded on its own only once it has 4096 deltas *and* more
    than twice its size in deltas (``_table``). A table of 4000 keys updated one key per
    commit (a paced source) so keeps ~4000 one-delta segments: opening it makes one
    GET per commit of its history (4,043 requests and 0.6 s on the filesystem for 4000
    commits of a 50-key table; 6 requests after compact()). On S3 that is seconds."""
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        for k in range(4000):
            table[str(k)] = 0
        await run.commit()
        for i in range(4000):
            table[str(i % 4000)] = i
            await run.commit()
        await asyncio.sleep(0.1)  # background maintenance of the last commits
        live = len(run._store.segments(fmt.KIND_TABLE, "t"))
    assert live < 4 * FANOUT, f"the table's log holds {live} small delta segments"
