"""The headline workload: Pathway's own persistence job, done by apersist (and by Pathway).

A source emits rows ``{"k": i % 1000, "v": i, "s": "abc"}`` with offsets ``i``; the job
keeps a count and a sum of ``v`` per ``k`` in a table ``{str(k): [count, sum]}``, on the
filesystem with ``snapshot_interval_ms=0``. Measured, each from entering ``apersist.run``
to leaving the block (everything durable):

- record, per event: ``async for ev in run.source("input", reader)``, one table write per
  live event;
- record, batch form: ``run.source_batches()`` over batches of 10,000 rows, each batch
  summed into a plain dict first, then each changed key written once;
- restore: the same per-event program run again over the per-event store; the reader has
  nothing new, the replayed events are skipped, the table is rebuilt from the store;
- the store's size on disk.

The floor is the same loop over the same reader with a plain dict instead of a table and
no run. With ``--peers`` Pathway 0.33.0 runs the identical job in a virtualenv of its own
(``peers/``), in the same repeats, and the rows give the ratios.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import apersist

from .common import Report, Row, Series, Settings, Stores, Target, log, median, rotated

KEYS = 1000  # distinct k
# Rows per batch of the batch form: what one poll of a broker or one page of a query
# returns. Pathway's own connector groups rows for 1.5 s per commit by default, far more.
BATCH_ROWS = 10_000
SOURCE = "input"
TABLE = "counts"
RECORD_TARGET = 2.5  # issue 14: per-event job >= 2.5x Pathway's throughput
BATCH_TARGET = 6.0  # batch form >= 6x
RESTORE_TARGET = 5.0  # restore >= 5x faster than Pathway's

Row_ = dict[str, Any]


# --------------------------------------------------------------------------- the job


def reader(rows: int) -> Callable[[Any], AsyncIterator[tuple[Row_, int]]]:
    """A source of ``rows`` rows, offset ``i`` for row ``i``, resuming after ``offset``."""
    async def read(offset: Any) -> AsyncIterator[tuple[Row_, int]]:
        for i in range(0 if offset is None else offset + 1, rows):
            yield {"k": i % KEYS, "v": i, "s": "abc"}, i
    return read


def batch_reader(rows: int, size: int = BATCH_ROWS) -> Callable[[Any], AsyncIterator[tuple[list[Row_], int]]]:
    """The same rows, ``size`` at a time, each batch with the offset of its last row."""
    async def read(offset: Any) -> AsyncIterator[tuple[list[Row_], int]]:
        for first in range(0 if offset is None else offset + 1, rows, size):
            last = min(rows, first + size)
            yield [{"k": i % KEYS, "v": i, "s": "abc"} for i in range(first, last)], last - 1
    return read


def has_batches() -> bool:
    """True once ``run.source_batches()`` has landed (the suite works before and after)."""
    return hasattr(apersist, "Batch") and hasattr(apersist.Run, "source_batches")


def check_state(state: Any, rows: int) -> None:
    """The job's invariant: every row counted once, every ``v`` summed once."""
    count = sum(c for c, _ in state.values())
    total = sum(s for _, s in state.values())
    if count != rows or total != rows * (rows - 1) // 2 or len(state) != min(rows, KEYS):
        raise RuntimeError(f"job state is wrong: rows={count} expected={rows} keys={len(state)}")


def config(root: Path, **options: Any) -> apersist.Config:
    return apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=0, **options)


async def per_event(root: Path, rows: int) -> dict[str, float]:
    """The per-event job, from entering the run to leaving it; also the restore.

    Run over a store that already holds the rows, it is the restore: the replayed events
    are skipped and the reader resumes after the last offset, with nothing to read.
    """
    started, cpu = time.perf_counter(), time.thread_time()
    async with apersist.run(config(root)) as run:
        check_state(await per_event_loop(run, rows), rows)
    return {"s": time.perf_counter() - started, "cpu_s": time.thread_time() - cpu}


async def per_event_loop(run: apersist.Run, rows: int) -> apersist.Table:
    """The per-event job's loop inside a run (also the stall workload's): a table write
    per live event, the replayed ones skipped."""
    t = await run.table(TABLE)
    async for ev in run.source(SOURCE, reader(rows)):
        if ev.replayed:
            continue
        v = ev.value
        k = str(v["k"])
        c = t.get(k)
        t[k] = [1, v["v"]] if c is None else [c[0] + 1, c[1] + v["v"]]
    return t


async def batch_loop(run: apersist.Run, rows: int, size: int = BATCH_ROWS) -> apersist.Table:
    """The batch form's loop inside a run (also the stall workload's)."""
    t = await run.table(TABLE)
    async for batch in run.source_batches(SOURCE, batch_reader(rows, size)):
        if not batch.replayed:
            add_sums(t, summed(batch.values))
    return t


def summed(values: list[Row_]) -> dict[int, list[int]]:
    """A batch's count and sum of ``v`` per ``k``."""
    sums: dict[int, list[int]] = {}
    for v in values:
        s = sums.get(v["k"])
        if s is None:
            sums[v["k"]] = [1, v["v"]]
        else:
            s[0] += 1
            s[1] += v["v"]
    return sums


def add_sums(t: Any, sums: dict[int, list[int]]) -> None:
    """Add a batch's sums to the table ``t`` (a Table or a dict), one write per key."""
    for key, (n, total) in sums.items():
        k = str(key)
        c = t.get(k)
        t[k] = [n, total] if c is None else [c[0] + n, c[1] + total]


async def batched(root: Path, rows: int) -> dict[str, float]:
    """The batch form: each live batch summed into a dict, then one write per changed key."""
    started, cpu = time.perf_counter(), time.thread_time()
    async with apersist.run(config(root)) as run:
        check_state(await batch_loop(run, rows), rows)
    return {"s": time.perf_counter() - started, "cpu_s": time.thread_time() - cpu}


async def floor(rows: int) -> dict[str, float]:
    """The per-event loop over the same reader, a plain dict for the table, no run."""
    started, cpu = time.perf_counter(), time.thread_time()
    t: dict[str, list[int]] = {}
    async for v, _offset in reader(rows)(None):
        k = str(v["k"])
        c = t.get(k)
        t[k] = [1, v["v"]] if c is None else [c[0] + 1, c[1] + v["v"]]
    check_state(t, rows)
    return {"s": time.perf_counter() - started, "cpu_s": time.thread_time() - cpu}


async def floor_batched(rows: int) -> dict[str, float]:
    """The batch form's loop over the same batches, a plain dict for the table, no run."""
    started, cpu = time.perf_counter(), time.thread_time()
    t: dict[str, list[int]] = {}
    async for values, _offset in batch_reader(rows)(None):
        add_sums(t, summed(values))
    check_state(t, rows)
    return {"s": time.perf_counter() - started, "cpu_s": time.thread_time() - cpu}


def store_bytes(root: Path) -> int:
    """Bytes of every file under ``root``: the store's size on disk."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


async def collected_bytes(root: Path) -> int:
    """The store's size on disk once ``apersist gc --grace-seconds 0`` has run: the bytes
    its state needs. Segments that maintenance merged away stay on disk until a gc."""
    from apersist._drivers import open_driver
    from apersist._gc import collect_garbage

    driver = open_driver(apersist.Backend.filesystem(str(root)))
    try:
        for _ in range(2):  # the first pass marks, the second deletes what it marked
            await collect_garbage(driver, grace_ms=0, now_ms=time.time_ns() // 1_000_000)
    finally:
        await driver.aclose()
    return store_bytes(root)


# --------------------------------------------------------------------------- the section


async def section_job(settings: Settings, stores: Stores, report: Report) -> None:
    rows, reps = settings.job_rows, settings.repeats
    batches = has_batches()
    pathway = None
    if settings.peers:
        from .peers import PATHWAY, ensure_pathway

        log(f"peers: {PATHWAY} virtualenv")
        pathway = await asyncio.to_thread(ensure_pathway)
    s: dict[str, list[float]] = {k: [] for k in (
        "record", "record_cpu", "batch", "batch_cpu", "restore", "restore_cpu", "floor",
        "floor_batch", "size", "live_size", "batch_size", "pw_record", "pw_restore", "pw_size",
        "pw_record_process", "pw_restore_process")}

    async def c_per_event() -> None:
        store = stores.new("job")
        done = await per_event(store, rows)
        s["record"].append(rows / done["s"])
        s["record_cpu"].append(done["cpu_s"])
        s["size"].append(store_bytes(store) / 1e6)
        s["live_size"].append(await collected_bytes(store) / 1e6)
        done = await per_event(store, rows)  # the restart: replay, rebuild, nothing new
        s["restore"].append(done["s"] * 1000)
        s["restore_cpu"].append(done["cpu_s"])
        stores.drop(store)

    async def c_batch() -> None:
        store = stores.new("job-batch")
        done = await batched(store, rows)
        s["batch"].append(rows / done["s"])
        s["batch_cpu"].append(done["cpu_s"])
        s["batch_size"].append(store_bytes(store) / 1e6)
        stores.drop(store)

    async def c_floor() -> None:
        s["floor"].append(rows / (await floor(rows))["s"])
        s["floor_batch"].append(rows / (await floor_batched(rows))["s"])

    async def c_pathway() -> None:
        from .peers import run_pathway_job

        assert pathway is not None
        store = stores.new("job-pathway")
        done = await asyncio.to_thread(run_pathway_job, pathway, rows, store / "pw")
        s["pw_record"].append(rows / done["record"]["run_s"])
        s["pw_restore"].append(done["restore"]["run_s"] * 1000)
        s["pw_size"].append(done["record"]["store_bytes"] / 1e6)
        s["pw_record_process"].append(done["record"]["process_s"])
        s["pw_restore_process"].append(done["restore"]["process_s"])
        stores.drop(store)

    contenders: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("apersist per event + restore", c_per_event), ("floor", c_floor)]
    if batches:
        contenders.append(("apersist batch form", c_batch))
    if pathway is not None:
        contenders.append(("pathway", c_pathway))
    warm = min(rows, max(1_000, rows // 20))
    log(f"job: warming up ({warm:,} rows)")
    store = stores.new("job-warmup")
    await per_event(store / "a", warm)
    await per_event(store / "a", warm)
    if batches:
        await batched(store / "b", warm)
    await floor(warm)
    await floor_batched(warm)
    stores.drop(store)
    for rep in range(reps):
        for name, step in rotated(contenders, rep):
            log(f"job: repeat {rep + 1}/{reps}: {name}, {rows:,} rows")
            await step()
    add_rows(report, rows, s, batches=batches, pathway=pathway is not None)


def add_rows(report: Report, rows: int, s: dict[str, list[float]], *, batches: bool,
             pathway: bool) -> None:
    """The job's rows, first in the table: per event, batch form, restore, store size."""
    peer = "Pathway 0.33.0, the same job"
    no_peer = " (add `--peers` for Pathway 0.33.0 beside it)"
    job = f"job: {rows:,} rows, count + sum per key (1,000 keys), persisted"
    cpu = ", ".join(f"{name} {1e6 * min(s[k]) / rows:.2f} µs" for name, k in (
        ("per event", "record_cpu"), ("batch form", "batch_cpu"), ("restore", "restore_cpu"))
        if s[k])
    record = Row(
        f"{job}: `run.source()` + a table write per event, until durable", "job", "ev/s",
        Series("rows/s", s["record"], "apersist"),
        [Series("plain dict, same reader and loop, no run", s["floor"], "floor")],
        note=(f"from entering `apersist.run` to leaving it; Pathway: `pw.run()`, same rows, "
              f"`groupby(k).reduce(count, sum(v))`, snapshot_interval_ms=0. Event-loop "
              f"thread CPU per row, best repeat: {cpu}{'' if pathway else no_peer}"))
    batch = Row(
        f"{job}: `run.source_batches()`, batches of {BATCH_ROWS:,}, until durable", "job",
        "ev/s", Series("rows/s", s["batch"], "apersist"),
        [Series("plain dict, same batches and loop, no run", s["floor_batch"], "floor")],
        note=("" if batches else "`run.source_batches()` is not in this apersist: not measured"))
    restore = Row(
        f"{job}: restore (reopen, replay the input, rebuild the state)", "job", "ms",
        Series("enter to leave", s["restore"], "apersist"),
        note=("the per-event program again over its store: the reader has nothing new, the "
              "replayed events are skipped, the table is rebuilt; Pathway: `pw.run()` over its "
              "persistence directory, the subject emitting nothing (its input log replayed, "
              "the groupby rebuilt)"))
    size = Row(f"{job}: store size on disk", "job", "MB",
               Series("per-event store", s["size"], "apersist"),
               [Series("the per-event store after `apersist gc --grace-seconds 0`",
                       s["live_size"])]
               + ([Series("batch-form store", s["batch_size"])] if s["batch_size"] else []),
               note="merged-away segments stay on disk until a gc; the figure after it is "
                    "what the store's state needs")
    if pathway:
        record.baselines.append(Series(peer, s["pw_record"], "pathway"))
        record.targets.append(Target("pathway", at_least=RECORD_TARGET))
        batch.baselines.append(Series(peer, s["pw_record"], "pathway"))
        batch.targets.append(Target("pathway", at_least=BATCH_TARGET))  # n/a if not measured
        restore.baselines.append(Series(peer, s["pw_restore"], "pathway"))
        restore.targets.append(Target("pathway", at_most=1 / RESTORE_TARGET))
        size.baselines.append(Series(peer, s["pw_size"], "pathway"))
        restore.note += (f"; Pathway time / apersist time: "
                         f"{median(s['pw_restore']) / median(s['restore']):.2f}x"
                         f" (target ≥ {RESTORE_TARGET:g}x). Pathway's whole processes (imports "
                         f"included): record {min(s['pw_record_process']):.1f} s, restore "
                         f"{min(s['pw_restore_process']):.1f} s")
    # The headline: first in the table, whatever ran before it.
    report.rows[:0] = [record, batch, restore, size]
