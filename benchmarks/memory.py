"""Peak memory while recording N events: one fresh subprocess per size and contender.

The parent runs ``python -m benchmarks.memory --events N --dir D --contender C`` for each
size, so sizes never share a heap. The child makes its events one at a time (a generator:
the input itself never occupies memory), records them, commits, and prints one JSON line
with its peak resident set size, ``VmHWM`` of ``/proc/self/status`` (in KiB), and the RSS it
had before the first event. ``VmHWM`` belongs to the address space, which ``exec`` makes
afresh; ``ru_maxrss`` is not used because Linux carries it across ``exec``, so a child
would report the parent's peak whenever that is higher (it was, by gigabytes). Contenders:

- ``apersist``: ``await stream.record(v)`` per event, default config
  (``snapshot_interval_ms=0``, back-pressure at ``max_pending_bytes``);
- ``aiofiles``: the JSON-lines log of ``baselines.py``, fsync per batch (bounded by
  construction: a batch at a time);
- ``none``: the same loop making the events and dropping them (the interpreter's own).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from .common import Report, Row, Series, Settings, Stores, Target, log, run_child

CONTENDERS = ("apersist", "aiofiles", "none")
MEMORY_TARGET = 2.0  # peak at the largest size over the peak at the smallest


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def events(count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {"user": f"u{i % 1000}", "n": i, "ok": True}


async def child(contender: str, count: int, root: Path, batch: int) -> dict[str, Any]:
    import apersist

    from .baselines import JsonlLog

    start_rss = status_kib("VmRSS")
    start = time.perf_counter()
    commits = 0
    if contender == "apersist":
        async with apersist.run(apersist.Config(apersist.Backend.filesystem(root))) as run:
            record = run.stream("bench").record
            for value in events(count):
                await record(value)
            await run.commit()
            commits = int(run.stats["commits"])
    elif contender == "aiofiles":
        log = JsonlLog(root / "log.jsonl")
        await log.open()
        try:
            part: list[Any] = []
            for value in events(count):
                part.append(value)
                if len(part) == batch:
                    await log.append_batch(part)
                    part = []
            if part:
                await log.append_batch(part)
        finally:
            await log.close()
    else:
        for _value in events(count):
            pass
    elapsed = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return {"contender": contender, "events": count, "seconds": elapsed, "peak_rss_kib": peak,
            "start_rss_kib": start_rss, "commits": commits}


def measure(contender: str, count: int, root: Path, batch: int, timeout: float = 3600) -> dict[str, Any]:
    """Run one child; its JSON result. The repository root is its working directory."""
    return run_child("benchmarks.memory", ["--contender", contender, "--events", str(count),
                                           "--dir", str(root), "--batch", str(batch)],
                     root, timeout=timeout)


def section_memory(settings: Settings, stores: Stores, report: Report) -> None:
    """Peak RSS of apersist recording each size, next to the bare loop at the same size."""
    sizes = sorted(settings.memory_events)
    peaks: dict[str, dict[str, float]] = {}
    for count in sizes:
        for contender in ("apersist", "none"):
            if contender == "none" and count != sizes[-1]:
                continue  # the bare loop only at the largest size
            log(f"memory: {contender}, {count:,} events (a subprocess)")
            root = stores.new(f"memory-{contender}-{count}")
            result = measure(contender, count, root, settings.batch)
            stores.drop(root)
            peaks.setdefault(contender, {})[str(count)] = result["peak_rss_kib"] / 1024
            report.notes[f"memory: {contender}, {count:,} events"] = (
                f"peak {result['peak_rss_kib'] / 1024:,.0f} MiB, at start "
                f"{result['start_rss_kib'] / 1024:,.0f} MiB, {result['seconds']:.1f} s, "
                f"{result['commits']} commits")
    report.series["peak_rss_mib"] = peaks
    small, large = sizes[0], sizes[-1]
    if small == large:
        return
    report.rows.append(Row(
        f"peak RSS while recording {large:,} events (VmHWM of a fresh process)", "memory",
        "MiB", Series(f"{large:,} events", [peaks["apersist"][str(large)]], "apersist"),
        [Series(f"apersist, {small:,} events", [peaks["apersist"][str(small)]], "smaller N"),
         Series(f"the loop making {large:,} events, recording none", [peaks["none"][str(large)]])],
        [Target("smaller N", at_most=MEMORY_TARGET)]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one peak-memory measurement (a child process)")
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args(argv)
    result = asyncio.run(child(args.contender, args.events, args.dir, args.batch))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
