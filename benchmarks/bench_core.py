"""apersist core benchmark: every number next to the floor it should approach.

In one process and one run, on the filesystem backend in a temporary directory:

1. **record**: events/s of ``await stream.record(value)`` for N small dicts, next to the
   floor ``orjson.dumps(value)`` + ``list.append`` in a plain loop. The final
   ``await run.commit()`` is timed on its own, next to one write + fsync of as many bytes.
2. **replay**: events/s of ``async for e in stream.replay()`` over what was recorded, next
   to ``orjson.loads`` over the floor's serialized bytes.
3. **event-loop stall**: how late a 1 ms ticker task wakes up while large batches commit,
   (a) explicit ``run.commit()`` of N/5-event batches, next to the same ticker on an idle
   loop, and (b) group commit (``snapshot_interval_ms=0``) in the background while a
   producer records and yields every few hundred events, next to a producer that only
   serializes into a bytearray. Max and p99 lag in ms.
4. **commit latency** of a 1-event commit with ``snapshot_interval_ms=0`` (p50, p99), next
   to one write + fsync of a small file in a worker thread, in the same directory, and
   next to the same I/O a commit does (two atomic publishes) done bare.

Throughputs are the best of ``--repeats`` runs, latencies and stalls the median, with
apersist and its floor interleaved so that noise from neighbours hits both alike. Targets
are printed, never asserted.

    python benchmarks/bench_core.py [--events N] [--quick] [--repeats R] [--json PATH]
                                    [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

import apersist

STREAM = "bench"
TICK_S = 0.001  # the ticker's period
STALL_BATCHES = 5  # explicit-commit stall: N/5 events per committed batch
YIELD_EVERY = 256  # group-commit stall: the producer yields to the loop this often
SMALL_FILE = b"x" * 128  # about the size of a 1-event segment
RECORD_TARGET = 0.5
REPLAY_TARGET = 0.5
STALL_TARGET_MS = 5.0
COMMIT_TARGET = 2.0  # a commit should cost about two fsyncs

Values = list[dict[str, Any]]
Window = tuple[float, float]


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class Metric:
    """One table row: apersist's samples next to its baseline's samples."""

    name: str
    unit: str  # "ev/s" (higher is better) or "ms" (lower is better)
    apersist: list[float]
    baseline: list[float]
    baseline_label: str
    target: str = "—"
    met: bool | None = None  # None: no target for this row

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "ev/s"

    def pick(self, samples: Sequence[float]) -> float:
        """Best of the runs for a throughput, median for a latency or stall."""
        if not samples:
            return float("nan")
        return max(samples) if self.higher_is_better else statistics.median(samples)

    @property
    def value(self) -> float:
        return self.pick(self.apersist)

    @property
    def base(self) -> float:
        return self.pick(self.baseline)

    @property
    def ratio(self) -> float:
        return self.value / self.base if self.base else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "apersist": self.value,
                "apersist_samples": self.apersist, "baseline": self.base,
                "baseline_samples": self.baseline, "baseline_label": self.baseline_label,
                "ratio": self.ratio, "target": self.target, "met": self.met}


def ratio_target(metric: Metric, *, at_least: float | None = None,
                 at_most: float | None = None) -> Metric:
    """Judge ``metric``'s ratio against a bound (reported, not asserted)."""
    if at_least is not None:
        metric.target, metric.met = f"≥ {at_least:g}x baseline", metric.ratio >= at_least
    elif at_most is not None:
        metric.target, metric.met = f"≤ {at_most:g}x baseline", metric.ratio <= at_most
    return metric


def ms_target(metric: Metric, bound_ms: float) -> Metric:
    metric.target, metric.met = f"≤ {bound_ms:g} ms", metric.value <= bound_ms
    return metric


@dataclass(slots=True)
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(len(ordered) * q / 100))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` and its mount point (Linux only)."""
    real = os.path.realpath(path)
    mount, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(mount):
                mount, kind = point, fields[2]
    return f"{kind} (mounted at {mount})" if mount else kind


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (NaN where the OS has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def machine_facts(root: Path) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "orjson": orjson.__version__,
        "anyio": importlib.metadata.version("anyio"),
        "apersist": apersist.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "temp_dir": str(root),
        "filesystem": filesystem_of(root),
        "loadavg_at_start": load_average(),
    }


# --------------------------------------------------------------------------- floors


def make_values(count: int) -> Values:
    return [{"user": f"u{i % 1000}", "n": i, "ok": True} for i in range(count)]


def floor_record(values: Values) -> tuple[float, list[bytes]]:
    """Seconds for ``orjson.dumps`` + ``list.append`` over ``values``, and the dumps."""
    dumps = orjson.dumps
    out: list[bytes] = []
    append = out.append
    start = time.perf_counter()
    for value in values:
        append(dumps(value))
    return time.perf_counter() - start, out


class RecordFloor:
    """Runs of the record floor over ``values``; holds the newest run's dumps.

    Every result is kept, as the floor says, and orjson makes that costly: each result
    is allocated as a 4 KiB ``bytes`` and then shrunk, so a cold heap takes a page fault
    per kept value (see the README). The previous run's dumps are freed before each run,
    so runs after the first reuse warm memory and memory holds one copy at most.
    """

    def __init__(self, values: Values) -> None:
        self.values = values
        self.dumps: list[bytes] = []

    def run(self) -> float:
        """Seconds for one run; ``self.dumps`` then holds its serialized values."""
        self.dumps = []
        elapsed, self.dumps = floor_record(self.values)
        return elapsed


def floor_dumps_only(values: Values) -> float:
    """Seconds for ``orjson.dumps`` alone, its result dropped (the pure CPU cost)."""
    dumps = orjson.dumps
    start = time.perf_counter()
    for value in values:
        dumps(value)
    return time.perf_counter() - start


def floor_replay(dumped: list[bytes]) -> float:
    """Seconds for ``orjson.loads`` over every serialized value."""
    loads = orjson.loads
    start = time.perf_counter()
    for raw in dumped:
        loads(raw)
    return time.perf_counter() - start


def write_fsync(path: Path, data: bytes) -> None:
    """Create ``path``, write ``data``, fsync it: the floor of any durable write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_publish(directory: Path, name: str, data: bytes) -> None:
    """Publish ``data`` as ``directory/name`` the way the filesystem driver's put does.

    A temporary file is written and fsynced, linked into place and unlinked, then the
    directory is fsynced: the bare I/O of one create-if-absent put.
    """
    tmp = directory / f".tmp-{name}"
    write_fsync(tmp, data)
    os.link(tmp, directory / name)
    os.unlink(tmp)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def timed_write_fsync(path: Path, data: bytes) -> float:
    """Seconds for one ``write_fsync`` in a worker thread, awaited from the loop."""
    start = time.perf_counter()
    await asyncio.to_thread(write_fsync, path, data)
    elapsed = time.perf_counter() - start
    await asyncio.to_thread(path.unlink)
    return elapsed


# --------------------------------------------------------------------------- apersist


def config(root: Path, **options: Any) -> apersist.Config:
    return apersist.Config(apersist.Backend.filesystem(root), **options)


async def apersist_record(root: Path, values: Values) -> tuple[float, float, int]:
    """Record ``values``, then commit: (record seconds, commit seconds, bytes written)."""
    async with apersist.run(config(root)) as run:
        record = run.stream(STREAM).record  # bound once, as the floor binds list.append
        start = time.perf_counter()
        for value in values:
            await record(value)
        recorded = time.perf_counter()
        await run.commit()
        committed = time.perf_counter()
        written = int(run.stats["bytes_written"])
    return recorded - start, committed - recorded, written


async def apersist_replay(root: Path, expected: int) -> float:
    """Seconds to replay the stream in ``root`` (a read-only run); checks the count."""
    async with apersist.run(config(root, snapshot_access=apersist.SnapshotAccess.REPLAY)) as run:
        stream = run.stream(STREAM)
        count = 0
        start = time.perf_counter()
        async for _event in stream.replay():
            count += 1
        elapsed = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"replay yielded {count} events, expected {expected}")
    return elapsed


# --------------------------------------------------------------------------- ticker


class Ticker:
    """A task that sleeps 1 ms in a loop and notes how late each wake-up was."""

    def __init__(self, period: float = TICK_S) -> None:
        self.period = period
        self.ticks: list[tuple[float, float]] = []  # (sleep started, seconds late)
        self.sleeping_since = 0.0
        self._woke = asyncio.Event()

    async def run(self) -> None:
        period, clock, ticks = self.period, time.perf_counter, self.ticks
        while True:
            started = self.sleeping_since = clock()
            await asyncio.sleep(period)
            ticks.append((started, clock() - started - period))
            woke, self._woke = self._woke, asyncio.Event()
            woke.set()

    async def resync(self) -> float:
        """Return now, once the ticker has started a sleep at or after now.

        The tick in flight (possibly very late after a stretch of code that never
        yielded) completes first, so a window opened at the returned time holds no
        lateness caused before it.
        """
        now = time.perf_counter()
        while self.sleeping_since < now:
            await self._woke.wait()
        return now

    def lags_ms(self, windows: Sequence[Window]) -> list[float]:
        """Lateness (ms) of every tick whose sleep started inside one of ``windows``."""
        return [late * 1000 for started, late in self.ticks
                if any(a <= started < b for a, b in windows)]


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    try:
        yield ticker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stall_explicit(root: Path, values: Values, batches: int) -> tuple[list[float], list[Window]]:
    """Ticker lag (ms) during explicit commits of ``len(values) / batches`` events each.

    Only commits count: the record loop never yields, so the lateness it causes belongs
    to the producer, and the windows open after it.
    """
    size = max(1, len(values) // batches)
    windows: list[Window] = []
    # A long interval: only the explicit commits write.
    async with apersist.run(config(root, snapshot_interval_ms=3_600_000)) as run, ticking() as ticker:
        record = run.stream(STREAM).record
        for first in range(0, size * batches, size):
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


async def produce(values: Values, sink: Callable[[Any], Any], *, awaited: bool) -> None:
    """Feed ``values`` to ``sink``, yielding to the loop every ``YIELD_EVERY`` values."""
    for first in range(0, len(values), YIELD_EVERY):
        if awaited:
            for value in values[first:first + YIELD_EVERY]:
                await sink(value)
        else:
            for value in values[first:first + YIELD_EVERY]:
                sink(value)
        await asyncio.sleep(0)


async def stall_group_commit(root: Path, values: Values) -> tuple[list[float], int]:
    """Ticker lag (ms) while a yielding producer records and group commit runs behind it."""
    async with apersist.run(config(root, snapshot_interval_ms=0)) as run, ticking() as ticker:
        opened = await ticker.resync()
        await produce(values, run.stream(STREAM).record, awaited=True)
        await run.commit()
        window = (opened, time.perf_counter())
        await ticker.resync()
        commits = int(run.stats["commits"])
    return ticker.lags_ms([window]), commits


async def stall_producer_only(values: Values) -> list[float]:
    """Ticker lag (ms) behind the same producer when it only serializes into a buffer.

    A bytearray, not a list: kept orjson results would make the heap's state, not the
    producer, set the number (see ``RecordFloor``).
    """
    buffer = bytearray()
    dumps = orjson.dumps

    def sink(value: Any) -> None:
        buffer.extend(dumps(value))

    async with ticking() as ticker:
        opened = await ticker.resync()
        await produce(values, sink, awaited=False)
        window = (opened, time.perf_counter())
        await ticker.resync()
    return ticker.lags_ms([window])


# --------------------------------------------------------------------------- commit latency


async def timed_ms(step: Awaitable[object]) -> float:
    """Milliseconds until ``step`` (a coroutine not yet started) completes."""
    start = time.perf_counter()
    await step
    return (time.perf_counter() - start) * 1000


async def commit_latency_samples(root: Path, samples: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of a 1-event commit next to its floors, interleaved sample by sample.

    Each round times, in turn: one small write + fsync in a worker thread ("floor");
    ``record`` one event + ``run.commit()`` with ``snapshot_interval_ms=0`` ("apersist");
    a commit's I/O done bare, a segment then a commit record each published atomically
    in its own directory by one thread call ("bare"). Interleaving keeps the three under
    the same conditions: fsync times on a shared VM drift over seconds.
    """
    floor, segments, commits = root / "floor", root / "bare" / "segments", root / "bare" / "commits"
    for directory in (floor, segments, commits):
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    out: dict[str, list[float]] = {"floor": [], "apersist": [], "bare": []}
    async with apersist.run(config(root / "store", snapshot_interval_ms=0)) as run:
        stream = run.stream(STREAM)

        async def one_commit(i: int) -> None:
            await stream.record({"user": "u1", "n": i, "ok": True})
            await run.commit()

        async def bare_commit(i: int) -> None:
            await asyncio.to_thread(atomic_publish, segments, f"{i}.seg", SMALL_FILE)
            await asyncio.to_thread(atomic_publish, commits, f"{i}.json", SMALL_FILE)

        for i in range(warmup + samples):
            floor_ms = await timed_write_fsync(floor / f"{i}.bin", SMALL_FILE) * 1000
            apersist_ms = await timed_ms(one_commit(i))
            bare_ms = await timed_ms(bare_commit(i))
            if i >= warmup:
                out["floor"].append(floor_ms)
                out["apersist"].append(apersist_ms)
                out["bare"].append(bare_ms)
    return out


# --------------------------------------------------------------------------- sections


@dataclass(slots=True)
class Settings:
    events: int
    repeats: int
    commit_samples: int
    root: Path

    @property
    def warmup_events(self) -> int:
        return min(20_000, max(1_000, self.events // 10))


class Stores:
    """Fresh store directories under one temporary root, removed as soon as unneeded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made = 0

    def new(self, label: str) -> Path:
        self._made += 1
        return self.root / f"{label}-{self._made}"

    @staticmethod
    def drop(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


async def warm_up(values: Values, floor: RecordFloor, settings: Settings, stores: Stores,
                  report: Report) -> None:
    """One small pass of every apersist code path and one full pass of the record floor.

    The floor's first full pass meets a cold heap; it is noted, not scored. Its dumps
    stay alive across the apersist pass, which allocates above them, so that freeing
    them later leaves warm memory for the scored runs.
    """
    report.notes["record_floor_cold_heap_ev_s"] = round(len(values) / floor.run())
    small = values[:settings.warmup_events]
    floor_dumps_only(small)
    store = stores.new("warmup")
    await apersist_record(store, small)
    await apersist_replay(store, len(small))
    await commit_latency_samples(store / "commit", 5, 0)
    stores.drop(store)


async def section_record_replay(values: Values, floor: RecordFloor, settings: Settings,
                                stores: Stores, report: Report) -> None:
    n, reps = len(values), settings.repeats
    rec, floor_rates, dumps_only, commit, commit_floor = [], [], [], [], []
    kept: Path | None = None
    written = 0
    for rep in range(reps):
        log(f"record: run {rep + 1}/{reps}")
        floor_rates.append(n / floor.run())
        dumps_only.append(n / floor_dumps_only(values))
        if kept is not None:
            stores.drop(kept)
        kept = stores.new("record")
        record_s, commit_s, written = await apersist_record(kept, values)
        rec.append(n / record_s)
        commit.append(commit_s * 1000)
        blob = bytes(written)
        commit_floor.append(await timed_write_fsync(kept / "floor.bin", blob) * 1000)
        del blob
    assert kept is not None
    replay, replay_floor = [], []
    for rep in range(reps):
        log(f"replay: run {rep + 1}/{reps}")
        replay_floor.append(n / floor_replay(floor.dumps))
        replay.append(n / await apersist_replay(kept, n))
    stores.drop(kept)
    floor.dumps = []
    report.metrics += [
        ratio_target(Metric("record: `await stream.record(v)`", "ev/s", rec, floor_rates,
                            "orjson.dumps + list.append"), at_least=RECORD_TARGET),
        ratio_target(Metric("record, vs dumps alone (CPU floor)", "ev/s", rec, dumps_only,
                            "orjson.dumps, result dropped"), at_least=RECORD_TARGET),
        Metric(f"final commit of {n:,} events ({written / 1e6:.1f} MB)", "ms", commit,
               commit_floor, "write + fsync of as many bytes in a thread"),
        ratio_target(Metric("replay: `async for e in stream.replay()`", "ev/s", replay,
                            replay_floor, "orjson.loads over the dumps"), at_least=REPLAY_TARGET),
    ]
    report.notes["bytes_per_event_on_disk"] = round(written / n, 1)


async def section_stall(values: Values, settings: Settings, stores: Stores,
                        report: Report) -> None:
    reps = settings.repeats
    batch = len(values) // STALL_BATCHES
    explicit_max, explicit_p99, idle_max, idle_p99 = [], [], [], []
    group_max, group_p99, prod_max, prod_p99, commits = [], [], [], [], []
    for rep in range(reps):
        log(f"stall: run {rep + 1}/{reps}")
        store = stores.new("stall-explicit")
        lags, windows = await stall_explicit(store, values, STALL_BATCHES)
        stores.drop(store)
        explicit_max.append(max(lags, default=0.0))
        explicit_p99.append(percentile(lags, 99))
        idle = await stall_idle(sum(b - a for a, b in windows))
        idle_max.append(max(idle, default=0.0))
        idle_p99.append(percentile(idle, 99))

        store = stores.new("stall-group")
        lags, count = await stall_group_commit(store, values)
        stores.drop(store)
        group_max.append(max(lags, default=0.0))
        group_p99.append(percentile(lags, 99))
        commits.append(count)
        lags = await stall_producer_only(values)
        prod_max.append(max(lags, default=0.0))
        prod_p99.append(percentile(lags, 99))
    explicit = f"stall, explicit commits of {batch:,}-event batches"
    group = f"stall, group commit behind a producer yielding every {YIELD_EVERY}"
    producer = "the producer serializing into a bytearray"
    report.metrics += [
        ms_target(Metric(f"{explicit}: max", "ms", explicit_max, idle_max, "idle loop"),
                  STALL_TARGET_MS),
        ms_target(Metric(f"{explicit}: p99", "ms", explicit_p99, idle_p99, "idle loop"),
                  STALL_TARGET_MS),
        ms_target(Metric(f"{group}: max", "ms", group_max, prod_max, producer), STALL_TARGET_MS),
        ms_target(Metric(f"{group}: p99", "ms", group_p99, prod_p99, producer), STALL_TARGET_MS),
    ]
    report.notes["group_commits_per_run"] = commits


async def section_commit_latency(settings: Settings, stores: Stores, report: Report) -> None:
    reps, samples = settings.repeats, settings.commit_samples
    warmup = max(5, samples // 10)
    runs: list[dict[str, list[float]]] = []
    for rep in range(reps):
        log(f"commit latency: run {rep + 1}/{reps}")
        store = stores.new("commit")
        runs.append(await commit_latency_samples(store, samples, warmup))
        stores.drop(store)

    def pct(kind: str, q: float) -> list[float]:
        return [percentile(run[kind], q) for run in runs]

    name = "commit latency, 1 event, interval 0"
    floor = "one small write + fsync in a thread"
    bare = "the same I/O done bare: 2 atomic publishes"
    report.metrics += [
        ratio_target(Metric(f"{name}: p50", "ms", pct("apersist", 50), pct("floor", 50), floor),
                     at_most=COMMIT_TARGET),
        ratio_target(Metric(f"{name}: p99", "ms", pct("apersist", 99), pct("floor", 99), floor),
                     at_most=COMMIT_TARGET),
        Metric(f"{name}: p50, vs its own I/O", "ms", pct("apersist", 50), pct("bare", 50), bare),
        Metric(f"{name}: p99, vs its own I/O", "ms", pct("apersist", 99), pct("bare", 99), bare),
    ]


async def run_all(settings: Settings) -> Report:
    started = time.perf_counter()
    report = Report(settings={"events": settings.events, "repeats": settings.repeats,
                              "commit_samples": settings.commit_samples,
                              "stall_batches": STALL_BATCHES, "yield_every": YIELD_EVERY,
                              "tick_ms": TICK_S * 1000},
                    machine=machine_facts(settings.root))
    stores = Stores(settings.root)
    log(f"building {settings.events:,} values")
    values = make_values(settings.events)
    # The inputs live for the whole run: keep them out of every collection, so that
    # apersist and its floors are not charged for traversing them.
    gc.collect()
    gc.freeze()
    floor = RecordFloor(values)
    log("warming up")
    await warm_up(values, floor, settings, stores, report)
    await section_record_replay(values, floor, settings, stores, report)
    await section_stall(values, settings, stores, report)
    await section_commit_latency(settings, stores, report)
    report.machine["loadavg_at_end"] = load_average()
    report.runtime_s = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------- output


def fmt_value(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "ev/s":
        return f"{value:,.0f} ev/s"
    return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"


def fmt_target(metric: Metric) -> str:
    if metric.met is None:
        return metric.target
    return f"{metric.target}: {'met' if metric.met else '**missed**'}"


def render_markdown(report: Report) -> str:
    s, m = report.settings, report.machine
    lines = [
        "## apersist core benchmark",
        "",
        f"N = {s['events']:,} events; throughput = best of {s['repeats']} runs, "
        f"latency and stall = median of {s['repeats']}; filesystem backend.",
        "",
        "| metric | apersist | baseline | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for metric in report.metrics:
        lines.append(f"| {metric.name} | {fmt_value(metric.value, metric.unit)} | "
                     f"{fmt_value(metric.base, metric.unit)} ({metric.baseline_label}) | "
                     f"{metric.ratio:.2f}x | {fmt_target(metric)} |")
    lines += ["", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in m.items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {key}: {value}" for key, value in report.notes.items()]
    lines += [f"- runtime: {report.runtime_s:.1f} s", ""]
    return "\n".join(lines)


def to_json(report: Report) -> bytes:
    doc = asdict(report)
    doc["metrics"] = [metric.to_json() for metric in report.metrics]
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=None,
                        help="events per measurement (default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20,000 events, 2 runs, 50 commit samples")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each measurement (default 3; 2 with --quick)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results as JSON to PATH")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to make the temporary stores (default: the system temp dir)")
    args = parser.parse_args(argv)
    if args.events is not None and args.events < STALL_BATCHES:
        parser.error(f"--events must be at least {STALL_BATCHES}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    events = args.events or (20_000 if args.quick else 1_000_000)
    repeats = args.repeats or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="apersist-bench-", dir=args.dir) as tmp:
        settings = Settings(events=events, repeats=repeats,
                            commit_samples=50 if args.quick else 200, root=Path(tmp))
        report = asyncio.run(run_all(settings))
    print(render_markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(to_json(report) + b"\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
