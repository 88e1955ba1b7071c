"""Long-lived stores: checkpoints, merging, retention, the cache's versions, run.compact().

Opening a store must cost what its live state costs, not what its history cost: these
tests count the requests an open makes, check that merged and retained logs replay exactly
the events they should (values, offsets and ``time_ms``), and that damage to the new
objects (a checkpoint) is reported or worked around as docs/format.md says.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import CountingDriver, counting, driver_for, replayed, table_state

import apersist
from apersist import _format as fmt
from apersist._drivers.base import ObjectInfo
from apersist._maintenance import CHECKPOINT_EVERY, FANOUT, plan_merges, tier
from apersist._store import LoggedSegment, PendingRewrite, Store
from apersist.testing import FakeClock


async def _one_event_commits(backend: apersist.Backend, count: int, *, start: int = 0,
                             clock: FakeClock | None = None, **config: Any) -> None:
    async with apersist.run(apersist.Config(backend, **config), clock_ms=clock) as run:
        stream = run.stream("s")
        for i in range(start, start + count):
            if clock is not None:
                clock.advance(1_000)
            await stream.record({"i": i}, offset=None if i % 3 == 0 else i)
            await run.commit()


def _expected(count: int, start: int = 0) -> list[tuple[Any, Any]]:
    return [({"i": i}, None if i % 3 == 0 else i) for i in range(start, start + count)]


async def test_opening_reads_one_checkpoint_and_a_bounded_number_of_commits(
        backend: apersist.Backend) -> None:
    await _one_event_commits(backend, 3 * CHECKPOINT_EVERY + 20)
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with counting(cfg) as driver, apersist.run(cfg, driver=driver) as run:
        opened = list(driver.keys)
        events = [(e.value, e.offset) async for e in run.stream("s").replay()]
    commit_gets = [k for verb, k in opened if verb == "get" and fmt.key_kind(k) == "commit"]
    checkpoint_gets = [k for verb, k in opened if verb == "get" and fmt.key_kind(k) == "checkpoint"]
    lists = [k for verb, k in opened if verb == "list"]
    assert len(commit_gets) < CHECKPOINT_EVERY
    assert len(checkpoint_gets) == 1
    # A bucket of commit keys (and perhaps the next), the live segments' buckets, epochs.
    assert len(lists) <= 4, lists
    assert events == _expected(3 * CHECKPOINT_EVERY + 20)


async def test_merging_keeps_every_event_with_its_offset_and_time(backend: apersist.Backend) -> None:
    clock = FakeClock(1_700_000_000_000)
    await _one_event_commits(backend, 300, clock=clock)
    events = await replayed(backend, "s")
    assert [(e.value, e.offset) for e in events] == _expected(300)
    assert [e.time_ms for e in events] == [1_700_000_000_000 + 1_000 * (i + 1) for i in range(300)]
    async with apersist.run(apersist.Config(backend,
                                            snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        live = run._store.segments(fmt.KIND_EVENTS, "s")
    # 300 one-event commits, merged by tiers of FANOUT: far fewer segments than commits.
    assert len(live) < 2 * FANOUT, len(live)


async def test_replay_yields_the_log_as_opened_while_the_run_merges_it() -> None:
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, FANOUT - 1)
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        for i in range(FANOUT - 1, 4 * FANOUT):
            await stream.record({"i": i}, offset=i)
            await run.commit()
        await run.compact()
        merged = run._store.segments(fmt.KIND_EVENTS, "s")
        assert len(merged) < FANOUT
        # The segments this run opened with were merged away in its own commits.
        replay = [(e.value, e.offset) async for e in stream.replay()]
    assert replay == _expected(FANOUT - 1)


def test_merge_plan_takes_runs_of_one_tier_and_respects_the_size_bound() -> None:
    def segs(*sizes: int) -> list[LoggedSegment]:
        return [LoggedSegment(1, fmt.SegmentRef(f"k{i}", fmt.KIND_EVENTS, "s", 1, size))
                for i, size in enumerate(sizes)]
    assert [tier(100), tier(4 << 10), tier(64 << 10)] == [0, 1, 2]
    small = [100] * FANOUT
    assert [len(g) for g in plan_merges(segs(*small), 1 << 20)] == [FANOUT]
    assert plan_merges(segs(*small[:-1]), 1 << 20) == []
    # A bigger segment in the middle breaks the run.
    assert plan_merges(segs(*small[:8], 50_000, *small[8:]), 1 << 20) == []
    assert plan_merges(segs(*[70_000] * FANOUT), 1 << 20) == []  # would exceed the bound


async def test_retention_by_count_keeps_exactly_the_last_events_after_compact(
        backend: apersist.Backend) -> None:
    cfg = apersist.Config(backend, retention=apersist.Retention(max_events=7))
    async with apersist.run(cfg) as run:
        stream = run.stream("s")
        table = await run.table("t")
        for i in range(20):
            await stream.record({"i": i}, offset=i)
            table[str(i)] = i
        await run.commit()
        # One batch of 10: the bound falls inside it.
        await stream.record_many([{"i": i} for i in range(20, 30)],
                                 offsets=list(range(20, 30)))
        await run.commit()
        await run.compact()
    events = await replayed(backend, "s")
    assert [(e.value, e.offset) for e in events] == [({"i": i}, i) for i in range(23, 30)]
    assert await table_state(backend, "t") == {str(i): i for i in range(20)}
    async with apersist.run(apersist.Config(backend)) as run:
        assert run.stream("s").offset == 29


async def test_retention_by_age_uses_the_run_clock() -> None:
    backend = apersist.Backend.memory()
    clock = FakeClock(1_000_000)
    await _one_event_commits(backend, 100, clock=clock)  # times 1,001,000 .. 1,100,000
    cfg = apersist.Config(backend, retention=apersist.Retention(max_age_ms=10_000))
    async with apersist.run(cfg, clock_ms=clock) as run:
        await run.compact()
    events = await replayed(backend, "s")
    assert [e.time_ms for e in events] == [1_000_000 + 1_000 * (i + 1) for i in range(89, 100)]


async def test_both_bounds_keep_only_what_each_allows() -> None:
    backend = apersist.Backend.memory()
    clock = FakeClock(1_000_000)
    await _one_event_commits(backend, 50, clock=clock)
    cfg = apersist.Config(backend)
    async with apersist.run(cfg, clock_ms=clock) as run:
        run.stream("s", retention=apersist.Retention(max_events=20, max_age_ms=5_000))
        await run.compact()
    # Within 5 s of the clock (1,050,000): times 1,045,000 (event 44) and later.
    assert [e.value["i"] for e in await replayed(backend, "s")] == list(range(44, 50))


async def test_a_source_with_max_events_0_keeps_offsets_only() -> None:
    backend = apersist.Backend.memory()
    seen: list[Any] = []

    def reader(offset: Any) -> Any:
        seen.append(offset)
        start = 0 if offset is None else offset + 1

        async def gen() -> Any:
            for i in range(start, 10):
                yield {"i": i}, i
        return gen()

    cfg = apersist.Config(backend)
    keep_offsets = apersist.Retention(max_events=0)
    async with apersist.run(cfg) as run:
        assert [e.value["i"] async for e in run.source("orders", reader,
                                                         retention=keep_offsets)] == list(range(10))
        await run.compact()
    async with apersist.run(cfg) as run:
        assert [e async for e in run.source("orders", reader, retention=keep_offsets)] == []
        assert run.stream("orders").offset == 9
    assert seen == [None, 9]


async def test_compact_drops_cached_entries_of_versions_no_longer_in_use() -> None:
    backend = apersist.Backend.memory()
    calls: list[int] = []

    def make(version: int) -> Any:
        @apersist.cached(name="f", version=version)
        def f(x: int) -> int:
            calls.append(x)
            return x * version
        return f

    async with apersist.run(apersist.Config(backend)) as run:
        f1 = make(1)
        assert [f1(x) for x in (1, 2, 3)] == [1, 2, 3]
    async with apersist.run(apersist.Config(backend)) as run:
        f2 = make(2)
        assert f2(1) == 2
        await run.compact()
    async with apersist.run(apersist.Config(backend)) as run:
        assert len(run._cache) == 1  # version 1's three entries are gone
        assert f2(1) == 2
        assert calls == [1, 2, 3, 1]


async def test_compact_folds_tables_the_run_did_not_open() -> None:
    backend = apersist.Backend.memory()
    async with apersist.run(apersist.Config(backend)) as run:
        table = await run.table("t")
        for i in range(5):
            table["k"] = i
            await run.commit()
    async with apersist.run(apersist.Config(backend)) as run:
        await run.compact()
        assert run._store.segments(fmt.KIND_TABLE, "t") == []
        assert len(run._store.segments(fmt.KIND_TABLE_SNAPSHOT, "t")) == 1
    assert await table_state(backend, "t") == {"k": 4}


async def test_a_rewrite_whose_run_left_the_log_is_dropped() -> None:
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, 3)
    from apersist._drivers import open_driver
    driver = open_driver(backend)
    store = Store(driver, clock_ms=lambda: 0)
    await store.load()
    await store.acquire_writer()
    before = store.segments(fmt.KIND_EVENTS, "s")
    stale = PendingRewrite(fmt.KIND_EVENTS, "s", ("writers/0/segments/not-there.seg",), [])
    await store.commit([], dict(store.offsets), reset=False, rewrites=[stale])
    assert store.segments(fmt.KIND_EVENTS, "s") == before
    await driver.aclose()


async def test_a_damaged_checkpoint_is_reported_and_a_deleted_one_worked_around(
        tmp_path: Path) -> None:
    root = tmp_path / "store"
    backend = apersist.Backend.filesystem(root)
    await _one_event_commits(backend, 2 * CHECKPOINT_EVERY + 5)
    checkpoints = sorted((root / fmt.checkpoints_prefix("0")).iterdir())
    assert len(checkpoints) >= 2
    newest = checkpoints[-1]
    data = newest.read_bytes()
    # Deleted: a reader starts from the one before (every commit record is still there).
    newest.unlink()
    assert len(await replayed(backend, "s")) == 2 * CHECKPOINT_EVERY + 5
    # Damaged: damage, never skipped.
    damaged = bytearray(data)
    damaged[30] ^= 0x01
    newest.write_bytes(bytes(damaged))
    with pytest.raises(apersist.CorruptDataError, match=newest.name):
        await replayed(backend, "s")
    # Another checkpoint's bytes under its key: its position says so.
    newest.write_bytes(checkpoints[0].read_bytes())
    with pytest.raises(apersist.CorruptDataError, match="another position"):
        await replayed(backend, "s")


@pytest.mark.parametrize("lookups", ["point lookups", "listing"])
@pytest.mark.parametrize("missing", [fmt.BUCKET - 2, fmt.BUCKET - 1, fmt.BUCKET, fmt.BUCKET + 1])
async def test_a_missing_commit_followed_by_later_ones_is_reported(lookups: str,
                                                                   missing: int) -> None:
    """Around a bucket's end too, by point lookups (memory, filesystem) or by listing a
    bucket at a time (a driver without ``sizes``: S3, Azure, wrappers)."""
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, fmt.BUCKET + 3)
    objects = backend.objects  # type: ignore[attr-defined]
    for key in [k for k in objects if fmt.key_kind(k) == "checkpoint" or k.endswith("head.json")]:
        del objects[key]
    del objects[fmt.commit_key("0", missing)]
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)

    async def open_store() -> None:
        if lookups == "listing":
            async with counting(cfg) as driver, apersist.run(cfg, driver=driver):
                pass
        else:
            async with apersist.run(cfg):
                pass

    with pytest.raises(apersist.CorruptDataError, match=f"commit record missing.*later={missing + 1}"):
        await open_store()


class _OverlapDriver(CountingDriver):
    """Lists commit buckets slowly, noting which it listed and how many at once."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.buckets: list[str] = []
        self.listing = self.most = 0

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        if prefix.startswith(fmt.commits_prefix("0")):
            self.buckets.append(prefix)
            self.listing += 1
            self.most = max(self.most, self.listing)
            try:
                await anyio.sleep(0.02)  # a request's round trip
            finally:
                self.listing -= 1
        async for info in super().list(prefix):
            yield info


@pytest.mark.parametrize("commits", [CHECKPOINT_EVERY * 2 + 3, fmt.BUCKET + 3])
async def test_a_log_near_a_buckets_end_has_the_next_bucket_listed_at_once(commits: int) -> None:
    """Opening by listing (S3, Azure): a log that starts near the end of its bucket of
    commit keys (its checkpoint at 896, the log going on past 999) has the next bucket
    listed beside it, not one round trip after; one that starts far from the end lists
    its own bucket only. Either way the open finds every commit."""
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, commits)
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with driver_for(cfg, _OverlapDriver) as driver, apersist.run(cfg, driver=driver) as run:
        assert [e.value["i"] async for e in run.stream("s").replay()] == list(range(commits))
    first = fmt.commit_bucket_prefix("0", 0)
    if commits < fmt.BUCKET:
        assert driver.buckets == [first]
        assert driver.most == 1
    else:
        assert driver.buckets[:2] == [first, fmt.commit_bucket_prefix("0", 1)]
        assert driver.most == 2


async def test_retention_argument_errors() -> None:
    with pytest.raises(ValueError, match="max_events"):
        apersist.Retention(max_events=-1)
    with pytest.raises(TypeError, match="max_age_ms"):
        apersist.Retention(max_age_ms=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retention"):
        apersist.Config(apersist.Backend.memory(), retention=5)  # type: ignore[arg-type]
    async with apersist.run(apersist.Config(apersist.Backend.memory())) as run:
        with pytest.raises(TypeError, match="retention"):
            run.stream("s", retention={"max_events": 1})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="invalid stream name"):
            run.stream("bad name", retention=apersist.Retention())


@pytest.mark.usefixtures("segment_objects")  # its subject is segment objects
async def test_damage_met_by_background_maintenance_is_logged_and_the_run_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    backend = apersist.Backend.memory()
    await _one_event_commits(backend, FANOUT - 1)
    objects = backend.objects  # type: ignore[attr-defined]
    damaged = sorted(k for k in objects if k.endswith(".seg"))[3]
    data = bytearray(objects[damaged])
    data[-40] ^= 0x01  # the body: its checksum fails
    objects[damaged] = bytes(data)
    with caplog.at_level(logging.ERROR, logger="apersist"):
        async with apersist.run(apersist.Config(backend)) as run:
            stream = run.stream("s")
            for i in range(FANOUT - 1, 3 * FANOUT):
                await stream.record({"i": i}, offset=i)
                await run.commit()
            assert stream.offset == 3 * FANOUT - 1  # committed: the run went on
    assert "background maintenance failed" in caplog.text
    assert damaged in caplog.text
    with pytest.raises(apersist.CorruptDataError, match=damaged):
        await replayed(backend, "s")  # never skipped: the replay reports it


async def test_opening_starts_from_the_newest_checkpoint_as_gc_leaves_the_log() -> None:
    """Gc deletes the commit records a checkpoint folds (but each epoch's first): a reader
    must find the newest checkpoint by listing, never start from an older one whose later
    commits are gone (that store would open silently older)."""
    backend = apersist.Backend.memory()
    # Three periods: a checkpoint that is due waits while merges ride on commits, so two
    # periods may hold only one checkpoint (one landed at commit 149 of 266).
    count = 3 * CHECKPOINT_EVERY + 10
    await _one_event_commits(backend, count)
    objects = backend.objects  # type: ignore[attr-defined]
    numbers = sorted(int(k[-25:-5]) for k in objects if fmt.key_kind(k) == "checkpoint")
    assert len(numbers) >= 2
    for seq in range(2, numbers[-1] + 1):  # the fence, commit 1, stays
        objects.pop(fmt.commit_key("0", seq), None)
    events = await replayed(backend, "s")
    assert [(e.value, e.offset) for e in events] == _expected(count)


async def test_a_writer_whose_fence_lands_in_the_folded_past_fences_again() -> None:
    """Gc with no grace collects the commit records a checkpoint folds while a writer is
    opening: the number its (stale) fence takes may be free again. Its fence then lands
    where no reader looks; it must notice, read the store again and fence anew, so that
    what it commits afterwards is read."""
    from apersist._drivers import open_driver
    from apersist._gc import collect_garbage

    backend = apersist.Backend.memory()
    driver = open_driver(backend)
    late = Store(driver, clock_ms=lambda: 1)
    async with apersist.run(apersist.Config(backend)) as run:
        stream = run.stream("s")
        for i in range(25):
            await stream.record({"i": i})
            await run.commit()
            if i == 4:
                await late.load()  # ... and then it is slow to take the writer role
        await run.compact()
    plan = await collect_garbage(driver, grace_ms=0, now_ms=1)
    assert fmt.commit_key("0", late.last_seq + 1) in plan.due  # its fence number is free
    await late.acquire_writer()
    assert late.last_seq > 25
    await late.commit([], {"s": b"99"}, reset=False)  # offsets only: it must be read
    async with apersist.run(apersist.Config(backend,
                                            snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        assert run.stream("s").offset == 99
        assert [e.value["i"] async for e in run.stream("s").replay()] == list(range(25))
    await driver.aclose()


async def test_a_reader_that_read_an_older_checkpoint_before_gc_starts_again() -> None:
    """A reader lists the checkpoints and reads the newest; gc with no grace then collects
    the commits after it (a newer checkpoint folds them). The reader finds no commit after
    its checkpoint, or a gap: it starts again from the newer one, never opens older."""
    from apersist._drivers import open_driver
    from apersist._gc import collect_garbage

    backend = apersist.Backend.memory()
    await _one_event_commits(backend, CHECKPOINT_EVERY + 5)
    driver = open_driver(backend)
    stale = Store(driver, clock_ms=lambda: 1)
    stale_state = await stale._checkpoint_state()  # what the reader read first
    async with apersist.run(apersist.Config(backend)) as run:
        await run.stream("s").record({"i": CHECKPOINT_EVERY + 5}, offset=CHECKPOINT_EVERY + 5)
        await run.compact()
    await collect_garbage(driver, grace_ms=0, now_ms=1)
    calls = 0
    real = Store._checkpoint_state

    async def first_stale(self: Store) -> Any:
        nonlocal calls
        calls += 1
        return stale_state if calls == 1 else await real(self)

    reader = Store(driver, clock_ms=lambda: 1)
    reader._checkpoint_state = first_stale.__get__(reader)  # type: ignore[method-assign]
    await reader.load()
    assert calls == 2
    assert reader.offsets["s"] == str(CHECKPOINT_EVERY + 5).encode()
    assert sum(s.ref.records for s in reader.segments(fmt.KIND_EVENTS, "s")) == CHECKPOINT_EVERY + 6
    await driver.aclose()
