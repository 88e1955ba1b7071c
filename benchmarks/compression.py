"""Compression: what zstd segments cost and save, side by side with raw ones in one run.

Two value sets: the Pathway job's rows (``{"k": i % 1000, "v": i, "s": "abc"}`` recorded
with offset ``i``, as ``benchmarks/job.py`` records them) and the suite's standard events
(``make_values``, no offsets). Each is recorded with ``record()`` per event until durable
(the final commit included) into a filesystem store written with ``compression=None`` and
with the default (zstd level 3), then replayed by a read-only run. Reported: the stored
bytes per event once ``apersist gc`` has collected what maintenance merged away (the
store's live size), and record and replay throughput of zstd against raw.

Targets (issue 17): at most 10 B/event on the Pathway rows; the standard events at least
3x smaller than raw; record and replay with zstd at least 0.9x of raw.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apersist

from .common import Report, Row, Series, Settings, Stores, Target, log, make_values, rotated
from .job import collected_bytes

STREAM = "events"
#: (label, Config.compression) of each way of storing segments measured.
CODECS = (("raw", None), ("zstd-3", "zstd"))


def pathway_rows(count: int) -> list[dict[str, Any]]:
    """The 1M-row job's rows (``benchmarks/job.py``)."""
    return [{"k": i % 1000, "v": i, "s": "abc"} for i in range(count)]


async def record(root: Path, values: list[Any], *, offsets: bool,
                 compression: str | None) -> float:
    """Seconds to record ``values`` per event and commit them (offset ``i`` for event
    ``i`` when ``offsets``)."""
    config = apersist.Config(apersist.Backend.filesystem(root), compression=compression)
    async with apersist.run(config) as run:
        put = run.stream(STREAM).record
        start = time.perf_counter()
        if offsets:
            for i, value in enumerate(values):
                await put(value, offset=i)
        else:
            for value in values:
                await put(value)
        await run.commit()
        return time.perf_counter() - start


async def replay(root: Path, expected: int) -> float:
    """Seconds to replay the stream (a read-only run); checks the count."""
    config = apersist.Config(apersist.Backend.filesystem(root),
                             snapshot_access=apersist.SnapshotAccess.REPLAY)
    async with apersist.run(config) as run:
        count = 0
        start = time.perf_counter()
        async for _event in run.stream(STREAM).replay():
            count += 1
        elapsed = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"replay yielded {count} events, expected {expected}")
    return elapsed


async def measure(name: str, values: list[Any], offsets: bool, settings: Settings,
                  stores: Stores) -> dict[str, dict[str, list[float]]]:
    """Per codec label: ``record`` and ``replay`` (ev/s) and ``bytes`` (B/event) samples."""
    n = len(values)
    samples: dict[str, dict[str, list[float]]] = {
        label: {"record": [], "replay": [], "bytes": []} for label, _codec in CODECS}
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    for label, codec in CODECS:
        async def step(label: str = label, codec: str | None = codec) -> None:
            store = stores.new(f"compression-{name}-{label}")
            got = samples[label]
            got["record"].append(n / await record(store, values, offsets=offsets,
                                                  compression=codec))
            got["replay"].append(n / await replay(store, n))
            got["bytes"].append(await collected_bytes(store) / n)
            stores.drop(store)
        steps.append((label, step))
    for rep in range(settings.repeats):
        for label, step in rotated(steps, rep):
            log(f"compression: {name}: repeat {rep + 1}/{settings.repeats}: {label}")
            await step()
    return samples


def rows_for(name: str, n: int, got: dict[str, dict[str, list[float]]],
             size_target: Target) -> list[Row]:
    zstd, raw = got["zstd-3"], got["raw"]
    return [
        Row(f"stored bytes per event, {n:,} {name} (live store after gc)", "compression", "B/ev",
            Series("zstd level 3", zstd["bytes"], "apersist"),
            [Series("compression=None", raw["bytes"], "raw")], [size_target],
            note="segments, commit records and checkpoints, divided by the events"),
        Row(f"record {n:,} {name} per event until durable, zstd vs raw", "compression", "ev/s",
            Series("zstd level 3", zstd["record"], "apersist"),
            [Series("compression=None", raw["record"], "raw")],
            [Target("raw", at_least=0.9)]),
        Row(f"replay {n:,} {name}, zstd vs raw", "compression", "ev/s",
            Series("zstd level 3", zstd["replay"], "apersist"),
            [Series("compression=None", raw["replay"], "raw")],
            [Target("raw", at_least=0.9)]),
    ]


async def section_compression(settings: Settings, stores: Stores, report: Report) -> None:
    n = settings.events
    log(f"compression: building {n:,} values of each set")
    sets = [("Pathway job rows with offsets", pathway_rows(n), True, Target(None, at_most=10)),
            ("standard events", make_values(n), False, Target("raw", at_most=0.33))]
    for name, values, offsets, size_target in sets:
        got = await measure(name.split()[0].lower(), values, offsets, settings, stores)
        report.rows += rows_for(name, n, got, size_target)
        del values
