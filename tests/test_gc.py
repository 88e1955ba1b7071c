"""``apersist gc``: garbage is dated by gc's own clock (mark, then sweep), on every backend;
a reader whose segment was collected is told so.

Issue 18, item 11: gc used to date garbage by the ``time_ms`` that writers put in their
epoch and commit records. A writer whose clock ran two hours behind made every segment it
superseded look two hours old, so gc with the default grace (an hour) deleted segments that
a reader which had just opened still needed, and the reader got a ``CorruptDataError``
blaming corruption.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import BACKEND_KINDS, make_backend
from helpers import driver_of, segment_keys, stored_objects

import apersist
from apersist import _format as fmt
from apersist._cli import main
from apersist._config import AzureBackend, FilesystemBackend, S3Backend
from apersist._drivers import open_driver
from apersist._gc import GcMarks, GcPlan, collect_garbage
from apersist._inspect import find_garbage, verify
from apersist._stream import wall_clock_ms

HOUR_MS = 3_600_000
GRACE_MS = HOUR_MS  # the command line's default grace period (3600 s)
T0 = 1_800_000_000_000  # a gc clock reading, ms since the Unix epoch
# These tests are about segment objects and the commit records that name them: every
# commit uploads its segments (tests/test_inline_commits.py covers inline ones and gc).
pytestmark = pytest.mark.usefixtures("segment_objects")
MARKS = fmt.gc_marks_key("0")
REPLAY = apersist.SnapshotAccess.REPLAY
RECORD = apersist.SnapshotAccess.RECORD


async def gc(backend: apersist.Backend, *, now_ms: int, grace_ms: int = GRACE_MS,
             dry_run: bool = False) -> GcPlan:
    async with driver_of(backend) as driver:
        return await collect_garbage(driver, grace_ms=grace_ms, now_ms=now_ms, dry_run=dry_run)


async def fill(backend: apersist.Backend, n: int = 3, **kwargs: object) -> None:
    """A writer records ``n`` events and a table key (a new epoch each time)."""
    async with apersist.run(apersist.Config(backend), **kwargs) as run:  # type: ignore[arg-type]
        orders = run.stream("orders")
        for i in range(n):
            await orders.record({"n": i}, offset=i)
        counts = await run.table("counts")
        counts["a"] = n


async def start_over(backend: apersist.Backend, value: str = "new", **kwargs: object) -> None:
    """A writer starts a new history (``RECORD``): every older segment becomes garbage."""
    config = apersist.Config(backend, snapshot_access=RECORD)
    async with apersist.run(config, **kwargs) as run:  # type: ignore[arg-type]
        await run.stream("orders").record(value)


async def marks(backend: apersist.Backend) -> dict[str, int] | None:
    objects = await stored_objects(backend)
    return None if MARKS not in objects else dict(GcMarks.decode(MARKS, objects[MARKS]).marks)


# ------------------------------------------------------------------ the regression: skewed clock
async def test_a_writer_clock_two_hours_behind_does_not_let_gc_delete_what_an_open_reader_needs(
        backend: apersist.Backend) -> None:
    await fill(backend)
    old = await segment_keys(backend)
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        # Its records say this happened two hours ago: with the old gc, the superseded
        # history looked garbage for two hours, past the default grace.
        await start_over(backend, clock_ms=lambda: wall_clock_ms() - 2 * HOUR_MS)
        first = await gc(backend, now_ms=wall_clock_ms())
        again = await gc(backend, now_ms=wall_clock_ms())
        events = [e.value async for e in reader.stream("orders").replay()]
        table = dict(await reader.table("counts"))
    assert events == [{"n": i} for i in range(3)]
    assert table == {"a": 3}
    assert first.due == again.due == ()
    assert set(first.new) == set(first.waiting) == set(old)  # marked, by gc's clock
    assert again.new == ()
    assert set(old) <= set(await segment_keys(backend))


@pytest.mark.parametrize("kind", [k for k in BACKEND_KINDS if k != "memory"])  # ROOTs reach no memory store
async def test_the_command_line_with_its_default_grace_keeps_what_an_open_reader_needs(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(kind, tmp_path, request)
    root = cli_root(backend, monkeypatch)
    await fill(backend)
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        await start_over(backend, clock_ms=lambda: wall_clock_ms() - 2 * HOUR_MS)
        # The real command, its real clock, its default grace; in a thread (it runs its own loop).
        assert await asyncio.to_thread(main, ["gc", root]) == 0
        assert await asyncio.to_thread(main, ["gc", root]) == 0
        events = [e.value async for e in reader.stream("orders").replay()]
    assert events == [{"n": i} for i in range(3)]
    assert await marks(backend)


def cli_root(backend: apersist.Backend, monkeypatch: pytest.MonkeyPatch) -> str:
    """The command line's ROOT for ``backend``, its credentials put in the environment."""
    if isinstance(backend, FilesystemBackend):
        return str(backend.path)
    if isinstance(backend, S3Backend):
        settings = backend.bucket_settings
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        assert settings.endpoint
        assert settings.access_key
        assert settings.secret_access_key
        for name, value in (("AWS_ENDPOINT_URL", settings.endpoint),
                            ("AWS_ACCESS_KEY_ID", settings.access_key),
                            ("AWS_SECRET_ACCESS_KEY", settings.secret_access_key),
                            ("AWS_DEFAULT_REGION", settings.region or "us-east-1")):
            monkeypatch.setenv(name, value)
        return f"s3://{settings.bucket_name}/{backend.root_path}"
    if isinstance(backend, AzureBackend):
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", backend.account)
        monkeypatch.setenv("AZURE_STORAGE_KEY", backend.password)
        monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", backend.endpoint)
        return f"az://{backend.container}/{backend.root_path}"
    raise AssertionError(f"no command-line ROOT for this backend: {backend.kind}")


# ------------------------------------------------------------------ a collected segment says so
async def test_a_reader_whose_segment_was_collected_is_told_so(backend: apersist.Backend) -> None:
    await fill(backend)
    old = await segment_keys(backend)
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        await start_over(backend)
        plan = await gc(backend, now_ms=wall_clock_ms(), grace_ms=0)
        assert set(plan.due) == set(old)  # grace 0: deleted at once, even on a first run
        with pytest.raises(apersist.SegmentCollectedError) as stream_error:
            [e async for e in reader.stream("orders").replay()]
        with pytest.raises(apersist.SegmentCollectedError) as table_error:
            await reader.table("counts")
    for error in (stream_error.value, table_error.value):
        message = str(error)
        assert isinstance(error, apersist.CorruptDataError)  # still caught as before
        assert "garbage-collected after this reader opened the store" in message
        assert "reopen" in message
        assert "grace period" in message
        assert any(f"key={key} " in message for key in old), message
    # Reopened, the reader sees the new history.
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        assert [e.value async for e in reader.stream("orders").replay()] == ["new"]


async def test_a_segment_missing_while_the_log_still_names_it_is_corruption(
        backend: apersist.Backend) -> None:
    await fill(backend)
    lost = (await segment_keys(backend))[0]
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        await fill(backend, 2)  # the log moves on, but still names every older segment
        async with driver_of(backend) as driver:
            await driver.delete([lost])  # lost by the storage, not collected
        with pytest.raises(apersist.CorruptDataError) as error:
            [e async for e in reader.stream("orders").replay()]
    assert not isinstance(error.value, apersist.SegmentCollectedError)
    assert str(error.value) == f"commit names a missing segment: key={lost} offset=0"


# ------------------------------------------------------------------ mark, then sweep
async def test_a_first_run_only_marks_and_a_run_a_grace_period_later_deletes(
        backend: apersist.Backend) -> None:
    await fill(backend)
    old = set(await segment_keys(backend))
    await start_over(backend)
    assert await marks(backend) is None
    first = await gc(backend, now_ms=T0)
    assert first.due == ()
    assert set(first.new) == old
    assert await marks(backend) == dict.fromkeys(old, T0)
    async with driver_of(backend) as driver:
        assert await find_garbage(driver, grace_ms=GRACE_MS, now_ms=T0) == []
    early = await gc(backend, now_ms=T0 + GRACE_MS - 1)
    assert early.due == ()
    assert early.new == ()
    assert not early.marker_changed
    assert old <= set(await segment_keys(backend))
    late = await gc(backend, now_ms=T0 + GRACE_MS)
    assert set(late.due) == old
    assert late.waiting == {}
    assert not old & set(await segment_keys(backend))
    assert await marks(backend) == {}
    async with driver_of(backend) as driver:
        assert await verify(driver) == []
    assert (await gc(backend, now_ms=T0 + 2 * GRACE_MS)).due == ()


async def test_garbage_that_appears_later_gets_its_own_first_seen_time(
        backend: apersist.Backend) -> None:
    await fill(backend)
    first = set(await segment_keys(backend))
    await start_over(backend, "second")
    await gc(backend, now_ms=T0)
    await fill(backend)  # a new writer, a new epoch: the "second" history's writer is fenced
    second = set(await segment_keys(backend)) - first
    await start_over(backend, "third")  # supersedes the second history
    later = await gc(backend, now_ms=T0 + 10_000)
    assert later.due == ()
    assert set(later.new) == second
    assert await marks(backend) == {**dict.fromkeys(first, T0), **dict.fromkeys(second, T0 + 10_000)}
    assert set((await gc(backend, now_ms=T0 + GRACE_MS)).due) == first
    assert await marks(backend) == dict.fromkeys(second, T0 + 10_000)
    assert set((await gc(backend, now_ms=T0 + GRACE_MS + 10_000)).due) == second
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        assert [e.value async for e in reader.stream("orders").replay()] == ["third"]


async def test_segments_of_the_newest_epoch_are_never_marked(backend: apersist.Backend) -> None:
    await fill(backend)
    orphan = fmt.segment_key("0", 1, 999)  # an upload of a commit still in flight
    async with driver_of(backend) as driver:
        await driver.put(orphan, b"junk")
    plan = await gc(backend, now_ms=T0, grace_ms=0)
    assert plan.due == ()
    assert plan.waiting == {}
    assert await marks(backend) is None  # nothing to note: no marker written
    await fill(backend)  # epoch 2 takes over: epoch 1's orphan can never be committed
    assert (await gc(backend, now_ms=T0)).new == (orphan,)


async def test_a_mark_never_deletes_a_segment_a_live_commit_names(backend: apersist.Backend) -> None:
    """A live segment is not garbage whatever the marker says (none ever goes back to being
    named once garbage, but a forged or stale mark must not matter): its mark is dropped."""
    await fill(backend)
    await fill(backend)
    live = await segment_keys(backend)
    async with driver_of(backend) as driver:
        await driver.put(MARKS, GcMarks("0", dict.fromkeys(live, 0)).encode())
    plan = await gc(backend, now_ms=T0, grace_ms=0)
    assert plan.due == ()
    assert plan.waiting == {}
    assert await marks(backend) == {}
    assert await segment_keys(backend) == live


# ------------------------------------------------------------------ clocks, dry runs, damage
async def test_a_mark_from_a_gc_clock_ahead_counts_as_seen_now(backend: apersist.Backend) -> None:
    """A gc clock that was set back since it marked: the mark (in this clock's future) is
    replaced by now, so the segment still waits a full grace period by this clock."""
    await fill(backend)
    await start_over(backend)
    ahead = await gc(backend, now_ms=T0 + 100 * HOUR_MS)
    plan = await gc(backend, now_ms=T0)
    assert plan.due == ()
    assert set(plan.new) == set(ahead.new)
    assert await marks(backend) == dict.fromkeys(ahead.new, T0)
    assert set((await gc(backend, now_ms=T0 + GRACE_MS)).due) == set(ahead.new)


async def test_a_dry_run_writes_nothing_and_says_what_a_run_would_do(
        backend: apersist.Backend) -> None:
    await fill(backend)
    old = set(await segment_keys(backend))
    await start_over(backend)
    before = await stored_objects(backend)
    dry = await gc(backend, now_ms=T0, dry_run=True)
    assert set(dry.new) == set(dry.waiting) == old
    assert dry.due == ()
    assert set((await gc(backend, now_ms=T0, grace_ms=0, dry_run=True)).due) == old
    assert await stored_objects(backend) == before  # no marker, nothing deleted
    await gc(backend, now_ms=T0)
    marked = await stored_objects(backend)
    due = await gc(backend, now_ms=T0 + GRACE_MS, dry_run=True)
    assert set(due.due) == old
    assert due.new == ()
    assert await stored_objects(backend) == marked


async def test_a_damaged_marker_is_reported_and_only_postpones_deletion(
        backend: apersist.Backend) -> None:
    await fill(backend)
    old = set(await segment_keys(backend))
    await start_over(backend)
    await gc(backend, now_ms=T0)
    async with driver_of(backend) as driver:
        data = bytearray(await driver.get(MARKS))
        data[len(data) // 2] ^= 0x01
        await driver.put(MARKS, bytes(data))
        assert any(MARKS in line for line in await verify(driver))
    plan = await gc(backend, now_ms=T0 + GRACE_MS)
    assert plan.damaged_marker is not None
    assert MARKS in plan.damaged_marker
    assert plan.due == ()
    assert set(plan.new) == old
    assert await marks(backend) == dict.fromkeys(old, T0 + GRACE_MS)
    assert set((await gc(backend, now_ms=T0 + 2 * GRACE_MS)).due) == old


async def test_a_negative_grace_period_is_refused(backend: apersist.Backend) -> None:
    await fill(backend)
    async with driver_of(backend) as driver:
        with pytest.raises(ValueError, match="grace period must not be negative"):
            await collect_garbage(driver, grace_ms=-1, now_ms=T0)


def test_the_marker_round_trips_and_refuses_damage() -> None:
    marker = GcMarks("0", {fmt.segment_key("0", 2, 1): T0, fmt.segment_key("0", 1, 7): 5,
                           fmt.commit_key("0", 3): 6, fmt.checkpoint_key("0", 2): 7,
                           "_check/" + "a" * 32: 8, "writers/0/segments/.tmp-" + "b" * 32: 9})
    data = marker.encode()
    assert GcMarks.decode(MARKS, data) == marker
    assert data.startswith(b'{"body":{"format":[')
    assert b'"type":"gc-marks"' in data
    for bad in ({"writers/1/commits/00000000000000000001.json": 1},  # another writer's
                {"elsewhere/x": 1},  # neither a writer's key nor a scratch key
                {fmt.segment_key("0", 1, 1): -1}, {fmt.segment_key("0", 1, 1): True}):
        with pytest.raises(apersist.CorruptDataError, match="malformed mark"):
            GcMarks.decode(MARKS, GcMarks("0", bad).encode())


# ------------------------------------------------------------------ everything no checkpoint needs
async def contents(backend: apersist.Backend) -> tuple[list[object], dict[str, object], object]:
    """What a reader gets: the events of ``orders``, the table ``counts``, the offset."""
    async with apersist.run(apersist.Config(backend, snapshot_access=REPLAY)) as reader:
        orders = reader.stream("orders")
        events = [e.value async for e in orders.replay()]
        return events, dict(await reader.table("counts")), orders.offset


async def keys_under(backend: apersist.Backend, prefix: str) -> set[str]:
    return {k for k in await stored_objects(backend) if k.startswith(prefix)}


async def checkpointed_history(backend: apersist.Backend) -> tuple[int, int]:
    """Two writers (epochs 1 and 2); the second commits, checkpoints, commits, checkpoints
    again and commits once more. Returns the two checkpoints' numbers."""
    await fill(backend)
    async with apersist.run(apersist.Config(backend)) as run:
        orders, counts = run.stream("orders"), await run.table("counts")
        checkpoints = []
        for round_ in range(2):
            for i in range(3):
                await orders.record({"r": round_, "i": i}, offset=10 * round_ + i)
                counts[f"k{round_}"] = i
                await run.commit()
            checkpoints.append(await run._store.write_checkpoint())
        await orders.record("after", offset=99)
        await run.commit()
    return checkpoints[0], checkpoints[1]


async def test_folded_commit_records_and_older_checkpoints_go_after_the_grace_period_fences_stay(
        backend: apersist.Backend) -> None:
    old_ckpt, ckpt = await checkpointed_history(backend)
    before = await contents(backend)
    commits = await keys_under(backend, fmt.commits_prefix("0"))
    fences = {fmt.commit_key("0", 1), fmt.commit_key("0", 3)}  # epoch 1's and epoch 2's
    assert fences <= commits
    folded = {fmt.commit_key("0", n) for n in range(1, ckpt + 1)} - fences
    first = await gc(backend, now_ms=T0)
    assert first.checkpoint_seq == ckpt
    assert first.due == ()
    assert set(first.new) == folded | {fmt.checkpoint_key("0", old_ckpt)}
    assert (await gc(backend, now_ms=T0 + GRACE_MS - 1)).due == ()  # kept within the grace
    assert await keys_under(backend, fmt.commits_prefix("0")) == commits
    late = await gc(backend, now_ms=T0 + GRACE_MS)
    # Old checkpoints first, then the commit records that the newest checkpoint folds.
    assert late.due == (fmt.checkpoint_key("0", old_ckpt), *sorted(folded))
    assert await keys_under(backend, fmt.commits_prefix("0")) == commits - folded
    assert await keys_under(backend, fmt.checkpoints_prefix("0")) == {fmt.checkpoint_key("0", ckpt)}
    assert await contents(backend) == before
    async with driver_of(backend) as driver:
        assert await verify(driver) == []
    await fill(backend)  # a writer continues the collected store
    after = await contents(backend)
    assert after[0][:len(before[0])] == before[0]


async def test_superseded_segments_of_the_current_epoch_go_after_the_grace_period(
        backend: apersist.Backend) -> None:
    """A table's snapshot supersedes its deltas: committed once, in the newest commit's own
    epoch, so only their numbers (at most the last committed one) say they are garbage."""
    async with apersist.run(apersist.Config(backend)) as run:
        counts = await run.table("counts")
        for i in range(3):
            counts[f"k{i}"] = i
            await run.commit()
        deltas = {seg.ref.key for seg in run._store.segments(fmt.KIND_TABLE, "counts")}
        await run.compact()  # folds the table into a snapshot, writes a checkpoint
        await run.stream("orders").record("x")
    assert len(deltas) == 3
    orphan = fmt.segment_key("0", 1, 999)  # numbered above every committed one: in flight
    async with driver_of(backend) as driver:
        await driver.put(orphan, b"junk")
    before = await contents(backend)
    first = await gc(backend, now_ms=T0)
    assert deltas <= set(first.new)
    assert orphan not in first.new
    assert (await gc(backend, now_ms=T0 + GRACE_MS - 1)).due == ()
    assert deltas <= set(await segment_keys(backend))
    late = await gc(backend, now_ms=T0 + GRACE_MS)
    assert deltas <= set(late.due)
    assert not deltas & set(await segment_keys(backend))
    assert orphan in await segment_keys(backend)
    assert await contents(backend) == before == (["x"], {"k0": 0, "k1": 1, "k2": 2}, None)


async def test_leftover_scratch_keys_go_only_at_a_second_sighting_even_with_no_grace(
        backend: apersist.Backend) -> None:
    await fill(backend)
    scratch = "_check/" + "c" * 32
    async with driver_of(backend) as driver:
        await driver.put(scratch, b"apersist create-if-absent check: racer=0 token=x")
    before = await contents(backend)
    first = await gc(backend, now_ms=T0, grace_ms=0)
    assert first.due == ()
    assert first.waiting == {scratch: T0}  # a probe may be in progress: never at once
    assert await marks(backend) == {scratch: T0}
    assert (await gc(backend, now_ms=T0 + GRACE_MS - 1)).due == ()
    assert scratch in await stored_objects(backend)
    assert (await gc(backend, now_ms=T0 + GRACE_MS)).due == (scratch,)
    assert scratch not in await stored_objects(backend)
    assert await contents(backend) == before


async def test_a_fenced_writers_old_checkpoint_written_again_after_gc_is_never_a_start(
        backend: apersist.Backend) -> None:
    """A fenced writer may write the checkpoint of its own (older) state again after gc
    collected the commits that follow it: readers (and gc) start from the newest one, so
    the store neither opens older nor reports a gap; the next gc collects it again."""
    old_ckpt, ckpt = await checkpointed_history(backend)
    before = await contents(backend)
    async with driver_of(backend) as driver:
        old = await driver.get(fmt.checkpoint_key("0", old_ckpt))
    assert (await gc(backend, now_ms=T0, grace_ms=0)).checkpoint_seq == ckpt
    assert fmt.commit_key("0", old_ckpt + 1) not in await stored_objects(backend)  # a gap
    async with driver_of(backend) as driver:
        await driver.put(fmt.checkpoint_key("0", old_ckpt), old)  # the zombie's, again
    assert await contents(backend) == before
    again = await gc(backend, now_ms=T0, grace_ms=0)
    assert again.checkpoint_seq == ckpt
    assert fmt.checkpoint_key("0", old_ckpt) in again.due
    assert await contents(backend) == before


@pytest.mark.parametrize("kind", ["filesystem"])  # the only driver with temporary files
async def test_leftover_temporary_files_go_only_at_a_second_sighting_even_with_no_grace(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, request)
    assert isinstance(backend, FilesystemBackend)
    await fill(backend)
    names = ["writers/0/segments/.tmp-" + "a" * 32, "writers/0/commits/.tmp-" + "b" * 32]
    for name in names:
        (backend.path / name).write_bytes(b"torn")
    before = await contents(backend)
    first = await gc(backend, now_ms=T0, grace_ms=0)
    assert first.due == ()
    assert first.waiting == dict.fromkeys(names, T0)
    assert await marks(backend) == dict.fromkeys(names, T0)
    assert (await gc(backend, now_ms=T0 + GRACE_MS - 1)).due == ()
    assert all((backend.path / name).exists() for name in names)
    assert set((await gc(backend, now_ms=T0 + GRACE_MS)).due) == set(names)
    assert not any((backend.path / name).exists() for name in names)
    assert await marks(backend) == {}
    assert await contents(backend) == before


async def test_the_filesystem_driver_deletes_only_temporary_files_with_that_verb(
        tmp_path: Path) -> None:
    driver = open_driver(FilesystemBackend(tmp_path))
    try:
        await driver.put("writers/0/x", b"x")
        (tmp_path / "writers/0/.tmp-1").write_bytes(b"t")
        found = await driver.list_temporary()  # type: ignore[attr-defined]
        assert [(i.key, i.size) for i in found] == [("writers/0/.tmp-1", 1)]
        assert [i.key async for i in driver.list("")] == ["writers/0/x"]
        for bad in ("writers/0/x", "writers/../.tmp-1", ".tmp-", "/writers/.tmp-1"):
            with pytest.raises(ValueError, match="not a temporary file"):
                await driver.delete_temporary([bad])  # type: ignore[attr-defined]
        await driver.delete_temporary(["writers/0/.tmp-1", "writers/0/.tmp-2"])  # type: ignore[attr-defined]
        assert await driver.list_temporary() == []  # type: ignore[attr-defined]
        assert await driver.get("writers/0/x") == b"x"
    finally:
        await driver.aclose()


# ------------------------------------------------------------------ the zombie boundary
async def test_a_zombie_cannot_land_a_commit_once_gc_collected_the_folded_commits(
        backend: apersist.Backend) -> None:
    """Writer A (epoch 1) is taken over by B, which commits many times and checkpoints; gc
    with no grace deletes every folded commit record but the fence commits. A's next
    commit number is B's fence commit, kept: A is fenced and lands nothing."""
    config = apersist.Config(backend)
    facts: dict[str, int] = {}

    async def a_is_taken_over() -> None:
        async with apersist.run(config) as a:
            a_orders = a.stream("orders")
            for i in range(3):
                await a_orders.record(f"a{i}", offset=i)
                await a.commit()
            assert a._store.epoch is not None
            facts.update(epoch=a._store.epoch, last=a._store.last_seq)
            async with apersist.run(config) as b:
                b_fence = b._store.fences[-1]
                for i in range(10):
                    await b.stream("orders").record(f"b{i}", offset=100 + i)
                    await b.commit()
                ckpt = await b._store.write_checkpoint()
            plan = await gc(backend, now_ms=T0, grace_ms=0)
            assert plan.checkpoint_seq == ckpt
            assert b_fence == facts["last"] + 1  # A's next number: B's fence commit
            kept = {fmt.commit_key("0", 1), fmt.commit_key("0", b_fence)}
            assert set(plan.due) >= {fmt.commit_key("0", n) for n in range(1, ckpt + 1)} - kept
            assert await keys_under(backend, fmt.commits_prefix("0")) == kept
            await a_orders.record("zombie", offset=999)
            with pytest.raises(apersist.FencedError):
                await a.commit()
            facts["fenced"] = 1
            # Leaving A's block commits again, and raises FencedError too.

    with pytest.raises(apersist.FencedError):
        await a_is_taken_over()
    assert facts["fenced"] == 1
    a_epoch, a_last = facts["epoch"], facts["last"]
    events, _table, offset = await contents(backend)
    assert events == [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(10)]
    assert offset == 109
    async with driver_of(backend) as driver:
        for key in await keys_under(backend, fmt.commits_prefix("0")):
            record = fmt.CommitRecord.decode(key, await driver.get(key))
            assert record.epoch != a_epoch or record.seq <= a_last, key
