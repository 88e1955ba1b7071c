"""Table and cache state: memory per key in a writing run, open time, loop stall on open.

A table (or the ``@cached`` cache) holds its live state in memory; what it costs should
follow the state: a small multiple of its serialized size, and opening it should neither
take long nor block the event loop. Each measurement is a fresh subprocess, so sizes
never share a heap (``python -m benchmarks.state --kind table --phase write ...``):

- ``write``: a writing run (``snapshot_interval_ms=60000``) sets N keys (``table[k] = v``,
  timed: the per-write cost, as the loop thread's CPU time, which another process on the
  machine does not inflate), commits, sets every key again (timed), compacts, and notes
  its resident set (``VmRSS``) against the one before the run. The cache: N misses of a
  sync ``@cached`` function, timed, then a commit.
- ``open``: a fresh writing run (``SnapshotAccess.FULL``) opens what ``write`` left:
  ``await run.table(name)`` (for the cache: entering ``apersist.run``, which loads it)
  is timed while a 1 ms ticker (``common.Ticker``) notes how late the loop let it wake:
  the worst lateness is the longest stall of the loop while opening.
- ``dict``: the same keys and values in a plain ``dict`` (the state with nothing kept
  besides), and the serialized size: the JSON records the store holds.

``--code DIR`` imports ``apersist`` from ``DIR`` instead (to measure another version);
``python -m benchmarks.state --compare --before DIR`` measures both and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from .common import Report, Row, Series, Settings, Stores, Target, Ticker, log, run_child
from .memory import status_kib

KINDS = ("table", "cache")
PHASES = ("write", "open", "dict")
TABLE = "bench-state"
CACHE_NAME = "bench.state-square"
STALL_TARGET_MS = 5.0
# What a table holds per key beyond a dict of its state (the cache: all it holds per
# entry), over the key's record as stored.
MEMORY_TARGET = 4.0
DICT_LABEL = {"table": "a plain dict of the same state",
              "cache": "a plain dict of each key's result as compact JSON bytes"}


def table_value(i: int, round_: int) -> dict[str, Any]:
    return {"n": i, "round": round_, "ok": True}


def cache_result(x: int) -> dict[str, Any]:
    return {"x": x, "y": x * x}


def rss_kib() -> int:
    gc.collect()
    return status_kib("VmRSS")


async def write_table(root: Path, keys: int) -> dict[str, Any]:
    import apersist

    start_rss = rss_kib()
    names = [f"k{i}" for i in range(keys)]
    first = [table_value(i, 0) for i in range(keys)]
    config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=60_000)
    async with apersist.run(config) as run:
        table = await run.table(TABLE)
        started = time.thread_time()
        for name, value in zip(names, first, strict=True):
            table[name] = value
        insert_s = time.thread_time() - started
        await run.commit()
        del first
        second = [table_value(i, 1) for i in range(keys)]
        started = time.thread_time()
        for name, value in zip(names, second, strict=True):
            table[name] = value
        update_s = time.thread_time() - started
        del second, names  # the table holds the keys and values now, nothing else does
        await run.compact()
        rss = rss_kib()
        if len(table) != keys:
            raise RuntimeError(f"table has {len(table)} keys, expected {keys}")
    return {"insert_us": insert_s / keys * 1e6, "update_us": update_s / keys * 1e6,
            "rss_kib": rss - start_rss, "peak_kib": status_kib("VmHWM")}


async def write_cache(root: Path, keys: int) -> dict[str, Any]:
    import apersist

    @apersist.cached(name=CACHE_NAME)
    def square(x: int) -> dict[str, Any]:
        return cache_result(x)

    start_rss = rss_kib()
    async with apersist.run(apersist.Config(apersist.Backend.filesystem(root),
                                            snapshot_interval_ms=60_000)) as run:
        started = time.thread_time()
        for i in range(keys):
            square(i)
        miss_s = time.thread_time() - started
        await run.commit()
        rss = rss_kib()
        if run.stats["cache_misses"] != keys:
            raise RuntimeError(f"{run.stats['cache_misses']} misses, expected {keys}")
    return {"insert_us": miss_s / keys * 1e6, "rss_kib": rss - start_rss,
            "peak_kib": status_kib("VmHWM")}


class CpuTicker(Ticker):
    """``common.Ticker`` that also notes the loop thread's CPU time over each tick.

    On a shared machine a tick is also late when the OS runs another process: the CPU
    time the loop's thread spent between two ticks is the part the loop's own work caused
    (a thread holding the GIL is left out of it, and shows in the lateness only).
    """

    def __init__(self) -> None:
        super().__init__()
        self.cpu: list[tuple[float, float]] = []  # (sleep started, loop-thread CPU seconds)

    async def run(self) -> None:
        period, clock, cpu_clock, ticks = self.period, time.perf_counter, time.thread_time, self.ticks
        while True:
            started = self.sleeping_since = clock()
            cpu = cpu_clock()
            await asyncio.sleep(period)
            ticks.append((started, clock() - started - period))
            self.cpu.append((started, cpu_clock() - cpu))
            woke, self._woke = self._woke, asyncio.Event()
            woke.set()

    def cpu_ms(self, window: tuple[float, float]) -> list[float]:
        return [used * 1000 for started, used in self.cpu if window[0] <= started < window[1]]


async def open_state(kind: str, root: Path, keys: int) -> dict[str, Any]:
    import apersist
    import apersist._cache

    config = apersist.Config(apersist.Backend.filesystem(root), snapshot_interval_ms=60_000)
    start_rss = rss_kib()
    collections: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(time.perf_counter())
        else:
            collections[-1] = (time.perf_counter() - collections[-1]) * 1000

    ticker = CpuTicker()
    task = asyncio.create_task(ticker.run())
    gc.callbacks.append(on_gc)
    windows: dict[str, tuple[float, float]] = {}
    cpu: dict[str, float] = {}  # the loop thread's CPU time in each window
    from_store = apersist._cache.UdfCache.from_store.__func__  # type: ignore[attr-defined]

    async def timed_from_store(cls: Any, *args: Any, **kwargs: Any) -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return await from_store(cls, *args, **kwargs)
        finally:
            windows["cache"] = (started, time.perf_counter())
            cpu["cache"] = time.thread_time() - cpu_started

    try:
        if kind == "table":
            async with apersist.run(config) as run:
                started = await ticker.resync()
                cpu_started = time.thread_time()
                table = await run.table(TABLE)
                windows["table"] = (started, time.perf_counter())
                cpu["table"] = time.thread_time() - cpu_started
                size = len(table)
                # The tick in flight at the end lands in the window: let it, before the
                # collection and the /proc read of rss_kib().
                await asyncio.sleep(0.01)
                gc.callbacks.remove(on_gc)
                rss = rss_kib()
        else:
            # Timed from inside: entering the run does more (the store, the writer role).
            apersist._cache.UdfCache.from_store = classmethod(  # type: ignore[method-assign,assignment]
                timed_from_store)
            started = await ticker.resync()
            async with apersist.run(config) as run:
                windows["run"] = (started, time.perf_counter())
                size = len(run._cache)
                await asyncio.sleep(0.01)
                gc.callbacks.remove(on_gc)
                rss = rss_kib()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if size != keys:
        raise RuntimeError(f"{kind} has {size} keys, expected {keys}")
    # The table: ``await run.table()``. The cache: ``UdfCache.from_store``, the part of
    # entering the run that loads it (and the whole of entering, for reference).
    window = windows[kind]
    result = {"open_ms": (window[1] - window[0]) * 1000, "open_cpu_ms": cpu[kind] * 1000,
              "stall_ms": max(ticker.lags_ms([window]), default=0.0),
              "stall_cpu_ms": max(ticker.cpu_ms(window), default=0.0),
              "ticks": len(ticker.lags_ms([window])),
              "gc_ms": sorted(collections, reverse=True)[:3],
              "rss_kib": rss - start_rss, "peak_kib": status_kib("VmHWM")}
    if "run" in windows:
        whole = windows["run"]
        result |= {"run_ms": (whole[1] - whole[0]) * 1000,
                   "run_stall_ms": max(ticker.lags_ms([whole]), default=0.0),
                   "run_stall_cpu_ms": max(ticker.cpu_ms(whole), default=0.0)}
    return result


def plain_dict(kind: str, keys: int) -> dict[str, Any]:
    """A plain dict of the same state, and the bytes of its records as stored."""
    from apersist._cache import _entry_key  # imported before the first reading

    start_rss = rss_kib()
    if kind == "table":
        state: dict[str, Any] = {f"k{i}": table_value(i, 1) for i in range(keys)}
    else:
        # The cache keeps each result as JSON: the least it could hold is compact bytes.
        state = {_entry_key(CACHE_NAME, 1, (i,), {}): b"%b" % orjson.dumps(cache_result(i))
                 for i in range(keys)}
    rss = rss_kib()
    if kind == "table":
        serialized = sum(len(orjson.dumps([k, v])) for k, v in state.items())
    else:
        serialized = sum(len(orjson.dumps(k)) + len(v) + 3 for k, v in state.items())
    return {"rss_kib": rss - start_rss, "serialized": serialized}


def measure(kind: str, phase: str, keys: int, root: Path, *, code: Path | None = None,
            timeout: float = 3600) -> dict[str, Any]:
    """Run one child; its JSON result. The repository root is its working directory."""
    extra = ["--code", str(code)] if code is not None else []
    return run_child("benchmarks.state", ["--kind", kind, "--phase", phase, "--keys", str(keys),
                                          "--dir", str(root), *extra], root, timeout=timeout)


def measure_all(kind: str, keys: int, root: Path, *, repeats: int = 1,
                code: Path | None = None) -> dict[str, Any]:
    """Write once, open ``repeats`` times, and the plain dict: each a child of its own."""
    return {"write": measure(kind, "write", keys, root, code=code),
            "open": [measure(kind, "open", keys, root, code=code) for _ in range(repeats)],
            "dict": measure(kind, "dict", keys, root, code=code)}


def labels(kind: str) -> tuple[str, str]:
    return ("table", "keys") if kind == "table" else ("@cached cache", "entries")


def section_state(settings: Settings, stores: Stores, report: Report) -> None:
    """Tables and the cache at each size: memory per key, open time, worst stall on open."""
    figures: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        what, unit_name = labels(kind)
        for keys in settings.state_keys:
            log(f"state: {what}, {keys:,} {unit_name} (subprocesses)")
            root = stores.new(f"state-{kind}-{keys}")
            result = measure_all(kind, keys, root, repeats=settings.repeats)
            stores.drop(root)
            figures.setdefault(kind, {})[str(keys)] = result
            write, opens, plain = result["write"], result["open"], result["dict"]
            record = plain["serialized"] / keys
            as_dict = plain["rss_kib"] * 1024 / keys
            written = write["rss_kib"] * 1024 / keys
            report.rows.append(Row(
                f"{what} of {keys:,} {unit_name}: memory per key in a writing run "
                "(VmRSS growth)", "state", "B", Series("in a writing run", [written], "apersist"),
                [Series(DICT_LABEL[kind], [as_dict], "dict"),
                 Series("its record as stored (JSON)", [record], "record")]))
            # What it holds beyond the state itself, against the record: a small multiple.
            beyond = written - as_dict if kind == "table" else written
            report.rows.append(Row(
                f"{what} of {keys:,} {unit_name}: memory per "
                f"{'key beyond a dict of its state' if kind == 'table' else 'entry'}", "state", "B",
                Series("beyond", [beyond], "apersist"),
                [Series("its record as stored (JSON)", [record], "record")],
                [Target("record", at_most=MEMORY_TARGET)]))
            opening = (f"await run.table() of {keys:,} keys" if kind == "table" else
                       f"UdfCache.from_store, {keys:,} entries, entering apersist.run")
            report.rows.append(Row(
                f"{opening} (a writing run)", "state", "ms",
                Series("open", [o["open_ms"] for o in opens], "apersist"),
                [Series("the whole of entering the run", [o["run_ms"] for o in opens])]
                if kind == "cache" else []))
            report.rows.append(Row(
                f"worst event-loop stall during {opening}", "state", "ms",
                Series("worst tick lateness", [o["stall_ms"] for o in opens], "apersist"),
                [Series("the loop thread's CPU time in that tick",
                        [o["stall_cpu_ms"] for o in opens])],
                [Target(None, at_most=STALL_TARGET_MS)]))
            report.rows.append(Row(
                f"{what} of {keys:,} {unit_name}: memory per key after opening", "state", "B",
                Series("after opening", [o["rss_kib"] * 1024 / keys for o in opens], "apersist"),
                [Series(DICT_LABEL[kind], [as_dict], "dict")]))
            report.rows.append(Row(
                f"{'table[k] = v' if kind == 'table' else 'a sync @cached miss'}, "
                f"{keys:,} {unit_name}, loop-thread CPU per call", "state", "µs",
                Series("a new key", [write["insert_us"]], "apersist"),
                [Series("every key again", [write["update_us"]])] if "update_us" in write else []))
    report.series["state"] = figures


def compare(before: Path | None, sizes: Sequence[int], repeats: int, root: Path) -> str:
    """A Markdown table of every figure, for the code in ``before`` and for this one."""
    import statistics
    import tempfile

    def med(values: list[float]) -> float:
        return statistics.median(values)

    lines = ["| state | code | memory per key, writing run | after opening | a dict of it | "
             "record as stored | open (loop CPU) | worst stall (loop CPU) | per write: new, again |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in KINDS:
        what, unit_name = labels(kind)
        for keys in sizes:
            for label, code in (("before", before), ("after", None)):
                if label == "before" and before is None:
                    continue
                log(f"state: {what}, {keys:,} {unit_name}, {label}")
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    r = measure_all(kind, keys, Path(tmp), repeats=repeats, code=code)
                w, opens, d = r["write"], r["open"], r["dict"]
                again = f", {w['update_us']:.2f}" if "update_us" in w else ""
                lines.append(
                    f"| {what}, {keys:,} {unit_name} | {label} | {w['rss_kib'] * 1024 / keys:,.0f} B "
                    f"| {med([o['rss_kib'] for o in opens]) * 1024 / keys:,.0f} B "
                    f"| {d['rss_kib'] * 1024 / keys:,.0f} B | {d['serialized'] / keys:,.0f} B "
                    f"| {med([o['open_ms'] for o in opens]):,.0f} ms "
                    f"({med([o['open_cpu_ms'] for o in opens]):,.0f} ms) "
                    f"| {med([o['stall_ms'] for o in opens]):,.1f} ms "
                    f"({med([o['stall_cpu_ms'] for o in opens]):,.1f} ms) "
                    f"| {w['insert_us']:.2f}{again} µs |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="table and cache state: one measurement (a child process), or --compare")
    parser.add_argument("--kind", choices=KINDS)
    parser.add_argument("--phase", choices=PHASES)
    parser.add_argument("--keys", type=int)
    parser.add_argument("--dir", type=Path, help="the store (a child) or where to make them")
    parser.add_argument("--code", type=Path, help="import apersist from this directory")
    parser.add_argument("--compare", action="store_true",
                        help="measure everything at --sizes; print a Markdown table")
    parser.add_argument("--before", type=Path,
                        help="with --compare: also measure the apersist in this directory")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeats", type=int, default=3, help="opens per size (median)")
    args = parser.parse_args(argv)
    if args.compare:
        import tempfile

        sizes = [int(x) for x in args.sizes.split(",")]
        with tempfile.TemporaryDirectory(prefix="apersist-state-", dir=args.dir) as tmp:
            print(compare(args.before, sizes, args.repeats, Path(tmp)))
        return 0
    if args.kind is None or args.phase is None or args.keys is None or args.dir is None:
        parser.error("a child needs --kind, --phase, --keys and --dir (or use --compare)")
    if args.code is not None:
        sys.path.insert(0, str(args.code))
    if args.phase == "write":
        writer = write_table if args.kind == "table" else write_cache
        result = asyncio.run(writer(args.dir, args.keys))
    elif args.phase == "open":
        result = asyncio.run(open_state(args.kind, args.dir, args.keys))
    else:
        result = plain_dict(args.kind, args.keys)
    import apersist

    result["apersist"] = str(Path(apersist.__file__).parent)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
