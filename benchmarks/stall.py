"""Loop stalls: how long apersist holds the event loop, on every path a producer takes.

A 1 ms ticker task (``common.Ticker``) notes how late each of its wake-ups is. Beside it a
producer that **never yields by itself** (it awaits nothing but apersist) drives one path
at a time:

- ``await stream.record(v)`` per event; the same with ``offset=i``; ``await
  stream.record_many(chunk)`` over chunks of 1,000; each with group commit
  (``snapshot_interval_ms=0``) behind it and the final ``run.commit()``;
- the job's loop (``job.py``): a table write per event of a ``run.source()`` loop; the
  ``run.source()`` loop alone; the ``run.source_batches()`` loop; their readers are async
  generators that await nothing;
- ``async for e in stream.replay()`` over what ``record()`` wrote;
- explicit ``run.commit()`` of N/5-event batches (the ticker counted during the commits
  only: the record loop between them is the producer's).

Any lateness is then apersist's: the loop only runs the ticker when apersist hands it
over. The worst lateness per path is the row's value (target ≤ 5 ms); the ticker on an
idle loop, for as long as the ``record()`` path took, is the baseline: what the machine
does to a ticker on its own. A last figure: with ``snapshot_interval_ms=100``, the worst
gap between two commits (``run.stats["commits"]`` sampled every millisecond) during a
non-yielding ``run.source()`` loop with table writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import apersist

from . import job
from .common import STREAM, Report, Row, Series, Settings, Stores, Target, Window, log, percentile, ticking

STALL_TARGET_MS = 5.0
STALL_BATCHES = 5  # explicit-commit stall: N/5 events per committed batch
CHUNK = 1000  # record_many: values per call
GAP_INTERVAL_MS = 100  # the commit-gap figure's snapshot_interval_ms

Values = Sequence[Any]
Path_ = Callable[[apersist.Run], Awaitable[None]]  # one producer path, inside a run


def config(root: Path, **options: Any) -> apersist.Config:
    return apersist.Config(apersist.Backend.filesystem(root), **options)


# --------------------------------------------------------------------------- the paths


def record_path(values: Values) -> Path_:
    async def produce(run: apersist.Run) -> None:
        record = run.stream(STREAM).record
        for value in values:
            await record(value)
    return produce


def record_offset_path(values: Values) -> Path_:
    async def produce(run: apersist.Run) -> None:
        record = run.stream(STREAM).record
        for i, value in enumerate(values):
            await record(value, offset=i)
    return produce


def record_many_path(values: Values) -> Path_:
    chunks = [values[i:i + CHUNK] for i in range(0, len(values), CHUNK)]

    async def produce(run: apersist.Run) -> None:
        record_many = run.stream(STREAM).record_many
        for chunk in chunks:
            await record_many(chunk)
    return produce


def source_table_path(rows: int) -> Path_:
    """The job's per-event loop: a table write per live event."""
    async def produce(run: apersist.Run) -> None:
        await job.per_event_loop(run, rows)
    return produce


def source_path(rows: int) -> Path_:
    """The ``run.source()`` loop itself: nothing done per event."""
    async def produce(run: apersist.Run) -> None:
        async for _ev in run.source(job.SOURCE, job.reader(rows)):
            pass
    return produce


# Rows per batch in the stall path: the reader that builds a batch and the loop body that
# sums it are the program's own work between two schedule points (about 0.5 µs a row
# here), which apersist cannot cut; 1,000 rows keep that near half a millisecond.
STALL_BATCH_ROWS = 1000


def source_batches_path(rows: int) -> Path_:
    """The job's batch form: each batch summed into a dict, then written key by key."""
    async def produce(run: apersist.Run) -> None:
        await job.batch_loop(run, rows, STALL_BATCH_ROWS)
    return produce


async def timed_path(root: Path, produce: Path_) -> tuple[list[float], Window]:
    """Ticker lags (ms) while ``produce`` runs in a fresh run on ``root``, with group commit
    behind it, and its final commit."""
    async with apersist.run(config(root, snapshot_interval_ms=0)) as run, ticking() as ticker:
        opened = await ticker.resync()
        await produce(run)
        await run.commit()
        window = (opened, time.perf_counter())
        await ticker.resync()
    return ticker.lags_ms([window]), window


async def replay_lags(root: Path, expected: int) -> list[float]:
    """Ticker lags (ms) while ``stream.replay()`` yields every event of ``root``, read-only."""
    access = apersist.SnapshotAccess.REPLAY
    async with apersist.run(config(root, snapshot_access=access)) as run, ticking() as ticker:
        count = 0
        opened = await ticker.resync()
        async for _event in run.stream(STREAM).replay():
            count += 1
        window = (opened, time.perf_counter())
        await ticker.resync()
    if count != expected:
        raise RuntimeError(f"replay yielded {count} events, expected {expected}")
    return ticker.lags_ms([window])


async def stall_explicit(root: Path, values: Values, batches_: int) -> tuple[list[float], list[Window]]:
    """Ticker lag (ms) during explicit commits of ``len(values) / batches_`` events each.

    Only commits count: the record loop never yields, so the lateness it causes belongs
    to the producer, and the windows open after it.
    """
    size = max(1, len(values) // batches_)
    windows: list[Window] = []
    # A long interval: only the explicit commits write.
    async with apersist.run(config(root, snapshot_interval_ms=3_600_000)) as run, ticking() as ticker:
        record = run.stream(STREAM).record
        for first in range(0, size * batches_, size):
            for value in values[first:first + size]:
                await record(value)
            opened = await ticker.resync()
            await run.commit()
            windows.append((opened, time.perf_counter()))
            await ticker.resync()
    return ticker.lags_ms(windows), windows


async def stall_idle(duration: float) -> list[float]:
    """Ticker lag (ms) on an idle loop for ``duration`` seconds: the machine's noise."""
    async with ticking() as ticker:
        opened = await ticker.resync()
        await asyncio.sleep(duration)
        window = (opened, time.perf_counter())
        await ticker.resync()
    return ticker.lags_ms([window])


@contextlib.asynccontextmanager
async def commit_times(run: apersist.Run) -> AsyncIterator[list[float]]:
    """Times at which ``run.stats["commits"]`` was seen to grow, sampled every 1 ms."""
    seen: list[float] = []

    async def sample() -> None:
        last = run.stats["commits"]
        while True:
            await asyncio.sleep(0.001)
            now = run.stats["commits"]
            if now != last:
                seen.append(time.perf_counter())
                last = now

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def commit_gap_ms(root: Path, rows: int) -> tuple[float, int]:
    """The worst gap (ms) between commits, and their number, during a non-yielding job loop
    with ``snapshot_interval_ms=100``; the loop's start counts as the first commit."""
    async with apersist.run(config(root, snapshot_interval_ms=GAP_INTERVAL_MS)) as run, \
            commit_times(run) as seen:
        await asyncio.sleep(0.002)  # the sampler's first reading
        started = time.perf_counter()
        await source_table_path(rows)(run)
        ended = time.perf_counter()
    during = [started, *(t for t in seen if started < t <= ended), ended]
    return max(b - a for a, b in itertools.pairwise(during)) * 1000, len(during) - 2


# --------------------------------------------------------------------------- the section


async def section_stall(values: Values, settings: Settings, stores: Stores, report: Report) -> None:
    reps, n = settings.repeats, len(values)
    # Made afresh for each run: a path's closures hold nothing between runs.
    paths: list[tuple[str, Callable[[], Path_]]] = [
        (f"`await stream.record(v)`, {n:,} events", lambda: record_path(values)),
        (f"`await stream.record(v, offset=i)`, {n:,} events", lambda: record_offset_path(values)),
        (f"`await stream.record_many(chunk)`, chunks of {CHUNK:,}", lambda: record_many_path(values)),
        (f"a table write per event of a `run.source()` loop, {n:,} rows (the job)",
         lambda: source_table_path(n)),
        (f"the `run.source()` loop alone, {n:,} rows", lambda: source_path(n)),
        (f"the `run.source_batches()` loop (the job's batch form, batches of "
         f"{STALL_BATCH_ROWS:,}), {n:,} rows",
         lambda: source_batches_path(n)),
    ]
    if not hasattr(apersist.Stream, "record_many"):
        paths = [p for p in paths if "record_many" not in p[0]]
    if not job.has_batches():
        paths = [p for p in paths if "source_batches" not in p[0]]
    lags: dict[str, list[float]] = {name: [] for name, _ in paths}
    p99: dict[str, list[float]] = {name: [] for name, _ in paths}
    replay = f"`async for e in stream.replay()` over the {n:,} events `record()` wrote"
    lags[replay], p99[replay] = [], []
    d: dict[str, list[float]] = {k: [] for k in ("explicit_max", "explicit_p99", "idle_max",
                                                 "idle_p99", "gap")}
    commits: list[int] = []
    store = stores.new("stall-warmup")
    small = values[:settings.warmup_events]
    await stall_explicit(store / "explicit", small, STALL_BATCHES)
    for i, (_name, make) in enumerate(paths):
        await timed_path(store / f"path-{i}", make())
    stores.drop(store)
    for rep in range(reps):
        log(f"stall: repeat {rep + 1}/{reps}")
        store = stores.new("stall-explicit")
        explicit, windows = await stall_explicit(store, values, STALL_BATCHES)
        stores.drop(store)
        d["explicit_max"].append(max(explicit, default=0.0))
        d["explicit_p99"].append(percentile(explicit, 99) if explicit else 0.0)
        idle_for = 0.0
        for name, make in paths:
            store = stores.new("stall-path")
            got, (opened, closed) = await timed_path(store, make())
            if name == paths[0][0]:  # record(): replayed next, and the idle baseline's length
                idle_for = closed - opened
                got_replay = await replay_lags(store, n)
                lags[replay].append(max(got_replay, default=0.0))
                p99[replay].append(percentile(got_replay, 99) if got_replay else 0.0)
            stores.drop(store)
            lags[name].append(max(got, default=0.0))
            p99[name].append(percentile(got, 99) if got else 0.0)
        idle = await stall_idle(idle_for or sum(b - a for a, b in windows))
        d["idle_max"].append(max(idle, default=0.0))
        d["idle_p99"].append(percentile(idle, 99) if idle else 0.0)
        store = stores.new("stall-gap")
        gap, count = await commit_gap_ms(store, n)
        stores.drop(store)
        d["gap"].append(gap)
        commits.append(count)
    title = "worst loop stall (1 ms ticker)"
    bound = [Target(None, at_most=STALL_TARGET_MS)]
    idle_max = Series("idle loop, as long as record()", d["idle_max"])
    batch = n // STALL_BATCHES
    report.rows += [
        Row(f"{title}, explicit commits of {batch:,}-event batches: max", "stall", "ms",
            Series("max lag", d["explicit_max"], "apersist"),
            [Series("idle loop, as long", d["idle_max"])], bound),
        Row(f"{title}, explicit commits of {batch:,}-event batches: p99", "stall", "ms",
            Series("p99 lag", d["explicit_p99"], "apersist"),
            [Series("idle loop, as long", d["idle_p99"])]),
    ]
    for name in lags:
        report.rows.append(Row(
            f"{title}, a producer that never yields by itself: {name}", "stall", "ms",
            Series("max lag", lags[name], "apersist"), [idle_max], bound,
            note=(f"p99 lag per repeat: {', '.join(f'{x:.2f}' for x in p99[name])} ms; "
                  "snapshot_interval_ms=0 (group commit), the final commit included"
                  if name != replay else
                  f"p99 lag per repeat: {', '.join(f'{x:.2f}' for x in p99[name])} ms; "
                  "a read-only run")))
    report.rows.append(Row(
        f"worst gap between commits, snapshot_interval_ms={GAP_INTERVAL_MS}, during a job loop "
        f"that never yields by itself ({n:,} rows)", "stall", "ms",
        Series("worst gap", d["gap"], "apersist"),
        note=f"commits during the loop per repeat: {commits}; sampled every 1 ms"))
