"""The crash points of ``FaultyDriver``, in-process, on the memory and filesystem stores.

A run goes through ``FaultyDriver(real driver)`` planned with ``crash_at(point, nth=...,
on_crash=...)``: instead of killing pytest, the driver freezes at that step of the Nth
commit (or of taking the writer role), as a kill -9 would leave the storage. The next run,
on the real driver, must open without error and replay exactly the commits that became
durable: the in-flight commit is absent unless its record landed (``after_commit_put``:
present, although the writer never got the ack); leftover segment objects, whole or torn,
are ignored. The maintenance points strike inside ``run.compact()`` (its commit carrying
merges, its checkpoint): the store opens on the older checkpoint, or with merged segments
no commit names. Also: the same seed and calls give the
same faults and the same crash; bad plans raise ``ValueError``; a frozen driver refuses
every call and changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import make_backend

import apersist
from apersist import _format as fmt
from apersist import _maintenance as maintenance
from apersist._config import FilesystemBackend, MemoryBackend
from apersist._drivers import Driver, MemoryDriver, open_driver
from apersist.testing import CRASH_POINTS, FaultyDriver, SimulatedCrash

KINDS = ["memory", "filesystem"]
STREAMS = ("a", "b")  # two streams: every commit of these tests uploads exactly two segments
EPOCH_POINTS = ("before_epoch_put", "after_epoch_put")
MAINTENANCE_POINTS = ("before_rewrite_commit_put", "after_rewrite_commit_put",
                      "after_checkpoint_put")
COMMIT_POINTS = tuple(p for p in CRASH_POINTS
                      if p not in EPOCH_POINTS and p not in MAINTENANCE_POINTS)
# How often a commit of two segments reaches each point, whichever order the uploads start
# and land in (mid_commit: when the second starts after the first landed, or when the first
# lands while the second is in flight; only one of the two can happen).
ARRIVALS_PER_COMMIT = {"after_segment_put": 2, "torn_segment": 2, "mid_commit": 1,
                       "before_commit_put": 1, "after_commit_put": 1}
SEGMENTS = fmt.segments_prefix("0")
EPOCHS = fmt.epochs_prefix("0")
CHECKPOINTS = fmt.checkpoints_prefix("0")


def config(backend: apersist.Backend) -> apersist.Config:
    # No timed commits: the only commits are the fence made while opening and ours.
    return apersist.Config(backend, snapshot_interval_ms=3_600_000)


class FaultyRuns:
    """Drivers for runs that go through ``FaultyDriver(real)``: ``driver(config)`` makes
    one (``plan`` is applied to each before the run uses it); ``made`` lists them in order."""

    def __init__(self, plan: Callable[[FaultyDriver], None] | None = None) -> None:
        self.plan = plan
        self.made: list[FaultyDriver] = []

    def driver(self, config: apersist.Config) -> FaultyDriver:
        faulty = FaultyDriver(open_driver(config.backend, config))
        if self.plan is not None:
            self.plan(faulty)
        self.made.append(faulty)
        return faulty


async def record_round(run: apersist.Run, c: int) -> None:
    """Round ``c``: the value ``c`` at offset ``c`` on every stream."""
    for name in STREAMS:
        await run.stream(name).record(c, offset=c)


async def objects(backend: apersist.Backend, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` and its size, through the real driver."""
    driver = open_driver(backend)
    try:
        return {info.key: info.size async for info in driver.list(prefix)}
    finally:
        await driver.aclose()


async def check_store(backend: apersist.Backend, rounds: int, ctx: str) -> None:
    """A clean run opens the store and replays rounds 1..``rounds`` on every stream; then
    it commits round ``rounds + 1``, and the run after it replays that too."""
    for expected in (rounds, rounds + 1):
        async with apersist.run(config(backend)) as run:
            for name in STREAMS:
                stream = run.stream(name)
                got = [(e.value, e.offset) async for e in stream.replay()]
                want = [(c, c) for c in range(1, expected + 1)]
                assert got == want, f"{ctx}: stream={name} replayed={got} expected={want}"
                assert stream.offset == (expected or None), f"{ctx}: stream={name}"
            if expected == rounds:
                # The new writer goes on past whatever the crash left: its keys never collide.
                await record_round(run, rounds + 1)
                await run.commit()


async def crash_in_commit(backend: apersist.Backend, runs: FaultyRuns, point: str,
                          nth_commit: int) -> tuple[list[str], list[int], str]:
    """Commit rounds 1..N-1, then crash at ``point`` during the commit of round N.

    Returns the points ``on_crash`` was called with, the rounds whose commit returned, and
    what the commit of round N raised.
    """
    crashes: list[str] = []
    acknowledged: list[int] = []
    message = "the commit returned"
    cfg = config(backend)
    driver = runs.driver(cfg)
    try:
        async with apersist.run(cfg, driver=driver) as run:
            # Counted from now: the fence commit made while opening is none of the N.
            nth = ARRIVALS_PER_COMMIT[point] * (nth_commit - 1) + 1
            driver.crash_at(point, nth=nth, on_crash=crashes.append)
            for c in range(1, nth_commit):
                await record_round(run, c)
                await run.commit()
                acknowledged.append(c)
            await record_round(run, nth_commit)
            try:
                await run.commit()
            except SimulatedCrash as exc:
                message = str(exc)
    except SimulatedCrash:
        pass  # leaving a crashed run fails too: its final commit meets the dead driver
    else:
        pytest.fail(f"leaving a crashed run did not fail: point={point} nth_commit={nth_commit}")
    finally:
        await driver.aclose()  # given to the run, so ours to close; never faulty
    return crashes, acknowledged, message


# A small commit carries its segments inline (format 5.0): its only step is the record's
# create. Each commit point is hit with segment objects, and the record's with inline ones.
LAYOUTS = [("objects", p) for p in COMMIT_POINTS] + [
    ("inline", p) for p in ("before_commit_put", "after_commit_put")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("layout", "point"), LAYOUTS)
@pytest.mark.parametrize("nth_commit", [1, 3])
async def test_crash_during_nth_commit(kind: str, layout: str, point: str, nth_commit: int,
                                       tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if layout == "objects":
        request.getfixturevalue("segment_objects")
    backend = make_backend(kind, tmp_path, request)
    runs = FaultyRuns()
    made = runs.made
    crashes, acknowledged, message = await crash_in_commit(backend, runs, point, nth_commit)
    ctx = f"kind={kind} layout={layout} point={point} nth_commit={nth_commit}"
    assert crashes == [point], ctx
    assert made[0].crashed == point, ctx
    assert acknowledged == list(range(1, nth_commit)), ctx
    assert f" point={point} " in message, f"{ctx}: the commit did not fail at the crash: {message}"

    # Before the next open: what the crash left beside the committed segments.
    committed_segments = 2 * (nth_commit if point == "after_commit_put" else nth_commit - 1)
    stored = await objects(backend, SEGMENTS)
    leftovers = len(stored) - committed_segments
    if layout == "inline":
        assert stored == {}, f"{ctx}: inline segments have no objects"
    elif point == "after_commit_put":
        assert leftovers == 0, f"{ctx}: every segment is named by the durable commit"
    elif point == "before_commit_put":
        assert leftovers == 2, f"{ctx}: both segments landed, no commit names them"
    else:
        # The other upload may have been in flight at the crash, and landed or not.
        assert 1 <= leftovers <= 2, f"{ctx}: stored={sorted(stored)}"

    kept = nth_commit if point == "after_commit_put" else nth_commit - 1
    await check_store(backend, kept, ctx)
    if point == "torn_segment":
        # The torn object is still there, shorter than any whole segment of this test
        # (each holds one record of the same shape: a one-digit value and offset).
        match = re.search(r" key=(\S+) ", message)
        assert match is not None, f"{ctx}: the crash names no key: {message}"
        sizes = await objects(backend, SEGMENTS)
        torn = sizes.pop(match[1])
        assert 0 < torn < min(sizes.values()), f"{ctx}: torn={torn} whole={sizes}"


async def open_and_leave(backend: apersist.Backend, runs: FaultyRuns) -> None:
    cfg = config(backend)
    driver = runs.driver(cfg)
    try:
        async with apersist.run(cfg, driver=driver):
            pass
    finally:
        await driver.aclose()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("point", EPOCH_POINTS)
async def test_crash_while_taking_the_writer_role(kind: str, point: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, request)
    async with apersist.run(config(backend)) as run:
        await record_round(run, 1)
    epochs_before = await objects(backend, EPOCHS)
    crashes: list[str] = []
    runs = FaultyRuns(lambda faulty: faulty.crash_at(point, on_crash=crashes.append))
    made = runs.made
    with pytest.raises(SimulatedCrash, match=f"point={point} "):
        await open_and_leave(backend, runs)
    assert crashes == [point]
    assert made[0].crashed == point
    # after_epoch_put: the epoch record is durable, though its writer never committed.
    orphans = 1 if point == "after_epoch_put" else 0
    epochs = await objects(backend, EPOCHS)
    assert len(epochs) == len(epochs_before) + orphans, f"epochs={sorted(epochs)}"
    await check_store(backend, 1, f"kind={kind} point={point}")
    # Each of the two clean runs took a newer epoch than any the crash left.
    taken = sorted(set(await objects(backend, EPOCHS)) - set(epochs))
    assert len(taken) == 2, f"epochs={sorted(epochs)} taken={taken}"
    assert taken[0] > max(epochs), f"epochs={sorted(epochs)} taken={taken}"


# ------------------------------------------------------------------ the driver alone


async def outcome(call: Awaitable[object]) -> str:
    """``ok``, or the error a call raised, by type and message."""
    try:
        await call
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


async def commit_like_calls(seed: int) -> tuple[list[tuple[str, str, str]], str | None,
                                                 list[str], dict[str, bytes]]:
    """Commit-shaped calls (three segments, then a commit record, six times) on a fresh
    memory store through a faulty driver that crashes at ``mid_commit``, nth=4."""
    store: dict[str, bytes] = {}
    faulty = FaultyDriver(MemoryDriver(store), seed=seed, lost_response=0.15, timeout=0.1,
                          torn_write=0.1, latency=0.1, max_latency_s=0.0)
    crashes: list[str] = []
    faulty.crash_at("mid_commit", nth=4, on_crash=crashes.append)
    results: list[str] = []
    number = 0
    for seq in range(1, 7):
        for _ in range(3):
            number += 1
            data = f"segment {number} ".encode() * 20
            results.append(await outcome(faulty.put(fmt.segment_key("0", 1, number), data)))
        results.append(await outcome(faulty.put(fmt.commit_key("0", seq), b"{}", if_absent=True)))
    assert crashes == (["mid_commit"] if faulty.crashed else [])
    return faulty.faults, faulty.crashed, results, store


async def test_same_seed_same_faults_and_same_crash() -> None:
    first = await commit_like_calls(seed=1)
    assert await commit_like_calls(seed=1) == first
    faults, crashed, results, _ = first
    assert crashed == "mid_commit"
    assert faults, "the seed must inject some faults before the crash"
    # After the crash every call refuses, and says where the crash was.
    crashed_at = next(i for i, r in enumerate(results) if r.startswith("SimulatedCrash"))
    assert all(r.startswith("SimulatedCrash") and "point=mid_commit" in r
               for r in results[crashed_at:])
    # Another seed draws other faults: the seed, not luck, decides them.
    assert (await commit_like_calls(seed=4))[0] != faults


async def test_a_later_plan_replaces_the_earlier_one_and_counts_from_then() -> None:
    store: dict[str, bytes] = {}
    faulty = FaultyDriver(MemoryDriver(store))
    crashes: list[str] = []
    faulty.crash_at("after_commit_put", nth=3, on_crash=crashes.append)
    for seq in (1, 2):
        await faulty.put(fmt.commit_key("0", seq), b"x", if_absent=True)
    # Replaces the plan above, which was one commit record away from crashing; the two
    # arrivals so far do not count for the new one.
    faulty.crash_at("before_commit_put", nth=2, on_crash=crashes.append)
    await faulty.put(fmt.commit_key("0", 3), b"x", if_absent=True)
    with pytest.raises(SimulatedCrash, match="point=before_commit_put "):
        await faulty.put(fmt.commit_key("0", 4), b"x", if_absent=True)
    assert crashes == ["before_commit_put"]
    assert sorted(store) == [fmt.commit_key("0", seq) for seq in (1, 2, 3)]


async def test_nth_1_is_the_very_next_arrival() -> None:
    store: dict[str, bytes] = {}
    faulty = FaultyDriver(MemoryDriver(store))
    faulty.crash_at("before_commit_put", on_crash=lambda point: None)
    await faulty.put("other/key", b"x")  # not a commit record: does not count
    with pytest.raises(SimulatedCrash, match="point=before_commit_put "):
        await faulty.put(fmt.commit_key("0", 1), b"1", if_absent=True)
    assert sorted(store) == ["other/key"]


@pytest.mark.parametrize("point", ["", "after_commit", "AFTER_COMMIT_PUT", "now", None])
def test_unknown_crash_point_is_refused(point: object) -> None:
    faulty = FaultyDriver(MemoryDriver({}))
    with pytest.raises(ValueError, match="unknown crash point: point="):
        faulty.crash_at(point, nth=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("nth", [0, -1, True, 1.5, "2", None])
def test_bad_nth_is_refused(nth: object) -> None:
    faulty = FaultyDriver(MemoryDriver({}))
    with pytest.raises(ValueError, match="nth must be a positive int: nth="):
        faulty.crash_at("mid_commit", nth=nth)  # type: ignore[arg-type]


def snapshot(backend: apersist.Backend) -> dict[str, bytes]:
    """Every byte the store holds: its objects, or every file under its directory."""
    if isinstance(backend, MemoryBackend):
        return dict(backend.objects)
    assert isinstance(backend, FilesystemBackend)
    root = backend.path
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_frozen_driver_refuses_everything_and_changes_nothing(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, request)
    faulty = FaultyDriver(open_driver(backend), seed=1, lost_response=0.5)
    faulty.enabled = False  # no random faults while the store is filled
    await faulty.put("k/one", b"one")
    await faulty.put(fmt.segment_key("0", 1, 1), b"segment")
    await faulty.put(fmt.commit_key("0", 1), b"commit", if_absent=True)
    before = snapshot(backend)
    faulty.enabled = True
    faulty.freeze()
    assert faulty.crashed == "now"
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "put": lambda: faulty.put("k/one", b"changed"),
        "put new": lambda: faulty.put("k/two", b"new"),
        "put if_absent": lambda: faulty.put("k/three", b"new", if_absent=True),
        "put segment": lambda: faulty.put(fmt.segment_key("0", 1, 2), b"segment"),
        "put commit": lambda: faulty.put(fmt.commit_key("0", 2), b"commit", if_absent=True),
        "get": lambda: faulty.get("k/one"),
        "ranged get": lambda: faulty.get("k/one", start=0, end=1),
        "list": lambda: _drain(faulty, "k/"),
        "delete": lambda: faulty.delete(["k/one"]),
    }
    for what, call in calls.items():
        with pytest.raises(SimulatedCrash, match="injected: the process crashed: op="):
            await call()
        assert snapshot(backend) == before, f"a frozen driver changed the store: call={what}"
    assert faulty.faults == [], "a frozen driver draws no faults"
    faulty.freeze("later")
    assert faulty.crashed == "now", "the first crash is the one that counts"
    await faulty.aclose()


async def _drain(driver: Driver, prefix: str) -> list[str]:
    return [info.key async for info in driver.list(prefix)]


def test_every_crash_point_is_one_the_campaign_knows() -> None:
    # The campaign and these tests cover CRASH_POINTS by name: a new point needs both.
    assert set(CRASH_POINTS) == (set(EPOCH_POINTS) | set(ARRIVALS_PER_COMMIT)
                                 | set(MAINTENANCE_POINTS))


# ------------------------------------------------------------------ maintenance


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("point", MAINTENANCE_POINTS)
async def test_crash_during_compact(kind: str, point: str, tmp_path: Path,
                                    request: pytest.FixtureRequest,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``run.compact()`` (a commit, a commit carrying merges, a checkpoint) crashed at each
    of its steps, the second time it runs: the store opens on what the crash left (the
    older checkpoint, merged segments no commit names) and replays every committed round
    once."""
    # Only compact() merges and checkpoints: the background's timing decides nothing here.
    monkeypatch.setattr(maintenance, "MERGE_LOOK_EVERY", 1 << 30)
    backend = make_backend(kind, tmp_path, request)
    rounds = 2 * (maintenance.FANOUT + 4)
    crashes: list[str] = []
    cfg = config(backend)
    runs = FaultyRuns()
    driver = runs.driver(cfg)
    first_checkpoint = 0
    message = "compact() returned"
    try:
        async with apersist.run(cfg, driver=driver) as run:
            for c in range(1, rounds + 1):
                await record_round(run, c)
                await run.commit()
                if c == rounds // 2:
                    # A clean compact first: the crash below leaves its checkpoint.
                    await run.compact()
                    first_checkpoint = run._store.checkpoint_seq
            merged_before = len(run._store.segments(fmt.KIND_EVENTS, "a"))
            driver.crash_at(point, on_crash=crashes.append)
            try:
                await run.compact()
            except SimulatedCrash as exc:
                message = str(exc)
    except SimulatedCrash:
        pass  # leaving a crashed run fails too: its final commit meets the dead driver
    finally:
        await driver.aclose()
    ctx = f"kind={kind} point={point}"
    assert crashes == [point], ctx
    assert f" point={point} " in message, f"{ctx}: compact did not fail at the crash: {message}"
    assert first_checkpoint > 0, ctx

    # What the crash left, before the next open.
    checkpoints = sorted(await objects(backend, CHECKPOINTS))
    if point in ("before_rewrite_commit_put", "after_rewrite_commit_put"):
        assert checkpoints == [fmt.checkpoint_key("0", first_checkpoint)], ctx
    else:
        assert len(checkpoints) == 2, f"{ctx}: checkpoints={checkpoints}"
    # The store reads the rewrite commit if its record landed, and never its leftovers.
    segments = (await store_segments(backend))["a"]
    if point == "before_rewrite_commit_put":
        assert len(segments) == merged_before, f"{ctx}: no merge landed"
    else:
        assert len(segments) < merged_before, f"{ctx}: the merge landed"
    await check_store(backend, rounds, ctx)


async def store_segments(backend: apersist.Backend) -> dict[str, list[str]]:
    """Each stream's live segment keys, as a run opening the store now reads them."""
    cfg = apersist.Config(backend, snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(cfg) as run:
        store = run._store
        return {name: [seg.ref.key for seg in store.segments(fmt.KIND_EVENTS, name)]
                for name in STREAMS}
